//! CEL expressions: segment filters, event filters and business rules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Checks that `source` is a valid CEL expression; the error says where and why it is not.
pub fn check(source: &str) -> Result<(), String> {
    if source.len() > 8 * 1024 {
        return Err("must be at most 8 KiB".into());
    }
    cel::Program::compile(source).map(|_| ()).map_err(|errors| {
        errors
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// Compiled expressions by source, so each is parsed once per node.
#[derive(Default)]
pub struct Programs {
    compiled: Mutex<HashMap<String, Arc<cel::Program>>>,
}

impl std::fmt::Debug for Programs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Programs")
    }
}

impl Programs {
    /// Evaluates `source` with the given variables; true only for a boolean true.
    pub fn evaluate(
        &self,
        source: &str,
        variables: &[(&str, &serde_json::Value)],
    ) -> Result<bool, String> {
        let program = {
            let mut compiled = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
            match compiled.get(source) {
                Some(program) => program.clone(),
                None => {
                    let program =
                        Arc::new(cel::Program::compile(source).map_err(|e| e.to_string())?);
                    if compiled.len() > 10_000 {
                        compiled.clear();
                    }
                    compiled.insert(source.to_string(), program.clone());
                    program
                }
            }
        };
        // The standard library's declarations take long to build: each thread builds them
        // once, and each evaluation adds its variables in a scope of its own.
        thread_local! {
            static ROOT: cel::Context<'static, 'static> = cel::Context::default();
        }
        ROOT.with(|root| {
            let mut context = root.new_inner_scope();
            for (name, value) in variables {
                context.add_variable(*name, *value).map_err(|e| e.to_string())?;
            }
            match program.execute(&context) {
                Ok(cel::Value::Bool(result)) => Ok(result),
                Ok(other) => Err(format!("evaluated to {other:?}, not a boolean")),
                Err(error) => Err(error.to_string()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn reports_syntax_errors() {
        assert!(super::check("contact.attributes.plan == 'pro'").is_ok());
        assert!(!super::check("contact.attributes.plan ==").expect_err("incomplete").is_empty());
    }

    #[test]
    fn evaluates_over_json() {
        let programs = super::Programs::default();
        let contact = json!({"id": "u1", "attributes": {"plan": "pro", "age": 42}});
        let event = json!({"type": "order.shipped", "data": {"total": 120.5}});
        let vars = [("contact", &contact), ("event", &event)];
        assert_eq!(
            programs
                .evaluate("contact.attributes.plan == 'pro' && event.data.total > 100.0", &vars),
            Ok(true)
        );
        assert_eq!(programs.evaluate("contact.attributes.age < 18", &vars), Ok(false));
        assert!(programs.evaluate("contact.attributes.plan", &vars).is_err());
    }
}
