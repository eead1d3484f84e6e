//! A Tidings node as a child process, with its logs captured to a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tempfile::TempDir;
use tidings_client::Transport;
use tidings_client::{ClusterServiceClient, WebhookServiceClient};

use crate::{TEST_SECRETS_KEY, wait_until};

/// How to start a node.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// etcd endpoint; embedded mode when `None`.
    pub etcd: Option<String>,
    /// etcd key prefix.
    pub prefix: Option<String>,
    /// PostgreSQL URL for cluster mode; when `None` with `etcd` set, a database of the test
    /// binary's shared server named after the etcd prefix, so the nodes of one cluster share
    /// it.
    pub postgres: Option<String>,
    /// Data directory; a fresh temporary one when `None`.
    pub data_dir: Option<PathBuf>,
    /// Log filter; `info` when `None`.
    pub log_level: Option<String>,
    /// Extra arguments after `serve`.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// gRPC address; a free port of 127.0.0.1 when `None`. Set it to restart a node where its
    /// clients expect it.
    pub listen: Option<String>,
    /// Whether calls need a token (`auth.enabled`). Off unless asked for, so that tests of
    /// other features call without one; `env` may still set it.
    pub auth: bool,
    /// The token the node's helper clients send. With `auth` and none given, the admin token
    /// the node writes to its data directory (the first node of a cluster writes it; give it
    /// to the others).
    pub token: Option<String>,
}

/// A running node process, killed when dropped.
pub struct NodeProcess {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
    data_dir: PathBuf,
    token: Option<String>,
    _temp: Option<TempDir>,
}

impl std::fmt::Debug for NodeProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProcess").field("addr", &self.addr).finish()
    }
}

/// Returns the path of the node binary built for these tests.
pub fn node_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TIDINGS_NODE_BIN") {
        return PathBuf::from(path);
    }
    // Test executables live in target/<profile>/deps; the binary in target/<profile>.
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir =
        exe.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    profile_dir.join(format!("tidings-node{}", std::env::consts::EXE_SUFFIX))
}

/// Returns the URL of the PostgreSQL database a cluster started with `etcd` and `prefix` (and
/// no PostgreSQL URL of its own) keeps its partition data in.
pub async fn cluster_postgres_url(etcd: &str, prefix: &str) -> anyhow::Result<String> {
    let name = database_name(Some(etcd), Some(prefix));
    crate::postgres::shared().await?.database_named(&name).await
}

/// Returns the state layer of such a cluster, to read its partition data in tests.
pub async fn cluster_state(
    etcd: &str,
    prefix: &str,
) -> anyhow::Result<tidings_scheduler::state::State> {
    let url = cluster_postgres_url(etcd, prefix).await?;
    let options =
        tidings_scheduler::state::postgres::PgOptions { url, pool_size: 4, ..Default::default() };
    Ok(tidings_scheduler::state::State::postgres(options).await?)
}

/// Returns the database name of a cluster: its etcd endpoint and prefix, made a name.
fn database_name(etcd: Option<&str>, prefix: Option<&str>) -> String {
    let raw = format!("{}{}", etcd.unwrap_or(""), prefix.unwrap_or("/tidings/"));
    let name: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
        .collect();
    format!("c_{}", &name[name.len().saturating_sub(50)..])
}

impl NodeProcess {
    /// Starts a node and waits until its gRPC API listens.
    pub async fn start(options: NodeOptions) -> anyhow::Result<Self> {
        let (temp, data_dir) = match &options.data_dir {
            Some(dir) => (None, dir.clone()),
            None => {
                let temp = tempfile::Builder::new().prefix("tidings-node-").tempdir()?;
                let dir = temp.path().to_path_buf();
                (Some(temp), dir)
            }
        };
        std::fs::create_dir_all(&data_dir)?;
        let log = data_dir.join(format!("node-{}.log", crate::free_port()?));
        let mut command = Command::new(node_binary());
        command
            .arg("serve")
            .args(["--listen", options.listen.as_deref().unwrap_or("127.0.0.1:0")])
            .args(["--log-format", "json"])
            .args(["--log-level", options.log_level.as_deref().unwrap_or("info")])
            .arg("--data-dir")
            .arg(&data_dir)
            .env_remove("RUST_LOG")
            .env("TIDINGS_SECRETS__KEY", TEST_SECRETS_KEY)
            .env("TIDINGS_AUTH__ENABLED", if options.auth { "true" } else { "false" })
            .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(&options.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        if let Some(etcd) = &options.etcd {
            command.args(["--etcd", etcd]);
        }
        if let Some(prefix) = &options.prefix {
            command.args(["--etcd-prefix", prefix]);
        }
        if let Some(url) = &options.postgres {
            command.args(["--postgres", url]);
        } else if options.etcd.is_some() {
            let name = database_name(options.etcd.as_deref(), options.prefix.as_deref());
            let url = crate::postgres::shared().await?.database_named(&name).await?;
            command.args(["--postgres", &url]);
        }
        let child =
            command.spawn().with_context(|| format!("cannot start {}", node_binary().display()))?;
        let mut node = Self {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            data_dir,
            token: options.token.clone(),
            _temp: temp,
        };
        node.addr = wait_until("the node to listen", Duration::from_secs(30), || {
            let found = node.listening_addr();
            async move { found }
        })
        .await
        .with_context(|| format!("node logs:\n{}", node.logs()))?;
        if options.auth && node.token.is_none() {
            let file = node.data_dir.join("admin.token");
            node.token = std::fs::read_to_string(&file).ok().map(|t| t.trim().to_string());
        }
        Ok(node)
    }

    /// Returns the token the helper clients send, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Returns a connection to the node that sends its token, for any generated client
    /// (`EventServiceClient::new(node.transport().await?)`).
    pub async fn transport(&self) -> anyhow::Result<Transport> {
        let mut builder = tidings_client::Client::builder().endpoint(self.url());
        if let Some(token) = &self.token {
            builder = builder.token(token.clone());
        }
        Ok(builder.connect().await?.transport())
    }

    fn listening_addr(&mut self) -> Option<SocketAddr> {
        if let Some(child) = &mut self.child
            && let Ok(Some(_)) = child.try_wait()
        {
            return None;
        }
        self.logs().lines().find_map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).ok()?;
            if entry.get("message")?.as_str()? != "grpc listening" {
                return None;
            }
            entry.get("addr")?.as_str()?.parse().ok()
        })
    }

    /// Returns the process id while the node runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Returns the gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns the gRPC URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Returns the data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Returns everything the node logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Returns a client of the node, built with the crate's defaults and the node's token.
    pub async fn client(&self) -> anyhow::Result<tidings_client::Client> {
        let mut builder = tidings_client::Client::builder().endpoint(self.url());
        if let Some(token) = &self.token {
            builder = builder.token(token.clone());
        }
        Ok(builder.connect().await?)
    }

    /// Returns a connected WebhookService client.
    pub async fn webhooks(&self) -> anyhow::Result<WebhookServiceClient<Transport>> {
        Ok(WebhookServiceClient::new(self.transport().await?))
    }

    /// Returns a connected ClusterService client.
    pub async fn cluster(&self) -> anyhow::Result<ClusterServiceClient<Transport>> {
        Ok(ClusterServiceClient::new(self.transport().await?))
    }

    /// Returns a connected EventService client.
    pub async fn events(&self) -> anyhow::Result<tidings_client::EventServiceClient<Transport>> {
        Ok(tidings_client::EventServiceClient::new(self.transport().await?))
    }

    /// Returns a connected CampaignService client.
    pub async fn campaigns(
        &self,
    ) -> anyhow::Result<tidings_client::CampaignServiceClient<Transport>> {
        Ok(tidings_client::CampaignServiceClient::new(self.transport().await?))
    }

    /// Waits until every partition's inbox is empty: everything sent to the node so far has
    /// been decided.
    pub async fn drained(&self, within: Duration) -> anyhow::Result<()> {
        self.wait_partitions("every inbox to drain", within, |p| p.inbox_backlog == 0).await
    }

    /// Waits until every partition's inbox is empty and no timer is pending: nothing more
    /// will happen without new input. A negative check ("nothing else was sent") holds once
    /// this returns.
    pub async fn quiet(&self, within: Duration) -> anyhow::Result<()> {
        let idle =
            |p: &tidings_client::v1::Partition| p.inbox_backlog == 0 && p.pending_timers == 0;
        self.wait_partitions("the node to go quiet (no inbox entry, no timer)", within, idle).await
    }

    async fn wait_partitions(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&tidings_client::v1::Partition) -> bool,
    ) -> anyhow::Result<()> {
        let cluster = self.cluster().await?;
        let done = &done;
        // Twice in a row, so that a partition caught between two steps does not count.
        let seen = std::sync::atomic::AtomicU32::new(0);
        let seen = &seen;
        wait_until(what, within, || {
            let mut cluster = cluster.clone();
            async move {
                let request = tidings_client::v1::ListPartitionsRequest {};
                let partitions = cluster.list_partitions(request).await.ok()?.into_inner();
                if partitions.partitions.iter().all(done) {
                    seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    seen.store(0, std::sync::atomic::Ordering::Relaxed);
                }
                (seen.load(std::sync::atomic::Ordering::Relaxed) >= 2).then_some(())
            }
        })
        .await
    }

    /// Freezes the process with SIGSTOP.
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            signal(child, libc::SIGSTOP);
        }
    }

    /// Thaws the process with SIGCONT.
    pub fn resume(&self) {
        if let Some(child) = &self.child {
            signal(child, libc::SIGCONT);
        }
    }

    /// Kills the node with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the node with SIGTERM and waits for it to exit; fails if it exits unsuccessfully.
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        signal(&child, libc::SIGTERM);
        let status = wait_until("the node to exit", Duration::from_secs(20), || {
            let status = child.try_wait().ok().flatten();
            async move { status }
        })
        .await;
        match status {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => bail!("node exited with {status}; logs:\n{}", self.logs()),
            Err(error) => {
                let _ = child.kill();
                Err(error)
            }
        }
    }
}

#[allow(unsafe_code)]
fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
