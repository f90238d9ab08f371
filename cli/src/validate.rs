//! `sigil validate jwt|x509`.

use anyhow::{Context, Result, anyhow};
use clap::{Args, Subcommand};
use serde_json::json;
use sigil::bundle::{Bundle, BundleSet};
use sigil::validate::x509::AnyId;
use sigil::{JwtSvidValidator, TrustDomain};
use std::io::Read;
use std::path::PathBuf;
use std::time::SystemTime;

/// `TD=FILE`: a bundle file anchoring one trust domain.
#[derive(Debug, Clone)]
pub struct BundleArg {
    td: TrustDomain,
    file: PathBuf,
}

fn parse_bundle_arg(s: &str) -> Result<BundleArg, String> {
    let (td, file) = s
        .split_once('=')
        .ok_or_else(|| "expected TD=FILE, e.g. example.org=bundle.json".to_string())?;
    let td = TrustDomain::new(td).map_err(|e| format!("trust domain {td:?}: {e}"))?;
    if file.is_empty() {
        return Err("missing FILE after TD=".into());
    }
    Ok(BundleArg {
        td,
        file: file.into(),
    })
}

#[derive(Debug, Args)]
pub struct Bundles {
    /// A bundle anchoring one trust domain: TD=FILE, where FILE is a SPIFFE
    /// bundle (JSON), a plain JWKS or PEM certificates. Repeat for several
    /// trust domains; an SVID is only ever checked against the bundle of its
    /// own trust domain.
    #[arg(long = "bundle", value_name = "TD=FILE", required = true, value_parser = parse_bundle_arg)]
    bundles: Vec<BundleArg>,
}

impl Bundles {
    fn load(&self) -> Result<BundleSet> {
        let mut set = BundleSet::new();
        for b in &self.bundles {
            if set.get(&b.td).is_some() {
                return Err(anyhow!("trust domain {} given twice", b.td));
            }
            let bytes = std::fs::read(&b.file)
                .with_context(|| format!("cannot read bundle {}", b.file.display()))?;
            let bundle = Bundle::parse_any(b.td.clone(), &bytes)
                .with_context(|| format!("bundle {}", b.file.display()))?;
            set.insert(bundle);
        }
        Ok(set)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a JWT-SVID for this tool's audience; prints the verified
    /// claims as JSON.
    Jwt {
        /// This tool's audience: the token's `aud` must be exactly this.
        #[arg(long)]
        audience: String,
        #[command(flatten)]
        bundles: Bundles,
        /// Accept tokens that name several audiences (one of them ours).
        #[arg(long)]
        allow_multiple_audiences: bool,
        /// The token, or `-` to read it from standard input.
        token: String,
    },
    /// Validate an X.509-SVID chain (PEM, leaf first, then intermediates);
    /// prints the verified SPIFFE ID as JSON.
    X509 {
        #[command(flatten)]
        bundles: Bundles,
        /// PEM file with the chain.
        chain: PathBuf,
    },
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Jwt {
            audience,
            bundles,
            allow_multiple_audiences,
            token,
        } => {
            let set = bundles.load()?;
            let token = if token == "-" {
                let mut s = String::new();
                // Read at most a little over the validator's cap.
                std::io::stdin()
                    .take((sigil::validate::jwt::DEFAULT_MAX_TOKEN_BYTES + 2) as u64)
                    .read_to_string(&mut s)
                    .context("cannot read the token from stdin")?;
                s.trim().to_owned()
            } else {
                token
            };
            let mut v = JwtSvidValidator::new(audience);
            if allow_multiple_audiences {
                v = v.allow_multiple_audiences();
            }
            let ok = v.validate(&token, &set, SystemTime::now())?;
            let out = json!({
                "spiffe_id": ok.spiffe_id(),
                "audience": ok.audience(),
                "expiry": ok.expiry(),
                "issued_at": ok.issued_at(),
                "jti": ok.jti(),
                "kid": ok.kid(),
                "acr": ok.acr(),
                "amr": ok.amr(),
                "claims": ok.claims(),
            });
            println!("{out:#}");
            Ok(())
        }
        Command::X509 { bundles, chain } => {
            let set = bundles.load()?;
            let pem = std::fs::read(&chain)
                .with_context(|| format!("cannot read chain {}", chain.display()))?;
            let certs = read_pem_certs(&pem)?;
            let ok = sigil::verify_x509_svid(&certs, &set, SystemTime::now(), &AnyId)?;
            let out = json!({
                "spiffe_id": ok.spiffe_id(),
                "not_after": ok.not_after(),
            });
            println!("{out:#}");
            Ok(())
        }
    }
}

fn read_pem_certs(pem: &[u8]) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow!("chain file is not valid PEM"))?;
    if certs.is_empty() {
        return Err(anyhow!("chain file holds no certificate"));
    }
    Ok(certs)
}
