//! A SPIFFE Workload API client (feature `workload-client`).
//!
//! It connects to the endpoint named by `SPIFFE_ENDPOINT_SOCKET` (or one you
//! give), sends the `workload.spiffe.io: true` header on every call, and turns
//! responses into checked Sigil types: every X.509-SVID is parsed with the
//! SPIFFE certificate rules, every bundle with the bundle load checks.

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
        let mut client = WorkloadApiClient::connect(&endpoint).await?;
        let mut stream = client.watch_jwt_bundles().await?;
        let first = stream.next().await.ok_or(ClientError::StreamEnded)??;
        let shared = std::sync::Arc::new(crate::source::SharedBundles::new(first));
        let s = shared.clone();
        let task = tokio::spawn(async move {
            type Jwks =
                std::pin::Pin<Box<dyn Stream<Item = Result<BundleSet, ClientError>> + Send>>;
            let mut stream: Option<Jwks> = Some(Box::pin(stream));
            let mut backoff = std::time::Duration::from_millis(100);
            loop {
                if let Some(st) = stream.as_mut() {
                    while let Some(msg) = st.next().await {
                        match msg {
                            Ok(set) => {
                                s.update(set);
                                backoff = std::time::Duration::from_millis(100);
                            }
                            // An invalid update is dropped; the stream ends or
                            // carries on, and the last good set stays.
                            Err(ClientError::InvalidResponse(_)) => {}
                            Err(_) => break,
                        }
                    }
                }
                stream = None;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
                if let Ok(mut c) = WorkloadApiClient::connect(&endpoint).await
                    && let Ok(st) = c.watch_jwt_bundles().await
                {
                    stream = Some(Box::pin(st));
                }
            }
        });
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
