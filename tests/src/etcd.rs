//! A real etcd process on free ports with a temporary data directory, killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use tempfile::TempDir;
use tidings_scheduler::store::{EtcdOptions, EtcdStore, EtcdTls};

use crate::{free_port, unique_prefix, wait_until};

/// One etcd member for one test.
pub struct Etcd {
    child: Option<Child>,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    tls: Option<EtcdTlsFiles>,
    user: Option<(String, String)>,
}

/// The certificates of an etcd started with [`Etcd::start_tls`].
#[derive(Clone, Debug)]
pub struct EtcdTlsFiles {
    /// The CA both etcd's and the client's certificates chain to.
    pub ca: PathBuf,
    /// A client certificate and key etcd accepts.
    pub client_cert: PathBuf,
    /// Key of `client_cert`.
    pub client_key: PathBuf,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").field("endpoint", &self.endpoint()).finish()
    }
}

fn etcd_binary() -> PathBuf {
    std::env::var_os("ETCD_BIN").map_or_else(|| PathBuf::from("etcd"), PathBuf::from)
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        Self::launch(|_| Ok(())).await
    }

    /// Starts etcd serving clients over TLS only, requiring a client certificate from its CA.
    pub async fn start_tls() -> anyhow::Result<Self> {
        Self::launch(|etcd| {
            let ca = crate::certs::Authority::new("etcd test CA")?;
            let dir = etcd.dir.path().to_path_buf();
            let (cert, key) = ca.issue(&["localhost", "127.0.0.1"])?;
            crate::certs::write(&dir, "server.pem", &cert)?;
            crate::certs::write(&dir, "server.key", &key)?;
            let (client_cert, client_key) = ca.issue(&["tidings"])?;
            etcd.tls = Some(EtcdTlsFiles {
                ca: crate::certs::write(&dir, "ca.pem", &ca.pem)?,
                client_cert: crate::certs::write(&dir, "client.pem", &client_cert)?,
                client_key: crate::certs::write(&dir, "client.key", &client_key)?,
            });
            Ok(())
        })
        .await
    }

    /// Starts etcd on free ports, prepared by `prepare`, and waits until it answers. A port
    /// can be taken by another process between being found free and etcd binding it, and etcd
    /// then exits: it is started again on other ports, up to three times.
    async fn launch(prepare: impl Fn(&mut Self) -> anyhow::Result<()>) -> anyhow::Result<Self> {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut etcd = Self::new()?;
            prepare(&mut etcd)?;
            etcd.spawn()?;
            match etcd.ready_or_exited().await {
                Ok(()) => return Ok(etcd),
                Err(error) if tries < 3 => {
                    eprintln!("etcd did not start ({error:#}); trying other ports");
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Waits until etcd answers, or fails at once when its process has exited.
    async fn ready_or_exited(&mut self) -> anyhow::Result<()> {
        let endpoint = self.endpoint();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if self.connect_at(&endpoint, "/ready/").await.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log =
                    std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                anyhow::bail!("etcd exited with {status}: {}", tail.join(" | "));
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("timed out after 20s waiting for etcd to answer");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            child: None,
            dir: tempfile::Builder::new().prefix("tidings-etcd-").tempdir()?,
            client_port: free_port()?,
            peer_port: free_port()?,
            tls: None,
            user: None,
        })
    }

    /// Returns the client URL.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Returns the certificates of a TLS etcd.
    pub fn tls(&self) -> Option<&EtcdTlsFiles> {
        self.tls.as_ref()
    }

    /// Returns the environment a node needs to reach this etcd: its TLS files and user.
    pub fn node_env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(tls) = &self.tls {
            let path = |p: &PathBuf| p.display().to_string();
            env.push(("TIDINGS_ETCD__TLS__CA_FILE".into(), path(&tls.ca)));
            env.push(("TIDINGS_ETCD__TLS__CERT_FILE".into(), path(&tls.client_cert)));
            env.push(("TIDINGS_ETCD__TLS__KEY_FILE".into(), path(&tls.client_key)));
        }
        if let Some((name, password)) = &self.user {
            env.push(("TIDINGS_ETCD__USERNAME".into(), name.clone()));
            env.push(("TIDINGS_ETCD__PASSWORD".into(), password.clone()));
        }
        env
    }

    /// Turns on etcd's authentication with a root user `name`; clients of this harness use it
    /// from then on.
    pub async fn enable_auth(&mut self, name: &str, password: &str) -> anyhow::Result<()> {
        let mut client = etcd_client::Client::connect([self.endpoint()], self.client_options()?)
            .await
            .context("connecting to etcd")?;
        let _ = client.role_add("root").await;
        client.user_add(name, password, None).await.context("adding the user")?;
        client.user_grant_role(name, "root").await.context("granting root")?;
        client.auth_enable().await.context("enabling auth")?;
        self.user = Some((name.to_string(), password.to_string()));
        Ok(())
    }

    fn client_options(&self) -> anyhow::Result<Option<etcd_client::ConnectOptions>> {
        let mut options = etcd_client::ConnectOptions::new();
        if let Some(tls) = &self.tls {
            options = options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(&tls.ca)?))
                    .identity(etcd_client::Identity::from_pem(
                        std::fs::read(&tls.client_cert)?,
                        std::fs::read(&tls.client_key)?,
                    )),
            );
        }
        if let Some((name, password)) = &self.user {
            options = options.with_user(name, password);
        }
        Ok(Some(options))
    }

    /// Returns the size of etcd's database file, what its space quota counts.
    pub fn db_size(&self) -> u64 {
        let db = self.dir.path().join("data").join("member").join("snap").join("db");
        std::fs::metadata(db).map_or(0, |m| m.len())
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))?;
        let child = Command::new(etcd_binary())
            .args(["--name", "test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.endpoint()])
            .args(["--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--log-level", "warn", "--logger", "zap"])
            .args(self.tls.iter().flat_map(|_| {
                let dir = self.dir.path();
                [
                    format!("--cert-file={}", dir.join("server.pem").display()),
                    format!("--key-file={}", dir.join("server.key").display()),
                    format!("--trusted-ca-file={}", dir.join("ca.pem").display()),
                    "--client-cert-auth".to_string(),
                ]
            }))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start etcd: install it with scripts/test or `apt-get install etcd-server`, or set ETCD_BIN")?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until etcd serves requests.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let endpoint = self.endpoint();
        wait_until("etcd to answer", Duration::from_secs(20), || {
            let endpoint = endpoint.clone();
            async move { self.connect_at(&endpoint, "/ready/").await.ok().map(|_| ()) }
        })
        .await
    }

    async fn connect_at(&self, endpoint: &str, prefix: &str) -> anyhow::Result<EtcdStore> {
        let options = EtcdOptions {
            endpoints: vec![endpoint.to_string()],
            prefix: prefix.to_string(),
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            tls: EtcdTls {
                ca_file: self.tls.as_ref().map(|t| t.ca.clone()),
                identity: self.tls.as_ref().map(|t| (t.client_cert.clone(), t.client_key.clone())),
            },
            user: self.user.clone(),
        };
        Ok(EtcdStore::connect(options).await?)
    }

    /// Returns a store on this etcd under a fresh key prefix.
    pub async fn store(&self) -> anyhow::Result<EtcdStore> {
        self.connect_at(&self.endpoint(), &unique_prefix()).await
    }

    /// Returns a store on this etcd under the given prefix.
    pub async fn store_at(&self, prefix: &str) -> anyhow::Result<EtcdStore> {
        self.connect_at(&self.endpoint(), prefix).await
    }

    /// Kills etcd with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd and starts it again on the same ports and data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready().await
    }

    /// Compacts the history up to `revision`.
    pub async fn compact(&self, revision: i64) -> anyhow::Result<()> {
        let mut client =
            etcd_client::Client::connect([self.endpoint()], self.client_options()?).await?;
        client.compact(revision, None).await?;
        Ok(())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
