//! The deployment files in `deploy/` start real nodes. Docker and Kubernetes are not needed:
//! the test reads the Dockerfile, the compose file and the Kubernetes manifests, and starts
//! nodes with exactly the arguments and environment they give (only hosts, secrets and mounted
//! files replaced by the test's own), so the files cannot drift from the binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_yaml::Value;
use tidings_tests::certs::{Authority, write};
use tidings_tests::{Etcd, NodeOptions, NodeProcess, free_port, node_binary, wait_until};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy().join(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

/// The final stage of the Dockerfile.
#[derive(Debug, Default)]
struct Image {
    build: String,
    env: BTreeMap<String, String>,
    user: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    healthcheck: Vec<String>,
    expose: Vec<u16>,
    copies: Vec<String>,
}

fn json_list(text: &str) -> Vec<String> {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{text:?} is not a JSON list: {e}"))
}

fn image() -> Image {
    let text = read("Dockerfile").replace("\\\n", " ");
    let mut image = Image::default();
    let mut stage = 0;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
        match instruction {
            "FROM" => stage += 1,
            "RUN" if stage == 1 => image.build.push_str(rest),
            "ENV" => {
                for pair in rest.split_whitespace() {
                    let (k, v) = pair.split_once('=').expect("ENV key=value");
                    image.env.insert(k.into(), v.into());
                }
            }
            "USER" => image.user = rest.into(),
            "ENTRYPOINT" => image.entrypoint = json_list(rest),
            "CMD" => image.cmd = json_list(rest),
            "HEALTHCHECK" => {
                image.healthcheck = json_list(rest.split_once("CMD").expect("CMD").1);
            }
            "EXPOSE" => {
                image.expose = rest.split_whitespace().map(|p| p.parse().expect("port")).collect()
            }
            "COPY" => image.copies.push(rest.into()),
            _ => {}
        }
    }
    image
}

fn port_of(listen: &str) -> u16 {
    listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("host:port")
}

/// Runs `tidings serve --dump-config` with these arguments and environment; returns the
/// effective configuration.
fn dump_config(args: &[String], env: &BTreeMap<String, String>) -> toml::Table {
    let output = Command::new(node_binary())
        .arg("serve")
        .args(args)
        .arg("--dump-config")
        .env_clear()
        .envs(env)
        .output()
        .expect("run the node binary");
    assert!(
        output.status.success(),
        "the node refuses {args:?} with {env:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).parse().expect("TOML")
}

fn seconds(config: &toml::Table, section: &str, key: &str) -> u64 {
    let text = config[section][key].as_str().expect("a duration");
    humantime::parse_duration(text).expect("duration").as_secs()
}

/// Runs a health check command (`tidings health`) as the container runtime would.
fn probe(command: &[String], env: &BTreeMap<String, String>) -> (bool, String) {
    assert_eq!(command[0], "tidings", "the probe runs the binary on the image's PATH");
    let output = Command::new(node_binary())
        .args(&command[1..])
        .env_clear()
        .envs(env)
        .output()
        .expect("run the probe");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success() && text.contains("SERVING"), text)
}

fn grpcurl() -> PathBuf {
    std::env::var_os("GRPCURL").map_or_else(|| PathBuf::from("grpcurl"), PathBuf::from)
}

/// Lists the cluster's nodes through `node` over TLS with the admin token.
fn list_nodes(node: &NodeProcess, ca: &Path, token: &str) -> String {
    let output = Command::new(grpcurl())
        .args(["-cacert", &ca.display().to_string(), "-servername", "localhost"])
        .args(["-H", &format!("authorization: Bearer {token}"), "-max-time", "5"])
        .arg(node.addr().to_string())
        .arg("tidings.v1.ClusterService/ListNodes")
        .output()
        .expect("grpcurl (scripts/test installs it)");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn admin_token(nodes: &[NodeProcess]) -> String {
    nodes
        .iter()
        .find_map(|n| std::fs::read_to_string(n.data_dir().join("admin.token")).ok())
        .expect("one node created the first admin token")
        .trim()
        .to_string()
}

/// Replaces the path prefixes of mounted files in every value.
fn remap(env: &mut BTreeMap<String, String>, mounts: &[(String, PathBuf)]) {
    for value in env.values_mut() {
        for (mount, dir) in mounts {
            if let Some(rest) = value.strip_prefix(mount.as_str()) {
                *value = format!("{}{rest}", dir.display());
            }
        }
    }
}

fn string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("{other:?} is not a scalar"),
    }
}

fn strings(value: &Value) -> Vec<String> {
    value.as_sequence().map(|s| s.iter().map(string).collect()).unwrap_or_default()
}

#[test]
fn the_image_runs_the_node_binary_as_an_unprivileged_user() {
    let image = image();
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/Cargo.toml"))
            .expect("server manifest");
    assert!(manifest.contains("[[bin]]\nname = \"tidings\""), "the binary is called tidings");
    assert!(
        image.build.contains("cargo build --release --locked -p tidings-server"),
        "{}",
        image.build
    );
    assert!(
        image.copies.iter().any(|c| c.ends_with("/usr/local/bin/tidings")),
        "{:?}",
        image.copies
    );
    let uid = image.user.split(':').next().expect("uid");
    assert!(uid != "0" && uid != "root" && !uid.is_empty(), "USER {}", image.user);
    assert_eq!(image.entrypoint, ["tidings"]);
    assert_eq!(image.healthcheck, ["tidings", "health"]);
    for key in ["TIDINGS_GRPC__LISTEN", "TIDINGS_METRICS__LISTEN"] {
        assert!(image.expose.contains(&port_of(&image.env[key])), "{key} is exposed");
    }
    // The image's command and environment are accepted as they are.
    let config = dump_config(&image.cmd[1..], &image.env);
    assert_eq!(config["metrics"]["listen"].as_str(), Some("0.0.0.0:9464"));
    assert_eq!(config["node"]["data_dir"].as_str(), Some("/var/lib/tidings"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_file_starts_a_three_node_cluster_with_tls_and_tokens() {
    let image = image();
    let compose: Value = serde_yaml::from_str(&read("compose.yaml")).expect("compose.yaml");
    let services = compose["services"].as_mapping().expect("services");
    let names: Vec<String> = services.keys().map(string).collect();
    let nodes: Vec<&String> = names.iter().filter(|n| n.starts_with("tidings-")).collect();
    assert_eq!(nodes.len(), 3, "{names:?}");

    // What the certs service generates, the test generates with its own CA.
    let certs_script = strings(&compose["services"]["certs"]["command"]).join(" ");
    let dir = tempfile::tempdir().expect("dir");
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).expect("certs dir");
    let ca = Authority::new("compose CA").expect("CA");
    let mut names_in_cert = vec!["localhost", "127.0.0.1"];
    for node in &nodes {
        assert!(certs_script.contains(&format!("DNS:{node}")), "the certificate names {node}");
        names_in_cert.push(node);
    }
    let (cert, key) = ca.issue(&names_in_cert).expect("issue");
    for (name, contents) in [("node.crt", &cert), ("node.key", &key), ("ca.crt", &ca.pem)] {
        assert!(certs_script.contains(name), "the certs service writes {name}");
        write(&certs, name, contents).expect("write");
    }
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(&secrets).expect("secrets dir");
    for (name, secret) in compose["secrets"].as_mapping().expect("secrets") {
        assert_eq!(string(&secret["file"]), "./secrets.key");
        write(&secrets, &string(name), tidings_tests::TEST_SECRETS_KEY).expect("write");
    }

    let etcd = Etcd::start().await.expect("etcd");
    let database =
        tidings_tests::postgres::shared().await.expect("postgres").database().await.expect("db");
    let mut started = Vec::new();
    let mut probes = Vec::new();
    for node in &nodes {
        let service = &compose["services"][node.as_str()];
        let command = strings(&service["command"]);
        assert_eq!(command.first().map(String::as_str), Some("serve"));
        let mut env = image.env.clone();
        for (k, v) in service["environment"].as_mapping().expect("environment") {
            env.insert(string(k), string(v));
        }
        // Hosts of the compose network, replaced by the test's servers.
        assert!(
            env["TIDINGS_ETCD__ENDPOINTS"].contains("//etcd:2379")
                && names.contains(&"etcd".into())
        );
        env.insert("TIDINGS_ETCD__ENDPOINTS".into(), format!("[\"{}\"]", etcd.endpoint()));
        assert!(
            env["TIDINGS_POSTGRES__URL"].contains("@postgres:5432/")
                && names.contains(&"postgres".into())
        );
        env.insert("TIDINGS_POSTGRES__URL".into(), database.clone());
        env.insert(
            "TIDINGS_METRICS__LISTEN".into(),
            format!("127.0.0.1:{}", free_port().expect("port")),
        );
        let mounts =
            [("/certs".to_string(), certs.clone()), ("/run/secrets".to_string(), secrets.clone())];
        for volume in strings(&service["volumes"]) {
            let target = volume.split(':').nth(1).expect("source:target");
            assert!(
                mounts.iter().any(|(m, _)| m == target) || target == env["TIDINGS_NODE__DATA_DIR"],
                "{volume} is a mount the test knows"
            );
        }
        for secret in strings(&service["secrets"]) {
            assert!(env["TIDINGS_SECRETS__KEY_FILE"].ends_with(&format!("/run/secrets/{secret}")));
        }
        remap(&mut env, &mounts);
        env.remove("TIDINGS_NODE__DATA_DIR");
        dump_config(&command[1..], &env);
        let started_node = NodeProcess::start(NodeOptions {
            env: env.clone().into_iter().collect(),
            args: command[1..].to_vec(),
            auth: true,
            ..Default::default()
        })
        .await
        .expect("node starts as compose starts it");
        let mut probe_env = env.clone();
        probe_env.insert(
            "TIDINGS_ENDPOINT".into(),
            format!("https://localhost:{}", started_node.addr().port()),
        );
        probes.push(probe_env);
        started.push(started_node);
    }
    for (node, env) in started.iter().zip(&probes) {
        let (healthy, out) = probe(&image.healthcheck, env);
        assert!(healthy, "the image's health check passes: {out}\n{}", node.logs());
    }
    let token = wait_until("the first admin token", Duration::from_secs(20), || async {
        Some(admin_token(&started)).filter(|t| !t.is_empty())
    })
    .await
    .expect("token");
    let listed = wait_until("three nodes in the cluster", Duration::from_secs(20), || async {
        let out = list_nodes(&started[0], &certs.join("ca.crt"), &token);
        nodes.iter().all(|n| out.contains(&format!("\"{n}\""))).then_some(out)
    })
    .await
    .expect("cluster formed");
    assert!(listed.contains("tidings-1:50051"), "nodes advertise their compose names: {listed}");

    // Prometheus scrapes each node's metrics port.
    let prometheus: Value = serde_yaml::from_str(&read("prometheus.yml")).expect("prometheus.yml");
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(string(&job["metrics_path"]), "/metrics");
    let targets = strings(&job["static_configs"][0]["targets"]);
    let port = port_of(&image.env["TIDINGS_METRICS__LISTEN"]);
    let expected: Vec<String> = nodes.iter().map(|n| format!("{n}:{port}")).collect();
    assert_eq!(targets, expected);
    // Grafana gets the dashboard and the data source its panels name.
    let grafana = strings(&compose["services"]["grafana"]["volumes"]);
    for volume in &grafana {
        let source = volume.split(':').next().expect("source");
        assert!(deploy().join(source).exists(), "{source} exists");
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/tidings.json")).expect("dashboard");
    let provisioned: Value =
        serde_yaml::from_str(&read("grafana/provisioning/datasources/prometheus.yaml"))
            .expect("datasource");
    assert_eq!(
        string(&provisioned["datasources"][0]["uid"]),
        dashboard["templating"]["list"][0]["current"]["value"].as_str().expect("uid")
    );
}

/// Returns the metric names of the README's metric table.
fn documented_metrics() -> std::collections::BTreeSet<String> {
    let readme = std::fs::read_to_string(deploy().join("../README.md")).expect("README.md");
    let start = readme.find("## Observability").expect("an Observability section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .flat_map(|l| {
            l.split('|')
                .nth(1)
                .unwrap_or_default()
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_dashboard_charts_documented_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/tidings.json")).expect("dashboard");
    let documented = documented_metrics();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| !w.ends_with("_id"))
                .filter(|w| {
                    w.starts_with("tidings_")
                        || w.starts_with("http_client_")
                        || w.starts_with("rpc_server_")
                })
                .collect();
            assert!(!names.is_empty(), "{expr}");
            for name in names {
                let base = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(name);
                assert!(
                    documented.contains(base) || documented.contains(name),
                    "panel {:?} charts {name}, which the README does not document",
                    panel["title"]
                );
            }
        }
    }
    for title in ["latency", "error", "backlog", "Timer lag", "Circuit", "Ownership"] {
        assert!(
            panels.iter().any(|p| p["title"]
                .as_str()
                .is_some_and(|t| t.to_lowercase().contains(&title.to_lowercase()))),
            "a panel about {title}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_manifests_start_a_node_with_tls_tokens_and_probes() {
    let image = image();
    let mut documents = Vec::new();
    let kustomization: Value =
        serde_yaml::from_str(&read("kubernetes/kustomization.yaml")).expect("kustomization");
    let resources = strings(&kustomization["resources"]);
    let mut files: Vec<String> = std::fs::read_dir(deploy().join("kubernetes"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|f| f != "kustomization.yaml")
        .collect();
    files.sort();
    let mut listed = resources.clone();
    listed.sort();
    assert_eq!(listed, files, "kustomization.yaml lists every manifest");
    for file in &resources {
        let text = read(&format!("kubernetes/{file}"));
        for document in serde_yaml::Deserializer::from_str(&text) {
            documents.push(<Value as serde::Deserialize>::deserialize(document).expect("YAML"));
        }
    }
    let of_kind =
        |kind: &str| -> Vec<&Value> { documents.iter().filter(|d| d["kind"] == kind).collect() };
    let set = of_kind("StatefulSet")[0];
    let pod = &set["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert_eq!(set["spec"]["selector"]["matchLabels"], *labels);
    assert_eq!(set["spec"]["replicas"].as_u64(), Some(3));
    let affinity = &pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        [0]["podAffinityTerm"];
    assert_eq!(affinity["labelSelector"]["matchLabels"], *labels, "nodes spread over hosts");
    assert_eq!(string(&affinity["topologyKey"]), "kubernetes.io/hostname");
    let budget = of_kind("PodDisruptionBudget")[0];
    assert_eq!(budget["spec"]["selector"]["matchLabels"], *labels);
    assert_eq!(budget["spec"]["maxUnavailable"].as_u64(), Some(1));
    for service in of_kind("Service") {
        assert_eq!(service["spec"]["selector"], *labels);
    }
    let uid = image.user.split(':').next().expect("uid");
    assert_eq!(string(&pod["spec"]["securityContext"]["runAsUser"]), uid);

    let container = &pod["spec"]["containers"][0];
    let args = strings(&container["args"]);
    assert_eq!(args.first().map(String::as_str), Some("serve"));
    for port in container["ports"].as_sequence().expect("ports") {
        let key = match string(&port["name"]).as_str() {
            "grpc" => "TIDINGS_GRPC__LISTEN",
            "metrics" => "TIDINGS_METRICS__LISTEN",
            other => panic!("unknown port {other}"),
        };
        assert_eq!(port["containerPort"].as_u64(), Some(port_of(&image.env[key]) as u64));
    }

    // The test's servers and files stand in for the cluster's.
    let mut etcd = Etcd::start_tls().await.expect("etcd over TLS");
    let etcd_user = "tidings";
    let etcd_password = "etcd-password-for-test";
    {
        // The node's etcd user may read and write its prefix only.
        let tls = etcd.tls().expect("tls");
        let read = |path: &Path| std::fs::read(path).expect("etcd TLS file");
        let options = etcd_client::ConnectOptions::new().with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)))
                .identity(etcd_client::Identity::from_pem(
                    read(&tls.client_cert),
                    read(&tls.client_key),
                )),
        );
        let mut client = etcd_client::Client::connect([etcd.endpoint()], Some(options))
            .await
            .expect("etcd client");
        client.role_add("tidings").await.expect("role");
        let prefix = etcd_client::Permission::read_write("/tidings/").with_prefix();
        client.role_grant_permission("tidings", prefix).await.expect("permission");
        client.user_add(etcd_user, etcd_password, None).await.expect("user");
        client.user_grant_role(etcd_user, "tidings").await.expect("grant");
    }
    etcd.enable_auth("root", "root-password-for-test").await.expect("etcd auth");
    let database =
        tidings_tests::postgres::shared().await.expect("postgres").database().await.expect("db");
    let collector = tidings_tests::otlp::Collector::start().await.expect("collector");
    let secret_values: BTreeMap<(&str, &str), String> = [
        (("tidings", "etcd-password"), etcd_password.to_string()),
        (("tidings", "postgres-url"), database.clone()),
        (("tidings", "secrets-key"), tidings_tests::TEST_SECRETS_KEY.to_string()),
    ]
    .into_iter()
    .collect();
    let dir = tempfile::tempdir().expect("dir");
    let ca = Authority::new("kubernetes CA").expect("CA");
    let (cert, key) = ca.issue(&["localhost", "tidings", "127.0.0.1"]).expect("issue");
    let etcd_files = etcd.tls().expect("tls");
    let text = |path: &Path| std::fs::read_to_string(path).expect("etcd TLS file");
    let (etcd_ca, etcd_cert, etcd_key) =
        (text(&etcd_files.ca), text(&etcd_files.client_cert), text(&etcd_files.client_key));
    let secret_files: BTreeMap<&str, Vec<(&str, &str)>> = [
        (
            "tidings-tls",
            vec![
                ("tls.crt", cert.as_str()),
                ("tls.key", key.as_str()),
                ("ca.crt", ca.pem.as_str()),
            ],
        ),
        (
            "tidings-etcd-tls",
            vec![
                ("ca.crt", etcd_ca.as_str()),
                ("tls.crt", etcd_cert.as_str()),
                ("tls.key", etcd_key.as_str()),
            ],
        ),
    ]
    .into_iter()
    .collect();
    let volumes = pod["spec"]["volumes"].as_sequence().expect("volumes");
    let mut mounts = Vec::new();
    for mount in container["volumeMounts"].as_sequence().expect("mounts") {
        let name = string(&mount["name"]);
        let path = string(&mount["mountPath"]);
        if name == "data" {
            assert_eq!(
                path, image.env["TIDINGS_NODE__DATA_DIR"],
                "the data volume is the data dir"
            );
            continue;
        }
        let volume = volumes.iter().find(|v| string(&v["name"]) == name).expect("volume");
        let secret = string(&volume["secret"]["secretName"]);
        let local = dir.path().join(&name);
        std::fs::create_dir_all(&local).expect("dir");
        for (file, contents) in &secret_files[secret.as_str()] {
            write(&local, file, contents).expect("write");
        }
        mounts.push((path, local));
    }
    let mut env = image.env.clone();
    for var in container["env"].as_sequence().expect("env") {
        let name = string(&var["name"]);
        let value = if let Some(value) = var.get("value") {
            let mut value = string(value);
            for (k, v) in &env {
                value = value.replace(&format!("$({k})"), v);
            }
            value
        } else if let Some(field) = var["valueFrom"].get("fieldRef") {
            assert_eq!(string(&field["fieldPath"]), "metadata.name");
            "tidings-0".to_string()
        } else {
            let secret = &var["valueFrom"]["secretKeyRef"];
            let (name, key) = (string(&secret["name"]), string(&secret["key"]));
            secret_values[&(name.as_str(), key.as_str())].clone()
        };
        env.insert(name, value);
    }
    assert_eq!(env["TIDINGS_NODE__ID"], "tidings-0");
    assert_eq!(env["TIDINGS_ETCD__USERNAME"], etcd_user);
    assert!(env["TIDINGS_ETCD__ENDPOINTS"].starts_with("[\"https://"));
    env.insert("TIDINGS_ETCD__ENDPOINTS".into(), format!("[\"{}\"]", etcd.endpoint()));
    env.insert("OTEL_EXPORTER_OTLP_ENDPOINT".into(), collector.endpoint());
    env.insert("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into());
    env.insert(
        "TIDINGS_METRICS__LISTEN".into(),
        format!("127.0.0.1:{}", free_port().expect("port")),
    );
    remap(&mut env, &mounts);
    env.remove("TIDINGS_NODE__DATA_DIR");

    // The grace period covers a graceful stop: calls in flight, then the handoff.
    let config = dump_config(&args[1..], &env);
    let needed =
        seconds(&config, "grpc", "shutdown_grace") + seconds(&config, "cluster", "handoff_timeout");
    let grace = pod["spec"]["terminationGracePeriodSeconds"].as_u64().expect("grace period");
    assert!(grace > needed, "terminationGracePeriodSeconds {grace} must exceed {needed}");

    let node = NodeProcess::start(NodeOptions {
        env: env.clone().into_iter().collect(),
        args: args[1..].to_vec(),
        auth: true,
        ..Default::default()
    })
    .await
    .expect("the node starts as the StatefulSet starts it");
    env.insert("TIDINGS_ENDPOINT".into(), format!("https://localhost:{}", node.addr().port()));
    for probe_kind in ["readinessProbe", "livenessProbe"] {
        let command = strings(&container[probe_kind]["exec"]["command"]);
        let (healthy, out) = probe(&command, &env);
        assert!(healthy, "{probe_kind} passes: {out}\n{}", node.logs());
    }
    let token = wait_until("the first admin token", Duration::from_secs(20), || async {
        Some(admin_token(std::slice::from_ref(&node))).filter(|t| !t.is_empty())
    })
    .await
    .expect("token");
    let listed = list_nodes(&node, &mounts[0].1.join("ca.crt"), &token);
    assert!(
        listed.contains("\"tidings-0\"") && listed.contains("tidings-0.tidings-peers:50051"),
        "{listed}"
    );
    // Its traces reach the collector the manifest names, under the pod's name.
    wait_until("spans from tidings-0", Duration::from_secs(20), || async {
        collector
            .resources()
            .iter()
            .any(|r| {
                tidings_tests::otlp::attribute(r, "service.instance.id").as_deref()
                    == Some("tidings-0")
            })
            .then_some(())
    })
    .await
    .expect("spans exported");
}

#[test]
fn the_health_check_fails_with_one_line_naming_the_node() {
    let port = free_port().expect("port");
    let endpoint = format!("http://127.0.0.1:{port}");
    let output = Command::new(node_binary())
        .args(["health", "--endpoint", &endpoint, "--timeout", "2s"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with(&format!("tidings: {endpoint}: ")), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    let output = Command::new(node_binary())
        .args(["health", "--endpoint", "not a url"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--endpoint"), "{stderr}");
}
