//! A workload whose key lives in the agent's TPM (its registration entry has
//! `key_binding = "tpm"`) calling the example EHR tool
//! (`examples/ehr_tool.rs`) over SPIFFE mutual TLS, with a JWT-SVID bound to
//! that key.
//!
//! The private key never reaches this process: the agent's workload key
//! service (`sigil.workload.v1` on the Workload API socket) hands out the
//! certificate chain and signs on request. Here it signs the TLS 1.3
//! `CertificateVerify` of the handshake and the DPoP proof (RFC 9449) that
//! makes the key-bound token (`cnf.jkt`) usable.
//!
//! ```sh
//! # the tool, accepting key-bound tokens whose proof names its mTLS origin:
//! cargo run --example ehr_tool --features layer,tls -- --listen 127.0.0.1:8443 \
//!   --mtls-listen 127.0.0.1:8444 --proof-origin https://127.0.0.1:8444
//! # the workload (an entry with --key-binding tpm on a `sigil-agent --tpm` node):
//! SPIFFE_ENDPOINT_SOCKET=unix:///path/api.sock cargo run --example tpm_workload \
//!   --features tls -- --url https://127.0.0.1:8444/fhir/Patient/example
//! ```
//!
//! Prints one JSON line (`status`, `body`, the SPIFFE ID and the key's
//! thumbprint); exits 1 unless the tool answered 2xx.

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use sigil::bundle::{Bundle, X509Bundle};
use sigil::endpoint::Endpoint;
use sigil::source::SharedBundles;
use sigil::tls::{SvidResolver, mtls_client_config};
use sigil::validate::pop::{ProofRequest, build_proof, key_thumbprint};
use sigil::validate::x509::{ExactId, MemberOf};
use sigil::workload_keys::{TpmKeySigner, WorkloadKeysClient};
use sigil::{Authorizer, SpiffeId};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Parser)]
#[command(about = "Example workload with a TPM-bound key: mTLS and a DPoP-bound JWT-SVID")]
struct Args {
    /// The tool's URL over SPIFFE mTLS (`https://…`).
    #[arg(long)]
    url: hyper::Uri,
    /// The audience to ask a JWT-SVID for: the tool's name.
    #[arg(long, default_value = "ehr-fhir")]
    audience: String,
    /// Which of this workload's TPM-bound identities to use (default: the
    /// first).
    #[arg(long)]
    spiffe_id: Option<SpiffeId>,
    /// Accept only this server SPIFFE ID (default: any ID of this
    /// workload's trust domain).
    #[arg(long)]
    server_id: Option<SpiffeId>,
    /// Seconds to wait for the agent to have the TPM-bound SVID.
    #[arg(long, default_value_t = 30)]
    wait_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let endpoint = Endpoint::from_env().context("SPIFFE_ENDPOINT_SOCKET")?;
    let mut keys = WorkloadKeysClient::connect(&endpoint)
        .await
        .context("workload key service")?;

    // The certificate chain of the TPM-bound SVID (no private key).
    let wait = Duration::from_secs(args.wait_secs);
    let svids = tokio::time::timeout(wait, keys.fetch_x509_svids())
        .await
        .map_err(|_| anyhow!("no TPM-bound X.509-SVID within {wait:?}"))?
        .context("TPM-bound X.509-SVIDs")?;
    let svid = match &args.spiffe_id {
        Some(id) => svids.iter().find(|s| s.spiffe_id() == id),
        None => svids.first(),
    }
    .ok_or_else(|| anyhow!("no TPM-bound X.509-SVID for this workload"))?;
    let td = svid.spiffe_id().trust_domain();

    // Signs through the agent; every signature is made by the TPM.
    let signer = TpmKeySigner::start(endpoint.clone(), svid)?;
    let jkt = key_thumbprint(&signer);

    // mTLS: the TPM key signs the handshake.
    let bundles = [Bundle {
        x509: X509Bundle::from_ders(td.clone(), svid.bundle().to_vec())?,
        ..Bundle::empty(td.clone())
    }]
    .into_iter()
    .collect();
    let authorizer: Arc<dyn Authorizer> = match &args.server_id {
        Some(id) => Arc::new(ExactId(id.clone())),
        None => Arc::new(MemberOf(td.clone())),
    };
    let config = mtls_client_config(
        Some(Arc::new(SvidResolver::with_signing_key(
            svid.chain().to_vec(),
            signer.signing_key(),
        ))),
        Arc::new(SharedBundles::new(bundles)),
        authorizer,
    )?;

    // A JWT-SVID bound to the key, and its proof for this one request.
    let jwt = keys
        .fetch_bound_jwt_svid(&args.audience, Some(svid.spiffe_id().as_str()))
        .await
        .with_context(|| format!("key-bound JWT-SVID for {:?}", args.audience))?;
    let url = args.url.to_string();
    let (proof_signer, token) = (signer.clone(), jwt.token.clone());
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    // The signer blocks for a round trip to the agent: not on the runtime.
    let proof = tokio::task::spawn_blocking(move || {
        build_proof(
            &proof_signer,
            &token,
            &ProofRequest {
                method: "GET",
                uri: &url,
            },
            now,
        )
    })
    .await??;

    let host = args.url.host().ok_or_else(|| anyhow!("--url: no host"))?;
    let port = args.url.port_u16().unwrap_or(443);
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .with_context(|| format!("connect {host}:{port}"))?;
    // SVIDs carry no DNS name: the authorizer is the name check.
    let name = rustls::pki_types::ServerName::try_from("sigil-peer")?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .context("mTLS handshake with the TPM-bound key")?;

    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let authority = args.url.authority().map(|a| a.as_str()).unwrap_or(host);
    let path = args.url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::AUTHORIZATION, format!("DPoP {}", jwt.token))
        .header("dpop", proof)
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into()));
    println!(
        "{}",
        serde_json::json!({
            "transport": "mtls+dpop",
            "spiffe_id": svid.spiffe_id().to_string(),
            "jkt": jkt,
            "status": status.as_u16(),
            "body": body,
        })
    );
    if !status.is_success() {
        bail!("the tool answered {status}");
    }
    Ok(())
}
