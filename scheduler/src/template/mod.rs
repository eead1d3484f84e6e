//! Liquid templates for URLs, header values and bodies, bounded in what they may ask of a
//! node ([`limits`] on the source, [`filters`] and [`budget`] at render time).

pub(crate) mod budget;
mod filters;
pub mod limits;

/// Parses and renders Liquid templates with the standard filters.
pub struct Templates {
    parser: liquid::Parser,
    /// Parsed templates by source: a webhook's templates are parsed once per node; the least
    /// used go past [`MAX_PARSED`].
    parsed: quick_cache::sync::Cache<String, std::sync::Arc<liquid::Template>>,
}

/// Parsed templates kept per node.
const MAX_PARSED: usize = 10_000;

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Templates")
    }
}

impl Templates {
    /// Returns an engine with Liquid's standard tags and filters, each checking the render's
    /// time budget ([`budget`]) before it runs.
    pub fn new() -> Self {
        use liquid_lib::stdlib;
        let mut parser = liquid::ParserBuilder::new();
        macro_rules! tags {
            ($($tag:expr),* $(,)?) => { $(parser = parser.tag(budget::TimedTag(Box::new($tag)));)* };
        }
        macro_rules! blocks {
            ($($block:expr),* $(,)?) => { $(parser = parser.block(budget::TimedBlock(Box::new($block)));)* };
        }
        macro_rules! filters {
            ($($filter:expr),* $(,)?) => { $(parser = parser.filter(budget::TimedFilter(Box::new($filter)));)* };
        }
        tags!(
            stdlib::AssignTag,
            stdlib::BreakTag,
            stdlib::ContinueTag,
            stdlib::CycleTag,
            stdlib::IncludeTag,
            stdlib::IncrementTag,
            stdlib::DecrementTag,
            stdlib::RenderTag,
        );
        blocks!(
            stdlib::RawBlock,
            stdlib::IfBlock,
            stdlib::UnlessBlock,
            stdlib::IfChangedBlock,
            stdlib::ForBlock,
            stdlib::TableRowBlock,
            stdlib::CommentBlock,
            stdlib::CaseBlock,
        );
        filters!(
            stdlib::Abs,
            stdlib::AtLeast,
            stdlib::AtMost,
            stdlib::Capitalize,
            stdlib::Ceil,
            stdlib::Compact,
            stdlib::Date,
            stdlib::Default,
            stdlib::Downcase,
            stdlib::Escape,
            stdlib::EscapeOnce,
            stdlib::First,
            stdlib::Floor,
            stdlib::Join,
            stdlib::Last,
            stdlib::Lstrip,
            stdlib::Map,
            stdlib::NewlineToBr,
            stdlib::Remove,
            stdlib::RemoveFirst,
            stdlib::Reverse,
            stdlib::Round,
            stdlib::Rstrip,
            stdlib::Size,
            stdlib::Slice,
            stdlib::Sort,
            stdlib::SortNatural,
            stdlib::Split,
            stdlib::Strip,
            stdlib::StripHtml,
            stdlib::StripNewlines,
            stdlib::Truncate,
            stdlib::TruncateWords,
            stdlib::Uniq,
            stdlib::Upcase,
            stdlib::UrlDecode,
            stdlib::UrlEncode,
            stdlib::Where,
        );
        // The bounded builders, arithmetic and capture stand in for the standard ones of the
        // same names.
        filters!(
            Json,
            filters::Append,
            filters::Prepend,
            filters::Replace,
            filters::ReplaceFirst,
            filters::Concat,
            filters::Plus,
            filters::Minus,
            filters::Times,
            filters::DividedBy,
            filters::Modulo,
        );
        blocks!(filters::CaptureBlock);
        // Building only fails for partials that do not parse, and there are none.
        let parser = parser.build().unwrap_or_default();
        Self { parser, parsed: quick_cache::sync::Cache::new(MAX_PARSED) }
    }

    /// Parses a template.
    pub(crate) fn parse(&self, source: &str) -> Result<std::sync::Arc<liquid::Template>, String> {
        if let Some(template) = self.parsed.get(source) {
            return Ok(template);
        }
        limits::check(source)?;
        let template = std::sync::Arc::new(
            self.parser.parse(source).map_err(|error| first_line(&error.to_string()))?,
        );
        self.parsed.insert(source.to_string(), template.clone());
        Ok(template)
    }

    /// Checks that `source` is a valid template; the error says where and why it is not.
    pub fn check(&self, source: &str) -> Result<(), String> {
        limits::check(source)?;
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
    fn bounded_filters_keep_their_standard_behaviour() {
        let templates = Templates::new();
        let render = |source: &str| {
            let template = templates.parse(source).expect("parses");
            template.render(&liquid::object!({"s": "ab"})).map_err(|e| e.to_string())
        };
        assert_eq!(render("{{ s | append: 'c' | prepend: '>' }}").as_deref(), Ok(">abc"));
        assert_eq!(
            render("{{ 'aXbX' | replace: 'X', '-' }} {{ 'aXbX' | replace_first: 'X', '-' }}")
                .as_deref(),
            Ok("a-b- a-bX")
        );
        assert_eq!(render("{{ 7 | plus: 3 }} {{ 7 | minus: 3 }} {{ 7 | times: 3 }} {{ 7 | divided_by: 2 }} {{ 7 | modulo: 3 }} {{ 7.5 | divided_by: 2 }}").as_deref(), Ok("10 4 21 3 1 3.75"));
        assert_eq!(
            render("{% capture c %}[{{ s }}]{% endcapture %}{{ c }}").as_deref(),
            Ok("[ab]")
        );
        assert!(render("{{ 1 | divided_by: 0 }}").expect_err("zero").contains("divide by zero"));
        assert!(
            render("{{ 9223372036854775807 | plus: 1 }}")
                .expect_err("overflow")
                .contains("overflow")
        );
        let joined =
            "{% assign a = '1,2' | split: ',' %}{% assign b = a | concat: a %}{{ b | join: '' }}";
        assert_eq!(render(joined).as_deref(), Ok("1212"));
    }

    #[test]
    fn limits_hold_on_the_source() {
        let templates = Templates::new();
        let nested = format!("{}x{}", "{% if true %}".repeat(40), "{% endif %}".repeat(40));
        assert!(templates.check(&nested).expect_err("deep").contains("nest more than 32"));
        let fine = format!("{}x{}", "{% if true %}".repeat(10), "{% endif %}".repeat(10));
        assert!(templates.check(&fine).is_ok());
        assert!(
            templates
                .check("{% for i in (1..100) %}{% for j in (1..100) %}{% endfor %}{% endfor %}")
                .is_ok()
        );
        assert!(
            templates
                .check("{% for i in (1..1000) %}{% for j in (1..1000) %}{% endfor %}{% endfor %}")
                .expect_err("product")
                .contains("iterations")
        );
        assert!(
            templates.check("{% raw %}{% for i in (1..99999999) %}{% endraw %}").is_ok(),
            "raw is text"
        );
        assert!(templates.check("{{ a.b.c.d }}").is_ok());
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
