//! Encryption of secrets at rest (credential headers, signing secrets).
//!
//! A [`Sealed`] value is XChaCha20-Poly1305 ciphertext under the node's 32-byte key, with a
//! random nonce, as `v1:` + base64. Only [`Cipher::open`] turns it back into clear text, at the
//! moment a request is signed or sent. Neither type prints its content: `Debug` shows a
//! placeholder, so a secret cannot reach a log line by accident.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Length of a secrets key in bytes.
pub const KEY_LEN: usize = 32;

const VERSION: &str = "v1:";
const NONCE_LEN: usize = 24;

/// Failures of sealing and opening.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The key is not base64 of exactly 32 bytes.
    #[error("secrets key must be the base64 encoding of {KEY_LEN} bytes")]
    BadKey,
    /// The ciphertext was damaged, or sealed under another key.
    #[error(
        "a stored secret could not be decrypted: it was written with another secrets key or is corrupt"
    )]
    Undecryptable,
}

/// A secret in clear text, held only while it is used. Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a clear-text secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Returns the clear text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// An encrypted secret as stored.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sealed(String);

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealed([encrypted])")
    }
}

/// Seals and opens secrets with the node's key.
#[derive(Clone)]
pub struct Cipher {
    aead: XChaCha20Poly1305,
    /// A key for [`Cipher::derive`], itself derived, so that the encryption key is kept once.
    derivation: [u8; 32],
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher([key redacted])")
    }
}

impl Cipher {
    /// Returns a cipher for a key given as base64 of 32 bytes.
    pub fn from_base64(key: &str) -> Result<Self, SecretError> {
        let bytes = STANDARD.decode(key.trim()).map_err(|_| SecretError::BadKey)?;
        Self::from_bytes(&bytes)
    }

    /// Returns a cipher for a raw 32-byte key.
    pub fn from_bytes(key: &[u8]) -> Result<Self, SecretError> {
        if key.len() != KEY_LEN {
            return Err(SecretError::BadKey);
        }
        let aead = XChaCha20Poly1305::new_from_slice(key).map_err(|_| SecretError::BadKey)?;
        let derivation = Self::mac(key, b"tidings key derivation");
        Ok(Self { aead, derivation })
    }

    /// Returns a key for `purpose` (for example the console's CSRF values), the same on every
    /// node that has the same secrets key, and revealing nothing about it.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        Self::mac(&self.derivation, purpose.as_bytes())
    }

    fn mac(key: &[u8], message: &[u8]) -> [u8; 32] {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(message);
        mac.finalize().into_bytes().into()
    }

    /// Returns a new random key as base64, for configuration files.
    pub fn generate_key() -> String {
        let mut key = [0u8; KEY_LEN];
        rand::rng().fill_bytes(&mut key);
        STANDARD.encode(key)
    }

    /// Encrypts a secret.
    pub fn seal(&self, secret: &Secret) -> Sealed {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        // Encryption with a valid key and a fresh nonce cannot fail for inputs this small.
        let ciphertext = self
            .aead
            .encrypt(XNonce::from_slice(&nonce), secret.expose().as_bytes())
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ciphertext);
        Sealed(format!("{VERSION}{}", STANDARD.encode(out)))
    }

    /// Decrypts a secret.
    pub fn open(&self, sealed: &Sealed) -> Result<Secret, SecretError> {
        let encoded = sealed.0.strip_prefix(VERSION).ok_or(SecretError::Undecryptable)?;
        let bytes = STANDARD.decode(encoded).map_err(|_| SecretError::Undecryptable)?;
        if bytes.len() < NONCE_LEN {
            return Err(SecretError::Undecryptable);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let clear = self
            .aead
            .decrypt(XNonce::from_slice(nonce), ciphertext)
            .map_err(|_| SecretError::Undecryptable)?;
        String::from_utf8(clear).map(Secret).map_err(|_| SecretError::Undecryptable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_follow_the_key_and_the_purpose() {
        let key = Cipher::generate_key();
        let (a, b) =
            (Cipher::from_base64(&key).expect("key"), Cipher::from_base64(&key).expect("key"));
        assert_eq!(a.derive("console csrf"), b.derive("console csrf"));
        assert_ne!(a.derive("console csrf"), a.derive("other"));
        let other = Cipher::from_base64(&Cipher::generate_key()).expect("key");
        assert_ne!(a.derive("console csrf"), other.derive("console csrf"));
    }

    #[test]
    fn sealed_secrets_open_with_the_same_key_only() {
        let cipher = Cipher::from_base64(&Cipher::generate_key()).expect("key");
        let sealed = cipher.seal(&Secret::new("hunter2"));
        assert!(!format!("{sealed:?}").contains("hunter2"));
        assert!(!sealed.0.contains("hunter2"));
        assert_eq!(cipher.open(&sealed).expect("open").expose(), "hunter2");
        let other = Cipher::from_base64(&Cipher::generate_key()).expect("key");
        assert!(other.open(&sealed).is_err());
    }

    #[test]
    fn keys_of_the_wrong_length_are_refused() {
        assert!(Cipher::from_base64("c2hvcnQ=").is_err());
        assert!(Cipher::from_base64("not base64!").is_err());
    }
}
