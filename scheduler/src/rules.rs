//! CEL expressions: segment filters, event filters and business rules.

use std::sync::Arc;

/// Deepest nesting of parentheses, brackets and braces.
pub const MAX_DEPTH: usize = 32;

/// The comprehension macros: each runs its body once per item of a list or map.
const MACROS: &[&str] = &["all", "exists", "exists_one", "map", "filter"];

/// Checks what evaluating `source` may cost, on its text: nesting at most [`MAX_DEPTH`] deep
/// (the parser recurses per level), and no comprehension inside another one's body (a nested
/// `.all` over two lists runs their product of steps per contact; one level stays linear in
/// the data).
pub fn check_cost(source: &str) -> Result<(), String> {
    // For each open bracket: whether it opened a macro's arguments.
    let mut open: Vec<bool> = Vec::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let bytes = source.as_bytes();
    for (i, c) in source.char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '(' | '[' | '{' => {
                if open.len() >= MAX_DEPTH {
                    return Err(format!("nests deeper than {MAX_DEPTH} levels (at byte {i})"));
                }
                let name_end = i;
                let name_start = source[..name_end]
                    .rfind(|ch: char| !(ch.is_alphanumeric() || ch == '_'))
                    .map_or(0, |at| at + 1);
                let is_macro = c == '('
                    && name_start > 0
                    && bytes[name_start - 1] == b'.'
                    && MACROS.contains(&&source[name_start..name_end]);
                if is_macro && open.iter().any(|m| *m) {
                    return Err(format!(
                        "a comprehension ({}) inside another one's body (at byte {i}) can take \
                         the product of the lists' sizes in steps",
                        &source[name_start..name_end]
                    ));
                }
                open.push(is_macro);
            }
            ')' | ']' | '}' => {
                open.pop();
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks that `source` is a valid CEL expression; the error says where and why it is not.
pub fn check(source: &str) -> Result<(), String> {
    if source.len() > 8 * 1024 {
        return Err("must be at most 8 KiB".into());
    }
    check_cost(source)?;
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

/// Compiled expressions by source, so each is parsed once per node; the least used go past
/// [`MAX_PROGRAMS`].
pub struct Programs {
    compiled: quick_cache::sync::Cache<String, Arc<cel::Program>>,
}

/// Compiled expressions kept per node.
const MAX_PROGRAMS: usize = 10_000;

impl Default for Programs {
    fn default() -> Self {
        Self { compiled: quick_cache::sync::Cache::new(MAX_PROGRAMS) }
    }
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
        let program = match self.compiled.get(source) {
            Some(program) => program,
            None => {
                // Expressions stored before these bounds existed are held to them too.
                check_cost(source)?;
                let program = Arc::new(cel::Program::compile(source).map_err(|e| e.to_string())?);
                self.compiled.insert(source.to_string(), program.clone());
                program
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
    fn costly_expressions_are_refused() {
        let deep = format!("{}1{}", "(".repeat(40), ")".repeat(40));
        assert!(super::check(&deep).expect_err("deep").contains("deeper than 32"));
        let nested = "contact.attributes.a.all(x, contact.attributes.b.all(y, x != y))";
        assert!(super::check(nested).expect_err("nested").contains("comprehension"));
        assert!(super::check("contact.attributes.tags.exists(t, t == 'vip')").is_ok());
        assert!(super::check("'((((' + \"[[[[\" == 'x'").is_ok(), "brackets in strings count not");
        let programs = super::Programs::default();
        let contact = json!({"attributes": {"a": [1], "b": [2]}});
        assert!(programs.evaluate(nested, &[("contact", &contact)]).is_err());
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
