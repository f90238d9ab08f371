//! Structure parsing and the software crypto against hand-marshalled input
//! (the `soft` stand-in). The same functions run against a real TPM
//! (swtpm) in the agent's tests.

use super::soft::*;
use super::*;

#[test]
fn ek_public_parses_and_its_spki_is_the_keys() {
    let soft = SoftEk::new();
    let ek = TpmPublic::parse(&soft.public).unwrap();
    ek.check_ek().unwrap();
    assert_eq!(ek.spki_der(), soft.spki());
    assert_eq!(ek.name()[..2], [0x00, 0x0b]);
    assert_eq!(ek.name().len(), 34);
    assert_eq!(spki_hash(&ek.spki_der()).len(), 64);
}

#[test]
fn ecc_spki_is_the_keys() {
    let k = SoftKey::new(AK_ATTRS, ECDSA);
    let ak = TpmPublic::parse(&k.public).unwrap();
    ak.check_ak().unwrap();
    assert_eq!(ak.spki_der(), k.spki());
}

#[test]
fn malformed_structures_are_refused() {
    let soft = SoftEk::new();
    let good = soft.public.clone();
    // Truncated anywhere, or a byte left over.
    for n in 0..good.len() {
        assert!(TpmPublic::parse(&good[..n]).is_err(), "truncated at {n}");
    }
    let mut long = good.clone();
    long.push(0);
    assert_eq!(
        TpmPublic::parse(&long),
        Err(TpmError::Malformed("TPMT_PUBLIC"))
    );
    // SHA-1 names.
    let mut sha1 = good.clone();
    sha1[2..4].copy_from_slice(&0x0004u16.to_be_bytes());
    assert!(matches!(
        TpmPublic::parse(&sha1),
        Err(TpmError::Unsupported(_))
    ));
    // A keyed-hash object.
    let mut kh = good.clone();
    kh[0..2].copy_from_slice(&0x0008u16.to_be_bytes());
    assert!(TpmPublic::parse(&kh).is_err());
    // A modulus shorter than its declared size.
    let short = rsa_ek_public(&soft.modulus()[..255], EK_ATTRS);
    assert!(TpmPublic::parse(&short).is_err());
    // Oversized input.
    assert!(TpmPublic::parse(&vec![0u8; 10_000]).is_err());
}

#[test]
fn key_roles_are_checked() {
    let modulus = SoftEk::new().modulus();
    let ek = |a| TpmPublic::parse(&rsa_ek_public(&modulus, a)).unwrap();
    assert!(ek(EK_ATTRS).check_ek().is_ok());
    assert!(ek(EK_ATTRS & !attr::FIXED_TPM).check_ek().is_err());
    assert!(ek(EK_ATTRS & !attr::RESTRICTED).check_ek().is_err());
    assert!(ek(EK_ATTRS | attr::SIGN).check_ek().is_err());
    // An RSA key is no AK; an EK is no AK.
    assert!(ek(EK_ATTRS).check_ak().is_err());

    let point = SoftKey::new(AK_ATTRS, ECDSA).kp;
    let point = aws_lc_rs::signature::KeyPair::public_key(&point)
        .as_ref()
        .to_vec();
    let ecc = |a, s| TpmPublic::parse(&ecc_public(&point, a, s)).unwrap();
    assert!(ecc(AK_ATTRS, ECDSA).check_ak().is_ok());
    // Not restricted: it could sign a forged TPMS_ATTEST.
    assert!(ecc(AK_ATTRS & !attr::RESTRICTED, ECDSA).check_ak().is_err());
    // Imported (no sensitiveDataOrigin), or duplicable.
    assert!(
        ecc(AK_ATTRS & !attr::SENSITIVE_DATA_ORIGIN, ECDSA)
            .check_ak()
            .is_err()
    );
    assert!(ecc(AK_ATTRS & !attr::FIXED_TPM, ECDSA).check_ak().is_err());
    assert!(ecc(AK_ATTRS | attr::DECRYPT, ECDSA).check_ak().is_err());
    assert!(ecc(AK_ATTRS, NULL).check_ak().is_err());

    assert!(ecc(KEY_ATTRS, NULL).check_resident_signing_key().is_ok());
    assert!(ecc(KEY_ATTRS, ECDSA).check_resident_signing_key().is_ok());
    assert!(
        ecc(KEY_ATTRS & !attr::FIXED_TPM, NULL)
            .check_resident_signing_key()
            .is_err()
    );
    assert!(
        ecc(KEY_ATTRS & !attr::FIXED_PARENT, NULL)
            .check_resident_signing_key()
            .is_err()
    );
    assert!(
        ecc(KEY_ATTRS & !attr::SENSITIVE_DATA_ORIGIN, NULL)
            .check_resident_signing_key()
            .is_err()
    );
    assert!(ecc(AK_ATTRS, ECDSA).check_resident_signing_key().is_err());
}

#[test]
fn make_credential_opens_only_for_its_ek_and_name() {
    let soft = SoftEk::new();
    let ek = TpmPublic::parse(&soft.public).unwrap();
    let ak = TpmPublic::parse(&SoftKey::new(AK_ATTRS, ECDSA).public).unwrap();
    let secret = [7u8; 32];
    let cred = make_credential(&ek, &ak.name(), &secret).unwrap();
    assert_eq!(cred.encrypted_secret.len(), 256);
    assert_eq!(soft.activate(&ak.name(), &cred).unwrap(), secret);
    // Bound to the AK's name: another object cannot activate it.
    let other = TpmPublic::parse(&SoftKey::new(AK_ATTRS, ECDSA).public).unwrap();
    assert!(soft.activate(&other.name(), &cred).is_none());
    // Another TPM's EK cannot open the seed.
    assert!(SoftEk::new().activate(&ak.name(), &cred).is_none());
    // A fresh seed every time: two credentials for the same secret differ.
    let again = make_credential(&ek, &ak.name(), &secret).unwrap();
    assert_ne!(again.encrypted_secret, cred.encrypted_secret);
    assert_ne!(again.credential_blob, cred.credential_blob);
    // Only EKs, only sane secrets.
    assert!(make_credential(&ak, &ak.name(), &secret).is_err());
    assert!(make_credential(&ek, &ak.name(), &[]).is_err());
    assert!(make_credential(&ek, &ak.name(), &[0u8; 65]).is_err());
}

#[test]
fn certify_verifies_only_for_the_ak_the_key_and_the_nonce() {
    let ak_soft = SoftKey::new(AK_ATTRS, ECDSA);
    let ak = TpmPublic::parse(&ak_soft.public).unwrap();
    let key_soft = SoftKey::new(KEY_ATTRS, NULL);
    let key = TpmPublic::parse(&key_soft.public).unwrap();
    let nonce = [9u8; 32];
    let (info, sig) = ak_soft.certify(&key_soft.public, &nonce);
    let got = verify_certify(&ak, &key, &info, &sig, &nonce).unwrap();
    assert_eq!(got.name, key.name());

    // Another nonce (a replayed certification).
    assert_eq!(
        verify_certify(&ak, &key, &info, &sig, &[8u8; 32]),
        Err(TpmError::Mismatch("certification qualifying data"))
    );
    // Certifies another key.
    let other = TpmPublic::parse(&SoftKey::new(KEY_ATTRS, NULL).public).unwrap();
    assert_eq!(
        verify_certify(&ak, &other, &info, &sig, &nonce),
        Err(TpmError::Mismatch("certified key name"))
    );
    // Signed by a key that is not the AK.
    let forged = SoftKey::new(AK_ATTRS, ECDSA).sign(&info);
    assert!(matches!(
        verify_certify(&ak, &key, &info, &forged, &nonce),
        Err(TpmError::BadSignature(_))
    ));
    // Tampered after signing.
    let mut tampered = info.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(verify_certify(&ak, &key, &tampered, &sig, &nonce).is_err());
    // Signed by the AK but not a TPM-generated certify structure (an AK
    // that is not restricted could sign this; check_ak refuses such AKs).
    for info in [
        certify_info(&nonce, &key.name(), 0xdead_beef, ST_CERTIFY),
        certify_info(&nonce, &key.name(), GENERATED, 0x8018),
    ] {
        let sig = ak_soft.sign(&info);
        assert!(verify_certify(&ak, &key, &info, &sig, &nonce).is_err());
    }
    // A signature in another scheme.
    let mut rsassa = sig.clone();
    rsassa[0..2].copy_from_slice(&RSASSA.to_be_bytes());
    assert!(matches!(
        verify_certify(&ak, &key, &info, &rsassa, &nonce),
        Err(TpmError::Unsupported(_))
    ));
}

#[test]
fn kdfa_lengths_and_separation() {
    let a = kdfa_sha256(b"seed", "STORAGE", b"name", &[], 128);
    assert_eq!(a.len(), 16);
    let b = kdfa_sha256(b"seed", "INTEGRITY", b"name", &[], 128);
    assert_ne!(a, b);
    let long = kdfa_sha256(b"seed", "STORAGE", b"name", &[], 512);
    assert_eq!(long.len(), 64);
    // The bit length is part of the input: a shorter output is not a prefix.
    assert_ne!(long[..16], a[..]);
}
