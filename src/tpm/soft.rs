//! A software stand-in for the TPM side of attestation, for tests only
//! (feature `tpm-soft`): it marshals public areas the way a TPM does, runs
//! `TPM2_ActivateCredential` with an EK private key held in memory, and
//! signs `TPM2_Certify` structures. It proves nothing about any hardware:
//! never use it outside tests. The agent's tests run the same protocol on a
//! real (software) TPM, swtpm.
#![allow(clippy::missing_panics_doc)]

use super::{Credential, Reader};
use super::{TPM_GENERATED_VALUE, TPM_ST_ATTEST_CERTIFY, alg, attr, kdfa_sha256, strip_zeros};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeyPair as RsaKeyPair, KeySize, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey,
    PrivateDecryptingKey,
};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use aws_lc_rs::{cipher, hmac, iv};

/// Attributes of a TCG default-template EK.
pub const EK_ATTRS: u32 = attr::FIXED_TPM
    | attr::FIXED_PARENT
    | attr::SENSITIVE_DATA_ORIGIN
    | attr::ADMIN_WITH_POLICY
    | attr::RESTRICTED
    | attr::DECRYPT;
/// Attributes of an attestation key.
pub const AK_ATTRS: u32 = attr::FIXED_TPM
    | attr::FIXED_PARENT
    | attr::SENSITIVE_DATA_ORIGIN
    | attr::USER_WITH_AUTH
    | attr::RESTRICTED
    | attr::SIGN;
/// Attributes of a TPM-resident, unrestricted signing key.
pub const KEY_ATTRS: u32 = attr::FIXED_TPM
    | attr::FIXED_PARENT
    | attr::SENSITIVE_DATA_ORIGIN
    | attr::USER_WITH_AUTH
    | attr::SIGN;
/// The TCG default EK policy digest (PolicySecret(TPM_RH_ENDORSEMENT)).
pub const EK_POLICY: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
    0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];
/// `TPM_ALG_ECDSA`, `TPM_ALG_NULL`, `TPM_ALG_RSASSA` for building schemes.
pub const ECDSA: u16 = alg::ECDSA;
/// `TPM_ALG_NULL`.
pub const NULL: u16 = alg::NULL;
/// `TPM_ALG_RSASSA`.
pub const RSASSA: u16 = alg::RSASSA;
/// `TPM_GENERATED_VALUE`.
pub const GENERATED: u32 = TPM_GENERATED_VALUE;
/// `TPM_ST_ATTEST_CERTIFY`.
pub const ST_CERTIFY: u16 = TPM_ST_ATTEST_CERTIFY;

/// Big-endian marshalling, as a TPM writes its structures.
#[derive(Debug, Default)]
pub struct Marshal(pub Vec<u8>);

impl Marshal {
    /// Appends a u8.
    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    /// Appends a u16.
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Appends a u32.
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Appends a u64.
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Appends a TPM2B (u16 size, then the bytes).
    pub fn b(mut self, v: &[u8]) -> Self {
        let n = u16::try_from(v.len()).unwrap_or(u16::MAX);
        self.0.extend_from_slice(&n.to_be_bytes());
        self.0.extend_from_slice(v);
        self
    }
}

/// A TPMT_PUBLIC for an RSA-2048 EK with `modulus` and `attrs`.
pub fn rsa_ek_public(modulus: &[u8], attrs: u32) -> Vec<u8> {
    Marshal::default()
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

/// A TPMT_PUBLIC for an ECC P-256 key (`point` uncompressed SEC1) with
/// `attrs` and `scheme` (`ECDSA` with SHA-256, or `NULL`).
pub fn ecc_public(point: &[u8], attrs: u32, scheme: u16) -> Vec<u8> {
    let m = Marshal::default()
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
        .b(point.get(1..33).unwrap_or_default())
        .b(point.get(33..).unwrap_or_default())
        .0
}

/// A TPMS_ATTEST of `kind` (normally [`ST_CERTIFY`]) with `magic`
/// (normally [`GENERATED`]) certifying the object `name`.
pub fn certify_info(extra: &[u8], name: &[u8], magic: u32, kind: u16) -> Vec<u8> {
    Marshal::default()
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

/// An ECC P-256 key held in software, posing as a TPM object.
pub struct SoftKey {
    /// The key pair.
    pub kp: EcdsaKeyPair,
    /// Its TPMT_PUBLIC.
    pub public: Vec<u8>,
}

impl std::fmt::Debug for SoftKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SoftKey")
    }
}

impl SoftKey {
    /// A new key with these attributes and scheme.
    pub fn new(attrs: u32, scheme: u16) -> Self {
        let kp = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .unwrap_or_else(|_| unreachable!("P-256 key generation failed"));
        let public = ecc_public(kp.public_key().as_ref(), attrs, scheme);
        Self { kp, public }
    }
    /// The key's PKCS#8 DER.
    pub fn pkcs8(&self) -> Vec<u8> {
        self.kp
            .to_pkcs8v1()
            .map(|d| d.as_ref().to_vec())
            .unwrap_or_default()
    }
    /// The key's DER SubjectPublicKeyInfo.
    pub fn spki(&self) -> Vec<u8> {
        self.kp
            .public_key()
            .as_der()
            .map(|d| d.as_ref().to_vec())
            .unwrap_or_default()
    }
    /// A TPMT_SIGNATURE (ECDSA-SHA256) over `msg`, r and s without leading
    /// zeros as a TPM writes them.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let sig = self
            .kp
            .sign(&rng, msg)
            .unwrap_or_else(|_| unreachable!("signing failed"));
        let sig = sig.as_ref();
        Marshal::default()
            .u16(alg::ECDSA)
            .u16(alg::SHA256)
            .b(strip_zeros(&sig[..32]))
            .b(strip_zeros(&sig[32..]))
            .0
    }
    /// This key (as AK) certifies `key` with qualifying data `extra`:
    /// (TPMS_ATTEST, TPMT_SIGNATURE).
    pub fn certify(&self, key: &[u8], extra: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let name = super::TpmPublic::parse(key)
            .map(|k| k.name())
            .unwrap_or_default();
        let info = certify_info(extra, &name, GENERATED, ST_CERTIFY);
        let sig = self.sign(&info);
        (info, sig)
    }
}

/// An endorsement key held in software.
pub struct SoftEk {
    kp: RsaKeyPair,
    /// Its TPMT_PUBLIC.
    pub public: Vec<u8>,
}

impl std::fmt::Debug for SoftEk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SoftEk")
    }
}

impl SoftEk {
    /// A new RSA-2048 EK.
    pub fn new() -> Self {
        let kp = RsaKeyPair::generate(KeySize::Rsa2048)
            .unwrap_or_else(|_| unreachable!("RSA key generation failed"));
        let public = rsa_ek_public(&Self::modulus_of(&kp), EK_ATTRS);
        Self { kp, public }
    }

    fn modulus_of(kp: &RsaKeyPair) -> Vec<u8> {
        use x509_parser::prelude::FromDer;
        let spki = kp
            .public_key()
            .as_der()
            .map(|d| d.as_ref().to_vec())
            .unwrap_or_default();
        let Ok((_, parsed)) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki) else {
            return Vec::new();
        };
        match parsed.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => strip_zeros(rsa.modulus).to_vec(),
            _ => Vec::new(),
        }
    }

    /// The EK's modulus.
    pub fn modulus(&self) -> Vec<u8> {
        Self::modulus_of(&self.kp)
    }

    /// The EK's DER SubjectPublicKeyInfo.
    pub fn spki(&self) -> Vec<u8> {
        self.kp
            .public_key()
            .as_der()
            .map(|d| d.as_ref().to_vec())
            .unwrap_or_default()
    }

    /// `TPM2_ActivateCredential` for the object `name`: the secret, or
    /// `None` where a TPM would fail (wrong EK, wrong name, bad HMAC).
    pub fn activate(&self, name: &[u8], cred: &Credential) -> Option<Vec<u8>> {
        let der = self.kp.as_der().ok()?;
        let private = PrivateDecryptingKey::from_pkcs8(der.as_ref()).ok()?;
        let oaep = OaepPrivateDecryptingKey::new(private).ok()?;
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
        let mut r = Reader::new(&cred.credential_blob, "TPM2B_ID_OBJECT").ok()?;
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
        let key = cipher::UnboundCipherKey::new(&cipher::AES_128, &sym).ok()?;
        let dk = cipher::DecryptingKey::cfb128(key).ok()?;
        let plain = dk
            .decrypt(
                &mut enc,
                cipher::DecryptionContext::Iv128(iv::FixedLength::from([0u8; 16])),
            )
            .ok()?;
        let mut r = Reader::new(plain, "TPM2B_DIGEST").ok()?;
        let secret = r.tpm2b().ok()?.to_vec();
        r.finish().ok()?;
        Some(secret)
    }
}

impl Default for SoftEk {
    fn default() -> Self {
        Self::new()
    }
}
