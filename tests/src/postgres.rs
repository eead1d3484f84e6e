//! A real PostgreSQL server on a free port with a temporary data directory, stopped when
//! dropped. `initdb` and `postgres` refuse to run as root: when the tests run as root (as CI
//! does), both run as the `postgres` user.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::{free_port, wait_until};

/// One PostgreSQL server for one test; each [`Postgres::database`] is a fresh database.
pub struct Postgres {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
    owner: Option<(u32, u32)>,
    /// Run under a watchdog that stops it once the test process is gone.
    watched: bool,
    /// Flushes every commit (tests turn that off: they gain speed and lose nothing).
    durable: bool,
    /// Writes every commit's WAL before answering it, so that a commit outlives a crash of
    /// the server (not of the machine: nothing is flushed).
    synchronous: bool,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").field("port", &self.port).finish()
    }
}

/// Returns the directory of the PostgreSQL binaries: `PG_BIN`, the newest
/// `/usr/lib/postgresql/*/bin` (Debian's layout), or the `PATH`.
fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn binary(name: &str) -> PathBuf {
    bin_dir().map_or_else(|| PathBuf::from(name), |dir| dir.join(name))
}

/// The uid and gid of the `postgres` user, when running as root.
fn run_as() -> anyhow::Result<Option<(u32, u32)>> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .is_some_and(|uid| uid == "0");
    if !root {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .context("running as root needs a `postgres` user to run PostgreSQL (install Debian's postgresql package with scripts/test)")?;
    let fields: Vec<&str> = entry.split(':').collect();
    Ok(Some((fields[2].parse()?, fields[3].parse()?)))
}

fn chown(path: &std::path::Path, owner: Option<(u32, u32)>) -> anyhow::Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

static DATABASES: AtomicU32 = AtomicU32::new(0);

static SHARED: tokio::sync::OnceCell<Postgres> = tokio::sync::OnceCell::const_new();

/// Returns the server shared by the tests of this test binary, started on first use. It
/// outlives the test that started it: a watchdog stops it, and removes its data, once this
/// process has exited.
pub async fn shared() -> anyhow::Result<&'static Postgres> {
    SHARED.get_or_try_init(|| Postgres::start_with(true, false)).await
}

static DURABLE: tokio::sync::OnceCell<Postgres> = tokio::sync::OnceCell::const_new();

/// Returns a server shared like [`shared`]'s but with PostgreSQL's durable defaults (every
/// commit flushed to disk), for benchmarks.
pub async fn durable() -> anyhow::Result<&'static Postgres> {
    DURABLE.get_or_try_init(|| Postgres::start_with(true, true)).await
}

impl Postgres {
    /// Runs `initdb` and starts the server, waiting until it accepts connections.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(false, false).await
    }

    /// Like [`Postgres::start`], but a commit it answered survives [`Postgres::kill`]: for
    /// tests that count what a crash of the server loses.
    pub async fn start_crash_safe() -> anyhow::Result<Self> {
        let mut postgres = Self::start_with(false, false).await?;
        postgres.synchronous = true;
        postgres.restart().await?;
        Ok(postgres)
    }

    async fn start_with(watched: bool, durable: bool) -> anyhow::Result<Self> {
        let owner = run_as()?;
        let dir = tempfile::Builder::new().prefix("tidings-pg-").tempdir()?;
        chown(dir.path(), owner)?;
        let mut initdb = Command::new(binary("initdb"));
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = owner {
            initdb.uid(uid).gid(gid);
        }
        let output = initdb.output().context(
            "cannot run initdb: install PostgreSQL with scripts/test (Debian's postgresql), or set PG_BIN",
        )?;
        if !output.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let mut postgres = Self {
            child: None,
            dir,
            port: free_port()?,
            owner,
            watched,
            durable,
            synchronous: false,
        };
        postgres.spawn()?;
        postgres.wait_ready().await?;
        Ok(postgres)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))?;
        let mut command = if self.watched {
            // The shell waits for the test process to go, then stops the server and removes
            // its directory (a static is never dropped).
            let script = format!(
                "\"$@\" & pg=$!; while [ -d /proc/{parent} ] && kill -0 $pg 2>/dev/null; do sleep 1; done; \
                 kill -QUIT $pg 2>/dev/null; wait $pg; rm -rf {dir}",
                parent = std::process::id(),
                dir = self.dir.path().display(),
            );
            let mut command = Command::new("sh");
            command.args(["-c", &script, "postgres"]).arg(binary("postgres"));
            command
        } else {
            Command::new(binary("postgres"))
        };
        command
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=300"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if self.durable {
            command.args(["-c", "shared_buffers=1GB", "-c", "max_wal_size=4GB"]);
        } else {
            let synchronous = if self.synchronous { "on" } else { "off" };
            command.args(["-c", "fsync=off", "-c", &format!("synchronous_commit={synchronous}")]);
            command.args(["-c", "full_page_writes=off", "-c", "shared_buffers=64MB"]);
        }
        // More server settings, `-c name=value` each, for example to load pg_stat_statements
        // when looking into a benchmark.
        if let Ok(extra) = std::env::var("TIDINGS_TEST_POSTGRES_OPTIONS") {
            command.args(extra.split_whitespace());
        }
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        self.child = Some(command.spawn().context("cannot start postgres")?);
        Ok(())
    }

    /// Returns the URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}?sslmode=disable", self.port)
    }

    /// Waits until the server accepts connections.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let url = self.url("postgres");
        wait_until("postgres to accept connections", Duration::from_secs(30), || {
            let url = url.clone();
            async move {
                let (client, connection) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await.ok()?;
                tokio::spawn(connection);
                client.simple_query("SELECT 1").await.ok().map(|_| ())
            }
        })
        .await
        .with_context(|| format!("postgres log:\n{}", self.logs()))
    }

    /// Returns the URL of database `name`, creating it unless it exists.
    pub async fn database_named(&self, name: &str) -> anyhow::Result<String> {
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await?
            .is_some();
        if !exists
            && let Err(error) = client.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await
            && error.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
        {
            return Err(error.into());
        }
        Ok(self.url(name))
    }

    /// Creates a fresh database and returns its URL.
    pub async fn database(&self) -> anyhow::Result<String> {
        let name = format!("t{}_{}", std::process::id(), DATABASES.fetch_add(1, Ordering::Relaxed));
        self.database_named(&name).await
    }

    /// Returns the server's log.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Kills the server at once (SIGKILL to the postmaster; its backends end with it).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Immediate shutdown: backends stop without a checkpoint, as after a crash.
            let _ = Command::new("kill").args(["-QUIT", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data, after [`Postgres::kill`].
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready().await
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
    }
}
