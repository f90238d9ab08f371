//! The few DER encodings the TPM code needs: ECDSA signatures from the
//! TPM's (r, s), and the length of a certificate read from NV.
//! (SubjectPublicKeyInfo and the EK hash come from `sigil::tpm`.)

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

/// `r`, `s` of an ECDSA signature as a DER `Ecdsa-Sig-Value`.
pub(crate) fn ecdsa_sig_der(r: &[u8], s: &[u8]) -> Vec<u8> {
    let mut body = uint(r);
    body.extend(uint(s));
    tlv(0x30, &body)
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
    }
}
