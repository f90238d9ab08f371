//! `sigil fetch x509|jwt|bundle`: the Workload API from the command line.

use anyhow::{Context, Result};
use clap::Subcommand;
use sigil::SpiffeId;
use sigil::endpoint::Endpoint;
use sigil::workload::WorkloadApiClient;
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fetch the caller's X.509-SVIDs; with --out, write svid.pem, svid.key
    /// (mode 0600) and bundle.pem there.
    X509 {
        /// Directory to write the files to.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Workload API address (default: $SPIFFE_ENDPOINT_SOCKET).
        #[arg(long, value_name = "unix:///PATH")]
        socket: Option<String>,
    },
    /// Fetch a JWT-SVID for one audience (the tool it is for) and print it.
    Jwt {
        /// The tool the token is for.
        #[arg(long)]
        audience: String,
        /// Pick one of several identities.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Workload API address (default: $SPIFFE_ENDPOINT_SOCKET).
        #[arg(long, value_name = "unix:///PATH")]
        socket: Option<String>,
    },
    /// Print the trust bundles: X.509 authorities as PEM, or the JWT keys as
    /// JWKS with --jwt.
    Bundle {
        /// Print JWT bundles (JWKS) instead of X.509 bundles.
        #[arg(long)]
        jwt: bool,
        /// Workload API address (default: $SPIFFE_ENDPOINT_SOCKET).
        #[arg(long, value_name = "unix:///PATH")]
        socket: Option<String>,
    },
}

fn endpoint(socket: Option<String>) -> Result<Endpoint> {
    Ok(match socket {
        Some(s) => Endpoint::parse(&s)?,
        None => Endpoint::from_env()?,
    })
}

pub fn run(cmd: Command) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        match cmd {
            Command::X509 { out, socket } => {
                let mut c = WorkloadApiClient::connect(&endpoint(socket)?).await?;
                let ctx = c.fetch_x509_context().await?;
                for svid in &ctx.svids {
                    println!("{}\texpires {}", svid.spiffe_id(), svid.not_after());
                }
                if let (Some(dir), Some(svid)) = (out, ctx.default_svid()) {
                    let td = svid.spiffe_id().trust_domain();
                    let bundle = ctx
                        .bundles
                        .get(&td)
                        .map(|b| b.x509.to_pem())
                        .unwrap_or_default();
                    write_files(&dir, &svid.chain_pem(), &svid.key_pem(), &bundle)?;
                    println!("wrote {}/{{svid.pem,svid.key,bundle.pem}}", dir.display());
                }
                Ok(())
            }
            Command::Jwt {
                audience,
                spiffe_id,
                socket,
            } => {
                let id = spiffe_id.as_deref().map(SpiffeId::parse).transpose()?;
                let mut c = WorkloadApiClient::connect(&endpoint(socket)?).await?;
                let svid = c.fetch_jwt_svid(&audience, id.as_ref()).await?;
                println!("{}", svid.token);
                Ok(())
            }
            Command::Bundle { jwt, socket } => {
                let mut c = WorkloadApiClient::connect(&endpoint(socket)?).await?;
                if jwt {
                    for b in c.fetch_jwt_bundles().await?.iter() {
                        println!("{}\t{}", b.trust_domain(), b.jwt.to_jwks_json());
                    }
                } else {
                    for b in c.fetch_x509_bundles().await?.iter() {
                        print!("{}", b.x509.to_pem());
                    }
                }
                Ok(())
            }
        }
    })
}

fn write_files(dir: &Path, chain: &str, key: &str, bundle: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("svid.pem"), chain)?;
    std::fs::write(dir.join("bundle.pem"), bundle)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join("svid.key"))
        .context("cannot write svid.key")?;
    f.write_all(key.as_bytes())?;
    Ok(())
}
