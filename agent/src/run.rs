//! `sigil-agent run`: configuration, node attestation, and the running
//! agent (cache synced from the server + Workload API).

use crate::audit::JsonLinesAudit;
use crate::cache::{AgentState, ServerIdentitySource, StoredSvid, p256_spki_der};
use crate::jwt_cache::JwtSvidCache;
use crate::node_client::NodeClient;
use crate::workload_api::{WorkloadApi, bind_socket};
use crate::workload_attest::{UnixAttestor, UnixAttestorConfig};
use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use sigil::bundle::{Bundle, X509Bundle};
use sigil::proto::node::v1 as pb;
use sigil::source::SharedBundles;
use sigil::{PrivateKey, TrustDomain, X509Svid};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Default Workload API socket.
pub const DEFAULT_SOCKET: &str = "/tmp/sigil-agent/public/api.sock";
/// Default data dir (keys, cache): private to the agent's user.
pub const DEFAULT_DATA_DIR: &str = "/tmp/sigil-agent/data";

/// `sigil-agent run` flags. Every option can also be set in the TOML file
/// given with `--config` (same names, `_` for `-`); flags win.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// TOML configuration file (see agent/agent.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The server's node API address.
    #[arg(long, value_name = "HOST:PORT")]
    pub server: Option<String>,
    /// Trust domain of the server (needed on first start; remembered).
    #[arg(long, value_name = "NAME")]
    pub trust_domain: Option<String>,
    /// One-time join token from `sigil token create` (first start only: the
    /// agent keeps its identity in the data dir).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "SIGIL_JOIN_TOKEN",
        hide_env_values = true
    )]
    pub join_token: Option<String>,
    /// The trust domain's CA bundle (PEM or SPIFFE bundle JSON, from
    /// `sigil bundle show`) used to authenticate the server on first start.
    /// Compare its SHA-256 with what `sigil token create` printed.
    #[arg(long, value_name = "FILE")]
    pub trust_bundle: Option<PathBuf>,
    /// Workload API Unix socket. Default /tmp/sigil-agent/public/api.sock.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Private directory for the agent's keys and cache (mode 0700).
    /// Default /tmp/sigil-agent/data.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Audit log (JSON lines). Default <data-dir>/audit.log.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// How often to sync with the server, e.g. 5s. Default 5s.
    #[arg(long, value_name = "DURATION")]
    pub sync_interval: Option<String>,
    /// Attest with the TPM behind this TCTI instead of a join token, e.g.
    /// device:/dev/tpmrm0 (the kernel resource manager) or
    /// swtpm:host=127.0.0.1,port=2321. The agent SVID's key then lives in
    /// the TPM, and a restart attests again without a token. Needs the
    /// `tpm` build feature. `--tpm` alone means device:/dev/tpmrm0.
    #[arg(long, value_name = "TCTI", num_args = 0..=1, default_missing_value = DEFAULT_TCTI)]
    pub tpm: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    server: Option<String>,
    trust_domain: Option<String>,
    join_token: Option<String>,
    trust_bundle: Option<PathBuf>,
    socket: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    audit_log: Option<PathBuf>,
    sync_interval: Option<String>,
    tpm: Option<String>,
}

/// Resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    server: String,
    trust_domain: Option<String>,
    join_token: Option<String>,
    trust_bundle: Option<PathBuf>,
    socket: PathBuf,
    data_dir: PathBuf,
    audit_log: PathBuf,
    sync_interval: Duration,
    #[cfg_attr(not(feature = "tpm"), allow(dead_code))]
    tpm: Option<String>,
}

fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| anyhow!("duration {s:?} needs a unit (ms, s, m, h)"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().with_context(|| format!("duration {s:?}"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => bail!("duration {s:?}: unit must be ms, s, m or h"),
    })
}

impl Config {
    /// Merges the file (if any) under the flags.
    pub fn resolve(args: RunArgs) -> Result<Self> {
        let file: FileConfig = match &args.config {
            Some(p) => toml::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("parsing {}", p.display()))?,
            None => FileConfig::default(),
        };
        let tpm = args.tpm.or(file.tpm);
        if cfg!(not(feature = "tpm")) && tpm.is_some() {
            bail!(
                "--tpm: this sigil-agent was built without TPM support (rebuild with `--features tpm`)"
            );
        }
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        Ok(Self {
            server: args
                .server
                .or(file.server)
                .ok_or_else(|| anyhow!("--server HOST:PORT is required"))?,
            trust_domain: args.trust_domain.or(file.trust_domain),
            join_token: args.join_token.or(file.join_token),
            trust_bundle: args.trust_bundle.or(file.trust_bundle),
            socket: args
                .socket
                .or(file.socket)
                .unwrap_or_else(|| DEFAULT_SOCKET.into()),
            audit_log: args
                .audit_log
                .or(file.audit_log)
                .unwrap_or_else(|| data_dir.join("audit.log")),
            sync_interval: parse_duration(
                args.sync_interval
                    .or(file.sync_interval)
                    .as_deref()
                    .unwrap_or("5s"),
            )?,
            data_dir,
            tpm,
        })
    }
}

/// Makes `dir` private (0700). Missing parents get ordinary permissions:
/// they may also lead to the public Workload API socket.
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", dir.display()))?;
    Ok(())
}

/// The trust domain and the server-authenticating bundle of a first start:
/// `--trust-domain` and `--trust-bundle` (no trust on first use).
fn first_start_trust(cfg: &Config) -> Result<(TrustDomain, Arc<SharedBundles>)> {
    let td_name = cfg
        .trust_domain
        .as_deref()
        .ok_or_else(|| anyhow!("first start needs --trust-domain"))?;
    let td = TrustDomain::new(td_name).context("--trust-domain")?;
    let bundle_path = cfg.trust_bundle.as_ref().ok_or_else(|| {
        anyhow!("first start needs --trust-bundle FILE to authenticate the server (no trust on first use)")
    })?;
    let bytes =
        std::fs::read(bundle_path).with_context(|| format!("reading {}", bundle_path.display()))?;
    let bundle = Bundle::parse_any(td.clone(), &bytes)
        .with_context(|| format!("trust bundle {}", bundle_path.display()))?;
    if bundle.x509.authorities().is_empty() {
        bail!(
            "trust bundle {} holds no current CA certificate",
            bundle_path.display()
        );
    }
    let trust = Arc::new(SharedBundles::new(
        [Bundle {
            x509: X509Bundle::from_ders(td.clone(), bundle.x509.authorities().to_vec())?,
            ..Bundle::empty(td.clone())
        }]
        .into_iter()
        .collect(),
    ));
    Ok((td, trust))
}

/// The TCTI of `--tpm` without a value: the kernel's TPM resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// Attests with a join token and returns the initial state.
pub async fn attest_join_token(cfg: &Config) -> Result<AgentState> {
    let token = cfg.join_token.as_deref().ok_or_else(|| {
        anyhow!("this agent has no identity yet: pass --join-token (from `sigil token create`)")
    })?;
    let (td, trust) = first_start_trust(cfg)?;
    let client = NodeClient::new(&cfg.server, &td, trust, None)?;
    let key = PrivateKey::generate_p256()?;
    let spki = p256_spki_der(&key.public_key_sec1()?);
    let resp = client
        .api()
        .attest(pb::AttestRequest {
            method: Some(pb::attest_request::Method::JoinToken(
                pb::JoinTokenAttestation {
                    token: token.to_owned(),
                },
            )),
            public_key: spki,
        })
        .await
        .map_err(|s| anyhow!("attestation refused: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    let Some(pb::attest_response::Result::Svid(svid)) = resp.result else {
        bail!("server answered attestation without an agent SVID");
    };
    let agent = X509Svid::new(svid.cert_chain.into_iter().map(Into::into).collect(), key)
        .context("agent SVID from the server")?;
    // The bundle the server sends must parse for our trust domain.
    Bundle::from_spiffe_json(td.clone(), resp.bundle.as_bytes()).context("server bundle")?;
    tracing::info!(agent_id = %agent.spiffe_id(), assurance = %svid.assurance_level, "attested with a join token");
    Ok(AgentState {
        trust_domain: td.name().to_owned(),
        agent_id: agent.spiffe_id().to_string(),
        assurance: svid.assurance_level,
        method: "join_token".into(),
        agent_svid: StoredSvid::from_svid(&agent),
        bundle: resp.bundle,
        revision: 0,
        entries: Default::default(),
        svids: Default::default(),
        bound: Default::default(),
    })
}

/// The state of a join-token agent: from the data dir, or from attesting
/// with the join token on the first start.
async fn join_token_state(cfg: &Config) -> Result<AgentState> {
    Ok(
        match AgentState::load(&cfg.data_dir).map_err(|e| anyhow!(e))? {
            Some(s) if s.method == "tpm" => bail!(
                "the identity in {} is bound to a TPM: pass --tpm TCTI",
                cfg.data_dir.display()
            ),
            Some(s) => {
                tracing::info!(agent_id = %s.agent_id, "resuming with the identity in the data dir");
                s
            }
            None => {
                let s = attest_join_token(cfg).await?;
                s.save(&cfg.data_dir).context("saving the agent state")?;
                s
            }
        },
    )
}

/// The state of a TPM agent and its attestor. The agent key is loaded from
/// (or created in) the data dir. On the first start the node attests with
/// the TPM; on a restart the stored state is served at once and the first
/// sync attests again (no token: the TPM is the credential).
#[cfg(feature = "tpm")]
async fn tpm_state(
    cfg: &Config,
    tcti: &str,
) -> Result<(
    AgentState,
    Arc<dyn crate::cache::Reattestor>,
    Arc<dyn crate::bound_keys::WorkloadKeyHolder>,
)> {
    use crate::tpm::{Tpm, TpmNodeAttestor};
    let (tcti_owned, dir) = (tcti.to_owned(), cfg.data_dir.clone());
    let (tpm, key) = tokio::task::spawn_blocking(move || {
        let tpm = Tpm::open(&tcti_owned)?;
        let key = tpm.load_or_create_agent_key(&dir)?;
        Ok::<_, crate::tpm::TpmError>((tpm, key))
    })
    .await
    .context("TPM task")??;
    match AgentState::load(&cfg.data_dir).map_err(|e| anyhow!(e))? {
        Some(mut s) => {
            if s.method != "tpm" {
                bail!(
                    "the identity in {} came from a {} attestation; TPM attestation needs its own --data-dir",
                    cfg.data_dir.display(),
                    s.method
                );
            }
            let td = s.td().map_err(|e| anyhow!(e))?;
            let attestor = TpmNodeAttestor::new(tpm, key, &cfg.server, td).await?;
            if attestor.agent_id().as_str() != s.agent_id {
                bail!(
                    "the identity in {} ({}) is not this TPM's ({})",
                    cfg.data_dir.display(),
                    s.agent_id,
                    attestor.agent_id()
                );
            }
            tracing::info!(agent_id = %s.agent_id, "resuming with the identity in the data dir; attesting again with the TPM");
            s.agent_svid.refresh_at = 0;
            let keys = Arc::new(attestor.workload_keys());
            Ok((s, Arc::new(attestor), keys))
        }
        None => {
            let (td, trust) = first_start_trust(cfg)?;
            let attestor = TpmNodeAttestor::new(tpm, key, &cfg.server, td.clone()).await?;
            let done = attestor.attest(trust).await?;
            Bundle::from_spiffe_json(td.clone(), done.bundle.as_bytes())
                .context("server bundle")?;
            tracing::info!(agent_id = %done.agent_id, assurance = %done.assurance_level, "attested with the TPM");
            let s = AgentState {
                trust_domain: td.name().to_owned(),
                agent_id: done.agent_id.to_string(),
                assurance: done.assurance_level,
                method: "tpm".into(),
                agent_svid: StoredSvid::from_external_key(&done.svid.chain, done.svid.not_after),
                bundle: done.bundle,
                revision: 0,
                entries: Default::default(),
                svids: Default::default(),
                bound: Default::default(),
            };
            s.save(&cfg.data_dir).context("saving the agent state")?;
            let keys = Arc::new(attestor.workload_keys());
            Ok((s, Arc::new(attestor), keys))
        }
    }
}

/// Runs the agent until Ctrl-C / SIGTERM.
pub async fn run(args: RunArgs) -> Result<()> {
    let cfg = Config::resolve(args)?;
    private_dir(&cfg.data_dir)?;
    let (state, reattestor, keys) = match &cfg.tpm {
        None => (join_token_state(&cfg).await?, None, None),
        #[cfg(feature = "tpm")]
        Some(tcti) => {
            let (state, attestor, keys) = tpm_state(&cfg, tcti).await?;
            (state, Some(attestor), Some(keys))
        }
        #[cfg(not(feature = "tpm"))]
        Some(_) => bail!("--tpm: this sigil-agent was built without TPM support"),
    };
    let source = ServerIdentitySource::with_reattestor(
        &cfg.server,
        state,
        cfg.data_dir.clone(),
        reattestor,
        keys,
    )
    .map_err(|e| anyhow!(e))?;
    let sync = tokio::spawn(source.clone().run(cfg.sync_interval));
    let audit = Arc::new(
        JsonLinesAudit::append_to(&cfg.audit_log)
            .with_context(|| format!("audit log {}", cfg.audit_log.display()))?,
    );
    let api = WorkloadApi::new(
        Arc::new(JwtSvidCache::new(source)),
        Arc::new(UnixAttestor::new(UnixAttestorConfig::default())),
        audit,
    );
    let listener = bind_socket(&cfg.socket)
        .with_context(|| format!("Workload API socket {}", cfg.socket.display()))?;
    tracing::info!(socket = %cfg.socket.display(), "Workload API listening");
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
    };
    let result = api.serve(listener, shutdown).await;
    sync.abort();
    let _ = std::fs::remove_file(&cfg.socket);
    result.context("Workload API")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_config_parses_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let sample = dir.path().join("agent.toml");
        std::fs::write(&sample, include_str!("../agent.toml")).unwrap();
        let cfg = Config::resolve(RunArgs {
            config: Some(sample.clone()),
            socket: Some("/tmp/other.sock".into()),
            ..RunArgs::default()
        })
        .unwrap();
        assert_eq!(cfg.server, "127.0.0.1:8081");
        assert_eq!(cfg.socket, PathBuf::from("/tmp/other.sock"));
        assert_eq!(cfg.sync_interval, Duration::from_secs(5));
        assert_eq!(
            cfg.audit_log,
            PathBuf::from("/tmp/sigil-agent/data/audit.log")
        );

        // Unknown keys and bad durations are refused.
        std::fs::write(&sample, "server = \"a:1\"\nsevrer = \"typo\"\n").unwrap();
        assert!(
            Config::resolve(RunArgs {
                config: Some(sample.clone()),
                ..RunArgs::default()
            })
            .is_err()
        );
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        // No server anywhere.
        assert!(Config::resolve(RunArgs::default()).is_err());
    }

    #[test]
    fn tpm_flag_needs_the_tpm_feature() {
        let r = Config::resolve(RunArgs {
            server: Some("127.0.0.1:1".into()),
            tpm: Some("device:/dev/tpmrm0".into()),
            ..RunArgs::default()
        });
        if cfg!(feature = "tpm") {
            assert_eq!(r.unwrap().tpm.as_deref(), Some("device:/dev/tpmrm0"));
        } else {
            let e = format!("{:#}", r.unwrap_err());
            assert!(e.contains("built without TPM support"), "{e}");
        }
    }
}

#[cfg(test)]
mod flag_tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn tpm_flag_alone_means_the_kernel_resource_manager() {
        let c = Cli::try_parse_from(["x", "--tpm", "--server", "h:1"]).unwrap();
        assert_eq!(c.run.tpm.as_deref(), Some(DEFAULT_TCTI));
        assert_eq!(c.run.server.as_deref(), Some("h:1"));
        let c = Cli::try_parse_from(["x", "--tpm", "swtpm:host=127.0.0.1,port=2321"]).unwrap();
        assert_eq!(c.run.tpm.as_deref(), Some("swtpm:host=127.0.0.1,port=2321"));
        let c = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(c.run.tpm, None);
    }
}
