//! Conversions of well-known protobuf types shared by every service.

use prost_types::{Duration, Timestamp};

use super::Violations;

/// Returns a timestamp for Unix milliseconds.
pub(crate) fn timestamp(ms: i64) -> Timestamp {
    Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

/// Returns a duration for milliseconds.
pub(crate) fn duration(ms: u64) -> Duration {
    Duration { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

/// Returns the milliseconds of a duration within `[min_ms, max_ms]`, or records why not.
pub(crate) fn duration_ms(
    violations: &mut Violations,
    field: &str,
    value: &Duration,
    min_ms: u64,
    max_ms: u64,
) -> Option<u64> {
    if value.seconds < 0 || value.nanos < 0 || value.nanos >= 1_000_000_000 {
        violations.add(field, "must be a non-negative duration");
        return None;
    }
    let ms = (value.seconds as u64).saturating_mul(1000) + (value.nanos as u64) / 1_000_000;
    if ms < min_ms || ms > max_ms {
        violations.add(field, format!("must be between {} and {}", human(min_ms), human(max_ms)));
        return None;
    }
    Some(ms)
}

fn human(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
}

/// Returns a protobuf struct as a JSON object.
pub(crate) fn struct_to_json(
    value: &prost_types::Struct,
) -> serde_json::Map<String, serde_json::Value> {
    value.fields.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect()
}

/// Returns a protobuf value as JSON.
pub(crate) fn value_to_json(value: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
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

/// Returns the Unix milliseconds of a timestamp, or records why not.
pub(crate) fn timestamp_ms(
    violations: &mut Violations,
    field: &str,
    value: &Timestamp,
) -> Option<i64> {
    if value.nanos < 0
        || value.nanos >= 1_000_000_000
        || value.seconds < 0
        || value.seconds > 253_402_300_799
    {
        violations.add(field, "must be a valid time between 1970 and 9999");
        return None;
    }
    Some(value.seconds * 1000 + i64::from(value.nanos) / 1_000_000)
}

/// Returns a JSON object as a protobuf struct.
pub(crate) fn json_to_struct<'a>(
    map: impl IntoIterator<Item = (&'a String, &'a serde_json::Value)>,
) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k.clone(), json_to_value(v))).collect(),
    }
}

/// Returns JSON as a protobuf value.
pub(crate) fn json_to_value(value: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip_and_bounds_are_named() {
        let mut violations = Violations::default();
        assert_eq!(duration_ms(&mut violations, "t", &duration(1500), 0, 2000), Some(1500));
        assert_eq!(duration_ms(&mut violations, "t", &duration(3000), 0, 2000), None);
        assert!(!violations.is_empty());
        assert_eq!(timestamp(-1).seconds, -1);
        assert_eq!(timestamp(1500).nanos, 500_000_000);
    }
}
