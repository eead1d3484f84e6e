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
    /// Logging.
    pub log: LogConfig,
}

/// The `[node]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node identifier; generated when empty.
    pub id: String,
    /// Data directory.
    pub data_dir: PathBuf,
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
#[derive(Clone, Debug, Serialize, Deserialize)]
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
        }
    }
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
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError(format!("config file {} does not exist", file.display())));
            }
            figment = figment.merge(Toml::file(file));
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
        if self.delivery.circuit_threshold == 0 {
            return Err(ConfigError("delivery.circuit_threshold: must be at least 1".into()));
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
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError(format!("log.level: {error}")));
        }
        Ok(())
    }

    /// Returns whether the node runs on etcd (cluster mode).
    pub fn cluster_mode(&self) -> bool {
        !self.etcd.endpoints.is_empty()
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

    /// Returns the configuration as TOML, with the secrets key redacted.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        if !shown.secrets.key.is_empty() {
            shown.secrets.key = "[redacted]".into();
        }
        toml::to_string_pretty(&shown).unwrap_or_default()
    }
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
    fn cluster_mode_without_postgres_names_the_key() {
        let overrides =
            Overrides { etcd: Some(vec!["http://127.0.0.1:2379".into()]), ..Default::default() };
        let error = Config::load(None, &overrides).expect_err("no postgres").to_string();
        assert!(error.contains("postgres.url: required in cluster mode"), "{error}");
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
