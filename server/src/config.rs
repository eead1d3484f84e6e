//! Node configuration: the commented defaults, then a file, then `TIDINGS_*` variables, then
//! flags. Loading fails with a message naming the key at fault.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The commented default configuration, as shipped.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// The whole configuration of a node.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node.
    pub node: NodeConfig,
    /// The gRPC API.
    pub grpc: GrpcConfig,
    /// Partitions and membership.
    pub cluster: ClusterConfig,
    /// Sending webhooks.
    pub delivery: DeliveryConfig,
    /// Accepting events.
    pub events: EventsConfig,
    /// etcd, for cluster mode.
    pub etcd: EtcdConfig,
    /// PostgreSQL, which holds the partition data in cluster mode.
    pub postgres: PostgresConfig,
    /// Encryption of secrets at rest.
    pub secrets: SecretsConfig,
    /// Tokens callers authenticate with.
    pub auth: AuthConfig,
    /// Logging.
    pub log: LogConfig,
    /// OpenTelemetry traces and metrics over OTLP.
    pub telemetry: TelemetryConfig,
    /// Prometheus metrics.
    pub metrics: MetricsConfig,
    /// The web console.
    pub console: ConsoleConfig,
}

/// The `[node]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node identifier; generated when empty.
    pub id: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// How long a starting node waits for etcd and PostgreSQL to answer.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
}

/// The `[grpc]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Longest wait for calls in flight at shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Most watch streams served at once.
    pub max_streams: usize,
    /// TLS of the listener.
    pub tls: GrpcTlsConfig,
}

/// The `[grpc.tls]` section: TLS when `cert_file` is set, mutual TLS with `client_ca_file`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcTlsConfig {
    /// PEM certificate chain.
    pub cert_file: String,
    /// PEM private key.
    pub key_file: String,
    /// PEM CA bundle client certificates must chain to.
    pub client_ca_file: String,
}

impl GrpcTlsConfig {
    /// Returns the files, or `None` for plaintext.
    pub fn files(&self) -> Option<crate::tls::TlsFiles> {
        if self.cert_file.is_empty() {
            return None;
        }
        Some(crate::tls::TlsFiles {
            cert: self.cert_file.clone().into(),
            key: self.key_file.clone().into(),
            client_ca: (!self.client_ca_file.is_empty())
                .then(|| self.client_ca_file.clone().into()),
        })
    }
}

/// The `[cluster]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Partition count of a new cluster; 0 for the mode's default
    /// ([`ClusterConfig::partitions_for`]).
    pub partitions: u32,
    /// Node lease time to live.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Bound of a handoff.
    #[serde(with = "humantime_serde")]
    pub handoff_timeout: Duration,
    /// Advertised address.
    pub advertise: String,
}

/// The `[delivery]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Internal networks webhooks may reach.
    pub allow_networks: Vec<String>,
    /// Failures that open a circuit.
    pub circuit_threshold: u32,
    /// Wait before a probe.
    #[serde(with = "humantime_serde")]
    pub circuit_cooldown: Duration,
    /// Failing time before a webhook is disabled.
    #[serde(with = "humantime_serde")]
    pub disable_after: Duration,
    /// How long finished deliveries are kept.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Proxy URL for every webhook request; none when empty.
    pub proxy: String,
    /// Ports webhooks may reach; any when empty.
    pub ports: Vec<u16>,
    /// PEM bundle of CAs trusted for webhook endpoints besides the Mozilla roots.
    pub ca_file: String,
    /// Attempts one partition keeps in flight on its node at most; past that its new events
    /// and run shards wait in its inbox.
    pub max_in_flight_per_partition: usize,
}

/// The `[events]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// How long idempotency keys are remembered.
    #[serde(with = "humantime_serde")]
    pub idempotency_retention: Duration,
}

/// The `[etcd]` section.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs; empty for embedded mode.
    pub endpoints: Vec<String>,
    /// Key prefix.
    pub prefix: String,
    /// Timeout of one request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Timeout of a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// User name, when etcd has authentication enabled.
    pub username: String,
    /// Password of `username`.
    pub password: String,
    /// TLS to `https://` endpoints.
    pub tls: EtcdTlsConfig,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("username", &self.username)
            .field("password", &if self.password.is_empty() { "" } else { "[redacted]" })
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl EtcdConfig {
    /// Returns the options of the etcd client.
    pub fn options(&self) -> tidings_scheduler::coordination::EtcdOptions {
        let path = |p: &str| (!p.is_empty()).then(|| std::path::PathBuf::from(p));
        tidings_scheduler::coordination::EtcdOptions {
            endpoints: self.endpoints.clone(),
            prefix: self.prefix.clone(),
            request_timeout: self.request_timeout,
            connect_timeout: self.connect_timeout,
            tls: tidings_scheduler::coordination::EtcdTls {
                ca_file: path(&self.tls.ca_file),
                identity: path(&self.tls.cert_file).zip(path(&self.tls.key_file)),
            },
            user: (!self.username.is_empty())
                .then(|| (self.username.clone(), self.password.clone())),
        }
    }
}

/// The `[etcd.tls]` section.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsConfig {
    /// PEM CA bundle etcd's certificate chains to; the system's roots when empty.
    pub ca_file: String,
    /// PEM client certificate, for an etcd that requires one.
    pub cert_file: String,
    /// PEM key of `cert_file`.
    pub key_file: String,
}

/// The `[postgres]` section.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://…` URL; required in cluster mode.
    pub url: String,
    /// Connections per node.
    pub pool_size: usize,
    /// Timeout of a connection (new, or from the pool).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Timeout of one statement.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("PostgresConfig").field("pool_size", &self.pool_size).finish_non_exhaustive()
    }
}

impl PostgresConfig {
    /// Returns the options of the state layer's PostgreSQL backend.
    pub fn options(&self) -> tidings_scheduler::state::postgres::PgOptions {
        tidings_scheduler::state::postgres::PgOptions {
            url: self.url.clone(),
            pool_size: self.pool_size,
            connect_timeout: self.connect_timeout,
            statement_timeout: self.statement_timeout,
            ..Default::default()
        }
    }
}

/// The `[auth]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether calls need a token; unset for the mode's default ([`Config::auth_enabled`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Whether `grpc.health.v1` answers without a token.
    pub open_health: bool,
    /// Whether server reflection answers without a token.
    pub open_reflection: bool,
}

/// The `[secrets]` section.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    /// Base64 key.
    pub key: String,
    /// File with the key.
    pub key_file: String,
}

impl std::fmt::Debug for SecretsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsConfig")
            .field("key", &if self.key.is_empty() { "" } else { "[redacted]" })
            .field("key_file", &self.key_file)
            .finish()
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// The `[log]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// Filter directives.
    pub level: String,
}

/// The `[telemetry]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP endpoint; `OTEL_EXPORTER_OTLP_ENDPOINT` when empty.
    pub otlp_endpoint: String,
    /// `grpc` or `http/protobuf`; `OTEL_EXPORTER_OTLP_PROTOCOL` when empty.
    pub otlp_protocol: String,
    /// `service.name`; `OTEL_SERVICE_NAME`, else `tidings`, when empty.
    pub service_name: String,
    /// How often metrics are exported over OTLP.
    #[serde(with = "humantime_serde")]
    pub metrics_interval: Duration,
}

/// The `[metrics]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address `/metrics` is served on; off when empty.
    pub listen: String,
}

impl MetricsConfig {
    /// Returns the address to serve `/metrics` on, when set.
    pub fn address(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }
}

/// The `[console]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Whether the node serves the console.
    pub enabled: bool,
    /// Address of a listener of its own (plain HTTP); on the gRPC port when empty.
    pub listen: String,
}

impl ConsoleConfig {
    /// Returns the console's own address, when set.
    pub fn address(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }
}

/// Values given as flags; `None` leaves the lower layers' value.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Overrides {
    /// `--node-id`.
    pub node_id: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<String>,
    /// `--etcd`, comma-separated.
    pub etcd: Option<Vec<String>>,
    /// `--etcd-prefix`.
    pub etcd_prefix: Option<String>,
    /// `--postgres`.
    pub postgres: Option<String>,
    /// `--log-format`.
    pub log_format: Option<String>,
    /// `--log-level`.
    pub log_level: Option<String>,
}

/// Configuration that could not be loaded, with the key at fault in the message.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Loads the configuration from the defaults, `file`, the environment and `overrides`.
    pub fn load(
        file: Option<&std::path::Path>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        let known = known_keys();
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError(format!("config file {} does not exist", file.display())));
            }
            if let Ok(text) = std::fs::read_to_string(file)
                && let Ok(value) = text.parse::<toml::Table>()
            {
                let mut keys = Vec::new();
                leaf_keys("", &toml::Value::Table(value), &mut keys);
                for key in keys {
                    check_known(&known, &key, &format!("{}", file.display()))?;
                }
            }
            figment = figment.merge(Toml::file(file));
        }
        for (name, _) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
            let Some(rest) = name.strip_prefix("TIDINGS_") else { continue };
            if !rest.contains("__") {
                continue;
            }
            let key = rest.to_ascii_lowercase().replace("__", ".");
            check_known(&known, &key, &name)?;
        }
        // Only `TIDINGS_<SECTION>__<KEY>` variables are configuration; other TIDINGS_*
        // variables (set for other tools) are left alone.
        figment = figment
            .merge(Env::prefixed("TIDINGS_").filter(|key| key.as_str().contains("__")).split("__"));
        figment = figment.merge(Serialized::defaults(flag_layer(overrides)));
        let config: Config = figment.extract().map_err(|error| {
            ConfigError(error.into_iter().map(|e| describe(&e)).collect::<Vec<_>>().join("; "))
        })?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        for endpoint in &self.etcd.endpoints {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(ConfigError(format!(
                    "etcd.endpoints: {endpoint:?} must be a URL starting with http:// or https://"
                )));
            }
        }
        if self.grpc.max_streams == 0 {
            return Err(ConfigError("grpc.max_streams: must be at least 1".into()));
        }
        let tls = &self.grpc.tls;
        if tls.cert_file.is_empty() != tls.key_file.is_empty() {
            return Err(ConfigError(
                "grpc.tls.cert_file and grpc.tls.key_file: give both for TLS, or neither".into(),
            ));
        }
        if tls.cert_file.is_empty() && !tls.client_ca_file.is_empty() {
            return Err(ConfigError(
                "grpc.tls.client_ca_file: needs grpc.tls.cert_file and grpc.tls.key_file".into(),
            ));
        }
        let etcd_tls = &self.etcd.tls;
        if etcd_tls.cert_file.is_empty() != etcd_tls.key_file.is_empty() {
            return Err(ConfigError(
                "etcd.tls.cert_file and etcd.tls.key_file: give both for a client certificate, \
                 or neither"
                    .into(),
            ));
        }
        let tls_set = !(etcd_tls.ca_file.is_empty() && etcd_tls.cert_file.is_empty());
        if tls_set && self.etcd.endpoints.iter().any(|e| e.starts_with("http://")) {
            return Err(ConfigError(
                "etcd.tls: set, but etcd.endpoints has http:// URLs; use https:// for TLS".into(),
            ));
        }
        if self.etcd.username.is_empty() && !self.etcd.password.is_empty() {
            return Err(ConfigError("etcd.password: set without etcd.username".into()));
        }
        if self.cluster.partitions > 4096 {
            return Err(ConfigError(format!(
                "cluster.partitions: {} must be between 1 and 4096, or 0 for the mode's default",
                self.cluster.partitions
            )));
        }
        if self.cluster.lease_ttl < Duration::from_secs(1)
            || self.cluster.lease_ttl > Duration::from_secs(300)
        {
            return Err(ConfigError("cluster.lease_ttl: must be between 1s and 5m".into()));
        }
        for network in &self.delivery.allow_networks {
            if let Err(reason) = network.parse::<tidings_scheduler::delivery::ssrf::Network>() {
                return Err(ConfigError(format!("delivery.allow_networks: {reason}")));
            }
        }
        if !self.delivery.proxy.is_empty()
            && let Err(error) = url::Url::parse(&self.delivery.proxy)
        {
            return Err(ConfigError(format!("delivery.proxy: not a URL: {error}")));
        }
        if self.delivery.ports.contains(&0) {
            return Err(ConfigError("delivery.ports: 0 is not a port".into()));
        }
        if self.delivery.circuit_threshold == 0 {
            return Err(ConfigError("delivery.circuit_threshold: must be at least 1".into()));
        }
        if self.delivery.max_in_flight_per_partition == 0 {
            return Err(ConfigError(
                "delivery.max_in_flight_per_partition: must be at least 1".into(),
            ));
        }
        if !self.etcd.endpoints.is_empty() && self.postgres.url.is_empty() {
            return Err(ConfigError(
                "postgres.url: required in cluster mode, where PostgreSQL holds the partition data \
                 (set --postgres or TIDINGS_POSTGRES__URL to postgres://user:password@host/database)"
                    .into(),
            ));
        }
        let url = &self.postgres.url;
        if !(url.is_empty() || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError(
                "postgres.url: must be a URL starting with postgres:// or postgresql://".into(),
            ));
        }
        if self.postgres.pool_size == 0 {
            return Err(ConfigError("postgres.pool_size: must be at least 1".into()));
        }
        if !self.etcd.endpoints.is_empty() && self.etcd.prefix.is_empty() {
            return Err(ConfigError("etcd.prefix: must not be empty".into()));
        }
        if !self.node.id.is_empty()
            && !self
                .node
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(ConfigError(format!(
                "node.id: {:?} may only contain letters, digits, '-', '_' and '.'",
                self.node.id
            )));
        }
        if !self.metrics.listen.is_empty() && self.metrics.address().is_none() {
            return Err(ConfigError(format!(
                "metrics.listen: {:?} is not an address such as 0.0.0.0:9464",
                self.metrics.listen
            )));
        }
        if !self.console.listen.is_empty() && self.console.address().is_none() {
            return Err(ConfigError(format!(
                "console.listen: {:?} is not an address such as 127.0.0.1:8080",
                self.console.listen
            )));
        }
        if self.telemetry.metrics_interval < Duration::from_secs(1) {
            return Err(ConfigError("telemetry.metrics_interval: must be at least 1s".into()));
        }
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError(format!("log.level: {error}")));
        }
        Ok(())
    }

    /// Returns whether the node runs on etcd (cluster mode).
    pub fn cluster_mode(&self) -> bool {
        !self.etcd.endpoints.is_empty()
    }

    /// Returns whether calls need a token: as configured, or by default on in cluster mode and
    /// whenever the API listens beyond loopback.
    pub fn auth_enabled(&self) -> bool {
        self.auth.enabled.unwrap_or(self.cluster_mode() || !self.grpc.listen.ip().is_loopback())
    }

    /// Returns the partition count a new cluster gets: the configured one, or for 0, 64 on
    /// etcd and 8 in embedded mode.
    pub fn partitions(&self) -> u32 {
        match self.cluster.partitions {
            0 if self.cluster_mode() => 64,
            0 => 8,
            n => n,
        }
    }

    /// Returns the configuration as TOML, with the secrets key redacted and each key's
    /// environment variable as a comment.
    pub fn to_toml(&self) -> String {
        let mut section = String::new();
        let mut out = String::new();
        for line in self.toml_only().lines() {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_string();
            }
            out.push_str(line);
            if let Some((key, _)) = line.split_once(" = ")
                && !line.starts_with(' ')
                && !section.is_empty()
            {
                out.push_str(&format!("  # {}", env_var(&format!("{section}.{key}"))));
            }
            out.push('\n');
        }
        out
    }

    fn toml_only(&self) -> String {
        let mut shown = self.clone();
        if !shown.secrets.key.is_empty() {
            shown.secrets.key = "[redacted]".into();
        }
        if !shown.etcd.password.is_empty() {
            shown.etcd.password = "[redacted]".into();
        }
        toml::to_string_pretty(&shown).unwrap_or_default()
    }
}

/// Returns the environment variable of a dotted key: `grpc.listen` → `TIDINGS_GRPC__LISTEN`.
pub fn env_var(key: &str) -> String {
    format!("TIDINGS_{}", key.to_ascii_uppercase().replace('.', "__"))
}

/// Every configuration key with its environment variable and default, by section, for
/// `tidings serve --help`.
pub fn keys_help() -> String {
    let defaults: toml::Table = DEFAULT_TOML.parse().unwrap_or_default();
    let mut out = String::from(
        "Configuration keys (file key, environment variable, default); flags above set some of \
         them.\nPrecedence, lowest first: defaults, --config file, environment, flags.\n",
    );
    let mut section = String::new();
    for key in known_keys() {
        let (head, _) = key.rsplit_once('.').unwrap_or(("", &key));
        if head != section {
            section = head.to_string();
            out.push_str(&format!("\n[{section}]\n"));
        }
        let mut value: Option<&toml::Value> = None;
        let mut table = Some(&defaults);
        for part in key.split('.') {
            value = table.and_then(|t| t.get(part));
            table = value.and_then(toml::Value::as_table);
        }
        let default = match value {
            Some(toml::Value::String(s)) if s.is_empty() => "(empty)".to_string(),
            Some(value) => value.to_string(),
            None if key == "auth.enabled" => {
                "(unset: on in cluster mode and off loopback)".to_string()
            }
            None => "(unset)".to_string(),
        };
        out.push_str(&format!("  {key:<32} {:<40} {default}\n", env_var(&key)));
    }
    out
}

/// Every configuration key, dotted (`grpc.listen`), from the commented defaults.
fn known_keys() -> Vec<String> {
    let mut keys = Vec::new();
    if let Ok(table) = DEFAULT_TOML.parse::<toml::Table>() {
        leaf_keys("", &toml::Value::Table(table), &mut keys);
    }
    // Keys without a default value, commented out in the defaults.
    keys.push("auth.enabled".into());
    keys.sort();
    keys
}

/// Collects the dotted paths of the values in `value` that are not tables.
fn leaf_keys(prefix: &str, value: &toml::Value, keys: &mut Vec<String>) {
    match value {
        toml::Value::Table(table) => {
            for (name, value) in table {
                let path =
                    if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
                leaf_keys(&path, value, keys);
            }
        }
        _ => keys.push(prefix.to_string()),
    }
}

/// Fails naming `key` as written (and where it came from) when it is not a configuration key,
/// with the closest key when one is close.
fn check_known(known: &[String], key: &str, source: &str) -> Result<(), ConfigError> {
    if known.iter().any(|k| k == key) {
        return Ok(());
    }
    // The same key in another section first (`node.listen` for `grpc.listen`), from the
    // section the defaults list first, then the key a typo away.
    let last = key.rsplit('.').next().unwrap_or(key);
    let listed_at = |k: &str| {
        let section = k.rsplit_once('.').map_or("", |(section, _)| section);
        DEFAULT_TOML.find(&format!("[{section}]")).unwrap_or(usize::MAX)
    };
    let closest = known
        .iter()
        .filter(|k| k.as_str() != key && k.rsplit('.').next() == Some(last))
        .min_by_key(|k| listed_at(k))
        .cloned()
        .or_else(|| {
            known
                .iter()
                .map(|k| (edit_distance(k, key), k))
                .filter(|(d, k)| *d <= 3.max(k.len() / 4))
                .min_by_key(|(d, _)| *d)
                .map(|(_, k)| k.clone())
        });
    let hint = closest.map(|k| format!("; did you mean {k}?")).unwrap_or_default();
    Err(ConfigError(format!("unknown key {key} (from {source}){hint}")))
}

/// Levenshtein distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = if ca == *cb { previous } else { 1 + previous.min(row[j]).min(current) };
            previous = current;
        }
    }
    row[b.len()]
}

/// Names the key and the source of a figment error.
fn describe(error: &figment::Error) -> String {
    let key = error.path.join(".");
    let source = error.metadata.as_ref().map(|m| m.name.to_string()).unwrap_or_default();
    let mut message = match error.kind {
        figment::error::Kind::UnknownField(ref field, _) => {
            let full = if key.is_empty() { field.clone() } else { format!("{key}.{field}") };
            return format!("unknown key {full}{}", from(&source));
        }
        ref kind => kind.to_string(),
    };
    if !key.is_empty() {
        message = format!("{key}: {message}");
    }
    format!("{message}{}", from(&source))
}

fn from(source: &str) -> String {
    if source.is_empty() { String::new() } else { format!(" (from {source})") }
}

/// Builds the nested layer of flag values, leaving out the ones not given.
fn flag_layer(overrides: &Overrides) -> serde_json::Value {
    use serde_json::{Map, Value};
    let mut root = Map::new();
    let mut set = |section: &str, key: &str, value: Value| {
        let entry = root.entry(section.to_string()).or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(map) = entry {
            map.insert(key.to_string(), value);
        }
    };
    if let Some(v) = &overrides.node_id {
        set("node", "id", v.clone().into());
    }
    if let Some(v) = &overrides.data_dir {
        set("node", "data_dir", v.display().to_string().into());
    }
    if let Some(v) = &overrides.listen {
        set("grpc", "listen", v.clone().into());
    }
    if let Some(v) = &overrides.etcd {
        set("etcd", "endpoints", v.clone().into());
    }
    if let Some(v) = &overrides.etcd_prefix {
        set("etcd", "prefix", v.clone().into());
    }
    if let Some(v) = &overrides.postgres {
        set("postgres", "url", v.clone().into());
    }
    if let Some(v) = &overrides.log_format {
        set("log", "format", v.clone().into());
    }
    if let Some(v) = &overrides.log_level {
        set("log", "level", v.clone().into());
    }
    Value::Object(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_describe_embedded_mode() {
        let config = Config::load(None, &Overrides::default()).expect("defaults load");
        assert_eq!(config.grpc.listen.to_string(), "127.0.0.1:50051");
        assert!(!config.cluster_mode());
    }

    #[test]
    fn flags_override_defaults() {
        let overrides = Overrides {
            listen: Some("127.0.0.1:0".into()),
            etcd: Some(vec!["http://127.0.0.1:2379".into()]),
            postgres: Some("postgres://tidings@127.0.0.1/tidings".into()),
            ..Default::default()
        };
        let config = Config::load(None, &overrides).expect("loads");
        assert_eq!(config.grpc.listen.port(), 0);
        assert!(config.cluster_mode());
    }

    #[test]
    fn auth_is_on_by_default_except_on_loopback_alone() {
        let config = Config::load(None, &Overrides::default()).expect("loads");
        assert!(!config.auth_enabled());
        let open = Overrides { listen: Some("0.0.0.0:50051".into()), ..Default::default() };
        assert!(Config::load(None, &open).expect("loads").auth_enabled());
        let cluster = Overrides {
            etcd: Some(vec!["http://127.0.0.1:2379".into()]),
            postgres: Some("postgres://tidings@127.0.0.1/tidings".into()),
            ..Default::default()
        };
        assert!(Config::load(None, &cluster).expect("loads").auth_enabled());
    }

    #[test]
    fn cluster_mode_without_postgres_names_the_key() {
        let overrides =
            Overrides { etcd: Some(vec!["http://127.0.0.1:2379".into()]), ..Default::default() };
        let error = Config::load(None, &overrides).expect_err("no postgres").to_string();
        assert!(error.contains("postgres.url: required in cluster mode"), "{error}");
    }

    /// The help lists every key the configuration has, so it stays in step with the struct.
    #[test]
    fn help_and_dump_list_every_key() {
        let mut config = Config::load(None, &Overrides::default()).expect("defaults");
        config.auth.enabled = Some(true);
        let mut keys = Vec::new();
        let value = toml::Value::try_from(&config).expect("serializes");
        leaf_keys("", &value, &mut keys);
        let help = keys_help();
        let dump = config.to_toml();
        let known = known_keys();
        for key in &keys {
            assert!(known.contains(key), "{key} is not a known key");
            assert!(help.contains(&format!("  {key} ")), "{key} missing from the help:\n{help}");
            assert!(dump.contains(&env_var(key)), "{key} has no variable in the dump:\n{dump}");
        }
        assert_eq!(keys.len(), known.len(), "{keys:?} vs {known:?}");
        assert!(help.contains("TIDINGS_GRPC__TLS__CERT_FILE"), "{help}");
    }

    #[test]
    fn unknown_keys_are_named_as_written_with_a_suggestion() {
        let known = known_keys();
        assert!(known.contains(&"grpc.tls.cert_file".to_string()), "{known:?}");
        let error = check_known(&known, "foo.bar", "TIDINGS_FOO__BAR").expect_err("unknown");
        assert_eq!(error.0, "unknown key foo.bar (from TIDINGS_FOO__BAR)");
        let error = check_known(&known, "grpc.listn", "TIDINGS_GRPC__LISTN").expect_err("typo");
        assert!(error.0.ends_with("did you mean grpc.listen?"), "{}", error.0);
        let error = check_known(&known, "node.listen", "tidings.toml").expect_err("section");
        assert!(error.0.contains("did you mean grpc.listen?"), "{}", error.0);
        assert!(check_known(&known, "auth.enabled", "env").is_ok());
    }

    #[test]
    fn a_bad_flag_names_its_key() {
        let overrides = Overrides { listen: Some("not an address".into()), ..Default::default() };
        let error = Config::load(None, &overrides).expect_err("bad address").to_string();
        assert!(error.contains("grpc.listen"), "{error}");
    }

    #[test]
    fn a_bad_file_names_the_key_and_unknown_keys_are_refused() {
        let dir = std::env::temp_dir().join(format!("tidings-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("bad.toml");
        std::fs::write(&file, "[grpc]\nshutdown_grace = \"soon\"\n").expect("write");
        let error = Config::load(Some(&file), &Overrides::default()).expect_err("bad").to_string();
        assert!(error.contains("grpc.shutdown_grace"), "{error}");
        std::fs::write(&file, "[grpc]\nlisten_addr = \"127.0.0.1:1\"\n").expect("write");
        let error = Config::load(Some(&file), &Overrides::default()).expect_err("bad").to_string();
        assert!(error.contains("grpc.listen_addr"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
