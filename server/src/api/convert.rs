//! Conversions of well-known protobuf types shared by every service.

use prost_types::{Duration, Timestamp};

use super::Violations;

pub(crate) use tidings_api::json::{json_to_struct, struct_to_json};

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
