//! [`Store`] on etcd, for clusters.
//!
//! Every key is stored under the configured prefix, which is stripped again on the way out, so
//! several Tidings clusters (or tests) can share one etcd. Unary calls are bounded by the request
//! timeout and fail with [`StoreError::Unavailable`] when etcd does not answer in time. Watches
//! resume by themselves after a broken stream, from the revision after the last one delivered,
//! so a watcher sees no gap; only a compacted history ends a watch.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, DeleteOptions, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, TxnOpResponse, WatchOptions,
};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{
    Compare, CompareOp, CompareTarget, EventKind, KeyValue, LeaseId, Op, OpResult, RangePage,
    Revision, Store, StoreError, StoreResult, Txn, TxnResult, WatchBatch, WatchEvent, WatchStream,
    prefix_end,
};

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Client URLs, for example `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Prefix of every key Tidings writes, for example `/tidings/`.
    pub prefix: String,
    /// Longest wait for one unary call before it fails as unavailable.
    pub request_timeout: Duration,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// TLS to `https://` endpoints.
    pub tls: EtcdTls,
    /// User name and password, when etcd has authentication enabled.
    pub user: Option<(String, String)>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/tidings/".into(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            tls: EtcdTls::default(),
            user: None,
        }
    }
}

/// TLS to etcd: the CA its certificate chains to (the system's roots when `None`), and a
/// client certificate for an etcd started with `--client-cert-auth`.
#[derive(Clone, Debug, Default)]
pub struct EtcdTls {
    /// PEM CA bundle.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate and its key.
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl EtcdTls {
    fn options(&self) -> StoreResult<etcd_client::TlsOptions> {
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read(path).map_err(|e| {
                StoreError::InvalidRequest(format!("{what}: cannot read {}: {e}", path.display()))
            })
        };
        let mut tls = etcd_client::TlsOptions::new();
        match &self.ca_file {
            Some(ca) => {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(
                    ca,
                    "etcd.tls.ca_file",
                )?));
            }
            None => tls = tls.with_webpki_roots(),
        }
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(etcd_client::Identity::from_pem(
                read(cert, "etcd.tls.cert_file")?,
                read(key, "etcd.tls.key_file")?,
            ));
        }
        Ok(tls)
    }
}

/// [`Store`] on etcd; see the module documentation.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// A connection of its own for watches: a burst of watch events then cannot delay the
    /// answers to reads and transactions behind HTTP/2 flow control on a shared connection.
    watch_client: Client,
    prefix: Vec<u8>,
    timeout: Duration,
    /// Open keep-alive streams by lease. The lock is held across one renewal round trip so that
    /// two renewals of the same lease do not interleave their request and response.
    keepers: std::sync::Arc<Mutex<HashMap<LeaseId, (LeaseKeeper, LeaseKeepAliveStream)>>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("prefix", &String::from_utf8_lossy(&self.prefix)).finish()
    }
}

fn map_error(error: etcd_client::Error) -> StoreError {
    use etcd_client::Error;
    use tonic::Code;
    match error {
        Error::GRpcStatus(status) => {
            let message = format!("etcd: {}", status.message());
            match status.code() {
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => {
                    StoreError::Unavailable(message)
                }
                Code::ResourceExhausted => StoreError::Exhausted(message),
                _ if status.message().contains("space exceeded") => StoreError::Exhausted(message),
                Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                    StoreError::InvalidRequest(message)
                }
                Code::NotFound if status.message().contains("lease") => {
                    StoreError::LeaseNotFound(0)
                }
                Code::Unknown
                    if status.message().contains("transport")
                        || status.message().contains("connect") =>
                {
                    StoreError::Unavailable(message)
                }
                _ => StoreError::Internal(message),
            }
        }
        Error::TransportError(e) => StoreError::Unavailable(format!("etcd transport: {e}")),
        Error::IoError(e) => StoreError::Unavailable(format!("etcd io: {e}")),
        Error::LeaseKeepAliveError(e) if e.contains("not found") => StoreError::LeaseNotFound(0),
        Error::LeaseKeepAliveError(e) | Error::WatchError(e) => {
            StoreError::Unavailable(format!("etcd stream: {e}"))
        }
        other => StoreError::Internal(format!("etcd: {other}")),
    }
}

fn with_lease(error: StoreError, lease: LeaseId) -> StoreError {
    match error {
        StoreError::LeaseNotFound(_) => StoreError::LeaseNotFound(lease),
        other => other,
    }
}

impl EtcdStore {
    /// Connects to etcd and checks that it answers.
    pub async fn connect(options: EtcdOptions) -> StoreResult<Self> {
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        if options.endpoints.iter().any(|e| e.starts_with("https://")) {
            connect = connect.with_tls(options.tls.options()?);
        }
        if let Some((name, password)) = &options.user {
            connect = connect.with_user(name, password).with_auto_token_refresh(true);
        }
        let connect_one = || async {
            tokio::time::timeout(
                options.connect_timeout + options.request_timeout,
                Client::connect(&options.endpoints, Some(connect.clone())),
            )
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "etcd at {} did not answer",
                    options.endpoints.join(",")
                ))
            })?
            .map_err(map_error)
        };
        let client = connect_one().await?;
        let watch_client = connect_one().await?;
        let store = Self {
            client,
            watch_client,
            prefix: options.prefix.into_bytes(),
            timeout: options.request_timeout,
            keepers: Default::default(),
        };
        store.revision().await?;
        Ok(store)
    }

    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> StoreResult<T> {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!("etcd did not answer within {:?}", self.timeout))
            })?
            .map_err(map_error)
    }

    /// Reads a range, linearizable or from the member's own state (`serializable`).
    async fn read_range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        serializable: bool,
    ) -> StoreResult<RangePage> {
        let mut client = self.client.clone();
        let mut options = GetOptions::new().with_range(self.full_end(end));
        if limit > 0 {
            options = options.with_limit(limit as i64);
        }
        if serializable {
            options = options.with_serializable();
        }
        let response = self.call(client.get(self.full(start), Some(options))).await?;
        Ok(RangePage {
            kvs: response.kvs().iter().map(|kv| self.key_value(kv)).collect(),
            more: response.more(),
            revision: response.header().map_or(0, |h| h.revision()),
        })
    }

    fn full(&self, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(&self.prefix);
        full.extend_from_slice(key);
        full
    }

    fn full_end(&self, end: &[u8]) -> Vec<u8> {
        if end == [0] { prefix_end(&self.prefix) } else { self.full(end) }
    }

    fn key_value(&self, kv: &etcd_client::KeyValue) -> KeyValue {
        KeyValue {
            key: kv.key().get(self.prefix.len()..).unwrap_or_default().to_vec(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
            lease: kv.lease(),
        }
    }

    fn compare(&self, compare: &Compare) -> etcd_client::Compare {
        use etcd_client::CompareOp as Etcd;
        let op = match compare.op {
            CompareOp::Equal => Etcd::Equal,
            CompareOp::NotEqual => Etcd::NotEqual,
            CompareOp::Less => Etcd::Less,
            CompareOp::Greater => Etcd::Greater,
        };
        let key = self.full(&compare.key);
        match &compare.target {
            CompareTarget::Value(value) => etcd_client::Compare::value(key, op, value.clone()),
            CompareTarget::CreateRevision(r) => etcd_client::Compare::create_revision(key, op, *r),
            CompareTarget::ModRevision(r) => etcd_client::Compare::mod_revision(key, op, *r),
            CompareTarget::Version(v) => etcd_client::Compare::version(key, op, *v),
        }
    }

    fn op(&self, op: &Op) -> etcd_client::TxnOp {
        match op {
            Op::Put { key, value, lease } => {
                let options = (*lease != 0).then(|| PutOptions::new().with_lease(*lease));
                etcd_client::TxnOp::put(self.full(key), value.clone(), options)
            }
            Op::Delete { key } => etcd_client::TxnOp::delete(self.full(key), None),
            Op::DeletePrefix { prefix } => etcd_client::TxnOp::delete(
                self.full(prefix),
                Some(DeleteOptions::new().with_range(self.full_end(&prefix_end(prefix)))),
            ),
            Op::Get { key } => etcd_client::TxnOp::get(self.full(key), None),
        }
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &[u8]) -> StoreResult<Option<KeyValue>> {
        let mut client = self.client.clone();
        let response = self.call(client.get(self.full(key), None)).await?;
        Ok(response.kvs().first().map(|kv| self.key_value(kv)))
    }

    async fn range(&self, start: &[u8], end: &[u8], limit: usize) -> StoreResult<RangePage> {
        self.read_range(start, end, limit, false).await
    }

    async fn get_many_since(
        &self,
        keys: &[Vec<u8>],
        at_least: Revision,
    ) -> StoreResult<Vec<Option<KeyValue>>> {
        // A few keys: serializable reads in parallel, answered from the member's own state
        // without a consensus round. Many keys: one linearizable transaction of reads costs
        // etcd less than as many requests.
        const PARALLEL: usize = 8;
        if keys.len() > PARALLEL {
            return self.get_many(keys).await;
        }
        let reads =
            keys.iter().map(|key| {
                let mut client = self.client.clone();
                let key = self.full(key);
                async move {
                    self.call(client.get(key, Some(GetOptions::new().with_serializable()))).await
                }
            });
        let mut found = Vec::with_capacity(keys.len());
        for response in futures::future::join_all(reads).await {
            let response = response?;
            if response.header().map_or(0, |h| h.revision()) < at_least {
                return self.get_many(keys).await;
            }
            found.push(response.kvs().first().map(|kv| self.key_value(kv)));
        }
        Ok(found)
    }

    async fn range_since(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        at_least: Revision,
    ) -> StoreResult<RangePage> {
        let page = self.read_range(start, end, limit, true).await?;
        if page.revision < at_least {
            return self.range(start, end, limit).await;
        }
        Ok(page)
    }

    async fn count(&self, start: &[u8], end: &[u8]) -> StoreResult<u64> {
        let mut client = self.client.clone();
        let options = GetOptions::new().with_range(self.full_end(end)).with_count_only();
        let response = self.call(client.get(self.full(start), Some(options))).await?;
        Ok(response.count().max(0) as u64)
    }

    async fn txn(&self, txn: Txn) -> StoreResult<TxnResult> {
        txn.check_limits()?;
        let lease = txn
            .then
            .iter()
            .chain(&txn.otherwise)
            .find_map(|op| match op {
                Op::Put { lease, .. } if *lease != 0 => Some(*lease),
                _ => None,
            })
            .unwrap_or(0);
        let request = etcd_client::Txn::new()
            .when(txn.when.iter().map(|c| self.compare(c)).collect::<Vec<_>>())
            .and_then(txn.then.iter().map(|op| self.op(op)).collect::<Vec<_>>())
            .or_else(txn.otherwise.iter().map(|op| self.op(op)).collect::<Vec<_>>());
        let mut client = self.client.clone();
        let response = self.call(client.txn(request)).await.map_err(|e| with_lease(e, lease))?;
        let results = response
            .op_responses()
            .into_iter()
            .map(|result| match result {
                TxnOpResponse::Put(_) => OpResult::Put,
                TxnOpResponse::Delete(d) => OpResult::Delete(d.deleted().max(0) as u64),
                TxnOpResponse::Get(g) => {
                    OpResult::Get(g.kvs().first().map(|kv| self.key_value(kv)))
                }
                TxnOpResponse::Txn(_) => OpResult::Put,
            })
            .collect();
        Ok(TxnResult {
            succeeded: response.succeeded(),
            revision: response.header().map_or(0, |h| h.revision()),
            results,
        })
    }

    async fn watch(&self, prefix: &[u8], start_revision: Revision) -> StoreResult<WatchStream> {
        // Unbounded: a consumer that falls behind must not stop this task from reading its
        // stream, or the unread data would hold the connection's flow-control window and
        // stall every other watch.
        let (sender, receiver) = mpsc::unbounded_channel();
        let store = self.clone();
        let full_prefix = self.full(prefix);
        // Pin "from now" to a revision so a reconnect before the first event cannot skip any.
        let start_revision =
            if start_revision > 0 { start_revision } else { self.revision().await? + 1 };
        // Opening the first stream here makes a compacted start revision fail the call itself.
        let first = store.open_watch(&full_prefix, start_revision).await?;
        // The task lives as long as the returned stream: it stops when the receiver is dropped.
        tokio::spawn(async move {
            store.pump_watch(full_prefix, start_revision, first, sender).await;
        });
        Ok(Box::pin(UnboundedReceiverStream::new(receiver)))
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        let seconds = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let mut client = self.client.clone();
        Ok(self.call(client.lease_grant(seconds, None)).await?.id())
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> StoreResult<Duration> {
        let mut keepers = self.keepers.lock().await;
        for fresh in [false, true] {
            if fresh || !keepers.contains_key(&lease) {
                let mut client = self.client.clone();
                let keeper = self
                    .call(client.lease_keep_alive(lease))
                    .await
                    .map_err(|e| with_lease(e, lease))?;
                keepers.insert(lease, keeper);
            }
            let Some((keeper, stream)) = keepers.get_mut(&lease) else {
                continue;
            };
            let renewed = self
                .call(async {
                    keeper.keep_alive().await?;
                    stream.message().await
                })
                .await;
            match renewed {
                Ok(Some(response)) if response.ttl() > 0 => {
                    return Ok(Duration::from_secs(response.ttl() as u64));
                }
                Ok(Some(_)) => {
                    keepers.remove(&lease);
                    return Err(StoreError::LeaseNotFound(lease));
                }
                Err(StoreError::LeaseNotFound(_)) => {
                    keepers.remove(&lease);
                    return Err(StoreError::LeaseNotFound(lease));
                }
                // The stream broke (etcd restarted, connection reset): open a fresh one once.
                Ok(None) | Err(_) if !fresh => {
                    keepers.remove(&lease);
                }
                Ok(None) => {
                    keepers.remove(&lease);
                    return Err(StoreError::Unavailable(
                        "etcd closed the keep-alive stream".into(),
                    ));
                }
                Err(error) => {
                    keepers.remove(&lease);
                    return Err(with_lease(error, lease));
                }
            }
        }
        Err(StoreError::Unavailable("lease keep-alive failed".into()))
    }

    async fn lease_time_left(&self, lease: LeaseId) -> StoreResult<Option<Duration>> {
        let mut client = self.client.clone();
        let response = self.call(client.lease_time_to_live(lease, None)).await?;
        Ok((response.ttl() > 0).then(|| Duration::from_secs(response.ttl() as u64)))
    }

    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        self.keepers.lock().await.remove(&lease);
        let mut client = self.client.clone();
        self.call(client.lease_revoke(lease)).await.map_err(|e| with_lease(e, lease))?;
        Ok(())
    }

    async fn revision(&self) -> StoreResult<Revision> {
        let mut client = self.client.clone();
        // A range over one key that no one writes returns the store revision in its header.
        let response = self.call(client.get(self.full(b"\0revision"), None)).await?;
        Ok(response.header().map_or(0, |h| h.revision()))
    }
}

impl EtcdStore {
    async fn open_watch(
        &self,
        prefix: &[u8],
        start_revision: Revision,
    ) -> StoreResult<etcd_client::WatchStream> {
        let mut options = WatchOptions::new().with_range(prefix_end(prefix));
        if start_revision > 0 {
            options = options.with_start_revision(start_revision);
        }
        let mut client = self.watch_client.clone();
        let mut stream = self.call(client.watch(prefix.to_vec(), Some(options))).await?;
        // The first response confirms creation; etcd reports a compacted start revision in a
        // message after it. A read at the start revision tells at once whether one is coming.
        let created = self.call(stream.message()).await?;
        if let Some(response) = &created
            && response.compact_revision() == 0
            && start_revision > 0
            && start_revision <= response.header().map_or(0, |h| h.revision())
        {
            let probe = GetOptions::new().with_revision(start_revision).with_count_only();
            let mut client = self.client.clone();
            if let Err(StoreError::InvalidRequest(message)) =
                self.call(client.get(prefix.to_vec(), Some(probe))).await
                && message.contains("compacted")
            {
                let compact_revision =
                    match tokio::time::timeout(self.timeout, stream.message()).await {
                        Ok(Ok(Some(response))) => response.compact_revision(),
                        _ => 0,
                    };
                return Err(StoreError::Compacted { compact_revision });
            }
        }
        match created {
            Some(response) if response.compact_revision() > 0 => {
                Err(StoreError::Compacted { compact_revision: response.compact_revision() })
            }
            Some(response) if response.canceled() => Err(StoreError::Unavailable(format!(
                "etcd cancelled the watch: {}",
                response.cancel_reason()
            ))),
            Some(_) => Ok(stream),
            None => Err(StoreError::Unavailable("etcd closed the watch stream".into())),
        }
    }

    /// Forwards watch responses until the receiver goes away or the history is compacted,
    /// reopening the etcd stream after a failure from the revision after the last one sent.
    async fn pump_watch(
        &self,
        prefix: Vec<u8>,
        start_revision: Revision,
        first: etcd_client::WatchStream,
        sender: mpsc::UnboundedSender<StoreResult<WatchBatch>>,
    ) {
        let mut next = start_revision;
        let mut stream = Some(first);
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let mut current = match stream.take() {
                Some(current) => current,
                None => {
                    let reopened = tokio::select! {
                        _ = sender.closed() => return,
                        reopened = self.open_watch(&prefix, next) => reopened,
                    };
                    match reopened {
                        Ok(current) => {
                            backoff.reset();
                            current
                        }
                        Err(error @ StoreError::Compacted { .. }) => {
                            let _ = sender.send(Err(error));
                            return;
                        }
                        Err(error) => {
                            tracing::debug!(%error, "watch reconnect failed");
                            tokio::select! {
                                _ = sender.closed() => return,
                                _ = backoff.wait() => {}
                            }
                            continue;
                        }
                    }
                }
            };
            loop {
                let message = tokio::select! {
                    _ = sender.closed() => return,
                    message = current.message() => message,
                };
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) | Err(_) => break,
                };
                if response.compact_revision() > 0 {
                    let compact_revision = response.compact_revision();
                    let _ = sender.send(Err(StoreError::Compacted { compact_revision }));
                    return;
                }
                if response.canceled() {
                    break;
                }
                let events: Vec<WatchEvent> = response
                    .events()
                    .iter()
                    .filter_map(|event| {
                        let kv = self.key_value(event.kv()?);
                        let kind = match event.event_type() {
                            EventType::Put => EventKind::Put,
                            EventType::Delete => EventKind::Delete,
                        };
                        Some(WatchEvent { kind, kv })
                    })
                    .collect();
                let Some(last) = events.last().map(|e| e.kv.mod_revision) else {
                    continue;
                };
                next = last + 1;
                if sender.send(Ok(WatchBatch { revision: last, events })).is_err() {
                    return;
                }
            }
            tracing::debug!(next, "watch stream broke; resuming");
        }
    }
}
