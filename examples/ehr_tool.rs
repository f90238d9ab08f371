//! A small EHR/FHIR tool that AI agents call: it admits only JWT-SVIDs for
//! its own audience, `ehr-fhir`, whose assurance level is at least
//! `--min-assurance`, logs the caller's SPIFFE ID and answers with a fake
//! FHIR `Patient`.
//!
//! ```sh
//! # bundles from the local agent's Workload API (kept current):
//! SPIFFE_ENDPOINT_SOCKET=unix:///path/api.sock \
//!   cargo run --example ehr_tool --features layer,tls -- --listen 127.0.0.1:8443
//! # or from a bundle file (reloaded when it changes):
//! cargo run --example ehr_tool --features layer,tls -- --listen 127.0.0.1:8443 \
//!   --bundle demo.sigil.local=bundle.json
//! ```
//!
//! With `--mtls-listen ADDR` it also serves the same API over SPIFFE mutual
//! TLS: it presents its own X.509-SVID from the Workload API (swapped when
//! the agent rotates it) and accepts only clients whose X.509-SVID belongs
//! to its own trust domain. The bearer token is still required there: the
//! audience and the assurance level are JWT-SVID claims.
//!
//! The integration itself is the `.layer(JwtSvidLayer::new(…))` line in
//! `main`; everything else is the example's own plumbing.

use anyhow::{Context, anyhow, bail};
use axum::extract::{Extension, Path};
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use sigil::endpoint::Endpoint;
use sigil::layer::{JwtSvidLayer, PolicySet};
use sigil::source::{BundleSource, FileBundleSource};
use sigil::validate::x509::MemberOf;
use sigil::workload::{WorkloadJwtBundleSource, WorkloadX509Source};
use sigil::{AssuranceLevel, SpiffeId, TrustDomain, VerifiedJwtSvid};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

/// This tool's audience: the only `aud` it accepts.
const AUDIENCE: &str = "ehr-fhir";

#[derive(Debug, Parser)]
#[command(about = "Example EHR/FHIR tool guarded by Sigil JWT-SVIDs")]
struct Args {
    /// Plain HTTP address.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Also serve over SPIFFE mTLS on this address (needs the Workload API).
    #[arg(long)]
    mtls_listen: Option<SocketAddr>,
    /// The lowest assurance level admitted: al1 (join token), al2, al3 (TPM).
    #[arg(long, default_value = "al1")]
    min_assurance: AssuranceLevel,
    /// Also accept JWT-SVIDs bound to a TPM key (`cnf`), sent as
    /// `Authorization: DPoP` with a DPoP proof naming this origin plus the
    /// request path, e.g. `https://127.0.0.1:8444` (see tpm_workload).
    #[arg(long)]
    proof_origin: Option<String>,
    /// `TD=FILE`: validate with this bundle file instead of the Workload
    /// API's JWT bundles (repeatable).
    #[arg(long = "bundle", value_name = "TD=FILE")]
    bundles: Vec<String>,
}

/// The SPIFFE ID of a verified mTLS peer, for handlers.
#[derive(Debug, Clone)]
struct PeerX509(SpiffeId);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // The layer logs why it refused a request at debug level.
                .unwrap_or_else(|_| "info,sigil::layer=debug".into()),
        )
        .init();
    let args = Args::parse();

    let bundles: Arc<dyn BundleSource> = if args.bundles.is_empty() {
        let endpoint = Endpoint::from_env().context("SPIFFE_ENDPOINT_SOCKET")?;
        Arc::new(
            WorkloadJwtBundleSource::start(endpoint)
                .await
                .context("JWT bundles from the Workload API")?,
        )
    } else {
        Arc::new(FileBundleSource::new(parse_bundle_args(&args.bundles)?)?)
    };

    let app = Router::new()
        .route("/fhir/Patient/{id}", get(patient))
        // The whole integration: only JWT-SVIDs for this tool, at the
        // required assurance level. Refusals are 401/403 with
        // WWW-Authenticate; the handler only ever sees verified callers.
        .layer({
            let layer = JwtSvidLayer::new(AUDIENCE, bundles)
                .with_policy(PolicySet::new().min_assurance(args.min_assurance));
            match &args.proof_origin {
                Some(origin) => layer.with_proof_origin(origin.clone()),
                None => layer,
            }
        });

    if let Some(addr) = args.mtls_listen {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let mtls = MtlsServer::start().await?;
        tracing::info!(%addr, spiffe_id = %mtls.source.spiffe_id(), "serving SPIFFE mTLS");
        tokio::spawn(mtls.serve(listener, app.clone()));
    }

    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(addr = %args.listen, audience = AUDIENCE, min_assurance = %args.min_assurance, "serving HTTP");
    axum::serve(listener, app).await?;
    Ok(())
}

async fn patient(
    Path(id): Path<String>,
    Extension(caller): Extension<VerifiedJwtSvid>,
    peer: Option<Extension<PeerX509>>,
) -> Json<serde_json::Value> {
    let peer = peer.map(|Extension(PeerX509(p))| p.to_string());
    tracing::info!(
        spiffe_id = %caller.spiffe_id(),
        acr = caller.acr().unwrap_or("none"),
        mtls_peer = peer.as_deref().unwrap_or("-"),
        patient = %id,
        "caller authenticated"
    );
    Json(serde_json::json!({
        "resourceType": "Patient",
        "id": id,
        "name": [{ "family": "Example", "given": ["Pat"] }],
        "birthDate": "1970-01-01",
        "meta": { "source": "sigil-example-ehr" },
        "accessedBy": {
            "spiffeId": caller.spiffe_id().to_string(),
            "acr": caller.acr(),
            "amr": caller.amr(),
            "mtlsPeer": peer,
        },
    }))
}

fn parse_bundle_args(args: &[String]) -> anyhow::Result<Vec<(TrustDomain, PathBuf)>> {
    args.iter()
        .map(|a| {
            let (td, file) = a
                .split_once('=')
                .ok_or_else(|| anyhow!("--bundle {a:?}: expected TD=FILE"))?;
            Ok((TrustDomain::new(td)?, PathBuf::from(file)))
        })
        .collect()
}

/// The mTLS side: the tool's own X.509-SVID and X.509 bundles, kept current
/// from the Workload API by the library ([`WorkloadX509Source`]).
struct MtlsServer {
    source: WorkloadX509Source,
}

impl MtlsServer {
    async fn start() -> anyhow::Result<Self> {
        let endpoint = Endpoint::from_env().context("SPIFFE_ENDPOINT_SOCKET")?;
        let source = WorkloadX509Source::start(endpoint)
            .await
            .context("X.509-SVID from the Workload API")?;
        // Log rotations; the source already applies them to new handshakes.
        let mut updates = source.updates();
        tokio::spawn(async move {
            while updates.changed().await.is_ok() {
                let not_after = updates.borrow_and_update().not_after();
                tracing::info!(not_after, "X.509-SVID rotated");
            }
        });
        Ok(Self { source })
    }

    async fn serve(self, listener: tokio::net::TcpListener, app: Router) {
        let td = self.source.spiffe_id().trust_domain();
        // One line: presents the current SVID, admits clients of this
        // trust domain, both following rotations.
        let config = match self.source.server_config(Arc::new(MemberOf(td.clone()))) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "mTLS config");
                return;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        loop {
            let Ok((tcp, remote)) = listener.accept().await else {
                continue;
            };
            let (acceptor, app, bundles, td) = (
                acceptor.clone(),
                app.clone(),
                self.source.bundles(),
                td.clone(),
            );
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(%remote, error = %e, "mTLS handshake refused");
                        return;
                    }
                };
                // The handshake verified the chain; read the peer's ID.
                let peer = match peer_id(&tls, bundles.as_ref(), &td) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(%remote, error = %e, "mTLS peer");
                        return;
                    }
                };
                let svc = hyper_util::service::TowerToHyperService::new(
                    app.layer(Extension(PeerX509(peer))),
                );
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await
                {
                    tracing::debug!(%remote, error = %e, "mTLS connection");
                }
            });
        }
    }
}

fn peer_id(
    tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    bundles: &dyn BundleSource,
    td: &TrustDomain,
) -> anyhow::Result<SpiffeId> {
    let Some(chain) = tls.get_ref().1.peer_certificates() else {
        bail!("no client certificate");
    };
    let v = sigil::verify_x509_svid(
        chain,
        &bundles.bundles(),
        SystemTime::now(),
        &MemberOf(td.clone()),
    )?;
    Ok(v.spiffe_id().clone())
}
