//! Constructors and chained setters for the messages callers write most, so that a request reads
//! as what it asks for:
//!
//! ```
//! use tidings_api::v1::{Campaign, Event, Webhook};
//! let webhook = Webhook::new("https://api.example.com/notify").header("X-Team", "growth");
//! let campaign = Campaign::new("notify").on_event("order.shipped").rule("contact.attributes.vip");
//! let event = Event::new("order.shipped", "user-42")
//!     .data(serde_json::json!({"order": 1234}))
//!     .idempotency_key("order-1234-shipped");
//! # let _ = (webhook, campaign, event);
//! ```

use std::time::{Duration, SystemTime};

use crate::json;
use crate::v1::{
    Audience, Campaign, Contact, DeliveryStatus, Event, EventTrigger, FollowUpTrigger, Header,
    HttpMethod, IntervalTrigger, OnDemandTrigger, Segment, Trigger, Webhook, trigger,
};

fn duration(value: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(value.as_secs()).unwrap_or(i64::MAX),
        nanos: value.subsec_nanos() as i32,
    }
}

fn timestamp(value: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(value)
}

impl Event {
    /// Returns an event of `type` (for example `order.shipped`) about a contact.
    pub fn new(r#type: impl Into<String>, contact_id: impl Into<String>) -> Self {
        Self { r#type: r#type.into(), contact_id: contact_id.into(), ..Default::default() }
    }

    /// Sets the event data, a JSON object (any other value is kept under the key `value`).
    pub fn data(mut self, data: serde_json::Value) -> Self {
        self.data = Some(json::data(&data));
        self
    }

    /// Sets when the event happened; the time Tidings accepts it when not set.
    pub fn occurred_at(mut self, time: SystemTime) -> Self {
        self.occurred_time = Some(timestamp(time));
        self
    }

    /// Sets the key that makes publishing idempotent for 24 hours.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = key.into();
        self
    }
}

impl Webhook {
    /// Returns a webhook calling `url` (a Liquid template) with POST and the default body.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), ..Default::default() }
    }

    /// Sets the free-text description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Sets the HTTP method.
    pub fn http_method(mut self, method: HttpMethod) -> Self {
        self.method = method as i32;
        self
    }

    /// Adds a header whose value is a Liquid template.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push(Header { name: name.into(), value: value.into(), secret: false });
        self
    }

    /// Adds a header holding a credential: encrypted at rest and never returned.
    pub fn secret_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push(Header { name: name.into(), value: value.into(), secret: true });
        self
    }

    /// Sets the body, a Liquid template.
    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets the `content-type` of the body.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = content_type.into();
        self
    }

    /// Sets how long one attempt may take.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(duration(timeout));
        self
    }

    /// Sets the most requests per second across the cluster.
    pub fn rate_limit(mut self, per_second: f64) -> Self {
        self.rate_limit = per_second;
        self
    }

    /// Sets the Standard Webhooks signing secret (`whsec_…`) instead of a generated one.
    pub fn signing_secret(mut self, secret: impl Into<String>) -> Self {
        self.signing_secret = secret.into();
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

impl Segment {
    /// Returns a segment of the contacts matching a CEL `filter`.
    pub fn new(filter: impl Into<String>) -> Self {
        Self { filter: filter.into(), ..Default::default() }
    }

    /// Sets the free-text description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }
}

impl Contact {
    /// Returns a contact with no attributes.
    pub fn new(id: impl Into<String>) -> Self {
        Self { id: id.into(), ..Default::default() }
    }

    /// Sets the attributes, a JSON object (any other value is kept under the key `value`).
    pub fn attributes(mut self, attributes: serde_json::Value) -> Self {
        self.attributes = Some(json::data(&attributes));
        self
    }

    /// Sets the IANA time zone, for send windows.
    pub fn timezone(mut self, timezone: impl Into<String>) -> Self {
        self.timezone = timezone.into();
        self
    }
}

impl Campaign {
    /// Returns a draft campaign sending through a webhook, run on demand until a trigger is set.
    pub fn new(webhook_id: impl Into<String>) -> Self {
        Self {
            webhook_id: webhook_id.into(),
            trigger: Some(Trigger { kind: Some(trigger::Kind::OnDemand(OnDemandTrigger {})) }),
            ..Default::default()
        }
    }

    /// Sets the free-text description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Runs the campaign for each event of `event_type`.
    pub fn on_event(mut self, event_type: impl Into<String>) -> Self {
        self.trigger = Some(Trigger {
            kind: Some(trigger::Kind::Event(EventTrigger {
                event_type: event_type.into(),
                ..Default::default()
            })),
        });
        self
    }

    /// Runs the campaign every `period`.
    pub fn every(mut self, period: Duration) -> Self {
        self.trigger = Some(Trigger {
            kind: Some(trigger::Kind::Interval(IntervalTrigger {
                every: Some(duration(period)),
                ..Default::default()
            })),
        });
        self
    }

    /// Runs the campaign on a cron schedule, in `timezone` (UTC when empty).
    pub fn cron(mut self, expression: impl Into<String>, timezone: impl Into<String>) -> Self {
        self.trigger = Some(Trigger {
            kind: Some(trigger::Kind::Interval(IntervalTrigger {
                cron: expression.into(),
                timezone: timezone.into(),
                ..Default::default()
            })),
        });
        self
    }

    /// Sends `delay` after each delivery of another campaign that ends in one of `on_status`.
    pub fn follow_up(
        mut self,
        after_campaign_id: impl Into<String>,
        on_status: impl IntoIterator<Item = DeliveryStatus>,
        delay: Duration,
    ) -> Self {
        self.trigger = Some(Trigger {
            kind: Some(trigger::Kind::FollowUp(FollowUpTrigger {
                after_campaign_id: after_campaign_id.into(),
                on_status: on_status.into_iter().map(|status| status as i32).collect(),
                delay: Some(duration(delay)),
                ..Default::default()
            })),
        });
        self
    }

    /// Sets the event filter of an event trigger, a CEL expression over `event`.
    pub fn event_filter(mut self, filter: impl Into<String>) -> Self {
        if let Some(Trigger { kind: Some(trigger::Kind::Event(event)) }) = &mut self.trigger {
            event.filter = filter.into();
        }
        self
    }

    /// Skips the follow-up for contacts who reported one of these interactions meanwhile.
    pub fn unless_interactions(
        mut self,
        kinds: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        if let Some(Trigger { kind: Some(trigger::Kind::FollowUp(follow_up)) }) = &mut self.trigger
        {
            follow_up.unless_interactions.extend(kinds.into_iter().map(Into::into));
        }
        self
    }

    /// Sends to the contacts of a segment.
    pub fn segment(mut self, segment_id: impl Into<String>) -> Self {
        self.audience.get_or_insert_with(Audience::default).segment_id = segment_id.into();
        self
    }

    /// Narrows the audience with a CEL filter over `contact`.
    pub fn audience_filter(mut self, filter: impl Into<String>) -> Self {
        self.audience.get_or_insert_with(Audience::default).filter = filter.into();
        self
    }

    /// Adds a business rule, a CEL expression that must hold for a contact to be sent to.
    pub fn rule(mut self, rule: impl Into<String>) -> Self {
        self.rules.push(rule.into());
        self
    }

    /// Sets the campaign data, a JSON object available to templates as `campaign.data`.
    pub fn data(mut self, data: serde_json::Value) -> Self {
        self.data = Some(json::data(&data));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setters_fill_the_fields_they_name() {
        let campaign = Campaign::new("w")
            .follow_up("first", [DeliveryStatus::Failed], Duration::from_millis(1500))
            .unless_interactions(["clicked"])
            .segment("vips");
        let Some(Trigger { kind: Some(trigger::Kind::FollowUp(follow_up)) }) = &campaign.trigger
        else {
            panic!("follow-up trigger expected, got {:?}", campaign.trigger);
        };
        assert_eq!(follow_up.on_status, vec![DeliveryStatus::Failed as i32]);
        assert_eq!(follow_up.delay, Some(prost_types::Duration { seconds: 1, nanos: 500_000_000 }));
        assert_eq!(follow_up.unless_interactions, vec!["clicked".to_string()]);
        assert_eq!(campaign.audience.map(|a| a.segment_id).as_deref(), Some("vips"));
        let event = Event::new("order.shipped", "u1").data(serde_json::json!({"n": 1}));
        assert_eq!(event.data.map(|d| d.fields.len()), Some(1));
    }
}
