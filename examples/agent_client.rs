//! A Rust "AI agent" calling the example EHR tool (`examples/ehr_tool.rs`):
//! it asks the local Sigil agent's Workload API for a JWT-SVID for the
//! tool's audience and sends it as `Authorization: Bearer`; with `--mtls URL`
//! it makes the same call over SPIFFE mutual TLS, presenting its X.509-SVID
//! and accepting only a server whose X.509-SVID is of its own trust domain.
//!
//! ```sh
//! SPIFFE_ENDPOINT_SOCKET=unix:///path/api.sock cargo run --example agent_client \
//!   --features tls -- --url http://127.0.0.1:8443/fhir/Patient/example \
//!   [--mtls https://127.0.0.1:8444/fhir/Patient/example]
//! ```
//!
//! Prints one JSON line per call (`transport`, `status`, `body`); exits 1 if
//! any call did not answer 2xx.

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use sigil::endpoint::Endpoint;
use sigil::validate::x509::{ExactId, MemberOf};
use sigil::workload::{WorkloadApiClient, WorkloadX509Source};
use sigil::{Authorizer, SpiffeId};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

#[derive(Debug, Parser)]
#[command(about = "Example AI agent: calls a Sigil-guarded tool with a JWT-SVID")]
struct Args {
    /// The tool's URL over plain HTTP.
    #[arg(long)]
    url: Option<hyper::Uri>,
    /// The tool's URL over SPIFFE mTLS (`https://…`).
    #[arg(long)]
    mtls: Option<hyper::Uri>,
    /// The audience to ask a JWT-SVID for: the tool's name.
    #[arg(long, default_value = "ehr-fhir")]
    audience: String,
    /// Over mTLS, accept only this server SPIFFE ID (default: any ID of
    /// this workload's trust domain).
    #[arg(long)]
    server_id: Option<SpiffeId>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.url.is_none() && args.mtls.is_none() {
        bail!("give --url and/or --mtls");
    }
    let mut client = WorkloadApiClient::connect_env()
        .await
        .context("Workload API")?;
    let jwt = client
        .fetch_jwt_svid(&args.audience, None)
        .await
        .with_context(|| format!("JWT-SVID for {:?}", args.audience))?;
    eprintln!(
        "agent_client: JWT-SVID for {} as {}",
        args.audience, jwt.spiffe_id
    );

    let mut all_ok = true;
    if let Some(url) = &args.url {
        let tcp = connect(url, 80).await?;
        all_ok &= call("http", url, TokioIo::new(tcp), &jwt.token).await?;
    }
    if let Some(url) = &args.mtls {
        // The X.509-SVID and bundles, kept current by the library: a
        // long-running agent would keep `source` and build connections
        // from it across rotations.
        let source = WorkloadX509Source::start(Endpoint::from_env()?)
            .await
            .context("X.509-SVID")?;
        let authorizer: Arc<dyn Authorizer> = match &args.server_id {
            Some(id) => Arc::new(ExactId(id.clone())),
            None => Arc::new(MemberOf(source.spiffe_id().trust_domain())),
        };
        let config = source.client_config(authorizer)?;
        let tcp = connect(url, 443).await?;
        // SVIDs carry no DNS name: the authorizer above is the name check,
        // so the server name only has to be well-formed.
        let name = rustls::pki_types::ServerName::try_from("sigil-peer")?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .context("mTLS handshake")?;
        all_ok &= call("mtls", url, TokioIo::new(tls), &jwt.token).await?;
    }
    if !all_ok {
        std::process::exit(1);
    }
    Ok(())
}

async fn connect(url: &hyper::Uri, default_port: u16) -> anyhow::Result<tokio::net::TcpStream> {
    let host = url.host().ok_or_else(|| anyhow!("{url}: no host"))?;
    let port = url.port_u16().unwrap_or(default_port);
    tokio::net::TcpStream::connect((host, port))
        .await
        .with_context(|| format!("connect {host}:{port}"))
}

/// One HTTP/1.1 GET with the bearer token; prints the outcome as JSON.
async fn call<T>(
    transport: &str,
    url: &hyper::Uri,
    io: TokioIo<T>,
    token: &str,
) -> anyhow::Result<bool>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let host = url.authority().map(|a| a.as_str()).unwrap_or("localhost");
    let path = url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let www = resp
        .headers()
        .get(hyper::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.into_body().collect().await?.to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into()));
    println!(
        "{}",
        serde_json::json!({
            "transport": transport,
            "status": status.as_u16(),
            "www_authenticate": www,
            "body": body,
        })
    );
    Ok(status.is_success())
}
