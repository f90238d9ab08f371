//! The layer with `oneshot`: no sockets. Every refusal also proves that the
//! handler was never called.

use super::*;
use crate::bundle::{Bundle, BundleSet, JwtKey};
use crate::key::PrivateKey;
use crate::source::SharedBundles;
use crate::svid::jwt::{Confirmation, JwtSigner, JwtSvidClaims, random_jti};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use tower::ServiceExt;

struct Fx {
    signer: JwtSigner,
    other_td_signer: JwtSigner,
    bundles: Arc<SharedBundles>,
}

fn fx() -> Fx {
    let signer = JwtSigner::new("k1", &PrivateKey::generate_p256().unwrap()).unwrap();
    let other_td_signer = JwtSigner::new("o1", &PrivateKey::generate_p256().unwrap()).unwrap();
    let mut a = Bundle::empty(TrustDomain::new("example.org").unwrap());
    a.jwt
        .add_key(JwtKey::from_sec1("k1", &signer.public_key_sec1()).unwrap())
        .unwrap();
    let mut b = Bundle::empty(TrustDomain::new("partner.org").unwrap());
    b.jwt
        .add_key(JwtKey::from_sec1("o1", &other_td_signer.public_key_sec1()).unwrap())
        .unwrap();
    let set: BundleSet = [a, b].into_iter().collect();
    Fx {
        signer,
        other_td_signer,
        bundles: Arc::new(SharedBundles::new(set)),
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(sub: &str, aud: &str, acr: AssuranceLevel) -> JwtSvidClaims {
    JwtSvidClaims {
        sub: SpiffeId::parse(sub).unwrap(),
        aud: aud.into(),
        exp: now() + 300,
        iat: now(),
        jti: random_jti(),
        iss: None,
        acr: Some(acr.acr().into()),
        amr: vec!["join_token".into()],
        cnf: None,
    }
}

const AGENT: &str = "spiffe://example.org/agent/triage";

type Resp = Response<String>;

/// Runs one request through the layer around a handler that echoes the
/// caller's SPIFFE ID; returns the response and how often the handler ran.
async fn run<P: Policy>(layer: JwtSvidLayer<P>, req: Request<()>) -> (Resp, usize) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let handler = tower::service_fn(move |req: Request<()>| {
        c.fetch_add(1, Ordering::SeqCst);
        let id = req
            .extensions()
            .get::<VerifiedJwtSvid>()
            .map(|v| v.spiffe_id().to_string())
            .unwrap_or_default();
        async move { Ok::<_, Infallible>(Response::new(id)) }
    });
    let svc = tower_layer::Layer::layer(&layer, handler);
    let resp = svc.oneshot(req).await.unwrap();
    (resp, calls.load(Ordering::SeqCst))
}

fn req(token: Option<&str>) -> Request<()> {
    let mut b = Request::builder().uri("/fhir/Patient");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(()).unwrap()
}

fn www(resp: &Resp) -> String {
    resp.headers()
        .get("www-authenticate")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn valid_token_reaches_the_handler_with_the_identity() {
    let f = fx();
    let t = f
        .signer
        .sign(&claims(AGENT, "ehr-fhir", AssuranceLevel::Al1))
        .unwrap();
    let layer = JwtSvidLayer::new("ehr-fhir", f.bundles.clone());
    let (resp, calls) = run(layer, req(Some(&t))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.body(), AGENT);
    assert_eq!(calls, 1);
}

#[tokio::test]
async fn refusals_are_401_without_calling_the_handler() {
    let f = fx();
    let layer = JwtSvidLayer::new("ehr-fhir", f.bundles.clone());
    let mut expired = claims(AGENT, "ehr-fhir", AssuranceLevel::Al1);
    expired.exp = now() - 120;
    expired.iat = now() - 400;
    let mut bound = claims(AGENT, "ehr-fhir", AssuranceLevel::Al3);
    bound.cnf = Some(Confirmation { jkt: "x".into() });
    let unknown_kid = JwtSigner::new("nope", &PrivateKey::generate_p256().unwrap())
        .unwrap()
        .sign(&claims(AGENT, "ehr-fhir", AssuranceLevel::Al1))
        .unwrap();
    let cases = [
        (
            "wrong audience",
            f.signer
                .sign(&claims(AGENT, "calendar", AssuranceLevel::Al1))
                .unwrap(),
        ),
        ("expired", f.signer.sign(&expired).unwrap()),
        // Signed with example.org's key but claiming partner.org.
        (
            "other trust domain",
            f.signer
                .sign(&claims(
                    "spiffe://partner.org/a",
                    "ehr-fhir",
                    AssuranceLevel::Al1,
                ))
                .unwrap(),
        ),
        ("unknown kid", unknown_kid),
        ("cnf without proof", f.signer.sign(&bound).unwrap()),
        ("garbage", "a.b.c".to_string()),
    ];
    for (name, t) in cases {
        let (resp, calls) = run(layer.clone(), req(Some(&t))).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{name}");
        assert_eq!(calls, 0, "{name}: handler must not run");
        assert!(www(&resp).contains(r#"error="invalid_token""#), "{name}");
        assert!(resp.body().is_empty(), "{name}: nothing echoed");
    }
    // No token at all.
    let (resp, calls) = run(layer.clone(), req(None)).await;
    assert_eq!((resp.status(), calls), (StatusCode::UNAUTHORIZED, 0));
    assert_eq!(www(&resp), r#"Bearer realm="sigil""#);
    // Wrong scheme, and two Authorization headers.
    let t = f
        .signer
        .sign(&claims(AGENT, "ehr-fhir", AssuranceLevel::Al1))
        .unwrap();
    let r = Request::builder()
        .header("authorization", format!("Basic {t}"))
        .body(())
        .unwrap();
    assert_eq!(run(layer.clone(), r).await.1, 0);
    let r = Request::builder()
        .header("authorization", format!("Bearer {t}"))
        .header("authorization", format!("Bearer {t}"))
        .body(())
        .unwrap();
    let (resp, calls) = run(layer.clone(), r).await;
    assert_eq!((resp.status(), calls), (StatusCode::UNAUTHORIZED, 0));
}

#[tokio::test]
async fn partner_trust_domain_validates_with_its_own_bundle() {
    let f = fx();
    let t = f
        .other_td_signer
        .sign(&claims(
            "spiffe://partner.org/agent",
            "ehr-fhir",
            AssuranceLevel::Al2,
        ))
        .unwrap();
    let layer = JwtSvidLayer::new("ehr-fhir", f.bundles.clone());
    assert_eq!(run(layer.clone(), req(Some(&t))).await.1, 1);
    // ...and a policy limited to example.org refuses it with 403.
    let only_ours =
        layer.with_policy(PolicySet::new().trust_domain(TrustDomain::new("example.org").unwrap()));
    let (resp, calls) = run(only_ours, req(Some(&t))).await;
    assert_eq!((resp.status(), calls), (StatusCode::FORBIDDEN, 0));
    assert!(www(&resp).contains("insufficient_scope"));
}

#[tokio::test]
async fn policies_give_403() {
    let f = fx();
    let base = JwtSvidLayer::new("ehr-fhir", f.bundles.clone());
    let al1 = f
        .signer
        .sign(&claims(AGENT, "ehr-fhir", AssuranceLevel::Al1))
        .unwrap();
    let al3 = f
        .signer
        .sign(&claims(AGENT, "ehr-fhir", AssuranceLevel::Al3))
        .unwrap();

    let strong = base
        .clone()
        .with_policy(PolicySet::new().min_assurance(AssuranceLevel::Al2));
    let (resp, calls) = run(strong.clone(), req(Some(&al1))).await;
    assert_eq!((resp.status(), calls), (StatusCode::FORBIDDEN, 0));
    assert_eq!(run(strong, req(Some(&al3))).await.1, 1);

    let exact = base.clone().with_policy(
        PolicySet::new().spiffe_id(SpiffeId::parse("spiffe://example.org/other").unwrap()),
    );
    assert_eq!(
        run(exact, req(Some(&al1))).await.0.status(),
        StatusCode::FORBIDDEN
    );

    let closure = base.with_policy(|c: &VerifiedJwtSvid| {
        if c.amr().iter().any(|m| m == "tpm") {
            Ok(())
        } else {
            Err(Denied("needs a TPM-attested node".into()))
        }
    });
    let (resp, calls) = run(closure, req(Some(&al1))).await;
    assert_eq!((resp.status(), calls), (StatusCode::FORBIDDEN, 0));
}

#[tokio::test]
async fn grpc_requests_get_grpc_statuses() {
    let f = fx();
    let layer = JwtSvidLayer::new("ehr-fhir", f.bundles.clone())
        .with_policy(PolicySet::new().min_assurance(AssuranceLevel::Al3));
    let grpc = |t: Option<&str>| {
        let mut b = Request::builder()
            .uri("/ehr.v1.Fhir/Read")
            .header("content-type", "application/grpc");
        if let Some(t) = t {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(()).unwrap()
    };
    let (resp, calls) = run(layer.clone(), grpc(None)).await;
    assert_eq!(calls, 0);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["grpc-status"], "16");
    let al1 = f
        .signer
        .sign(&claims(AGENT, "ehr-fhir", AssuranceLevel::Al1))
        .unwrap();
    let (resp, calls) = run(layer, grpc(Some(&al1))).await;
    assert_eq!(calls, 0);
    assert_eq!(resp.headers()["grpc-status"], "7");
}

/// A request carrying a key-bound token the DPoP way.
fn dpop_req(
    method: &str,
    path: &str,
    token: &str,
    proof: Option<&str>,
    scheme: &str,
) -> Request<()> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("{scheme} {token}"));
    if let Some(p) = proof {
        b = b.header("dpop", p);
    }
    b.body(()).unwrap()
}

#[tokio::test]
async fn key_bound_tokens_need_a_fresh_proof_for_this_request() {
    use crate::validate::pop::{ProofRequest, SoftwareProofKey, build_proof, key_thumbprint};
    let f = fx();
    let key = SoftwareProofKey::generate().unwrap();
    let mut c = claims(AGENT, "ehr-fhir", AssuranceLevel::Al3);
    c.cnf = Some(Confirmation {
        jkt: key_thumbprint(&key),
    });
    let t = f.signer.sign(&c).unwrap();
    let origin = "https://ehr.example";
    let layer = JwtSvidLayer::new("ehr-fhir", f.bundles.clone()).with_proof_origin(origin);
    let proof = |method: &str, uri: &str| {
        build_proof(&key, &t, &ProofRequest { method, uri }, now()).unwrap()
    };
    let good = proof("GET", "https://ehr.example/fhir/Patient");

    // The honest request.
    let (resp, calls) = run(
        layer.clone(),
        dpop_req("GET", "/fhir/Patient?x=1", &t, Some(&good), "DPoP"),
    )
    .await;
    assert_eq!((resp.status(), calls), (StatusCode::OK, 1));

    let other_key = SoftwareProofKey::generate().unwrap();
    let foreign = build_proof(
        &other_key,
        &t,
        &ProofRequest {
            method: "GET",
            uri: "https://ehr.example/fhir/Patient",
        },
        now(),
    )
    .unwrap();
    let cases = [
        (
            "replayed proof",
            dpop_req("GET", "/fhir/Patient", &t, Some(&good), "DPoP"),
        ),
        (
            "no proof",
            dpop_req("GET", "/fhir/Patient", &t, None, "DPoP"),
        ),
        (
            "proof from another key",
            dpop_req("GET", "/fhir/Patient", &t, Some(&foreign), "DPoP"),
        ),
        (
            "proof for another path",
            dpop_req(
                "GET",
                "/fhir/Observation",
                &t,
                Some(&proof("GET", "https://ehr.example/fhir/Patient")),
                "DPoP",
            ),
        ),
        (
            "proof for another method",
            dpop_req(
                "POST",
                "/fhir/Patient",
                &t,
                Some(&proof("GET", "https://ehr.example/fhir/Patient")),
                "DPoP",
            ),
        ),
        (
            "proof for another origin",
            dpop_req(
                "GET",
                "/fhir/Patient",
                &t,
                Some(&proof("GET", "https://evil.example/fhir/Patient")),
                "DPoP",
            ),
        ),
        (
            "bound token downgraded to Bearer",
            dpop_req(
                "GET",
                "/fhir/Patient",
                &t,
                Some(&proof("GET", "https://ehr.example/fhir/Patient")),
                "Bearer",
            ),
        ),
    ];
    for (name, r) in cases {
        let (resp, calls) = run(layer.clone(), r).await;
        assert_eq!(
            (resp.status(), calls),
            (StatusCode::UNAUTHORIZED, 0),
            "{name}"
        );
    }
    // Two DPoP headers.
    let p1 = proof("GET", "https://ehr.example/fhir/Patient");
    let r = Request::builder()
        .uri("/fhir/Patient")
        .header("authorization", format!("DPoP {t}"))
        .header("dpop", &p1)
        .header("dpop", &p1)
        .body(())
        .unwrap();
    assert_eq!(run(layer.clone(), r).await.1, 0);

    // Without a configured origin, key-bound tokens fail closed even with
    // a valid proof.
    let no_origin = JwtSvidLayer::new("ehr-fhir", f.bundles.clone());
    let r = dpop_req(
        "GET",
        "/fhir/Patient",
        &t,
        Some(&proof("GET", "https://ehr.example/fhir/Patient")),
        "DPoP",
    );
    assert_eq!(run(no_origin, r).await.1, 0);

    // Unbound tokens keep working through a proof-enabled layer, with
    // either scheme.
    let plain = f
        .signer
        .sign(&claims(AGENT, "ehr-fhir", AssuranceLevel::Al1))
        .unwrap();
    assert_eq!(run(layer.clone(), req(Some(&plain))).await.1, 1);
    assert_eq!(
        run(
            layer,
            dpop_req("GET", "/fhir/Patient", &plain, None, "DPoP")
        )
        .await
        .1,
        1
    );
}
