//! API messages as JSON and YAML, in the protobuf JSON mapping with the `.proto` field names:
//! what `--output json` prints and what `create -f` and `update -f` read.

use std::path::Path;
use std::sync::LazyLock;

use anyhow::Context;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};

use super::remote::Usage;

static POOL: LazyLock<Result<DescriptorPool, String>> = LazyLock::new(|| {
    DescriptorPool::decode(tidings_api::FILE_DESCRIPTOR_SET).map_err(|error| error.to_string())
});

/// A message of the API, known by its full protobuf name.
pub(crate) trait Named: prost::Message + Default {
    /// The full name, for example `tidings.v1.Webhook`.
    const NAME: &'static str;
}

macro_rules! named {
    ($($ty:ident),* $(,)?) => {
        $(impl Named for tidings_client::v1::$ty {
            const NAME: &'static str = concat!("tidings.v1.", stringify!($ty));
        })*
    };
}

named!(Webhook, Segment, Campaign, Contact, Run, Delivery, Node, Partition, SendTestResponse);

fn descriptor(name: &str) -> anyhow::Result<MessageDescriptor> {
    let pool = POOL.as_ref().map_err(|error| anyhow::anyhow!("API descriptors: {error}"))?;
    pool.get_message_by_name(name).with_context(|| format!("API descriptors: no message {name}"))
}

/// Returns a message as JSON, leaving out fields at their defaults.
pub(crate) fn to_json<M: Named>(message: &M) -> anyhow::Result<serde_json::Value> {
    let dynamic = DynamicMessage::decode(descriptor(M::NAME)?, message.encode_to_vec().as_slice())
        .context("cannot re-encode a message")?;
    let options = SerializeOptions::new().use_proto_field_name(true);
    let mut json = dynamic.serialize_with_options(serde_json::value::Serializer, &options)?;
    whole_numbers(&mut json);
    Ok(json)
}

/// Prints whole numbers without a fraction: `Struct` values are doubles, and `"n": 3` reads
/// better than `"n": 3.0` (the two are the same JSON number).
fn whole_numbers(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(n) => {
            if let Some(x) = n.as_f64()
                && n.is_f64()
                && x.fract() == 0.0
                && x.abs() < 9.0e15
            {
                *value = serde_json::Value::from(x as i64);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(whole_numbers),
        serde_json::Value::Object(map) => map.values_mut().for_each(whole_numbers),
        _ => {}
    }
}

/// Returns many messages as a JSON array.
pub(crate) fn to_json_list<'a, M: Named + 'a>(
    messages: impl IntoIterator<Item = &'a M>,
) -> anyhow::Result<serde_json::Value> {
    messages.into_iter().map(to_json).collect::<anyhow::Result<Vec<_>>>().map(Into::into)
}

/// Reads a message from a YAML or JSON file (`-` for stdin), and returns it with the `.proto`
/// names of the fields the file sets, for an update mask.
pub(crate) fn from_file<M: Named>(path: &Path) -> anyhow::Result<(M, Vec<String>)> {
    let shown = origin(path);
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("cannot read stdin")?
    } else {
        std::fs::read_to_string(path)
            .map_err(|error| Usage(format!("{shown}: cannot read: {error}")))?
    };
    parse(&text, &shown)
}

/// Returns how errors name a file: its path, or `stdin` for `-`.
pub(crate) fn origin(path: &Path) -> String {
    if path == Path::new("-") { "stdin".into() } else { path.display().to_string() }
}

/// Parses a message from YAML or JSON text (JSON is YAML, so both parse as YAML); `origin`
/// names where it came from in errors.
pub(crate) fn parse<M: Named>(text: &str, origin: &str) -> anyhow::Result<(M, Vec<String>)> {
    let value: serde_json::Value = serde_yaml::from_str(text)
        .map_err(|error| Usage(format!("{origin}: not YAML or JSON: {error}")))?;
    let serde_json::Value::Object(fields) = &value else {
        return Err(Usage(format!("{origin}: must hold an object of fields")).into());
    };
    let descriptor = descriptor(M::NAME)?;
    let mut set = Vec::with_capacity(fields.len());
    for key in fields.keys() {
        let field = descriptor
            .get_field_by_name(key)
            .or_else(|| descriptor.get_field_by_json_name(key))
            .ok_or_else(|| {
                let known: Vec<String> =
                    descriptor.fields().map(|f| f.name().to_string()).collect();
                Usage(format!("{origin}: {key}: no such field; known fields: {}", known.join(", ")))
            })?;
        set.push(field.name().to_string());
    }
    let dynamic = DynamicMessage::deserialize(descriptor, value)
        .map_err(|error| Usage(format!("{origin}: {error}")))?;
    let message = dynamic.transcode_to::<M>().context("cannot re-encode a message")?;
    Ok((message, set))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings_client::v1::{Campaign, Webhook};

    #[test]
    fn yaml_files_read_into_messages_and_back() {
        let yaml = "url: https://example.com/{{ contact.id }}\nmethod: HTTP_METHOD_PUT\ntimeout: 2.5s\nheaders:\n  - name: X-Team\n    value: growth\n";
        let (webhook, fields) = parse::<Webhook>(yaml, "hook.yaml").expect("parses");
        assert_eq!(webhook.method(), tidings_client::v1::HttpMethod::Put);
        assert_eq!(webhook.timeout.map(|t| (t.seconds, t.nanos)), Some((2, 500_000_000)));
        assert_eq!(fields, ["headers", "method", "timeout", "url"]);
        let json = to_json(&webhook).expect("json");
        assert_eq!(json["headers"][0]["name"], "X-Team");
        assert_eq!(json["timeout"], "2.500s");
    }

    #[test]
    fn mistakes_name_the_file_and_the_field() {
        let error = parse::<Webhook>("urll: x", "hook.yaml").expect_err("unknown field");
        assert!(error.to_string().starts_with("hook.yaml: urll: no such field"), "{error}");
        let error = parse::<Campaign>("trigger: {every: soon}", "c.yaml").expect_err("bad");
        assert!(error.to_string().starts_with("c.yaml: "), "{error}");
        let error = parse::<Campaign>("[1, 2]", "c.yaml").expect_err("a list");
        assert!(error.to_string().contains("must hold an object"), "{error}");
    }
}
