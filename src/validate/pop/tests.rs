//! Proofs of possession: the honest case and one row per refusal.

use super::*;
use crate::bundle::Bundle;
use crate::key::PrivateKey;
use crate::svid::jwt::{Confirmation, JwtSigner, JwtSvidClaims};
use crate::validate::jwt::{JwtSvidError, JwtSvidValidator};
use crate::{BundleSet, SpiffeId, TrustDomain};
use serde_json::json;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const AUD: &str = "ehr-fhir";
const SUB: &str = "spiffe://example.org/agent/triage";
const NOW: i64 = 1_900_000_000;
const REQ: ProofRequest<'static> = ProofRequest {
    method: "POST",
    uri: "https://ehr.example/fhir/Patient",
};

struct Fixture {
    signer: JwtSigner,
    bundles: BundleSet,
    key: SoftwareProofKey,
}

fn fixture() -> Fixture {
    let k = PrivateKey::generate_p256().unwrap();
    let signer = JwtSigner::new("k1", &k).unwrap();
    let mut b = Bundle::empty(TrustDomain::new("example.org").unwrap());
    b.jwt
        .add_key(crate::JwtKey::from_sec1("k1", &signer.public_key_sec1()).unwrap())
        .unwrap();
    Fixture {
        signer,
        bundles: [b].into_iter().collect(),
        key: SoftwareProofKey::generate().unwrap(),
    }
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW as u64)
}

impl Fixture {
    fn token(&self, jkt: Option<String>) -> String {
        self.signer
            .sign(&JwtSvidClaims {
                sub: SpiffeId::parse(SUB).unwrap(),
                aud: AUD.into(),
                exp: NOW + 300,
                iat: NOW,
                jti: "j1".into(),
                iss: None,
                acr: Some("sigil:al3".into()),
                amr: vec!["tpm".into(), "hwk".into()],
                cnf: jkt.map(|jkt| Confirmation { jkt }),
            })
            .unwrap()
    }
    fn bound_token(&self) -> String {
        self.token(Some(key_thumbprint(&self.key)))
    }
    fn check(
        &self,
        token: &str,
        proof: Option<&str>,
        replay: Option<&ReplayCache>,
    ) -> Result<crate::VerifiedJwtSvid, JwtSvidError> {
        JwtSvidValidator::new(AUD).validate_with_proof(
            token,
            proof,
            &REQ,
            &self.bundles,
            now(),
            replay,
        )
    }
}

/// A proof with any header and claims, signed by `key`.
fn raw_proof(key: &dyn ProofKey, header: &Value, claims: &Value) -> String {
    let mut out = URL_SAFE_NO_PAD.encode(header.to_string());
    out.push('.');
    out.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
    let sig = key.sign_es256(out.as_bytes()).unwrap();
    out.push('.');
    out.push_str(&URL_SAFE_NO_PAD.encode(sig));
    out
}

fn good_header(key: &dyn ProofKey) -> Value {
    let p = key.public_sec1();
    json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": {
        "kty": "EC", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..])}})
}

fn good_claims(token: &str) -> Value {
    json!({"jti": "p1", "htm": "POST", "htu": "https://ehr.example/fhir/Patient",
           "iat": NOW, "ath": token_hash(token)})
}

#[test]
fn bound_token_with_its_proof_is_accepted() {
    let f = fixture();
    let t = f.bound_token();
    let p = build_proof(&f.key, &t, &REQ, NOW).unwrap();
    let v = f.check(&t, Some(&p), None).unwrap();
    assert_eq!(v.cnf_jkt(), Some(key_thumbprint(&f.key).as_str()));
    assert_eq!(v.proof().unwrap().jkt, key_thumbprint(&f.key));
    // The query string and fragment are not part of htu.
    let with_query = ProofRequest {
        uri: "https://ehr.example/fhir/Patient?name=x#y",
        ..REQ
    };
    assert!(
        JwtSvidValidator::new(AUD)
            .validate_with_proof(&t, Some(&p), &with_query, &f.bundles, now(), None)
            .is_ok()
    );
    // Clock skew within the leeway, and a proof up to a minute old.
    for iat in [NOW + 30, NOW - 60] {
        let p = build_proof(&f.key, &t, &REQ, iat).unwrap();
        assert!(f.check(&t, Some(&p), None).is_ok(), "iat {iat}");
    }
}

#[test]
fn bound_token_without_proof_is_refused() {
    let f = fixture();
    let t = f.bound_token();
    assert_eq!(f.check(&t, None, None), Err(JwtSvidError::ProofRequired));
    assert_eq!(
        JwtSvidValidator::new(AUD).validate(&t, &f.bundles, now()),
        Err(JwtSvidError::ProofRequired)
    );
}

#[test]
fn unbound_token_needs_no_proof() {
    let f = fixture();
    let t = f.token(None);
    let v = f.check(&t, None, None).unwrap();
    assert!(v.proof().is_none());
}

#[test]
fn each_proof_is_accepted_once_with_a_replay_cache() {
    let f = fixture();
    let t = f.bound_token();
    let p = build_proof(&f.key, &t, &REQ, NOW).unwrap();
    let cache = ReplayCache::default();
    assert!(f.check(&t, Some(&p), Some(&cache)).is_ok());
    assert_eq!(
        f.check(&t, Some(&p), Some(&cache)),
        Err(JwtSvidError::Proof(ProofError::Replayed))
    );
    // A fresh proof is fine.
    let p2 = build_proof(&f.key, &t, &REQ, NOW).unwrap();
    assert!(f.check(&t, Some(&p2), Some(&cache)).is_ok());
    // Full of live entries: refuses rather than forgets.
    let tiny = ReplayCache::new(1);
    assert!(f.check(&t, Some(&p), Some(&tiny)).is_ok());
    assert_eq!(
        f.check(&t, Some(&p2), Some(&tiny)),
        Err(JwtSvidError::Proof(ProofError::Replayed))
    );
}

#[test]
fn hostile_proofs_are_refused() {
    let f = fixture();
    let t = f.bound_token();
    let k = &f.key;
    let other = SoftwareProofKey::generate().unwrap();
    let edit = |mut v: Value, path: &[&str], x: Option<Value>| {
        let mut cur = &mut v;
        for p in &path[..path.len() - 1] {
            cur = &mut cur[*p];
        }
        let last = path[path.len() - 1];
        match x {
            Some(x) => cur[last] = x,
            None => {
                cur.as_object_mut().unwrap().remove(last);
            }
        }
        v
    };
    let h = || good_header(k);
    let c = || good_claims(&t);
    let cases: Vec<(&str, String, ProofError)> = vec![
        (
            "signed by another key, naming it",
            raw_proof(&other, &good_header(&other), &c()),
            ProofError::WrongKey,
        ),
        (
            "signed by another key, naming the bound one",
            raw_proof(&other, &h(), &c()),
            ProofError::BadSignature,
        ),
        (
            "typ JWT",
            raw_proof(k, &edit(h(), &["typ"], Some(json!("JWT"))), &c()),
            ProofError::BadHeader("typ must be dpop+jwt"),
        ),
        (
            "no typ",
            raw_proof(k, &edit(h(), &["typ"], None), &c()),
            ProofError::BadHeader("typ must be dpop+jwt"),
        ),
        (
            "alg none",
            raw_proof(k, &edit(h(), &["alg"], Some(json!("none"))), &c()),
            ProofError::BadHeader("alg must be ES256"),
        ),
        (
            "alg HS256",
            raw_proof(k, &edit(h(), &["alg"], Some(json!("HS256"))), &c()),
            ProofError::BadHeader("alg must be ES256"),
        ),
        (
            "extra header member",
            raw_proof(k, &edit(h(), &["kid"], Some(json!("x"))), &c()),
            ProofError::BadHeader("only typ, alg and jwk are allowed"),
        ),
        (
            "private key in jwk",
            raw_proof(k, &edit(h(), &["jwk", "d"], Some(json!("AAAA"))), &c()),
            ProofError::BadHeader("jwk may only hold kty, crv, x and y (never a private key)"),
        ),
        (
            "P-384 jwk",
            raw_proof(k, &edit(h(), &["jwk", "crv"], Some(json!("P-384"))), &c()),
            ProofError::BadHeader("jwk must be an EC P-256 key"),
        ),
        (
            "short x",
            raw_proof(k, &edit(h(), &["jwk", "x"], Some(json!("AAAA"))), &c()),
            ProofError::BadHeader("jwk x and y must be 32 bytes"),
        ),
        (
            "another method",
            raw_proof(k, &h(), &edit(c(), &["htm"], Some(json!("GET")))),
            ProofError::WrongRequest("htm"),
        ),
        (
            "another path",
            raw_proof(
                k,
                &h(),
                &edit(
                    c(),
                    &["htu"],
                    Some(json!("https://ehr.example/fhir/Observation")),
                ),
            ),
            ProofError::WrongRequest("htu"),
        ),
        (
            "another host",
            raw_proof(
                k,
                &h(),
                &edit(
                    c(),
                    &["htu"],
                    Some(json!("https://evil.example/fhir/Patient")),
                ),
            ),
            ProofError::WrongRequest("htu"),
        ),
        (
            "too old",
            raw_proof(k, &h(), &edit(c(), &["iat"], Some(json!(NOW - 121)))),
            ProofError::Stale,
        ),
        (
            "from the future",
            raw_proof(k, &h(), &edit(c(), &["iat"], Some(json!(NOW + 61)))),
            ProofError::Stale,
        ),
        (
            "iat a string",
            raw_proof(k, &h(), &edit(c(), &["iat"], Some(json!("now")))),
            ProofError::BadClaim("iat"),
        ),
        (
            "for another token",
            raw_proof(
                k,
                &h(),
                &edit(c(), &["ath"], Some(json!(token_hash("other")))),
            ),
            ProofError::WrongToken,
        ),
        (
            "no ath",
            raw_proof(k, &h(), &edit(c(), &["ath"], None)),
            ProofError::BadClaim("ath"),
        ),
        (
            "no jti",
            raw_proof(k, &h(), &edit(c(), &["jti"], None)),
            ProofError::BadClaim("jti"),
        ),
        (
            "empty jti",
            raw_proof(k, &h(), &edit(c(), &["jti"], Some(json!("")))),
            ProofError::BadClaim("jti"),
        ),
        (
            "no htm",
            raw_proof(k, &h(), &edit(c(), &["htm"], None)),
            ProofError::BadClaim("htm"),
        ),
        (
            "no htu",
            raw_proof(k, &h(), &edit(c(), &["htu"], None)),
            ProofError::BadClaim("htu"),
        ),
        (
            "not a JWS",
            "abc".into(),
            ProofError::Malformed("not three segments"),
        ),
        (
            "too large",
            "a".repeat(MAX_PROOF_BYTES + 1),
            ProofError::TooLarge,
        ),
    ];
    for (what, proof, want) in cases {
        assert_eq!(
            f.check(&t, Some(&proof), None),
            Err(JwtSvidError::Proof(want)),
            "{what}"
        );
    }

    // Signature tampering: flipped bit, zero r, padded base64.
    let good = build_proof(k, &t, &REQ, NOW).unwrap();
    let (signed, sig) = good.rsplit_once('.').unwrap();
    let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
    raw[40] ^= 1;
    let flipped = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&raw));
    let mut zero_r = raw.clone();
    zero_r[..32].fill(0);
    let zero_r = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&zero_r));
    for bad in [flipped, zero_r] {
        assert_eq!(
            f.check(&t, Some(&bad), None),
            Err(JwtSvidError::Proof(ProofError::BadSignature))
        );
    }
    let padded = format!("{good}=");
    assert!(matches!(
        f.check(&t, Some(&padded), None),
        Err(JwtSvidError::Proof(ProofError::Malformed(_)))
    ));
    // The proof of one token does not carry over to another bound token.
    let t2 = f.bound_token();
    assert_ne!(t, t2);
    assert_eq!(
        f.check(&t2, Some(&good), None),
        Err(JwtSvidError::Proof(ProofError::WrongToken))
    );
}
