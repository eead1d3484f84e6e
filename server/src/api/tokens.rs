//! TokenService: bearer tokens with scopes. Secrets are shown once, at creation.

use tidings_api::v1 as pb;
use tidings_api::v1::token_service_server::TokenService;
use tidings_scheduler::defs::{DefsError, Versioned};
use tonic::{Request, Response, Status};
use tracing::info;

use super::convert::{timestamp, timestamp_ms};
use super::{ApiError, Violations, invalid, list_page};
use crate::auth::{Scope, TokenRecord, Tokens};

/// Longest description.
const MAX_DESCRIPTION: usize = 256;

/// Serves TokenService.
pub(crate) struct TokenApi {
    tokens: Tokens,
}

impl TokenApi {
    pub(crate) fn new(tokens: Tokens) -> Self {
        Self { tokens }
    }
}

fn to_proto(token: &Versioned<TokenRecord>) -> pb::Token {
    let record = &token.value;
    pb::Token {
        id: token.id.clone(),
        description: record.description.clone(),
        scopes: record.scopes.clone(),
        create_time: Some(timestamp(record.create_ms)),
        expire_time: record.expire_ms.map(timestamp),
        revoke_time: record.revoke_ms.map(timestamp),
    }
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        if request.description.chars().count() > MAX_DESCRIPTION {
            violations.add("description", format!("must be at most {MAX_DESCRIPTION} characters"));
        }
        let mut scopes = Vec::new();
        if request.scopes.is_empty() {
            violations.add("scopes", "must name at least one of admin, write, publish, read");
        }
        for (i, name) in request.scopes.iter().enumerate() {
            match Scope::parse(name) {
                Some(scope) if !scopes.contains(&scope) => scopes.push(scope),
                Some(_) => violations.add(format!("scopes[{i}]"), format!("{name:?} is repeated")),
                None => violations.add(
                    format!("scopes[{i}]"),
                    format!("{name:?} is not a scope: one of admin, write, publish, read"),
                ),
            }
        }
        let now = tidings_scheduler::now_ms();
        let expire_ms = match &request.expire_time {
            Some(at) => match timestamp_ms(&mut violations, "expire_time", at) {
                Some(ms) if ms <= now => {
                    violations.add("expire_time", "must be in the future");
                    None
                }
                other => other,
            },
            None => None,
        };
        violations.check()?;
        scopes.sort();
        let (token, secret) = self
            .tokens
            .create(&request.description, &scopes, expire_ms)
            .await
            .map_err(ApiError::from)?;
        info!(token = %token.id, scopes = ?token.value.scopes, "token created");
        Ok(Response::new(pb::CreateTokenResponse { token: Some(to_proto(&token)), secret }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let request = request.into_inner();
        let (tokens, next_page_token) =
            list_page(self.tokens.defs(), &request.page_token, request.page_size).await?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::Token>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(invalid("id", "is required").into());
        }
        let defs = self.tokens.defs();
        loop {
            let mut token = defs.get(&id).await.map_err(ApiError::from)?;
            if token.value.revoke_ms.is_some() {
                return Ok(Response::new(to_proto(&token)));
            }
            token.value.revoke_ms = Some(tidings_scheduler::now_ms());
            match defs.replace(&id, &token.value, token.revision).await {
                Ok(revoked) => {
                    info!(token = %id, "token revoked");
                    return Ok(Response::new(to_proto(&revoked)));
                }
                // Changed since it was read: read it again.
                Err(DefsError::Conflict { .. }) => continue,
                Err(error) => return Err(ApiError::from(error).into()),
            }
        }
    }
}
