//! Verifying the webhooks Tidings sends, for receivers: the Standard Webhooks scheme
//! (`webhook-id`, `webhook-timestamp` and `webhook-signature` headers, HMAC-SHA256 over
//! `{id}.{timestamp}.{body}` with a `whsec_` secret).
//!
//! ```
//! use tidings_client::webhook::Verifier;
//!
//! let verifier = Verifier::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")?;
//! let body = br#"{"test": 2432232314}"#;
//! verifier.verify_at(
//!     "msg_p5jXN8AQM9LWM0D4loKWxJek",
//!     "1614265330",
//!     "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
//!     body,
//!     1614265330,
//! )?;
//! # Ok::<(), tidings_client::webhook::VerifyError>(())
//! ```
//!
//! With an HTTP framework, pass the request's headers and its raw body to
//! [`Verifier::verify`], before parsing the body.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far a webhook's timestamp may be from the receiver's clock by default: five minutes,
/// as the Standard Webhooks specification recommends.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// Why a webhook did not verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyError {
    /// A secret is not `whsec_` followed by base64.
    InvalidSecret(String),
    /// A header is missing or not text.
    MissingHeader(&'static str),
    /// `webhook-timestamp` is not a number of seconds.
    InvalidTimestamp(String),
    /// The timestamp is further from now than the tolerance (a replay, or a skewed clock).
    TimestampOutOfTolerance {
        /// The webhook's timestamp, seconds since the epoch.
        timestamp: i64,
        /// The receiver's clock, seconds since the epoch.
        now: i64,
    },
    /// No `v1` signature in `webhook-signature` matches any secret.
    NoMatchingSignature,
}

impl std::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VerifyError::InvalidSecret(reason) => write!(f, "secret: {reason}"),
            VerifyError::MissingHeader(name) => write!(f, "{name}: missing"),
            VerifyError::InvalidTimestamp(value) => {
                write!(f, "webhook-timestamp: {value:?} is not a number of seconds")
            }
            VerifyError::TimestampOutOfTolerance { timestamp, now } => write!(
                f,
                "webhook-timestamp: {timestamp} is {} s from now, beyond the tolerance",
                (now - timestamp).abs()
            ),
            VerifyError::NoMatchingSignature => {
                write!(f, "webhook-signature: no signature matches the secret")
            }
        }
    }
}

impl std::error::Error for VerifyError {}

/// Checks webhook signatures with one or more secrets (several during a rotation).
#[derive(Clone)]
pub struct Verifier {
    keys: Vec<Vec<u8>>,
    tolerance: Duration,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("secrets", &self.keys.len())
            .field("tolerance", &self.tolerance)
            .finish()
    }
}

impl Verifier {
    /// Returns a verifier for one `whsec_…` secret.
    pub fn new(secret: &str) -> Result<Self, VerifyError> {
        Self::with_secrets([secret])
    }

    /// Returns a verifier that accepts a signature by any of `secrets` (the current and the
    /// previous one while a secret is rotated).
    pub fn with_secrets<S: AsRef<str>>(
        secrets: impl IntoIterator<Item = S>,
    ) -> Result<Self, VerifyError> {
        let keys = secrets
            .into_iter()
            .map(|secret| {
                let secret = secret.as_ref();
                let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
                match STANDARD.decode(encoded) {
                    Ok(key) if !key.is_empty() => Ok(key),
                    Ok(_) => Err(VerifyError::InvalidSecret("is empty".into())),
                    Err(error) => Err(VerifyError::InvalidSecret(format!("not base64: {error}"))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(VerifyError::InvalidSecret("none given".into()));
        }
        Ok(Self { keys, tolerance: DEFAULT_TOLERANCE })
    }

    /// Sets how far a timestamp may be from the receiver's clock.
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Verifies a request from its headers and raw body, against the current time.
    pub fn verify(&self, headers: &http::HeaderMap, body: &[u8]) -> Result<(), VerifyError> {
        let header = |name: &'static str| {
            headers.get(name).and_then(|v| v.to_str().ok()).ok_or(VerifyError::MissingHeader(name))
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        self.verify_at(
            header("webhook-id")?,
            header("webhook-timestamp")?,
            header("webhook-signature")?,
            body,
            now,
        )
    }

    /// Verifies the three header values and the raw body, with `now` as the receiver's clock
    /// (seconds since the epoch).
    pub fn verify_at(
        &self,
        id: &str,
        timestamp: &str,
        signatures: &str,
        body: &[u8],
        now: i64,
    ) -> Result<(), VerifyError> {
        let seconds: i64 = timestamp
            .trim()
            .parse()
            .map_err(|_| VerifyError::InvalidTimestamp(timestamp.to_string()))?;
        if (now - seconds).unsigned_abs() > self.tolerance.as_secs() {
            return Err(VerifyError::TimestampOutOfTolerance { timestamp: seconds, now });
        }
        let candidates: Vec<Vec<u8>> = signatures
            .split_whitespace()
            .filter_map(|entry| entry.strip_prefix("v1,"))
            .filter_map(|encoded| STANDARD.decode(encoded).ok())
            .collect();
        for key in &self.keys {
            for candidate in &candidates {
                let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else { continue };
                mac.update(id.as_bytes());
                mac.update(b".");
                mac.update(timestamp.trim().as_bytes());
                mac.update(b".");
                mac.update(body);
                // Constant time: the comparison does not tell how much of a guess was right.
                if mac.verify_slice(candidate).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(VerifyError::NoMatchingSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn verifier() -> Verifier {
        Verifier::new(SECRET).expect("secret")
    }

    #[test]
    fn the_specifications_example_verifies() {
        assert_eq!(verifier().verify_at(ID, "1614265330", SIGNATURE, BODY, TIMESTAMP), Ok(()));
    }

    #[test]
    fn any_of_several_signatures_and_secrets_will_do() {
        let several = format!("v1,Zm9vYmFy v2,whatever {SIGNATURE}");
        assert_eq!(verifier().verify_at(ID, "1614265330", &several, BODY, TIMESTAMP), Ok(()));
        let rotated =
            Verifier::with_secrets(["whsec_dGVzdC1zZWNyZXQtMjQtYnl0ZXMtbG9uZyEh", SECRET])
                .expect("secrets");
        assert_eq!(rotated.verify_at(ID, "1614265330", SIGNATURE, BODY, TIMESTAMP), Ok(()));
    }

    #[test]
    fn a_changed_body_id_or_timestamp_fails() {
        let v = verifier();
        let fails = Err(VerifyError::NoMatchingSignature);
        assert_eq!(v.verify_at(ID, "1614265330", SIGNATURE, br#"{"test": 1}"#, TIMESTAMP), fails);
        assert_eq!(v.verify_at("msg_other", "1614265330", SIGNATURE, BODY, TIMESTAMP), fails);
        assert_eq!(v.verify_at(ID, "1614265331", SIGNATURE, BODY, TIMESTAMP), fails);
        assert_eq!(
            v.verify_at(ID, "1614265330", "v1,bm90IGEgc2lnbmF0dXJl", BODY, TIMESTAMP),
            fails
        );
        assert_eq!(v.verify_at(ID, "1614265330", "", BODY, TIMESTAMP), fails);
        let other = Verifier::new("whsec_dGVzdC1zZWNyZXQtMjQtYnl0ZXMtbG9uZyEh").expect("secret");
        assert_eq!(other.verify_at(ID, "1614265330", SIGNATURE, BODY, TIMESTAMP), fails);
    }

    #[test]
    fn old_and_future_timestamps_are_refused() {
        let v = verifier();
        let late = TIMESTAMP + 5 * 60 + 1;
        assert_eq!(
            v.verify_at(ID, "1614265330", SIGNATURE, BODY, late),
            Err(VerifyError::TimestampOutOfTolerance { timestamp: TIMESTAMP, now: late })
        );
        let early = TIMESTAMP - 5 * 60 - 1;
        assert!(v.verify_at(ID, "1614265330", SIGNATURE, BODY, early).is_err());
        assert_eq!(v.verify_at(ID, "1614265330", SIGNATURE, BODY, TIMESTAMP + 300), Ok(()));
        let strict = verifier().tolerance(Duration::from_secs(10));
        assert!(strict.verify_at(ID, "1614265330", SIGNATURE, BODY, TIMESTAMP + 11).is_err());
        assert_eq!(
            v.verify_at(ID, "yesterday", SIGNATURE, BODY, TIMESTAMP),
            Err(VerifyError::InvalidTimestamp("yesterday".into()))
        );
    }

    #[test]
    fn headers_are_read_and_missing_ones_named() {
        let mut headers = http::HeaderMap::new();
        headers.insert("webhook-id", ID.parse().expect("value"));
        assert_eq!(
            verifier().verify(&headers, BODY),
            Err(VerifyError::MissingHeader("webhook-timestamp"))
        );
        assert_eq!(
            VerifyError::MissingHeader("webhook-timestamp").to_string(),
            "webhook-timestamp: missing"
        );
    }

    #[test]
    fn secrets_that_are_not_base64_are_refused() {
        assert!(matches!(Verifier::new("whsec_!!!"), Err(VerifyError::InvalidSecret(_))));
        assert!(matches!(Verifier::new("whsec_"), Err(VerifyError::InvalidSecret(_))));
        assert!(Verifier::with_secrets(Vec::<&str>::new()).is_err());
    }

    #[test]
    fn agrees_with_the_standardwebhooks_crate() {
        let reference = standardwebhooks::Webhook::new(SECRET).expect("secret");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() as i64;
        // The reference signs text only.
        for body in [&b""[..], BODY, "ünïcödé \u{1F600}\r\n".as_bytes()] {
            let signature = reference.sign(ID, now, body).expect("sign");
            let mut headers = http::HeaderMap::new();
            headers.insert("webhook-id", ID.parse().expect("value"));
            headers.insert("webhook-timestamp", now.to_string().parse().expect("value"));
            headers.insert("webhook-signature", signature.parse().expect("value"));
            assert_eq!(verifier().verify(&headers, body), Ok(()));
            assert!(reference.verify(body, &headers).is_ok());
        }
    }
}
