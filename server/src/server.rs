//! Starting the server: state, the admin socket, the node API listener, and
//! the background tasks (JWT key and X.509 CA rotation, server certificate
//! renewal).

use crate::api::admin::AdminApi;
use crate::api::node::NodeApi;
use crate::audit::FileAuditSink;
use crate::ca::{self, JwtKeyPolicy, UpstreamCa, X509Policy};
use crate::config::{Config, ensure_private_dir, secure_data_dir};
use crate::entry::TtlPolicy;
use crate::model::now_unix;
use crate::state::ServerState;
use crate::store::{SledStore, Store};
use crate::tls::{CertResolver, TlsConn};
use anyhow::{Context, Result};
use sigil::proto::admin::v1::admin_server::AdminServer;
use sigil::proto::node::v1::node_server::NodeServer;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};

/// Server certificate lifetime, seconds; it is re-issued at half-life.
const SERVER_CERT_TTL: i64 = 24 * 3600;

/// Opens the store and keys. Fails (and never creates a new CA) when the
/// data dir holds state whose CA key is missing.
pub fn build_state(cfg: &Config) -> Result<Arc<ServerState>> {
    if secure_data_dir(&cfg.data_dir)? {
        tracing::warn!(
            data_dir = %cfg.data_dir.display(),
            "data dir was readable by other users; its mode is now 0700"
        );
    }
    let store: Arc<dyn Store> = Arc::new(
        SledStore::open(&cfg.db_dir())
            .with_context(|| format!("opening the database in {}", cfg.db_dir().display()))?,
    );
    let policy = JwtKeyPolicy {
        max_jwt_ttl: 24 * 3600,
        ..JwtKeyPolicy::default()
    };
    let upstream = match &cfg.upstream_ca {
        Some((cert, key)) => Some(Arc::new(UpstreamCa::from_pem_files(cert, key)?)),
        None => None,
    };
    let ttl = TtlPolicy {
        default_x509: cfg.default_x509_ttl,
        default_jwt: cfg.default_jwt_ttl,
        ..TtlPolicy::default()
    };
    let x509 = X509Policy {
        td: cfg.trust_domain.clone(),
        ca_ttl: cfg.ca_ttl,
        // Whatever a CA signs: workload SVIDs, agent SVIDs, the server
        // certificate.
        max_leaf_ttl: ttl.max_x509.max(cfg.agent_svid_ttl).max(SERVER_CERT_TTL),
        upstream,
    };
    let (ca, jwt) = ca::load_or_init_with(store.clone(), x509, policy, now_unix())?;
    let tpm = crate::tpm::TpmAttestor::load(&cfg.tpm_ek_ca)?;
    if tpm.has_cas() {
        tracing::info!(files = cfg.tpm_ek_ca.len(), "TPM manufacturer CAs loaded");
    }
    let audit = FileAuditSink::open(&cfg.audit_log)
        .with_context(|| format!("opening the audit log {}", cfg.audit_log.display()))?;
    Ok(Arc::new(ServerState {
        td: cfg.trust_domain.clone(),
        store,
        ca,
        jwt,
        audit: Arc::new(audit),
        ttl,
        agent_svid_ttl: cfg.agent_svid_ttl,
        jwt_issuer: cfg.jwt_issuer.clone(),
        metrics: Default::default(),
        tpm,
    }))
}

/// Binds the admin socket with mode 0600, replacing a stale socket file.
fn bind_admin_socket(path: &std::path::Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        ensure_private_dir(parent)?;
    }
    if path.exists() {
        // A live server answers on it; a stale file does not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "admin socket {} is in use by another server",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("binding admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(l)
}

/// Whether a peer with `uid` may use the admin socket owned by `owner`.
pub fn admin_peer_allowed(uid: Option<u32>, owner: u32) -> bool {
    matches!(uid, Some(u) if u == owner || u == 0)
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> Result<()> {
    let state = build_state(&cfg)?;
    let server_id = cfg
        .trust_domain
        .id("/sigil/server")
        .map_err(|e| anyhow::anyhow!("server ID: {e}"))?;
    let resolver = Arc::new(CertResolver::new(
        state.ca.clone(),
        server_id,
        cfg.server_dns_names.clone(),
        vec![],
        SERVER_CERT_TTL,
    )?);
    let tls = crate::tls::server_config(state.ca.clone(), resolver.clone())?;

    let tcp = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding node API on {}", cfg.listen))?;
    let admin = bind_admin_socket(&cfg.admin_socket)?;
    if let Some(addr) = cfg.http_listen {
        let https = match &cfg.http_tls {
            Some((cert, key)) => {
                let r = crate::api::http::FileCertResolver::new(cert.clone(), key.clone())?;
                Some(crate::api::http::tls_config(Arc::new(r))?)
            }
            None => None,
        };
        let http = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding HTTP endpoint on {addr}"))?;
        tracing::info!(
            listen = %http.local_addr()?,
            tls = https.is_some(),
            "HTTP endpoint (bundle, OIDC, health, metrics)"
        );
        tokio::spawn(crate::api::http::serve(http, state.clone(), https));
    }
    tracing::info!(
        trust_domain = %cfg.trust_domain,
        listen = %tcp.local_addr()?,
        admin_socket = %cfg.admin_socket.display(),
        "sigil-server ready"
    );

    // Background: key rotation and server certificate renewal.
    {
        let state = state.clone();
        let resolver = resolver.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            let mut last_cert = now_unix();
            loop {
                tick.tick().await;
                match state.jwt.rotate(now_unix()) {
                    Ok(true) => tracing::info!("JWT signing keys rotated"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "JWT key rotation failed"),
                }
                match state.ca.rotate(now_unix()) {
                    Ok(true) => tracing::info!(active = %state.ca.active_id(), "X.509 CAs rotated"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "X.509 CA rotation failed"),
                }
                // Spent-token tombstones are kept a day past the token's
                // expiry, so reuse is reported as reuse meanwhile.
                match state.store.purge_join_tokens(now_unix() - 86400) {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(n, "purged expired join tokens"),
                    Err(e) => tracing::warn!(error = %e, "join token purge failed"),
                }
                if now_unix() - last_cert >= SERVER_CERT_TTL / 2
                    || resolver.issuer_id() != state.ca.active_id()
                {
                    match resolver.refresh() {
                        Ok(_) => last_cert = now_unix(),
                        Err(e) => tracing::error!(error = %e, "server certificate renewal failed"),
                    }
                }
            }
        });
    }

    // Node API: accept TCP, handshake TLS 1.3 off the accept loop, hand
    // finished connections to tonic.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsConn>>(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let (sock, peer) = match tcp.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(sock)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsConn::new(tls))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    // grpc.health.v1 on the node port (no client certificate needed).
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<NodeServer<NodeApi>>().await;
    let node = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(NodeServer::new(NodeApi::new(state.clone())))
        .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx));
    // Defence in depth behind the socket's 0600 mode: only the server's own
    // uid (the socket's owner) and root may talk to the admin API.
    let owner = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&cfg.admin_socket)
            .with_context(|| format!("stat {}", cfg.admin_socket.display()))?
            .uid()
    };
    let admin_incoming = {
        use tokio_stream::StreamExt;
        tokio_stream::wrappers::UnixListenerStream::new(admin).filter(move |conn| match conn {
            Ok(s) => {
                let uid = s.peer_cred().ok().map(|c| c.uid());
                let ok = admin_peer_allowed(uid, owner);
                if !ok {
                    tracing::warn!(
                        ?uid,
                        "admin connection refused: not the server's user or root"
                    );
                }
                ok
            }
            Err(_) => true,
        })
    };
    let admin = tonic::transport::Server::builder()
        .add_service(AdminServer::new(AdminApi::new(state.clone())))
        .serve_with_incoming(admin_incoming);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        r = node => r.context("node API server failed"),
        r = admin => r.context("admin API server failed"),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    };
    let _ = std::fs::remove_file(&cfg.admin_socket);
    tracing::info!("sigil-server stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_peers_are_the_owner_or_root() {
        assert!(admin_peer_allowed(Some(1000), 1000));
        assert!(admin_peer_allowed(Some(0), 1000));
        assert!(!admin_peer_allowed(Some(1001), 1000));
        assert!(!admin_peer_allowed(None, 1000));
    }
}
