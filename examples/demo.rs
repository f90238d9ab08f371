//! A self-contained tour of what the `sigil` library checks, for tool
//! authors: it makes a throw-away trust domain key, mints JWT-SVIDs the way
//! the Sigil server does, writes the bundle and tokens to a directory, and
//! validates them for the right and the wrong tool.
//!
//! `cargo run --example demo -- DIR` (the quickstart script calls it).

use sigil::bundle::{Bundle, JwtKey};
use sigil::svid::jwt::{JwtSigner, JwtSvidClaims, random_jti};
use sigil::{JwtSvidValidator, PrivateKey, SpiffeId, TrustDomain};
use std::time::{SystemTime, UNIX_EPOCH};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "sigil-demo".into()),
    );
    std::fs::create_dir_all(&dir)?;
    let td = TrustDomain::new("demo.sigil.local")?;
    let signer = JwtSigner::new("demo-key-1", &PrivateKey::generate_p256()?)?;
    let mut bundle = Bundle::empty(td.clone());
    bundle
        .jwt
        .add_key(JwtKey::from_sec1(signer.kid(), &signer.public_key_sec1())?)?;
    let bundle_path = dir.join("bundle.json");
    std::fs::write(&bundle_path, bundle.to_spiffe_json())?;

    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let agent = SpiffeId::parse("spiffe://demo.sigil.local/agent/triage")?;
    let mint = |aud: &str| {
        signer.sign(&JwtSvidClaims {
            sub: agent.clone(),
            aud: aud.into(),
            exp: now + 300,
            iat: now,
            jti: random_jti(),
            iss: None,
            acr: Some(sigil::AssuranceLevel::Al1.acr().into()),
            amr: vec!["join_token".into(), "peercred".into()],
            cnf: None,
        })
    };
    let ehr = mint("ehr-fhir")?;
    let cal = mint("calendar")?;
    std::fs::write(dir.join("ehr-fhir.jwt"), &ehr)?;
    std::fs::write(dir.join("calendar.jwt"), &cal)?;

    let bundles = [bundle].into_iter().collect();
    let ehr_tool = JwtSvidValidator::new("ehr-fhir");
    let ok = ehr_tool.validate(&ehr, &bundles, SystemTime::now())?;
    println!(
        "ehr-fhir tool, token for ehr-fhir : accepted {} ({})",
        ok.spiffe_id(),
        ok.acr().unwrap_or("-")
    );
    match ehr_tool.validate(&cal, &bundles, SystemTime::now()) {
        Ok(_) => println!("ehr-fhir tool, token for calendar : ACCEPTED (this is a bug)"),
        Err(e) => println!("ehr-fhir tool, token for calendar : refused: {e}"),
    }
    println!();
    println!(
        "Wrote {}/{{bundle.json,ehr-fhir.jwt,calendar.jwt}}. Try the CLI:",
        dir.display()
    );
    let b = format!("{}={}", td, bundle_path.display());
    println!(
        "  sigil validate jwt --audience ehr-fhir --bundle {b} - < {}",
        dir.join("ehr-fhir.jwt").display()
    );
    println!(
        "  sigil validate jwt --audience ehr-fhir --bundle {b} - < {}",
        dir.join("calendar.jwt").display()
    );
    Ok(())
}
