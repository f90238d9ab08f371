//! End-to-end X.509 CA rotation and upstream (intermediate) CAs: the real
//! `sigil-server` binary, the admin API over its Unix socket, the node API
//! over real TLS 1.3, verification with the `sigil` library.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use rustls_pki_types::CertificateDer;
use sigil::proto::admin::v1 as admin;
use sigil::proto::node::v1 as node;
use sigil::validate::x509::AnyId;
use sigil::{Bundle, BundleSet, TrustDomain, verify_x509_svid};
use std::sync::Arc;
use std::time::SystemTime;
use tonic::transport::Channel;

async fn bundle(c: &mut node::node_client::NodeClient<Channel>) -> (Bundle, u64) {
    let b = c
        .fetch_bundle(node::FetchBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let bundle =
        Bundle::from_spiffe_json(TrustDomain::new(TD).unwrap(), b.bundle.as_bytes()).unwrap();
    (bundle, b.sequence)
}

fn set_of(anchors: &[CertificateDer<'static>]) -> BundleSet {
    let mut b = Bundle::empty(TrustDomain::new(TD).unwrap());
    for a in anchors {
        b.x509.add_authority(a.clone());
    }
    [b].into_iter().collect()
}

fn verifies(chain: &[CertificateDer<'static>], anchors: &[CertificateDer<'static>]) -> bool {
    verify_x509_svid(chain, &set_of(anchors), SystemTime::now(), &AnyId).is_ok()
}

async fn entry(server: &Server, agent: &str, id: &str) -> admin::Entry {
    server
        .admin()
        .await
        .create_entry(admin::CreateEntryRequest {
            spiffe_id: id.into(),
            parent_id: agent.into(),
            selectors: vec!["unix:uid:1000".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn sign(
    c: &mut node::node_client::NodeClient<Channel>,
    entry_id: &str,
) -> Vec<CertificateDer<'static>> {
    let r = c
        .sign_x509_svids(node::SignX509SvidsRequest {
            requests: vec![node::X509SvidRequest {
                entry_id: entry_id.into(),
                public_key: Key::new().spki(),
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].error, "");
    r.results[0]
        .cert_chain
        .iter()
        .cloned()
        .map(CertificateDer::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn x509_ca_prepare_activate_revoke_over_the_admin_api() {
    let mut server = Server::start();
    let ca1 = ca_cert(&server).await;
    let agent = attest(&server, &ca1).await;
    let e = entry(&server, &agent.id, "spiffe://example.org/w/rot").await;
    let mut c = agent.client(&server, &ca1, Arc::default()).await;
    let old_svid = sign(&mut c, &e.id).await;
    let (_, seq0) = bundle(&mut c).await;
    let mut a = server.admin().await;

    // Prepare: published, not signing.
    let p = a
        .prepare_x509_ca(admin::PrepareX509CaRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.state, "prepared");
    let (b, seq1) = bundle(&mut c).await;
    assert!(seq1 > seq0, "spiffe_sequence grows");
    assert_eq!(b.x509.authorities().len(), 2);
    let ca2 = b
        .x509
        .authorities()
        .iter()
        .find(|x| **x != ca1)
        .unwrap()
        .clone();
    assert!(verifies(
        &sign(&mut c, &e.id).await,
        std::slice::from_ref(&ca1)
    ));

    // Activate: the new CA signs; the old one is retired and still trusted.
    let act = a
        .activate_x509_ca(admin::ActivateX509CaRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(act.serial, p.serial);
    assert_eq!(act.state, "active");
    let (b, seq2) = bundle(&mut c).await;
    assert!(seq2 > seq1);
    let new_svid = sign(&mut c, &e.id).await;
    let anchors = b.x509.authorities().to_vec();
    assert!(verifies(&old_svid, &anchors), "old SVID, new bundle");
    assert!(verifies(&new_svid, &anchors));
    assert!(
        verifies(&new_svid, std::slice::from_ref(&ca2)),
        "chains to the new CA"
    );
    assert!(!verifies(&new_svid, std::slice::from_ref(&ca1)));
    let keys = a
        .list_keys(admin::ListKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    let states: Vec<_> = keys
        .x509_authorities
        .iter()
        .map(|x| (x.serial.clone(), x.state.clone()))
        .collect();
    assert_eq!(states.len(), 2);
    assert!(states.contains(&(p.serial.clone(), "active".into())));
    let old_serial = states
        .iter()
        .find(|(_, s)| s == "retired")
        .unwrap()
        .0
        .clone();
    // The server certificate now comes from the new CA: a client that
    // trusts only the new CA connects (the agent SVID of the old CA is
    // still accepted while the old CA is published).
    let mut c2 = agent.client(&server, &ca2, Arc::default()).await;
    bundle(&mut c2).await;

    // The agent renews onto the new CA, then the old CA is revoked.
    let key = Key::new();
    let renewed = c2
        .renew_agent(node::RenewAgentRequest {
            public_key: key.spki(),
        })
        .await
        .unwrap()
        .into_inner();
    let renewed = renewed.svid.unwrap();
    let chain: Vec<CertificateDer<'static>> = renewed
        .cert_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    assert!(verifies(&chain, std::slice::from_ref(&ca2)));
    let active = a
        .revoke_x509_ca(admin::RevokeX509CaRequest {
            serial: p.serial.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(active.code(), tonic::Code::FailedPrecondition);
    let r = a
        .revoke_x509_ca(admin::RevokeX509CaRequest {
            serial: old_serial.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.serial, old_serial);
    let renewed_agent = Agent {
        id: agent.id.clone(),
        chain,
        key,
    };
    let mut c3 = renewed_agent.client(&server, &ca2, Arc::default()).await;
    let (b, seq3) = bundle(&mut c3).await;
    assert!(seq3 > seq2);
    assert_eq!(
        b.x509.authorities(),
        std::slice::from_ref(&ca2),
        "revoked CA left the bundle"
    );
    assert!(!verifies(&old_svid, b.x509.authorities()));
    assert!(verifies(&sign(&mut c3, &e.id).await, b.x509.authorities()));
    let audited: Vec<String> = server
        .audit_lines()
        .iter()
        .map(|l| l["method"].as_str().unwrap_or_default().to_owned())
        .collect();
    for m in [
        "admin.PrepareX509Ca",
        "admin.ActivateX509Ca",
        "admin.RevokeX509Ca",
    ] {
        assert!(audited.iter().any(|x| x == m), "{m} audited");
    }

    // Persisted across a restart.
    server.kill();
    server.spawn_and_wait();
    let keys = server
        .admin()
        .await
        .list_keys(admin::ListKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.x509_authorities.len(), 1);
    assert_eq!(keys.x509_authorities[0].serial, p.serial);
    assert_eq!(keys.x509_authorities[0].state, "active");
    assert_eq!(ca_cert(&server).await, ca2);
}

#[tokio::test(flavor = "multi_thread")]
async fn deleted_ca_key_refuses_to_start_and_says_why() {
    let mut server = Server::start();
    let serial = server
        .admin()
        .await
        .list_keys(admin::ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .x509_authorities[0]
        .serial
        .clone();
    server.kill();
    // A passing restart first.
    server.spawn_and_wait();
    server.kill();
    {
        let db = sled::open(server.data_dir().join("db")).unwrap();
        db.open_tree("x509_cas")
            .unwrap()
            .remove(serial.as_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let out = server.command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to start rather than create a new CA"),
        "{err}"
    );
    // Still nothing in the store: no new CA was made.
    let db = sled::open(server.data_dir().join("db")).unwrap();
    assert!(db.open_tree("x509_cas").unwrap().is_empty());
}

fn upstream_files(dir: &std::path::Path, name: &str) -> (String, String, CertificateDer<'static>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, format!("Upstream {name}"));
    p.distinguished_name = dn;
    let cert = p.self_signed(&key).unwrap();
    let c = dir.join(format!("{name}.pem"));
    let k = dir.join(format!("{name}.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (
        c.display().to_string(),
        k.display().to_string(),
        cert.der().clone(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn intermediate_ca_under_an_upstream_given_as_files() {
    let mut server = Server::unstarted();
    let (cert, key, root) = upstream_files(server.dir.path(), "root");
    server.extra_args = vec![
        "--upstream-ca-cert".into(),
        cert,
        "--upstream-ca-key".into(),
        key,
    ];
    server.spawn_and_wait();
    // The bundle holds the upstream root only.
    assert_eq!(ca_cert(&server).await, root);
    // TLS both ways through the intermediate, trusting only the root.
    let agent = attest(&server, &root).await;
    assert_eq!(agent.chain.len(), 2, "agent SVID: leaf, intermediate");
    let mut c = agent.client(&server, &root, Arc::default()).await;
    let (b, _) = bundle(&mut c).await;
    assert_eq!(b.x509.authorities(), std::slice::from_ref(&root));
    let e = entry(&server, &agent.id, "spiffe://example.org/w/int").await;
    let svid = sign(&mut c, &e.id).await;
    assert_eq!(svid.len(), 2, "leaf, intermediate");
    assert!(verifies(&svid, std::slice::from_ref(&root)));
    assert!(
        !verifies(&svid[..1], std::slice::from_ref(&root)),
        "the intermediate is needed"
    );

    // Rotation: a new intermediate under the same root.
    let mut a = server.admin().await;
    a.prepare_x509_ca(admin::PrepareX509CaRequest {})
        .await
        .unwrap();
    a.activate_x509_ca(admin::ActivateX509CaRequest {})
        .await
        .unwrap();
    let keys = a
        .list_keys(admin::ListKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.x509_authorities.len(), 2);
    assert!(
        keys.x509_authorities
            .iter()
            .all(|x| !x.upstream_sha256.is_empty())
    );
    let svid2 = sign(&mut c, &e.id).await;
    assert_ne!(svid2[1], svid[1], "a new intermediate");
    assert!(verifies(&svid2, std::slice::from_ref(&root)));
    let (b, _) = bundle(&mut c).await;
    assert_eq!(b.x509.authorities(), std::slice::from_ref(&root));
}

#[test]
fn upstream_key_not_matching_its_certificate_is_refused_at_start() {
    let mut server = Server::unstarted();
    let (cert, _, _) = upstream_files(server.dir.path(), "a");
    let (_, other_key, _) = upstream_files(server.dir.path(), "b");
    server.extra_args = vec![
        "--upstream-ca-cert".into(),
        cert.clone(),
        "--upstream-ca-key".into(),
        other_key,
    ];
    let out = server.command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("upstream CA: the private key does not match the upstream CA certificate"),
        "{err}"
    );
    // Nothing was initialized.
    assert!(
        !server.data_dir().join("db").join("conf").exists() || {
            let db = sled::open(server.data_dir().join("db")).unwrap();
            db.open_tree("x509_cas").unwrap().is_empty()
        }
    );
    // One of the pair alone is a usage error.
    server.extra_args = vec!["--upstream-ca-cert".into(), cert];
    let out = server.command().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
