//! The state layer on PostgreSQL: one table per kind of partition data (the schema is in
//! `scheduler/migrations/`), with the indexes the delivery filters need.
//!
//! - **Fencing**: a claim records the owner's epoch in the `partitions` row only if it is newer
//!   than the one there; every partition transaction first reads that row `FOR SHARE` and
//!   applies nothing unless it holds the writer's epoch. A claim waits for the transactions in
//!   flight under the older epoch, and none starts under it afterwards. Sessions end a
//!   transaction left idle (a frozen node's) after [`IDLE_IN_TRANSACTION`], so a claim never
//!   waits on it for longer.
//! - **Versions**: each transaction takes one number from the `versions` sequence and stamps
//!   every row it writes with it, as a key-value store's revision.
//! - **The inbox**: after a commit that adds entries, the writer wakes the owner at once when
//!   it is on the same node, and sends `NOTIFY tidings_inbox` with the partition, coalesced and
//!   outside the writing transaction (a notifying transaction holds a database-wide lock
//!   through its commit); each node `LISTEN`s on one connection and wakes the partition's
//!   worker, which also reads the inbox every [`INBOX_POLL`] in case a notification was lost.
//!   Each inbox row carries the id of the transaction that wrote it (`xid8`): a read takes the
//!   rows from the oldest transaction still open at the previous read on, so it reads what is
//!   new, not the whole backlog.
//! - **Batches**: the writes of a transaction go as one multi-row statement per table and
//!   kind (`UNNEST` of arrays), pipelined on one connection.
//! - **Group commit**: small plain writes (what the API writes for one call: an event, an
//!   interaction, a contact without a version to match) queue for [`COMMITTERS`] tasks, each
//!   of which commits what queued while the others were busy as one transaction; batches of
//!   [`ALONE_WRITES`] writes or more commit on their own. An idle node commits each write
//!   at once; under load, a burst of single-event `Publish` calls costs a few transactions
//!   instead of one each.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::types::ToSql;

use super::backend::{
    Backend, Committed, DeliveryPage, DeliveryStream, InboxBatch, InboxFeed, Raw, Table, TimerPage,
};
use super::{Columns, DeliveryFilter, Expect, Fence, Key, StateError, StateResult, Write, keys};
use crate::cluster::PartitionId;
use crate::delivery::record::Delivery;
use crate::store::{Revision, StoreError};

/// How long a session may sit in an open transaction before PostgreSQL ends it.
pub const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(2);
/// How often an owner reads its inbox when no notification came.
const INBOX_POLL: Duration = Duration::from_secs(1);
/// Inbox entries read at once.
const INBOX_PAGE: i64 = 2_000;
/// How often a delivery watch looks for changes.
const WATCH_POLL: Duration = Duration::from_millis(200);
/// Tasks committing plain writes, each one transaction at a time.
const COMMITTERS: usize = 4;
/// Most writes one group transaction takes.
const GROUP_WRITES: usize = 2_000;
/// Writes from this many on are batched already (PublishBatch, BatchUpsertContacts): they
/// commit on their own, as many at once as the pool allows.
const ALONE_WRITES: usize = 64;
/// The advisory lock that serialises schema migrations.
const MIGRATION_LOCK: i64 = 0x7469_6469_6e67;

/// The migrations, in order: (version, name, SQL).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "partition data", include_str!("../../migrations/0001_partition_data.sql")),
    (2, "inbox transaction ids", include_str!("../../migrations/0002_inbox_xid.sql")),
];

/// How to reach PostgreSQL.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// `postgres://user:password@host:port/database?sslmode=…&sslrootcert=…`.
    pub url: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// How long to wait for a connection (new or from the pool).
    pub connect_timeout: Duration,
    /// How long one statement may run.
    pub statement_timeout: Duration,
    /// The sessions' `application_name`, which `pg_stat_activity` shows: `tidings/{node id}`
    /// on a node.
    pub application_name: String,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            url: String::new(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            application_name: "tidings".into(),
        }
    }
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("postgres: {error}"))
}

/// Maps a PostgreSQL error: what a retry may fix is `Unavailable`; a limit reached (disk,
/// memory, connections) says what ran out.
fn store_error(error: tokio_postgres::Error) -> StoreError {
    use tokio_postgres::error::SqlState;
    let Some(db) = error.as_db_error() else {
        // The connection failed or closed: the statement may or may not have applied.
        return unavailable(error);
    };
    let code = db.code();
    let class = &code.code()[..2];
    if class == "53" || *code == SqlState::PROGRAM_LIMIT_EXCEEDED {
        return StoreError::Exhausted(format!("postgres: {}", db.message()));
    }
    // A value the server does not take (a NUL in text, a number out of range): the same
    // request fails again.
    if class == "22" {
        return StoreError::InvalidRequest(format!("postgres: {} ({})", db.message(), code.code()));
    }
    let transient =
        matches!(class, "08" | "40" | "57" | "55" | "58") || *code == SqlState::QUERY_CANCELED;
    if transient {
        unavailable(db.message())
    } else {
        StoreError::Internal(format!("postgres: {} ({})", db.message(), code.code()))
    }
}

fn pool_error(error: deadpool_postgres::PoolError) -> StoreError {
    match error {
        deadpool_postgres::PoolError::Backend(error) => store_error(error),
        other => unavailable(other),
    }
}

/// Splits the URL into what tokio-postgres reads and the TLS settings it does not:
/// `sslmode` (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`) and `sslrootcert`.
fn parse_url(url: &str) -> Result<(tokio_postgres::Config, Option<String>, String), StoreError> {
    let invalid = |what: String| StoreError::InvalidRequest(format!("postgres.url: {what}"));
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut sslmode = "prefer".to_string();
    let mut rootcert = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", mode)) => sslmode = mode.to_string(),
            Some(("sslrootcert", path)) => rootcert = Some(path.to_string()),
            _ => rest.push(pair),
        }
    }
    let mode = match sslmode.as_str() {
        "disable" => "disable",
        "prefer" | "allow" => "prefer",
        "require" | "verify-ca" | "verify-full" => "require",
        other => {
            return Err(invalid(format!(
                "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            )));
        }
    };
    let sslmode = format!("sslmode={mode}");
    rest.push(&sslmode);
    let url = format!("{base}?{}", rest.join("&"));
    let config = tokio_postgres::Config::from_str(&url).map_err(|e| invalid(e.to_string()))?;
    Ok((config, rootcert, mode.to_string()))
}

fn tls(rootcert: Option<&str>) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    match rootcert {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                StoreError::InvalidRequest(format!("postgres.url: sslrootcert {path}: {e}"))
            })?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| {
                    StoreError::InvalidRequest(format!("postgres.url: sslrootcert {path}: {e}"))
                })?;
                roots.add(cert).map_err(|e| {
                    StoreError::InvalidRequest(format!("postgres.url: sslrootcert {path}: {e}"))
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Internal(format!("tls: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The state layer on PostgreSQL.
pub(crate) struct PgBackend {
    pool: Pool,
    /// Wakes the owners of partitions whose inbox gets entries.
    notifier: Notifier,
    /// Plain writes waiting for a committer.
    group: tokio::sync::mpsc::Sender<Pending>,
}

/// A plain write waiting to be committed, and where its result goes.
struct Pending {
    writes: Vec<Write>,
    reply: tokio::sync::oneshot::Sender<Result<i64, StoreError>>,
}

#[derive(Default)]
struct Wakers {
    partitions: Mutex<HashMap<PartitionId, Arc<Notify>>>,
}

impl Wakers {
    fn of(&self, partition: PartitionId) -> Arc<Notify> {
        let mut map = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(partition).or_default().clone()
    }

    fn all(&self) {
        let map = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        for notify in map.values() {
            notify.notify_one();
        }
    }
}

/// Opens a pool on `options` (no migration) and returns it with the parsed configuration.
async fn open(
    options: &PgOptions,
) -> Result<(Pool, tokio_postgres::Config, tokio_postgres_rustls::MakeRustlsConnect), StoreError> {
    let (mut config, rootcert, _) = parse_url(&options.url)?;
    config.connect_timeout(options.connect_timeout);
    // The partition tables are read by key and mostly cached: random reads cost about what
    // sequential ones do, which keeps the planner on the indexes.
    config.options(format!(
        "-c idle_in_transaction_session_timeout={} -c statement_timeout={} -c random_page_cost=1.1",
        IDLE_IN_TRANSACTION.as_millis(),
        options.statement_timeout.as_millis()
    ));
    config.application_name(&options.application_name);
    let tls = tls(rootcert.as_deref())?;
    let manager = Manager::from_config(
        config.clone(),
        tls.clone(),
        ManagerConfig { recycling_method: RecyclingMethod::Fast },
    );
    let pool = Pool::builder(manager)
        .max_size(options.pool_size.max(2))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(options.connect_timeout))
        .create_timeout(Some(options.connect_timeout))
        .recycle_timeout(Some(options.connect_timeout))
        .build()
        .map_err(|e| StoreError::Internal(format!("postgres pool: {e}")))?;
    Ok((pool, config, tls))
}

/// Applies the migrations not applied yet, under an advisory lock; returns the versions it
/// applied.
pub async fn migrate(options: &PgOptions) -> Result<Vec<i32>, StoreError> {
    let (pool, _, _) = open(options).await?;
    migrate_on(&pool).await
}

async fn migrate_on(pool: &Pool) -> Result<Vec<i32>, StoreError> {
    let mut client = pool.get().await.map_err(pool_error)?;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map_err(store_error)?;
    let result = async {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS tidings_schema (
                     version integer PRIMARY KEY,
                     name text NOT NULL,
                     applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await
            .map_err(store_error)?;
        let applied: HashSet<i32> = client
            .query("SELECT version FROM tidings_schema", &[])
            .await
            .map_err(store_error)?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut done = Vec::new();
        for (version, name, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            let tx = client.transaction().await.map_err(store_error)?;
            tx.batch_execute(sql).await.map_err(store_error)?;
            tx.execute(
                "INSERT INTO tidings_schema (version, name) VALUES ($1, $2)",
                &[version, name],
            )
            .await
            .map_err(store_error)?;
            tx.commit().await.map_err(store_error)?;
            tracing::info!(version, name, "schema migration applied");
            done.push(*version);
        }
        Ok(done)
    }
    .await;
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    result
}

impl PgBackend {
    /// Connects, applies the migrations not applied yet and starts listening for inbox
    /// notifications.
    pub(crate) async fn connect(options: PgOptions) -> Result<Self, StoreError> {
        let (pool, config, tls) = open(&options).await?;
        migrate_on(&pool).await?;
        let wake = Arc::new(Wakers::default());
        // Tells this node's notifications apart: its own owners were woken already.
        let tag = format!("{:016x}", rand::random::<u64>());
        tokio::spawn(listen(config, tls, Arc::downgrade(&wake), tag.clone()));
        let (notices, waiting) = tokio::sync::mpsc::unbounded_channel();
        // Ends when the backend, and with it the sender, is dropped.
        tokio::spawn(notify(pool.clone(), waiting, tag));
        // The committers end when the backend, and with it the group's sender, is dropped.
        let (group, queue) = tokio::sync::mpsc::channel(4 * GROUP_WRITES);
        let queue = Arc::new(tokio::sync::Mutex::new(queue));
        let notifier = Notifier { wake, notices };
        for _ in 0..COMMITTERS {
            tokio::spawn(commit_groups(pool.clone(), queue.clone(), notifier.clone()));
        }
        Ok(Self { pool, notifier, group })
    }

    fn notify(&self, partitions: Vec<i32>) {
        self.notifier.wake_owners(partitions);
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }
}

/// Wakes the owners of partitions whose inbox got entries.
#[derive(Clone)]
struct Notifier {
    /// This node's owners.
    wake: Arc<Wakers>,
    /// The partitions, for the other nodes' owners.
    notices: tokio::sync::mpsc::UnboundedSender<i32>,
}

impl Notifier {
    /// Wakes the owners of `partitions` after a commit that added to their inboxes: at once on
    /// this node, through a notification on the others.
    fn wake_owners(&self, partitions: Vec<i32>) {
        for partition in partitions {
            self.wake.of(partition as PartitionId).notify_one();
            let _ = self.notices.send(partition);
        }
    }
}

/// A committer: takes what queued (up to [`GROUP_WRITES`] writes), commits it as one
/// transaction and answers each writer; until the queue's sender is dropped.
async fn commit_groups(
    pool: Pool,
    queue: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Pending>>>,
    notifier: Notifier,
) {
    loop {
        let mut group = Vec::new();
        {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else { return };
            let mut writes = first.writes.len();
            group.push(first);
            while writes < GROUP_WRITES {
                match queue.try_recv() {
                    Ok(next) => {
                        writes += next.writes.len();
                        group.push(next);
                    }
                    Err(_) => break,
                }
            }
        }
        if group.len() == 1 {
            let Pending { writes, reply } = group.remove(0);
            let _ = reply.send(write_once(&pool, &notifier, writes).await);
            continue;
        }
        let merged = last_of_each_key(group.iter().flat_map(|p| p.writes.iter().cloned()));
        match write_once(&pool, &notifier, merged).await {
            Ok(version) => {
                for pending in group {
                    let _ = pending.reply.send(Ok(version));
                }
            }
            // Not committed: a write the server refuses fails alone, so each goes on its own;
            // an outage fails them all.
            Err(error) if !error.is_retryable() => {
                for Pending { writes, reply } in group {
                    let _ = reply.send(write_once(&pool, &notifier, writes).await);
                }
            }
            Err(error) => {
                for pending in group {
                    let _ = pending.reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Commits `writes` as one transaction and wakes the owners of the inboxes it adds to.
async fn write_once(
    pool: &Pool,
    notifier: &Notifier,
    writes: Vec<Write>,
) -> Result<i64, StoreError> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(store_error)?;
    let version = next_version(&tx).await?;
    let notify = apply(&tx, writes, version).await?;
    tx.commit().await.map_err(store_error)?;
    notifier.wake_owners(notify);
    Ok(version)
}

/// Keeps the last write to each key, in the order of those last writes: one statement may
/// not change a row twice.
fn last_of_each_key(writes: impl Iterator<Item = Write>) -> Vec<Write> {
    let writes: Vec<Write> = writes.collect();
    let mut last: HashMap<String, usize> = HashMap::with_capacity(writes.len());
    for (i, write) in writes.iter().enumerate() {
        last.insert(write.key().encode(), i);
    }
    writes
        .into_iter()
        .enumerate()
        .filter(|(i, w)| last[&w.key().encode()] == *i)
        .map(|(_, w)| w)
        .collect()
}

/// Listens for inbox notifications and wakes the partitions named, reconnecting when the
/// connection drops (and then waking every partition, in case one was missed). Ends when the
/// backend is dropped.
async fn listen(
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    wake: std::sync::Weak<Wakers>,
    tag: String,
) {
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        if wake.strong_count() == 0 {
            return;
        }
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                if sender.send(n.payload().to_string()).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                });
                if client.batch_execute("LISTEN tidings_inbox").await.is_ok() {
                    backoff.reset();
                    if let Some(wake) = wake.upgrade() {
                        wake.all();
                    }
                    while let Some(payload) = receiver.recv().await {
                        let Some(wake) = wake.upgrade() else { return };
                        let (partition, from) = payload.split_once('/').unwrap_or((&payload, ""));
                        if from == tag {
                            continue;
                        }
                        if let Ok(partition) = partition.parse() {
                            wake.of(partition).notify_one();
                        }
                    }
                }
                driver.abort();
                tracing::debug!("inbox notifications interrupted; reconnecting");
            }
            Err(error) => {
                tracing::debug!(%error, "cannot listen for inbox notifications; retrying")
            }
        }
        backoff.wait().await;
    }
}

/// A value of one column.
#[derive(Clone, Debug)]
enum Val {
    Int(i32),
    Big(i64),
    Text(String),
}

/// One table's key columns, as SQL sees them.
struct Spec {
    table: &'static str,
    keys: &'static [(&'static str, &'static str)],
    /// Columns beyond the key, `value` and `version`.
    extra: &'static [(&'static str, &'static str)],
}

const CONTACTS: Spec =
    Spec { table: "contacts", keys: &[("partition", "int4"), ("id", "text")], extra: &[] };
const INBOX: Spec =
    Spec { table: "inbox", keys: &[("partition", "int4"), ("id", "text")], extra: &[] };
const TIMERS: Spec = Spec {
    table: "timers",
    keys: &[("partition", "int4"), ("due_ms", "int8"), ("id", "text")],
    extra: &[],
};
const DELIVERIES: Spec = Spec {
    table: "deliveries",
    keys: &[("partition", "int4"), ("id", "text")],
    extra: &[
        ("webhook", "text"),
        ("campaign", "text"),
        ("contact", "text"),
        ("run", "text"),
        ("status", "text"),
        ("created_ms", "int8"),
    ],
};
const STANDINGS: Spec = Spec {
    table: "standings",
    keys: &[("partition", "int4"), ("contact", "text"), ("campaign", "text")],
    extra: &[],
};
const RUNS: Spec =
    Spec { table: "runs", keys: &[("campaign", "text"), ("run", "text")], extra: &[] };
const SHARDS: Spec = Spec {
    table: "shards",
    keys: &[("campaign", "text"), ("run", "text"), ("partition", "int4")],
    extra: &[],
};
const IDEMPOTENCY: Spec =
    Spec { table: "idempotency", keys: &[("key", "text")], extra: &[("created_ms", "int8")] };

fn p(partition: PartitionId) -> Val {
    Val::Int(partition as i32)
}

/// Returns a key's table and key columns.
fn row(key: &Key) -> (&'static Spec, Vec<Val>) {
    match key {
        Key::Contact { partition, id } => (&CONTACTS, vec![p(*partition), Val::Text(id.clone())]),
        Key::Inbox { partition, id } => (&INBOX, vec![p(*partition), Val::Text(id.clone())]),
        Key::Timer(t) => {
            (&TIMERS, vec![p(t.partition), Val::Big(t.due_ms.max(0)), Val::Text(t.id.clone())])
        }
        Key::Delivery { partition, id } => {
            (&DELIVERIES, vec![p(*partition), Val::Text(id.clone())])
        }
        Key::Standing { partition, contact, campaign } => (
            &STANDINGS,
            vec![p(*partition), Val::Text(contact.clone()), Val::Text(campaign.clone())],
        ),
        Key::Run { campaign, run } => {
            (&RUNS, vec![Val::Text(campaign.clone()), Val::Text(run.clone())])
        }
        Key::Shard { campaign, run, partition } => {
            (&SHARDS, vec![Val::Text(campaign.clone()), Val::Text(run.clone()), p(*partition)])
        }
        Key::Idempotency { key } => (&IDEMPOTENCY, vec![Val::Text(key.clone())]),
    }
}

fn extra(columns: &Columns) -> Vec<Val> {
    match columns {
        Columns::None => Vec::new(),
        Columns::Delivery { webhook, campaign, contact, run, status, created_ms } => vec![
            Val::Text(webhook.clone()),
            Val::Text(campaign.clone()),
            Val::Text(contact.clone()),
            Val::Text(run.clone()),
            Val::Text((*status).to_string()),
            Val::Big(*created_ms),
        ],
        Columns::Created(ms) => vec![Val::Big(*ms)],
    }
}

fn params(vals: &[Val]) -> Vec<Box<dyn ToSql + Sync + Send>> {
    vals.iter()
        .map(|v| -> Box<dyn ToSql + Sync + Send> {
            match v {
                Val::Int(v) => Box::new(*v),
                Val::Big(v) => Box::new(*v),
                Val::Text(v) => Box::new(v.clone()),
            }
        })
        .collect()
}

fn refs(params: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()
}

/// One column of a multi-row statement.
enum Column {
    Int(Vec<i32>),
    Big(Vec<i64>),
    Text(Vec<String>),
    Bytes(Vec<Vec<u8>>),
}

impl Column {
    fn of(sql_type: &str) -> Self {
        match sql_type {
            "int4" => Column::Int(Vec::new()),
            "int8" => Column::Big(Vec::new()),
            "bytea" => Column::Bytes(Vec::new()),
            _ => Column::Text(Vec::new()),
        }
    }

    fn push(&mut self, val: Val) {
        match (self, val) {
            (Column::Int(c), Val::Int(v)) => c.push(v),
            (Column::Big(c), Val::Big(v)) => c.push(v),
            (Column::Text(c), Val::Text(v)) => c.push(v),
            (Column::Big(c), Val::Int(v)) => c.push(i64::from(v)),
            _ => {}
        }
    }

    fn param(self) -> Box<dyn ToSql + Sync + Send> {
        match self {
            Column::Int(c) => Box::new(c),
            Column::Big(c) => Box::new(c),
            Column::Text(c) => Box::new(c),
            Column::Bytes(c) => Box::new(c),
        }
    }
}

/// The statements that apply a transaction's writes: per table, one upsert and one delete.
fn statements(
    writes: Vec<Write>,
    version: i64,
) -> Vec<(String, Vec<Box<dyn ToSql + Sync + Send>>)> {
    // The last write of a key stands (a statement may not touch a row twice).
    let mut last: BTreeMap<(&'static str, String), Write> = BTreeMap::new();
    for write in writes {
        let (spec, _) = row(write.key());
        last.insert((spec.table, write.key().encode()), write);
    }
    let mut upserts: BTreeMap<&'static str, (&'static Spec, Vec<Column>)> = BTreeMap::new();
    let mut deletes: BTreeMap<&'static str, (&'static Spec, Vec<Column>)> = BTreeMap::new();
    for (_, write) in last {
        let (spec, key_vals) = row(write.key());
        match write.value() {
            Some(value) => {
                let (_, columns) = upserts.entry(spec.table).or_insert_with(|| {
                    let mut columns: Vec<Column> =
                        spec.keys.iter().map(|(_, t)| Column::of(t)).collect();
                    columns.push(Column::of("bytea"));
                    columns.push(Column::of("int8"));
                    columns.extend(spec.extra.iter().map(|(_, t)| Column::of(t)));
                    (spec, columns)
                });
                let mut vals = key_vals.into_iter();
                for column in columns.iter_mut().take(spec.keys.len()) {
                    if let Some(v) = vals.next() {
                        column.push(v);
                    }
                }
                if let Column::Bytes(c) = &mut columns[spec.keys.len()] {
                    c.push(value.to_vec());
                }
                columns[spec.keys.len() + 1].push(Val::Big(version));
                let mut extras = extra(write.columns()).into_iter();
                for (i, (_, t)) in spec.extra.iter().enumerate() {
                    let v = extras.next().unwrap_or(if *t == "int8" {
                        Val::Big(0)
                    } else {
                        Val::Text(String::new())
                    });
                    columns[spec.keys.len() + 2 + i].push(v);
                }
            }
            None => {
                let (_, columns) = deletes.entry(spec.table).or_insert_with(|| {
                    (spec, spec.keys.iter().map(|(_, t)| Column::of(t)).collect())
                });
                for (column, v) in columns.iter_mut().zip(key_vals) {
                    column.push(v);
                }
            }
        }
    }
    let mut out = Vec::new();
    for (_, (spec, columns)) in upserts {
        let names: Vec<&str> = spec
            .keys
            .iter()
            .map(|(n, _)| *n)
            .chain(["value", "version"])
            .chain(spec.extra.iter().map(|(n, _)| *n))
            .collect();
        let types: Vec<&str> = spec
            .keys
            .iter()
            .map(|(_, t)| *t)
            .chain(["bytea", "int8"])
            .chain(spec.extra.iter().map(|(_, t)| *t))
            .collect();
        let unnest: Vec<String> =
            types.iter().enumerate().map(|(i, t)| format!("${}::{t}[]", i + 1)).collect();
        let key_names: Vec<&str> = spec.keys.iter().map(|(n, _)| *n).collect();
        let mut set: Vec<String> =
            names[spec.keys.len()..].iter().map(|n| format!("{n} = EXCLUDED.{n}")).collect();
        if spec.table == "inbox" {
            // A rewritten entry is new to the owner's feed.
            set.push("xid = pg_current_xact_id()".into());
        }
        let sql = format!(
            "INSERT INTO {} ({}) SELECT * FROM UNNEST({}) ON CONFLICT ({}) DO UPDATE SET {}",
            spec.table,
            names.join(", "),
            unnest.join(", "),
            key_names.join(", "),
            set.join(", ")
        );
        out.push((sql, columns.into_iter().map(Column::param).collect()));
    }
    for (_, (spec, columns)) in deletes {
        let key_names: Vec<&str> = spec.keys.iter().map(|(n, _)| *n).collect();
        let unnest: Vec<String> =
            spec.keys.iter().enumerate().map(|(i, (_, t))| format!("${}::{t}[]", i + 1)).collect();
        let sql = format!(
            "DELETE FROM {} WHERE ({}) IN (SELECT * FROM UNNEST({}))",
            spec.table,
            key_names.join(", "),
            unnest.join(", ")
        );
        out.push((sql, columns.into_iter().map(Column::param).collect()));
    }
    out
}

/// The partitions whose inbox the writes add to.
fn inbox_partitions(writes: &[Write]) -> Vec<i32> {
    let mut partitions: Vec<i32> = writes
        .iter()
        .filter(|w| !w.is_delete())
        .filter_map(|w| match w.key() {
            Key::Inbox { partition, .. } => Some(*partition as i32),
            _ => None,
        })
        .collect();
    partitions.sort_unstable();
    partitions.dedup();
    partitions
}

fn where_key(spec: &Spec, first: usize) -> String {
    spec.keys
        .iter()
        .enumerate()
        .map(|(i, (n, _))| format!("{n} = ${}", first + i))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Applies `writes` in the open transaction `tx` at `version`, with the notifications their
/// inbox entries need.
async fn apply(
    tx: &deadpool_postgres::Transaction<'_>,
    writes: Vec<Write>,
    version: i64,
) -> Result<Vec<i32>, StoreError> {
    let notify = inbox_partitions(&writes);
    let statements = statements(writes, version);
    let pending = statements.iter().map(|(sql, params)| async move {
        let statement = tx.prepare_cached(sql).await?;
        tx.execute(&statement, &refs(params)).await
    });
    futures::future::try_join_all(pending).await.map_err(store_error)?;
    Ok(notify)
}

/// Sends the inbox notifications of committed transactions, coalesced: one statement for every
/// partition waiting, outside the writers' transactions (a transaction that notifies holds a
/// database-wide lock through its commit, which would make every writer wait for the others'
/// flushes). A notification lost to a failure is made up for by the owners' polls.
async fn notify(
    pool: Pool,
    mut partitions: tokio::sync::mpsc::UnboundedReceiver<i32>,
    tag: String,
) {
    while let Some(first) = partitions.recv().await {
        let mut waiting = vec![first];
        while let Ok(more) = partitions.try_recv() {
            waiting.push(more);
        }
        waiting.sort_unstable();
        waiting.dedup();
        let sent = async {
            let client = pool.get().await.map_err(pool_error)?;
            client
                .execute(
                    "SELECT pg_notify('tidings_inbox', p::text || '/' || $2) FROM UNNEST($1::int4[]) AS p",
                    &[&waiting, &tag],
                )
                .await
                .map_err(store_error)
        }
        .await;
        if let Err(error) = sent {
            tracing::debug!(%error, "inbox notification not sent; owners will poll");
        }
    }
}

/// Takes an advisory lock on each key for the rest of the transaction, so that conditional
/// writes on the same key are applied one after the other.
async fn lock_keys(
    tx: &deadpool_postgres::Transaction<'_>,
    keys: &[Key],
) -> Result<(), StoreError> {
    let mut names: Vec<String> = keys.iter().map(Key::encode).collect();
    names.sort();
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM UNNEST($1::text[]) AS k",
        &[&names],
    )
    .await
    .map_err(store_error)?;
    Ok(())
}

async fn next_version(tx: &deadpool_postgres::Transaction<'_>) -> Result<i64, StoreError> {
    let row = tx.query_one("SELECT nextval('versions')", &[]).await.map_err(store_error)?;
    Ok(row.get(0))
}

async fn get_in(
    client: &impl deadpool_postgres::GenericClient,
    key: &Key,
) -> Result<Option<Raw>, StoreError> {
    let (spec, vals) = row(key);
    let sql = format!("SELECT value, version FROM {} WHERE {}", spec.table, where_key(spec, 1));
    let params = params(&vals);
    let statement = client.prepare_cached(&sql).await.map_err(store_error)?;
    let found = client.query_opt(&statement, &refs(&params)).await.map_err(store_error)?;
    Ok(found.map(|row| Raw { value: row.get(0), version: row.get(1) }))
}

/// A position among a partition's timers (see [`super::timer_position`]).
#[derive(Debug, PartialEq)]
enum TimerPos {
    Start,
    At(i64, String),
    After(i64, String),
    AfterDue(i64),
}

fn timer_pos(partition: PartitionId, position: &[u8]) -> TimerPos {
    let prefix = keys::timers_prefix(partition);
    let Some(rest) = position.strip_prefix(prefix.as_bytes()) else { return TimerPos::Start };
    if rest.is_empty() {
        return TimerPos::Start;
    }
    let (rest, after) = match rest.strip_suffix(&[0]) {
        Some(rest) => (rest, true),
        None => (rest, false),
    };
    let text = String::from_utf8_lossy(rest);
    match text.split_once('/') {
        Some((due, id)) => {
            let due = due.parse().unwrap_or(0);
            if after {
                TimerPos::After(due, id.to_string())
            } else {
                TimerPos::At(due, id.to_string())
            }
        }
        None => {
            let digits = text.strip_suffix('0').unwrap_or(&text);
            TimerPos::AfterDue(digits.parse().unwrap_or(i64::MAX))
        }
    }
}

#[async_trait]
impl Backend for PgBackend {
    async fn get(&self, key: &Key) -> StateResult<Option<Raw>> {
        let read = |source| StateError::Read { key: key.encode(), source };
        let client = self.client().await.map_err(read)?;
        get_in(&client, key).await.map_err(read)
    }

    async fn get_many(&self, keys: &[Key], _at_least: Revision) -> StateResult<Vec<Option<Raw>>> {
        let read = |source| StateError::Read {
            key: keys.first().map(Key::encode).unwrap_or_default(),
            source,
        };
        let client = self.client().await.map_err(read)?;
        // One statement per table: the keys as arrays, joined with their ordinal.
        let mut groups: BTreeMap<&'static str, (&'static Spec, Vec<usize>)> = BTreeMap::new();
        for (i, key) in keys.iter().enumerate() {
            let (spec, _) = row(key);
            groups.entry(spec.table).or_insert_with(|| (spec, Vec::new())).1.push(i);
        }
        let mut found: Vec<Option<Raw>> = vec![None; keys.len()];
        for (_, (spec, members)) in groups {
            let mut columns: Vec<Column> = spec.keys.iter().map(|(_, t)| Column::of(t)).collect();
            for i in &members {
                for (column, v) in columns.iter_mut().zip(row(&keys[*i]).1) {
                    column.push(v);
                }
            }
            let names: Vec<&str> = spec.keys.iter().map(|(n, _)| *n).collect();
            let unnest: Vec<String> = spec
                .keys
                .iter()
                .enumerate()
                .map(|(i, (_, t))| format!("${}::{t}[]", i + 1))
                .collect();
            let aliases: Vec<String> = (0..names.len()).map(|i| format!("k{i}")).collect();
            let join: Vec<String> =
                names.iter().zip(&aliases).map(|(n, a)| format!("t.{n} = u.{a}")).collect();
            // One primary-key lookup per key, whatever the planner thinks of the table's size:
            // a join would turn into a scan of the whole table for a few hundred keys.
            let sql = format!(
                "SELECT u.ord, t.value, t.version FROM UNNEST({}) WITH ORDINALITY AS u({}, ord) \
                 JOIN LATERAL (SELECT value, version FROM {} t WHERE {} OFFSET 0) t ON true",
                unnest.join(", "),
                aliases.join(", "),
                spec.table,
                join.join(" AND ")
            );
            let params: Vec<Box<dyn ToSql + Sync + Send>> =
                columns.into_iter().map(Column::param).collect();
            let statement = client.prepare_cached(&sql).await.map_err(|e| read(store_error(e)))?;
            let rows =
                client.query(&statement, &refs(&params)).await.map_err(|e| read(store_error(e)))?;
            for row in rows {
                let ord: i64 = row.get(0);
                if let Some(i) = members.get((ord - 1) as usize) {
                    found[*i] = Some(Raw { value: row.get(1), version: row.get(2) });
                }
            }
        }
        Ok(found)
    }

    async fn scan(
        &self,
        table: Table<'_>,
        after: Option<&str>,
        before: Option<&str>,
        limit: usize,
    ) -> StateResult<(Vec<(String, Raw)>, bool)> {
        let (name, id, scope, mut vals): (&str, &str, &str, Vec<Val>) = match table {
            Table::Contacts(partition) => ("contacts", "id", "partition = $1", vec![p(partition)]),
            Table::Deliveries(partition) => {
                ("deliveries", "id", "partition = $1", vec![p(partition)])
            }
            Table::Standings(partition, contact) => (
                "standings",
                "campaign",
                "partition = $1 AND contact = $2",
                vec![p(partition), Val::Text(contact.to_string())],
            ),
            Table::Shards(campaign, run) => (
                "shards",
                "lpad(partition::text, 4, '0')",
                "campaign = $1 AND run = $2",
                vec![Val::Text(campaign.to_string()), Val::Text(run.to_string())],
            ),
            Table::Runs(campaign) => {
                ("runs", "run", "campaign = $1", vec![Val::Text(campaign.to_string())])
            }
            Table::Timers(_) | Table::Inbox(_) => {
                return Err(StateError::Read {
                    key: format!("{table:?}"),
                    source: StoreError::InvalidRequest("not a scanned table".into()),
                });
            }
        };
        let mut sql = format!("SELECT {id}, value, version FROM {name} WHERE {scope}");
        if let Some(after) = after {
            vals.push(Val::Text(after.to_string()));
            sql.push_str(&format!(" AND {id} > ${}", vals.len()));
        }
        if let Some(before) = before {
            vals.push(Val::Text(before.to_string()));
            sql.push_str(&format!(" AND {id} < ${}", vals.len()));
        }
        sql.push_str(&format!(" ORDER BY {id}"));
        if limit > 0 {
            sql.push_str(&format!(" LIMIT {}", limit + 1));
        }
        let read = |source| StateError::Read { key: format!("{table:?}"), source };
        let client = self.client().await.map_err(read)?;
        let statement = client.prepare_cached(&sql).await.map_err(|e| read(store_error(e)))?;
        let params = params(&vals);
        let rows =
            client.query(&statement, &refs(&params)).await.map_err(|e| read(store_error(e)))?;
        let more = limit > 0 && rows.len() > limit;
        let page = rows
            .into_iter()
            .take(if limit > 0 { limit } else { usize::MAX })
            .map(|row| (row.get(0), Raw { value: row.get(1), version: row.get(2) }))
            .collect();
        Ok((page, more))
    }

    async fn count(&self, table: Table<'_>) -> Result<u64, StoreError> {
        let (sql, partition) = match table {
            Table::Timers(partition) => {
                ("SELECT count(*) FROM timers WHERE partition = $1", partition)
            }
            Table::Inbox(partition) => {
                ("SELECT count(*) FROM inbox WHERE partition = $1", partition)
            }
            Table::Deliveries(partition) => {
                ("SELECT count(*) FROM deliveries WHERE partition = $1", partition)
            }
            other => return Err(StoreError::InvalidRequest(format!("cannot count {other:?}"))),
        };
        let client = self.client().await?;
        let row = client.query_one(sql, &[&(partition as i32)]).await.map_err(store_error)?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn write(&self, writes: Vec<Write>) -> StateResult<Revision> {
        let first = writes.first().map(|w| w.key().encode()).unwrap_or_default();
        if writes.len() >= ALONE_WRITES {
            return write_once(&self.pool, &self.notifier, writes)
                .await
                .map_err(|source| StateError::Write { key: first, source });
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let result = match self.group.send(Pending { writes, reply }).await {
            Ok(()) => answer.await.unwrap_or_else(|_| {
                Err(StoreError::Unavailable("the node is shutting down".into()))
            }),
            Err(_) => Err(StoreError::Unavailable("the node is shutting down".into())),
        };
        result.map_err(|source| StateError::Write { key: first, source })
    }

    async fn write_if(
        &self,
        key: &Key,
        expect: Expect,
        writes: Vec<Write>,
    ) -> StateResult<Result<Revision, Option<Raw>>> {
        let result = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(store_error)?;
            lock_keys(&tx, std::slice::from_ref(key)).await?;
            let held = get_in(&tx, key).await?;
            let holds = match (&expect, &held) {
                (Expect::Absent, None) => true,
                (Expect::Present, Some(_)) => true,
                (Expect::Version(v), Some(raw)) => raw.version == *v,
                _ => false,
            };
            if !holds {
                return Ok(Err(held));
            }
            let version = next_version(&tx).await?;
            let notify = apply(&tx, writes.clone(), version).await?;
            tx.commit().await.map_err(store_error)?;
            self.notify(notify);
            Ok(Ok(version))
        }
        .await;
        result.map_err(|source| StateError::Write { key: key.encode(), source })
    }

    async fn write_if_absent(&self, absent: &[Key], writes: Vec<Write>) -> StateResult<bool> {
        let result = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(store_error)?;
            lock_keys(&tx, absent).await?;
            for key in absent {
                if get_in(&tx, key).await?.is_some() {
                    return Ok(false);
                }
            }
            let version = next_version(&tx).await?;
            let notify = apply(&tx, writes.clone(), version).await?;
            tx.commit().await.map_err(store_error)?;
            self.notify(notify);
            Ok(true)
        }
        .await;
        result.map_err(|source| StateError::Write {
            key: absent.first().map(Key::encode).unwrap_or_default(),
            source,
        })
    }

    async fn expire_idempotency(
        &self,
        fence: &Fence,
        after: Option<&str>,
        before_ms: i64,
        limit: usize,
    ) -> StateResult<(u64, Option<String>)> {
        let key = keys::idempotency(after.unwrap_or(""));
        let result = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(store_error)?;
            let epoch: Option<i64> = tx
                .query_opt("SELECT epoch FROM partitions WHERE id = $1 FOR SHARE", &[&(fence.partition as i32)])
                .await
                .map_err(store_error)?
                .map(|row| row.get(0));
            if epoch != Some(fence.epoch) {
                return Ok((0, None));
            }
            let rows = tx
                .query(
                    "WITH page AS (SELECT key, created_ms FROM idempotency WHERE key > $1 ORDER BY key LIMIT $2),
                          gone AS (DELETE FROM idempotency i USING page
                                   WHERE i.key = page.key AND page.created_ms < $3 RETURNING i.key)
                     SELECT (SELECT count(*) FROM gone), (SELECT max(key) FROM page), (SELECT count(*) FROM page)",
                    &[&after.unwrap_or(""), &(limit as i64), &before_ms],
                )
                .await
                .map_err(store_error)?;
            tx.commit().await.map_err(store_error)?;
            let row = &rows[0];
            let deleted: i64 = row.get(0);
            let last: Option<String> = row.get(1);
            let read: i64 = row.get(2);
            Ok((deleted as u64, last.filter(|_| read as usize == limit)))
        }
        .await;
        result.map_err(|source| StateError::Write { key, source })
    }

    async fn claim(&self, fence: &Fence) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let owner = String::from_utf8_lossy(&fence.signature).into_owned();
        let claimed = client
            .query_opt(
                "INSERT INTO partitions AS p (id, epoch, owner) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET epoch = EXCLUDED.epoch, owner = EXCLUDED.owner,
                     claimed_at = now()
                 WHERE p.epoch < EXCLUDED.epoch
                 RETURNING epoch",
                &[&(fence.partition as i32), &fence.epoch, &owner],
            )
            .await
            .map_err(store_error)?;
        if claimed.is_some() {
            return Ok(true);
        }
        // Nothing updated: the epoch there is ours (a retried claim) or newer.
        let row = client
            .query_one("SELECT epoch FROM partitions WHERE id = $1", &[&(fence.partition as i32)])
            .await
            .map_err(store_error)?;
        Ok(row.get::<_, i64>(0) == fence.epoch)
    }

    async fn commit(
        &self,
        fence: &Fence,
        writes: Vec<Write>,
        witness: Option<&Key>,
    ) -> Result<Committed, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(store_error)?;
        let row = tx
            .query_opt(
                "SELECT epoch, nextval('versions') FROM partitions WHERE id = $1 FOR SHARE",
                &[&(fence.partition as i32)],
            )
            .await
            .map_err(store_error)?;
        let Some(row) = row else {
            return Ok(Committed::Refused { still_ours: false, revision: 0 });
        };
        let (epoch, version): (i64, i64) = (row.get(0), row.get(1));
        if epoch != fence.epoch {
            return Ok(Committed::Refused { still_ours: false, revision: version });
        }
        if let Some(witness) = witness
            && get_in(&tx, witness).await?.is_none()
        {
            return Ok(Committed::Refused { still_ours: true, revision: version });
        }
        let notify = apply(&tx, writes, version).await?;
        tx.commit().await.map_err(store_error)?;
        self.notify(notify);
        Ok(Committed::Applied(version))
    }

    async fn timers(
        &self,
        partition: PartitionId,
        start: &[u8],
        end: &[u8],
        limit: usize,
        _at_least: Revision,
    ) -> Result<TimerPage, StoreError> {
        let mut vals = vec![p(partition)];
        let mut sql = String::from("SELECT due_ms, id, value FROM timers WHERE partition = $1");
        let bound = |pos: TimerPos, lower: bool, sql: &mut String, vals: &mut Vec<Val>| {
            let (op, due, id) = match (pos, lower) {
                (TimerPos::Start, true) => return,
                (TimerPos::Start, false) => {
                    sql.push_str(" AND FALSE");
                    return;
                }
                (TimerPos::AfterDue(due), true) => (">", due, None),
                (TimerPos::AfterDue(due), false) => ("<=", due, None),
                (TimerPos::At(due, id), true) => (">=", due, Some(id)),
                (TimerPos::At(due, id), false) => ("<", due, Some(id)),
                (TimerPos::After(due, id), true) => (">", due, Some(id)),
                (TimerPos::After(due, id), false) => ("<=", due, Some(id)),
            };
            vals.push(Val::Big(due));
            match id {
                None => sql.push_str(&format!(" AND due_ms {op} ${}", vals.len())),
                Some(id) => {
                    vals.push(Val::Text(id));
                    sql.push_str(&format!(
                        " AND (due_ms, id) {op} (${}, ${})",
                        vals.len() - 1,
                        vals.len()
                    ));
                }
            }
        };
        bound(timer_pos(partition, start), true, &mut sql, &mut vals);
        bound(timer_pos(partition, end), false, &mut sql, &mut vals);
        sql.push_str(&format!(" ORDER BY due_ms, id LIMIT {}", limit.max(1) + 1));
        let client = self.client().await?;
        let statement = client.prepare_cached(&sql).await.map_err(store_error)?;
        let params = params(&vals);
        let rows = client.query(&statement, &refs(&params)).await.map_err(store_error)?;
        let more = rows.len() > limit.max(1);
        let timers = rows
            .into_iter()
            .take(limit.max(1))
            .map(|row| {
                let due: i64 = row.get(0);
                let id: String = row.get(1);
                (keys::timer(partition, due, &id).into_bytes(), row.get::<_, Vec<u8>>(2))
            })
            .collect();
        Ok(TimerPage { timers, more, revision: 0 })
    }

    async fn inbox(&self, partition: PartitionId) -> StateResult<Box<dyn InboxFeed>> {
        Ok(Box::new(PgInbox::new(self.pool.clone(), partition, self.notifier.wake.of(partition))))
    }

    async fn watch_deliveries(&self) -> StateResult<DeliveryStream> {
        let read = |source| StateError::Read { key: "deliveries".into(), source };
        let client = self.client().await.map_err(read)?;
        let row = client
            .query_one("SELECT coalesce(max(version), 0) FROM deliveries", &[])
            .await
            .map_err(|e| read(store_error(e)))?;
        let from: i64 = row.get(0);
        drop(client);
        let (sender, receiver) = tokio::sync::mpsc::channel(256);
        tokio::spawn(watch(self.pool.clone(), from, sender));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver)))
    }

    async fn deliveries(
        &self,
        filter: &DeliveryFilter,
        from: (PartitionId, Option<String>),
        partitions: u32,
        size: usize,
        _scan_limit: usize,
    ) -> StateResult<DeliveryPage> {
        let mut vals = vec![p(from.0)];
        let mut sql = String::from("SELECT value FROM deliveries WHERE ");
        match from.1 {
            Some(id) => {
                vals.push(Val::Text(id));
                sql.push_str("(partition, id) > ($1, $2)");
            }
            None => sql.push_str("partition >= $1"),
        }
        vals.push(p(partitions));
        sql.push_str(&format!(" AND partition < ${}", vals.len()));
        for (column, value) in [
            ("webhook", &filter.webhook_id),
            ("campaign", &filter.campaign_id),
            ("contact", &filter.contact_id),
            ("run", &filter.run_id),
        ] {
            if !value.is_empty() {
                vals.push(Val::Text(value.clone()));
                sql.push_str(&format!(" AND {column} = ${}", vals.len()));
            }
        }
        if let Some(status) = filter.status {
            vals.push(Val::Text(status.name().to_string()));
            sql.push_str(&format!(" AND status = ${}", vals.len()));
        }
        if let Some(start) = filter.start_ms {
            vals.push(Val::Big(start));
            sql.push_str(&format!(" AND created_ms >= ${}", vals.len()));
        }
        if let Some(end) = filter.end_ms {
            vals.push(Val::Big(end));
            sql.push_str(&format!(" AND created_ms < ${}", vals.len()));
        }
        sql.push_str(&format!(" ORDER BY partition, id LIMIT {}", size.max(1)));
        let read = |source| StateError::Read { key: "deliveries".into(), source };
        let client = self.client().await.map_err(read)?;
        let statement = client.prepare_cached(&sql).await.map_err(|e| read(store_error(e)))?;
        let params = params(&vals);
        let rows =
            client.query(&statement, &refs(&params)).await.map_err(|e| read(store_error(e)))?;
        let full = rows.len() >= size.max(1);
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in rows {
            let value: Vec<u8> = row.get(0);
            deliveries.push(super::decode::<Delivery>("deliveries", &value)?);
        }
        let next = deliveries.last().filter(|_| full).map(|d| (d.partition, d.id.clone()));
        Ok(DeliveryPage { deliveries, next })
    }
}

/// Sends every delivery written after version `from` until the receiver goes away. Versions
/// are taken when a transaction starts, so one may commit after a later one: each read looks
/// back over a window of versions and skips what it sent already.
async fn watch(
    pool: Pool,
    mut from: i64,
    sender: tokio::sync::mpsc::Sender<StateResult<Delivery>>,
) {
    const WINDOW: i64 = 10_000;
    let start = from;
    let mut sent: HashSet<(String, i64)> = HashSet::new();
    loop {
        tokio::select! {
            _ = sender.closed() => return,
            _ = tokio::time::sleep(WATCH_POLL) => {}
        }
        let rows = async {
            let client = pool.get().await.map_err(pool_error)?;
            client
                .query(
                    "SELECT id, version, value FROM deliveries WHERE version > $1 ORDER BY version LIMIT 5000",
                    &[&(from - WINDOW).max(start)],
                )
                .await
                .map_err(store_error)
        }
        .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(source) => {
                let _ =
                    sender.send(Err(StateError::Read { key: "deliveries".into(), source })).await;
                return;
            }
        };
        for row in rows {
            let id: String = row.get(0);
            let version: i64 = row.get(1);
            if !sent.insert((id, version)) {
                continue;
            }
            from = from.max(version);
            let value: Vec<u8> = row.get(2);
            if let Ok(delivery) = serde_json::from_slice(&value)
                && sender.send(Ok(delivery)).await.is_err()
            {
                return;
            }
        }
        sent.retain(|(_, version)| *version > from - WINDOW);
    }
}

/// A partition's inbox on PostgreSQL, read on a notification and every [`INBOX_POLL`]: it
/// returns each entry once, in the order of the transactions that wrote them.
///
/// A read takes, in one statement, the rows whose writing transaction is at or after `from`,
/// and the snapshot's `xmin`: every transaction before it has ended, so its rows are visible
/// now or never, and a transaction still open has an id at or after it. Once a read has seen
/// everything, the next starts at the smallest `xmin` seen since the previous such read. A
/// backlog larger than a page is read page by page after the last row read. Rows read twice
/// are recognised by id.
struct PgInbox {
    pool: Pool,
    partition: PartitionId,
    wake: Arc<Notify>,
    /// The transaction id reads start at.
    from: i64,
    /// While reading a backlog page by page: the last row read, as (transaction, id).
    after: Option<(i64, String)>,
    /// The smallest `xmin` seen since `from` last moved.
    xmin: i64,
    /// Entries returned whose transaction is at or after `from`, by id, with that transaction.
    seen: HashMap<String, i64>,
    first: bool,
}

impl PgInbox {
    fn new(pool: Pool, partition: PartitionId, wake: Arc<Notify>) -> Self {
        Self {
            pool,
            partition,
            wake,
            from: 0,
            after: None,
            xmin: i64::MAX,
            seen: HashMap::new(),
            first: true,
        }
    }

    /// Reads the entries not returned yet, a page at most.
    async fn read_new(&mut self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let statement = client
            .prepare_cached(
                "WITH s AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8 AS xmin)
                 SELECT s.xmin, i.id, i.value, i.xid FROM s LEFT JOIN LATERAL (
                     SELECT id, value, xid::text::int8 AS xid FROM inbox
                     WHERE partition = $1 AND xid >= $2::text::xid8
                       AND (xid > $3::text::xid8 OR (xid = $3::text::xid8 AND id > $4))
                     ORDER BY xid, id LIMIT $5
                 ) i ON true",
            )
            .await
            .map_err(store_error)?;
        // Real transaction ids start above 0.
        let (after_xid, after_id) = self.after.clone().unwrap_or((0, String::new()));
        let lower = self.from.max(after_xid);
        let params: [&(dyn ToSql + Sync); 5] = [
            &(self.partition as i32),
            &lower.to_string(),
            &after_xid.to_string(),
            &after_id,
            &INBOX_PAGE,
        ];
        let rows = client.query(&statement, &params).await.map_err(store_error)?;
        let xmin: i64 = rows.first().map_or(self.from, |row| row.get(0));
        if xmin < self.from {
            // Transaction ids never go back, except when the server lost its last commits in
            // a crash (not yet flushed, with synchronous_commit off) and hands their ids out
            // again: rows written since may sit below `from`. Everything is read again, as at
            // the start, and the worker drops what it held.
            tracing::warn!(
                partition = self.partition,
                xmin,
                from = self.from,
                "PostgreSQL's transaction ids went back (a crash lost commits); reading the inbox again"
            );
            self.from = 0;
            self.after = None;
            self.xmin = i64::MAX;
            self.seen.clear();
            self.first = true;
            return Ok(Vec::new());
        }
        self.xmin = self.xmin.min(xmin);
        let mut found = Vec::new();
        let mut returned = 0;
        let mut last = None;
        for row in rows {
            let Some(id) = row.get::<_, Option<String>>(1) else { continue };
            let xid: i64 = row.get(3);
            returned += 1;
            if self.seen.insert(id.clone(), xid).is_none() {
                found.push((id.clone(), row.get(2)));
            }
            last = Some((xid, id));
        }
        if returned >= INBOX_PAGE {
            self.after = last;
        } else {
            self.after = None;
            self.from = self.from.max(self.xmin);
            self.xmin = i64::MAX;
            let from = self.from;
            self.seen.retain(|_, xid| *xid >= from);
        }
        Ok(found)
    }
}

#[async_trait]
impl InboxFeed for PgInbox {
    async fn next(&mut self) -> StateResult<InboxBatch> {
        let partition = self.partition;
        let read = |source| StateError::Read { key: keys::inbox_prefix(partition), source };
        loop {
            if !self.first {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(INBOX_POLL) => {}
                }
            }
            let mut entries = self.read_new().await.map_err(read)?;
            if self.first && entries.is_empty() {
                // Read again from the start (see `read_new`): the whole inbox, at once.
                entries = self.read_new().await.map_err(read)?;
            }
            let entries: Vec<(Key, Vec<u8>)> = entries
                .into_iter()
                .map(|(id, value)| (Key::Inbox { partition, id }, value))
                .collect();
            let reset = std::mem::take(&mut self.first);
            if reset || !entries.is_empty() {
                return Ok(InboxBatch { entries, reset, revision: 0 });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_positions_parse_back() {
        let timer = super::super::TimerRef { partition: 3, due_ms: 1_000, id: "t".into() };
        let at = super::super::timer_position(&timer);
        assert_eq!(timer_pos(3, &at), TimerPos::At(1_000, "t".into()));
        assert_eq!(
            timer_pos(3, &super::super::timer_after(&at)),
            TimerPos::After(1_000, "t".into())
        );
        assert_eq!(timer_pos(3, &super::super::timers_until(3, 2_000)), TimerPos::AfterDue(2_000));
        assert_eq!(timer_pos(3, &super::super::timers_start(3)), TimerPos::Start);
    }

    #[test]
    fn urls_keep_their_tls_settings_apart() {
        let (_, root, mode) =
            parse_url("postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem").expect("url");
        assert_eq!((root.as_deref(), mode.as_str()), (Some("/ca.pem"), "require"));
        let error = parse_url("postgres://u@h/db?sslmode=sometimes").expect_err("mode");
        assert!(error.to_string().contains("sslmode"), "{error}");
    }
}
