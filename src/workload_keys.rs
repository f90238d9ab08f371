//! Client side of the agent's workload key service (`sigil.workload.v1`):
//! workloads whose registration entry binds their key to the TPM
//! (`key_binding = "tpm"`) get their certificate chain here and have the
//! agent sign with the key, which never leaves the TPM.
//!
//! ```text
//! let mut keys = WorkloadKeysClient::connect_env().await?;
//! let svid = keys.fetch_x509_svids().await?.remove(0);       // chain, no key
//! let signer = TpmKeySigner::start(Endpoint::from_env()?, &svid)?; // signs via the agent
//! let tls = sigil::tls::mtls_client_config_with_signer(svid.chain(), signer.signing_key(), bundles, authorizer)?;
//! let jwt = keys.fetch_bound_jwt_svid("ehr-fhir", None).await?;   // cnf-bound token
//! let proof = sigil::validate::pop::build_proof(&signer, &jwt.token, &request, now)?;
//! ```

use crate::endpoint::Endpoint;
use crate::proto::keys::v1 as pb;
use crate::validate::pop::{ProofError, ProofKey};
use crate::workload::{ClientError, SECURITY_HEADER, connect_channel};
use pb::workload_keys_client::WorkloadKeysClient as Grpc;
use rustls_pki_types::CertificateDer;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;

fn request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

/// A TPM-bound X.509-SVID: the certificates, no private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundX509Svid {
    spiffe_id: crate::SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    bundle: Vec<CertificateDer<'static>>,
    public_sec1: Vec<u8>,
    expires_at: i64,
}

impl BoundX509Svid {
    fn from_pb(s: pb::BoundX509Svid) -> Result<Self, ClientError> {
        let spiffe_id = crate::SpiffeId::parse(&s.spiffe_id)
            .map_err(|e| ClientError::InvalidResponse(format!("spiffe_id: {e}")))?;
        let chain: Vec<CertificateDer<'static>> =
            s.cert_chain.into_iter().map(CertificateDer::from).collect();
        let leaf = chain
            .first()
            .ok_or_else(|| ClientError::InvalidResponse("empty certificate chain".into()))?;
        let public_sec1 = leaf_p256_point(leaf)
            .ok_or_else(|| ClientError::InvalidResponse("leaf key is not ECDSA P-256".into()))?;
        let bundle = crate::bundle::split_der_certs(&s.bundle)
            .map_err(|e| ClientError::InvalidResponse(format!("bundle: {e}")))?;
        Ok(Self {
            spiffe_id,
            chain,
            bundle,
            public_sec1,
            expires_at: s.expires_at,
        })
    }
    /// The SPIFFE ID.
    pub fn spiffe_id(&self) -> &crate::SpiffeId {
        &self.spiffe_id
    }
    /// DER certificates, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }
    /// The trust domain's CA certificates.
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }
    /// The leaf's public key (uncompressed SEC1), which lives in the TPM.
    pub fn public_sec1(&self) -> &[u8] {
        &self.public_sec1
    }
    /// notAfter of the leaf, Unix seconds.
    pub fn expires_at(&self) -> i64 {
        self.expires_at
    }
}

fn leaf_p256_point(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let spki = cert.public_key();
    let p = spki.subject_public_key.data.to_vec();
    (p.len() == 65 && p[0] == 4).then_some(p)
}

/// A JWT-SVID bound to a TPM key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundJwtSvid {
    /// Whose.
    pub spiffe_id: String,
    /// The token (compact JWS). Present it as `Authorization: DPoP <token>`
    /// with a `DPoP` proof header.
    pub token: String,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
    /// The key it is bound to (uncompressed SEC1).
    pub public_sec1: Vec<u8>,
}

/// A client of the agent's workload key service.
#[derive(Debug, Clone)]
pub struct WorkloadKeysClient {
    inner: Grpc<Channel>,
}

impl WorkloadKeysClient {
    /// Connects to the endpoint in `SPIFFE_ENDPOINT_SOCKET`.
    pub async fn connect_env() -> Result<Self, ClientError> {
        Self::connect(&Endpoint::from_env()?).await
    }

    /// Connects to `endpoint` (the agent's Workload API socket).
    pub async fn connect(endpoint: &Endpoint) -> Result<Self, ClientError> {
        Ok(Self {
            inner: Grpc::new(connect_channel(endpoint).await?),
        })
    }

    /// The caller's TPM-bound X.509-SVIDs, now.
    pub async fn fetch_x509_svids(&mut self) -> Result<Vec<BoundX509Svid>, ClientError> {
        let mut s = self.watch_x509_svids().await?;
        s.next().await.ok_or(ClientError::StreamEnded)?
    }

    /// The stream: a full list now and after every rotation.
    pub async fn watch_x509_svids(
        &mut self,
    ) -> Result<impl Stream<Item = Result<Vec<BoundX509Svid>, ClientError>> + use<>, ClientError>
    {
        let stream = self
            .inner
            .fetch_x509_svids(request(pb::FetchX509SvidsRequest {}))
            .await
            .map_err(ClientError::Status)?
            .into_inner();
        Ok(stream.map(|m| {
            m.map_err(ClientError::Status)?
                .svids
                .into_iter()
                .map(BoundX509Svid::from_pb)
                .collect()
        }))
    }

    /// Signs a SHA-256 digest with the TPM key of `spiffe_id` (one of the
    /// caller's TPM-bound identities): `r || s`.
    pub async fn sign_digest(
        &mut self,
        spiffe_id: &str,
        digest: &[u8; 32],
    ) -> Result<[u8; 64], ClientError> {
        let r = self
            .inner
            .sign_digest(request(pb::SignDigestRequest {
                spiffe_id: spiffe_id.to_owned(),
                digest: digest.to_vec(),
            }))
            .await
            .map_err(ClientError::Status)?
            .into_inner();
        <[u8; 64]>::try_from(r.signature.as_slice())
            .map_err(|_| ClientError::InvalidResponse("signature is not 64 bytes".into()))
    }

    /// A JWT-SVID for `audience`, bound to the TPM key of `spiffe_id` (or
    /// of the caller's first TPM-bound identity).
    pub async fn fetch_bound_jwt_svid(
        &mut self,
        audience: &str,
        spiffe_id: Option<&str>,
    ) -> Result<BoundJwtSvid, ClientError> {
        let r = self
            .inner
            .fetch_bound_jwt_svid(request(pb::FetchBoundJwtSvidRequest {
                spiffe_id: spiffe_id.unwrap_or_default().to_owned(),
                audience: audience.to_owned(),
            }))
            .await
            .map_err(ClientError::Status)?
            .into_inner();
        Ok(BoundJwtSvid {
            spiffe_id: r.spiffe_id,
            token: r.token,
            expires_at: r.expires_at,
            public_sec1: r.public_key,
        })
    }
}

type Job = (
    [u8; 32],
    std::sync::mpsc::SyncSender<Result<[u8; 64], ClientError>>,
);

/// Signs with a TPM-bound key through the agent, from synchronous code
/// (rustls handshakes, DPoP proofs): a background thread holds the gRPC
/// connection; each signature is one round trip on the local socket.
#[derive(Debug, Clone)]
pub struct TpmKeySigner {
    jobs: std::sync::mpsc::SyncSender<Job>,
    spiffe_id: String,
    public_sec1: Vec<u8>,
}

impl TpmKeySigner {
    /// Starts the signer for `svid`'s key on the agent at `endpoint`.
    pub fn start(endpoint: Endpoint, svid: &BoundX509Svid) -> Result<Self, ClientError> {
        Self::for_key(
            endpoint,
            svid.spiffe_id.to_string(),
            svid.public_sec1.clone(),
        )
    }

    /// Starts a signer for the TPM key of `spiffe_id` whose public key is
    /// `public_sec1`.
    pub fn for_key(
        endpoint: Endpoint,
        spiffe_id: String,
        public_sec1: Vec<u8>,
    ) -> Result<Self, ClientError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(64);
        let id = spiffe_id.clone();
        std::thread::Builder::new()
            .name("sigil-tpm-signer".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    let mut client: Option<WorkloadKeysClient> = None;
                    while let Ok((digest, reply)) = rx.recv() {
                        if client.is_none() {
                            client = WorkloadKeysClient::connect(&endpoint).await.ok();
                        }
                        let result = match client.as_mut() {
                            Some(c) => c.sign_digest(&id, &digest).await,
                            None => Err(ClientError::Connect("agent unreachable".into())),
                        };
                        if result.is_err() {
                            // Reconnect on the next request.
                            client = None;
                        }
                        let _ = reply.send(result);
                    }
                });
            })
            .map_err(|e| ClientError::Connect(format!("signer thread: {e}")))?;
        Ok(Self {
            jobs: tx,
            spiffe_id,
            public_sec1,
        })
    }

    /// Signs a SHA-256 digest: `r || s`. Blocks the calling thread for one
    /// local round trip.
    pub fn sign_digest(&self, digest: [u8; 32]) -> Result<[u8; 64], ClientError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.jobs
            .send((digest, tx))
            .map_err(|_| ClientError::Connect("signer thread stopped".into()))?;
        rx.recv()
            .map_err(|_| ClientError::Connect("signer thread stopped".into()))?
    }

    /// The SPIFFE ID whose key this signs with.
    pub fn spiffe_id(&self) -> &str {
        &self.spiffe_id
    }

    /// As a rustls signing key (ECDSA P-256 SHA-256), for TLS with the
    /// TPM-bound X.509-SVID.
    #[cfg(feature = "tls")]
    pub fn signing_key(&self) -> std::sync::Arc<dyn rustls::sign::SigningKey> {
        std::sync::Arc::new(self.clone())
    }
}

impl ProofKey for TpmKeySigner {
    fn public_sec1(&self) -> Vec<u8> {
        self.public_sec1.clone()
    }
    fn sign_es256(&self, message: &[u8]) -> Result<Vec<u8>, ProofError> {
        let digest = sha256(message);
        self.sign_digest(digest)
            .map(|s| s.to_vec())
            .map_err(|e| ProofError::Signing(e.to_string()))
    }
}

fn sha256(message: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// `r || s` (64 bytes) as a DER ECDSA-Sig-Value, the form TLS carries.
pub fn fixed_to_der(sig: &[u8; 64]) -> Vec<u8> {
    fn int(v: &[u8]) -> Vec<u8> {
        let n = v.iter().take_while(|b| **b == 0).count();
        let v = &v[n.min(v.len() - 1)..];
        let mut out = vec![0x02];
        let pad = v[0] & 0x80 != 0;
        out.push((v.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
        out
    }
    let mut body = int(&sig[..32]);
    body.extend_from_slice(&int(&sig[32..]));
    let mut out = vec![0x30, body.len() as u8];
    out.extend_from_slice(&body);
    out
}

#[cfg(feature = "tls")]
impl rustls::sign::SigningKey for TpmKeySigner {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&rustls::SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(self.clone()) as Box<dyn rustls::sign::Signer>)
    }
    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::ECDSA
    }
}

#[cfg(feature = "tls")]
impl rustls::sign::Signer for TpmKeySigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let sig = self
            .sign_digest(sha256(message))
            .map_err(|e| rustls::Error::General(format!("TPM signing via the agent: {e}")))?;
        Ok(fixed_to_der(&sig))
    }
    fn scheme(&self) -> rustls::SignatureScheme {
        rustls::SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_signatures_verify_like_fixed_ones() {
        use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair};
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let kp = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        // Enough signatures that some r/s have a high bit or a leading zero.
        for i in 0..200u32 {
            let msg = i.to_be_bytes();
            let sig = kp.sign(&rng, &msg).unwrap();
            let fixed: [u8; 64] = sig.as_ref().try_into().unwrap();
            let der = fixed_to_der(&fixed);
            signature::UnparsedPublicKey::new(
                &signature::ECDSA_P256_SHA256_ASN1,
                kp.public_key().as_ref(),
            )
            .verify(&msg, &der)
            .unwrap();
        }
    }
}
