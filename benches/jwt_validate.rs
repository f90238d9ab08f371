//! JWT-SVID validation throughput: Sigil's hardened validator against
//! `jsonwebtoken` (aws-lc-rs backend) decoding and validating the same token
//! with a pre-built key, measured in the same run. Run with
//! `cargo bench --bench jwt_validate`; compare the two medians as a ratio.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use sigil::bundle::{Bundle, BundleSet, JwtKey};
use sigil::svid::jwt::{JwtSigner, JwtSvidClaims, random_jti};
use sigil::{JwtSvidValidator, PrivateKey, SpiffeId, TrustDomain};
use std::hint::black_box;
use std::time::{SystemTime, UNIX_EPOCH};

fn bench(c: &mut Criterion) {
    let key = PrivateKey::generate_p256().unwrap();
    let signer = JwtSigner::new("k1", &key).unwrap();
    let mut b = Bundle::empty(TrustDomain::new("example.org").unwrap());
    b.jwt
        .add_key(JwtKey::from_sec1("k1", &signer.public_key_sec1()).unwrap())
        .unwrap();
    let bundles: BundleSet = [b].into_iter().collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = JwtSvidClaims {
        sub: SpiffeId::parse("spiffe://example.org/agent/triage").unwrap(),
        aud: "ehr-fhir".into(),
        exp: now + 3600,
        iat: now,
        jti: random_jti(),
        iss: None,
        acr: Some("sigil:al1".into()),
        amr: vec!["join_token".into(), "peercred".into()],
        cnf: None,
    };
    let token = signer.sign(&claims).unwrap();
    let validator = JwtSvidValidator::new("ehr-fhir");

    let mut g = c.benchmark_group("jwt_svid_validate");
    g.bench_function("sigil_validate", |bch| {
        bch.iter(|| {
            validator
                .validate(black_box(&token), &bundles, SystemTime::now())
                .unwrap()
        })
    });
    let dk = jsonwebtoken::DecodingKey::from_ec_der(&signer.public_key_sec1());
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["ehr-fhir"]);
    g.bench_function("jsonwebtoken_decode_baseline", |bch| {
        bch.iter(|| jsonwebtoken::decode::<serde_json::Value>(black_box(&token), &dk, &v).unwrap())
    });
    g.bench_function("sigil_sign", |bch| {
        bch.iter(|| signer.sign(black_box(&claims)).unwrap())
    });
    let ek = jsonwebtoken::EncodingKey::from_ec_der(key.secret_pkcs8_der());
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some("k1".into());
    g.bench_function("jsonwebtoken_encode_baseline", |bch| {
        bch.iter(|| jsonwebtoken::encode(&h, black_box(&claims), &ek).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
