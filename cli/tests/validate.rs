//! `sigil validate` as a user runs it: the real binary, real files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use sigil::bundle::{Bundle, JwtKey};
use sigil::svid::jwt::{JwtSigner, JwtSvidClaims, random_jti};
use sigil::{PrivateKey, SpiffeId, TrustDomain};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

fn sigil(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(args)
        .output()
        .unwrap()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn stderr_line(o: &Output) -> String {
    let s = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(
        s.trim_end().lines().count(),
        1,
        "exactly one line on stderr: {s:?}"
    );
    s
}

struct JwtFixture {
    dir: tempfile::TempDir,
    signer: JwtSigner,
}

fn jwt_fixture() -> JwtFixture {
    let dir = tempfile::tempdir().unwrap();
    let signer = JwtSigner::new("k1", &PrivateKey::generate_p256().unwrap()).unwrap();
    let mut b = Bundle::empty(TrustDomain::new("example.org").unwrap());
    b.jwt
        .add_key(JwtKey::from_sec1("k1", &signer.public_key_sec1()).unwrap())
        .unwrap();
    std::fs::write(dir.path().join("spiffe.json"), b.to_spiffe_json()).unwrap();
    std::fs::write(dir.path().join("plain.jwks"), b.jwt.to_jwks_json()).unwrap();
    JwtFixture { dir, signer }
}

impl JwtFixture {
    fn token(&self, sub: &str, aud: &str, ttl: i64) -> String {
        self.signer
            .sign(&JwtSvidClaims {
                sub: SpiffeId::parse(sub).unwrap(),
                aud: aud.into(),
                exp: now() + ttl,
                iat: now(),
                jti: random_jti(),
                iss: None,
                acr: Some("sigil:al1".into()),
                amr: vec!["join_token".into()],
                cnf: None,
            })
            .unwrap()
    }
    fn bundle_arg(&self, file: &str) -> String {
        format!("example.org={}", self.dir.path().join(file).display())
    }
}

#[test]
fn jwt_valid_prints_claims() {
    let f = jwt_fixture();
    let t = f.token("spiffe://example.org/agent", "ehr-fhir", 300);
    for file in ["spiffe.json", "plain.jwks"] {
        let o = sigil(&[
            "validate",
            "jwt",
            "--audience",
            "ehr-fhir",
            "--bundle",
            &f.bundle_arg(file),
            &t,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["spiffe_id"], "spiffe://example.org/agent");
        assert_eq!(v["audience"][0], "ehr-fhir");
        assert_eq!(v["acr"], "sigil:al1");
    }
}

#[test]
fn jwt_from_stdin() {
    use std::io::Write;
    let f = jwt_fixture();
    let t = f.token("spiffe://example.org/agent", "ehr-fhir", 300);
    let mut child = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args([
            "validate",
            "jwt",
            "--audience",
            "ehr-fhir",
            "--bundle",
            &f.bundle_arg("spiffe.json"),
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{t}\n").as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn jwt_refusals_exit_1_with_one_line() {
    let f = jwt_fixture();
    let arg = f.bundle_arg("spiffe.json");
    let cases = [
        (
            f.token("spiffe://example.org/agent", "calendar", 300),
            "audience",
        ),
        (
            f.token("spiffe://example.org/agent", "ehr-fhir", -120),
            "expired",
        ),
        ("not-a-token".to_string(), "three"),
    ];
    for (t, reason) in cases {
        let o = sigil(&[
            "validate",
            "jwt",
            "--audience",
            "ehr-fhir",
            "--bundle",
            &arg,
            &t,
        ]);
        assert_eq!(o.status.code(), Some(1));
        assert!(o.stdout.is_empty());
        let line = stderr_line(&o);
        assert!(line.contains(reason), "{line}");
        assert!(!line.contains(&t) || t == "not-a-token", "token echoed");
    }
    // A token from other.org is checked only against other.org's bundle;
    // with none given, it is refused.
    let t = f.token("spiffe://other.org/agent", "ehr-fhir", 300);
    let o = sigil(&[
        "validate",
        "jwt",
        "--audience",
        "ehr-fhir",
        "--bundle",
        &arg,
        &t,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr_line(&o).contains("other.org"));
}

#[test]
fn usage_errors_exit_2() {
    let f = jwt_fixture();
    let t = f.token("spiffe://example.org/agent", "ehr-fhir", 300);
    // No TD= prefix.
    let o = sigil(&[
        "validate",
        "jwt",
        "--audience",
        "ehr-fhir",
        "--bundle",
        "bundle.json",
        &t,
    ]);
    assert_eq!(o.status.code(), Some(2));
    // No --bundle.
    let o = sigil(&["validate", "jwt", "--audience", "ehr-fhir", &t]);
    assert_eq!(o.status.code(), Some(2));
    // Invalid trust domain.
    let o = sigil(&[
        "validate",
        "jwt",
        "--audience",
        "a",
        "--bundle",
        "Bad.TD=x",
        &t,
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn bad_bundle_file_is_a_failure() {
    let f = jwt_fixture();
    let t = f.token("spiffe://example.org/agent", "ehr-fhir", 300);
    let bad = f.dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"keys":[],"keys":[]}"#).unwrap();
    let o = sigil(&[
        "validate",
        "jwt",
        "--audience",
        "ehr-fhir",
        "--bundle",
        &format!("example.org={}", bad.display()),
        &t,
    ]);
    assert_eq!(o.status.code(), Some(1));
    stderr_line(&o);
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let body: Vec<String> = b
        .as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8_lossy(c).into())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        body.join("\n")
    )
}

fn x509_files(dir: &Path, leaf_is_ca: bool) -> (String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_der = ca.self_signed(&ca_key).unwrap().der().to_vec();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names = vec![SanType::URI(
        "spiffe://example.org/tool".try_into().unwrap(),
    )];
    leaf.is_ca = if leaf_is_ca {
        IsCa::Ca(BasicConstraints::Unconstrained)
    } else {
        IsCa::ExplicitNoCa
    };
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let issuer = Issuer::from_params(&ca, &ca_key);
    let leaf_der = leaf
        .signed_by(&KeyPair::generate().unwrap(), &issuer)
        .unwrap()
        .der()
        .to_vec();
    let bundle = dir.join("bundle.pem");
    let chain = dir.join("chain.pem");
    std::fs::write(&bundle, pem("CERTIFICATE", &ca_der)).unwrap();
    std::fs::write(&chain, pem("CERTIFICATE", &leaf_der)).unwrap();
    (
        format!("example.org={}", bundle.display()),
        chain.display().to_string(),
    )
}

#[test]
fn x509_valid_and_hostile() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, chain) = x509_files(dir.path(), false);
    let o = sigil(&["validate", "x509", "--bundle", &bundle, &chain]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["spiffe_id"], "spiffe://example.org/tool");

    let dir = tempfile::tempdir().unwrap();
    let (bundle, chain) = x509_files(dir.path(), true);
    let o = sigil(&["validate", "x509", "--bundle", &bundle, &chain]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr_line(&o).contains("CA"));

    // Right chain, bundle for the wrong trust domain only.
    let dir = tempfile::tempdir().unwrap();
    let (bundle, chain) = x509_files(dir.path(), false);
    let other = bundle.replacen("example.org=", "other.org=", 1);
    let o = sigil(&["validate", "x509", "--bundle", &other, &chain]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr_line(&o).contains("example.org"));
}
