//! Renders a webhook's templates for one delivery. Output is bounded; a missing variable is an
//! error (a template may give a default with `| default: ...`); every failure is a message for
//! the attempt log, never a panic.

use std::collections::BTreeMap;

use crate::template::Templates;

/// Largest rendered body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Largest rendered URL or header value.
pub const MAX_FIELD: usize = 16 * 1024;

/// What templates can read.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Context {
    /// `contact`: id, attributes, timezone.
    pub contact: serde_json::Value,
    /// `event`: id, type, data, occurred_at.
    pub event: serde_json::Value,
    /// `campaign`: id, data.
    pub campaign: serde_json::Value,
    /// `run`: id, data.
    pub run: serde_json::Value,
    /// `delivery`: id.
    pub delivery: serde_json::Value,
}

/// A request ready to sign and send. Secret header values are in clear here; they never leave
/// the sending path.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rendered {
    /// Method.
    pub method: String,
    /// URL.
    pub url: String,
    /// Headers as given by the webhook, rendered, by name.
    pub headers: BTreeMap<String, String>,
    /// Names of headers whose values are secret.
    pub secret_headers: Vec<String>,
    /// Body.
    pub body: String,
    /// Content type.
    pub content_type: String,
}

impl Templates {
    /// Renders one template against the context; `what` names it in errors.
    pub fn render(
        &self,
        what: &str,
        source: &str,
        context: &Context,
        limit: usize,
    ) -> Result<String, String> {
        if source.is_empty() {
            return Ok(String::new());
        }
        if !crate::template::has_markup(source) {
            return Ok(source.to_string());
        }
        let template = self.parse(source).map_err(|e| format!("{what}: {e}"))?;
        let mut context = serde_json::to_value(context).map_err(|e| format!("{what}: {e}"))?;
        for path in defaulted_paths(source) {
            ensure_path(&mut context, &path);
        }
        let globals = liquid::model::to_object(&context).map_err(|e| format!("{what}: {e}"))?;
        // The writer refuses to grow past the limit, which stops rendering right there; every
        // step checks the time budget.
        let mut writer = crate::template::budget::Timed(Limited { out: Vec::new(), limit });
        let rendered =
            crate::template::budget::within(|| template.render_to(&mut writer, &globals)).map_err(
                |()| {
                    format!(
                        "{what}: took longer than {} ms to render, the limit",
                        crate::template::budget::MAX_RENDER_TIME.as_millis()
                    )
                },
            )?;
        let writer = writer.0;
        if writer.out.len() >= limit {
            return Err(format!("{what}: rendered to more than {limit} bytes, the limit"));
        }
        let output = rendered
            .map(|_| String::from_utf8_lossy(&writer.out).into_owned())
            .map_err(|e| format!("{what}: {}", explain(&e.to_string())))?;
        if output.len() > limit {
            return Err(format!(
                "{what}: rendered to {} bytes; the limit is {limit}",
                output.len()
            ));
        }
        Ok(output)
    }
}

/// Renders a webhook's request for one delivery, sealing secret header values for storage.
pub fn request(
    templates: &Templates,
    cipher: &crate::secrets::Cipher,
    webhook: &crate::webhook::Webhook,
    context: &Context,
) -> Result<super::record::StoredRequest, String> {
    use crate::webhook::HeaderValue;
    let url = templates.render("url", &webhook.url, context, MAX_FIELD)?;
    // Held at write time; checked again for webhooks stored before that rule.
    let expected = crate::webhook::origin(&webhook.url);
    let rendered = crate::webhook::origin(&url);
    if expected.is_none() || rendered != expected {
        return Err(format!(
            "url: rendered outside the webhook's origin ({}); only the path and query may be templated",
            expected.as_deref().unwrap_or("none fixed")
        ));
    }
    let mut rendered = Rendered {
        method: webhook.method.as_str().to_string(),
        url,
        headers: Default::default(),
        secret_headers: Vec::new(),
        body: templates.render("body", &webhook.body, context, MAX_BODY)?,
        content_type: webhook.content_type.clone(),
    };
    for header in &webhook.headers {
        let (template, secret) = match &header.value {
            HeaderValue::Plain(value) => (value.clone(), false),
            HeaderValue::Secret(sealed) => (
                cipher
                    .open(sealed)
                    .map_err(|e| format!("header {}: {e}", header.name))?
                    .expose()
                    .to_string(),
                true,
            ),
        };
        let what = format!("header {}", header.name);
        // A secret template's error could quote the secret: report only where it failed.
        let value = templates
            .render(&what, &template, context, MAX_FIELD)
            .map_err(|e| if secret { format!("{what}: failed to render") } else { e })?;
        if value.contains(['\r', '\n']) {
            return Err(format!("{what}: rendered to a value with a line break"));
        }
        if secret {
            rendered.secret_headers.push(header.name.clone());
        }
        rendered.headers.insert(header.name.clone(), value);
    }
    Ok(super::record::StoredRequest::seal(&rendered, cipher))
}

/// Returns the dotted variable paths that a template outputs through `| default`. Liquid
/// refuses to read a missing variable even when a default follows; those paths are set to nil
/// before rendering, so the default applies while other missing variables stay errors.
fn defaulted_paths(source: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        let inner = after[..end].trim_matches(|c: char| c == '-' || c.is_whitespace());
        let mut parts = inner.split('|');
        let path = parts.next().unwrap_or_default().trim();
        let defaulted = parts.any(|filter| filter.trim_start().starts_with("default"));
        let simple = !path.is_empty()
            && path.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if defaulted && simple {
            paths.push(path.split('.').map(str::to_string).collect());
        }
        rest = &after[end + 2..];
    }
    paths
}

/// Creates `path` in `value` with a null leaf when it is missing.
fn ensure_path(value: &mut serde_json::Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else { return };
    let serde_json::Value::Object(map) = value else { return };
    if rest.is_empty() {
        map.entry(first.clone()).or_insert(serde_json::Value::Null);
        return;
    }
    let child =
        map.entry(first.clone()).or_insert_with(|| serde_json::Value::Object(Default::default()));
    ensure_path(child, rest);
}

/// A writer that accepts at most `limit` bytes.
struct Limited {
    out: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Limited {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + bytes.len() >= self.limit {
            self.out.extend_from_slice(&bytes[..(self.limit - self.out.len()).min(bytes.len())]);
            return Err(std::io::Error::other("output limit reached"));
        }
        self.out.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Says what a Liquid render error means, naming the missing value and what was there
/// instead: `contact.attributes.phone is not set (contact.attributes has name, plan)`.
fn explain(message: &str) -> String {
    let field = |name: &str| {
        message.lines().map(str::trim).find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
    };
    const HINT: &str = "a `default` filter gives a value when it may be missing";
    if let (Some(variable), Some(index)) = (field("variable"), field("requested index")) {
        let path = if index.parse::<u64>().is_ok() {
            format!("{variable}[{index}]")
        } else {
            format!("{variable}.{index}")
        };
        let there = match field("available indexes").filter(|a| !a.is_empty()) {
            Some(available) => {
                let mut names: Vec<&str> = available.split(", ").collect();
                names.sort_unstable();
                format!("{variable} has {}", names.join(", "))
            }
            None => format!("{variable} has nothing"),
        };
        return format!("{path} is not set ({there}); {HINT}");
    }
    if let Some(variable) = field("requested variable") {
        return format!(
            "{variable} is not set (the variables are contact, event, campaign, run and delivery); {HINT}"
        );
    }
    let lines: Vec<&str> = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    match lines.as_slice() {
        [] => "render failed".to_string(),
        [first] => (*first).to_string(),
        [first, rest @ ..] => format!("{first} ({})", rest.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn context() -> Context {
        Context {
            contact: json!({"id": "u1", "attributes": {"name": "Ada", "plan": "pro"}}),
            event: json!({"type": "order.shipped", "data": {"order_id": 42, "items": ["a", "b"]}}),
            ..Default::default()
        }
    }

    #[test]
    fn renders_variables_filters_and_loops() {
        let templates = Templates::new();
        let out = templates
            .render("body", r#"{"to": "{{ contact.attributes.name }}", "order": {{ event.data.order_id }}, "n": {{ event.data.items | size }}}"#, &context(), MAX_BODY)
            .expect("renders");
        assert_eq!(out, r#"{"to": "Ada", "order": 42, "n": 2}"#);
    }

    #[test]
    fn a_missing_variable_is_an_error_unless_defaulted() {
        let templates = Templates::new();
        for (source, says) in [
            (
                "{{ contact.attributes.phone }}",
                "body: contact.attributes.phone is not set (contact.attributes has name, plan)",
            ),
            ("{{ event.data.items[5] }}", "body: event.data.items[5] is not set"),
            ("{{ nothing }}", "body: nothing is not set (the variables are contact,"),
        ] {
            let error = templates.render("body", source, &context(), MAX_BODY).expect_err(source);
            assert!(error.starts_with(says), "{source}: {error}");
        }
        let out = templates
            .render(
                "body",
                "{{ contact.attributes.phone | default: 'none' }}",
                &context(),
                MAX_BODY,
            )
            .expect("defaulted");
        assert_eq!(out, "none");
    }

    #[test]
    fn output_is_bounded() {
        let templates = Templates::new();
        let error = templates
            .render("body", "{% for i in (1..10000) %}xxxxxxxxxx{% endfor %}", &context(), 1000)
            .expect_err("too big");
        assert!(error.contains("limit"), "{error}");
    }

    /// Within every bound on the source, yet 90,000 appends to a 512 KiB string: the render
    /// stops at its time budget instead of holding a worker for seconds.
    #[test]
    fn rendering_stops_at_its_time_budget() {
        let templates = Templates::new();
        let slow = "{% assign s = 'xxxxxxxx' %}{% for i in (1..16) %}{% assign s = s | append: s %}{% endfor %}\
                    {% for i in (1..300) %}{% for j in (1..300) %}{% assign t = s | append: 'x' %}{% endfor %}{% endfor %}{{ t | size }}";
        assert!(crate::template::limits::check(slow).is_ok());
        let error = templates.render("body", slow, &context(), MAX_BODY).expect_err("too slow");
        assert_eq!(error, "body: took longer than 1000 ms to render, the limit");
        let fine = templates.render("body", "{{ 1 | plus: 1 }}", &context(), MAX_BODY);
        assert_eq!(fine.as_deref(), Ok("2"), "the next render has a budget of its own");
    }
}
