//! TPM 2.0 evidence, checked in software (feature `tpm`).
//!
//! What a server needs to attest a node by TPM credential activation without
//! a TPM of its own: parse the TPM's marshalled structures (TPM 2.0 Library
//! Part 2), compute object Names, derive the SubjectPublicKeyInfo and the
//! EK hash that names an agent, run `TPM2_MakeCredential` (Part 1, §24) to an
//! RSA endorsement key, and verify a `TPM2_Certify` signed by an attestation
//! key.
//!
//! Parsing is strict: every structure must be consumed exactly, unknown
//! algorithms are refused, sizes are bounded by the marshalled TPM2B limits.

use aws_lc_rs::{constant_time, digest, hmac, rand, signature};
use std::fmt;

/// `TPM_ALG_*` identifiers used here.
mod alg {
    pub const RSA: u16 = 0x0001;
    pub const SHA256: u16 = 0x000B;
    pub const AES: u16 = 0x0006;
    pub const NULL: u16 = 0x0010;
    pub const RSASSA: u16 = 0x0014;
    pub const RSAES: u16 = 0x0015;
    pub const RSAPSS: u16 = 0x0016;
    pub const OAEP: u16 = 0x0017;
    pub const ECDSA: u16 = 0x0018;
    pub const ECDH: u16 = 0x0019;
    pub const ECDAA: u16 = 0x001A;
    pub const ECSCHNORR: u16 = 0x001C;
    pub const KDF1_SP800_56A: u16 = 0x0020;
    pub const KDF2: u16 = 0x0021;
    pub const KDF1_SP800_108: u16 = 0x0022;
    pub const ECC: u16 = 0x0023;
    pub const CFB: u16 = 0x0043;
    pub const ECC_NIST_P256: u16 = 0x0003;
}

/// `TPMA_OBJECT` bits.
pub mod attr {
    /// The object cannot be duplicated to another TPM.
    pub const FIXED_TPM: u32 = 1 << 1;
    /// The object cannot be re-parented.
    pub const FIXED_PARENT: u32 = 1 << 4;
    /// The TPM generated the object's sensitive part itself.
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    /// The auth value may be used for user-role authorization.
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    /// Admin-role actions need the policy.
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    /// Restricted: signs only TPM-generated data (AK) or decrypts only
    /// TPM-formatted data (EK, storage keys).
    pub const RESTRICTED: u32 = 1 << 16;
    /// A decryption key.
    pub const DECRYPT: u32 = 1 << 17;
    /// A signing key.
    pub const SIGN: u32 = 1 << 18;
}

const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
const TPM_ST_ATTEST_CERTIFY: u16 = 0x8017;
/// Largest TPM2B this module accepts (TPM2B_PUBLIC_KEY_RSA is 512 for RSA-4096).
const MAX_TPM2B: usize = 1024;
/// Largest whole structure accepted.
const MAX_STRUCTURE: usize = 4096;
/// Largest credential a TPM activates (TPM2B_DIGEST).
const MAX_CREDENTIAL: usize = 64;

/// Why TPM evidence was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TpmError {
    /// A structure was truncated, too long, or had bytes left over.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// An algorithm or parameter this module does not accept.
    #[error("unsupported {0}")]
    Unsupported(&'static str),
    /// A key's attributes or parameters are not what its role requires.
    #[error("{0}")]
    WrongKey(&'static str),
    /// A signature did not verify.
    #[error("bad signature on {0}")]
    BadSignature(&'static str),
    /// A value does not match the one expected.
    #[error("{0} does not match")]
    Mismatch(&'static str),
    /// The platform's RNG or crypto failed.
    #[error("crypto failure")]
    Crypto,
}

/// A big-endian reader over a TPM marshalled structure.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Result<Self, TpmError> {
        if buf.len() > MAX_STRUCTURE {
            return Err(TpmError::Malformed(what));
        }
        Ok(Self { buf, what })
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], TpmError> {
        if n > self.buf.len() {
            return Err(TpmError::Malformed(self.what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, TpmError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, TpmError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, TpmError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, TpmError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn tpm2b(&mut self) -> Result<&'a [u8], TpmError> {
        let n = usize::from(self.u16()?);
        if n > MAX_TPM2B {
            return Err(TpmError::Malformed(self.what));
        }
        self.take(n)
    }
    fn finish(self) -> Result<(), TpmError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(TpmError::Malformed(self.what))
        }
    }
}

fn put_tpm2b(out: &mut Vec<u8>, data: &[u8]) -> Result<(), TpmError> {
    let n = u16::try_from(data.len()).map_err(|_| TpmError::Crypto)?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

/// A symmetric definition (`TPMT_SYM_DEF_OBJECT`) as this module accepts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Symmetric {
    /// `TPM_ALG_NULL`.
    Null,
    /// AES in CFB mode with this many key bits.
    AesCfb(u16),
}

/// The key-type specific part of a `TPMT_PUBLIC`.
#[derive(Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// An RSA key: modulus (big-endian, no leading zeros) and exponent.
    Rsa {
        /// Modulus, big-endian.
        modulus: Vec<u8>,
        /// Public exponent (0 in the structure means 65537; already mapped).
        exponent: u32,
        /// Scheme (`TPM_ALG_NULL`, `RSASSA`, …) and its hash.
        scheme: (u16, Option<u16>),
    },
    /// An ECC NIST P-256 key: the point's coordinates, 32 bytes each.
    EccP256 {
        /// X coordinate, left-padded to 32 bytes.
        x: [u8; 32],
        /// Y coordinate, left-padded to 32 bytes.
        y: [u8; 32],
        /// Scheme (`TPM_ALG_NULL`, `ECDSA`, …) and its hash.
        scheme: (u16, Option<u16>),
    },
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rsa { modulus, .. } => write!(f, "Rsa({} bits)", modulus.len() * 8),
            Self::EccP256 { .. } => f.write_str("EccP256"),
        }
    }
}

/// A parsed `TPMT_PUBLIC`: a TPM object's public area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmPublic {
    raw: Vec<u8>,
    /// `TPMA_OBJECT` bits (see [`attr`]).
    pub attributes: u32,
    /// The authorization policy digest (empty if none).
    pub auth_policy: Vec<u8>,
    /// The symmetric definition (for storage and endorsement keys).
    pub symmetric: Symmetric,
    /// The key itself.
    pub key: PublicKey,
}

fn scheme(r: &mut Reader<'_>) -> Result<(u16, Option<u16>), TpmError> {
    let s = r.u16()?;
    Ok(match s {
        alg::NULL | alg::RSAES => (s, None),
        alg::RSASSA | alg::RSAPSS | alg::OAEP | alg::ECDSA | alg::ECDH | alg::ECSCHNORR => {
            (s, Some(r.u16()?))
        }
        alg::ECDAA => {
            let h = r.u16()?;
            let _count = r.u16()?;
            (s, Some(h))
        }
        _ => return Err(TpmError::Unsupported("key scheme")),
    })
}

fn symmetric(r: &mut Reader<'_>) -> Result<Symmetric, TpmError> {
    match r.u16()? {
        alg::NULL => Ok(Symmetric::Null),
        alg::AES => {
            let bits = r.u16()?;
            if r.u16()? != alg::CFB || !matches!(bits, 128 | 192 | 256) {
                return Err(TpmError::Unsupported("symmetric mode"));
            }
            Ok(Symmetric::AesCfb(bits))
        }
        _ => Err(TpmError::Unsupported("symmetric algorithm")),
    }
}

fn pad32(v: &[u8]) -> Result<[u8; 32], TpmError> {
    let v = strip_zeros(v);
    if v.len() > 32 {
        return Err(TpmError::Malformed("ECC point"));
    }
    let mut out = [0u8; 32];
    out[32 - v.len()..].copy_from_slice(v);
    Ok(out)
}

fn strip_zeros(v: &[u8]) -> &[u8] {
    let n = v.iter().take_while(|b| **b == 0).count();
    &v[n..]
}

impl TpmPublic {
    /// Parses a marshalled `TPMT_PUBLIC` (the contents of a `TPM2B_PUBLIC`,
    /// without its size). Only SHA-256 Names, RSA and ECC P-256 keys.
    pub fn parse(bytes: &[u8]) -> Result<Self, TpmError> {
        let mut r = Reader::new(bytes, "TPMT_PUBLIC")?;
        let kind = r.u16()?;
        if r.u16()? != alg::SHA256 {
            return Err(TpmError::Unsupported("name algorithm (SHA-256 only)"));
        }
        let attributes = r.u32()?;
        let auth_policy = r.tpm2b()?.to_vec();
        let symmetric = symmetric(&mut r)?;
        let key = match kind {
            alg::RSA => {
                let scheme = scheme(&mut r)?;
                let bits = r.u16()?;
                let exponent = match r.u32()? {
                    0 => 65_537,
                    e => e,
                };
                let modulus = strip_zeros(r.tpm2b()?).to_vec();
                if !matches!(bits, 2048 | 3072 | 4096) || modulus.len() * 8 != usize::from(bits) {
                    return Err(TpmError::Unsupported("RSA key size"));
                }
                if exponent < 3 || exponent % 2 == 0 {
                    return Err(TpmError::WrongKey("RSA exponent is invalid"));
                }
                PublicKey::Rsa {
                    modulus,
                    exponent,
                    scheme,
                }
            }
            alg::ECC => {
                let scheme = scheme(&mut r)?;
                if r.u16()? != alg::ECC_NIST_P256 {
                    return Err(TpmError::Unsupported("ECC curve (P-256 only)"));
                }
                match r.u16()? {
                    alg::NULL => {}
                    alg::KDF1_SP800_56A | alg::KDF2 | alg::KDF1_SP800_108 => {
                        let _ = r.u16()?;
                    }
                    _ => return Err(TpmError::Unsupported("ECC KDF")),
                }
                let x = pad32(r.tpm2b()?)?;
                let y = pad32(r.tpm2b()?)?;
                PublicKey::EccP256 { x, y, scheme }
            }
            _ => return Err(TpmError::Unsupported("object type (RSA or ECC only)")),
        };
        r.finish()?;
        Ok(Self {
            raw: bytes.to_vec(),
            attributes,
            auth_policy,
            symmetric,
            key,
        })
    }

    /// The marshalled bytes this was parsed from.
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// The object's Name: `TPM_ALG_SHA256 || SHA-256(TPMT_PUBLIC)`.
    pub fn name(&self) -> Vec<u8> {
        let mut n = alg::SHA256.to_be_bytes().to_vec();
        n.extend_from_slice(digest::digest(&digest::SHA256, &self.raw).as_ref());
        n
    }

    fn has(&self, bits: u32) -> bool {
        self.attributes & bits == bits
    }

    /// The key as a DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Vec<u8> {
        match &self.key {
            PublicKey::Rsa {
                modulus, exponent, ..
            } => der::rsa_spki(modulus, *exponent),
            PublicKey::EccP256 { x, y, .. } => der::p256_spki(x, y),
        }
    }

    /// The uncompressed SEC1 point of an ECC P-256 key.
    pub fn p256_point(&self) -> Option<[u8; 65]> {
        match &self.key {
            PublicKey::EccP256 { x, y, .. } => {
                let mut p = [0u8; 65];
                p[0] = 4;
                p[1..33].copy_from_slice(x);
                p[33..].copy_from_slice(y);
                Some(p)
            }
            PublicKey::Rsa { .. } => None,
        }
    }

    /// Checks the shape of an endorsement key: RSA-2048, restricted decrypt,
    /// fixedTPM, fixedParent, sensitiveDataOrigin, AES-128-CFB (the TCG
    /// default template, the only kind [`make_credential`] encrypts to).
    pub fn check_ek(&self) -> Result<(), TpmError> {
        let PublicKey::Rsa {
            modulus, scheme, ..
        } = &self.key
        else {
            return Err(TpmError::Unsupported("EK type (RSA-2048 only)"));
        };
        if modulus.len() != 256 || scheme.0 != alg::NULL {
            return Err(TpmError::WrongKey("EK is not an RSA-2048 storage key"));
        }
        if !self.has(
            attr::FIXED_TPM
                | attr::FIXED_PARENT
                | attr::SENSITIVE_DATA_ORIGIN
                | attr::RESTRICTED
                | attr::DECRYPT,
        ) || self.has(attr::SIGN)
        {
            return Err(TpmError::WrongKey("EK attributes are not those of an EK"));
        }
        if self.symmetric != Symmetric::AesCfb(128) {
            return Err(TpmError::Unsupported(
                "EK symmetric definition (AES-128-CFB only)",
            ));
        }
        Ok(())
    }

    /// Checks the shape of an attestation key: ECC P-256 with ECDSA-SHA256,
    /// restricted sign, fixedTPM, fixedParent, sensitiveDataOrigin, no
    /// decrypt.
    pub fn check_ak(&self) -> Result<(), TpmError> {
        let PublicKey::EccP256 { scheme, .. } = &self.key else {
            return Err(TpmError::Unsupported("AK type (ECC P-256 only)"));
        };
        if *scheme != (alg::ECDSA, Some(alg::SHA256)) {
            return Err(TpmError::WrongKey("AK scheme is not ECDSA-SHA256"));
        }
        if !self.has(
            attr::FIXED_TPM
                | attr::FIXED_PARENT
                | attr::SENSITIVE_DATA_ORIGIN
                | attr::RESTRICTED
                | attr::SIGN,
        ) || self.has(attr::DECRYPT)
        {
            return Err(TpmError::WrongKey(
                "AK must be restricted, sign-only, fixedTPM, fixedParent and TPM-generated",
            ));
        }
        Ok(())
    }

    /// Checks the shape of a TPM-resident signing key (an agent or workload
    /// key): ECC P-256, sign, not decrypt, not restricted, fixedTPM,
    /// fixedParent, sensitiveDataOrigin: it was made in this TPM and can
    /// never leave it.
    pub fn check_resident_signing_key(&self) -> Result<(), TpmError> {
        let PublicKey::EccP256 { scheme, .. } = &self.key else {
            return Err(TpmError::Unsupported("key type (ECC P-256 only)"));
        };
        if !matches!(scheme.0, alg::NULL | alg::ECDSA) {
            return Err(TpmError::WrongKey("key scheme is not ECDSA"));
        }
        if !self
            .has(attr::FIXED_TPM | attr::FIXED_PARENT | attr::SENSITIVE_DATA_ORIGIN | attr::SIGN)
            || self.has(attr::DECRYPT)
            || self.has(attr::RESTRICTED)
        {
            return Err(TpmError::WrongKey(
                "key must be an unrestricted signing key, fixedTPM, fixedParent and TPM-generated",
            ));
        }
        Ok(())
    }
}

/// Lowercase hex SHA-256 of a DER SubjectPublicKeyInfo: the EK hash that
/// names a TPM agent (`spiffe://<td>/agent/tpm/<hash>`) and that
/// `sigil tpm allow` takes.
pub fn spki_hash(spki_der: &[u8]) -> String {
    digest::digest(&digest::SHA256, spki_der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// KDFa (Part 1, §11.4.10.2) with HMAC-SHA256: `bits` of key material from
/// `key`, a label (a NUL is appended) and two contexts.
pub fn kdfa_sha256(
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Vec<u8> {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let len = usize::try_from(bits.div_ceil(8)).unwrap_or(0);
    let mut out = Vec::with_capacity(len + 32);
    let mut counter: u32 = 1;
    while out.len() < len {
        let mut ctx = hmac::Context::with_key(&k);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter = counter.wrapping_add(1);
    }
    out.truncate(len);
    out
}

/// The outputs of `TPM2_MakeCredential`, as `TPM2_ActivateCredential` takes
/// them (contents of the TPM2Bs, without their size).
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// `TPM2B_ID_OBJECT` contents: `TPM2B(integrityHMAC) || encIdentity`.
    pub credential_blob: Vec<u8>,
    /// `TPM2B_ENCRYPTED_SECRET` contents: the seed, RSA-OAEP encrypted to
    /// the EK.
    pub encrypted_secret: Vec<u8>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential").finish_non_exhaustive()
    }
}

/// `TPM2_MakeCredential` in software: wraps `secret` so that only the TPM
/// holding `ek` can recover it, and only for the object named `ak_name`
/// (which must be loaded in that TPM).
pub fn make_credential(
    ek: &TpmPublic,
    ak_name: &[u8],
    secret: &[u8],
) -> Result<Credential, TpmError> {
    ek.check_ek()?;
    if secret.is_empty() || secret.len() > MAX_CREDENTIAL {
        return Err(TpmError::Malformed("credential"));
    }
    let mut seed = [0u8; 32];
    rand::fill(&mut seed).map_err(|_| TpmError::Crypto)?;

    // The seed, OAEP-encrypted to the EK with the label "IDENTITY\0".
    let spki = ek.spki_der();
    let pubkey = aws_lc_rs::rsa::PublicEncryptingKey::from_der(&spki)
        .map_err(|_| TpmError::WrongKey("EK is not a usable RSA key"))?;
    let oaep =
        aws_lc_rs::rsa::OaepPublicEncryptingKey::new(pubkey).map_err(|_| TpmError::Crypto)?;
    let mut ct = vec![0u8; oaep.ciphertext_size()];
    let encrypted_secret = oaep
        .encrypt(
            &aws_lc_rs::rsa::OAEP_SHA256_MGF1SHA256,
            &seed,
            &mut ct,
            Some(b"IDENTITY\0"),
        )
        .map_err(|_| TpmError::Crypto)?
        .to_vec();

    // encIdentity = AES-128-CFB(KDFa(seed, "STORAGE", name), IV = 0) of TPM2B(secret).
    let sym = kdfa_sha256(&seed, "STORAGE", ak_name, &[], 128);
    let mut enc_identity = Vec::with_capacity(secret.len() + 2);
    put_tpm2b(&mut enc_identity, secret)?;
    let key = aws_lc_rs::cipher::UnboundCipherKey::new(&aws_lc_rs::cipher::AES_128, &sym)
        .map_err(|_| TpmError::Crypto)?;
    aws_lc_rs::cipher::EncryptingKey::cfb128(key)
        .and_then(|k| {
            k.less_safe_encrypt(
                &mut enc_identity,
                aws_lc_rs::cipher::EncryptionContext::Iv128(aws_lc_rs::iv::FixedLength::from(
                    [0u8; 16],
                )),
            )
        })
        .map_err(|_| TpmError::Crypto)?;

    // outerHMAC = HMAC(KDFa(seed, "INTEGRITY"), encIdentity || name).
    let hmac_key = kdfa_sha256(&seed, "INTEGRITY", &[], &[], 256);
    let k = hmac::Key::new(hmac::HMAC_SHA256, &hmac_key);
    let mut ctx = hmac::Context::with_key(&k);
    ctx.update(&enc_identity);
    ctx.update(ak_name);
    let outer = ctx.sign();

    let mut credential_blob = Vec::with_capacity(2 + 32 + enc_identity.len());
    put_tpm2b(&mut credential_blob, outer.as_ref())?;
    credential_blob.extend_from_slice(&enc_identity);
    Ok(Credential {
        credential_blob,
        encrypted_secret,
    })
}

/// A parsed `TPMS_ATTEST` of type `TPM_ST_ATTEST_CERTIFY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertifyInfo {
    /// The caller-supplied qualifying data.
    pub extra_data: Vec<u8>,
    /// Name of the certified object.
    pub name: Vec<u8>,
    /// Qualified name of the certified object.
    pub qualified_name: Vec<u8>,
}

impl CertifyInfo {
    /// Parses a marshalled `TPMS_ATTEST`; refuses any other attestation type
    /// and anything not generated by a TPM (`TPM_GENERATED_VALUE`).
    pub fn parse(bytes: &[u8]) -> Result<Self, TpmError> {
        let mut r = Reader::new(bytes, "TPMS_ATTEST")?;
        if r.u32()? != TPM_GENERATED_VALUE {
            return Err(TpmError::WrongKey("attestation was not generated by a TPM"));
        }
        if r.u16()? != TPM_ST_ATTEST_CERTIFY {
            return Err(TpmError::Unsupported("attestation type (certify only)"));
        }
        let _qualified_signer = r.tpm2b()?;
        let extra_data = r.tpm2b()?.to_vec();
        let _clock = r.u64()?;
        let _reset = r.u32()?;
        let _restart = r.u32()?;
        let _safe = r.u8()?;
        let _firmware = r.u64()?;
        let name = r.tpm2b()?.to_vec();
        let qualified_name = r.tpm2b()?.to_vec();
        r.finish()?;
        Ok(Self {
            extra_data,
            name,
            qualified_name,
        })
    }
}

/// Verifies a `TPMT_SIGNATURE` (ECDSA-SHA256) by the ECC P-256 key `signer`
/// over `message`.
pub fn verify_signature(signer: &TpmPublic, message: &[u8], sig: &[u8]) -> Result<(), TpmError> {
    let mut r = Reader::new(sig, "TPMT_SIGNATURE")?;
    if r.u16()? != alg::ECDSA || r.u16()? != alg::SHA256 {
        return Err(TpmError::Unsupported(
            "signature scheme (ECDSA-SHA256 only)",
        ));
    }
    let rr = pad32(r.tpm2b()?)?;
    let ss = pad32(r.tpm2b()?)?;
    r.finish()?;
    let point = signer
        .p256_point()
        .ok_or(TpmError::Unsupported("signing key type"))?;
    let mut fixed = [0u8; 64];
    fixed[..32].copy_from_slice(&rr);
    fixed[32..].copy_from_slice(&ss);
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
        .verify(message, &fixed)
        .map_err(|_| TpmError::BadSignature("TPM attestation"))
}

/// Domain separation for the certification of TPM-bound workload keys.
pub const WORKLOAD_KEY_CERTIFY_CONTEXT: &[u8] = b"sigil workload key\0";

/// The qualifying data of the AK's `TPM2_Certify` of the TPM-bound key of
/// registration entry `entry_id` (`X509SvidRequest.tpm_key`):
/// SHA-256([`WORKLOAD_KEY_CERTIFY_CONTEXT`] || entry_id).
pub fn workload_key_qualifying_data(entry_id: &str) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(WORKLOAD_KEY_CERTIFY_CONTEXT);
    ctx.update(entry_id.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Verifies that `ak` certified `key` (`TPM2_Certify`) with qualifying data
/// `expected_extra`: the signature over `certify_info` is the AK's, the
/// structure came from a TPM, and it names exactly `key`.
pub fn verify_certify(
    ak: &TpmPublic,
    key: &TpmPublic,
    certify_info: &[u8],
    signature: &[u8],
    expected_extra: &[u8],
) -> Result<CertifyInfo, TpmError> {
    verify_signature(ak, certify_info, signature)?;
    let info = CertifyInfo::parse(certify_info)?;
    if constant_time::verify_slices_are_equal(&info.extra_data, expected_extra).is_err() {
        return Err(TpmError::Mismatch("certification qualifying data"));
    }
    if info.name != key.name() {
        return Err(TpmError::Mismatch("certified key name"));
    }
    Ok(info)
}

/// Minimal DER for the two SubjectPublicKeyInfo shapes this module emits.
mod der {
    fn len(out: &mut Vec<u8>, n: usize) {
        if n < 0x80 {
            out.push(n as u8);
        } else {
            let bytes = n.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
    }
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        len(&mut out, body.len());
        out.extend_from_slice(body);
        out
    }
    fn uint(v: &[u8]) -> Vec<u8> {
        let v = super::strip_zeros(v);
        let mut body = Vec::with_capacity(v.len() + 1);
        if v.first().is_none_or(|b| b & 0x80 != 0) {
            body.push(0);
        }
        body.extend_from_slice(v);
        tlv(0x02, &body)
    }
    /// rsaEncryption with NULL parameters.
    const RSA_ALG: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    /// id-ecPublicKey with prime256v1.
    const P256_ALG: [u8; 21] = [
        0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    pub fn rsa_spki(modulus: &[u8], exponent: u32) -> Vec<u8> {
        let mut key = uint(modulus);
        key.extend_from_slice(&uint(&exponent.to_be_bytes()));
        let key = tlv(0x30, &key);
        let mut bits = vec![0u8];
        bits.extend_from_slice(&key);
        let mut body = RSA_ALG.to_vec();
        body.extend_from_slice(&tlv(0x03, &bits));
        tlv(0x30, &body)
    }
    pub fn p256_spki(x: &[u8; 32], y: &[u8; 32]) -> Vec<u8> {
        let mut bits = vec![0u8, 4];
        bits.extend_from_slice(x);
        bits.extend_from_slice(y);
        let mut body = P256_ALG.to_vec();
        body.extend_from_slice(&tlv(0x03, &bits));
        tlv(0x30, &body)
    }
}

#[cfg(any(test, feature = "tpm-soft"))]
pub mod soft;

#[cfg(test)]
mod tests;
