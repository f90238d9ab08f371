//! Structure parsing and the software crypto against hand-marshalled input.
//! The same functions run against a real TPM (swtpm) in the agent's tests.

use super::*;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeyPair as RsaKeyPair, KeySize, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey,
    PrivateDecryptingKey,
};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

/// Marshals a TPMT_PUBLIC the way a TPM does.
struct Marshal(Vec<u8>);
impl Marshal {
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn b(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(&(v.len() as u16).to_be_bytes());
        self.0.extend_from_slice(v);
        self
    }
}

const EK_ATTRS: u32 = attr::FIXED_TPM
    | attr::FIXED_PARENT
    | attr::SENSITIVE_DATA_ORIGIN
    | attr::ADMIN_WITH_POLICY
    | attr::RESTRICTED
    | attr::DECRYPT;
const AK_ATTRS: u32 = attr::FIXED_TPM
    | attr::FIXED_PARENT
    | attr::SENSITIVE_DATA_ORIGIN
    | attr::USER_WITH_AUTH
    | attr::RESTRICTED
    | attr::SIGN;
/// The TCG default EK policy (PolicySecret(TPM_RH_ENDORSEMENT)).
const EK_POLICY: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
    0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];

fn rsa_ek_public(modulus: &[u8], attrs: u32) -> Vec<u8> {
    Marshal(Vec::new())
        .u16(alg::RSA)
        .u16(alg::SHA256)
        .u32(attrs)
        .b(&EK_POLICY)
        .u16(alg::AES)
        .u16(128)
        .u16(alg::CFB)
        .u16(alg::NULL)
        .u16(2048)
        .u32(0)
        .b(modulus)
        .0
}

fn ecc_public(point: &[u8], attrs: u32, scheme: u16) -> Vec<u8> {
    let m = Marshal(Vec::new())
        .u16(alg::ECC)
        .u16(alg::SHA256)
        .u32(attrs)
        .b(&[])
        .u16(alg::NULL);
    let m = if scheme == alg::NULL {
        m.u16(alg::NULL)
    } else {
        m.u16(scheme).u16(alg::SHA256)
    };
    m.u16(alg::ECC_NIST_P256)
        .u16(alg::NULL)
        .b(&point[1..33])
        .b(&point[33..])
        .0
}

fn rsa_key() -> (RsaKeyPair, Vec<u8>) {
    let kp = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let spki = kp.public_key().as_der().unwrap().as_ref().to_vec();
    let (_, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki).unwrap();
    let x509_parser::public_key::PublicKey::RSA(rsa) = parsed.parsed().unwrap() else {
        panic!("not RSA")
    };
    (kp, rsa.modulus.to_vec())
}
use x509_parser::prelude::FromDer;

fn ecc_key() -> EcdsaKeyPair {
    EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap()
}

#[test]
fn ek_public_parses_and_its_spki_is_the_keys() {
    let (kp, modulus) = rsa_key();
    let ek = TpmPublic::parse(&rsa_ek_public(&modulus, EK_ATTRS)).unwrap();
    ek.check_ek().unwrap();
    assert_eq!(ek.spki_der(), kp.public_key().as_der().unwrap().as_ref());
    assert_eq!(ek.name()[..2], [0x00, 0x0b]);
    assert_eq!(ek.name().len(), 34);
    assert_eq!(spki_hash(&ek.spki_der()).len(), 64);
}

#[test]
fn ecc_spki_is_the_keys() {
    let kp = ecc_key();
    let point = kp.public_key().as_ref().to_vec();
    let ak = TpmPublic::parse(&ecc_public(&point, AK_ATTRS, alg::ECDSA)).unwrap();
    ak.check_ak().unwrap();
    assert_eq!(ak.spki_der(), kp.public_key().as_der().unwrap().as_ref());
    assert_eq!(ak.p256_point().unwrap().as_slice(), point.as_slice());
}

#[test]
fn malformed_structures_are_refused() {
    let (_, modulus) = rsa_key();
    let good = rsa_ek_public(&modulus, EK_ATTRS);
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
    let short = rsa_ek_public(&modulus[..255], EK_ATTRS);
    assert!(TpmPublic::parse(&short).is_err());
    // Oversized input.
    assert!(TpmPublic::parse(&vec![0u8; 10_000]).is_err());
}

#[test]
fn key_roles_are_checked() {
    let (_, modulus) = rsa_key();
    let ek = |a| TpmPublic::parse(&rsa_ek_public(&modulus, a)).unwrap();
    assert!(ek(EK_ATTRS).check_ek().is_ok());
    assert!(ek(EK_ATTRS & !attr::FIXED_TPM).check_ek().is_err());
    assert!(ek(EK_ATTRS & !attr::RESTRICTED).check_ek().is_err());
    assert!(ek(EK_ATTRS | attr::SIGN).check_ek().is_err());
    // An RSA key is no AK; an EK is no AK.
    assert!(ek(EK_ATTRS).check_ak().is_err());

    let point = ecc_key().public_key().as_ref().to_vec();
    let ecc = |a, s| TpmPublic::parse(&ecc_public(&point, a, s)).unwrap();
    assert!(ecc(AK_ATTRS, alg::ECDSA).check_ak().is_ok());
    // Not restricted: it could sign a forged TPMS_ATTEST.
    assert!(
        ecc(AK_ATTRS & !attr::RESTRICTED, alg::ECDSA)
            .check_ak()
            .is_err()
    );
    // Imported (no sensitiveDataOrigin), or duplicable.
    assert!(
        ecc(AK_ATTRS & !attr::SENSITIVE_DATA_ORIGIN, alg::ECDSA)
            .check_ak()
            .is_err()
    );
    assert!(
        ecc(AK_ATTRS & !attr::FIXED_TPM, alg::ECDSA)
            .check_ak()
            .is_err()
    );
    assert!(
        ecc(AK_ATTRS | attr::DECRYPT, alg::ECDSA)
            .check_ak()
            .is_err()
    );
    assert!(ecc(AK_ATTRS, alg::NULL).check_ak().is_err());

    let key_attrs = AK_ATTRS & !attr::RESTRICTED;
    assert!(
        ecc(key_attrs, alg::NULL)
            .check_resident_signing_key()
            .is_ok()
    );
    assert!(
        ecc(key_attrs, alg::ECDSA)
            .check_resident_signing_key()
            .is_ok()
    );
    assert!(
        ecc(key_attrs & !attr::FIXED_TPM, alg::NULL)
            .check_resident_signing_key()
            .is_err()
    );
    assert!(
        ecc(key_attrs & !attr::FIXED_PARENT, alg::NULL)
            .check_resident_signing_key()
            .is_err()
    );
    assert!(
        ecc(key_attrs & !attr::SENSITIVE_DATA_ORIGIN, alg::NULL)
            .check_resident_signing_key()
            .is_err()
    );
    assert!(
        ecc(AK_ATTRS, alg::ECDSA)
            .check_resident_signing_key()
            .is_err()
    );
}

/// ActivateCredential as the TPM does it, with the EK's private key in
/// software: the inverse of `make_credential`.
fn activate(ek: &RsaKeyPair, name: &[u8], cred: &Credential) -> Option<Vec<u8>> {
    let der = ek.as_der().unwrap();
    let private = PrivateDecryptingKey::from_pkcs8(der.as_ref()).unwrap();
    let oaep = OaepPrivateDecryptingKey::new(private).unwrap();
    let mut seed = vec![0u8; oaep.min_output_size()];
    let seed = oaep
        .decrypt(
            &OAEP_SHA256_MGF1SHA256,
            &cred.encrypted_secret,
            &mut seed,
            Some(b"IDENTITY\0"),
        )
        .ok()?
        .to_vec();
    let mut r = Reader::new(&cred.credential_blob, "blob").ok()?;
    let outer = r.tpm2b().ok()?.to_vec();
    let mut enc = r.buf.to_vec();
    let hk = kdfa_sha256(&seed, "INTEGRITY", &[], &[], 256);
    let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &hk));
    ctx.update(&enc);
    ctx.update(name);
    if ctx.sign().as_ref() != outer.as_slice() {
        return None;
    }
    let sym = kdfa_sha256(&seed, "STORAGE", name, &[], 128);
    let key = aws_lc_rs::cipher::UnboundCipherKey::new(&aws_lc_rs::cipher::AES_128, &sym).unwrap();
    let dk = aws_lc_rs::cipher::DecryptingKey::cfb128(key).unwrap();
    let plain = dk
        .decrypt(
            &mut enc,
            aws_lc_rs::cipher::DecryptionContext::Iv128(aws_lc_rs::iv::FixedLength::from(
                [0u8; 16],
            )),
        )
        .unwrap();
    let mut r = Reader::new(plain, "identity").ok()?;
    let secret = r.tpm2b().ok()?.to_vec();
    r.finish().ok()?;
    Some(secret)
}

#[test]
fn make_credential_opens_only_for_its_ek_and_name() {
    let (kp, modulus) = rsa_key();
    let ek = TpmPublic::parse(&rsa_ek_public(&modulus, EK_ATTRS)).unwrap();
    let ak = TpmPublic::parse(&ecc_public(
        ecc_key().public_key().as_ref(),
        AK_ATTRS,
        alg::ECDSA,
    ))
    .unwrap();
    let secret = [7u8; 32];
    let cred = make_credential(&ek, &ak.name(), &secret).unwrap();
    assert_eq!(cred.encrypted_secret.len(), 256);
    assert_eq!(activate(&kp, &ak.name(), &cred).unwrap(), secret);
    // Bound to the AK's name: another object cannot activate it.
    let other = TpmPublic::parse(&ecc_public(
        ecc_key().public_key().as_ref(),
        AK_ATTRS,
        alg::ECDSA,
    ))
    .unwrap();
    assert!(activate(&kp, &other.name(), &cred).is_none());
    // Another TPM's EK cannot open the seed.
    let (kp2, _) = rsa_key();
    assert!(activate(&kp2, &ak.name(), &cred).is_none());
    // A fresh seed every time: two credentials for the same secret differ.
    let again = make_credential(&ek, &ak.name(), &secret).unwrap();
    assert_ne!(again.encrypted_secret, cred.encrypted_secret);
    assert_ne!(again.credential_blob, cred.credential_blob);
    // Only EKs, only sane secrets.
    assert!(make_credential(&ak, &ak.name(), &secret).is_err());
    assert!(make_credential(&ek, &ak.name(), &[]).is_err());
    assert!(make_credential(&ek, &ak.name(), &[0u8; 65]).is_err());
}

fn certify_info(extra: &[u8], name: &[u8], magic: u32, kind: u16) -> Vec<u8> {
    Marshal(Vec::new())
        .u32(magic)
        .u16(kind)
        .b(&[0x40, 0x00, 0x00, 0x01])
        .b(extra)
        .u64(1234)
        .u32(1)
        .u32(0)
        .u8(1)
        .u64(0x2019_0108)
        .b(name)
        .b(name)
        .0
}

fn tpm_sign(kp: &EcdsaKeyPair, msg: &[u8]) -> Vec<u8> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let sig = kp.sign(&rng, msg).unwrap();
    let sig = sig.as_ref();
    // A TPM strips leading zeros from r and s; exercise that path too.
    let strip = |v: &[u8]| strip_zeros(v).to_vec();
    Marshal(Vec::new())
        .u16(alg::ECDSA)
        .u16(alg::SHA256)
        .b(&strip(&sig[..32]))
        .b(&strip(&sig[32..]))
        .0
}

#[test]
fn certify_verifies_only_for_the_ak_the_key_and_the_nonce() {
    let ak_kp = ecc_key();
    let ak = TpmPublic::parse(&ecc_public(
        ak_kp.public_key().as_ref(),
        AK_ATTRS,
        alg::ECDSA,
    ))
    .unwrap();
    let key_attrs = AK_ATTRS & !attr::RESTRICTED;
    let key = TpmPublic::parse(&ecc_public(
        ecc_key().public_key().as_ref(),
        key_attrs,
        alg::NULL,
    ))
    .unwrap();
    let nonce = [9u8; 32];
    let info = certify_info(
        &nonce,
        &key.name(),
        TPM_GENERATED_VALUE,
        TPM_ST_ATTEST_CERTIFY,
    );
    let sig = tpm_sign(&ak_kp, &info);
    let got = verify_certify(&ak, &key, &info, &sig, &nonce).unwrap();
    assert_eq!(got.name, key.name());

    // Another nonce (a replayed certification).
    assert_eq!(
        verify_certify(&ak, &key, &info, &sig, &[8u8; 32]),
        Err(TpmError::Mismatch("certification qualifying data"))
    );
    // Certifies another key.
    let other = TpmPublic::parse(&ecc_public(
        ecc_key().public_key().as_ref(),
        key_attrs,
        alg::NULL,
    ))
    .unwrap();
    assert_eq!(
        verify_certify(&ak, &other, &info, &sig, &nonce),
        Err(TpmError::Mismatch("certified key name"))
    );
    // Signed by a key that is not the AK.
    let forged = tpm_sign(&ecc_key(), &info);
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
        certify_info(&nonce, &key.name(), 0xdead_beef, TPM_ST_ATTEST_CERTIFY),
        certify_info(&nonce, &key.name(), TPM_GENERATED_VALUE, 0x8018),
    ] {
        let sig = tpm_sign(&ak_kp, &info);
        assert!(verify_certify(&ak, &key, &info, &sig, &nonce).is_err());
    }
    // A signature in another scheme.
    let mut rsassa = sig.clone();
    rsassa[0..2].copy_from_slice(&alg::RSASSA.to_be_bytes());
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
