//! One Tidings node: opens the store, serves the gRPC API, and shuts down in order.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use tidings_api::v1;
use tidings_scheduler::cluster::{Cluster, ClusterOptions};
use tidings_scheduler::coordination::{Coordination, until_reachable};
use tidings_scheduler::defs::Cache;
use tidings_scheduler::delivery::dispatch::{DispatchOptions, Dispatcher};
use tidings_scheduler::engine::CampaignEngine;
use tidings_scheduler::secrets::Cipher;
use tidings_scheduler::state::State;
use tidings_scheduler::template::Templates;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{
    CampaignApi, ClusterApi, ContactApi, DeliveryApi, EventApi, TokenApi, WebhookApi,
};
use crate::auth::{AuthLayer, OpenServices, Tokens};

use crate::config::Config;

/// The name of the generated secrets key file in the data directory.
const KEY_FILE: &str = "secrets.key";

/// A running node.
#[derive(Debug)]
pub struct Node {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Node {
    /// Opens the store and starts serving; returns once the listener is bound.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        // The key first: a missing key should not wait for an etcd connection to be reported.
        let cipher = load_cipher(&config)?;
        let coordination = open_coordination(&config).await?;
        let state = open_state(&config, &coordination).await?;
        Self::serve(config, cipher, coordination, state).await
    }

    /// Starts serving on a store the caller opened (tests wrap one to inject faults), which
    /// also holds the partitions' state; the configuration's store settings are not used.
    pub async fn start_on(config: Config, coordination: Coordination) -> anyhow::Result<Self> {
        let cipher = load_cipher(&config)?;
        let state = coordination.embedded_state();
        Self::serve(config, cipher, coordination, state).await
    }

    async fn serve(
        config: Config,
        cipher: Cipher,
        coordination: Coordination,
        state: State,
    ) -> anyhow::Result<Self> {
        let templates = Arc::new(Templates::new());

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tidings_api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building the reflection service")?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tidings_api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("building the reflection service")?;

        let tls = config.grpc.tls.files();
        let tls = match tls {
            Some(files) => {
                let initial = crate::tls::load(&files)?;
                Some((files, initial))
            }
            None => None,
        };
        let listener = TcpListener::bind(config.grpc.listen)
            .await
            .with_context(|| format!("grpc.listen: cannot listen on {}", config.grpc.listen))?;
        let addr = listener.local_addr()?;

        // The cluster stops after the API: calls in flight may still need their partitions.
        let cluster_shutdown = CancellationToken::new();
        let advertise = &config.cluster.advertise;
        let cluster_options = ClusterOptions {
            node_id: config.node.id.clone(),
            address: if advertise.is_empty() { addr.to_string() } else { advertise.clone() },
            partitions: config.partitions(),
            lease_ttl: config.cluster.lease_ttl,
            handoff_timeout: config.cluster.handoff_timeout,
            live_nodes: Arc::new(std::sync::atomic::AtomicUsize::new(1)),
            max_in_flight: config.delivery.max_in_flight_per_partition,
        };
        let caches_stop = CancellationToken::new();
        // The node's own background tasks, waited for at shutdown.
        let background = tokio_util::task::TaskTracker::new();
        let webhook_defs = coordination.webhooks();
        let webhook_cache = Cache::start(webhook_defs.clone(), caches_stop.clone()).await?;
        let campaign_cache = Cache::start(coordination.campaigns(), caches_stop.clone()).await?;
        let live_nodes = Arc::new(std::sync::atomic::AtomicUsize::new(1));
        let dispatch_options = DispatchOptions {
            allow: config.delivery.allow_networks.iter().filter_map(|n| n.parse().ok()).collect(),
            circuit_threshold: config.delivery.circuit_threshold,
            circuit_cooldown: config.delivery.circuit_cooldown,
            disable_after: config.delivery.disable_after,
            proxy: (!config.delivery.proxy.is_empty()).then(|| config.delivery.proxy.clone()),
            ports: config.delivery.ports.clone(),
            roots: match config.delivery.ca_file.as_str() {
                "" => Vec::new(),
                file => vec![
                    std::fs::read(file)
                        .with_context(|| format!("delivery.ca_file: cannot read {file}"))?,
                ],
            },
        };
        let dispatcher = Dispatcher::new(
            webhook_cache.clone(),
            webhook_defs.clone(),
            cipher.clone(),
            config.node.id.clone(),
            live_nodes.clone(),
            dispatch_options,
        )
        .map_err(|e| anyhow::anyhow!("building the HTTP client: {e}"))?;
        let cluster_options = ClusterOptions { live_nodes, ..cluster_options };
        let retention = config.delivery.retention;
        let engine_parts = (
            coordination.clone(),
            state.clone(),
            campaign_cache.clone(),
            webhook_cache.clone(),
            templates.clone(),
            cipher.clone(),
            dispatcher.clone(),
        );
        let (cluster, cluster_task) = Cluster::start(
            &coordination,
            state.clone(),
            move |partitions| {
                let (coordination, state, campaigns, webhooks, templates, cipher, dispatcher) =
                    engine_parts;
                Arc::new(CampaignEngine::new(
                    &coordination,
                    state,
                    campaigns,
                    webhooks,
                    templates,
                    cipher,
                    dispatcher,
                    partitions,
                    retention,
                ))
            },
            cluster_options,
            cluster_shutdown.clone(),
        )
        .await
        .context("joining the cluster")?;

        let webhooks = Arc::new(WebhookApi::new(
            webhook_defs.clone().read_your_writes(&webhook_cache),
            coordination.campaigns(),
            cipher.clone(),
            templates.clone(),
            dispatcher.clone(),
        ));
        let ingest = tidings_scheduler::app::Ingest::new(
            state.clone(),
            cluster.partitions(),
            config.events.idempotency_retention,
        );
        let events = EventApi::new(ingest.clone(), cluster.partitions());
        let cluster_api = Arc::new(ClusterApi::new(cluster.clone()));
        // Stops with the definition caches, after the API.
        background.spawn(tidings_scheduler::app::sweep_idempotency_keys(
            ingest.clone(),
            cluster.clone(),
            caches_stop.clone(),
        ));
        let streams = crate::api::Streams::new(config.grpc.max_streams);
        let campaigns = Arc::new(
            CampaignApi::new(
                &coordination,
                state.clone(),
                cluster.partitions(),
                templates.clone(),
                cipher.clone(),
                streams.clone(),
            )
            .read_your_writes(&campaign_cache),
        );
        let deliveries = Arc::new(DeliveryApi::new(
            tidings_scheduler::app::Deliveries::new(
                state.clone(),
                ingest.clone(),
                cluster.partitions(),
            ),
            streams,
        ));
        let contacts =
            Arc::new(ContactApi::new(&coordination, state.clone(), cluster.partitions()));

        let tokens = Tokens::start(&coordination, caches_stop.clone())
            .await
            .context("loading the tokens")?;
        let auth = if config.auth_enabled() {
            let path = config.node.data_dir.join("admin.token");
            if tokens.bootstrap(&path).await.with_context(|| {
                format!("node.data_dir: cannot write the first admin token to {}", path.display())
            })? {
                info!(file = %path.display(), "auth is on; the first admin token is in this file");
            } else {
                info!("auth is on; calls need `authorization: Bearer <token>`");
            }
            Some(tokens.clone())
        } else {
            info!(
                %addr,
                "auth is off: anyone who can reach this address may call every method \
                 (auth.enabled turns it on)"
            );
            None
        };
        let open = OpenServices {
            health: config.auth.open_health,
            reflection: config.auth.open_reflection,
        };
        let token_api = TokenApi::new(tokens);

        let services: [&str; 8] = [
            "tidings.v1.TokenService",
            "tidings.v1.WebhookService",
            "tidings.v1.ContactService",
            "tidings.v1.SegmentService",
            "tidings.v1.CampaignService",
            "tidings.v1.EventService",
            "tidings.v1.DeliveryService",
            "tidings.v1.ClusterService",
        ];
        for service in services.iter().copied().chain([""]) {
            health_reporter.set_service_status(service, tonic_health::ServingStatus::Serving).await;
        }

        let shutdown = CancellationToken::new();
        let mut routes = tonic::service::Routes::builder();
        routes
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(v1::webhook_service_server::WebhookServiceServer::from_arc(
                webhooks.clone(),
            ))
            .add_service(v1::contact_service_server::ContactServiceServer::from_arc(
                contacts.clone(),
            ))
            .add_service(v1::segment_service_server::SegmentServiceServer::from_arc(
                contacts.clone(),
            ))
            .add_service(v1::campaign_service_server::CampaignServiceServer::from_arc(
                campaigns.clone(),
            ))
            .add_service(v1::event_service_server::EventServiceServer::new(events))
            .add_service(v1::delivery_service_server::DeliveryServiceServer::from_arc(
                deliveries.clone(),
            ))
            .add_service(v1::cluster_service_server::ClusterServiceServer::from_arc(
                cluster_api.clone(),
            ))
            .add_service(v1::token_service_server::TokenServiceServer::new(token_api));
        // The auth layer checks every gRPC call; the call layer (spans, durations) wraps it so
        // that refused calls are recorded too. Console pages check the same scopes themselves.
        let grpc = routes
            .routes()
            .into_axum_router()
            .layer(AuthLayer::new(auth.clone(), open))
            .layer(crate::telemetry::RpcLayer);
        let console = config.console.enabled.then(|| {
            crate::console::Console::new(
                crate::console::Services {
                    webhooks,
                    contacts,
                    campaigns,
                    deliveries,
                    cluster: cluster_api,
                    dispatcher: dispatcher.clone(),
                },
                auth.clone(),
                open,
                cipher.derive("console csrf"),
                tls.is_some() && config.console.address().is_none(),
            )
        });
        let console_here = console.is_some() && config.console.address().is_none();
        let app = match &console {
            Some(console) if console_here => console.router().fallback_service(grpc),
            _ => grpc,
        };
        if let (Some(console), Some(listen)) = (&console, config.console.address()) {
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("console.listen: cannot listen on {listen}"))?;
            info!(addr = %listener.local_addr()?, "console listening");
            let router = console.router();
            let stop = shutdown.clone();
            background.spawn(async move {
                let served =
                    axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned());
                if let Err(error) = served.await {
                    warn!(%error, "the console listener stopped");
                }
            });
        }
        let router = tonic::transport::Server::builder()
            .accept_http1(console_here)
            .add_routes(tonic::service::Routes::from(app));

        let mode = if config.cluster_mode() { "cluster" } else { "embedded" };
        let client_certificates = tls.as_ref().is_some_and(|(files, _)| files.client_ca.is_some());
        info!(
            %addr,
            mode,
            node = %config.node.id,
            tls = tls.is_some(),
            client_certificates,
            console = console_here,
            "grpc listening"
        );

        let token = shutdown.clone();
        let grace = config.grpc.shutdown_grace;
        let handoff = config.cluster.handoff_timeout;
        let task = tokio::spawn(async move {
            let stopping = token.clone();
            let signal = async move {
                stopping.cancelled().await;
                // Tell load balancers first, then stop accepting calls.
                for service in services.iter().copied().chain([""]) {
                    health_reporter
                        .set_service_status(service, tonic_health::ServingStatus::NotServing)
                        .await;
                }
                info!("shutting down");
            };
            type Serving = std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
            >;
            let serve: Serving = match tls {
                Some((files, initial)) => {
                    let incoming = crate::tls::incoming(listener, files, initial, token.clone());
                    Box::pin(router.serve_with_incoming_shutdown(incoming, signal))
                }
                None => {
                    // Responses larger than a segment would otherwise wait for the client's
                    // delayed ACK.
                    let incoming = TcpListenerStream::new(listener).map(|stream| {
                        if let Ok(stream) = &stream {
                            let _ = stream.set_nodelay(true);
                        }
                        stream
                    });
                    Box::pin(router.serve_with_incoming_shutdown(incoming, signal))
                }
            };
            tokio::pin!(serve);
            tokio::select! {
                result = &mut serve => result.context("grpc server failed")?,
                _ = async { token.cancelled().await; tokio::time::sleep(grace).await } => {
                    warn!(?grace, "calls still in flight after the shutdown grace; stopping anyway");
                }
            }
            cluster_shutdown.cancel();
            caches_stop.cancel();
            let bound = handoff + std::time::Duration::from_secs(2);
            if tokio::time::timeout(bound, cluster_task).await.is_err() {
                warn!(?bound, "leaving the cluster took too long");
            }
            background.close();
            if tokio::time::timeout(std::time::Duration::from_secs(2), background.wait())
                .await
                .is_err()
            {
                warn!("background tasks still running 2 s after the cluster was left");
            }
            drop(coordination);
            info!("stopped");
            Ok(())
        });
        Ok(Self { addr, shutdown, task })
    }

    /// Returns the address the gRPC API listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns a token that stops the node when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops the node gracefully and waits until it has stopped.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the node stops (after its shutdown token is cancelled).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("node task panicked")?
    }
}

async fn open_coordination(config: &Config) -> anyhow::Result<Coordination> {
    if config.cluster_mode() {
        Coordination::etcd(config.etcd.options(), config.node.start_timeout).await.with_context(
            || format!("etcd.endpoints: cannot reach etcd at {}", config.etcd.endpoints.join(",")),
        )
    } else {
        let dir = &config.node.data_dir;
        crate::files::private_dir(dir)
            .with_context(|| format!("node.data_dir: cannot create {}", dir.display()))?;
        let file = dir.join("tidings.redb");
        let coordination = Coordination::embedded(&file).with_context(|| {
            format!("node.data_dir: cannot open the store in {}", dir.display())
        })?;
        crate::files::restrict(&file, 0o600)
            .with_context(|| format!("node.data_dir: cannot restrict {}", file.display()))?;
        Ok(coordination)
    }
}

/// Opens the state layer: PostgreSQL in cluster mode, the embedded store otherwise.
async fn open_state(config: &Config, coordination: &Coordination) -> anyhow::Result<State> {
    if !config.cluster_mode() {
        return Ok(coordination.embedded_state());
    }
    let deadline = tokio::time::Instant::now() + config.node.start_timeout;
    // Each session says which node it serves, in pg_stat_activity and to triggers.
    let options = tidings_scheduler::state::postgres::PgOptions {
        application_name: format!("tidings/{}", config.node.id),
        ..config.postgres.options()
    };
    until_reachable("PostgreSQL", deadline, || State::postgres(options.clone()))
        .await
        .context("postgres.url: cannot open PostgreSQL")
}

fn load_cipher(config: &Config) -> anyhow::Result<Cipher> {
    let secrets = &config.secrets;
    if !secrets.key.is_empty() {
        return Cipher::from_base64(&secrets.key).context("secrets.key");
    }
    if !secrets.key_file.is_empty() {
        let key = std::fs::read_to_string(&secrets.key_file)
            .with_context(|| format!("secrets.key_file: cannot read {}", secrets.key_file))?;
        return Cipher::from_base64(&key)
            .with_context(|| format!("secrets.key_file: {}", secrets.key_file));
    }
    if config.cluster_mode() {
        bail!(
            "secrets.key: required in cluster mode (every node needs the same key); \
             set TIDINGS_SECRETS__KEY to the output of `openssl rand -base64 32`"
        );
    }
    let path = config.node.data_dir.join(KEY_FILE);
    if path.exists() {
        let key = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return Cipher::from_base64(&key).with_context(|| format!("{}", path.display()));
    }
    let key = Cipher::generate_key();
    crate::files::private_dir(&config.node.data_dir).with_context(|| {
        format!("node.data_dir: cannot create {}", config.node.data_dir.display())
    })?;
    crate::files::write_private(&path, key.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    info!(path = %path.display(), "generated a secrets key");
    Cipher::from_base64(&key).context("generated key")
}
