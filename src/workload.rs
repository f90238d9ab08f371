//! A SPIFFE Workload API client (feature `workload-client`).
//!
//! It connects to the endpoint named by `SPIFFE_ENDPOINT_SOCKET` (or one you
//! give), sends the `workload.spiffe.io: true` header on every call, and turns
//! responses into checked Sigil types: every X.509-SVID is parsed with the
//! SPIFFE certificate rules, every bundle with the bundle load checks.
//!
//! Kept-current sources built on it: [`WorkloadJwtBundleSource`] (JWT
//! bundles, for validating JWT-SVIDs) and, with the `tls` feature,
//! [`WorkloadX509Source`] (this workload's X.509-SVID and X.509 bundles, for
//! SPIFFE mutual TLS that follows rotations).

use crate::bundle::{Bundle, BundleSet, JwtBundle, X509Bundle};
use crate::endpoint::{Endpoint, EndpointError};
use crate::id::{SpiffeId, TrustDomain};
use crate::proto::workload as pb;
use crate::svid::x509::X509Svid;
use pb::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;

/// The header the Workload API requires on every request.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Workload API client errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The endpoint address is invalid or unset.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The connection failed.
    #[error("cannot connect to the Workload API: {0}")]
    Connect(String),
    /// The server answered with an error status.
    #[error("Workload API error: {} ({:?})", .0.message(), .0.code())]
    Status(tonic::Status),
    /// The server's answer does not hold what the spec requires.
    #[error("invalid Workload API response: {0}")]
    InvalidResponse(String),
    /// The stream ended before the first message.
    #[error("Workload API stream ended")]
    StreamEnded,
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        Self::Status(s)
    }
}

impl ClientError {
    /// The gRPC status code, when the server answered with one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// X.509-SVIDs and bundles, as one `FetchX509SVID` message carries them.
#[derive(Debug, Clone)]
pub struct X509Context {
    /// SVIDs; the first is the default.
    pub svids: Vec<X509Svid>,
    /// X.509 bundles: the SVIDs' own trust domain and federated ones.
    pub bundles: BundleSet,
}

impl X509Context {
    /// The default (first) SVID.
    pub fn default_svid(&self) -> Option<&X509Svid> {
        self.svids.first()
    }
}

/// A JWT-SVID as fetched (not validated: it is the caller's own token).
#[derive(Debug, Clone)]
pub struct FetchedJwtSvid {
    /// The SPIFFE ID the token is for.
    pub spiffe_id: SpiffeId,
    /// The compact JWS.
    pub token: String,
}

/// A Workload API client.
#[derive(Debug, Clone)]
pub struct WorkloadApiClient {
    inner: SpiffeWorkloadApiClient<Channel>,
}

fn request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

impl WorkloadApiClient {
    /// Connects to the endpoint in `SPIFFE_ENDPOINT_SOCKET`.
    pub async fn connect_env() -> Result<Self, ClientError> {
        Self::connect(&Endpoint::from_env()?).await
    }

    /// Connects to `endpoint`.
    pub async fn connect(endpoint: &Endpoint) -> Result<Self, ClientError> {
        Ok(Self {
            inner: SpiffeWorkloadApiClient::new(connect_channel(endpoint).await?),
        })
    }

    /// The first message of `FetchX509SVID`.
    pub async fn fetch_x509_context(&mut self) -> Result<X509Context, ClientError> {
        let mut stream = self.watch_x509_context().await?;
        stream.next().await.ok_or(ClientError::StreamEnded)?
    }

    /// `FetchX509SVID` as a stream of checked contexts.
    pub async fn watch_x509_context(
        &mut self,
    ) -> Result<impl Stream<Item = Result<X509Context, ClientError>> + use<>, ClientError> {
        let stream = self
            .inner
            .fetch_x509svid(request(pb::X509svidRequest {}))
            .await?
            .into_inner();
        Ok(stream.map(|m| x509_context(m.map_err(ClientError::Status)?)))
    }

    /// `FetchX509Bundles`, first message.
    pub async fn fetch_x509_bundles(&mut self) -> Result<BundleSet, ClientError> {
        let mut stream = self
            .inner
            .fetch_x509_bundles(request(pb::X509BundlesRequest {}))
            .await?
            .into_inner();
        let msg = stream.next().await.ok_or(ClientError::StreamEnded)??;
        let mut set = BundleSet::new();
        for (td, der) in msg.bundles {
            let td = trust_domain(&td)?;
            let x509 = X509Bundle::from_concatenated_der(td.clone(), &der)
                .map_err(|e| ClientError::InvalidResponse(e.to_string()))?;
            set.insert(Bundle {
                x509,
                ..Bundle::empty(td)
            });
        }
        Ok(set)
    }

    /// `FetchJWTSVID` for one audience; `spiffe_id` picks one of several
    /// identities. Returns the first SVID.
    pub async fn fetch_jwt_svid(
        &mut self,
        audience: &str,
        spiffe_id: Option<&SpiffeId>,
    ) -> Result<FetchedJwtSvid, ClientError> {
        let resp = self
            .inner
            .fetch_jwtsvid(request(pb::JwtsvidRequest {
                audience: vec![audience.to_owned()],
                spiffe_id: spiffe_id.map(|s| s.to_string()).unwrap_or_default(),
            }))
            .await?
            .into_inner();
        let svid =
            resp.svids.into_iter().next().ok_or_else(|| {
                ClientError::InvalidResponse("no JWT-SVID in the response".into())
            })?;
        let spiffe_id = SpiffeId::parse(&svid.spiffe_id)
            .map_err(|e| ClientError::InvalidResponse(e.to_string()))?;
        Ok(FetchedJwtSvid {
            spiffe_id,
            token: svid.svid,
        })
    }

    /// `FetchJWTBundles`, first message.
    pub async fn fetch_jwt_bundles(&mut self) -> Result<BundleSet, ClientError> {
        let mut stream = self.watch_jwt_bundles().await?;
        stream.next().await.ok_or(ClientError::StreamEnded)?
    }

    /// `FetchJWTBundles` as a stream of checked bundle sets.
    pub async fn watch_jwt_bundles(
        &mut self,
    ) -> Result<impl Stream<Item = Result<BundleSet, ClientError>> + use<>, ClientError> {
        let stream = self
            .inner
            .fetch_jwt_bundles(request(pb::JwtBundlesRequest {}))
            .await?
            .into_inner();
        Ok(stream.map(|m| {
            let m = m?;
            let mut set = BundleSet::new();
            for (td, jwks) in m.bundles {
                let td = trust_domain(&td)?;
                let jwt = JwtBundle::from_jwks(td.clone(), &jwks)
                    .map_err(|e| ClientError::InvalidResponse(e.to_string()))?;
                set.insert(Bundle {
                    jwt,
                    ..Bundle::empty(td)
                });
            }
            Ok(set)
        }))
    }

    /// `ValidateJWTSVID`: asks the agent to validate a token for `audience`.
    pub async fn validate_jwt_svid(
        &mut self,
        audience: &str,
        token: &str,
    ) -> Result<(SpiffeId, Option<prost_types::Struct>), ClientError> {
        let resp = self
            .inner
            .validate_jwtsvid(request(pb::ValidateJwtsvidRequest {
                audience: audience.to_owned(),
                svid: token.to_owned(),
            }))
            .await?
            .into_inner();
        let id = SpiffeId::parse(&resp.spiffe_id)
            .map_err(|e| ClientError::InvalidResponse(e.to_string()))?;
        Ok((id, resp.claims))
    }
}

fn trust_domain(s: &str) -> Result<TrustDomain, ClientError> {
    TrustDomain::new(s).map_err(|e| ClientError::InvalidResponse(format!("bundle key {s:?}: {e}")))
}

fn x509_context(msg: pb::X509svidResponse) -> Result<X509Context, ClientError> {
    let mut svids = Vec::with_capacity(msg.svids.len());
    let mut bundles = BundleSet::new();
    for s in msg.svids {
        let svid = X509Svid::from_der(&s.x509_svid, &s.x509_svid_key)
            .map_err(|e| ClientError::InvalidResponse(e.to_string()))?;
        if svid.spiffe_id().as_str() != s.spiffe_id {
            return Err(ClientError::InvalidResponse(
                "spiffe_id does not match the certificate".into(),
            ));
        }
        let td = svid.spiffe_id().trust_domain();
        if bundles.get(&td).is_none() {
            let x509 = X509Bundle::from_concatenated_der(td.clone(), &s.bundle)
                .map_err(|e| ClientError::InvalidResponse(e.to_string()))?;
            bundles.insert(Bundle {
                x509,
                ..Bundle::empty(td)
            });
        }
        svids.push(svid);
    }
    for (td, der) in msg.federated_bundles {
        let td = trust_domain(&td)?;
        let x509 = X509Bundle::from_concatenated_der(td.clone(), &der)
            .map_err(|e| ClientError::InvalidResponse(e.to_string()))?;
        bundles.insert(Bundle {
            x509,
            ..Bundle::empty(td)
        });
    }
    if svids.is_empty() {
        return Err(ClientError::InvalidResponse(
            "no X.509-SVID in the response".into(),
        ));
    }
    Ok(X509Context { svids, bundles })
}

/// A Workload API stream, boxed.
type BoxStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, ClientError>> + Send>>;

/// The first backoff after a broken stream; it doubles up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);
/// The longest wait between reconnects.
const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(30);

/// Follows `stream`, handing every valid message to `apply`; when the stream
/// breaks or ends, reconnects to `endpoint` with `open` after a backoff
/// (doubling up to [`MAX_BACKOFF`]) for as long as it runs. An invalid
/// message is dropped: the stream carries on and the last good state stays.
async fn follow<T, O, Fut>(
    endpoint: Endpoint,
    stream: BoxStream<T>,
    open: O,
    mut apply: impl FnMut(T) + Send,
) where
    O: Fn(WorkloadApiClient) -> Fut + Send,
    Fut: std::future::Future<Output = Result<BoxStream<T>, ClientError>> + Send,
{
    let mut stream = Some(stream);
    let mut backoff = FIRST_BACKOFF;
    loop {
        if let Some(st) = stream.as_mut() {
            while let Some(msg) = st.next().await {
                match msg {
                    Ok(item) => {
                        apply(item);
                        backoff = FIRST_BACKOFF;
                    }
                    Err(ClientError::InvalidResponse(_)) => {}
                    Err(_) => break,
                }
            }
        }
        stream = None;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        if let Ok(c) = WorkloadApiClient::connect(&endpoint).await
            && let Ok(st) = open(c).await
        {
            stream = Some(st);
        }
    }
}

async fn open_jwt_bundles(mut c: WorkloadApiClient) -> Result<BoxStream<BundleSet>, ClientError> {
    Ok(Box::pin(c.watch_jwt_bundles().await?))
}

/// JWT bundles kept current from the Workload API's `FetchJWTBundles`
/// stream. A background task follows the stream and reconnects with backoff
/// (up to 30 s); a failed or invalid update never replaces the last good
/// set. Dropping the source stops the task.
#[derive(Debug)]
pub struct WorkloadJwtBundleSource {
    shared: std::sync::Arc<crate::source::SharedBundles>,
    task: tokio::task::JoinHandle<()>,
}

impl WorkloadJwtBundleSource {
    /// Connects, waits for the first bundle set (so validation can start
    /// right away), then keeps following the stream.
    pub async fn start(endpoint: Endpoint) -> Result<Self, ClientError> {
        let client = WorkloadApiClient::connect(&endpoint).await?;
        let mut stream = open_jwt_bundles(client).await?;
        let first = stream.next().await.ok_or(ClientError::StreamEnded)??;
        let shared = std::sync::Arc::new(crate::source::SharedBundles::new(first));
        let s = shared.clone();
        let task = tokio::spawn(follow(endpoint, stream, open_jwt_bundles, move |set| {
            s.update(set)
        }));
        Ok(Self { shared, task })
    }
}

impl crate::source::BundleSource for WorkloadJwtBundleSource {
    fn bundles(&self) -> std::sync::Arc<BundleSet> {
        self.shared.bundles()
    }
}

impl Drop for WorkloadJwtBundleSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(feature = "tls")]
pub use x509_source::WorkloadX509Source;

#[cfg(feature = "tls")]
mod x509_source {
    use super::{BoxStream, ClientError, WorkloadApiClient, X509Context, follow};
    use crate::endpoint::Endpoint;
    use crate::id::SpiffeId;
    use crate::source::{BundleSource, SharedBundles};
    use crate::svid::x509::X509Svid;
    use crate::tls::{SvidResolver, TlsError, mtls_client_config, mtls_server_config};
    use crate::validate::x509::Authorizer;
    use std::sync::Arc;
    use tokio::sync::watch;
    use tokio_stream::StreamExt;

    /// This workload's X.509-SVID and X.509 bundles, kept current from the
    /// Workload API's `FetchX509SVID` stream (feature `tls`), for SPIFFE
    /// mutual TLS that follows rotations without a restart:
    ///
    /// ```text
    /// let source = WorkloadX509Source::start(Endpoint::from_env()?).await?;
    /// let config = mtls_server_config(source.resolver(), source.bundles(), Arc::new(MemberOf(td)))?;
    /// // or: source.server_config(authorizer)? / source.client_config(authorizer)?
    /// ```
    ///
    /// [`Self::resolver`] presents the current SVID and [`Self::bundles`]
    /// hands out the current X.509 bundles (the SVID's own trust domain and
    /// federated ones), so configs built from them once apply every
    /// rotation and bundle change to the next handshake.
    ///
    /// A background task follows the stream and reconnects with backoff (up
    /// to 30 s). An update is taken whole or not at all: a message that does
    /// not check out, lacks the chosen SPIFFE ID, or carries a key rustls
    /// cannot use never replaces the last good SVID and bundles. When the
    /// agent is unreachable the last good SVID stays in use (until it
    /// expires: peers then refuse it). Dropping the source stops the task.
    ///
    /// Not done here: connections already open keep the certificate they
    /// were made with.
    pub struct WorkloadX509Source {
        resolver: Arc<SvidResolver>,
        bundles: Arc<SharedBundles>,
        svid: watch::Receiver<Arc<X509Svid>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl std::fmt::Debug for WorkloadX509Source {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("WorkloadX509Source")
                .field("spiffe_id", &self.svid.borrow().spiffe_id().as_str())
                .finish_non_exhaustive()
        }
    }

    /// The SVID `wanted` names in `ctx` (the default one when `None`).
    fn pick<'a>(ctx: &'a X509Context, wanted: Option<&SpiffeId>) -> Option<&'a X509Svid> {
        match wanted {
            None => ctx.default_svid(),
            Some(id) => ctx.svids.iter().find(|s| s.spiffe_id() == id),
        }
    }

    async fn open(mut c: WorkloadApiClient) -> Result<BoxStream<X509Context>, ClientError> {
        Ok(Box::pin(c.watch_x509_context().await?))
    }

    impl WorkloadX509Source {
        /// Connects, waits for the first X.509-SVID (so handshakes can start
        /// right away), then follows the stream. Uses the default (first)
        /// SVID of each update.
        pub async fn start(endpoint: Endpoint) -> Result<Self, ClientError> {
            Self::start_inner(endpoint, None).await
        }

        /// Like [`Self::start`], for a workload with several identities:
        /// always uses the SVID for `spiffe_id`.
        pub async fn start_for(
            endpoint: Endpoint,
            spiffe_id: SpiffeId,
        ) -> Result<Self, ClientError> {
            Self::start_inner(endpoint, Some(spiffe_id)).await
        }

        async fn start_inner(
            endpoint: Endpoint,
            wanted: Option<SpiffeId>,
        ) -> Result<Self, ClientError> {
            let client = WorkloadApiClient::connect(&endpoint).await?;
            let mut stream = open(client).await?;
            let first = stream.next().await.ok_or(ClientError::StreamEnded)??;
            let svid = pick(&first, wanted.as_ref()).ok_or_else(|| {
                ClientError::InvalidResponse(match &wanted {
                    Some(id) => format!("no X.509-SVID for {id}"),
                    None => "no X.509-SVID in the response".into(),
                })
            })?;
            let resolver = Arc::new(
                SvidResolver::new(svid).map_err(|e| ClientError::InvalidResponse(e.to_string()))?,
            );
            let bundles = Arc::new(SharedBundles::new(first.bundles.clone()));
            let (tx, rx) = watch::channel(Arc::new(svid.clone()));
            let (r, b) = (resolver.clone(), bundles.clone());
            let apply = move |ctx: X509Context| {
                let Some(svid) = pick(&ctx, wanted.as_ref()) else {
                    return;
                };
                if r.update(svid).is_err() {
                    return;
                }
                b.update(ctx.bundles.clone());
                tx.send_if_modified(|cur| {
                    if cur.leaf() == svid.leaf() {
                        return false;
                    }
                    *cur = Arc::new(svid.clone());
                    true
                });
            };
            let task = tokio::spawn(follow(endpoint, stream, open, apply));
            Ok(Self {
                resolver,
                bundles,
                svid: rx,
                task,
            })
        }

        /// Presents the current SVID, for [`mtls_server_config`] /
        /// [`mtls_client_config`].
        pub fn resolver(&self) -> Arc<SvidResolver> {
            self.resolver.clone()
        }

        /// The current X.509 bundles, for the same functions.
        pub fn bundles(&self) -> Arc<dyn BundleSource> {
            self.bundles.clone()
        }

        /// The current SVID.
        pub fn svid(&self) -> Arc<X509Svid> {
            self.svid.borrow().clone()
        }

        /// The current SVID's SPIFFE ID.
        pub fn spiffe_id(&self) -> SpiffeId {
            self.svid.borrow().spiffe_id().clone()
        }

        /// Changes whenever the SVID is replaced (`changed().await`).
        pub fn updates(&self) -> watch::Receiver<Arc<X509Svid>> {
            self.svid.clone()
        }

        /// [`mtls_server_config`] with this source: presents the current
        /// SVID, requires a client SVID `authorizer` accepts.
        pub fn server_config(
            &self,
            authorizer: Arc<dyn Authorizer>,
        ) -> Result<rustls::ServerConfig, TlsError> {
            mtls_server_config(self.resolver(), self.bundles(), authorizer)
        }

        /// [`mtls_client_config`] with this source: presents the current
        /// SVID, requires a server SVID `authorizer` accepts.
        pub fn client_config(
            &self,
            authorizer: Arc<dyn Authorizer>,
        ) -> Result<rustls::ClientConfig, TlsError> {
            mtls_client_config(Some(self.resolver()), self.bundles(), authorizer)
        }
    }

    impl Drop for WorkloadX509Source {
        fn drop(&mut self) {
            self.task.abort();
        }
    }
}

/// A gRPC channel to a Workload API endpoint (Unix socket or TCP).
pub(crate) async fn connect_channel(endpoint: &Endpoint) -> Result<Channel, ClientError> {
    match endpoint {
        Endpoint::Unix(path) => {
            let path = path.clone();
            tonic::transport::Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await
        }
        Endpoint::Tcp(addr) => {
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| ClientError::Connect(e.to_string()))?
                .connect()
                .await
        }
    }
    .map_err(|e| ClientError::Connect(format!("{}: {e}", endpoint.to_uri())))
}
