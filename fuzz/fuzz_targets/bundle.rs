//! `Bundle::parse_any` on arbitrary bytes (SPIFFE bundle JSON, JWKS, PEM).
//!
//! Invariants: never panics; every accepted bundle survives the SPIFFE bundle
//! round trip: `Bundle::from_spiffe_json(td, to_spiffe_json())` succeeds and
//! gives an equal bundle (`parse_any` on the same document too); the loaded
//! JWT keys obey the load-time rules (non-empty kid, 65-byte point).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sigil::TrustDomain;
use sigil::bundle::Bundle;
use std::sync::OnceLock;

fn td() -> &'static TrustDomain {
    static TD: OnceLock<TrustDomain> = OnceLock::new();
    TD.get_or_init(|| TrustDomain::new("example.org").expect("td"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(bundle) = Bundle::parse_any(td().clone(), data) else {
        return;
    };
    assert_eq!(bundle.trust_domain(), td());
    for k in bundle.jwt.keys() {
        assert!(!k.kid().is_empty());
        assert_eq!(k.sec1().len(), 65);
        assert_eq!(k.sec1()[0], 4);
    }

    let json = bundle.to_spiffe_json();
    let back = Bundle::from_spiffe_json(td().clone(), json.as_bytes())
        .unwrap_or_else(|e| panic!("to_spiffe_json output does not re-parse: {e}"));
    assert_eq!(back, bundle, "SPIFFE JSON round trip changed the bundle");
    let any = Bundle::parse_any(td().clone(), json.as_bytes())
        .unwrap_or_else(|e| panic!("parse_any rejects to_spiffe_json output: {e}"));
    assert_eq!(any, bundle, "parse_any round trip changed the bundle");
    // Serialisation is deterministic.
    assert_eq!(back.to_spiffe_json(), json);
});
