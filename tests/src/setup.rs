//! Short ways to create what most end-to-end tests need, through the public API.

use tidings_client::v1::{
    ActivateCampaignRequest, Campaign, CreateCampaignRequest, CreateWebhookRequest, Trigger,
    Webhook, trigger::Kind,
};

use crate::NodeProcess;

/// Creates a webhook with this id.
pub async fn webhook(node: &NodeProcess, id: &str, webhook: Webhook) -> Webhook {
    let mut api = node.webhooks().await.expect("webhook client");
    api.create_webhook(CreateWebhookRequest { webhook_id: id.into(), webhook: Some(webhook) })
        .await
        .expect("create webhook")
        .into_inner()
}

/// Creates a campaign with this id and activates it.
pub async fn active_campaign(node: &NodeProcess, id: &str, campaign: Campaign) {
    let mut api = node.campaigns().await.expect("campaign client");
    api.create_campaign(CreateCampaignRequest { campaign_id: id.into(), campaign: Some(campaign) })
        .await
        .expect("create campaign");
    api.activate_campaign(ActivateCampaignRequest { id: id.into() }).await.expect("activate");
}

/// Returns a trigger of this kind.
pub fn trigger(kind: Kind) -> Option<Trigger> {
    Some(Trigger { kind: Some(kind) })
}

/// Waits until all 64 partitions are owned and `nodes` distinct nodes own them.
pub async fn settled(store: &dyn tidings_scheduler::store::Store, nodes: usize) {
    crate::wait_until(
        "partitions owned by every node",
        std::time::Duration::from_secs(20),
        || async {
            let page = store.range_prefix(b"owners/", 0).await.ok()?;
            let owners: std::collections::BTreeSet<Vec<u8>> =
                page.kvs.iter().map(|kv| kv.value.clone()).collect();
            (page.kvs.len() == 64 && owners.len() == nodes).then_some(())
        },
    )
    .await
    .expect("settled");
}
