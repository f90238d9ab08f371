//! `sigil::workload::WorkloadX509Source` against the real `sigil-server` and
//! `sigil-agent`: SPIFFE mTLS configs built once from it present the
//! rotated X.509-SVID on new handshakes without a restart, trust only the
//! agent's bundles, and keep the last good SVID while the agent is down.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use sigil::endpoint::Endpoint;
use sigil::tls::{SvidResolver, mtls_client_config, mtls_server_config};
use sigil::validate::x509::{ExactId, MemberOf};
use sigil::workload::{ClientError, WorkloadX509Source};
use sigil::{SpiffeId, TrustDomain};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

fn endpoint(s: &Sigil) -> Endpoint {
    Endpoint::parse(&s.endpoint()).unwrap()
}

/// A TLS server that answers `ok` on every connection it accepts and
/// reports the client's leaf certificate.
async fn serve(config: rustls::ServerConfig) -> (u16, mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
                let _ = tx.send(leaf);
                let _ = tls.write_all(b"ok").await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, rx)
}

/// One handshake; returns the server's leaf certificate, or why it failed.
async fn handshake(port: u16, config: rustls::ClientConfig) -> Result<Vec<u8>, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("sigil-peer").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    // TLS 1.3: the server judges the client certificate after the client
    // finished, so a refusal shows on the first read.
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    if buf != b"ok" {
        return Err(format!("answer {buf:?}"));
    }
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_follows_rotation_without_restart() {
    let s = Sigil::start();
    // 60 s (the shortest TTL): the agent rotates at about half of it.
    let id = s.register("/workload/svc", &["--x509-ttl", "60s"]);
    s.wait_for_svid(&id).await;
    let source = WorkloadX509Source::start(endpoint(&s)).await.unwrap();
    assert_eq!(source.spiffe_id().as_str(), id);
    let td = TrustDomain::new(TD).unwrap();
    let spiffe_id = SpiffeId::parse(&id).unwrap();

    // Both configs are built once, before the rotation.
    let server = mtls_server_config(
        source.resolver(),
        source.bundles(),
        Arc::new(MemberOf(td.clone())),
    )
    .unwrap();
    let client = source
        .client_config(Arc::new(ExactId(spiffe_id.clone())))
        .unwrap();
    let (port, mut client_leaves) = serve(server).await;

    let first = source.svid();
    assert_eq!(
        handshake(port, client.clone()).await.unwrap(),
        first.leaf().to_vec()
    );
    assert_eq!(client_leaves.recv().await.unwrap(), first.leaf().to_vec());

    // A client whose SVID no bundle of the agent's vouches for, of this
    // trust domain or another, is refused.
    for foreign in [
        format!("spiffe://{TD}/workload/svc"),
        "spiffe://other.test/workload/svc".to_owned(),
    ] {
        let evil = mtls_client_config(
            Some(Arc::new(
                SvidResolver::new(&foreign_svid(&foreign)).unwrap(),
            )),
            source.bundles(),
            Arc::new(ExactId(spiffe_id.clone())),
        )
        .unwrap();
        let refused = handshake(port, evil).await;
        assert!(refused.is_err(), "{foreign} admitted");
    }
    // A client that expects another server ID refuses this one.
    let picky = source
        .client_config(Arc::new(ExactId(
            SpiffeId::parse(&format!("spiffe://{TD}/workload/other")).unwrap(),
        )))
        .unwrap();
    assert!(handshake(port, picky).await.is_err());

    // The agent rotates the SVID; the source follows the stream.
    let mut updates = source.updates();
    tokio::time::timeout(Duration::from_secs(55), updates.changed())
        .await
        .expect("no rotation within 55 s")
        .unwrap();
    let rotated = source.svid();
    assert_ne!(rotated.leaf(), first.leaf());
    assert_eq!(rotated.spiffe_id(), first.spiffe_id());
    assert!(rotated.not_after() > first.not_after());

    // New handshakes, with the very same configs, present the new SVID on
    // both sides.
    assert_eq!(
        handshake(port, client).await.unwrap(),
        rotated.leaf().to_vec()
    );
    assert_eq!(client_leaves.recv().await.unwrap(), rotated.leaf().to_vec());
}

#[tokio::test(flavor = "multi_thread")]
async fn keeps_the_last_good_svid_while_the_agent_is_down() {
    let mut s = Sigil::start();
    let id = s.register("/workload/svc", &[]);
    s.wait_for_svid(&id).await;
    let source = WorkloadX509Source::start(endpoint(&s)).await.unwrap();
    let td = TrustDomain::new(TD).unwrap();
    let (port, _leaves) = serve(
        source
            .server_config(Arc::new(MemberOf(td.clone())))
            .unwrap(),
    )
    .await;
    let client = source.client_config(Arc::new(MemberOf(td))).unwrap();
    let before = source.svid();

    s.agent.kill();
    s.server.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(source.svid().leaf(), before.leaf());
    assert_eq!(
        handshake(port, client).await.unwrap(),
        before.leaf().to_vec()
    );
    // Nothing to start from without an agent.
    let err = WorkloadX509Source::start(endpoint(&s)).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn start_for_picks_one_of_several_identities() {
    let s = Sigil::start();
    let a = s.register("/workload/a", &[]);
    let b = s.register("/workload/b", &[]);
    s.wait_for_svid(&a).await;
    s.wait_for_svid(&b).await;
    for id in [&a, &b] {
        let source = WorkloadX509Source::start_for(endpoint(&s), SpiffeId::parse(id).unwrap())
            .await
            .unwrap();
        assert_eq!(source.spiffe_id().as_str(), id.as_str());
        assert_eq!(source.svid().spiffe_id().as_str(), id.as_str());
    }
    let missing = SpiffeId::parse(&format!("spiffe://{TD}/workload/c")).unwrap();
    let err = WorkloadX509Source::start_for(endpoint(&s), missing)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::InvalidResponse(_)), "{err:?}");
}
