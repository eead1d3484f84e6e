//! Certificates for tests: a CA that issues leaf certificates, all PEM, written to files.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A certificate authority that signs certificates for a test.
pub struct Authority {
    params: CertificateParams,
    key: KeyPair,
    /// The CA certificate, PEM.
    pub pem: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

impl Authority {
    /// Creates a CA named `name`.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.clone().self_signed(&key)?;
        Ok(Self { pem: cert.pem(), params, key })
    }

    /// Returns a certificate for `names` (DNS names or IP addresses; the first is also the
    /// common name) and its key, both PEM.
    pub fn issue(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let issuer = self.params.clone().self_signed(&self.key)?;
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        let cert = params.signed_by(&key, &issuer, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Writes `contents` to `dir/name` through a rename, so a reader never sees half a file.
pub fn write(dir: &Path, name: &str, contents: &str) -> std::io::Result<PathBuf> {
    let path = dir.join(name);
    let partial = dir.join(format!("{name}.partial"));
    std::fs::write(&partial, contents)?;
    std::fs::rename(&partial, &path)?;
    Ok(path)
}
