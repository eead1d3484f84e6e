//! A real etcd process on free ports with a temporary data directory, killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use tempfile::TempDir;
use tidings_scheduler::store::{EtcdOptions, EtcdStore};

use crate::{free_port, unique_prefix, wait_until};

/// One etcd member for one test.
pub struct Etcd {
    child: Option<Child>,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
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
        let mut etcd = Self {
            child: None,
            dir: tempfile::Builder::new().prefix("tidings-etcd-").tempdir()?,
            client_port: free_port()?,
            peer_port: free_port()?,
        };
        etcd.spawn()?;
        etcd.wait_ready().await?;
        Ok(etcd)
    }

    /// Returns the client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
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
        let mut client = etcd_client::Client::connect([self.endpoint()], None).await?;
        client.compact(revision, None).await?;
        Ok(())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
