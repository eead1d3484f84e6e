//! CEL expressions: segment filters, event filters and business rules.

use std::sync::Arc;

/// Deepest nesting of parentheses, brackets and braces.
pub const MAX_DEPTH: usize = 32;

/// The comprehension macros: each runs its body once per item of a list or map.
const MACROS: &[&str] = &["all", "exists", "exists_one", "map", "filter"];

/// Most steps one evaluation may take, as [`Shape::steps`] estimates them from the
/// expression and the size of the data it runs over.
pub const MAX_STEPS: u64 = 20_000_000;

/// How an expression's work grows with the data it reads, found on its text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    /// Bytes of the comprehensions' bodies: each runs once per item of its list or map.
    body: u64,
    /// How often the comprehensions' bodies read more than their own item (`l.all(x, x in
    /// l)` once): each such read may walk the data on every run of the body.
    walks: u64,
}

impl Shape {
    /// An upper estimate of the steps of one evaluation over data of `size` values: each
    /// comprehension's body once per value, and each of its reads of the data a walk over
    /// all of it per run; the rest of the expression runs once.
    pub fn steps(&self, size: u64) -> u64 {
        let runs = self.body.saturating_mul(size);
        runs.saturating_add(self.walks.saturating_mul(size).saturating_mul(size))
    }
}

/// The size of `value` for [`Shape::steps`]: one per value, and one per 16 bytes of text.
pub fn size(value: &serde_json::Value) -> u64 {
    match value {
        serde_json::Value::String(text) => 1 + text.len() as u64 / 16,
        serde_json::Value::Array(items) => 1 + items.iter().map(size).sum::<u64>(),
        serde_json::Value::Object(fields) => {
            1 + fields
                .iter()
                .map(|(key, value)| 1 + key.len() as u64 / 16 + size(value))
                .sum::<u64>()
        }
        _ => 1,
    }
}

/// Checks what evaluating `source` may cost, on its text: nesting at most [`MAX_DEPTH`] deep
/// (the parser recurses per level), and no comprehension inside another one's body (a nested
/// `.all` over two lists runs their product of steps per contact). Returns the expression's
/// [`Shape`], which bounds each evaluation by the size of its data.
pub fn check_cost(source: &str) -> Result<Shape, String> {
    let mut shape = Shape::default();
    // For each open bracket: where a macro's arguments start, if it opened them.
    let mut open: Vec<Option<usize>> = Vec::new();
    let mut strings = Strings::default();
    let bytes = source.as_bytes();
    for (i, c) in source.char_indices() {
        if strings.inside(c) {
            continue;
        }
        match c {
            '"' | '\'' => strings.open(c),
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
                if is_macro && open.iter().any(Option::is_some) {
                    return Err(format!(
                        "a comprehension ({}) inside another one's body (at byte {i}) can take \
                         the product of the lists' sizes in steps",
                        &source[name_start..name_end]
                    ));
                }
                open.push(is_macro.then_some(i + 1));
            }
            ')' | ']' | '}' => {
                if let Some(Some(start)) = open.pop() {
                    let arguments = &source[start..i];
                    let (item, body) = arguments.split_once(',').unwrap_or(("", arguments));
                    shape.body += body.len() as u64;
                    let item = item.trim();
                    shape.walks += free_names(body).filter(|name| *name != item).count() as u64;
                }
            }
            _ => {}
        }
    }
    Ok(shape)
}

/// Where a scan of an expression's text stands with its string literals.
#[derive(Default)]
struct Strings {
    /// The quote of the literal the scan is in.
    quote: Option<char>,
    /// Whether the previous character was a backslash inside it.
    escaped: bool,
}

impl Strings {
    /// Starts a literal at the quote `c`.
    fn open(&mut self, c: char) {
        self.quote = Some(c);
    }

    /// Whether `c` belongs to the literal the scan is in (its closing quote included).
    fn inside(&mut self, c: char) -> bool {
        let Some(quote) = self.quote else { return false };
        if self.escaped {
            self.escaped = false;
        } else if c == '\\' {
            self.escaped = true;
        } else if c == quote {
            self.quote = None;
        }
        true
    }
}

/// The names in `source` that refer to variables: not a field (`.name`), a function
/// (`name(`), a keyword, a number or anything inside a string.
fn free_names(source: &str) -> impl Iterator<Item = &str> {
    // (start, end, the character before the name)
    let mut words: Vec<(usize, usize, char)> = Vec::new();
    let mut strings = Strings::default();
    let mut start: Option<(usize, char)> = None;
    let mut previous = ' ';
    for (i, c) in source.char_indices() {
        if strings.inside(c) {
            previous = c;
            continue;
        }
        let word = c.is_alphanumeric() || c == '_';
        match start {
            None if word => start = Some((i, previous)),
            Some((from, before)) if !word => {
                words.push((from, i, before));
                start = None;
            }
            _ => {}
        }
        if c == '"' || c == '\'' {
            strings.open(c);
        }
        if !c.is_whitespace() {
            previous = c;
        }
    }
    if let Some((from, before)) = start {
        words.push((from, source.len(), before));
    }
    words.into_iter().filter_map(move |(from, to, before)| {
        let name = &source[from..to];
        let field = before == '.';
        let call = source[to..].trim_start().starts_with('(');
        let keyword = matches!(name, "true" | "false" | "null" | "in");
        let number = name.starts_with(|c: char| c.is_ascii_digit());
        (!(field || call || keyword || number)).then_some(name)
    })
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
    compiled: quick_cache::sync::Cache<String, Arc<(cel::Program, Shape)>>,
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
    /// Evaluates `source` with the given variables; true only for a boolean true. An
    /// evaluation that could take more than [`MAX_STEPS`] over these variables is refused
    /// before it starts.
    pub fn evaluate(
        &self,
        source: &str,
        variables: &[(&str, &serde_json::Value)],
    ) -> Result<bool, String> {
        let compiled = match self.compiled.get(source) {
            Some(compiled) => compiled,
            None => {
                // Expressions stored before these bounds existed are held to them too.
                let shape = check_cost(source)?;
                let program = cel::Program::compile(source).map_err(|e| e.to_string())?;
                let compiled = Arc::new((program, shape));
                self.compiled.insert(source.to_string(), compiled.clone());
                compiled
            }
        };
        let (program, shape) = &*compiled;
        if shape.body > 0 {
            let size: u64 = variables.iter().map(|(_, value)| size(value)).sum();
            let steps = shape.steps(size);
            if steps > MAX_STEPS {
                return Err(format!(
                    "would take up to {steps} steps over this data ({size} values), more than \
                     the budget of {MAX_STEPS}"
                ));
            }
        }
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
    fn shapes_follow_what_a_body_reads() {
        let shape = |source| super::check_cost(source).expect("allowed");
        assert_eq!(shape("contact.attributes.plan == 'pro'"), super::Shape::default());
        let own = shape("contact.attributes.tags.exists(t, t.startsWith('v') && t != 'x')");
        assert!(own.walks == 0 && own.body > 0, "{own:?}");
        let strings = shape("contact.attributes.tags.exists(t, t == \"contact\")");
        assert_eq!(strings.walks, 0, "names in strings are text");
        let again = shape("contact.attributes.tags.all(t, t in contact.attributes.tags)");
        assert_eq!(again.walks, 1, "{again:?}");
        assert_eq!(again.steps(10), again.body * 10 + 100);
    }

    /// One comprehension whose body walks the list again is quadratic in the list: over a
    /// large list the evaluation is refused before it starts; over a small one it runs.
    #[test]
    fn evaluation_has_a_budget() {
        let programs = super::Programs::default();
        let source = "contact.attributes.l.all(x, x in contact.attributes.l)";
        let big = json!({"attributes": {"l": (0..10_000).collect::<Vec<_>>()}});
        let error = programs.evaluate(source, &[("contact", &big)]).expect_err("refused");
        assert!(error.contains("more than the budget of 20000000"), "{error}");
        let small = json!({"attributes": {"l": (0..1_000).collect::<Vec<_>>()}});
        assert_eq!(programs.evaluate(source, &[("contact", &small)]), Ok(true));
        let linear = "contact.attributes.l.all(x, x >= 0)";
        assert_eq!(programs.evaluate(linear, &[("contact", &big)]), Ok(true));
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
