//! `SpiffeId::parse` / `TrustDomain::new` on arbitrary UTF-8.
//!
//! Invariants:
//! - never panics;
//! - acceptance agrees with an independent, deliberately naive reading of the
//!   SPIFFE ID spec (`reference_accepts`), in both directions;
//! - parsing never normalises: `id.to_string() == input`, re-parsing gives an
//!   equal ID, and `"spiffe://" + trust_domain + path == input`;
//! - the parts are consistent (`is_member_of`, `TrustDomain::id`, serde).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sigil::{SpiffeId, TrustDomain};

/// The SPIFFE ID rules, written independently of `sigil::id`.
fn reference_accepts(s: &str) -> bool {
    if s.len() > 2048 {
        return false;
    }
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    let (td, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let td_ok = !td.is_empty()
        && td.len() <= 255
        && td
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if !td_ok {
        return false;
    }
    if path.is_empty() {
        return true;
    }
    path[1..].split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    })
}

fn reference_td_accepts(s: &str) -> bool {
    match s.strip_prefix("spiffe://") {
        Some(rest) => !rest.contains('/') && reference_accepts(s),
        None => reference_accepts(&format!("spiffe://{s}")) && !s.contains('/'),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };

    match SpiffeId::parse(input) {
        Ok(id) => {
            assert!(reference_accepts(input), "accepted {input:?}");
            assert_eq!(id.to_string(), input);
            assert_eq!(id.as_str(), input);
            let again = SpiffeId::parse(&id.to_string()).expect("re-parse");
            assert_eq!(again, id);

            let td = id.trust_domain();
            assert_eq!(td.name(), id.trust_domain_name());
            assert_eq!(format!("spiffe://{}{}", td.name(), id.path()), input);
            assert!(id.path().is_empty() || id.path().starts_with('/'));
            assert!(id.is_member_of(&td));
            assert_eq!(td.id(id.path()).expect("td.id(path)"), id);
            assert_eq!(TrustDomain::new(td.name()).expect("td name"), td);
            assert_eq!(TrustDomain::new(&td.id_string()).expect("td id"), td);

            let json = serde_json::to_string(&id).expect("serialize");
            let back: SpiffeId = serde_json::from_str(&json).expect("deserialize");
            assert_eq!(back, id);
        }
        Err(e) => {
            assert!(!reference_accepts(input), "rejected {input:?}: {e}");
        }
    }

    match TrustDomain::new(input) {
        Ok(td) => {
            assert!(reference_td_accepts(input), "td accepted {input:?}");
            assert!(input == td.name() || input == td.id_string());
            assert_eq!(TrustDomain::new(td.name()).expect("td name"), td);
            let root = SpiffeId::parse(&td.id_string()).expect("td id_string parses");
            assert!(root.path().is_empty());
            assert_eq!(root.trust_domain(), td);
        }
        Err(e) => {
            assert!(!reference_td_accepts(input), "td rejected {input:?}: {e}");
        }
    }
});
