//! TPM node attestation, the server's half: which endorsement keys are
//! trusted (an allow-list of EK hashes, or EK certificates from configured
//! manufacturer CAs) and the credential-activation sessions in flight.
//!
//! The TPM structures and MakeCredential are in [`sigil::tpm`]; this module
//! adds policy: EK certificate chains, the assurance level each path earns,
//! and single-use, short-lived challenge sessions.

use sigil::AssuranceLevel;
use sigil::tpm::{Credential, PublicKey, TpmPublic, make_credential};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use x509_parser::prelude::*;
use zeroize::Zeroizing;

/// How long an agent has to answer a credential challenge.
pub const SESSION_TTL_SECS: i64 = 60;
/// Challenges in flight at once; more is refused (ResourceExhausted), which
/// bounds what unauthenticated callers can make the server hold.
pub const MAX_PENDING: usize = 1024;

/// Why an EK certificate was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EkCertError {
    /// Not a DER certificate.
    #[error("EK certificate is not a DER X.509 certificate")]
    Malformed,
    /// No configured manufacturer CA issued it.
    #[error("EK certificate was not issued by a configured manufacturer CA")]
    UnknownIssuer,
    /// Outside its validity period.
    #[error("EK certificate is expired or not yet valid")]
    Expired,
    /// A critical extension this verifier does not understand.
    #[error("EK certificate has an unsupported critical extension {0}")]
    CriticalExtension(String),
    /// The certified key is not the TPM's EK.
    #[error("EK certificate's key is not the EK presented")]
    KeyMismatch,
}

/// A configured manufacturer CA certificate.
struct EkCa {
    der: Vec<u8>,
}

/// One credential challenge waiting for its answer.
pub struct Pending {
    /// The secret the TPM must recover.
    pub secret: Zeroizing<[u8; 32]>,
    /// The AK the credential was made for.
    pub ak: TpmPublic,
    /// Lowercase hex SHA-256 of the EK SubjectPublicKeyInfo.
    pub ek_hash: String,
    /// The level the EK earned.
    pub level: AssuranceLevel,
    /// The EK certificate's issuer, when the certificate path was taken.
    pub ek_issuer: Option<String>,
    expires_at: i64,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("ek_hash", &self.ek_hash)
            .field("level", &self.level)
            .finish_non_exhaustive()
    }
}

/// EK trust anchors and challenge sessions.
pub struct TpmAttestor {
    cas: Vec<EkCa>,
    pending: Mutex<HashMap<String, Pending>>,
}

impl std::fmt::Debug for TpmAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmAttestor")
            .field("manufacturer_cas", &self.cas.len())
            .finish_non_exhaustive()
    }
}

/// Certificate extensions this verifier understands when critical. TPM EK
/// certificates (TCG EK Credential Profile) mark the subjectAltName critical
/// because their subject is empty; the SAN holds the TPM manufacturer,
/// model and firmware version as a directoryName. Accepting it is deliberate.
const UNDERSTOOD_CRITICAL: [&str; 6] = [
    "2.5.29.17", // subjectAltName
    "2.5.29.19", // basicConstraints
    "2.5.29.15", // keyUsage
    "2.5.29.32", // certificatePolicies
    "2.5.29.37", // extKeyUsage (tcg-kp-EKCertificate)
    "2.5.29.9",  // subjectDirectoryAttributes (TPM specification)
];

impl TpmAttestor {
    /// Reads manufacturer CA certificates (PEM, any number per file). Each
    /// is a trust anchor for EK certificates: give the manufacturer's root
    /// and its intermediate CAs.
    pub fn load(files: &[impl AsRef<Path>]) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut cas = Vec::new();
        for f in files {
            let f = f.as_ref();
            let text =
                std::fs::read(f).with_context(|| format!("reading EK CA file {}", f.display()))?;
            let mut n = 0;
            for pem in Pem::iter_from_buffer(&text) {
                let pem = pem.with_context(|| format!("parsing PEM in {}", f.display()))?;
                if pem.label != "CERTIFICATE" {
                    continue;
                }
                let (_, cert) = X509Certificate::from_der(&pem.contents)
                    .map_err(|e| anyhow::anyhow!("{}: bad certificate: {e}", f.display()))?;
                if !cert.is_ca() {
                    anyhow::bail!(
                        "{}: {} is not a CA certificate",
                        f.display(),
                        cert.subject()
                    );
                }
                cas.push(EkCa {
                    der: pem.contents.clone(),
                });
                n += 1;
            }
            if n == 0 {
                anyhow::bail!("{}: no CERTIFICATE in it", f.display());
            }
        }
        Ok(Self::with_cas(cas))
    }

    fn with_cas(cas: Vec<EkCa>) -> Self {
        Self {
            cas,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// No manufacturer CAs: only the allow-list can admit an EK.
    pub fn without_cas() -> Self {
        Self::with_cas(Vec::new())
    }

    /// Whether any manufacturer CA is configured.
    pub fn has_cas(&self) -> bool {
        !self.cas.is_empty()
    }

    /// Verifies an EK certificate: issued (signature checked) by a
    /// configured CA, both valid at `now`, no critical extension beyond the
    /// ones EK certificates carry, and certifying exactly `ek`. Returns the
    /// issuer's name.
    pub fn verify_ek_cert(
        &self,
        der: &[u8],
        ek: &TpmPublic,
        now: i64,
    ) -> Result<String, EkCertError> {
        let (rest, cert) = X509Certificate::from_der(der).map_err(|_| EkCertError::Malformed)?;
        if !rest.is_empty() {
            return Err(EkCertError::Malformed);
        }
        let at = ASN1Time::from_timestamp(now).map_err(|_| EkCertError::Expired)?;
        if !cert.validity().is_valid_at(at) {
            return Err(EkCertError::Expired);
        }
        for ext in cert.extensions() {
            let oid = ext.oid.to_id_string();
            if ext.critical && !UNDERSTOOD_CRITICAL.contains(&oid.as_str()) {
                return Err(EkCertError::CriticalExtension(oid));
            }
        }
        // The certified key must be the EK itself.
        let PublicKey::Rsa {
            modulus, exponent, ..
        } = &ek.key
        else {
            return Err(EkCertError::KeyMismatch);
        };
        match cert.public_key().parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa))
                if strip_zeros(rsa.modulus) == modulus.as_slice()
                    && rsa.try_exponent().ok() == Some(u64::from(*exponent)) => {}
            _ => return Err(EkCertError::KeyMismatch),
        }
        for ca in &self.cas {
            let Ok((_, issuer)) = X509Certificate::from_der(&ca.der) else {
                continue;
            };
            if issuer.subject().as_raw() != cert.issuer().as_raw() {
                continue;
            }
            if !issuer.validity().is_valid_at(at) {
                continue;
            }
            if verify_signed_by(&cert, &issuer) {
                return Ok(issuer.subject().to_string());
            }
        }
        Err(EkCertError::UnknownIssuer)
    }

    /// Starts a credential challenge for `ak` on the TPM holding `ek`: a
    /// fresh 32-byte secret, wrapped by MakeCredential. Returns the session
    /// ID and the credential to send.
    pub fn begin(
        &self,
        ek: &TpmPublic,
        ak: TpmPublic,
        ek_hash: String,
        level: AssuranceLevel,
        ek_issuer: Option<String>,
        now: i64,
    ) -> Result<(String, Credential), BeginError> {
        let mut secret = Zeroizing::new([0u8; 32]);
        aws_lc_rs::rand::fill(secret.as_mut()).map_err(|_| BeginError::Crypto)?;
        let cred = make_credential(ek, &ak.name(), secret.as_ref()).map_err(BeginError::Tpm)?;
        let mut id = [0u8; 16];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| BeginError::Crypto)?;
        let id = crate::model::hex(&id);
        let mut pending = self.pending.lock().map_err(|_| BeginError::Crypto)?;
        pending.retain(|_, p| p.expires_at > now);
        if pending.len() >= MAX_PENDING {
            return Err(BeginError::Busy);
        }
        pending.insert(
            id.clone(),
            Pending {
                secret,
                ak,
                ek_hash,
                level,
                ek_issuer,
                expires_at: now + SESSION_TTL_SECS,
            },
        );
        Ok((id, cred))
    }

    /// Takes a session out, whatever happens next: each challenge is
    /// answered at most once. `None` for unknown or expired sessions.
    pub fn take(&self, session_id: &str, now: i64) -> Option<Pending> {
        let mut pending = self.pending.lock().ok()?;
        let p = pending.remove(session_id)?;
        (p.expires_at > now).then_some(p)
    }
}

/// Why a challenge could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BeginError {
    /// The EK cannot be encrypted to.
    #[error("{0}")]
    Tpm(sigil::tpm::TpmError),
    /// Too many challenges in flight.
    #[error("too many TPM attestations in progress")]
    Busy,
    /// RNG or lock failure.
    #[error("internal error")]
    Crypto,
}

fn strip_zeros(v: &[u8]) -> &[u8] {
    let n = v.iter().take_while(|b| **b == 0).count();
    &v[n..]
}

/// Verifies `cert`'s signature with `issuer`'s key, for the signature
/// algorithms manufacturer CAs use (RSA PKCS#1 v1.5 and ECDSA, SHA-2).
fn verify_signed_by(cert: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
    use aws_lc_rs::signature as sig;
    let key = &issuer.public_key().subject_public_key.data;
    let curve = issuer
        .public_key()
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    let alg: &'static dyn sig::VerificationAlgorithm = match (
        cert.signature_algorithm.algorithm.to_id_string().as_str(),
        curve.as_deref(),
    ) {
        ("1.2.840.113549.1.1.11", _) => &sig::RSA_PKCS1_2048_8192_SHA256,
        ("1.2.840.113549.1.1.12", _) => &sig::RSA_PKCS1_2048_8192_SHA384,
        ("1.2.840.113549.1.1.13", _) => &sig::RSA_PKCS1_2048_8192_SHA512,
        ("1.2.840.10045.4.3.2", Some("1.2.840.10045.3.1.7")) => &sig::ECDSA_P256_SHA256_ASN1,
        ("1.2.840.10045.4.3.3", Some("1.3.132.0.34")) => &sig::ECDSA_P384_SHA384_ASN1,
        ("1.2.840.10045.4.3.2", Some("1.3.132.0.34")) => &sig::ECDSA_P384_SHA256_ASN1,
        ("1.2.840.10045.4.3.3", Some("1.2.840.10045.3.1.7")) => &sig::ECDSA_P256_SHA384_ASN1,
        _ => return false,
    };
    sig::UnparsedPublicKey::new(alg, key.as_ref())
        .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    /// An RSA EK public area for `modulus` (the TCG default template shape).
    fn ek_public(modulus: &[u8]) -> TpmPublic {
        let mut v = Vec::new();
        v.extend_from_slice(&0x0001u16.to_be_bytes()); // RSA
        v.extend_from_slice(&0x000Bu16.to_be_bytes()); // SHA-256
        v.extend_from_slice(&0x000300b2u32.to_be_bytes()); // EK attributes
        v.extend_from_slice(&32u16.to_be_bytes());
        v.extend_from_slice(&[0x83; 32]);
        for x in [0x0006u16, 128, 0x0043, 0x0010, 2048] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&(modulus.len() as u16).to_be_bytes());
        v.extend_from_slice(modulus);
        let p = TpmPublic::parse(&v).unwrap();
        p.check_ek().unwrap();
        p
    }

    fn rsa_keypair() -> (KeyPair, Vec<u8>) {
        let kp = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&kp);
        let (_, parsed) = SubjectPublicKeyInfo::from_der(&spki).unwrap();
        let x509_parser::public_key::PublicKey::RSA(rsa) = parsed.parsed().unwrap() else {
            panic!()
        };
        let m = strip_zeros(rsa.modulus).to_vec();
        (kp, m)
    }

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
        issuer: rcgen::Issuer<'static, KeyPair>,
    }

    fn ca(name: &str) -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.clone().self_signed(&key).unwrap();
        let issuer = rcgen::Issuer::new(p, KeyPair::from_pem(&key.serialize_pem()).unwrap());
        Ca { cert, key, issuer }
    }

    /// An EK certificate the way manufacturers shape it: empty subject,
    /// critical SAN with a directoryName of TCG attributes.
    fn ek_cert(ca: &Ca, ek_key: &KeyPair, critical_unknown: bool) -> Vec<u8> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.not_after = rcgen::date_time_ymd(2045, 1, 1);
        let mut ext = vec![rcgen::CustomExtension::from_oid_content(
            &[2, 5, 29, 17],
            // SAN: directoryName [4] { SEQUENCE { SET { SEQUENCE { 2.23.133.2.1, UTF8 "id:53575450" } } } }
            {
                let attr_oid = [0x06, 0x05, 0x67, 0x81, 0x05, 0x02, 0x01];
                let val = b"id:53575450";
                let mut atv = attr_oid.to_vec();
                atv.push(0x0c);
                atv.push(val.len() as u8);
                atv.extend_from_slice(val);
                let seq = [&[0x30, atv.len() as u8][..], &atv].concat();
                let set = [&[0x31, seq.len() as u8][..], &seq].concat();
                let name = [&[0x30, set.len() as u8][..], &set].concat();
                let dir = [&[0xa4, name.len() as u8][..], &name].concat();
                [&[0x30, dir.len() as u8][..], &dir].concat()
            },
        )];
        ext[0].set_criticality(true);
        if critical_unknown {
            let mut e = rcgen::CustomExtension::from_oid_content(&[1, 2, 3, 4], vec![0x05, 0x00]);
            e.set_criticality(true);
            ext.push(e);
        }
        p.custom_extensions = ext;
        p.signed_by(ek_key, &ca.issuer).unwrap().der().to_vec()
    }

    fn anchors(cas: &[&Ca]) -> TpmAttestor {
        TpmAttestor::with_cas(
            cas.iter()
                .map(|c| EkCa {
                    der: c.cert.der().to_vec(),
                })
                .collect(),
        )
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn ek_certificate_from_a_configured_ca_is_accepted() {
        let maker = ca("Fake TPM Manufacturer Root");
        let (ek_key, modulus) = rsa_keypair();
        let ek = ek_public(&modulus);
        let der = ek_cert(&maker, &ek_key, false);
        let issuer = anchors(&[&maker]).verify_ek_cert(&der, &ek, now()).unwrap();
        assert!(issuer.contains("Fake TPM Manufacturer Root"), "{issuer}");
        let _ = &maker.key;
    }

    #[test]
    fn ek_certificate_refusals() {
        let maker = ca("Fake TPM Manufacturer Root");
        let other = ca("Unconfigured CA");
        let (ek_key, modulus) = rsa_keypair();
        let ek = ek_public(&modulus);
        // From a CA nobody configured.
        let der = ek_cert(&other, &ek_key, false);
        assert_eq!(
            anchors(&[&maker]).verify_ek_cert(&der, &ek, now()),
            Err(EkCertError::UnknownIssuer)
        );
        // From a configured CA's name but another key: the same subject
        // does not make it the issuer.
        let impostor = ca("Fake TPM Manufacturer Root");
        let der = ek_cert(&impostor, &ek_key, false);
        assert_eq!(
            anchors(&[&maker]).verify_ek_cert(&der, &ek, now()),
            Err(EkCertError::UnknownIssuer)
        );
        // A valid certificate for another TPM's EK.
        let der = ek_cert(&maker, &ek_key, false);
        let (_, other_modulus) = rsa_keypair();
        assert_eq!(
            anchors(&[&maker]).verify_ek_cert(&der, &ek_public(&other_modulus), now()),
            Err(EkCertError::KeyMismatch)
        );
        // A critical extension nobody understands.
        let der = ek_cert(&maker, &ek_key, true);
        assert_eq!(
            anchors(&[&maker]).verify_ek_cert(&der, &ek, now()),
            Err(EkCertError::CriticalExtension("1.2.3.4".into()))
        );
        // Not yet valid / expired.
        let der = ek_cert(&maker, &ek_key, false);
        assert_eq!(
            anchors(&[&maker]).verify_ek_cert(&der, &ek, now() + 100 * 365 * 86400),
            Err(EkCertError::Expired)
        );
        // Garbage, and trailing bytes.
        assert_eq!(
            anchors(&[&maker]).verify_ek_cert(b"nope", &ek, now()),
            Err(EkCertError::Malformed)
        );
        let mut long = ek_cert(&maker, &ek_key, false);
        long.push(0);
        assert_eq!(
            anchors(&[&maker]).verify_ek_cert(&long, &ek, now()),
            Err(EkCertError::Malformed)
        );
        // No anchors at all.
        assert_eq!(
            TpmAttestor::without_cas().verify_ek_cert(&ek_cert(&maker, &ek_key, false), &ek, now()),
            Err(EkCertError::UnknownIssuer)
        );
    }

    #[test]
    fn sessions_are_single_use_and_expire() {
        let (_, modulus) = rsa_keypair();
        let ek = ek_public(&modulus);
        let a = TpmAttestor::without_cas();
        let t = now();
        let (id, cred) = a
            .begin(&ek, ek.clone(), "h".into(), AssuranceLevel::Al2, None, t)
            .unwrap();
        assert_eq!(cred.encrypted_secret.len(), 256);
        assert!(a.take(&id, t).is_some());
        assert!(a.take(&id, t).is_none(), "a session is answered once");
        let (id, _) = a
            .begin(&ek, ek.clone(), "h".into(), AssuranceLevel::Al2, None, t)
            .unwrap();
        assert!(a.take(&id, t + SESSION_TTL_SECS).is_none(), "expired");
        assert!(a.take("unknown", t).is_none());
        // Bounded.
        for _ in 0..MAX_PENDING {
            a.begin(&ek, ek.clone(), "h".into(), AssuranceLevel::Al2, None, t)
                .unwrap();
        }
        assert!(matches!(
            a.begin(&ek, ek.clone(), "h".into(), AssuranceLevel::Al2, None, t),
            Err(BeginError::Busy)
        ));
        // Expired sessions make room again.
        assert!(
            a.begin(
                &ek,
                ek.clone(),
                "h".into(),
                AssuranceLevel::Al2,
                None,
                t + SESSION_TTL_SECS
            )
            .is_ok()
        );
    }
}
