//! The SPIFFE Workload API (`SpiffeWorkloadAPI`, no proto package) on a
//! Unix socket, with gRPC health on the same socket.
//!
//! Every handler runs, in order:
//!
//! 1. **validate**: the `workload.spiffe.io: true` header (else
//!    `InvalidArgument`, before anything else), then the request fields
//!    (empty or multiple audiences, a malformed `spiffe_id` → `InvalidArgument`);
//! 2. **attest**: the peer pinned at accept ([`WorkloadPeer`]) goes through
//!    the [`WorkloadAttestor`] on a blocking thread, then the pin is
//!    re-checked; a process that changed gets `PermissionDenied`;
//! 3. **authorize**: the caller's selectors pick its entries
//!    ([`crate::entry::matching_entries`]); none → `PermissionDenied`; for a
//!    JWT-SVID, the audience must be on the entry's list
//!    ([`crate::entry::authorize_jwt`]) → else `PermissionDenied`;
//! 4. **act**: answer from the [`IdentitySource`] snapshot, or mint;
//! 5. **audit**: one [`AuditEvent`] per call that reached attestation.
//!
//! The caller gets a generic message; the audit line gets the detail.
//!
//! Streams (`FetchX509SVID`, `FetchX509Bundles`, `FetchJWTBundles`) send the
//! full state first and again on every change of the source's snapshot that
//! changes what this caller receives (rotation, bundle change, entry
//! change). If the caller loses every entry, the stream ends with
//! `PermissionDenied`; if the source shuts down, with `Unavailable`.
//!
//! `ValidateJWTSVID` attests and audits the caller but does not require an
//! entry: tools that only validate need no registration. It validates with
//! [`JwtSvidValidator`] against every bundle the agent holds.

mod authority;
mod keys;

use crate::audit::{AuditEvent, AuditSink, Outcome};
use crate::entry::{
    AuthzError, KeyBinding, RegistrationEntry, RequestError, authorize_jwt, check_audience,
    matching_entries, requested_spiffe_id, single_audience,
};
use crate::identity::{IdentitySnapshot, IdentitySource, SourceError};
use crate::workload_attest::{
    AttestError, Attestation, PeerCredentials, PinnedProcess, WorkloadAttestor,
};
use pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use sigil::JwtSvidValidator;
use sigil::proto::keys::v1::workload_keys_server::WorkloadKeysServer;
use sigil::proto::workload as pb;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

/// The default socket path.
pub const DEFAULT_SOCKET_PATH: &str = "/tmp/sigil-agent/public/api.sock";

/// The header every Workload API request must carry, with value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// What the peer's caller sees when it gets no identity. The Rust `spiffe`
/// crate and go-spiffe recognise this text (SPIRE's).
const NO_IDENTITY: &str = "no identity issued";

/// The socket peer of one connection, pinned when it was accepted. Handlers
/// find it in the request extensions (tonic puts [`Connected::ConnectInfo`]
/// there).
#[derive(Debug, Clone)]
pub struct WorkloadPeer {
    creds: Option<PeerCredentials>,
    pinned: Result<Arc<PinnedProcess>, AttestError>,
}

impl WorkloadPeer {
    /// Reads `SO_PEERCRED` and pins the process. Failures are kept, not
    /// returned: the request still gets its header check first.
    pub fn from_stream(stream: &UnixStream) -> Self {
        let creds = match stream.peer_cred() {
            Ok(c) => c,
            Err(_) => {
                return Self {
                    creds: None,
                    pinned: Err(AttestError::NoPeerPid),
                };
            }
        };
        let Some(pid) = creds.pid() else {
            return Self {
                creds: None,
                pinned: Err(AttestError::NoPeerPid),
            };
        };
        let creds = PeerCredentials {
            pid,
            uid: creds.uid(),
            gid: creds.gid(),
        };
        // The pidfd of the process that connected (Linux >= 6.5) makes the
        // pin race-free; older kernels fall back to the start-time pin.
        let pidfd = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerPidfd).ok();
        Self {
            creds: Some(creds),
            pinned: PinnedProcess::pin_with_pidfd(creds, pidfd).map(Arc::new),
        }
    }

    /// A peer pinned elsewhere (for serving over another transport, and for
    /// tests that call the service without a socket).
    pub fn from_pinned(pinned: PinnedProcess) -> Self {
        Self {
            creds: Some(pinned.credentials()),
            pinned: Ok(Arc::new(pinned)),
        }
    }

    /// The credentials from `SO_PEERCRED`, if any.
    pub fn credentials(&self) -> Option<PeerCredentials> {
        self.creds
    }
}

/// An accepted connection with its pinned peer. What the client sends is
/// read through [`authority::AuthorityFix`], so that gRPC clients that name
/// the socket path in `:authority` (grpcio, hence py-spiffe; grpc-java) are
/// not refused by the HTTP/2 server.
#[derive(Debug)]
pub struct PeerStream {
    inner: UnixStream,
    peer: WorkloadPeer,
    authority: authority::AuthorityFix,
    _slot: Option<ConnectionSlot>,
}

impl PeerStream {
    /// Pins the peer of `inner`.
    pub fn new(inner: UnixStream) -> Self {
        let peer = WorkloadPeer::from_stream(&inner);
        Self {
            inner,
            peer,
            authority: authority::AuthorityFix::new(),
            _slot: None,
        }
    }
}

/// The default cap on simultaneous connections from one uid.
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 512;

/// Counts open connections per uid, so one local user cannot use up the
/// agent's file descriptors and starve everyone else.
#[derive(Debug)]
struct ConnectionLimiter {
    per_uid: usize,
    open: std::sync::Mutex<HashMap<u32, usize>>,
}

/// One open connection; releases its count when dropped.
#[derive(Debug)]
struct ConnectionSlot {
    limiter: Arc<ConnectionLimiter>,
    uid: u32,
}

impl ConnectionLimiter {
    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<u32, usize>> {
        // Counts are updated in one statement; a poisoned map is consistent.
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn try_acquire(self: &Arc<Self>, uid: u32) -> Option<ConnectionSlot> {
        let mut open = self.counts();
        let n = open.entry(uid).or_insert(0);
        if *n >= self.per_uid {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot {
            limiter: Arc::clone(self),
            uid,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.limiter.counts();
        if let Some(n) = open.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

impl Connected for PeerStream {
    type ConnectInfo = WorkloadPeer;
    fn connect_info(&self) -> WorkloadPeer {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let ready = this.authority.pending();
            if !ready.is_empty() || buf.remaining() == 0 {
                let n = ready.len().min(buf.remaining());
                buf.put_slice(ready.get(..n).unwrap_or_default());
                this.authority.consume(n);
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // End of stream: hand on anything held back, then report it.
                this.authority.finish();
                if this.authority.pending().is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let before = this.authority.rewritten();
            this.authority.push(read.filled());
            if before == 0 && this.authority.rewritten() > 0 {
                tracing::debug!(
                    "rewrote a :authority naming the socket path (HTTP/2 would refuse it)"
                );
            }
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The Workload API service.
#[derive(Clone)]
pub struct WorkloadApi {
    source: Arc<dyn IdentitySource>,
    attestor: Arc<dyn WorkloadAttestor>,
    audit: Arc<dyn AuditSink>,
    /// Set to true when serving stops, so streams end and graceful shutdown
    /// does not wait for clients that never hang up.
    stop: Arc<watch::Sender<bool>>,
    max_connections_per_uid: usize,
}

impl std::fmt::Debug for WorkloadApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkloadApi")
    }
}

/// An attested caller.
#[derive(Debug)]
struct Caller {
    creds: PeerCredentials,
    attestation: Attestation,
    pinned_by_pidfd: bool,
}

impl Caller {
    fn selectors(&self) -> &BTreeSet<crate::selector::Selector> {
        &self.attestation.selectors
    }
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

impl From<AuthzError> for Status {
    fn from(e: AuthzError) -> Self {
        match e {
            AuthzError::NoMatchingEntry | AuthzError::SpiffeIdNotEntitled(_) => {
                Status::permission_denied(NO_IDENTITY)
            }
            AuthzError::AudienceNotAllowed(_) => {
                Status::permission_denied("audience not allowed for this identity")
            }
        }
    }
}

impl From<SourceError> for Status {
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::Unavailable(_) => Status::unavailable("identity temporarily unavailable"),
            SourceError::UnknownEntry(_) => Status::permission_denied(NO_IDENTITY),
            SourceError::Internal(_) => Status::internal("identity source failed"),
        }
    }
}

fn check_header(meta: &tonic::metadata::MetadataMap) -> Result<(), Status> {
    let mut values = meta.get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

impl WorkloadApi {
    /// A service answering from `source`, attesting with `attestor`,
    /// auditing to `audit`.
    pub fn new(
        source: Arc<dyn IdentitySource>,
        attestor: Arc<dyn WorkloadAttestor>,
        audit: Arc<dyn AuditSink>,
    ) -> Self {
        Self {
            source,
            attestor,
            audit,
            stop: Arc::new(watch::channel(false).0),
            max_connections_per_uid: DEFAULT_MAX_CONNECTIONS_PER_UID,
        }
    }

    /// Caps simultaneous connections from one uid (default
    /// [`DEFAULT_MAX_CONNECTIONS_PER_UID`]); connections over the cap are
    /// closed at accept and audited.
    pub fn with_max_connections_per_uid(mut self, n: usize) -> Self {
        self.max_connections_per_uid = n;
        self
    }

    fn event(&self, rpc: &'static str, caller: Option<&Caller>, outcome: Outcome) -> AuditEvent {
        let mut e = AuditEvent::new(rpc, outcome);
        if let Some(c) = caller {
            e.pid = Some(c.creds.pid);
            e.uid = Some(c.creds.uid);
            e.gid = Some(c.creds.gid);
            e.exe_path = c.attestation.exe_path.clone();
            e.exe_sha256 = c.attestation.exe_sha256.clone();
            e.pin = Some(if c.pinned_by_pidfd {
                "pidfd"
            } else {
                "start_time"
            });
        }
        e.assurance = Some(self.source.subscribe().borrow().node.level.acr().to_owned());
        e
    }

    /// Audits a call the identity source could not serve (an entry it does
    /// not know is a refusal, anything else an error) and gives its status.
    fn source_failed(&self, mut event: AuditEvent, e: SourceError) -> Status {
        event.outcome = match e {
            SourceError::UnknownEntry(_) => Outcome::Denied,
            _ => Outcome::Error,
        };
        event.reason = Some(e.to_string());
        self.audit.record(&event);
        e.into()
    }

    /// Step 2: attest the caller behind the request.
    async fn attest<T>(&self, rpc: &'static str, req: &Request<T>) -> Result<Caller, Status> {
        let Some(peer) = req.extensions().get::<WorkloadPeer>().cloned() else {
            let mut e = self.event(rpc, None, Outcome::Error);
            e.reason = Some("no peer information on the connection".into());
            self.audit.record(&e);
            return Err(Status::internal("caller could not be identified"));
        };
        let denied = |reason: String| {
            let mut e = self.event(rpc, None, Outcome::Denied);
            if let Some(c) = peer.creds {
                e.pid = Some(c.pid);
                e.uid = Some(c.uid);
                e.gid = Some(c.gid);
            }
            e.reason = Some(reason);
            self.audit.record(&e);
            Status::permission_denied(NO_IDENTITY)
        };
        let pinned = match &peer.pinned {
            Ok(p) => Arc::clone(p),
            Err(e) => return Err(denied(format!("attestation failed: {e}"))),
        };
        let pinned_by_pidfd = pinned.pinned_by_pidfd();
        let attestor = Arc::clone(&self.attestor);
        let result = tokio::task::spawn_blocking(move || {
            let attestation = attestor.attest(&pinned)?;
            // The PID-reuse guard: the process must be the one pinned at
            // accept, still alive, after everything was read.
            pinned.ensure_unchanged()?;
            Ok::<_, AttestError>((pinned.credentials(), attestation))
        })
        .await;
        match result {
            Ok(Ok((creds, attestation))) => Ok(Caller {
                creds,
                attestation,
                pinned_by_pidfd,
            }),
            Ok(Err(e)) => Err(denied(format!("attestation failed: {e}"))),
            Err(e) => Err(denied(format!("attestation task failed: {e}"))),
        }
    }

    /// Steps 2–3 for the calls that need at least one entry, with the audit
    /// line for a refusal.
    async fn attest_and_match<T>(
        &self,
        rpc: &'static str,
        req: &Request<T>,
    ) -> Result<(Caller, Vec<Arc<RegistrationEntry>>), Status> {
        let caller = self.attest(rpc, req).await?;
        let snap = self.source.subscribe().borrow().clone();
        let matched: Vec<_> = matching_entries(&snap.entries, caller.selectors(), snap.node.level)
            .into_iter()
            .cloned()
            .collect();
        if matched.is_empty() {
            let mut e = self.event(rpc, Some(&caller), Outcome::Denied);
            e.reason = Some(format!(
                "no registration entry matches selectors [{}]",
                join(caller.selectors())
            ));
            self.audit.record(&e);
            return Err(AuthzError::NoMatchingEntry.into());
        }
        Ok((caller, matched))
    }

    /// Runs a stream: `build` turns each snapshot and the caller's entries
    /// into the next message; a message equal to the last one is not sent.
    fn stream<T, F>(
        &self,
        rpc: &'static str,
        caller: Caller,
        build: F,
    ) -> ReceiverStream<Result<T, Status>>
    where
        T: PartialEq + Clone + Send + 'static,
        F: Fn(&IdentitySnapshot, &[&Arc<RegistrationEntry>]) -> Option<T> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(2);
        let mut stop = self.stop.subscribe();
        let mut updates = self.source.subscribe();
        let audit = Arc::clone(&self.audit);
        let ended = self.event(rpc, Some(&caller), Outcome::Denied);
        tokio::spawn(async move {
            let mut last: Option<T> = None;
            loop {
                let snap = updates.borrow_and_update().clone();
                let matched = matching_entries(&snap.entries, caller.selectors(), snap.node.level);
                if matched.is_empty() {
                    let mut e = ended.clone().at_now();
                    e.reason = Some("caller no longer matches any entry; stream ended".into());
                    audit.record(&e);
                    let _ = tx.send(Err(AuthzError::NoMatchingEntry.into())).await;
                    return;
                }
                if let Some(msg) = build(&snap, &matched)
                    && last.as_ref() != Some(&msg)
                {
                    last = Some(msg.clone());
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    changed = updates.changed() => {
                        if changed.is_err() {
                            let _ = tx.send(Err(Status::unavailable("identity source stopped"))).await;
                            return;
                        }
                    }
                    () = tx.closed() => return,
                    () = async {
                        // The guard `wait_for` returns is not Send: drop it here.
                        let _ = stop.wait_for(|s| *s).await;
                    } => {
                        let _ = tx.send(Err(Status::unavailable("agent shutting down"))).await;
                        return;
                    }
                }
            }
        });
        ReceiverStream::new(rx)
    }

    /// Serves the API and gRPC health on `listener` until `shutdown`
    /// completes; then open streams end with `Unavailable` and in-flight
    /// calls finish before this returns.
    pub async fn serve(
        self,
        listener: std::os::unix::net::UnixListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        listener.set_nonblocking(true).map_err(ServeError::Io)?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(ServeError::Io)?;
        let limiter = Arc::new(ConnectionLimiter {
            per_uid: self.max_connections_per_uid,
            open: std::sync::Mutex::new(HashMap::new()),
        });
        let audit = Arc::clone(&self.audit);
        let incoming = futures::stream::unfold(listener, move |l| {
            let limiter = Arc::clone(&limiter);
            let audit = Arc::clone(&audit);
            async move {
                loop {
                    match l.accept().await {
                        Ok((stream, _)) => {
                            let mut s = PeerStream::new(stream);
                            // A peer without credentials is counted under an
                            // impossible uid; its requests are refused anyway.
                            let uid = s.peer.creds.map_or(u32::MAX, |c| c.uid);
                            match limiter.try_acquire(uid) {
                                Some(slot) => s._slot = Some(slot),
                                None => {
                                    let mut e = AuditEvent::new("Connect", Outcome::Denied);
                                    e.pid = s.peer.creds.map(|c| c.pid);
                                    e.uid = Some(uid);
                                    e.reason = Some("too many connections from this uid".into());
                                    audit.record(&e);
                                    continue; // dropping `s` closes the connection
                                }
                            }
                            return Some((Ok::<_, io::Error>(s), l));
                        }
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        });
        let self_stop = Arc::clone(&self.stop);
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<SpiffeWorkloadApiServer<WorkloadApi>>()
            .await;
        health
            .set_serving::<WorkloadKeysServer<WorkloadApi>>()
            .await;
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(SpiffeWorkloadApiServer::new(self.clone()))
            .add_service(WorkloadKeysServer::new(self))
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.await;
                self_stop.send_replace(true);
            })
            .await
            .map_err(ServeError::Transport)
    }
}

/// Serving failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Socket setup.
    #[error("workload API socket: {0}")]
    Io(io::Error),
    /// The gRPC server.
    #[error("workload API server: {0}")]
    Transport(tonic::transport::Error),
}

fn join(s: &BTreeSet<crate::selector::Selector>) -> String {
    s.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn spiffe_ids(entries: &[&Arc<RegistrationEntry>]) -> Vec<String> {
    entries.iter().map(|e| e.spiffe_id.to_string()).collect()
}

/// The trust domains whose X.509 bundles a caller gets beside its own.
fn federated<'a>(
    snap: &'a IdentitySnapshot,
    entries: &[&Arc<RegistrationEntry>],
) -> Vec<&'a sigil::Bundle> {
    let tds: BTreeSet<_> = entries
        .iter()
        .flat_map(|e| e.federates_with.iter())
        .filter(|td| **td != snap.trust_domain)
        .collect();
    tds.into_iter()
        .filter_map(|td| snap.bundles.get(td))
        .collect()
}

fn x509_svid_response(
    snap: &IdentitySnapshot,
    entries: &[&Arc<RegistrationEntry>],
) -> Option<pb::X509svidResponse> {
    let mut svids = Vec::new();
    for e in entries {
        let Some(svid) = snap.x509_svids.get(&e.id) else {
            continue;
        };
        let td = e.spiffe_id.trust_domain();
        let bundle = snap
            .bundles
            .get(&td)
            .map(|b| b.x509.to_concatenated_der())
            .unwrap_or_default();
        svids.push(pb::X509svid {
            spiffe_id: e.spiffe_id.to_string(),
            x509_svid: svid.chain_der(),
            // PKCS#8, as the spec and the Rust `spiffe` crate require.
            x509_svid_key: svid.private_key().secret_pkcs8_der().to_vec(),
            bundle,
            hint: String::new(),
        });
    }
    if svids.is_empty() {
        // Entries matched but nothing minted yet: wait for the next update.
        return None;
    }
    let federated_bundles = federated(snap, entries)
        .into_iter()
        .map(|b| (b.trust_domain().id_string(), b.x509.to_concatenated_der()))
        .collect();
    Some(pb::X509svidResponse {
        svids,
        crl: Vec::new(),
        federated_bundles,
    })
}

fn own_and_federated<'a>(
    snap: &'a IdentitySnapshot,
    entries: &[&Arc<RegistrationEntry>],
) -> Vec<&'a sigil::Bundle> {
    let mut out: Vec<_> = snap.bundles.get(&snap.trust_domain).into_iter().collect();
    out.extend(federated(snap, entries));
    out
}

fn x509_bundles_response(
    snap: &IdentitySnapshot,
    entries: &[&Arc<RegistrationEntry>],
) -> Option<pb::X509BundlesResponse> {
    let bundles: HashMap<_, _> = own_and_federated(snap, entries)
        .into_iter()
        .map(|b| (b.trust_domain().id_string(), b.x509.to_concatenated_der()))
        .collect();
    (!bundles.is_empty()).then_some(pb::X509BundlesResponse {
        crl: Vec::new(),
        bundles,
    })
}

fn jwt_bundles_response(
    snap: &IdentitySnapshot,
    entries: &[&Arc<RegistrationEntry>],
) -> Option<pb::JwtBundlesResponse> {
    let bundles: HashMap<_, _> = own_and_federated(snap, entries)
        .into_iter()
        .map(|b| {
            (
                b.trust_domain().id_string(),
                b.jwt.to_jwks_json().into_bytes(),
            )
        })
        .collect();
    (!bundles.is_empty()).then_some(pb::JwtBundlesResponse { bundles })
}

fn json_to_prost(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_prost).collect(),
        }),
        Value::Object(o) => Kind::StructValue(claims_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn claims_struct(o: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: o
            .iter()
            .map(|(k, v)| (k.clone(), json_to_prost(v)))
            .collect(),
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        const RPC: &str = "FetchJWTSVID";
        check_header(request.metadata())?;
        let audience = single_audience(&request.get_ref().audience)?.to_owned();
        let requested = requested_spiffe_id(&request.get_ref().spiffe_id)?;
        let (caller, matched) = self.attest_and_match(RPC, &request).await?;
        // TPM-bound entries get key-bound tokens from the workload key
        // service only: a bearer client could not prove the key.
        let refs: Vec<_> = matched
            .iter()
            .filter(|e| e.key_binding == KeyBinding::None)
            .collect();
        let mut event = self.event(RPC, Some(&caller), Outcome::Allowed);
        event.audience = Some(audience.clone());
        event.entry_ids = matched.iter().map(|e| e.id.clone()).collect();
        if refs.is_empty() {
            event.outcome = Outcome::Denied;
            event.reason = Some(
                "the caller's entries bind their keys to the TPM: JWT-SVIDs for them come from sigil.workload.v1".into(),
            );
            self.audit.record(&event);
            return Err(Status::permission_denied(NO_IDENTITY));
        }
        let authorized = match authorize_jwt(&refs, requested.as_ref(), &audience) {
            Ok(a) => a,
            Err(e) => {
                event.outcome = Outcome::Denied;
                event.spiffe_ids = match &requested {
                    Some(id) => vec![id.to_string()],
                    None => spiffe_ids(&refs),
                };
                event.reason = Some(e.to_string());
                self.audit.record(&event);
                return Err(e.into());
            }
        };
        let mut svids = Vec::with_capacity(authorized.len());
        for a in &authorized {
            match self.source.fetch_jwt_svid(a).await {
                Ok(minted) => svids.push(pb::Jwtsvid {
                    spiffe_id: minted.spiffe_id.to_string(),
                    svid: minted.token,
                    hint: String::new(),
                }),
                Err(e) => {
                    event.spiffe_ids = vec![a.entry().spiffe_id.to_string()];
                    return Err(self.source_failed(event, e));
                }
            }
        }
        event.entry_ids = authorized.iter().map(|a| a.entry().id.clone()).collect();
        event.spiffe_ids = svids.iter().map(|s| s.spiffe_id.clone()).collect();
        self.audit.record(&event);
        Ok(Response::new(pb::JwtsvidResponse { svids }))
    }

    type FetchJWTBundlesStream = ReceiverStream<Result<pb::JwtBundlesResponse, Status>>;

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        const RPC: &str = "FetchJWTBundles";
        check_header(request.metadata())?;
        let (caller, matched) = self.attest_and_match(RPC, &request).await?;
        let mut e = self.event(RPC, Some(&caller), Outcome::Allowed);
        e.entry_ids = matched.iter().map(|e| e.id.clone()).collect();
        self.audit.record(&e);
        Ok(Response::new(self.stream(
            RPC,
            caller,
            jwt_bundles_response,
        )))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        const RPC: &str = "ValidateJWTSVID";
        check_header(request.metadata())?;
        let req = request.get_ref();
        check_audience(&req.audience)?;
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let caller = self.attest(RPC, &request).await?;
        let snap = self.source.subscribe().borrow().clone();
        let mut event = self.event(RPC, Some(&caller), Outcome::Allowed);
        event.audience = Some(req.audience.clone());
        match JwtSvidValidator::new(req.audience.clone()).validate(
            &req.svid,
            &snap.bundles,
            SystemTime::now(),
        ) {
            Ok(v) => {
                event.spiffe_ids = vec![v.spiffe_id().to_string()];
                self.audit.record(&event);
                Ok(Response::new(pb::ValidateJwtsvidResponse {
                    spiffe_id: v.spiffe_id().to_string(),
                    claims: Some(claims_struct(v.claims())),
                }))
            }
            Err(e) => {
                event.outcome = Outcome::Denied;
                event.reason = Some(format!("invalid JWT-SVID: {e}"));
                self.audit.record(&event);
                Err(Status::invalid_argument("invalid JWT-SVID"))
            }
        }
    }

    type FetchX509SVIDStream = ReceiverStream<Result<pb::X509svidResponse, Status>>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        const RPC: &str = "FetchX509SVID";
        check_header(request.metadata())?;
        let (caller, matched) = self.attest_and_match(RPC, &request).await?;
        let mut e = self.event(RPC, Some(&caller), Outcome::Allowed);
        e.entry_ids = matched.iter().map(|e| e.id.clone()).collect();
        e.spiffe_ids = matched.iter().map(|e| e.spiffe_id.to_string()).collect();
        self.audit.record(&e);
        Ok(Response::new(self.stream(RPC, caller, x509_svid_response)))
    }

    type FetchX509BundlesStream = ReceiverStream<Result<pb::X509BundlesResponse, Status>>;

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        const RPC: &str = "FetchX509Bundles";
        check_header(request.metadata())?;
        let (caller, matched) = self.attest_and_match(RPC, &request).await?;
        let mut e = self.event(RPC, Some(&caller), Outcome::Allowed);
        e.entry_ids = matched.iter().map(|e| e.id.clone()).collect();
        self.audit.record(&e);
        Ok(Response::new(self.stream(
            RPC,
            caller,
            x509_bundles_response,
        )))
    }
}

/// Creates the socket at `path`: parent directories are created (mode
/// 0755), every existing ancestor must be owned by root or this user and not
/// writable by others (unless sticky, like `/tmp`), a stale socket is
/// removed (a live one is an error), and the socket gets mode 0777 — any
/// local user may connect, identity comes from attestation.
pub fn bind_socket(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    if !path.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "workload API socket path must be absolute",
        ));
    }
    let parent = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "socket path has no parent"))?;
    // Directories created here get 0755 whatever the umask, so every local
    // user can reach the socket; existing ones are left as they are.
    let missing: Vec<&Path> = parent.ancestors().take_while(|d| !d.exists()).collect();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)?;
    for d in missing {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    check_ancestors(parent)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by another process", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(listener)
}

/// Refuses a socket directory another user could swap the socket in.
fn check_ancestors(dir: &Path) -> io::Result<()> {
    let me = rustix::process::geteuid().as_raw();
    let mut cur: Option<PathBuf> = Some(dir.to_path_buf());
    while let Some(d) = cur {
        let m = std::fs::metadata(&d)?;
        let mode = m.mode();
        let sticky = mode & 0o1000 != 0;
        if (m.uid() != 0 && m.uid() != me) || (mode & 0o022 != 0 && !sticky) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is owned by uid {} or writable by others: refusing to put the workload API socket under it",
                    d.display(),
                    m.uid()
                ),
            ));
        }
        cur = d.parent().map(Path::to_path_buf);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_check() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(
            check_header(&m).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        m.insert(SECURITY_HEADER, "false".parse().unwrap());
        assert!(check_header(&m).is_err());
        m.insert(SECURITY_HEADER, "true".parse().unwrap());
        assert!(check_header(&m).is_ok());
        m.append(SECURITY_HEADER, "true".parse().unwrap());
        assert!(check_header(&m).is_err(), "two values");
    }

    #[test]
    fn socket_binding_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/api.sock");
        // A restrictive umask does not make created directories private.
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
        let l = bind_socket(&path);
        rustix::process::umask(old);
        let l = l.unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode();
        assert_eq!(mode & 0o777, 0o777);
        for d in ["a", "a/b"] {
            let mode = std::fs::metadata(dir.path().join(d)).unwrap().mode();
            assert_eq!(mode & 0o777, 0o755, "{d}");
        }
        // Live socket: refused.
        assert_eq!(
            bind_socket(&path).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        drop(l);
        // Stale socket: replaced.
        let _l = bind_socket(&path).unwrap();
        // Not a socket: refused.
        let file = dir.path().join("a/file");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            bind_socket(&file).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        // A directory others can write to: refused.
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(
            bind_socket(&open.join("api.sock")).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
        assert_eq!(
            bind_socket(Path::new("relative.sock")).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
