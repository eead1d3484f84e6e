//! Liquid templates for URLs, header values and bodies.

/// Parses and renders Liquid templates with the standard filters.
pub struct Templates {
    parser: liquid::Parser,
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
        let parser = liquid::ParserBuilder::with_stdlib().build().unwrap_or_default();
        Self { parser }
    }

    /// Parses a template.
    pub(crate) fn parse(&self, source: &str) -> Result<liquid::Template, String> {
        self.parser.parse(source).map_err(|error| first_line(&error.to_string()))
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
    fn checks_syntax() {
        let templates = Templates::new();
        assert!(templates.check("Hello {{ contact.attributes.name | default: 'you' }}").is_ok());
        let error = templates.check("Hello {{ contact.name").expect_err("unclosed");
        assert!(!error.is_empty());
        assert!(templates.check("{% if x %}no end").is_err());
    }
}
