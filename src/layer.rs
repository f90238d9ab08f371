//! A tower layer that admits only requests carrying a valid JWT-SVID for
//! *this* tool (feature `layer`). Works with axum (HTTP) and tonic (gRPC
//! metadata `authorization` is the same header).
//!
//! ```text
//! let bundles = Arc::new(FileBundleSource::new(vec![(td, "bundle.json".into())])?);
//! let app = Router::new()
//!     .route("/fhir/Patient", get(handler))
//!     .layer(JwtSvidLayer::new("ehr-fhir", bundles).with_policy(PolicySet::new().min_assurance(AssuranceLevel::Al2)));
//! // in the handler: Extension(caller): Extension<VerifiedJwtSvid>
//! ```
//!
//! For every request the layer:
//! 1. takes exactly one `Authorization: Bearer <token>` header (none, two,
//!    or another scheme → 401);
//! 2. validates the token with [`JwtSvidValidator`] against the current
//!    bundles of the [`BundleSource`] and this tool's audience (any failure →
//!    401 `invalid_token`);
//! 3. for a token bound to a key (`cnf.jkt`, a TPM-bound workload key),
//!    requires `Authorization: DPoP <token>` and exactly one `DPoP` proof
//!    header (RFC 9449) signed by that key for this request (method, and
//!    the URI formed from [`JwtSvidLayer::with_proof_origin`] and the
//!    request path), fresh and never seen before (an in-memory replay
//!    cache); without a configured origin such tokens fail closed (401);
//! 4. applies the [`Policy`] (trust domain, SPIFFE IDs, minimum assurance,
//!    or a closure; refusal → 403 `insufficient_scope`);
//! 5. puts the [`VerifiedJwtSvid`] into the request extensions and calls the
//!    inner service. On any failure the inner service is never called.
//!
//! Refusals answer with a `WWW-Authenticate` header (RFC 6750) and an empty
//! body; the token is never echoed. gRPC requests (`content-type:
//! application/grpc…`) get a trailers-only gRPC answer instead: status 16
//! (Unauthenticated) or 7 (PermissionDenied). The detailed reason goes to
//! `tracing` at debug level, not to the caller.

use crate::assurance::AssuranceLevel;
use crate::id::{SpiffeId, TrustDomain};
use crate::source::BundleSource;
use crate::validate::jwt::{JwtSvidError, JwtSvidValidator, VerifiedJwtSvid};
use crate::validate::pop::{ProofRequest, ReplayCache};
use http::{HeaderValue, Request, Response, StatusCode, header};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

/// A policy refused a verified caller; the reason is logged, not sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub String);

/// Decides whether a verified caller may use this tool.
pub trait Policy: Send + Sync + 'static {
    /// `Ok` admits the caller.
    fn authorize(&self, caller: &VerifiedJwtSvid) -> Result<(), Denied>;
}

impl<F> Policy for F
where
    F: Fn(&VerifiedJwtSvid) -> Result<(), Denied> + Send + Sync + 'static,
{
    fn authorize(&self, caller: &VerifiedJwtSvid) -> Result<(), Denied> {
        self(caller)
    }
}

/// Admits every verified caller.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Policy for AllowAll {
    fn authorize(&self, _: &VerifiedJwtSvid) -> Result<(), Denied> {
        Ok(())
    }
}

/// The common policy: allowed trust domains, allowed SPIFFE IDs, a minimum
/// assurance level. Empty lists mean "any".
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    trust_domains: Vec<TrustDomain>,
    ids: Vec<SpiffeId>,
    min_assurance: Option<AssuranceLevel>,
}

impl PolicySet {
    /// Admits everyone until restricted.
    pub fn new() -> Self {
        Self::default()
    }
    /// Only callers of this trust domain (repeatable).
    pub fn trust_domain(mut self, td: TrustDomain) -> Self {
        self.trust_domains.push(td);
        self
    }
    /// Only this SPIFFE ID (repeatable).
    pub fn spiffe_id(mut self, id: SpiffeId) -> Self {
        self.ids.push(id);
        self
    }
    /// Only callers whose `acr` is a Sigil level at least `level`.
    pub fn min_assurance(mut self, level: AssuranceLevel) -> Self {
        self.min_assurance = Some(level);
        self
    }
}

impl Policy for PolicySet {
    fn authorize(&self, c: &VerifiedJwtSvid) -> Result<(), Denied> {
        let id = c.spiffe_id();
        if !self.trust_domains.is_empty() && !self.trust_domains.iter().any(|t| id.is_member_of(t))
        {
            return Err(Denied(format!("trust domain of {id} not allowed")));
        }
        if !self.ids.is_empty() && !self.ids.contains(id) {
            return Err(Denied(format!("{id} not allowed")));
        }
        if let Some(min) = self.min_assurance {
            match c.assurance() {
                Some(l) if l >= min => {}
                got => {
                    return Err(Denied(format!(
                        "assurance {} below required {min}",
                        got.map_or("none".to_string(), |l| l.to_string())
                    )));
                }
            }
        }
        Ok(())
    }
}

struct Shared<P> {
    validator: JwtSvidValidator,
    bundles: Arc<dyn BundleSource>,
    policy: P,
    /// `scheme://host[:port]` clients use to reach this tool: the prefix of
    /// the `htu` a proof must name. None: key-bound tokens are refused.
    origin: Option<String>,
    replay: Arc<ReplayCache>,
}

/// The layer. Cheap to clone.
pub struct JwtSvidLayer<P = AllowAll> {
    shared: Arc<Shared<P>>,
}

impl<P> Clone for JwtSvidLayer<P> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<P> std::fmt::Debug for JwtSvidLayer<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "JwtSvidLayer(audience={})",
            self.shared.validator.audience()
        )
    }
}

impl JwtSvidLayer<AllowAll> {
    /// Admits JWT-SVIDs for `audience` (this tool's name) from `bundles`.
    pub fn new(audience: impl Into<String>, bundles: Arc<dyn BundleSource>) -> Self {
        Self::with_validator(JwtSvidValidator::new(audience), bundles)
    }

    /// With a validator configured by the caller.
    pub fn with_validator(validator: JwtSvidValidator, bundles: Arc<dyn BundleSource>) -> Self {
        Self {
            shared: Arc::new(Shared {
                validator,
                bundles,
                policy: AllowAll,
                origin: None,
                replay: Arc::new(ReplayCache::default()),
            }),
        }
    }
}

impl<P: Policy> JwtSvidLayer<P> {
    /// Replaces the policy.
    pub fn with_policy<Q: Policy>(self, policy: Q) -> JwtSvidLayer<Q> {
        JwtSvidLayer {
            shared: Arc::new(Shared {
                validator: self.shared.validator.clone(),
                bundles: self.shared.bundles.clone(),
                policy,
                origin: self.shared.origin.clone(),
                replay: self.shared.replay.clone(),
            }),
        }
    }

    /// Accepts key-bound tokens (`cnf`) with a DPoP proof naming
    /// `origin` + the request path, e.g. `https://ehr.example` (the
    /// scheme, host and port clients use, as seen before any proxy).
    pub fn with_proof_origin(self, origin: impl Into<String>) -> Self
    where
        P: Clone,
    {
        let origin = origin.into().trim_end_matches('/').to_owned();
        JwtSvidLayer {
            shared: Arc::new(Shared {
                validator: self.shared.validator.clone(),
                bundles: self.shared.bundles.clone(),
                policy: self.shared.policy.clone(),
                origin: Some(origin),
                replay: self.shared.replay.clone(),
            }),
        }
    }
}

impl<S, P> tower_layer::Layer<S> for JwtSvidLayer<P> {
    type Service = JwtSvidService<S, P>;
    fn layer(&self, inner: S) -> Self::Service {
        JwtSvidService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service the layer wraps around yours.
pub struct JwtSvidService<S, P> {
    inner: S,
    shared: Arc<Shared<P>>,
}

impl<S: Clone, P> Clone for JwtSvidService<S, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S, P> std::fmt::Debug for JwtSvidService<S, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtSvidService")
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// No usable bearer token.
    Missing,
    /// A token that does not validate.
    Invalid,
    /// Valid, but not allowed.
    Forbidden,
}

/// How the token was presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Bearer,
    DPoP,
}

/// The single `Authorization` header's scheme and token.
fn credentials<B>(req: &Request<B>) -> Option<(Scheme, &str)> {
    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    let v = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let v = v.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    let scheme = if scheme.eq_ignore_ascii_case("bearer") {
        Scheme::Bearer
    } else if scheme.eq_ignore_ascii_case("dpop") {
        Scheme::DPoP
    } else {
        return None;
    };
    let token = token.trim();
    (!token.is_empty()).then_some((scheme, token))
}

/// The single `DPoP` header, if any. Two are refused as none.
fn dpop_proof<B>(req: &Request<B>) -> Result<Option<&str>, ()> {
    let mut values = req.headers().get_all("dpop").iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(());
    }
    v.to_str().map(Some).map_err(|_| ())
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn refusal_response<B: Default>(r: Refusal, grpc: bool) -> Response<B> {
    let mut resp = Response::new(B::default());
    let h = resp.headers_mut();
    if grpc {
        // Trailers-only gRPC response.
        let (code, msg) = match r {
            Refusal::Missing | Refusal::Invalid => ("16", "invalid or missing JWT-SVID"),
            Refusal::Forbidden => ("7", "caller not allowed"),
        };
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static(code));
        h.insert("grpc-message", HeaderValue::from_static(msg));
        return resp;
    }
    let (status, www) = match r {
        Refusal::Missing => (StatusCode::UNAUTHORIZED, r#"Bearer realm="sigil""#),
        Refusal::Invalid => (
            StatusCode::UNAUTHORIZED,
            r#"Bearer realm="sigil", error="invalid_token""#,
        ),
        Refusal::Forbidden => (
            StatusCode::FORBIDDEN,
            r#"Bearer realm="sigil", error="insufficient_scope""#,
        ),
    };
    h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(www));
    *resp.status_mut() = status;
    resp
}

impl<S, P> JwtSvidService<S, P>
where
    P: Policy,
{
    fn authenticate<B>(&self, req: &Request<B>) -> Result<VerifiedJwtSvid, Refusal> {
        let (scheme, token) = credentials(req).ok_or(Refusal::Missing)?;
        let bundles = self.shared.bundles.bundles();
        let proof = dpop_proof(req).map_err(|()| {
            tracing::debug!("more than one DPoP header, or one that is not text");
            Refusal::Invalid
        })?;
        let refused = |e: JwtSvidError| {
            tracing::debug!(reason = %e, "JWT-SVID refused");
            Refusal::Invalid
        };
        let caller = match &self.shared.origin {
            Some(origin) => {
                let uri = format!("{origin}{}", req.uri().path());
                let request = ProofRequest {
                    method: req.method().as_str(),
                    uri: &uri,
                };
                self.shared
                    .validator
                    .validate_with_proof(
                        token,
                        proof,
                        &request,
                        &bundles,
                        SystemTime::now(),
                        Some(&self.shared.replay),
                    )
                    .map_err(refused)?
            }
            // No origin to check `htu` against: key-bound tokens fail
            // closed (ProofRequired).
            None => self
                .shared
                .validator
                .validate(token, &bundles, SystemTime::now())
                .map_err(refused)?,
        };
        // A key-bound token sent as a bearer token is a downgrade.
        if caller.cnf_jkt().is_some() && scheme != Scheme::DPoP {
            tracing::debug!(spiffe_id = %caller.spiffe_id(), "key-bound JWT-SVID sent with the Bearer scheme");
            return Err(Refusal::Invalid);
        }
        self.shared.policy.authorize(&caller).map_err(|Denied(why)| {
            tracing::debug!(spiffe_id = %caller.spiffe_id(), reason = %why, "caller refused by policy");
            Refusal::Forbidden
        })?;
        Ok(caller)
    }
}

impl<S, P, ReqB, ResB> tower_service::Service<Request<ReqB>> for JwtSvidService<S, P>
where
    S: tower_service::Service<Request<ReqB>, Response = Response<ResB>>,
    P: Policy,
    ResB: Default,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        match self.authenticate(&req) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                ResponseFuture::Inner {
                    fut: self.inner.call(req),
                }
            }
            Err(r) => ResponseFuture::Refused {
                resp: Some(refusal_response(r, is_grpc(&req))),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The layer's response future.
    #[project = ResponseFutureProj]
    pub enum ResponseFuture<F, B> {
        /// The inner service is answering.
        Inner { #[pin] fut: F },
        /// The layer answered itself.
        Refused { resp: Option<Response<B>> },
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Inner { fut } => fut.poll(cx),
            ResponseFutureProj::Refused { resp } => match resp.take() {
                Some(r) => Poll::Ready(Ok(r)),
                // Polled after completion: stay pending rather than panic.
                None => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests;
