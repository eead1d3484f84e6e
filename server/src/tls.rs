//! TLS for the gRPC listener: a certificate and key, optionally a CA that client certificates
//! must chain to (mutual TLS), all reloaded when their files change.
//!
//! The files are checked every [`RELOAD_EVERY`]; a change that does not load (a half-written
//! file, a key that does not match) keeps the configuration in use and logs why. Connections
//! finish their handshake on their own task, so a slow client holds up nobody else.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use futures::Stream;
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often the certificate files are checked for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Longest a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files of the listener's TLS configuration.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificates client certificates must chain to; `None` for no client
    /// certificates.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut paths = vec![self.cert.as_path(), self.key.as_path()];
        paths.extend(self.client_ca.as_deref());
        paths
    }

    /// The files' modification times and sizes, to notice a change.
    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.paths()
            .into_iter()
            .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
            .collect()
    }
}

fn certificates(path: &Path, field: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(path).with_context(|| format!("{field}: cannot read {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{field}: {} is not PEM", path.display()))?;
    if certs.is_empty() {
        bail!("{field}: {} holds no certificate", path.display());
    }
    Ok(certs)
}

fn private_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let field = "grpc.tls.key_file";
    let pem =
        std::fs::read(path).with_context(|| format!("{field}: cannot read {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("{field}: {} is not PEM", path.display()))?
        .with_context(|| format!("{field}: {} holds no private key", path.display()))
}

/// Builds the server configuration from the files.
pub fn load(files: &TlsFiles) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("grpc.tls: no TLS version available")?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(ca, "grpc.tls.client_ca_file")? {
                roots.add(cert).with_context(|| {
                    format!("grpc.tls.client_ca_file: {} holds an invalid CA", ca.display())
                })?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .context("grpc.tls.client_ca_file")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(
            certificates(&files.cert, "grpc.tls.cert_file")?,
            private_key(&files.key)?,
        )
        .context("grpc.tls.key_file: does not match grpc.tls.cert_file")?;
    // HTTP/1.1 for browsers opening the console on this port.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts TCP connections on `listener` and yields them once their TLS handshake is done,
/// until `stop` is cancelled. The configuration follows the files.
pub fn incoming(
    listener: TcpListener,
    files: TlsFiles,
    initial: Arc<ServerConfig>,
    stop: CancellationToken,
) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> {
    let current = Arc::new(RwLock::new(initial));
    tokio::spawn(reload(files, current.clone(), stop.clone()));
    let (ready, streams) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let config = current.read().unwrap_or_else(|p| p.into_inner()).clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = ready.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => debug!(%peer, %error, "TLS handshake refused"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(streams)
}

async fn reload(files: TlsFiles, current: Arc<RwLock<Arc<ServerConfig>>>, stop: CancellationToken) {
    let mut stamp = files.stamp();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RELOAD_EVERY) => {}
        }
        let now = files.stamp();
        if now == stamp {
            continue;
        }
        match load(&files) {
            Ok(config) => {
                *current.write().unwrap_or_else(|p| p.into_inner()) = config;
                stamp = now;
                info!(cert = %files.cert.display(), "TLS certificates reloaded");
            }
            // Tried again at the next change; a file being written is retried once it is whole.
            Err(error) => {
                warn!(error = %format!("{error:#}"), "TLS certificates changed but do not load; keeping the ones in use");
                stamp = now;
            }
        }
    }
}
