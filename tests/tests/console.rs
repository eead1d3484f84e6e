//! The web console in headless Chromium against a real node with auth on: a webhook made with
//! the live preview, the escalation chain built from forms, a run watched to completion, a
//! failed delivery found and redelivered, and a read-only token that sees no write action.
//! Every page is photographed at 1280 px and at a phone's width.

use std::time::Duration;

use fantoccini::{Client, Locator};
use tidings_client::v1::{Contact, CreateTokenRequest};
use tidings_tests::browser::Browser;
use tidings_tests::{NodeOptions, NodeProcess, Receiver, Reply, wait_until};

const WAIT: Duration = Duration::from_secs(30);

async fn fill(c: &Client, css: &str, text: &str) {
    let field = c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
    field.clear().await.expect("clear");
    field.send_keys(text).await.expect("type");
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .expect("click");
}

async fn text(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Waits until the element's text satisfies `ok`; returns it.
async fn wait_text(c: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let found = wait_until(&format!("{css} to show the expected text"), WAIT, || async {
        let t = text(c, css).await;
        ok(&t).then_some(t)
    })
    .await;
    match found {
        Ok(t) => t,
        Err(e) => panic!(
            "{e}; it shows {:?}, on a page that reads:\n{}",
            text(c, css).await,
            text(c, "body").await
        ),
    }
}

async fn exists(c: &Client, css: &str) -> bool {
    !c.find_all(Locator::Css(css)).await.expect("find").is_empty()
}

/// Every visible control has a label, and the page does not scroll sideways.
async fn check_page(c: &Client, what: &str) {
    let unlabelled = c
        .execute(
            "return [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
               .filter(e => e.labels.length === 0 && !e.closest('label') && !e.getAttribute('aria-label'))
               .map(e => e.name || e.id);",
            vec![],
        )
        .await
        .expect("script");
    assert_eq!(unlabelled, serde_json::json!([]), "{what}: controls without a label");
    let overflow = c
        .execute("return document.documentElement.scrollWidth - window.innerWidth;", vec![])
        .await
        .expect("script");
    assert!(overflow.as_i64().unwrap_or(0) <= 0, "{what}: scrolls sideways by {overflow}");
}

async fn shot(browser: &Browser, name: &str) {
    check_page(&browser.client, name).await;
    browser.screenshot(name).await.expect("screenshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_is_built_run_and_repaired_from_the_console() {
    let node = NodeProcess::start(NodeOptions {
        auth: true,
        env: vec![("TIDINGS_DELIVERY__ALLOW_NETWORKS".into(), r#"["127.0.0.1/32"]"#.into())],
        ..Default::default()
    })
    .await
    .expect("node");
    let admin = std::fs::read_to_string(node.data_dir().join("admin.token")).expect("admin token");
    let admin = admin.trim().to_string();
    let api = tidings_client::Client::builder()
        .endpoint(node.url())
        .token(&admin)
        .connect()
        .await
        .expect("client");
    let reader = api
        .tokens()
        .create(CreateTokenRequest {
            description: "console reader".into(),
            scopes: vec!["read".into()],
            expire_time: None,
        })
        .await
        .expect("read token")
        .secret;
    for i in 0..20 {
        let contact = Contact {
            id: format!("user-{i:02}"),
            attributes: Some(tidings_client::json::data(&serde_json::json!({
                "email": format!("user{i}@example.com"),
                "first_name": format!("User {i}"),
                "plan": if i % 2 == 0 { "pro" } else { "free" },
            }))),
            ..Default::default()
        };
        api.contacts().upsert(contact).await.expect("contact");
    }
    // The first endpoint refuses everything (400 is not retried); the second accepts.
    let primary = Receiver::start().await.expect("receiver");
    primary.default_reply(Reply::Delay(Duration::from_millis(150), 400));
    let backup = Receiver::start().await.expect("receiver");

    let browser = Browser::start(1280, 900).await.expect("browser");
    let c = &browser.client;
    let base = node.url();

    // Signing in: a wrong token is refused next to its field; the admin token gets in.
    c.goto(&format!("{base}/campaigns")).await.expect("open");
    assert!(c.current_url().await.expect("url").path().starts_with("/sign-in"));
    fill(c, "#token", "tok_nope.nope").await;
    click(c, "button[type=submit]").await;
    wait_text(c, "#token-error", |t| t.contains("not valid")).await;
    shot(&browser, "sign-in").await;
    fill(c, "#token", &admin).await;
    click(c, "button[type=submit]").await;
    wait_text(c, "h1", |t| t == "Campaigns").await;

    // A webhook with the live preview; a bad URL first, refused next to the field.
    c.goto(&format!("{base}/webhooks/new")).await.expect("open");
    fill(c, "#id", "primary").await;
    fill(c, "#url", "ftp://example.com/hook").await;
    click(c, "form.stack button[type=submit]").await;
    wait_text(c, "#url-error", |t| !t.is_empty()).await;
    fill(c, "#url", &primary.url("/notify/{{ contact.id }}")).await;
    // One request at a time, so that the run lasts long enough to be watched.
    fill(c, "#max_in_flight", "1").await;
    fill(c, "#body", r#"{"to": "{{ contact.attributes.email }}", "name": "{{ contact.attributes.first_name }}"}"#).await;
    let preview = wait_text(c, "#preview", |t| t.contains("/notify/ada")).await;
    assert!(preview.contains("ada@example.com"), "{preview}");
    shot(&browser, "webhook-new").await;
    click(c, "form.stack button[type=submit]").await;
    let secret = wait_text(c, "#signing-secret", |t| t.starts_with("whsec_")).await;
    assert!(secret.len() > 20);
    shot(&browser, "webhook-created").await;

    c.goto(&format!("{base}/webhooks/new")).await.expect("open");
    fill(c, "#id", "backup").await;
    fill(c, "#url", &backup.url("/escalate")).await;
    click(c, "form.stack button[type=submit]").await;
    wait_text(c, "#signing-secret", |t| t.starts_with("whsec_")).await;

    // A segment with its live count.
    c.goto(&format!("{base}/segments/new")).await.expect("open");
    fill(c, "#id", "pro").await;
    fill(c, "#filter", r#"contact.attributes.plan == "pro""#).await;
    wait_text(c, "#member-count", |t| t == "10").await;
    shot(&browser, "segment-new").await;
    click(c, "form.stack button[type=submit]").await;
    wait_text(c, "h1", |t| t == "Segment pro").await;

    // The chain: notify everyone on demand; escalate a second after a failed delivery.
    c.goto(&format!("{base}/campaigns/new")).await.expect("open");
    fill(c, "#id", "notify").await;
    fill(c, "#description", "Tell every contact").await;
    c.find(Locator::Css("#webhook_id"))
        .await
        .expect("select")
        .select_by_value("primary")
        .await
        .expect("choose");
    click(c, "form.campaign button[type=submit]").await;
    wait_text(c, "h1", |t| t == "Campaign notify").await;

    c.goto(&format!("{base}/campaigns/new")).await.expect("open");
    fill(c, "#id", "escalate").await;
    fill(c, "#description", "Try the backup channel").await;
    c.find(Locator::Css("#webhook_id"))
        .await
        .expect("select")
        .select_by_value("backup")
        .await
        .expect("choose");
    click(c, "input[name=trigger][value=follow_up]").await;
    c.find(Locator::Css("#after_campaign_id"))
        .await
        .expect("select")
        .select_by_value("notify")
        .await
        .expect("choose");
    click(c, "input[name=on_status][value=failed]").await;
    fill(c, "#delay", "nonsense").await;
    shot(&browser, "campaign-new").await;
    click(c, "form.campaign button[type=submit]").await;
    // The form comes back with the problem next to the field, and what was typed kept.
    wait_text(c, "#delay-error", |t| !t.is_empty()).await;
    assert!(
        c.find(Locator::Css("input[name=on_status][value=failed]"))
            .await
            .expect("box")
            .is_selected()
            .await
            .expect("state")
    );
    fill(c, "#delay", "1s").await;
    click(c, "form.campaign button[type=submit]").await;
    wait_text(c, "h1", |t| t == "Campaign escalate").await;
    let chain = text(c, "section.chain").await;
    assert!(
        chain.contains("notify") && chain.contains("escalate") && chain.contains("if failed"),
        "{chain}"
    );
    click(c, "form[action$='/state'] input[value=active] ~ button").await;
    wait_text(c, "#campaign-state", |t| t == "active").await;
    shot(&browser, "campaign-chain").await;

    // The dry run shows the exact request; then run for real and watch the counters.
    c.goto(&format!("{base}/campaigns/notify")).await.expect("open");
    click(c, "form[action$='/state'] input[value=active] ~ button").await;
    wait_text(c, "#campaign-state", |t| t == "active").await;
    c.goto(&format!("{base}/campaigns/notify/preview")).await.expect("open");
    wait_text(c, "#dry-run-audience", |t| t == "20").await;
    let dry = text(c, "main").await;
    assert!(dry.contains("@example.com") && dry.contains("/notify/user-"), "{dry}");
    shot(&browser, "campaign-dry-run").await;
    c.goto(&format!("{base}/campaigns/notify")).await.expect("open");
    click(c, "form[action$='/run'] button").await;
    wait_text(c, "h1", |t| t.starts_with("Run ")).await;
    c.execute("window.stayed = true;", vec![]).await.expect("mark the page");
    let first = text(c, "#run-state").await;
    assert_ne!(first, "completed", "the run page opened while the run went");
    wait_text(c, "#run-state", |t| t == "completed").await;
    wait_text(c, "#run-failed", |t| t == "20").await;
    let stayed = c.execute("return window.stayed === true;", vec![]).await.expect("script");
    assert_eq!(stayed, serde_json::json!(true), "the counters moved without a reload");
    let points = c
        .execute(
            "return document.querySelector('#run-progress polyline').getAttribute('points');",
            vec![],
        )
        .await
        .expect("script");
    assert!(points.as_str().is_some_and(|p| !p.is_empty()), "the progress chart is drawn");
    shot(&browser, "run").await;
    if let Err(e) = backup.wait_for(20, WAIT).await {
        panic!("the escalation did not reach the backup: {e}\n{}", node.logs());
    }

    // Find a failed delivery, see why, and redeliver it once the endpoint is fixed.
    c.goto(&format!("{base}/deliveries?webhook=primary&status=failed")).await.expect("open");
    wait_text(c, "table.deliveries", |t| t.contains("failed")).await;
    let rows = c.find_all(Locator::Css("table.deliveries tbody tr")).await.expect("rows");
    assert_eq!(rows.len(), 20);
    shot(&browser, "deliveries").await;
    click(c, "table.deliveries tbody tr a").await;
    wait_text(c, "ol.timeline", |t| t.contains("HTTP 400")).await;
    shot(&browser, "delivery").await;
    primary.default_reply(Reply::Status(200));
    click(c, "form[action$='/redeliver'] button").await;
    wait_until("the redelivery to succeed", WAIT, || async {
        c.refresh().await.ok()?;
        text(c, "dl.facts").await.contains("delivered").then_some(())
    })
    .await
    .unwrap_or_else(|error| panic!("redelivered: {error}\nnode logs:\n{}", node.logs()));
    assert!(text(c, "ol.timeline").await.contains("HTTP 200"));

    // A second run, slower, paused, resumed and cancelled from its page.
    primary.default_reply(Reply::Delay(Duration::from_millis(300), 200));
    c.goto(&format!("{base}/campaigns/notify")).await.expect("open");
    click(c, "form[action$='/run'] button").await;
    wait_text(c, "h1", |t| t.starts_with("Run ")).await;
    for (action, state) in [("pause", "paused"), ("resume", "running"), ("cancel", "cancelled")] {
        click(c, &format!("form[action$='/control'] input[value={action}] ~ button")).await;
        wait_text(c, "#run-state", |t| t == state).await;
    }
    assert!(!exists(c, "form[action$='/control']").await, "a cancelled run has no controls");
    primary.default_reply(Reply::Status(200));

    // Every failed delivery of the webhook since a time, from its page.
    c.goto(&format!("{base}/webhooks/primary")).await.expect("open");
    click(c, "form[action$='/redeliver-failed'] button").await;
    wait_text(c, "#redelivered", |t| t.starts_with("19 ")).await;
    shot(&browser, "webhook").await;
    c.goto(&format!("{base}/webhooks")).await.expect("open");
    shot(&browser, "webhooks").await;
    c.goto(&format!("{base}/contacts/user-00")).await.expect("open");
    wait_text(c, "main", |t| t.contains("notify") && t.contains("escalate")).await;
    shot(&browser, "contact").await;
    c.goto(&format!("{base}/")).await.expect("open");
    wait_text(c, ".charts", |t| t.contains("/s")).await;
    shot(&browser, "overview").await;
    for (path, name) in [
        ("/campaigns", "campaigns"),
        ("/segments", "segments"),
        ("/segments/pro", "segment"),
        ("/contacts", "contacts"),
    ] {
        c.goto(&format!("{base}{path}")).await.expect("open");
        shot(&browser, name).await;
    }

    // At a phone's width every page still fits.
    c.set_window_size(390, 844).await.expect("resize");
    for (path, name) in [
        ("/", "phone-overview"),
        ("/campaigns/escalate", "phone-campaign"),
        ("/deliveries?status=failed", "phone-deliveries"),
        ("/webhooks/new", "phone-webhook-new"),
    ] {
        c.goto(&format!("{base}{path}")).await.expect("open");
        shot(&browser, name).await;
    }
    c.set_window_size(1280, 900).await.expect("resize");

    // A read-only token sees the same pages without a write action, and a forged post fails.
    click(c, "form.signout button").await;
    wait_text(c, "h1", |t| t == "Sign in to Tidings").await;
    fill(c, "#token", &reader).await;
    click(c, "button[type=submit]").await;
    wait_text(c, "h1", |t| t == "Overview").await;
    assert_eq!(text(c, "header .badge").await, "read only");
    c.goto(&format!("{base}/campaigns/notify")).await.expect("open");
    wait_text(c, "h1", |t| t == "Campaign notify").await;
    for write in ["form[action$='/run']", "form[action$='/state']", "form.campaign button"] {
        assert!(!exists(c, write).await, "{write} is shown to a read-only token");
    }
    c.goto(&format!("{base}/webhooks")).await.expect("open");
    assert!(!exists(c, "a[href='/webhooks/new']").await);
    c.goto(&format!("{base}/webhooks/primary")).await.expect("open");
    assert!(!exists(c, "form[action$='/test']").await);
    assert!(!exists(c, "form[action$='/redeliver-failed']").await);
    shot(&browser, "read-only-webhook").await;
    let status = c
        .execute(
            "return fetch('/campaigns/notify/state', {method: 'POST',
                headers: {'content-type': 'application/x-www-form-urlencoded'},
                body: 'csrf=' + document.body.dataset.csrf + '&to=paused'}).then(r => r.status);",
            vec![],
        )
        .await
        .expect("script");
    assert_eq!(status, serde_json::json!(403), "a read-only token cannot pause a campaign");
    // Without its CSRF value a post is refused whoever sends it.
    let forged = c
        .execute(
            "return fetch('/sign-out', {method: 'POST',
                headers: {'content-type': 'application/x-www-form-urlencoded'},
                body: 'csrf=forged'}).then(r => r.status);",
            vec![],
        )
        .await
        .expect("script");
    assert_eq!(forged, serde_json::json!(403));
    let campaign = api.campaigns().get("notify").await.expect("campaign");
    assert_eq!(campaign.state, tidings_client::v1::CampaignState::Active as i32);
    browser.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_moves_to_its_own_address_or_goes_away() {
    let port = tidings_tests::free_port().expect("port");
    let node = NodeProcess::start(NodeOptions {
        env: vec![("TIDINGS_CONSOLE__LISTEN".into(), format!("127.0.0.1:{port}"))],
        ..Default::default()
    })
    .await
    .expect("node");
    let (head, body) = tidings_tests::http_request(port, "/").await.expect("the console answers");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("<h1>Overview</h1>"), "{body}");
    // The gRPC port no longer speaks HTTP/1.1, and the API still answers there.
    let grpc = tidings_tests::http_request(node.addr().port(), "/").await;
    assert!(grpc.as_ref().is_none_or(|(head, _)| !head.starts_with("HTTP/1.1 200")), "{grpc:?}");
    node.client().await.expect("client").webhooks().list().all().await.expect("the API");

    let off = NodeProcess::start(NodeOptions {
        env: vec![("TIDINGS_CONSOLE__ENABLED".into(), "false".into())],
        ..Default::default()
    })
    .await
    .expect("node");
    let page = tidings_tests::http_request(off.addr().port(), "/").await;
    assert!(page.as_ref().is_none_or(|(_, body)| !body.contains("Overview")), "{page:?}");
    off.client().await.expect("client").webhooks().list().all().await.expect("the API");
}
