//! The plain-HTTP endpoint (optional, `--http-listen`): what tools and
//! operators read without a client certificate.
//!
//! | path | body |
//! |---|---|
//! | `/bundle` | the SPIFFE bundle (JSON) |
//! | `/keys` | the JWT keys as a plain JWKS |
//! | `/.well-known/openid-configuration` | OIDC discovery (only when `jwt_issuer` is set, since JWT-SVIDs carry `iss` only then) |
//! | `/live` | 200 while the process runs |
//! | `/ready` | 200 when the store answers |
//! | `/metrics` | Prometheus text: audit events by method and outcome |
//!
//! It serves public data only and terminates no TLS: put it behind a TLS
//! proxy when tools reach it over a network (OIDC federation needs HTTPS).

use crate::state::ServerState;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use std::sync::Arc;
use tokio::net::TcpListener;

fn reply(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Answers one request.
pub fn handle(state: &ServerState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    const JSON: &str = "application/json";
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n");
    }
    match path {
        "/bundle" => reply(StatusCode::OK, JSON, state.bundle().to_spiffe_json()),
        "/keys" => reply(StatusCode::OK, JSON, state.bundle().jwt.to_jwks_json()),
        "/.well-known/openid-configuration" => match &state.jwt_issuer {
            Some(iss) => {
                let iss = iss.trim_end_matches('/');
                let doc = serde_json::json!({
                    "issuer": iss,
                    "jwks_uri": format!("{iss}/keys"),
                    "id_token_signing_alg_values_supported": ["ES256"],
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti", "acr", "amr"],
                });
                reply(StatusCode::OK, JSON, doc.to_string())
            }
            None => reply(
                StatusCode::NOT_FOUND,
                TEXT,
                "OIDC discovery needs jwt_issuer in the server configuration\n",
            ),
        },
        "/live" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/ready" => match state.store.trust_domain() {
            Ok(Some(_)) => reply(StatusCode::OK, TEXT, "ready\n"),
            _ => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n"),
        },
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics.prometheus(),
        ),
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n"),
    }
}

/// Serves HTTP/1.1 on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<ServerState>) {
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = handle(&state, req.method(), req.uri().path());
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(sock), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection error");
            }
        });
    }
}
