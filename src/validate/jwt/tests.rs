//! Conformance table for JWT-SVID validation: every rule has a passing and a
//! failing case, and every hostile token of the foundation issue is here,
//! generated at run time.

use super::*;
use crate::bundle::{Bundle, JwtKey};
use crate::key::PrivateKey;
use crate::svid::jwt::{JwtSigner, JwtSvidClaims};
use crate::{SpiffeId, TrustDomain};
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use serde_json::json;
use std::time::Duration;

const AUD: &str = "ehr-fhir";
const SUB: &str = "spiffe://example.org/agent/triage";

struct Fixture {
    signer: JwtSigner,
    bundles: BundleSet,
    now: SystemTime,
    now_s: i64,
}

fn fixture() -> Fixture {
    let key = PrivateKey::generate_p256().unwrap();
    let signer = JwtSigner::new("k1", &key).unwrap();
    let mut b = Bundle::empty(TrustDomain::new("example.org").unwrap());
    b.jwt
        .add_key(JwtKey::from_sec1("k1", &signer.public_key_sec1()).unwrap())
        .unwrap();
    // A second trust domain with its own key, to prove no cross-domain lookup.
    let other_key = PrivateKey::generate_p256().unwrap();
    let other = JwtSigner::new("k1", &other_key).unwrap();
    let mut ob = Bundle::empty(TrustDomain::new("other.org").unwrap());
    ob.jwt
        .add_key(JwtKey::from_sec1("other-kid", &other.public_key_sec1()).unwrap())
        .unwrap();
    let now_s = 1_900_000_000;
    Fixture {
        signer,
        bundles: [b, ob].into_iter().collect(),
        now: UNIX_EPOCH + Duration::from_secs(now_s as u64),
        now_s,
    }
}

fn header() -> Value {
    json!({"alg": "ES256", "kid": "k1", "typ": "JWT"})
}

fn claims(now: i64) -> Value {
    json!({"sub": SUB, "aud": AUD, "exp": now + 300, "iat": now, "jti": "j1",
           "acr": "sigil:al1", "amr": ["join_token", "peercred"]})
}

impl Fixture {
    fn token(&self, header: &Value, claims: &Value) -> String {
        self.signer
            .sign_raw(header.to_string().as_bytes(), claims.to_string().as_bytes())
            .unwrap()
    }
    fn check(&self, token: &str) -> Result<VerifiedJwtSvid, JwtSvidError> {
        JwtSvidValidator::new(AUD).validate(token, &self.bundles, self.now)
    }
}

fn b64u(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

/// Replaces the signature segment.
fn with_sig(token: &str, sig: &[u8]) -> String {
    let i = token.rfind('.').unwrap();
    format!("{}.{}", &token[..i], b64u(sig))
}

#[test]
fn good_token_and_its_claims() {
    let f = fixture();
    let t = f.token(&header(), &claims(f.now_s));
    let v = f.check(&t).unwrap();
    assert_eq!(v.spiffe_id().as_str(), SUB);
    assert_eq!(v.audience(), [AUD.to_string()]);
    assert_eq!(v.expiry(), f.now_s + 300);
    assert_eq!(v.issued_at(), Some(f.now_s));
    assert_eq!(v.jti(), Some("j1"));
    assert_eq!(v.kid(), "k1");
    assert_eq!(v.assurance(), Some(crate::AssuranceLevel::Al1));
    assert_eq!(v.amr(), ["join_token", "peercred"]);
}

#[test]
fn signer_output_validates() {
    let f = fixture();
    let c = JwtSvidClaims {
        sub: SpiffeId::parse(SUB).unwrap(),
        aud: AUD.into(),
        exp: f.now_s + 60,
        iat: f.now_s,
        jti: crate::svid::jwt::random_jti(),
        iss: None,
        acr: Some("sigil:al3".into()),
        amr: vec!["tpm".into()],
        cnf: Some(crate::svid::jwt::Confirmation { jkt: "abc".into() }),
    };
    // Bound to a key: never valid on its own (see pop/tests.rs for proofs).
    assert_eq!(
        f.check(&f.signer.sign(&c).unwrap()),
        Err(JwtSvidError::ProofRequired)
    );
    let c = JwtSvidClaims { cnf: None, ..c };
    let v = f.check(&f.signer.sign(&c).unwrap()).unwrap();
    assert_eq!(v.assurance(), Some(crate::AssuranceLevel::Al3));
    assert_eq!(v.cnf_jkt(), None);
    assert_eq!(v.jti().map(str::len), Some(22));
}

/// One row per rule; `edit` turns the good header/claims into the case.
#[test]
fn claim_and_header_rules() {
    let f = fixture();
    let n = f.now_s;
    type Case = (&'static str, Value, Value, Result<(), JwtSvidError>);
    let h = header;
    let c = || claims(n);
    let with = |mut v: Value, k: &str, x: Value| {
        v[k] = x;
        v
    };
    let without = |mut v: Value, k: &str| {
        v.as_object_mut().unwrap().remove(k);
        v
    };
    let cases: Vec<Case> = vec![
        // typ
        ("typ JWT", h(), c(), Ok(())),
        ("typ absent", without(h(), "typ"), c(), Ok(())),
        ("typ JOSE", with(h(), "typ", json!("JOSE")), c(), Ok(())),
        (
            "typ other",
            with(h(), "typ", json!("at+jwt")),
            c(),
            Err(JwtSvidError::BadType),
        ),
        (
            "typ number",
            with(h(), "typ", json!(1)),
            c(),
            Err(JwtSvidError::BadType),
        ),
        // header members
        (
            "jwk header",
            with(h(), "jwk", json!({"kty": "EC"})),
            c(),
            Err(JwtSvidError::UnexpectedHeaderMember("jwk".into())),
        ),
        (
            "jku header",
            with(h(), "jku", json!("https://evil/jwks")),
            c(),
            Err(JwtSvidError::UnexpectedHeaderMember("jku".into())),
        ),
        (
            "x5u header",
            with(h(), "x5u", json!("https://evil/x")),
            c(),
            Err(JwtSvidError::UnexpectedHeaderMember("x5u".into())),
        ),
        (
            "crit header",
            with(h(), "crit", json!(["exp"])),
            c(),
            Err(JwtSvidError::UnexpectedHeaderMember("crit".into())),
        ),
        (
            "cty header",
            with(h(), "cty", json!("JWT")),
            c(),
            Err(JwtSvidError::UnexpectedHeaderMember("cty".into())),
        ),
        // alg (signature is ES256 anyway: the header decides nothing)
        (
            "alg ES384",
            with(h(), "alg", json!("ES384")),
            c(),
            Err(JwtSvidError::AlgorithmNotAllowed("ES384".into())),
        ),
        (
            "alg es256",
            with(h(), "alg", json!("es256")),
            c(),
            Err(JwtSvidError::AlgorithmNotAllowed("es256".into())),
        ),
        (
            "alg missing",
            without(h(), "alg"),
            c(),
            Err(JwtSvidError::AlgorithmNotAllowed(String::new())),
        ),
        (
            "alg array",
            with(h(), "alg", json!(["ES256"])),
            c(),
            Err(JwtSvidError::AlgorithmNotAllowed("[\"ES256\"]".into())),
        ),
        // kid
        (
            "kid missing",
            without(h(), "kid"),
            c(),
            Err(JwtSvidError::MissingKeyId),
        ),
        (
            "kid empty",
            with(h(), "kid", json!("")),
            c(),
            Err(JwtSvidError::MissingKeyId),
        ),
        (
            "kid number",
            with(h(), "kid", json!(1)),
            c(),
            Err(JwtSvidError::MissingKeyId),
        ),
        (
            "kid unknown",
            with(h(), "kid", json!("nope")),
            c(),
            Err(JwtSvidError::UnknownKeyId("nope".into())),
        ),
        // sub
        (
            "sub missing",
            h(),
            without(c(), "sub"),
            Err(JwtSvidError::MissingSubject),
        ),
        (
            "sub number",
            h(),
            with(c(), "sub", json!(5)),
            Err(JwtSvidError::BadClaimType("sub")),
        ),
        (
            "sub with ..",
            h(),
            with(c(), "sub", json!("spiffe://example.org/a/../b")),
            Err(JwtSvidError::BadSubject(crate::IdError::DotSegment)),
        ),
        (
            "sub upper-case td",
            h(),
            with(c(), "sub", json!("spiffe://Example.org/a")),
            Err(JwtSvidError::BadSubject(crate::IdError::BadTrustDomainChar)),
        ),
        (
            "sub of unknown td",
            h(),
            with(c(), "sub", json!("spiffe://evil.org/a")),
            Err(JwtSvidError::NoBundleForTrustDomain("evil.org".into())),
        ),
        // Signed by example.org's key, claiming other.org: other.org's bundle
        // has no "k1", and example.org's key is never consulted.
        (
            "sub in another td",
            h(),
            with(c(), "sub", json!("spiffe://other.org/a")),
            Err(JwtSvidError::UnknownKeyId("k1".into())),
        ),
        // exp
        (
            "exp missing",
            h(),
            without(c(), "exp"),
            Err(JwtSvidError::MissingExpiry),
        ),
        (
            "exp string",
            h(),
            with(c(), "exp", json!((n + 300).to_string())),
            Err(JwtSvidError::BadClaimType("exp")),
        ),
        (
            "exp null",
            h(),
            with(c(), "exp", Value::Null),
            Err(JwtSvidError::BadClaimType("exp")),
        ),
        (
            "exp past",
            h(),
            with(c(), "exp", json!(n - 61)),
            Err(JwtSvidError::Expired),
        ),
        (
            "exp within leeway",
            h(),
            with(c(), "exp", json!(n - 59)),
            Ok(()),
        ),
        (
            "exp fractional",
            h(),
            with(c(), "exp", json!(n as f64 + 100.5)),
            Ok(()),
        ),
        // nbf
        ("nbf past", h(), with(c(), "nbf", json!(n - 10)), Ok(())),
        (
            "nbf within leeway",
            h(),
            with(c(), "nbf", json!(n + 59)),
            Ok(()),
        ),
        (
            "nbf future",
            h(),
            with(c(), "nbf", json!(n + 61)),
            Err(JwtSvidError::NotYetValid),
        ),
        (
            "nbf string",
            h(),
            with(c(), "nbf", json!("0")),
            Err(JwtSvidError::BadClaimType("nbf")),
        ),
        // iat
        ("iat missing", h(), without(c(), "iat"), Ok(())),
        (
            "iat future",
            h(),
            with(c(), "iat", json!(n + 61)),
            Err(JwtSvidError::IssuedInFuture),
        ),
        (
            "iat string",
            h(),
            with(c(), "iat", json!("x")),
            Err(JwtSvidError::BadClaimType("iat")),
        ),
        // lifetime
        (
            "lifetime 24h",
            h(),
            with(
                with(c(), "iat", json!(n - 10)),
                "exp",
                json!(n - 10 + 86_400),
            ),
            Ok(()),
        ),
        (
            "lifetime over cap",
            h(),
            with(c(), "exp", json!(n + 86_400 + 61)),
            Err(JwtSvidError::LifetimeTooLong),
        ),
        (
            "lifetime over cap, no iat",
            h(),
            without(with(c(), "exp", json!(n + 90_000)), "iat"),
            Err(JwtSvidError::LifetimeTooLong),
        ),
        // aud
        (
            "aud array of one",
            h(),
            with(c(), "aud", json!([AUD])),
            Ok(()),
        ),
        (
            "aud missing",
            h(),
            without(c(), "aud"),
            Err(JwtSvidError::MissingAudience),
        ),
        (
            "aud null",
            h(),
            with(c(), "aud", Value::Null),
            Err(JwtSvidError::BadClaimType("aud")),
        ),
        (
            "aud number",
            h(),
            with(c(), "aud", json!(1)),
            Err(JwtSvidError::BadClaimType("aud")),
        ),
        (
            "aud object",
            h(),
            with(c(), "aud", json!({"a": AUD})),
            Err(JwtSvidError::BadClaimType("aud")),
        ),
        (
            "aud empty array",
            h(),
            with(c(), "aud", json!([])),
            Err(JwtSvidError::BadClaimType("aud")),
        ),
        (
            "aud array with number",
            h(),
            with(c(), "aud", json!([AUD, 1])),
            Err(JwtSvidError::BadClaimType("aud")),
        ),
        (
            "aud other tool",
            h(),
            with(c(), "aud", json!("calendar")),
            Err(JwtSvidError::AudienceMismatch),
        ),
        (
            "aud case-changed",
            h(),
            with(c(), "aud", json!("EHR-FHIR")),
            Err(JwtSvidError::AudienceMismatch),
        ),
        (
            "aud prefix",
            h(),
            with(c(), "aud", json!("ehr-fhir-admin")),
            Err(JwtSvidError::AudienceMismatch),
        ),
        (
            "aud two tools",
            h(),
            with(c(), "aud", json!([AUD, "calendar"])),
            Err(JwtSvidError::MultipleAudiences),
        ),
        // optional typed claims
        (
            "acr number",
            h(),
            with(c(), "acr", json!(3)),
            Err(JwtSvidError::BadClaimType("acr")),
        ),
        (
            "amr string",
            h(),
            with(c(), "amr", json!("tpm")),
            Err(JwtSvidError::BadClaimType("amr")),
        ),
        (
            "cnf without jkt",
            h(),
            with(c(), "cnf", json!({"jwk": {}})),
            Err(JwtSvidError::BadClaimType("cnf")),
        ),
    ];
    for (name, h, c, want) in cases {
        let got = f.check(&f.token(&h, &c)).map(|_| ());
        assert_eq!(got, want, "case {name}");
    }
}

#[test]
fn multiple_audiences_when_allowed() {
    let f = fixture();
    let mut c = claims(f.now_s);
    c["aud"] = json!(["calendar", AUD]);
    let t = f.token(&header(), &c);
    let v = JwtSvidValidator::new(AUD)
        .allow_multiple_audiences()
        .validate(&t, &f.bundles, f.now)
        .unwrap();
    assert_eq!(v.audience().len(), 2);
}

#[test]
fn alg_none_in_every_case() {
    let f = fixture();
    let c = claims(f.now_s);
    for alg in ["none", "None", "NONE", "nOnE"] {
        let h = json!({"alg": alg, "kid": "k1"});
        let unsigned = format!(
            "{}.{}.",
            b64u(h.to_string().as_bytes()),
            b64u(c.to_string().as_bytes())
        );
        assert_eq!(
            f.check(&unsigned),
            Err(JwtSvidError::AlgorithmNotAllowed(alg.into())),
            "{alg}"
        );
        // Also with the real signature attached.
        let signed = f.token(&h, &c);
        assert_eq!(
            f.check(&signed),
            Err(JwtSvidError::AlgorithmNotAllowed(alg.into()))
        );
    }
}

#[test]
fn hs256_keyed_with_the_public_key() {
    let f = fixture();
    let h = json!({"alg": "HS256", "kid": "k1", "typ": "JWT"});
    let c = claims(f.now_s);
    let signing_input = format!(
        "{}.{}",
        b64u(h.to_string().as_bytes()),
        b64u(c.to_string().as_bytes())
    );
    // The classic confusion: HMAC keyed with the (public) verification key,
    // in both of its common encodings.
    let point = f.signer.public_key_sec1();
    for key in [
        point.clone(),
        f.bundles
            .iter()
            .next()
            .unwrap()
            .jwt
            .to_jwks_json()
            .into_bytes(),
    ] {
        let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key);
        let tag = aws_lc_rs::hmac::sign(&k, signing_input.as_bytes());
        let token = format!("{signing_input}.{}", b64u(tag.as_ref()));
        assert_eq!(
            f.check(&token),
            Err(JwtSvidError::AlgorithmNotAllowed("HS256".into()))
        );
    }
    // Even if the header said ES256, a 32-byte HMAC tag is not a signature.
    let h = header();
    let signing_input = format!(
        "{}.{}",
        b64u(h.to_string().as_bytes()),
        b64u(c.to_string().as_bytes())
    );
    let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &point);
    let tag = aws_lc_rs::hmac::sign(&k, signing_input.as_bytes());
    let token = format!("{signing_input}.{}", b64u(tag.as_ref()));
    assert_eq!(f.check(&token), Err(JwtSvidError::MalformedSignature));
}

#[test]
fn signature_rules() {
    let f = fixture();
    let good = f.token(&header(), &claims(f.now_s));
    assert!(f.check(&good).is_ok());
    // r = s = 0: the "psychic signature".
    assert_eq!(
        f.check(&with_sig(&good, &[0u8; 64])),
        Err(JwtSvidError::MalformedSignature)
    );
    // r = n, s = n (out of range).
    let mut nn = P256_ORDER.to_vec();
    nn.extend_from_slice(&P256_ORDER);
    assert_eq!(
        f.check(&with_sig(&good, &nn)),
        Err(JwtSvidError::MalformedSignature)
    );
    // DER-encoded (ASN.1) signature over the same input.
    let i = good.rfind('.').unwrap();
    let key = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &aws_lc_rs::rand::SystemRandom::new(),
    )
    .unwrap();
    let kp = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        key.as_ref(),
    )
    .unwrap();
    let der = kp
        .sign(&aws_lc_rs::rand::SystemRandom::new(), &good.as_bytes()[..i])
        .unwrap();
    assert_eq!(
        f.check(&with_sig(&good, der.as_ref())),
        Err(JwtSvidError::MalformedSignature)
    );
    // A valid-looking signature that does not verify (flip one bit of s).
    let mut sig = URL_SAFE_NO_PAD.decode(&good[i + 1..]).unwrap();
    sig[63] ^= 1;
    assert_eq!(
        f.check(&with_sig(&good, &sig)),
        Err(JwtSvidError::BadSignature)
    );
    // A claims segment changed after signing.
    let mut c = claims(f.now_s);
    c["aud"] = json!("calendar");
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64u(c.to_string().as_bytes()),
        parts[2]
    );
    assert_eq!(f.check(&forged), Err(JwtSvidError::BadSignature));
    // Signed by a key that is not in the bundle, same kid.
    let rogue = JwtSigner::new("k1", &PrivateKey::generate_p256().unwrap()).unwrap();
    let t = rogue
        .sign_raw(
            header().to_string().as_bytes(),
            claims(f.now_s).to_string().as_bytes(),
        )
        .unwrap();
    assert_eq!(f.check(&t), Err(JwtSvidError::BadSignature));
}

#[test]
fn encoding_rules() {
    let f = fixture();
    let good = f.token(&header(), &claims(f.now_s));
    let parts: Vec<&str> = good.split('.').collect();
    // Segment count.
    assert_eq!(
        f.check(&parts[..2].join(".")),
        Err(JwtSvidError::NotThreeSegments)
    );
    assert_eq!(
        f.check(&format!("{good}.x")),
        Err(JwtSvidError::NotThreeSegments)
    );
    assert_eq!(f.check(""), Err(JwtSvidError::NotThreeSegments));
    // Padding.
    let padded_h = URL_SAFE.encode(header().to_string().as_bytes());
    if padded_h.ends_with('=') {
        let t = format!("{padded_h}.{}.{}", parts[1], parts[2]);
        assert_eq!(f.check(&t), Err(JwtSvidError::BadBase64(Segment::Header)));
    }
    assert_eq!(
        f.check(&format!("{}.{}.{}=", parts[0], parts[1], parts[2])),
        Err(JwtSvidError::BadBase64(Segment::Signature))
    );
    // Standard alphabet instead of URL-safe.
    let std_sig = STANDARD
        .encode(URL_SAFE_NO_PAD.decode(parts[2]).unwrap())
        .trim_end_matches('=')
        .to_string();
    if std_sig.contains(['+', '/']) {
        let t = format!("{}.{}.{std_sig}", parts[0], parts[1]);
        assert_eq!(
            f.check(&t),
            Err(JwtSvidError::BadBase64(Segment::Signature))
        );
    }
    // Non-canonical base64: a 64-byte signature is 86 chars, whose last char
    // carries 4 unused bits; set one of them.
    let last = parts[2].as_bytes()[85];
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let idx = alphabet.iter().position(|c| *c == last).unwrap();
    let tweaked = alphabet[idx | 1] as char;
    let nc = format!("{}.{}.{}{}", parts[0], parts[1], &parts[2][..85], tweaked);
    if tweaked as u8 != last {
        assert_eq!(
            f.check(&nc),
            Err(JwtSvidError::BadBase64(Segment::Signature))
        );
    }
    // Whitespace inside a segment.
    let t = format!("{} .{}.{}", parts[0], parts[1], parts[2]);
    assert_eq!(f.check(&t), Err(JwtSvidError::BadBase64(Segment::Header)));
    // Header is not an object.
    let t = f
        .signer
        .sign_raw(b"[1]", claims(f.now_s).to_string().as_bytes())
        .unwrap();
    assert!(matches!(
        f.check(&t),
        Err(JwtSvidError::BadJson(Segment::Header, _))
    ));
    // Claims are not JSON.
    let t = f
        .signer
        .sign_raw(header().to_string().as_bytes(), b"not json")
        .unwrap();
    assert!(matches!(
        f.check(&t),
        Err(JwtSvidError::BadJson(Segment::Claims, _))
    ));
}

#[test]
fn duplicate_members() {
    let f = fixture();
    let n = f.now_s;
    // Duplicate aud: the second would win in serde_json's Value.
    let claims = format!(
        r#"{{"sub":"{SUB}","aud":"calendar","aud":"{AUD}","exp":{},"iat":{n}}}"#,
        n + 300
    );
    let t = f
        .signer
        .sign_raw(header().to_string().as_bytes(), claims.as_bytes())
        .unwrap();
    assert!(matches!(
        f.check(&t),
        Err(JwtSvidError::BadJson(Segment::Claims, _))
    ));
    // Duplicate alg in the header.
    let h = r#"{"alg":"none","alg":"ES256","kid":"k1"}"#;
    let c = self::claims(n).to_string();
    let t = f.signer.sign_raw(h.as_bytes(), c.as_bytes()).unwrap();
    assert!(matches!(
        f.check(&t),
        Err(JwtSvidError::BadJson(Segment::Header, _))
    ));
}

#[test]
fn size_cap_comes_first() {
    let f = fixture();
    let huge = "a".repeat(1 << 20);
    assert_eq!(
        f.check(&huge),
        Err(JwtSvidError::TooLarge(DEFAULT_MAX_TOKEN_BYTES))
    );
    // Just under the cap, a real token with padding in a claim is fine.
    let mut c = claims(f.now_s);
    c["pad"] = json!("x".repeat(5000));
    assert!(f.check(&f.token(&header(), &c)).is_ok());
}

/// Interoperability: a token from an independent encoder (jsonwebtoken)
/// validates, and ours validates in jsonwebtoken.
#[test]
fn interop_with_jsonwebtoken() {
    use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
    let f = fixture();
    let key = PrivateKey::generate_p256().unwrap();
    let signer = JwtSigner::new("jk", &key).unwrap();
    let mut b = Bundle::empty(TrustDomain::new("example.org").unwrap());
    b.jwt
        .add_key(JwtKey::from_sec1("jk", &signer.public_key_sec1()).unwrap())
        .unwrap();
    let bundles: BundleSet = [b].into_iter().collect();
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("jk".into());
    let ek = EncodingKey::from_ec_der(key.secret_pkcs8_der());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let t = jsonwebtoken::encode(&h, &claims(now), &ek).unwrap();
    let v = JwtSvidValidator::new(AUD)
        .validate(&t, &bundles, SystemTime::now())
        .unwrap();
    assert_eq!(v.spiffe_id().as_str(), SUB);

    let ours = f
        .signer
        .sign_raw(
            json!({"alg": "ES256", "kid": "k1", "typ": "JWT"})
                .to_string()
                .as_bytes(),
            claims(now).to_string().as_bytes(),
        )
        .unwrap();
    let mut val = Validation::new(Algorithm::ES256);
    val.set_audience(&[AUD]);
    let dk = DecodingKey::from_ec_der(&f.signer.public_key_sec1());
    let decoded = jsonwebtoken::decode::<Value>(&ours, &dk, &val).unwrap();
    assert_eq!(decoded.claims["sub"], SUB);
}
