//! TPM node attestation against the real `sigil-server` binary over real
//! TLS, with the TPM side played in software (`sigil::tpm::soft`): every
//! refusal the server must make, the two trust paths (allow-list, EK
//! certificate from a manufacturer CA), re-attestation and renewal. The
//! agent's tests run the same protocol on a real software TPM (swtpm).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use rustls_pki_types::CertificateDer;
use sigil::proto::admin::v1 as admin;
use sigil::proto::node::v1 as node;
use sigil::tpm::soft::{AK_ATTRS, ECDSA, KEY_ATTRS, NULL, SoftEk, SoftKey};
use sigil::tpm::{Credential, TpmPublic, spki_hash};
use sigil::validate::pop::ProofKey;
use std::sync::Arc;
use tonic::Code;

type Node = node::node_client::NodeClient<tonic::transport::Channel>;

/// A TPM in software: an EK, and per attempt a fresh AK.
struct Tpm {
    ek: SoftEk,
    cert: Vec<u8>,
}

impl Tpm {
    fn new() -> Self {
        Self {
            ek: SoftEk::new(),
            cert: Vec::new(),
        }
    }
    fn hash(&self) -> String {
        spki_hash(&self.ek.spki())
    }
    fn agent_id(&self) -> String {
        format!("spiffe://{TD}/agent/tpm/{}", self.hash())
    }
}

/// Round 1; returns (session, credential, AK).
async fn begin(c: &mut Node, tpm: &Tpm) -> Result<(String, Credential, SoftKey), tonic::Status> {
    let ak = SoftKey::new(AK_ATTRS, ECDSA);
    let r = c
        .attest(node::AttestRequest {
            method: Some(node::attest_request::Method::Tpm(node::TpmAttestation {
                ek_public: tpm.ek.public.clone(),
                ek_certificate: tpm.cert.clone(),
                ak_public: ak.public.clone(),
            })),
            public_key: Vec::new(),
        })
        .await?
        .into_inner();
    let Some(node::attest_response::Result::Challenge(ch)) = r.result else {
        panic!("no challenge")
    };
    let t = ch.tpm.unwrap();
    Ok((
        ch.session_id,
        Credential {
            credential_blob: t.credential_blob,
            encrypted_secret: t.encrypted_secret,
        },
        ak,
    ))
}

/// What an honest agent answers: the activated secret, and its agent key
/// certified by the AK over SHA-256(secret).
fn answer(
    tpm: &Tpm,
    session: &str,
    cred: &Credential,
    ak: &SoftKey,
    key: &SoftKey,
) -> node::AttestRequest {
    let ak_name = TpmPublic::parse(&ak.public).unwrap().name();
    let secret = tpm.ek.activate(&ak_name, cred).expect("activation");
    let nonce = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &secret);
    let (info, sig) = ak.certify(&key.public, nonce.as_ref());
    node::AttestRequest {
        method: Some(node::attest_request::Method::ChallengeResponse(
            node::ChallengeResponse {
                session_id: session.into(),
                response: secret,
                agent_key: Some(node::TpmKeyCertification {
                    public: key.public.clone(),
                    certify_info: info,
                    signature: sig,
                }),
            },
        )),
        public_key: key.spki(),
    }
}

async fn finish(c: &mut Node, req: node::AttestRequest) -> Result<node::AgentSvid, tonic::Status> {
    let r = c.attest(req).await?.into_inner();
    let Some(node::attest_response::Result::Svid(s)) = r.result else {
        panic!("no SVID")
    };
    Ok(s)
}

/// The whole honest exchange.
async fn attest(c: &mut Node, tpm: &Tpm, key: &SoftKey) -> Result<node::AgentSvid, tonic::Status> {
    let (session, cred, ak) = begin(c, tpm).await?;
    finish(c, answer(tpm, &session, &cred, &ak, key)).await
}

async fn anon(server: &Server) -> (Node, CertificateDer<'static>) {
    let ca = ca_cert(server).await;
    let c = node_channel(server.addr, &ca, None, Arc::default())
        .await
        .unwrap();
    (c, ca)
}

async fn allow(server: &Server, hash: &str) -> admin::TpmEk {
    server
        .admin()
        .await
        .allow_tpm_ek(admin::TpmEkRequest {
            ek_hash: hash.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The agent that `svid` (attested for `key`) makes, for mTLS calls.
fn agent_of(svid: &node::AgentSvid, key: &SoftKey) -> Agent {
    Agent {
        id: svid.spiffe_id.clone(),
        chain: svid
            .cert_chain
            .iter()
            .cloned()
            .map(CertificateDer::from)
            .collect(),
        key: Key {
            kp: rcgen::KeyPair::try_from(key.pkcs8().as_slice()).unwrap(),
        },
    }
}

fn last_audit(server: &Server) -> serde_json::Value {
    server.audit_lines().pop().unwrap()
}

#[tokio::test]
async fn allow_listed_ek_attests_and_reattests_without_a_token() {
    let server = Server::start();
    let (mut c, ca) = anon(&server).await;
    let tpm = Tpm::new();

    // Not on the list yet: refused, and said why in the audit log.
    let key = SoftKey::new(KEY_ATTRS, NULL);
    let e = attest(&mut c, &tpm, &key).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let a = last_audit(&server);
    assert_eq!(a["outcome"], "denied");
    assert!(
        a["reason"]
            .as_str()
            .unwrap()
            .contains("not on the allow-list"),
        "{a}"
    );
    assert_eq!(a["spiffe_id"], tpm.agent_id());

    let listed = allow(&server, &tpm.hash()).await;
    assert_eq!(listed.agent_id, tpm.agent_id());
    let svid = attest(&mut c, &tpm, &key).await.unwrap();
    assert_eq!(svid.spiffe_id, tpm.agent_id());
    assert_eq!(svid.assurance_level, "sigil:al2");
    let a = last_audit(&server);
    assert_eq!(a["outcome"], "ok");
    assert_eq!(a["amr"], serde_json::json!(["tpm"]));
    assert_eq!(a["assurance"], "sigil:al2");

    // The SVID is for the certified key, and it works for mTLS.
    let leaf = x509_parser::parse_x509_certificate(&svid.cert_chain[0])
        .unwrap()
        .1;
    assert_eq!(leaf.public_key().raw, key.spki().as_slice());
    let agent = agent_of(&svid, &key);
    let mut mtls = agent.client(&server, &ca, Arc::default()).await;
    mtls.sync_entries(node::SyncEntriesRequest { since_revision: 0 })
        .await
        .unwrap();
    // A TPM agent does not renew (its new key would not be certified).
    let e = mtls
        .renew_agent(node::RenewAgentRequest {
            public_key: Key::new().spki(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // The agent shows up with its level and method.
    let shown = server
        .admin()
        .await
        .get_agent(admin::GetAgentRequest {
            spiffe_id: tpm.agent_id(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.attestation_method, "tpm");
    assert_eq!(shown.assurance_level, "sigil:al2");

    // Re-attestation (restart, expiry): a new AK and key, no token; the old
    // SVID stops being current.
    let key2 = SoftKey::new(KEY_ATTRS, NULL);
    let again = attest(&mut c, &tpm, &key2).await.unwrap();
    assert_eq!(again.spiffe_id, tpm.agent_id());
    let e = mtls
        .sync_entries(node::SyncEntriesRequest { since_revision: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "old SVID: {e:?}");

    // Evicted: its SVID stops working at once, and the TPM attests again
    // without any token.
    let agent2 = agent_of(&again, &key2);
    let mut mtls2 = agent2.client(&server, &ca, Arc::default()).await;
    mtls2
        .sync_entries(node::SyncEntriesRequest { since_revision: 0 })
        .await
        .unwrap();
    server
        .admin()
        .await
        .evict_agent(admin::GetAgentRequest {
            spiffe_id: tpm.agent_id(),
        })
        .await
        .unwrap();
    let e = mtls2
        .sync_entries(node::SyncEntriesRequest { since_revision: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "evicted SVID: {e:?}");
    let key3 = SoftKey::new(KEY_ATTRS, NULL);
    let back = attest(&mut c, &tpm, &key3).await.unwrap();
    assert_eq!(back.spiffe_id, tpm.agent_id());
    let agent3 = agent_of(&back, &key3);
    agent3
        .client(&server, &ca, Arc::default())
        .await
        .sync_entries(node::SyncEntriesRequest { since_revision: 0 })
        .await
        .unwrap();

    // Banned: no re-attestation, whatever the EK trust.
    server
        .admin()
        .await
        .ban_agent(admin::GetAgentRequest {
            spiffe_id: tpm.agent_id(),
        })
        .await
        .unwrap();
    let e = attest(&mut c, &tpm, &key2).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Off the list: refused again.
    let other = Tpm::new();
    allow(&server, &other.hash()).await;
    server
        .admin()
        .await
        .remove_tpm_ek(admin::TpmEkRequest {
            ek_hash: other.hash(),
        })
        .await
        .unwrap();
    let e = attest(&mut c, &other, &key).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Malformed hashes never reach the list.
    let e = server
        .admin()
        .await
        .allow_tpm_ek(admin::TpmEkRequest {
            ek_hash: tpm.hash().to_uppercase(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn hostile_answers_are_refused_and_each_challenge_is_answered_once() {
    let server = Server::start();
    let (mut c, _) = anon(&server).await;
    let tpm = Tpm::new();
    allow(&server, &tpm.hash()).await;
    let key = SoftKey::new(KEY_ATTRS, NULL);

    // A wrong secret; then the session is gone, even for the right one.
    let (session, cred, ak) = begin(&mut c, &tpm).await.unwrap();
    let good = answer(&tpm, &session, &cred, &ak, &key);
    let mut bad = good.clone();
    if let Some(node::attest_request::Method::ChallengeResponse(r)) = &mut bad.method {
        r.response[0] ^= 1;
    }
    assert_eq!(
        finish(&mut c, bad).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert!(
        last_audit(&server)["reason"]
            .as_str()
            .unwrap()
            .contains("wrong credential")
    );
    assert_eq!(
        finish(&mut c, good).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // A recorded answer replayed into a new attempt: another secret.
    let (s1, cred1, ak1) = begin(&mut c, &tpm).await.unwrap();
    let recorded = answer(&tpm, &s1, &cred1, &ak1, &key);
    finish(&mut c, recorded.clone()).await.unwrap();
    let (s2, _, _) = begin(&mut c, &tpm).await.unwrap();
    let mut replay = recorded.clone();
    if let Some(node::attest_request::Method::ChallengeResponse(r)) = &mut replay.method {
        r.session_id = s2;
    }
    assert_eq!(
        finish(&mut c, replay).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // And into its own, spent session.
    assert_eq!(
        finish(&mut c, recorded).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    // An unknown session.
    let (s3, cred3, ak3) = begin(&mut c, &tpm).await.unwrap();
    let mut unknown = answer(&tpm, &s3, &cred3, &ak3, &key);
    if let Some(node::attest_request::Method::ChallengeResponse(r)) = &mut unknown.method {
        r.session_id = "0123456789abcdef0123456789abcdef".into();
    }
    assert_eq!(
        finish(&mut c, unknown).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // Each case: a fresh honest exchange with one thing changed.
    type Tamper = Box<dyn Fn(&mut node::AttestRequest, &SoftKey, &[u8])>;
    let cases: Vec<(&str, Tamper)> = vec![
        (
            "SVID requested for a key that is not the certified one",
            Box::new(|r, _, _| r.public_key = SoftKey::new(KEY_ATTRS, NULL).spki()),
        ),
        (
            "certification of a key that may leave the TPM",
            Box::new(|r, ak, nonce| {
                let k = SoftKey::new(KEY_ATTRS & !sigil::tpm::attr::FIXED_TPM, NULL);
                let (info, sig) = ak.certify(&k.public, nonce);
                r.public_key = k.spki();
                set_cert(r, k.public.clone(), info, sig);
            }),
        ),
        (
            "certification signed by another key than the AK",
            Box::new(|r, _, nonce| {
                let k = SoftKey::new(KEY_ATTRS, NULL);
                let (info, sig) = SoftKey::new(AK_ATTRS, ECDSA).certify(&k.public, nonce);
                r.public_key = k.spki();
                set_cert(r, k.public.clone(), info, sig);
            }),
        ),
        (
            "certification with stale qualifying data",
            Box::new(|r, ak, _| {
                let k = SoftKey::new(KEY_ATTRS, NULL);
                let (info, sig) = ak.certify(&k.public, &[0u8; 32]);
                r.public_key = k.spki();
                set_cert(r, k.public.clone(), info, sig);
            }),
        ),
        (
            "no certification",
            Box::new(|r, _, _| {
                if let Some(node::attest_request::Method::ChallengeResponse(c)) = &mut r.method {
                    c.agent_key = None;
                }
            }),
        ),
    ];
    for (what, tamper) in cases {
        let (session, cred, ak) = begin(&mut c, &tpm).await.unwrap();
        let mut req = answer(&tpm, &session, &cred, &ak, &key);
        let ak_name = TpmPublic::parse(&ak.public).unwrap().name();
        let secret = tpm.ek.activate(&ak_name, &cred).unwrap();
        let nonce = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &secret);
        tamper(&mut req, &ak, nonce.as_ref());
        let e = finish(&mut c, req).await.unwrap_err();
        assert!(
            matches!(e.code(), Code::PermissionDenied | Code::InvalidArgument),
            "{what}: {e:?}"
        );
        assert_eq!(last_audit(&server)["outcome"], "denied", "{what}");
    }
}

fn set_cert(r: &mut node::AttestRequest, public: Vec<u8>, info: Vec<u8>, sig: Vec<u8>) {
    if let Some(node::attest_request::Method::ChallengeResponse(c)) = &mut r.method {
        c.agent_key = Some(node::TpmKeyCertification {
            public,
            certify_info: info,
            signature: sig,
        });
    }
}

#[tokio::test]
async fn malformed_evidence_is_invalid_argument() {
    let server = Server::start();
    let (mut c, _) = anon(&server).await;
    let tpm = Tpm::new();
    allow(&server, &tpm.hash()).await;
    let ak = SoftKey::new(AK_ATTRS, ECDSA);
    let cases = [
        (
            "truncated EK",
            tpm.ek.public[..40].to_vec(),
            ak.public.clone(),
        ),
        ("EK that signs", ak.public.clone(), ak.public.clone()),
        (
            "AK that is not restricted",
            tpm.ek.public.clone(),
            SoftKey::new(KEY_ATTRS, ECDSA).public,
        ),
        (
            "AK with a trailing byte",
            tpm.ek.public.clone(),
            [ak.public.clone(), vec![0]].concat(),
        ),
    ];
    for (what, ek_public, ak_public) in cases {
        let e = c
            .attest(node::AttestRequest {
                method: Some(node::attest_request::Method::Tpm(node::TpmAttestation {
                    ek_public,
                    ek_certificate: Vec::new(),
                    ak_public,
                })),
                public_key: Vec::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    }
}

/// An EK certificate shaped like a manufacturer's, for `ek` (SPKI DER).
fn ek_cert(issuer: &rcgen::Issuer<'_, rcgen::KeyPair>, ek_spki: &[u8]) -> Vec<u8> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.not_after = rcgen::date_time_ymd(2045, 1, 1);
    let spki = rcgen::SubjectPublicKeyInfo::from_der(ek_spki).unwrap();
    p.signed_by(&spki, issuer).unwrap().der().to_vec()
}

fn manufacturer(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let pem = p.clone().self_signed(&key).unwrap().pem();
    (pem, rcgen::Issuer::new(p, key))
}

#[tokio::test]
async fn ek_certificate_from_a_configured_manufacturer_ranks_highest() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, maker) = manufacturer("Fake TPM Maker Root CA");
    let ca_file = dir.path().join("ek-ca.pem");
    std::fs::write(&ca_file, pem).unwrap();
    let server = Server::start_with(&["--tpm-ek-ca".into(), ca_file.display().to_string()]);
    let (mut c, _) = anon(&server).await;

    // Certified by the configured CA, not on any list: al3.
    let mut tpm = Tpm::new();
    tpm.cert = ek_cert(&maker, &tpm.ek.spki());
    let svid = attest(&mut c, &tpm, &SoftKey::new(KEY_ATTRS, NULL))
        .await
        .unwrap();
    assert_eq!(svid.assurance_level, "sigil:al3");
    assert_eq!(svid.spiffe_id, tpm.agent_id());
    let a = last_audit(&server);
    assert_eq!(a["amr"], serde_json::json!(["tpm", "tpm_ek_cert"]));
    assert!(
        a["reason"]
            .as_str()
            .unwrap()
            .contains("Fake TPM Maker Root CA"),
        "{a}"
    );

    // From a CA nobody configured.
    let (_, stranger) = manufacturer("Someone Else");
    let mut tpm = Tpm::new();
    tpm.cert = ek_cert(&stranger, &tpm.ek.spki());
    let e = attest(&mut c, &tpm, &SoftKey::new(KEY_ATTRS, NULL))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        last_audit(&server)["reason"]
            .as_str()
            .unwrap()
            .contains("not issued by a configured")
    );

    // A genuine certificate, but of another TPM's EK.
    let mut tpm = Tpm::new();
    tpm.cert = ek_cert(&maker, &SoftEk::new().spki());
    let e = attest(&mut c, &tpm, &SoftKey::new(KEY_ATTRS, NULL))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        last_audit(&server)["reason"]
            .as_str()
            .unwrap()
            .contains("not the EK presented")
    );

    // Same, but the EK hash is on the allow-list: admitted at al2 only.
    allow(&server, &tpm.hash()).await;
    let svid = attest(&mut c, &tpm, &SoftKey::new(KEY_ATTRS, NULL))
        .await
        .unwrap();
    assert_eq!(svid.assurance_level, "sigil:al2");
}

async fn entry(server: &Server, agent: &str, id: &str, binding: &str) {
    server
        .admin()
        .await
        .create_entry(admin::CreateEntryRequest {
            spiffe_id: id.into(),
            parent_id: agent.into(),
            selectors: vec!["unix:uid:1000".into()],
            audiences: vec!["ehr-fhir".into()],
            key_binding: binding.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

fn mint(id: &str, jkt: &str) -> node::MintJwtSvidRequest {
    node::MintJwtSvidRequest {
        spiffe_id: id.into(),
        audience: "ehr-fhir".into(),
        cnf_jkt: jkt.into(),
    }
}

#[tokio::test]
async fn tpm_bound_entries_get_key_bound_tokens_only_on_tpm_agents() {
    let server = Server::start();
    let (mut c, ca) = anon(&server).await;
    let tpm = Tpm::new();
    allow(&server, &tpm.hash()).await;
    let key = SoftKey::new(KEY_ATTRS, NULL);
    let (session, cred, ak) = begin(&mut c, &tpm).await.unwrap();
    let svid = finish(&mut c, answer(&tpm, &session, &cred, &ak, &key))
        .await
        .unwrap();
    let agent = agent_of(&svid, &key);
    let bound = format!("spiffe://{TD}/bound");
    let plain = format!("spiffe://{TD}/plain");
    entry(&server, &agent.id, &bound, "tpm").await;
    entry(&server, &agent.id, &plain, "").await;
    let mut api = agent.client(&server, &ca, Arc::default()).await;
    let synced = api
        .sync_entries(node::SyncEntriesRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let entry_id = |id: &str| {
        synced
            .entries
            .iter()
            .find(|e| e.spiffe_id == id)
            .unwrap()
            .id
            .clone()
    };
    let (bound_id, plain_id) = (entry_id(&bound), entry_id(&plain));

    // The workload key: TPM-resident, certified by the agent's AK for the
    // entry (qualifying data names the entry).
    let wk = SoftKey::new(KEY_ATTRS, NULL);
    let workload_key = sigil::validate::pop::SoftwareProofKey::from_pkcs8(&wk.pkcs8()).unwrap();
    let jkt = sigil::validate::pop::key_thumbprint(&workload_key);
    let certified = |by: &SoftKey, key: &SoftKey, entry: &str| {
        let (info, sig) = by.certify(
            &key.public,
            &sigil::tpm::workload_key_qualifying_data(entry),
        );
        node::TpmKeyCertification {
            public: key.public.clone(),
            certify_info: info,
            signature: sig,
        }
    };
    let sign = |entry: &str, spki: Vec<u8>, cert: Option<node::TpmKeyCertification>| {
        node::SignX509SvidsRequest {
            requests: vec![node::X509SvidRequest {
                entry_id: entry.into(),
                public_key: spki,
                csr: Vec::new(),
                tpm_key: cert,
            }],
        }
    };
    // Before any certification, no key-bound token: the server does not know
    // the workload's key.
    let e = api.mint_jwt_svid(mint(&bound, &jkt)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Hostile certifications: each refused with a reason, no certificate.
    let other_ak = SoftKey::new(AK_ATTRS, ECDSA);
    let exportable = SoftKey::new(KEY_ATTRS & !sigil::tpm::attr::FIXED_TPM, NULL);
    let cases: Vec<(&str, node::SignX509SvidsRequest)> = vec![
        ("missing", sign(&bound_id, wk.spki(), None)),
        (
            "another AK",
            sign(
                &bound_id,
                wk.spki(),
                Some(certified(&other_ak, &wk, &bound_id)),
            ),
        ),
        (
            "another entry's qualifying data",
            sign(&bound_id, wk.spki(), Some(certified(&ak, &wk, &plain_id))),
        ),
        (
            "SVID key is not the certified key",
            sign(
                &bound_id,
                Key::new().spki(),
                Some(certified(&ak, &wk, &bound_id)),
            ),
        ),
        (
            "exportable key",
            sign(
                &bound_id,
                exportable.spki(),
                Some(certified(&ak, &exportable, &bound_id)),
            ),
        ),
        (
            "certification for a plain entry",
            sign(&plain_id, wk.spki(), Some(certified(&ak, &wk, &plain_id))),
        ),
    ];
    for (what, req) in cases {
        let r = api.sign_x509_svids(req).await.unwrap().into_inner();
        assert!(r.results[0].cert_chain.is_empty(), "{what}: issued");
        assert!(!r.results[0].error.is_empty(), "{what}: no error");
        let audit = last_audit(&server);
        assert_eq!(audit["outcome"], "denied", "{what}: {audit}");
    }
    let e = api.mint_jwt_svid(mint(&bound, &jkt)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // The honest certification: an X.509-SVID for exactly that key.
    let r = api
        .sign_x509_svids(sign(
            &bound_id,
            wk.spki(),
            Some(certified(&ak, &wk, &bound_id)),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(r.results[0].error.is_empty(), "{}", r.results[0].error);
    let leaf = sigil::X509Svid::check_external_key(
        &r.results[0]
            .cert_chain
            .iter()
            .cloned()
            .map(CertificateDer::from)
            .collect::<Vec<_>>(),
        &workload_key.public_sec1(),
    )
    .unwrap();
    assert_eq!(leaf.0.as_str(), bound);

    // A token bound to another key than the certified one is refused.
    let stranger = sigil::validate::pop::SoftwareProofKey::generate().unwrap();
    let e = api
        .mint_jwt_svid(mint(
            &bound,
            &sigil::validate::pop::key_thumbprint(&stranger),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // The certified key's thumbprint goes into cnf.
    let t = api
        .mint_jwt_svid(mint(&bound, &jkt))
        .await
        .unwrap()
        .into_inner();
    let bundles = {
        let b = api
            .fetch_bundle(node::FetchBundleRequest {})
            .await
            .unwrap()
            .into_inner();
        let b = sigil::Bundle::from_spiffe_json(
            sigil::TrustDomain::new(TD).unwrap(),
            b.bundle.as_bytes(),
        )
        .unwrap();
        [b].into_iter().collect::<sigil::BundleSet>()
    };
    let v = sigil::JwtSvidValidator::new("ehr-fhir");
    // Alone, the token is refused; with a proof by the key, accepted.
    assert_eq!(
        v.validate(&t.token, &bundles, std::time::SystemTime::now()),
        Err(sigil::JwtSvidError::ProofRequired)
    );
    let req = sigil::validate::pop::ProofRequest {
        method: "GET",
        uri: "https://ehr.example/fhir/Patient",
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let proof = sigil::validate::pop::build_proof(&workload_key, &t.token, &req, now).unwrap();
    let ok = v
        .validate_with_proof(
            &t.token,
            Some(&proof),
            &req,
            &bundles,
            std::time::SystemTime::now(),
            None,
        )
        .unwrap();
    assert_eq!(ok.cnf_jkt(), Some(jkt.as_str()));
    assert_eq!(ok.amr(), ["tpm", "peercred", "hwk"]);

    // A bound entry without a thumbprint, a plain entry with one.
    let e = api.mint_jwt_svid(mint(&bound, "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = api.mint_jwt_svid(mint(&plain, &jkt)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = api
        .mint_jwt_svid(mint(&bound, "not-a-thumbprint"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // The plain entry's tokens carry no cnf.
    let t = api
        .mint_jwt_svid(mint(&plain, ""))
        .await
        .unwrap()
        .into_inner();
    assert!(
        v.validate(&t.token, &bundles, std::time::SystemTime::now())
            .is_ok()
    );

    // A join-token agent gets nothing for a TPM-bound entry: no JWT, no
    // X.509-SVID.
    let joined = attest_join(&server, &ca).await;
    let jbound = format!("spiffe://{TD}/joined-bound");
    entry(&server, &joined.id, &jbound, "tpm").await;
    let mut japi = joined.client(&server, &ca, Arc::default()).await;
    let e = japi.mint_jwt_svid(mint(&jbound, &jkt)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let entries = japi
        .sync_entries(node::SyncEntriesRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(entries.entries[0].key_binding, "tpm");
    let r = japi
        .sign_x509_svids(node::SignX509SvidsRequest {
            requests: vec![node::X509SvidRequest {
                entry_id: entries.entries[0].id.clone(),
                public_key: Key::new().spki(),
                csr: Vec::new(),
                tpm_key: None,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.results[0].cert_chain.is_empty());
    assert!(r.results[0].error.contains("TPM"), "{}", r.results[0].error);
}

async fn attest_join(server: &Server, ca: &CertificateDer<'static>) -> Agent {
    common::attest(server, ca).await
}
