//! X.509-SVID parsing and verification on arbitrary bytes.
//!
//! Input layout: bytes 0..2 are a little-endian `u16` chain length `n`
//! (clamped to the input); the next `n` bytes are the concatenated DER chain
//! and the rest is the PKCS#8 key.
//!
//! - `X509Svid::from_der(chain, key)`; on success the SVID's chain is exactly
//!   the input chain and its ID is a non-root SPIFFE ID.
//! - `split_der_certs(chain)` then `verify_x509_svid` against a fixed bundle
//!   set: `example.org` trusts `fixtures/ca.der`; `other.org` trusts a
//!   different CA (`fixtures/other_ca.der`) whose key the fuzzer does not
//!   have. On success the verified ID must belong to `example.org`.
//!
//! Never panics. Validation time is fixed (2027-12-27) so inputs reproduce.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;
use sigil::bundle::{Bundle, BundleSet, X509Bundle, split_der_certs};
use sigil::validate::x509::AnyId;
use sigil::{TrustDomain, X509Svid, verify_x509_svid};
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

const NOW: u64 = 1_830_000_000;

fn bundle(td: &str, ca: &'static [u8]) -> Bundle {
    let td = TrustDomain::new(td).expect("td");
    let x509 = X509Bundle::from_ders(td.clone(), vec![CertificateDer::from(ca)]).expect("ca");
    assert_eq!(x509.authorities().len(), 1, "fixture CA expired?");
    Bundle {
        x509,
        ..Bundle::empty(td)
    }
}

fn bundles() -> &'static BundleSet {
    static B: OnceLock<BundleSet> = OnceLock::new();
    B.get_or_init(|| {
        [
            bundle("example.org", include_bytes!("../fixtures/ca.der")),
            bundle("other.org", include_bytes!("../fixtures/other_ca.der")),
        ]
        .into_iter()
        .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let bundles = bundles();
    if data.len() < 2 {
        return;
    }
    let n = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    let (chain, key) = data[2..].split_at(n);

    if let Ok(svid) = X509Svid::from_der(chain, key) {
        assert_eq!(svid.chain_der(), chain);
        assert!(!svid.spiffe_id().path().is_empty());
        assert!(!svid.chain().is_empty());
    }

    let Ok(certs) = split_der_certs(chain) else {
        return;
    };
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    if let Ok(v) = verify_x509_svid(&certs, bundles, now, &AnyId) {
        assert_eq!(v.spiffe_id().trust_domain_name(), "example.org");
        assert!(!v.spiffe_id().path().is_empty());
        assert!(v.not_after() >= NOW as i64);
    }
});
