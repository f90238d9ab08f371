//! The few DER encodings the TPM code needs: SubjectPublicKeyInfo of the
//! EK (RSA) and of P-256 keys, and ECDSA signatures from TPM (r, s).
//!
//! TODO(sigil::tpm): replace `rsa_spki_der` / `ek_hash` with
//! `sigil::tpm::ek_spki_der` / `sigil::tpm::ek_hash` once that module is on
//! main, so server and agent compute the EK hash with one function.

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 6);
    out.push(tag);
    push_len(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// A DER INTEGER holding the unsigned big-endian `value`.
fn uint(value: &[u8]) -> Vec<u8> {
    let skip = value.iter().take_while(|b| **b == 0).count();
    let v = &value[skip..];
    let mut body = Vec::with_capacity(v.len() + 1);
    if v.first().is_none_or(|b| b & 0x80 != 0) {
        body.push(0);
    }
    body.extend_from_slice(v);
    tlv(0x02, &body)
}

/// SubjectPublicKeyInfo of an RSA key (rsaEncryption, NULL parameters).
pub(crate) fn rsa_spki_der(modulus: &[u8], exponent: u32) -> Vec<u8> {
    // SEQUENCE { OID 1.2.840.113549.1.1.1, NULL }
    const ALG: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut key = uint(modulus);
    key.extend(uint(&exponent.to_be_bytes()));
    let key = tlv(0x30, &key);
    let mut bits = vec![0u8];
    bits.extend(key);
    let mut body = ALG.to_vec();
    body.extend(tlv(0x03, &bits));
    tlv(0x30, &body)
}

/// `r`, `s` of an ECDSA signature as a DER `Ecdsa-Sig-Value`.
pub(crate) fn ecdsa_sig_der(r: &[u8], s: &[u8]) -> Vec<u8> {
    let mut body = uint(r);
    body.extend(uint(s));
    tlv(0x30, &body)
}

/// Left-pads a big-endian coordinate to `len` bytes; `None` if longer.
pub(crate) fn pad(value: &[u8], len: usize) -> Option<Vec<u8>> {
    let skip = value.iter().take_while(|b| **b == 0).count();
    let v = &value[skip..];
    if v.len() > len {
        return None;
    }
    let mut out = vec![0u8; len - v.len()];
    out.extend_from_slice(v);
    Some(out)
}

/// The length of the DER element at the start of `der` (tag, length and
/// contents), to cut the padding some TPMs leave after an NV certificate.
pub(crate) fn der_element_len(der: &[u8]) -> Option<usize> {
    let first = *der.get(1)?;
    let (hdr, len) = if first & 0x80 == 0 {
        (2, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in der.get(2..2 + n)? {
            len = (len << 8) | usize::from(*b);
        }
        (2 + n, len)
    };
    let total = hdr.checked_add(len)?;
    (total <= der.len()).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_and_lengths() {
        assert_eq!(uint(&[0, 0, 1]), vec![2, 1, 1]);
        assert_eq!(uint(&[0x80]), vec![2, 2, 0, 0x80]);
        assert_eq!(uint(&[0, 0]), vec![2, 1, 0]);
        let long = tlv(0x04, &[0u8; 300]);
        assert_eq!(&long[..4], &[0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(der_element_len(&long), Some(304));
        let mut padded = long.clone();
        padded.extend([0xff; 10]);
        assert_eq!(der_element_len(&padded), Some(304));
        assert_eq!(der_element_len(&long[..100]), None);
        assert_eq!(der_element_len(&[0x30]), None);
        assert_eq!(pad(&[1, 2], 4), Some(vec![0, 0, 1, 2]));
        assert_eq!(pad(&[1, 2, 3], 2), None);
    }

    #[test]
    fn rsa_spki_parses() {
        let modulus = [0xc5u8; 256];
        let der = rsa_spki_der(&modulus, 65537);
        use x509_parser::prelude::FromDer;
        let (rest, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&der).unwrap();
        assert!(rest.is_empty());
        let x509_parser::public_key::PublicKey::RSA(rsa) = spki.parsed().unwrap() else {
            panic!("not RSA")
        };
        assert_eq!(rsa.key_size(), 2048);
        assert_eq!(rsa.exponent, &[1, 0, 1]);
    }
}
