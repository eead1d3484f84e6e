//! The client crate's examples, built by `cargo test --workspace`, run against a real node.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tidings_client::v1::{CampaignState, Webhook};
use tidings_tests::{NodeOptions, NodeProcess, free_port, wait_until};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn example(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; examples in target/<profile>/examples.
    let exe = std::env::current_exe().expect("test executable");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples").join(name))
        .expect("target directory");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p tidings-client --examples` \
         (`cargo test --workspace` does)",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_publish_escalate_and_verify() {
    let node = NodeProcess::start(NodeOptions {
        env: vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into())],
        ..Default::default()
    })
    .await
    .expect("node");

    let published = Command::new(example("publish"))
        .args(["order.shipped", "user-42"])
        .env("TIDINGS_ENDPOINT", node.url())
        .output()
        .expect("publish");
    let stdout = String::from_utf8_lossy(&published.stdout);
    assert!(published.status.success(), "{stdout}{}", String::from_utf8_lossy(&published.stderr));
    assert_eq!(stdout.matches("published ").count(), 11, "{stdout}");

    let escalated = Command::new(example("escalation"))
        .arg("https://hooks.example.com")
        .env("TIDINGS_ENDPOINT", node.url())
        .output()
        .expect("escalation");
    assert!(escalated.status.success(), "{}", String::from_utf8_lossy(&escalated.stderr));
    let client = node.client().await.expect("client");
    let active = client.campaigns().list(CampaignState::Active).all().await.expect("campaigns");
    let ids: Vec<&str> = active.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["escalate-call", "escalate-email", "escalate-sms"]);

    let port = free_port().expect("port");
    let mut receiver = Command::new(example("receiver"))
        .env("WEBHOOK_SECRET", SECRET)
        .env("LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("receiver");
    wait_until("the receiver to listen", Duration::from_secs(10), || async move {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .await
    .expect("listening");
    let url = format!("http://127.0.0.1:{port}/hooks/{{{{ contact.id }}}}");
    let signed =
        client.webhooks().create(Webhook::new(&url).signing_secret(SECRET)).await.expect("webhook");
    let other = client.webhooks().create(Webhook::new(&url)).await.expect("webhook");
    let verified = client.webhooks().send_test(&signed.id).await.expect("test");
    let refused = client.webhooks().send_test(&other.id).await.expect("test");
    let _ = receiver.kill();
    let _ = receiver.wait();
    assert_eq!(verified.attempt.map(|a| a.status_code), Some(204), "signed with its secret");
    assert_eq!(refused.attempt.map(|a| a.status_code), Some(401), "signed with another secret");
}
