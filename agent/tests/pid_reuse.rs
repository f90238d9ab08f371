//! The PID-reuse guard at the service level, without a socket: requests
//! carry a [`WorkloadPeer`] pinned to a child process, the way the accept
//! loop would, and the handlers are called directly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use pb::spiffe_workload_api_server::SpiffeWorkloadApi;
use sigil::proto::workload as pb;
use sigil_agent::audit::{MemoryAudit, Outcome};
use sigil_agent::entry::RegistrationEntry;
use sigil_agent::local_ca::{LocalCa, LocalCaConfig};
use sigil_agent::selector::Selector;
use sigil_agent::workload_api::{WorkloadApi, WorkloadPeer};
use sigil_agent::workload_attest::{
    AttestError, Attestation, PeerCredentials, PinnedProcess, UnixAttestor, WorkloadAttestor,
};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

fn sleeper() -> Child {
    Command::new("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

fn pin(child: &Child) -> PinnedProcess {
    PinnedProcess::pin(PeerCredentials {
        pid: child.id() as i32,
        uid: rustix::process::geteuid().as_raw(),
        gid: rustix::process::getegid().as_raw(),
    })
    .unwrap()
}

fn api(attestor: Arc<dyn WorkloadAttestor>) -> (WorkloadApi, Arc<MemoryAudit>) {
    let ca = LocalCa::new(LocalCaConfig::new(
        sigil::TrustDomain::new("example.org").unwrap(),
    ))
    .unwrap();
    let mut e = RegistrationEntry::new(
        "e1",
        sigil::SpiffeId::parse("spiffe://example.org/w").unwrap(),
        vec![
            Selector::parse(&format!("unix:uid:{}", rustix::process::geteuid().as_raw())).unwrap(),
        ],
    );
    e.audiences = vec!["ehr-fhir".into()];
    ca.set_entries(vec![e]).unwrap();
    let audit = Arc::new(MemoryAudit::default());
    (
        WorkloadApi::new(Arc::new(ca), attestor, audit.clone()),
        audit,
    )
}

fn jwt_request(peer: WorkloadPeer) -> tonic::Request<pb::JwtsvidRequest> {
    let mut r = tonic::Request::new(pb::JwtsvidRequest {
        audience: vec!["ehr-fhir".into()],
        spiffe_id: String::new(),
    });
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r.extensions_mut().insert(peer);
    r
}

#[tokio::test]
async fn a_live_pinned_caller_is_served() {
    let mut child = sleeper();
    let (api, audit) = api(Arc::new(UnixAttestor::default()));
    let resp = api
        .fetch_jwtsvid(jwt_request(WorkloadPeer::from_pinned(pin(&child))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.svids[0].spiffe_id, "spiffe://example.org/w");
    let ev = audit.events();
    assert_eq!(ev[0].pid, Some(child.id() as i32));
    assert_eq!(ev[0].outcome, Outcome::Allowed);
    // The audited executable is the child's, not this test's.
    assert!(
        ev[0].exe_path.as_deref().unwrap().ends_with("/sleep"),
        "{ev:?}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn a_caller_that_exited_after_accept_gets_nothing() {
    let mut child = sleeper();
    let peer = WorkloadPeer::from_pinned(pin(&child));
    child.kill().unwrap();
    child.wait().unwrap();
    let (api, audit) = api(Arc::new(UnixAttestor::default()));
    let err = api.fetch_jwtsvid(jwt_request(peer)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let ev = audit.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].outcome, Outcome::Denied);
    assert!(
        ev[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("attestation failed"),
        "{ev:?}"
    );
}

/// The real attestor, followed by the death of the attested process: what
/// a PID-reuse race looks like from the agent's side.
struct DiesAfterAttestation {
    inner: UnixAttestor,
    child: Mutex<Child>,
}

impl WorkloadAttestor for DiesAfterAttestation {
    fn attest(&self, p: &PinnedProcess) -> Result<Attestation, AttestError> {
        let a = self.inner.attest(p)?;
        let mut child = self.child.lock().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        Ok(a)
    }
}

#[tokio::test]
async fn a_caller_that_changes_during_attestation_gets_nothing() {
    let child = sleeper();
    let peer = WorkloadPeer::from_pinned(pin(&child));
    let attestor = Arc::new(DiesAfterAttestation {
        inner: UnixAttestor::default(),
        child: Mutex::new(child),
    });
    let (api, audit) = api(attestor);
    let err = api.fetch_jwtsvid(jwt_request(peer)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let ev = audit.events();
    assert_eq!(ev.len(), 1);
    assert!(
        ev[0].reason.as_deref().unwrap().contains("changed"),
        "{ev:?}"
    );
}

#[tokio::test]
async fn a_request_without_a_peer_is_refused() {
    let (api, _audit) = api(Arc::new(UnixAttestor::default()));
    let mut r = tonic::Request::new(pb::JwtsvidRequest {
        audience: vec!["ehr-fhir".into()],
        spiffe_id: String::new(),
    });
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let err = api.fetch_jwtsvid(r).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal);
}
