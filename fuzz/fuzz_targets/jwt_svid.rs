//! `JwtSvidValidator::validate` on hostile tokens.
//!
//! Input layout: byte 0 chooses the mode.
//! - even: raw mode. The rest of the input, if UTF-8, is the token.
//! - odd: structured mode. Byte 1 is the header length `h`; the next `h`
//!   bytes are the JOSE header and the rest are the claims. Both are signed
//!   as-is with the fixture key (`JwtSigner::sign_raw`), so the fuzzer reaches
//!   every check after the signature.
//!
//! Fixture bundle set (built once): `example.org` holds the fixture signing
//! key as kid `k1`; `other.org` holds a *different* key under the same kid
//! `k1`, so a token that claims `other.org` but is signed by `example.org`'s
//! key must never verify.
//!
//! Invariants: never panics; whenever validation succeeds, the verified
//! `sub` belongs to `example.org` (the only trust domain whose key the
//! fuzzer can sign with), the kid is `k1`, the audience is exactly `[AUD]`,
//! and the token was live at the validation time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sigil::bundle::{Bundle, BundleSet, JwtKey};
use sigil::svid::jwt::JwtSigner;
use sigil::{JwtSvidValidator, PrivateKey, TrustDomain};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const AUD: &str = "tool";
const KID: &str = "k1";
/// Fixed validation time (2027-12-27), so every input reproduces.
const NOW: u64 = 1_830_000_000;

struct Fixture {
    signer: JwtSigner,
    bundles: BundleSet,
    trust_domain: TrustDomain,
    validator: JwtSvidValidator,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // A fixed key, so that signed seed tokens in seeds/jwt_svid verify.
        let key = PrivateKey::from_pkcs8_der(include_bytes!("../fixtures/jwt_key.pk8").to_vec());
        let signer = JwtSigner::new(KID, &key).expect("fixture key");
        let td = TrustDomain::new("example.org").expect("td");
        let mut b = Bundle::empty(td.clone());
        b.jwt
            .add_key(JwtKey::from_sec1(KID, &signer.public_key_sec1()).expect("jwk"))
            .expect("add key");

        let other_td = TrustDomain::new("other.org").expect("td");
        let other_key = PrivateKey::generate_p256().expect("generate");
        let mut other = Bundle::empty(other_td);
        other
            .jwt
            .add_key(JwtKey::from_sec1(KID, &other_key.public_key_sec1().expect("sec1")).expect("jwk"))
            .expect("add key");

        let bundles: BundleSet = [b, other].into_iter().collect();
        Fixture {
            signer,
            bundles,
            trust_domain: td,
            validator: JwtSvidValidator::new(AUD),
        }
    })
}

fn check(f: &Fixture, token: &str, now: SystemTime) {
    let Ok(v) = f.validator.validate(token, &f.bundles, now) else {
        return;
    };
    assert!(
        v.spiffe_id().is_member_of(&f.trust_domain),
        "verified sub {} outside {}",
        v.spiffe_id(),
        f.trust_domain
    );
    assert_eq!(v.kid(), KID);
    assert_eq!(v.audience(), [AUD.to_owned()]);
    assert_eq!(
        v.claims().get("sub").and_then(|s| s.as_str()),
        Some(v.spiffe_id().as_str())
    );
    assert!(v.expiry() > NOW as i64 - 60, "expired token accepted");
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(token) = std::str::from_utf8(rest) {
            check(f, token, now);
        }
        return;
    }
    let Some((&hlen, rest)) = rest.split_first() else {
        return;
    };
    let hlen = usize::from(hlen).min(rest.len());
    let (header, claims) = rest.split_at(hlen);
    let token = f.signer.sign_raw(header, claims).expect("sign_raw");
    check(f, &token, now);
});
