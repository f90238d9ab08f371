//! The agent's client of the server's node API: gRPC over TLS 1.3,
//! terminated with tokio-rustls.
//!
//! The server is verified as an X.509-SVID `spiffe://<td>/sigil/server`
//! against the trust domain's bundle (first from the operator's
//! `--trust-bundle` file, later from the server's own bundle updates). After
//! attestation every connection presents the agent SVID (mutual TLS); the
//! resolver is swapped on renewal, and new connections use the new SVID.
//!
//! The channel connects lazily and reconnects by itself, so a server outage
//! only fails the calls made during it.

use sigil::proto::node::v1 as pb;
use sigil::source::SharedBundles;
use sigil::tls::{SvidResolver, mtls_client_config};
use sigil::validate::x509::ExactId;
use sigil::{SpiffeId, TrustDomain};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Deadline of every node API call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A node API client.
#[derive(Clone, Debug)]
pub struct NodeClient {
    inner: pb::node_client::NodeClient<Channel>,
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NodeClientError {
    /// TLS configuration.
    #[error(transparent)]
    Tls(#[from] sigil::tls::TlsError),
    /// Bad server address.
    #[error("server address {0:?}: {1}")]
    Address(String, String),
}

/// The SPIFFE ID the server presents.
pub fn server_id(td: &TrustDomain) -> Result<SpiffeId, sigil::IdError> {
    td.id("/sigil/server")
}

impl NodeClient {
    /// A lazily connecting client for `server` (`HOST:PORT`) that trusts
    /// `bundles` and presents `svid` (none before attestation).
    pub fn new(
        server: &str,
        td: &TrustDomain,
        bundles: Arc<SharedBundles>,
        svid: Option<Arc<SvidResolver>>,
    ) -> Result<Self, NodeClientError> {
        let id =
            server_id(td).map_err(|e| NodeClientError::Address(server.into(), e.to_string()))?;
        let mut cfg = mtls_client_config(svid, bundles, Arc::new(ExactId(id)))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let host = server
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .ok_or_else(|| NodeClientError::Address(server.into(), "expected HOST:PORT".into()))?;
        // SNI only: the certificate is checked by SPIFFE ID, not by name.
        let name = rustls_pki_types::ServerName::try_from(host)
            .map_err(|e| NodeClientError::Address(server.into(), e.to_string()))?;
        let endpoint = Endpoint::from_shared(format!("http://{server}"))
            .map_err(|e| NodeClientError::Address(server.into(), e.to_string()))?
            .timeout(CALL_TIMEOUT)
            .connect_timeout(Duration::from_secs(3));
        let addr = server.to_owned();
        let channel = endpoint.connect_with_connector_lazy(tower::service_fn(
            move |_: tonic::transport::Uri| {
                let connector = connector.clone();
                let name = name.clone();
                let addr = addr.clone();
                async move {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                }
            },
        ));
        Ok(Self {
            inner: pb::node_client::NodeClient::new(channel),
        })
    }

    /// The generated client.
    pub fn api(&self) -> pb::node_client::NodeClient<Channel> {
        self.inner.clone()
    }
}
