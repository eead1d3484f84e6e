//! The node process: health, reflection, configuration errors, graceful shutdown.

use std::process::Command;

use tidings_client::tonic::transport::Channel;
use tidings_tests::{NodeOptions, NodeProcess};
use tokio_stream::StreamExt;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_list_every_service() {
    let node = NodeProcess::start(NodeOptions::default()).await.expect("node");
    let channel = Channel::from_shared(node.url()).expect("url").connect().await.expect("connect");
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "tidings.v1.WebhookService", "tidings.v1.EventService"] {
        let status = health
            .check(HealthCheckRequest { service: service.into() })
            .await
            .expect("health")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses.next().await.expect("a response").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "tidings.v1.WebhookService",
        "tidings.v1.ContactService",
        "tidings.v1.SegmentService",
        "tidings.v1.CampaignService",
        "tidings.v1.EventService",
        "tidings.v1.DeliveryService",
        "tidings.v1.ClusterService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == service), "{service} missing from {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_node_cleanly() {
    let mut node = NodeProcess::start(NodeOptions::default()).await.expect("node");
    node.terminate().await.expect("exit 0 on SIGTERM");
    assert!(node.logs().contains("stopped"));
}

fn serve(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let output = Command::new(tidings_tests::node_binary())
        .arg("serve")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run the binary");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn bad_configuration_stops_the_process_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("tidings.toml");
    std::fs::write(&file, "[grpc]\nlisten = 5\n").expect("write");
    let (ok, out) = serve(&["--config", file.to_str().expect("utf-8")], &[]);
    assert!(!ok);
    assert!(out.contains("grpc.listen"), "{out}");

    std::fs::write(&file, "[grpc]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"yaml\"\n")
        .expect("write");
    let (ok, out) = serve(&["--config", file.to_str().expect("utf-8")], &[]);
    assert!(!ok);
    assert!(out.contains("log.format"), "{out}");

    let (ok, out) = serve(&["--listen", "nowhere"], &[]);
    assert!(!ok);
    assert!(out.contains("grpc.listen"), "{out}");

    let (ok, out) = serve(&["--dump-config"], &[("TIDINGS_ETCD__REQUEST_TIMEOUT", "forever")]);
    assert!(!ok);
    assert!(out.contains("etcd.request_timeout"), "{out}");

    let (ok, out) = serve(&["--etcd", "127.0.0.1:2379", "--dump-config"], &[]);
    assert!(!ok);
    assert!(out.contains("etcd.endpoints"), "{out}");
}

#[test]
fn dump_config_shows_every_layer_and_hides_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("tidings.toml");
    std::fs::write(&file, "[etcd]\nprefix = \"/from-file/\"\n").expect("write");
    let (ok, out) = serve(
        &["--config", file.to_str().expect("utf-8"), "--listen", "127.0.0.1:6000", "--dump-config"],
        &[
            ("TIDINGS_LOG__LEVEL", "debug"),
            ("TIDINGS_SECRETS__KEY", tidings_tests::TEST_SECRETS_KEY),
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("prefix = \"/from-file/\""), "{out}");
    assert!(out.contains("listen = \"127.0.0.1:6000\""), "{out}");
    assert!(out.contains("level = \"debug\""), "{out}");
    assert!(!out.contains(tidings_tests::TEST_SECRETS_KEY), "{out}");
}

#[test]
fn cluster_mode_requires_a_secrets_key() {
    let (ok, out) = serve(
        &[
            "--etcd",
            "http://127.0.0.1:1",
            "--postgres",
            "postgres://tidings@127.0.0.1:1/tidings",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert!(!ok);
    assert!(out.contains("secrets.key"), "{out}");
}

#[test]
fn cluster_mode_requires_postgres() {
    let (ok, out) = serve(&["--etcd", "http://127.0.0.1:1", "--listen", "127.0.0.1:0"], &[]);
    assert!(!ok);
    assert!(out.contains("postgres.url: required in cluster mode"), "{out}");
}

#[test]
fn unknown_keys_are_named_as_written() {
    let (ok, out) = serve(&["--dump-config"], &[("TIDINGS_FOO__BAR", "1")]);
    assert!(!ok);
    assert!(out.contains("unknown key foo.bar (from TIDINGS_FOO__BAR)"), "{out}");
    let (ok, out) = serve(&["--dump-config"], &[("TIDINGS_GRPC__LISTN", "127.0.0.1:1")]);
    assert!(!ok);
    assert!(
        out.contains("unknown key grpc.listn") && out.contains("did you mean grpc.listen?"),
        "{out}"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("tidings.toml");
    std::fs::write(&file, "[node]\nlisten = \"127.0.0.1:1\"\n").expect("write");
    let (ok, out) = serve(&["--config", file.to_str().expect("utf-8"), "--dump-config"], &[]);
    assert!(!ok);
    assert!(
        out.contains("unknown key node.listen") && out.contains("did you mean grpc.listen?"),
        "{out}"
    );
}

/// A cluster node started before its etcd waits for it, up to `node.start_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_etcd_waits_for_it() {
    let mut etcd = tidings_tests::Etcd::start().await.expect("etcd");
    etcd.kill();
    // Short timeouts per attempt, so that etcd stays down for several of them.
    let options = NodeOptions {
        etcd: Some(etcd.endpoint()),
        prefix: Some(tidings_tests::unique_prefix()),
        env: vec![
            ("TIDINGS_ETCD__CONNECT_TIMEOUT".into(), "300ms".into()),
            ("TIDINGS_ETCD__REQUEST_TIMEOUT".into(), "300ms".into()),
        ],
        ..Default::default()
    };
    let starting = tokio::spawn(NodeProcess::start(options));
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    etcd.restart().await.expect("etcd back");
    let node = starting.await.expect("task").expect("the node comes up once etcd does");
    assert!(node.logs().contains("does not answer yet"), "{}", node.logs());
}

#[test]
fn serve_help_lists_every_key_with_its_variable() {
    let (ok, out) = serve(&["--help"], &[]);
    assert!(ok, "{out}");
    for expected in [
        "grpc.listen",
        "TIDINGS_GRPC__LISTEN",
        "\"127.0.0.1:50051\"",
        "TIDINGS_POSTGRES__POOL_SIZE",
        "[grpc.tls]",
    ] {
        assert!(out.contains(expected), "{expected} missing:\n{out}");
    }
    let (ok, out) = serve(&["--dump-config"], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("listen = \"127.0.0.1:50051\"  # TIDINGS_GRPC__LISTEN"), "{out}");
}

#[test]
fn a_mistyped_flag_is_named_with_the_right_one() {
    let (ok, out) = serve(&["--lisen", "127.0.0.1:1"], &[]);
    assert!(!ok);
    assert!(out.contains("'--lisen'") && out.contains("'--listen'"), "{out}");
}

/// A cluster node started before its PostgreSQL waits for it, up to `node.start_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_postgresql_waits_for_it() {
    let etcd = tidings_tests::Etcd::start().await.expect("etcd");
    let mut postgres = tidings_tests::postgres::Postgres::start().await.expect("postgres");
    let url = postgres.database().await.expect("database");
    postgres.kill();
    let options = NodeOptions {
        etcd: Some(etcd.endpoint()),
        prefix: Some(tidings_tests::unique_prefix()),
        postgres: Some(url),
        env: vec![("TIDINGS_POSTGRES__CONNECT_TIMEOUT".into(), "300ms".into())],
        ..Default::default()
    };
    let starting = tokio::spawn(NodeProcess::start(options));
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    postgres.restart().await.expect("postgres back");
    let node = starting.await.expect("task").expect("the node comes up once PostgreSQL does");
    assert!(node.logs().contains("PostgreSQL does not answer yet"), "{}", node.logs());
}
