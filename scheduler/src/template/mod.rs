//! Liquid templates for URLs, header values and bodies.

/// Parses and renders Liquid templates with the standard filters.
pub struct Templates {
    parser: liquid::Parser,
    /// Parsed templates by source: a webhook's templates are parsed once per node.
    parsed: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<liquid::Template>>>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Templates")
    }
}

impl Templates {
    /// Returns an engine with Liquid's standard tags and filters.
    pub fn new() -> Self {
        // Building only fails for partials that do not parse, and there are none.
        let parser = liquid::ParserBuilder::with_stdlib().filter(Json).build().unwrap_or_default();
        Self { parser, parsed: Default::default() }
    }

    /// Parses a template.
    pub(crate) fn parse(&self, source: &str) -> Result<std::sync::Arc<liquid::Template>, String> {
        if let Some(template) = self.parsed.lock().unwrap_or_else(|p| p.into_inner()).get(source) {
            return Ok(template.clone());
        }
        let template = std::sync::Arc::new(
            self.parser.parse(source).map_err(|error| first_line(&error.to_string()))?,
        );
        let mut parsed = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        if parsed.len() >= 10_000 {
            parsed.clear();
        }
        parsed.insert(source.to_string(), template.clone());
        Ok(template)
    }

    /// Checks that `source` is a valid template; the error says where and why it is not.
    pub fn check(&self, source: &str) -> Result<(), String> {
        self.parser.parse(source).map(|_| ()).map_err(|error| first_line(&error.to_string()))
    }
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

/// The `json` filter: writes any value as JSON (`{{ event.data.items | json }}`), which webhook
/// bodies need to embed objects, lists and strings safely.
#[derive(Clone, liquid_core::ParseFilter, liquid_core::FilterReflection)]
#[filter(name = "json", description = "Writes the value as JSON.", parsed(JsonFilter))]
struct Json;

#[derive(Debug, Default, liquid_core::Display_filter)]
#[name = "json"]
struct JsonFilter;

impl liquid_core::Filter for JsonFilter {
    fn evaluate(
        &self,
        input: &dyn liquid_core::ValueView,
        _runtime: &dyn liquid_core::Runtime,
    ) -> liquid_core::Result<liquid_core::Value> {
        let json = serde_json::to_string(&input.to_value())
            .map_err(|e| liquid_core::Error::with_msg(format!("json: {e}")))?;
        Ok(liquid_core::Value::scalar(json))
    }
}

/// Liquid errors span several lines with context; the first one states the problem.
fn first_line(message: &str) -> String {
    let lines: Vec<&str> = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines.join("; ")
}

/// Returns whether `source` contains Liquid markup.
pub fn has_markup(source: &str) -> bool {
    source.contains("{{") || source.contains("{%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_filter_writes_json() {
        let templates = Templates::new();
        let template = templates.parse(r#"{{ x | json }} {{ s | json }}"#).expect("parses");
        let globals = liquid::object!({"x": [1, "a"], "s": "say \"hi\""});
        assert_eq!(template.render(&globals).expect("renders"), r#"[1,"a"] "say \"hi\"""#);
    }

    #[test]
    fn checks_syntax() {
        let templates = Templates::new();
        assert!(templates.check("Hello {{ contact.attributes.name | default: 'you' }}").is_ok());
        let error = templates.check("Hello {{ contact.name").expect_err("unclosed");
        assert!(!error.is_empty());
        assert!(templates.check("{% if x %}no end").is_err());
    }
}
