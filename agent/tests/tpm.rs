//! The agent's TPM code against a real swtpm per test (no mocks).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::swtpm::Swtpm;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature as EcdsaSig, VerifyingKey};
use sigil::tpm::TpmPublic;
use sigil_agent::tpm::{AGENT_KEY_PRIV, AGENT_KEY_PUB, Tpm, TpmError};
use tss_esapi::structures::{Attest, AttestInfo, Public, Signature};
use tss_esapi::traits::UnMarshall;

fn sha256(b: &[u8]) -> [u8; 32] {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b)
        .as_ref()
        .try_into()
        .unwrap()
}

fn pad32(v: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[32 - v.len()..].copy_from_slice(v);
    out
}

/// The P-256 verifying key of an ECC TPMT_PUBLIC.
fn ecc_key(tpmt: &[u8]) -> VerifyingKey {
    let Public::Ecc { unique, .. } = Public::unmarshall(tpmt).unwrap() else {
        panic!("not ECC")
    };
    let mut sec1 = vec![4];
    sec1.extend(pad32(unique.x().value()));
    sec1.extend(pad32(unique.y().value()));
    VerifyingKey::from_sec1_bytes(&sec1).unwrap()
}

/// TPMT_SIGNATURE (ECDSA) as a p256 signature.
fn ecdsa_of(tpmt_signature: &[u8]) -> EcdsaSig {
    let Signature::EcDsa(s) = Signature::unmarshall(tpmt_signature).unwrap() else {
        panic!("not ECDSA")
    };
    EcdsaSig::from_scalars(
        pad32(s.signature_r().value()),
        pad32(s.signature_s().value()),
    )
    .unwrap()
}

/// Name of an object: nameAlg (SHA-256) || SHA-256(TPMT_PUBLIC).
fn name_of(tpmt: &[u8]) -> Vec<u8> {
    let mut n = vec![0x00, 0x0b];
    n.extend(sha256(tpmt));
    n
}

#[test]
fn ek_is_rsa_2048_and_stable_across_opens() {
    let swtpm = Swtpm::start();
    let (ek1, hash1) = {
        let tpm = Tpm::open(&swtpm.tcti()).unwrap();
        assert!(
            tpm.vendor().software,
            "swtpm must be flagged: {:?}",
            tpm.vendor()
        );
        (tpm.ek_public().unwrap(), tpm.ek_hash().unwrap())
    };
    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(tpm.ek_public().unwrap(), ek1);
    assert_eq!(tpm.ek_hash().unwrap(), hash1);
    assert_eq!(hash1.len(), 64);
    assert!(
        hash1
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    let Public::Rsa {
        parameters,
        object_attributes,
        ..
    } = Public::unmarshall(&ek1).unwrap()
    else {
        panic!("EK is not RSA")
    };
    assert_eq!(
        parameters.key_bits(),
        tss_esapi::interface_types::key_bits::RsaKeyBits::Rsa2048
    );
    assert!(object_attributes.restricted() && object_attributes.decrypt());
    assert!(object_attributes.fixed_tpm() && !object_attributes.user_with_auth());
    // The attestation's EK is that same key; another TPM has another EK.
    assert_eq!(tpm.start_attestation().unwrap().ek_public().unwrap(), ek1);
    drop(tpm);
    let other = Swtpm::start();
    assert_ne!(Tpm::open(&other.tcti()).unwrap().ek_hash().unwrap(), hash1);
}

#[test]
fn ek_certificate_is_read_from_nv_and_certifies_the_ek() {
    let swtpm = Swtpm::start_with_ek_cert();
    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let att = tpm.start_attestation().unwrap();
    let cert = att.ek_certificate().expect("EK certificate in NV").to_vec();
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
    // The certificate's key is the EK: same SPKI hash.
    assert_eq!(
        hex(&sha256(parsed.public_key().raw)),
        tpm.ek_hash().unwrap()
    );
    // Issued by the local CA's intermediate.
    let (_, issuer) = swtpm.ek_ca_certs().unwrap();
    let pem = std::fs::read(issuer).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let ca = pem.parse_x509().unwrap();
    assert_eq!(parsed.issuer(), ca.subject());

    // A TPM without one sends none.
    drop(att);
    drop(tpm);
    let bare = Swtpm::start();
    let tpm = Tpm::open(&bare.tcti()).unwrap();
    assert!(tpm.start_attestation().unwrap().ek_certificate().is_none());
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn ak_is_a_restricted_p256_ecdsa_signing_key_under_the_ek() {
    let swtpm = Swtpm::start();
    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let att = tpm.start_attestation().unwrap();
    let ak = att.ak_public().unwrap();
    let Public::Ecc {
        object_attributes: a,
        parameters,
        name_hashing_algorithm,
        ..
    } = Public::unmarshall(&ak).unwrap()
    else {
        panic!("AK is not ECC")
    };
    assert_eq!(
        parameters.ecc_curve(),
        tss_esapi::interface_types::ecc::EccCurve::NistP256
    );
    assert!(matches!(
        parameters.ecc_scheme(),
        tss_esapi::structures::EccScheme::EcDsa(h)
            if h.hashing_algorithm() == tss_esapi::interface_types::algorithm::HashingAlgorithm::Sha256
    ));
    assert_eq!(
        name_hashing_algorithm,
        tss_esapi::interface_types::algorithm::HashingAlgorithm::Sha256
    );
    assert!(a.restricted() && a.sign_encrypt() && !a.decrypt());
    assert!(a.fixed_tpm() && a.fixed_parent() && a.sensitive_data_origin() && a.user_with_auth());
    // Fresh per attestation.
    drop(att);
    let again = tpm.start_attestation().unwrap();
    assert_ne!(again.ak_public().unwrap(), ak);
}

#[test]
fn activate_credential_recovers_the_secret_only_on_the_right_tpm() {
    let swtpm = Swtpm::start();
    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let att = tpm.start_attestation().unwrap();
    let secret = [0x5au8; 32];
    // MakeCredential in software, as the server runs it.
    let ek = TpmPublic::parse(&att.ek_public().unwrap()).unwrap();
    let ak = TpmPublic::parse(&att.ak_public().unwrap()).unwrap();
    let cred = sigil::tpm::make_credential(&ek, &ak.name(), &secret).unwrap();
    let (blob, enc) = (cred.credential_blob.clone(), cred.encrypted_secret.clone());
    assert_eq!(att.activate_credential(&blob, &enc).unwrap(), secret);
    // The session was consumed and flushed: it works again.
    assert_eq!(att.activate_credential(&blob, &enc).unwrap(), secret);

    // A tampered credential blob fails its integrity check.
    let mut bad = blob.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        att.activate_credential(&bad, &enc),
        Err(TpmError::Command { .. })
    ));
    // Garbage of the wrong size is refused, not a panic.
    assert!(att.activate_credential(&[0u8; 5000], &enc).is_err());
    assert!(att.activate_credential(&blob, &[]).is_err());

    // A credential made for another object name (here the EK's) fails.
    let wrong = sigil::tpm::make_credential(&ek, &ek.name(), &secret).unwrap();
    assert!(
        att.activate_credential(&wrong.credential_blob, &wrong.encrypted_secret)
            .is_err()
    );

    // Another TPM (another EK) cannot activate it.
    let other = Swtpm::start();
    let tpm2 = Tpm::open(&other.tcti()).unwrap();
    let att2 = tpm2.start_attestation().unwrap();
    assert!(att2.activate_credential(&blob, &enc).is_err());
}

#[test]
fn certify_binds_the_agent_key_to_the_ak_and_the_challenge() {
    let swtpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let key = tpm.load_or_create_agent_key(dir.path()).unwrap();
    let att = tpm.start_attestation().unwrap();
    let extra = sha256(b"the activated secret");
    let (info, sig) = att.certify(&key, &extra).unwrap();

    let attest = Attest::unmarshall(&info).unwrap();
    assert_eq!(attest.extra_data().value(), extra);
    let AttestInfo::Certify { info: c } = attest.attested() else {
        panic!("not a certify attestation")
    };
    assert_eq!(c.name().value(), name_of(key.public_tpmt()));

    // The server's verification (sigil::tpm) accepts it, and the keys have
    // the shapes the server requires.
    let ak_pub = TpmPublic::parse(&att.ak_public().unwrap()).unwrap();
    let key_pub = TpmPublic::parse(key.public_tpmt()).unwrap();
    ak_pub.check_ak().unwrap();
    key_pub.check_resident_signing_key().unwrap();
    TpmPublic::parse(&att.ek_public().unwrap())
        .unwrap()
        .check_ek()
        .unwrap();
    sigil::tpm::verify_certify(&ak_pub, &key_pub, &info, &sig, &extra).unwrap();
    assert!(sigil::tpm::verify_certify(&ak_pub, &key_pub, &info, &sig, &[0; 32]).is_err());
    assert!(sigil::tpm::verify_certify(&key_pub, &key_pub, &info, &sig, &extra).is_err());
    assert_eq!(key_pub.spki_der(), key.spki_der());

    let ak = ecc_key(&att.ak_public().unwrap());
    let sig = ecdsa_of(&sig);
    ak.verify(&info, &sig).unwrap();
    // Failing cases: a changed TPMS_ATTEST, or a key that is not the AK.
    let mut tampered = info.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(ak.verify(&tampered, &sig).is_err());
    let agent_vk = VerifyingKey::from_sec1_bytes(key.public_sec1()).unwrap();
    assert!(agent_vk.verify(&info, &sig).is_err());
}

#[test]
fn agent_key_signatures_verify_with_p256() {
    let swtpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let key = tpm.load_or_create_agent_key(dir.path()).unwrap();
    let vk = VerifyingKey::from_sec1_bytes(key.public_sec1()).unwrap();
    // The SPKI is the same key.
    use x509_parser::prelude::FromDer;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(key.spki_der()).unwrap();
    assert_eq!(&*spki.subject_public_key.data, key.public_sec1());
    for i in 0..20u8 {
        let digest = sha256(&[i]);
        let der = key.sign_digest(&digest).unwrap();
        let sig = EcdsaSig::from_der(&der).unwrap();
        vk.verify_prehash(&digest, &sig).unwrap();
        assert!(vk.verify_prehash(&sha256(&[i, 1]), &sig).is_err());
    }
    // rustls signer: SHA-256 of the message, signed in the TPM.
    let signing = key.rustls_signing_key();
    assert!(
        signing
            .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP384_SHA384])
            .is_none()
    );
    let signer = signing
        .choose_scheme(&[
            rustls::SignatureScheme::ED25519,
            rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
        ])
        .unwrap();
    assert_eq!(
        signer.scheme(),
        rustls::SignatureScheme::ECDSA_NISTP256_SHA256
    );
    let der = signer.sign(b"handshake transcript").unwrap();
    vk.verify(b"handshake transcript", &EcdsaSig::from_der(&der).unwrap())
        .unwrap();
    assert!(
        vk.verify(b"another transcript", &EcdsaSig::from_der(&der).unwrap())
            .is_err()
    );
}

#[test]
fn agent_key_survives_a_new_process_from_its_blobs_and_only_on_its_tpm() {
    use std::os::unix::fs::PermissionsExt;
    let swtpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let spki = {
        let tpm = Tpm::open(&swtpm.tcti()).unwrap();
        tpm.load_or_create_agent_key(dir.path())
            .unwrap()
            .spki_der()
            .to_vec()
    };
    for f in [AGENT_KEY_PUB, AGENT_KEY_PRIV] {
        let mode = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    // A new context (as after a restart) loads the same key, which signs.
    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let key = tpm.load_or_create_agent_key(dir.path()).unwrap();
    assert_eq!(key.spki_der(), spki);
    let vk = VerifyingKey::from_sec1_bytes(key.public_sec1()).unwrap();
    let digest = sha256(b"after restart");
    vk.verify_prehash(
        &digest,
        &EcdsaSig::from_der(&key.sign_digest(&digest).unwrap()).unwrap(),
    )
    .unwrap();
    drop(key);
    drop(tpm);

    // The blobs are useless on another TPM.
    let other = Swtpm::start();
    let tpm2 = Tpm::open(&other.tcti()).unwrap();
    assert!(matches!(
        tpm2.load_agent_key(dir.path()),
        Err(TpmError::Command { .. })
    ));
    // A corrupt public blob is refused before it reaches the TPM.
    std::fs::write(dir.path().join(AGENT_KEY_PUB), b"junk").unwrap();
    assert!(matches!(
        tpm2.load_agent_key(dir.path()),
        Err(TpmError::CorruptBlob(_))
    ));
    // load_or_create replaces an unusable key with a new one and saves it.
    let fresh = tpm2.load_or_create_agent_key(dir.path()).unwrap();
    assert_ne!(fresh.spki_der(), spki);
    let fresh_spki = fresh.spki_der().to_vec();
    drop(fresh);
    assert_eq!(
        tpm2.load_agent_key(dir.path()).unwrap().spki_der(),
        fresh_spki
    );
}

#[test]
fn agent_key_cannot_be_duplicated_out_of_the_tpm() {
    let swtpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let key = tpm.load_or_create_agent_key(dir.path()).unwrap();
    let Public::Ecc {
        object_attributes: a,
        ..
    } = Public::unmarshall(key.public_tpmt()).unwrap()
    else {
        panic!()
    };
    assert!(a.fixed_tpm() && a.fixed_parent() && a.sensitive_data_origin());
    assert!(!a.encrypted_duplication() && a.sign_encrypt() && !a.decrypt() && !a.restricted());

    // TPM2_Duplicate under the DUP role: refused (fixedTPM).
    let result = tpm.with_raw_context(|ctx| try_duplicate(ctx, key.raw_handle()));
    let err = result.expect_err("a fixedTPM key must not duplicate");
    eprintln!("duplicate refused: {err}");
}

/// TPM2_Duplicate of `key` under the DUP role (a policy session allowing
/// Duplicate) to a null parent: what a TPM must refuse for a fixedTPM key.
fn try_duplicate(
    ctx: &mut tss_esapi::Context,
    key: tss_esapi::handles::KeyHandle,
) -> tss_esapi::Result<()> {
    use tss_esapi::constants::{CommandCode, SessionType};
    use tss_esapi::interface_types::algorithm::HashingAlgorithm;
    use tss_esapi::interface_types::session_handles::PolicySession;
    use tss_esapi::structures::{SymmetricDefinition, SymmetricDefinitionObject};
    let session = ctx
        .start_auth_session(
            None,
            None,
            None,
            SessionType::Policy,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )?
        .expect("a policy session");
    ctx.policy_command_code(PolicySession::try_from(session)?, CommandCode::Duplicate)?;
    let r = ctx.execute_with_session(Some(session), |c| {
        c.duplicate(
            key.into(),
            tss_esapi::handles::ObjectHandle::Null,
            None,
            SymmetricDefinitionObject::Null,
        )
    });
    let _ = ctx.flush_context(tss_esapi::handles::SessionHandle::from(session).into());
    r.map(|_| ())
}

#[test]
fn leftover_transient_handles_of_a_crashed_client_are_flushed_at_open() {
    let swtpm = Swtpm::start();
    // A client that creates three transient objects and a session and dies
    // without flushing them (process exit: no destructors run).
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crashing_client_helper",
            "--ignored",
            "--nocapture",
        ])
        .env("SIGIL_TEST_CRASH_TCTI", swtpm.tcti())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(42), "helper did not run");

    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(tpm.transient_handles().unwrap(), 0);
    assert_eq!(tpm.loaded_sessions().unwrap(), 0);
    // The TPM has room again. Between operations only the agent key stays
    // loaded (the EK and AK are saved contexts, loaded per operation).
    let dir = tempfile::tempdir().unwrap();
    let key = tpm.load_or_create_agent_key(dir.path()).unwrap();
    let att = tpm.start_attestation().unwrap();
    assert_eq!(tpm.transient_handles().unwrap(), 1);
    att.certify(&key, &[1; 32]).unwrap();
    assert_eq!(tpm.transient_handles().unwrap(), 1);
}

/// Not a test: the crashing client of the test above.
#[test]
#[ignore = "helper process of leftover_transient_handles_of_a_crashed_client_are_flushed_at_open"]
fn crashing_client_helper() {
    let Ok(tcti) = std::env::var("SIGIL_TEST_CRASH_TCTI") else {
        return;
    };
    let tpm = Tpm::open(&tcti).unwrap();
    // Two agent keys stay loaded while their handles live; with the storage
    // key that creating a third one loads, swtpm's object memory is full.
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let keys: Vec<_> = dirs[..2]
        .iter()
        .map(|d| tpm.load_or_create_agent_key(d.path()).unwrap())
        .collect();
    assert_eq!(tpm.transient_handles().unwrap(), 2);
    assert!(tpm.load_or_create_agent_key(dirs[2].path()).is_err());
    std::mem::forget(keys);
    std::process::exit(42);
}

#[test]
fn open_fails_cleanly_without_a_tpm() {
    // Bad syntax, an unknown TCTI, and nothing listening.
    for tcti in ["nonsense", "nosuchtcti:foo", "swtpm:host=127.0.0.1,port=1"] {
        let started = std::time::Instant::now();
        match Tpm::open(tcti) {
            Err(TpmError::Open { tcti: t, .. }) => assert_eq!(t, tcti),
            other => panic!("{tcti}: {other:?}"),
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
    // The same TPM works when it is there.
    let swtpm = Swtpm::start();
    assert!(Tpm::open(&swtpm.tcti()).is_ok());
}

#[test]
fn workload_keys_sign_certify_and_never_leave_the_tpm() {
    let swtpm = Swtpm::start();
    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let key = tpm.create_workload_key().unwrap();
    let (public, private) = (key.public_tpmt().to_vec(), key.private_blob().to_vec());
    let Public::Ecc {
        object_attributes: a,
        ..
    } = Public::unmarshall(&public).unwrap()
    else {
        panic!()
    };
    assert!(a.fixed_tpm() && a.fixed_parent() && a.sensitive_data_origin());
    assert!(!a.encrypted_duplication() && a.sign_encrypt() && !a.decrypt() && !a.restricted());
    TpmPublic::parse(&public)
        .unwrap()
        .check_resident_signing_key()
        .unwrap();
    // Nothing stays loaded between operations.
    assert_eq!(tpm.transient_handles().unwrap(), 0);

    // Signatures verify with the public key (fixed r || s) and only for the
    // signed digest.
    let vk = VerifyingKey::from_sec1_bytes(key.public_sec1()).unwrap();
    let digest = sha256(b"a TLS 1.3 CertificateVerify transcript");
    let sig = EcdsaSig::from_slice(&key.sign_digest(&digest).unwrap()).unwrap();
    vk.verify_prehash(&digest, &sig).unwrap();
    assert!(vk.verify_prehash(&sha256(b"other"), &sig).is_err());
    assert_eq!(tpm.transient_handles().unwrap(), 0);

    // The AK certifies it for one entry: the server's check accepts exactly
    // that entry's qualifying data.
    let att = tpm.start_attestation().unwrap();
    let ak = att.ak();
    let extra = sigil::tpm::workload_key_qualifying_data("entry-1");
    let (info, sig) = key.certify(&ak, &extra).unwrap();
    let ak_pub = TpmPublic::parse(&att.ak_public().unwrap()).unwrap();
    let key_pub = TpmPublic::parse(&public).unwrap();
    sigil::tpm::verify_certify(&ak_pub, &key_pub, &info, &sig, &extra).unwrap();
    let other_entry = sigil::tpm::workload_key_qualifying_data("entry-2");
    assert!(sigil::tpm::verify_certify(&ak_pub, &key_pub, &info, &sig, &other_entry).is_err());
    drop(att);

    // TPM2_Duplicate under the DUP role: refused (fixedTPM).
    let result = key.with_raw_handle(try_duplicate).unwrap();
    let err = result.expect_err("a fixedTPM workload key must not duplicate");
    eprintln!("duplicate refused: {err}");
    // No TPM command returns a key's sensitive area; what the agent stores
    // is the private blob encrypted by this TPM's storage key. After a
    // restart (a new context) the key loads from its blobs…
    drop(key);
    drop(tpm);
    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let again = tpm.workload_key_from_blobs(&public, &private).unwrap();
    let sig = EcdsaSig::from_slice(&again.sign_digest(&digest).unwrap()).unwrap();
    vk.verify_prehash(&digest, &sig).unwrap();
    drop(again);
    drop(tpm);
    // …and on another TPM it is useless.
    let other = Swtpm::start();
    let tpm2 = Tpm::open(&other.tcti()).unwrap();
    let foreign = tpm2.workload_key_from_blobs(&public, &private).unwrap();
    assert!(matches!(
        foreign.sign_digest(&digest),
        Err(TpmError::Command { .. })
    ));
    // A malformed public blob is refused before it reaches the TPM.
    assert!(tpm2.workload_key_from_blobs(b"junk", &private).is_err());
}
