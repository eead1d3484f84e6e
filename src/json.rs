//! Conversions between JSON and the protobuf `Struct` and `Value` well-known types.

use prost_types::value::Kind;

/// Returns a protobuf struct as a JSON object.
pub fn struct_to_json(value: &prost_types::Struct) -> serde_json::Map<String, serde_json::Value> {
    value.fields.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect()
}

/// Returns a protobuf value as JSON.
pub fn value_to_json(value: &prost_types::Value) -> serde_json::Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            // Whole numbers stay integers, so templates print `42`, not `42.0`.
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                serde_json::Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n)
                    .map_or(serde_json::Value::Null, serde_json::Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => serde_json::Value::Object(struct_to_json(s)),
    }
}

/// Returns a JSON object as a protobuf struct.
pub fn json_to_struct<'a>(
    map: impl IntoIterator<Item = (&'a String, &'a serde_json::Value)>,
) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k.clone(), json_to_value(v))).collect(),
    }
}

/// Returns JSON as a protobuf value.
pub fn json_to_value(value: &serde_json::Value) -> prost_types::Value {
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(json_to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Returns JSON as the data of a message: an object as it is; any other value, which a
/// `Struct` cannot hold at its top, under the key `value`.
pub fn data(value: &serde_json::Value) -> prost_types::Struct {
    match value {
        serde_json::Value::Object(map) => json_to_struct(map),
        other => json_to_struct([(&"value".to_string(), other)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_through_struct() {
        let value = serde_json::json!({"a": 1, "b": [true, null, "x"], "c": {"d": 1.5}});
        let map = value.as_object().cloned().unwrap_or_default();
        assert_eq!(serde_json::Value::Object(struct_to_json(&json_to_struct(&map))), value);
    }

    #[test]
    fn data_keeps_a_value_that_is_not_an_object() {
        let data = data(&serde_json::json!([1, 2]));
        assert_eq!(
            serde_json::Value::Object(struct_to_json(&data)),
            serde_json::json!({"value": [1, 2]})
        );
    }
}
