//! Measures the TPM agent key's and a workload key's signing rates (and
//! attestation costs) on a
//! TPM: `cargo run --release -p sigil-agent --features tpm --example
//! tpm_sign_rate -- swtpm:host=127.0.0.1,port=2321 [N]`.
//!
//! Prints one line per measurement: operations, seconds, operations/s.

use sigil_agent::tpm::Tpm;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let tcti = args
        .next()
        .unwrap_or_else(|| sigil_agent::tpm::DEFAULT_TCTI.to_owned());
    let n: u32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let dir = tempfile::tempdir()?;

    let t = Instant::now();
    let tpm = Tpm::open(&tcti)?;
    println!("open (flush + vendor): {:?}", t.elapsed());

    let t = Instant::now();
    let key = tpm.load_or_create_agent_key(dir.path())?;
    println!("create agent key: {:?}", t.elapsed());
    drop(key);
    let t = Instant::now();
    let key = tpm.load_agent_key(dir.path())?;
    println!("reload agent key from blobs: {:?}", t.elapsed());

    let digest = [7u8; 32];
    let t = Instant::now();
    for _ in 0..n {
        key.sign_digest(&digest)?;
    }
    let s = t.elapsed().as_secs_f64();
    println!("sign_digest: {n} in {s:.3} s = {:.0}/s", f64::from(n) / s);
    let agent_s = s;

    let signer = key.rustls_signing_key();
    let signer = signer
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .ok_or_else(|| anyhow::anyhow!("no scheme"))?;
    let msg = vec![1u8; 130];
    let t = Instant::now();
    for _ in 0..n {
        signer.sign(&msg)?;
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "rustls Signer::sign: {n} in {s:.3} s = {:.0}/s",
        f64::from(n) / s
    );

    // A TPM-bound workload key: loaded from its saved context, signs and is
    // flushed again on every call (nothing stays loaded between calls).
    let wk = tpm.create_workload_key()?;
    let t = Instant::now();
    for _ in 0..n {
        wk.sign_digest(&digest)?;
    }
    let ws = t.elapsed().as_secs_f64();
    println!(
        "workload key sign_digest (load + sign + flush): {n} in {ws:.3} s = {:.0}/s ({:.2}x the agent key's time)",
        f64::from(n) / ws,
        ws / agent_s
    );

    let rounds = 5;
    let t = Instant::now();
    for _ in 0..rounds {
        let att = tpm.start_attestation()?;
        let ek = sigil::tpm::TpmPublic::parse(&att.ek_public()?)?;
        let ak = sigil::tpm::TpmPublic::parse(&att.ak_public()?)?;
        let cred = sigil::tpm::make_credential(&ek, &ak.name(), &[9u8; 32])?;
        let secret = att.activate_credential(&cred.credential_blob, &cred.encrypted_secret)?;
        att.certify(&key, &secret)?;
    }
    println!(
        "attestation (EK + AK + software MakeCredential + ActivateCredential + Certify): {:?} each",
        t.elapsed() / rounds
    );
    Ok(())
}
