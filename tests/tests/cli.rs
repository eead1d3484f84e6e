//! The `tidings` command line against a real node: the README's section run as written, an
//! import of 100,000 contacts with progress and rejects, `tail` and `listen` following a real
//! run, and `--output json` parsed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tidings_tests::{NodeOptions, NodeProcess, free_port, node_binary, wait_until};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn loopback() -> NodeOptions {
    NodeOptions {
        env: vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into())],
        ..Default::default()
    }
}

/// What one run of the binary did.
struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn tidings(node: &NodeProcess, dir: &Path, args: &[&str]) -> Outcome {
    let output = Command::new(node_binary())
        .args(args)
        .current_dir(dir)
        .env("TIDINGS_ENDPOINT", node.url())
        .env_remove("TIDINGS_TOKEN")
        .output()
        .expect("run tidings");
    Outcome {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A long-running command (`listen`, `tail`) whose output, both streams, goes to a file.
struct Background {
    child: Child,
    log: PathBuf,
}

impl Background {
    fn start(program: &str, args: &[&str], dir: &Path, env: &[(&str, String)]) -> Self {
        let log = dir.join(format!("background-{}.log", free_port().expect("port")));
        let out = std::fs::File::create(&log).expect("log");
        let child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start");
        Self { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_for(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        wait_until(what, Duration::from_secs(20), || {
            let text = self.output();
            let found = check(&text).then_some(text);
            async move { found }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\noutput:\n{}", self.output()))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_command_line_runs_as_written() {
    let node = NodeProcess::start(loopback()).await.expect("node");
    let dir = tempfile::tempdir().expect("dir");
    let listen_port = free_port().expect("port").to_string();
    let statuses = dir.path().join("statuses");
    let prelude = format!(
        "tidings() {{ command {:?} \"$@\"; local s=$?; echo \"$s $*\" >> {:?}; return $s; }}\n",
        node_binary().display().to_string(),
        statuses.display().to_string()
    );
    let env = [("TIDINGS_ENDPOINT", node.url())];
    let mut background = Vec::new();
    let mut transcript = String::new();
    for block in tidings_tests::readme::sh_blocks("## The command line\n") {
        let block = block
            .replace("127.0.0.1:50051", &node.addr().to_string())
            .replace("8080", &listen_port);
        let script = format!("{prelude}{block}");
        if block.contains("tidings listen") || block.contains("tidings deliveries tail") {
            let started = Background::start("bash", &["-c", &script], dir.path(), &env);
            let ready =
                if block.contains("listen") { "listening on" } else { "following deliveries" };
            started.wait_for(ready, |text| text.contains(ready)).await;
            background.push(started);
            continue;
        }
        let output = Command::new("bash")
            .args(["-c", &script])
            .current_dir(dir.path())
            .env("TIDINGS_ENDPOINT", node.url())
            .output()
            .expect("bash");
        transcript.push_str(&String::from_utf8_lossy(&output.stdout));
        transcript.push_str(&String::from_utf8_lossy(&output.stderr));
    }
    let statuses = std::fs::read_to_string(&statuses).expect("statuses");
    let failed: Vec<&str> = statuses.lines().filter(|line| !line.starts_with("0 ")).collect();
    assert_eq!(
        failed,
        ["1 webhooks create -f -"],
        "only the mistake fails:\n{statuses}\n{transcript}"
    );
    for expected in [
        "< 204",
        "imported 3 contacts",
        "2 rejected, written to contacts.csv.rejects.jsonl",
        "completed in",
        "2 delivered, 0 failed",
        "partitions  8 (8 owned)",
        "tidings: stdin: webhook.url: scheme must be http or https",
    ] {
        assert!(transcript.contains(expected), "{expected:?} missing from:\n{transcript}");
    }
    let rejects = std::fs::read_to_string(dir.path().join("contacts.csv.rejects.jsonl"))
        .expect("rejects file");
    let rejects: Vec<serde_json::Value> =
        rejects.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(rejects.len(), 2, "{rejects:?}");
    assert_eq!(
        (rejects[0]["line"].as_u64(), rejects[0]["reason"].as_str()),
        (Some(5), Some("id: required"))
    );
    assert_eq!(rejects[1]["line"], 6);
    assert!(rejects[1]["reason"].as_str().is_some_and(|r| r.contains("timezone")), "{rejects:?}");

    let (listen, tail) = (&background[0], &background[1]);
    // The test request, ada and cy, and the redelivery: each verified with the secret.
    let heard = listen
        .wait_for("four verified requests", |text| text.matches(" verified ").count() >= 4)
        .await;
    assert!(!heard.contains("refused"), "{heard}");
    assert!(heard.contains("\"plan\": \"pro\""), "{heard}");
    let tailed = tail.wait_for("the redelivery delivered", |text| text.contains("delivered")).await;
    assert!(tailed.contains("campaign=welcome-pro"), "{tailed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_contacts_import_with_progress_and_rejects() {
    let node = NodeProcess::start(NodeOptions::default()).await.expect("node");
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("contacts.csv");
    let mut csv = String::from("id,plan,n,timezone\n");
    let mut bad = Vec::new();
    for i in 0..100_000u64 {
        let line = i + 2;
        match i {
            _ if i % 10_000 == 17 => {
                csv.push_str(&format!(",pro,{i},\n"));
                bad.push((line, "id: required"));
            }
            _ if i % 10_000 == 4242 => {
                csv.push_str(&format!("user-{i},pro,{i},Nowhere/Town\n"));
                bad.push((line, "timezone"));
            }
            _ => csv.push_str(&format!(
                "user-{i},{},{i},Europe/Paris\n",
                ["free", "pro"][i as usize % 2]
            )),
        }
    }
    std::fs::write(&file, csv).expect("csv");

    let run = tidings(&node, dir.path(), &["contacts", "import", "contacts.csv"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("imported 99,980 contacts"), "{}", run.stdout);
    assert!(
        run.stdout.contains("20 rejected, written to contacts.csv.rejects.jsonl"),
        "{}",
        run.stdout
    );
    // Without a terminal, progress is a line at a time: the last one at 100 %.
    let progress: Vec<&str> = run.stderr.lines().filter(|l| l.contains("imported")).collect();
    assert!(
        progress.last().is_some_and(|l| l.contains("100%") && l.contains("99,980 imported")),
        "{}",
        run.stderr
    );
    assert!(progress.iter().all(|l| l.contains("/s") && l.contains("ETA")), "{}", run.stderr);

    let rejects =
        std::fs::read_to_string(dir.path().join("contacts.csv.rejects.jsonl")).expect("rejects");
    let mut rejects: Vec<(u64, String)> = rejects
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            (v["line"].as_u64().expect("line"), v["reason"].as_str().unwrap_or("").to_string())
        })
        .collect();
    rejects.sort();
    assert_eq!(rejects.len(), bad.len());
    for ((line, reason), (expected_line, expected)) in rejects.iter().zip(&bad) {
        assert_eq!(line, expected_line);
        assert!(reason.contains(expected), "line {line}: {reason}");
    }

    let client = node.client().await.expect("client");
    let contact = client.contacts().get("user-99999").await.expect("last contact");
    assert_eq!(contact.timezone, "Europe/Paris");
    let n = tidings_client::json::struct_to_json(&contact.attributes.unwrap_or_default());
    assert_eq!(n.get("n"), Some(&serde_json::json!(99_999)));

    // Resuming from a line imports only what follows it.
    let resumed = tidings(
        &node,
        dir.path(),
        &["contacts", "import", "contacts.csv", "--from-line", "99992", "-o", "json"],
    );
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    let summary: serde_json::Value = serde_json::from_str(&resumed.stdout).expect("json summary");
    assert_eq!((summary["imported"].as_u64(), summary["rejected"].as_u64()), (Some(10), Some(0)));

    // A file the command cannot read is a usage mistake, named.
    let missing = tidings(&node, dir.path(), &["contacts", "import", "nope.csv"]);
    assert_eq!(missing.code, 2);
    assert!(missing.stderr.starts_with("tidings: nope.csv: cannot read"), "{}", missing.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_and_listen_follow_a_run_as_json() {
    let node = NodeProcess::start(loopback()).await.expect("node");
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port().expect("port").to_string();
    let binary = node_binary().display().to_string();
    let env = [("TIDINGS_ENDPOINT", node.url())];
    let listen = Background::start(
        &binary,
        &["listen", "--port", &port, "--secret", SECRET, "-o", "json"],
        dir.path(),
        &env,
    );
    wait_until("listen to accept connections", Duration::from_secs(10), || {
        let port = port.clone();
        async move { std::net::TcpStream::connect(format!("127.0.0.1:{port}")).ok() }
    })
    .await
    .expect("listening");

    std::fs::write(
        dir.path().join("hook.json"),
        serde_json::json!({
            "url": format!("http://127.0.0.1:{port}/hook/{{{{ contact.id }}}}"),
            "signingSecret": SECRET,
        })
        .to_string(),
    )
    .expect("file");
    let created =
        tidings(&node, dir.path(), &["webhooks", "create", "-f", "hook.json", "-o", "json"]);
    assert_eq!(created.code, 0, "{}", created.stderr);
    let webhook: serde_json::Value = serde_json::from_str(&created.stdout).expect("json webhook");
    let webhook_id = webhook["id"].as_str().expect("id").to_string();

    let client = node.client().await.expect("client");
    for id in ["ann", "ben"] {
        client.contacts().upsert(tidings_client::v1::Contact::new(id)).await.expect("contact");
    }
    std::fs::write(
        dir.path().join("campaign.yaml"),
        format!("webhook_id: {webhook_id}\ntrigger:\n  on_demand: {{}}\n"),
    )
    .expect("file");
    let campaign = tidings(
        &node,
        dir.path(),
        &["campaigns", "create", "-f", "campaign.yaml", "--id", "hello", "-o", "json"],
    );
    assert_eq!(campaign.code, 0, "{}", campaign.stderr);
    let campaign: serde_json::Value = serde_json::from_str(&campaign.stdout).expect("json");
    assert_eq!(campaign["state"], "CAMPAIGN_STATE_DRAFT");
    assert_eq!(tidings(&node, dir.path(), &["campaigns", "activate", "hello"]).code, 0);

    let tail = Background::start(
        &binary,
        &["deliveries", "tail", "--campaign", "hello", "-o", "json"],
        dir.path(),
        &env,
    );
    tail.wait_for("the watch to start", |text| text.contains("following deliveries")).await;
    let run = tidings(&node, dir.path(), &["campaigns", "run", "hello", "--watch", "-o", "json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let states: Vec<serde_json::Value> =
        run.stdout.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    let last = states.last().expect("a run update");
    assert_eq!(last["state"], "RUN_STATE_COMPLETED", "{states:?}");
    assert_eq!(last["delivered"], "2", "uint64 prints as a string in the protobuf JSON mapping");

    let heard = listen.wait_for("two requests", |text| text.lines().count() >= 2).await;
    for line in heard.lines() {
        let request: serde_json::Value = serde_json::from_str(line).expect("json request");
        assert_eq!(request["verified"], true, "{request}");
        assert_eq!(request["answer"], 204);
        assert!(request["path"].as_str().is_some_and(|p| p.starts_with("/hook/")), "{request}");
    }
    let tailed = tail
        .wait_for("two delivered lines", |text| {
            text.matches("DELIVERY_STATUS_DELIVERED").count() >= 2
        })
        .await;
    for line in tailed.lines().filter(|line| line.starts_with('{')) {
        let delivery: serde_json::Value = serde_json::from_str(line).expect("json delivery");
        assert_eq!(delivery["campaign_id"], "hello");
    }

    let listed = tidings(&node, dir.path(), &["webhooks", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed.stdout).expect("json list");
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    let status = tidings(&node, dir.path(), &["status", "-o", "json"]);
    let status: serde_json::Value = serde_json::from_str(&status.stdout).expect("json status");
    assert_eq!(status["partitions"], 8, "an embedded node has 8 partitions");
    assert_eq!(status["owned_partitions"], 8);
    assert_eq!(status["nodes"].as_array().map(Vec::len), Some(1));
    assert!(status["deliveries_last_minute"]["total"].as_u64() >= Some(2), "{status}");

    // Errors: one line naming the field; not found; a node that is not there.
    std::fs::write(dir.path().join("bad.yaml"), "url: https://example.com\ntimeout: 600s\n")
        .expect("file");
    let bad = tidings(&node, dir.path(), &["webhooks", "create", "-f", "bad.yaml"]);
    assert_eq!(bad.code, 1);
    assert_eq!(bad.stderr.lines().count(), 1, "{}", bad.stderr);
    assert!(bad.stderr.starts_with("tidings: bad.yaml: webhook.timeout: "), "{}", bad.stderr);
    let unknown = tidings(&node, dir.path(), &["webhooks", "get", "nope"]);
    assert!(unknown.stderr.contains("not found"), "{}", unknown.stderr);
    let typo = tidings(&node, dir.path(), &["webhooks", "create", "-f", "-"]);
    assert_eq!(typo.code, 2, "{}", typo.stderr);
    let down = Command::new(node_binary())
        .args(["status", "--endpoint", &format!("http://127.0.0.1:{}", free_port().expect("port"))])
        .output()
        .expect("run");
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("unavailable"), "{down:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_change_from_files_and_json_lines_import() {
    let node = NodeProcess::start(NodeOptions::default()).await.expect("node");
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path();
    std::fs::write(path.join("hook.yaml"), "url: https://example.com/a\ndescription: first\n")
        .expect("file");
    assert_eq!(
        tidings(&node, path, &["webhooks", "create", "-f", "hook.yaml", "--id", "a"]).code,
        0
    );
    // Only the fields the file sets change.
    std::fs::write(path.join("change.yaml"), "description: second\n").expect("file");
    let updated =
        tidings(&node, path, &["webhooks", "update", "a", "-f", "change.yaml", "-o", "json"]);
    assert_eq!(updated.code, 0, "{}", updated.stderr);
    let got = tidings(&node, path, &["webhooks", "get", "a", "-o", "json"]);
    let got: serde_json::Value = serde_json::from_str(&got.stdout).expect("json");
    assert_eq!(
        (got["description"].as_str(), got["url"].as_str()),
        (Some("second"), Some("https://example.com/a"))
    );
    // A stale etag is refused.
    std::fs::write(path.join("stale.yaml"), "description: third\netag: \"1\"\n").expect("file");
    let stale = tidings(&node, path, &["webhooks", "update", "a", "-f", "stale.yaml"]);
    assert_eq!(stale.code, 1);
    assert!(stale.stderr.contains("conflict"), "{}", stale.stderr);

    std::fs::write(path.join("seg.json"), r#"{"filter": "contact.attributes.n > 1"}"#)
        .expect("file");
    assert_eq!(
        tidings(&node, path, &["segments", "create", "-f", "seg.json", "--id", "big"]).code,
        0
    );
    let listed = tidings(&node, path, &["segments", "list"]);
    assert!(
        listed.stdout.contains("big") && listed.stdout.contains("contact.attributes.n > 1"),
        "{}",
        listed.stdout
    );
    let deleted = tidings(&node, path, &["segments", "delete", "big"]);
    assert_eq!(deleted.stdout.trim(), "deleted segment big");
    let gone = tidings(&node, path, &["segments", "get", "big"]);
    assert_eq!(gone.code, 1);
    assert!(gone.stderr.starts_with("tidings: not found: "), "{}", gone.stderr);

    std::fs::write(
        path.join("people.jsonl"),
        concat!(
            r#"{"id": "p1", "attributes": {"n": 1}, "timezone": "Europe/Paris"}"#,
            "\n",
            "\n",
            r#"{"id": "p2", "attributes": {"n": 2}, "color": "blue"}"#,
            "\n",
            r#"{"id": "p3", "attributes": {"n": 3}}"#,
            "\n",
            "not json\n",
        ),
    )
    .expect("file");
    let imported = tidings(&node, path, &["contacts", "import", "people.jsonl", "-o", "json"]);
    assert_eq!(imported.code, 0, "{}", imported.stderr);
    let summary: serde_json::Value = serde_json::from_str(&imported.stdout).expect("json");
    assert_eq!((summary["imported"].as_u64(), summary["rejected"].as_u64()), (Some(2), Some(2)));
    let rejects =
        std::fs::read_to_string(path.join("people.jsonl.rejects.jsonl")).expect("rejects");
    let lines: Vec<serde_json::Value> =
        rejects.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(lines[0]["line"], 3);
    assert!(lines[0]["reason"].as_str().is_some_and(|r| r.contains("color")), "{rejects}");
    assert_eq!(lines[1]["line"], 5);
    let contact = tidings(&node, path, &["contacts", "get", "p3", "-o", "json"]);
    let contact: serde_json::Value = serde_json::from_str(&contact.stdout).expect("json");
    assert_eq!(contact["attributes"]["n"], 3);
}
