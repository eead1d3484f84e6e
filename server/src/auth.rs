//! Bearer tokens with scopes: what each method needs, the tokens every node keeps a copy of,
//! and the layer in front of the gRPC services that checks them.
//!
//! A token's secret is `{id}.{random}`: the id finds the record, and the SHA-256 of the whole
//! secret must match the hash stored there. Secrets carry 256 random bits, so a fast hash is
//! enough; the secret itself is never stored, logged or returned after creation.

use std::pin::Pin;

use std::task::{Context, Poll};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tidings_scheduler::defs::{Cache, Definitions, DefsError, Versioned};
use tonic::Status;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Tokens, and everything the other scopes allow.
    Admin,
    /// Webhooks, segments, campaigns, contacts, runs and redelivery; and everything `read` allows.
    Write,
    /// Events and interactions.
    Publish,
    /// Everything readable.
    Read,
}

impl Scope {
    /// Every scope, by name.
    pub const ALL: [Scope; 4] = [Scope::Admin, Scope::Write, Scope::Publish, Scope::Read];

    /// The scope's name, as callers write it.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Write => "write",
            Scope::Publish => "publish",
            Scope::Read => "read",
        }
    }

    /// Parses a scope name.
    pub fn parse(name: &str) -> Option<Scope> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether a token holding this scope may call a method that needs `needed`.
    pub fn grants(self, needed: Scope) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Write => matches!(needed, Scope::Write | Scope::Read),
            other => other == needed,
        }
    }
}

/// What calling a method takes: nothing, or a token with a scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Anyone may call it.
    Nothing,
    /// A token granting this scope.
    Scope(Scope),
}

/// Returns what the method at `path` (`/package.Service/Method`) needs. A method this table does
/// not know needs `admin`: a new method is closed until it is given its scope here.
pub fn needs(path: &str, open: &OpenServices) -> Needs {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    if service == "grpc.health.v1.Health" {
        return if open.health { Needs::Nothing } else { Needs::Scope(Scope::Read) };
    }
    if service.starts_with("grpc.reflection.") {
        return if open.reflection { Needs::Nothing } else { Needs::Scope(Scope::Read) };
    }
    let scope = match (service, method) {
        ("tidings.v1.TokenService", _) => Scope::Admin,
        ("tidings.v1.EventService", "Publish" | "PublishBatch" | "RecordInteraction") => {
            Scope::Publish
        }
        ("tidings.v1.ClusterService", "ListNodes" | "ListPartitions") => Scope::Read,
        (
            "tidings.v1.WebhookService",
            "CreateWebhook"
            | "UpdateWebhook"
            | "DeleteWebhook"
            | "RotateSigningSecret"
            | "SendTest",
        ) => Scope::Write,
        ("tidings.v1.WebhookService", "GetWebhook" | "ListWebhooks") => Scope::Read,
        (
            "tidings.v1.ContactService",
            "UpsertContact" | "BatchUpsertContacts" | "DeleteContact",
        ) => Scope::Write,
        ("tidings.v1.ContactService", "GetContact" | "ListContacts") => Scope::Read,
        ("tidings.v1.SegmentService", "CreateSegment" | "UpdateSegment" | "DeleteSegment") => {
            Scope::Write
        }
        (
            "tidings.v1.SegmentService",
            "GetSegment" | "ListSegments" | "CountSegment" | "PreviewSegment",
        ) => Scope::Read,
        (
            "tidings.v1.CampaignService",
            "CreateCampaign" | "UpdateCampaign" | "DeleteCampaign" | "ActivateCampaign"
            | "PauseCampaign" | "ArchiveCampaign" | "RunCampaign" | "PauseRun" | "ResumeRun"
            | "CancelRun",
        ) => Scope::Write,
        (
            "tidings.v1.CampaignService",
            "GetCampaign" | "ListCampaigns" | "GetRun" | "ListRuns" | "WatchRun"
            | "PreviewCampaign",
        ) => Scope::Read,
        ("tidings.v1.DeliveryService", "Redeliver" | "RedeliverFailed") => Scope::Write,
        ("tidings.v1.DeliveryService", "GetDelivery" | "ListDeliveries" | "WatchDeliveries") => {
            Scope::Read
        }
        _ => Scope::Admin,
    };
    Needs::Scope(scope)
}

/// Services that answer without a token when auth is on.
#[derive(Clone, Copy, Debug)]
pub struct OpenServices {
    /// `grpc.health.v1.Health`.
    pub health: bool,
    /// Server reflection.
    pub reflection: bool,
}

/// A token as stored: never its secret, only the secret's hash.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    /// What it is for.
    pub description: String,
    /// Scope names.
    pub scopes: Vec<String>,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    /// Creation time, ms since the epoch.
    pub create_ms: i64,
    /// When it stops working, ms since the epoch.
    pub expire_ms: Option<i64>,
    /// When it was revoked, ms since the epoch.
    pub revoke_ms: Option<i64>,
}

impl TokenRecord {
    /// Returns the scopes it holds (names it does not know are ignored).
    pub fn scopes(&self) -> impl Iterator<Item = Scope> + '_ {
        self.scopes.iter().filter_map(|s| Scope::parse(s))
    }
}

fn hash(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares without an early exit, so the time taken says nothing about where they differ.
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a call's credentials were refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// No token, or one that is not (or no longer) valid: UNAUTHENTICATED.
    Unauthenticated(&'static str),
    /// A valid token without the scope needed: PERMISSION_DENIED.
    Forbidden(Scope),
}

impl From<Refused> for Status {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Unauthenticated(reason) => Status::unauthenticated(reason),
            Refused::Forbidden(scope) => Status::permission_denied(format!(
                "this token lacks the `{}` scope this method needs",
                scope.name()
            )),
        }
    }
}

/// The tokens of the cluster, stored in the coordination store under `tokens/`, with this
/// node's copy kept fresh by a watch (a revocation reaches every node within its latency).
#[derive(Clone, Debug)]
pub struct Tokens {
    defs: Definitions<TokenRecord>,
    cache: Cache<TokenRecord>,
}

/// Where the first admin token's creation is recorded, so that it happens once per cluster.
const BOOTSTRAPPED: &str = "auth/bootstrapped";

impl Tokens {
    /// Loads the tokens and follows their changes until `stop` is cancelled.
    pub async fn start(
        coordination: &tidings_scheduler::coordination::Coordination,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<Self, DefsError> {
        let defs = coordination.tokens();
        let cache = Cache::start(defs.clone(), stop).await?;
        Ok(Self { defs: defs.read_your_writes(&cache), cache })
    }

    /// Returns the definitions, for the TokenService.
    pub fn defs(&self) -> &Definitions<TokenRecord> {
        &self.defs
    }

    /// Checks the `authorization` header of a call that needs `needed`; returns the token's id.
    pub fn check(
        &self,
        authorization: Option<&str>,
        needed: Scope,
        now_ms: i64,
    ) -> Result<String, Refused> {
        let Some(header) = authorization else {
            return Err(Refused::Unauthenticated(
                "this method needs a token: send `authorization: Bearer <secret>`",
            ));
        };
        let Some(secret) =
            header.strip_prefix("Bearer ").or_else(|| header.strip_prefix("bearer "))
        else {
            return Err(Refused::Unauthenticated(
                "the authorization header must be `Bearer <secret>`",
            ));
        };
        let secret = secret.trim();
        let unknown = Refused::Unauthenticated("the token is not valid");
        let Some((id, _)) = secret.split_once('.') else { return Err(unknown) };
        let Some(record) = self.cache.get(id) else { return Err(unknown) };
        if !same(&hash(secret), &record.hash) {
            return Err(unknown);
        }
        if record.revoke_ms.is_some() {
            return Err(Refused::Unauthenticated("the token was revoked"));
        }
        if record.expire_ms.is_some_and(|at| at <= now_ms) {
            return Err(Refused::Unauthenticated("the token has expired"));
        }
        if !record.scopes().any(|s| s.grants(needed)) {
            return Err(Refused::Forbidden(needed));
        }
        Ok(id.to_string())
    }

    /// Creates a token; returns it with its secret, which is not kept anywhere.
    pub async fn create(
        &self,
        description: &str,
        scopes: &[Scope],
        expire_ms: Option<i64>,
    ) -> Result<(Versioned<TokenRecord>, String), DefsError> {
        let (id, secret, record) = new_token(description, scopes, expire_ms);
        let created = self.defs.create(&id, &record).await?;
        Ok((created, secret))
    }

    /// With no token ever created in this cluster, creates an admin token and writes its secret
    /// to `path` (mode 0600). Returns whether this node created it.
    pub async fn bootstrap(&self, path: &std::path::Path) -> anyhow::Result<bool> {
        let (id, secret, record) =
            new_token("first admin token, created at the first start", &[Scope::Admin], None);
        if !self.defs.create_once(BOOTSTRAPPED, &id, &record).await? {
            return Ok(false);
        }
        if let Some(dir) = path.parent() {
            crate::files::private_dir(dir)?;
        }
        crate::files::write_private(path, format!("{secret}\n").as_bytes())?;
        Ok(true)
    }
}

fn new_token(
    description: &str,
    scopes: &[Scope],
    expire_ms: Option<i64>,
) -> (String, String, TokenRecord) {
    let id = format!("tok_{}", ulid::Ulid::new().to_string().to_ascii_lowercase());
    let random: [u8; 32] = rand::random();
    let secret = format!("{id}.{}", URL_SAFE_NO_PAD.encode(random));
    let record = TokenRecord {
        description: description.to_string(),
        scopes: scopes.iter().map(|s| s.name().to_string()).collect(),
        hash: hash(&secret),
        create_ms: tidings_scheduler::now_ms(),
        expire_ms,
        revoke_ms: None,
    };
    (id, secret, record)
}

/// The layer that checks every call's token before the services see it.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    tokens: Option<Tokens>,
    open: OpenServices,
}

impl AuthLayer {
    /// Checks tokens with `tokens`; lets every call through when `None` (auth off).
    pub fn new(tokens: Option<Tokens>, open: OpenServices) -> Self {
        Self { tokens, open }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth { inner, layer: self.clone() }
    }
}

/// [`AuthLayer`] around a service.
#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

/// The future of the API's tower layers.
pub(crate) type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(tokens) = &self.layer.tokens
            && let Needs::Scope(needed) = needs(request.uri().path(), &self.layer.open)
        {
            let header =
                request.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            if let Err(refused) = tokens.check(header, needed, tidings_scheduler::now_ms()) {
                let response = Status::from(refused).into_http::<R>();
                return Box::pin(async move { Ok(response) });
            }
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: OpenServices = OpenServices { health: true, reflection: true };

    #[test]
    fn scopes_grant_what_they_say() {
        assert!(Scope::Admin.grants(Scope::Write));
        assert!(Scope::Write.grants(Scope::Read));
        assert!(!Scope::Write.grants(Scope::Publish));
        assert!(!Scope::Publish.grants(Scope::Write));
        assert!(!Scope::Read.grants(Scope::Publish));
        assert!(Scope::Publish.grants(Scope::Publish));
    }

    #[test]
    fn unknown_methods_need_admin() {
        assert_eq!(
            needs("/tidings.v1.WebhookService/Frobnicate", &OPEN),
            Needs::Scope(Scope::Admin)
        );
        assert_eq!(needs("/other.Service/Call", &OPEN), Needs::Scope(Scope::Admin));
        assert_eq!(needs("/grpc.health.v1.Health/Check", &OPEN), Needs::Nothing);
        let closed = OpenServices { health: false, reflection: false };
        assert_eq!(
            needs("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", &closed),
            Needs::Scope(Scope::Read)
        );
    }

    /// Every method of the API has its scope in the table: none falls to the admin default by
    /// omission.
    #[test]
    fn every_method_has_a_scope() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(tidings_api::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let mut methods = 0;
        for file in set.file.iter().filter(|f| f.package() == "tidings.v1") {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/tidings.v1.{}/{}", service.name(), method.name());
                    let needed = needs(&path, &OPEN);
                    let admin_by_design = service.name() == "TokenService";
                    assert!(
                        admin_by_design || needed != Needs::Scope(Scope::Admin),
                        "{path} has no scope of its own"
                    );
                    methods += 1;
                }
            }
        }
        assert!(methods > 40, "{methods} methods");
    }

    #[test]
    fn secrets_are_checked_by_hash() {
        let (id, secret, record) = new_token("t", &[Scope::Publish], None);
        assert!(secret.starts_with(&format!("{id}.")));
        assert_ne!(record.hash, secret);
        assert!(same(&hash(&secret), &record.hash));
        assert!(!same(&hash(&format!("{secret}x")), &record.hash));
    }
}
