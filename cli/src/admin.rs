//! Admin commands: talk to a Sigil server over its admin Unix socket.
//!
//! `sigil [--admin-socket PATH] token|entry|agent|bundle …`. The socket
//! comes from `--admin-socket`, else `$SIGIL_ADMIN_SOCKET`, else
//! [`DEFAULT_ADMIN_SOCKET`]. Every command takes `--output json`.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use sigil::proto::admin::v1 as pb;
use std::path::{Path, PathBuf};
use tonic::transport::{Channel, Endpoint};

/// Where the server's admin socket is when nothing else says.
pub const DEFAULT_ADMIN_SOCKET: &str = "/var/lib/sigil-server/admin.sock";

/// Output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    #[default]
    Text,
    /// One JSON document on stdout.
    Json,
}

/// `--output`, shared by every admin command.
#[derive(Debug, Clone, Args)]
pub struct OutputArg {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// Admin commands (flattened into the top level of `sigil`).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// One-time join tokens for agents.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// Attested agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// The trust bundle.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Signing keys: show them, and rotate the JWT key or X.509 CA by hand.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// TPM node attestation: the endorsement-key allow-list.
    #[command(subcommand)]
    Tpm(TpmCommand),
}

/// `sigil tpm …`
#[derive(Debug, Subcommand)]
pub enum TpmCommand {
    /// Allow the TPM with this EK hash to attest (assurance al2). The hash
    /// is what `sigil-agent tpm ek-hash` prints on that node.
    Allow {
        /// Lowercase hex SHA-256 of the EK's SubjectPublicKeyInfo.
        ek_hash: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Take an EK hash off the allow-list (agents already attested keep
    /// their SVID until it expires: `sigil agent evict` them too).
    Remove {
        /// Lowercase hex SHA-256 of the EK's SubjectPublicKeyInfo.
        ek_hash: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// List the allowed EK hashes.
    List {
        #[command(flatten)]
        out: OutputArg,
    },
}

/// Which signing key a `keys` command acts on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum KeyKind {
    /// The ES256 JWT signing keys.
    #[default]
    Jwt,
    /// The X.509 CAs.
    X509,
}

/// `--kind`, for the rotation commands.
#[derive(Debug, Clone, Args)]
pub struct KindArg {
    /// Which key: jwt (the JWT signing key) or x509 (the X.509 CA).
    #[arg(long, value_enum, default_value_t = KeyKind::Jwt)]
    kind: KeyKind,
}

/// `sigil keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List the X.509 CAs and the published JWT keys with their states.
    Show {
        #[command(flatten)]
        out: OutputArg,
    },
    /// Publish a next key in the bundle (it does not sign yet).
    Prepare {
        #[command(flatten)]
        kind: KindArg,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Make the prepared key sign; the old one is retired but stays
    /// published until what it signed has expired.
    Activate {
        #[command(flatten)]
        kind: KindArg,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Remove a retired or prepared key from the bundle now: what it
    /// signed stops validating.
    Revoke {
        /// Key ID (JWT kid, or the X.509 CA's hex serial).
        id: String,
        #[command(flatten)]
        kind: KindArg,
        #[command(flatten)]
        out: OutputArg,
    },
}

/// `sigil token …`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a one-time join token; prints it with the agent ID it yields
    /// and the SHA-256 of the CA bundle PEM the agent should trust.
    Create {
        /// Validity, e.g. 10m, 1h (default 10m).
        #[arg(long, default_value = "10m", value_name = "DURATION")]
        ttl: String,
        #[command(flatten)]
        out: OutputArg,
    },
}

/// `sigil entry …`
#[derive(Debug, Subcommand)]
pub enum EntryCommand {
    /// Create a registration entry.
    Create {
        #[command(flatten)]
        spec: Box<EntrySpec>,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Replace an entry's fields (all of them, validated like create).
    Update {
        /// Entry ID.
        id: String,
        #[command(flatten)]
        spec: Box<EntrySpec>,
        #[command(flatten)]
        out: OutputArg,
    },
    /// List entries.
    List {
        #[command(flatten)]
        out: OutputArg,
    },
    /// Show one entry.
    Show {
        /// Entry ID.
        id: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Delete an entry.
    Delete {
        /// Entry ID.
        id: String,
        #[command(flatten)]
        out: OutputArg,
    },
}

/// The fields of an entry, for create and update.
#[derive(Debug, Clone, Args)]
pub struct EntrySpec {
    /// The workload's SPIFFE ID.
    #[arg(long, value_name = "ID")]
    spiffe_id: String,
    /// The agent that serves it (spiffe://<td>/agent/…).
    #[arg(long, value_name = "AGENT_ID")]
    parent_id: String,
    /// Workload selector `type:value`, e.g. unix:uid:1000; repeat; all must match.
    #[arg(long = "selector", value_name = "TYPE:VALUE", required = true)]
    selectors: Vec<String>,
    /// Audience (tool) a JWT-SVID may be minted for; repeat. None: no JWTs.
    #[arg(long = "audience", value_name = "AUD")]
    audiences: Vec<String>,
    /// X.509-SVID lifetime, e.g. 1h (default: the server's).
    #[arg(long, value_name = "DURATION")]
    x509_ttl: Option<String>,
    /// JWT-SVID lifetime, e.g. 15m (default: the server's, max 24h).
    #[arg(long, value_name = "DURATION")]
    jwt_ttl: Option<String>,
    /// DNS SAN for the X.509-SVID; repeat.
    #[arg(long = "dns-name", value_name = "NAME")]
    dns_names: Vec<String>,
    /// Minimum node assurance level: al1, al2 or al3.
    #[arg(long, value_name = "LEVEL")]
    min_assurance: Option<String>,
    /// Allow an entry whose only selector is unix:uid:0.
    #[arg(long)]
    allow_root: bool,
    /// The entry stops yielding SVIDs this long from now, e.g. 30d.
    #[arg(long, value_name = "DURATION")]
    expires_in: Option<String>,
    /// `tpm`: the workload's key is created in the agent's TPM and never
    /// leaves it; the Workload API hands out no private key for this entry
    /// and its JWT-SVIDs are bound to the key (cnf). Needs a TPM agent.
    #[arg(long, value_name = "BINDING", value_parser = ["tpm"])]
    key_binding: Option<String>,
}

impl EntrySpec {
    fn into_request(self) -> Result<pb::CreateEntryRequest> {
        let ttl = |s: Option<String>| s.map(|s| parse_duration(&s)).transpose();
        Ok(pb::CreateEntryRequest {
            spiffe_id: self.spiffe_id,
            parent_id: self.parent_id,
            selectors: self.selectors,
            audiences: self.audiences,
            x509_ttl_seconds: ttl(self.x509_ttl)?.unwrap_or(0),
            jwt_ttl_seconds: ttl(self.jwt_ttl)?.unwrap_or(0),
            dns_names: self.dns_names,
            min_assurance: self.min_assurance.unwrap_or_default(),
            key_binding: self.key_binding.unwrap_or_default(),
            allow_root: self.allow_root,
            expires_at: match ttl(self.expires_in)? {
                Some(d) => {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .context("system clock before 1970")?
                        .as_secs() as i64
                        + d
                }
                None => 0,
            },
        })
    }
}

/// `sigil agent …`
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List attested agents.
    List {
        #[command(flatten)]
        out: OutputArg,
    },
    /// Show one agent.
    Show {
        /// Agent SPIFFE ID.
        spiffe_id: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Evict an agent: its SVID stops working at once, on open connections too.
    Evict {
        /// Agent SPIFFE ID.
        spiffe_id: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Ban an agent: like evict, and final.
    Ban {
        /// Agent SPIFFE ID.
        spiffe_id: String,
        #[command(flatten)]
        out: OutputArg,
    },
}

/// Bundle formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// CA certificates, PEM.
    Pem,
    /// JWT keys, plain JWKS.
    Jwks,
    /// SPIFFE bundle (JWKS with `use`).
    Spiffe,
}

/// `sigil bundle …`
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print the trust domain's bundle.
    Show {
        /// Format.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        #[command(flatten)]
        out: OutputArg,
    },
}

/// Parses `90`, `30s`, `10m`, `1h`, `7d` into seconds.
pub fn parse_duration(s: &str) -> Result<i64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86400),
        _ => (s, 1),
    };
    let n: i64 = num
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .with_context(|| format!("invalid duration {s:?} (use e.g. 30s, 10m, 1h, 7d)"))?;
    n.checked_mul(mult)
        .with_context(|| format!("duration {s:?} is too large"))
}

async fn connect(path: &Path) -> Result<pb::admin_client::AdminClient<Channel>> {
    let p = path.to_path_buf();
    let ch = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = p.clone();
            async move {
                let s = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .with_context(|| format!("cannot connect to admin socket {}", path.display()))?;
    Ok(pb::admin_client::AdminClient::new(ch))
}

fn status(s: tonic::Status) -> anyhow::Error {
    let code = format!("{:?}", s.code());
    anyhow::anyhow!("{}: {}", code, s.message())
}

fn entry_json(e: &pb::Entry) -> Value {
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "audiences": e.audiences,
        "x509_ttl_seconds": e.x509_ttl_seconds,
        "jwt_ttl_seconds": e.jwt_ttl_seconds,
        "dns_names": e.dns_names,
        "min_assurance": if e.min_assurance.is_empty() { Value::Null } else { e.min_assurance.clone().into() },
        "revision": e.revision,
        "created_at": e.created_at,
        "expires_at": if e.expires_at == 0 { Value::Null } else { e.expires_at.into() },
        "key_binding": if e.key_binding.is_empty() { Value::Null } else { e.key_binding.clone().into() },
    })
}

fn entry_text(e: &pb::Entry) -> String {
    let sel: Vec<String> = e
        .selectors
        .iter()
        .map(|s| format!("{}:{}", s.r#type, s.value))
        .collect();
    format!(
        "Entry ID      : {}\nSPIFFE ID     : {}\nParent ID     : {}\nSelectors     : {}\nAudiences     : {}\nX.509 TTL     : {}s\nJWT TTL       : {}s\nDNS names     : {}\nMin assurance : {}\nKey binding   : {}\nRevision      : {}\n",
        e.id,
        e.spiffe_id,
        e.parent_id,
        sel.join(", "),
        e.audiences.join(", "),
        e.x509_ttl_seconds,
        e.jwt_ttl_seconds,
        e.dns_names.join(", "),
        if e.min_assurance.is_empty() {
            "-"
        } else {
            &e.min_assurance
        },
        if e.key_binding.is_empty() {
            "-"
        } else {
            &e.key_binding
        },
        e.revision,
    )
}

fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "spiffe_id": a.spiffe_id,
        "status": a.status,
        "assurance_level": a.assurance_level,
        "attestation_method": a.attestation_method,
        "serial": a.serial,
        "expires_at": a.expires_at,
        "attested_at": a.attested_at,
    })
}

fn agent_text(a: &pb::Agent) -> String {
    format!(
        "SPIFFE ID : {}\nStatus    : {}\nAssurance : {}\nMethod    : {}\nSerial    : {}\nExpires   : {}\n",
        a.spiffe_id, a.status, a.assurance_level, a.attestation_method, a.serial, a.expires_at
    )
}

fn key_json(k: &pb::JwtKey) -> Value {
    json!({
        "kid": k.kid,
        "state": k.state,
        "created_at": k.created_at,
        "not_after": k.not_after,
        "retired_at": if k.retired_at == 0 { Value::Null } else { k.retired_at.into() },
    })
}

fn ca_json(a: &pb::X509Authority) -> Value {
    json!({
        "serial": a.serial,
        "state": a.state,
        "created_at": a.created_at,
        "not_after": a.not_after,
        "retired_at": if a.retired_at == 0 { Value::Null } else { a.retired_at.into() },
        "sha256": a.sha256,
        "upstream_sha256": if a.upstream_sha256.is_empty() { Value::Null } else { a.upstream_sha256.clone().into() },
    })
}

fn ca_text(a: &pb::X509Authority) -> String {
    let under = if a.upstream_sha256.is_empty() {
        String::new()
    } else {
        format!(", under upstream {}", a.upstream_sha256)
    };
    format!(
        "X.509 CA {} : {} (not after {}, sha256 {}{under})\n",
        a.serial, a.state, a.not_after, a.sha256
    )
}

fn key_text(k: &pb::JwtKey) -> String {
    format!(
        "JWT key {} : {} (not after {})\n",
        k.kid, k.state, k.not_after
    )
}

fn print(out: &OutputArg, j: Value, text: impl FnOnce() -> String) {
    match out.output {
        Output::Json => println!("{j}"),
        Output::Text => print!("{}", text()),
    }
}

/// Runs an admin command against the socket (flag, env, or default).
pub fn run(socket: Option<PathBuf>, cmd: Command) -> Result<()> {
    let socket = socket.unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run_async(&socket, cmd))
}

async fn run_async(socket: &Path, cmd: Command) -> Result<()> {
    // Validate arguments before connecting.
    if let Command::Token(TokenCommand::Create { ttl, .. }) = &cmd {
        parse_duration(ttl)?;
    }
    let mut c = connect(socket).await?;
    match cmd {
        Command::Token(TokenCommand::Create { ttl, out }) => {
            let r = c
                .create_join_token(pb::CreateJoinTokenRequest {
                    ttl_seconds: parse_duration(&ttl)?,
                })
                .await
                .map_err(status)?
                .into_inner();
            print(
                &out,
                json!({
                    "token": r.token,
                    "agent_id": r.agent_id,
                    "expires_at": r.expires_at,
                    "bundle_sha256": r.bundle_sha256,
                }),
                || {
                    format!(
                        "Token         : {}\nAgent ID      : {}\nExpires at    : {}\nBundle SHA-256: {}\n",
                        r.token, r.agent_id, r.expires_at, r.bundle_sha256
                    )
                },
            );
        }
        Command::Entry(EntryCommand::Create { spec, out }) => {
            let e = c
                .create_entry((*spec).into_request()?)
                .await
                .map_err(status)?
                .into_inner();
            print(&out, entry_json(&e), || entry_text(&e));
        }
        Command::Entry(EntryCommand::Update { id, spec, out }) => {
            let e = c
                .update_entry(pb::UpdateEntryRequest {
                    id,
                    entry: Some((*spec).into_request()?),
                })
                .await
                .map_err(status)?
                .into_inner();
            print(&out, entry_json(&e), || entry_text(&e));
        }
        Command::Entry(EntryCommand::List { out }) => {
            let r = c
                .list_entries(pb::ListEntriesRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print(
                &out,
                Value::Array(r.entries.iter().map(entry_json).collect()),
                || {
                    if r.entries.is_empty() {
                        return "No entries\n".into();
                    }
                    r.entries
                        .iter()
                        .map(entry_text)
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        Command::Entry(EntryCommand::Show { id, out }) => {
            let e = c
                .get_entry(pb::GetEntryRequest { id })
                .await
                .map_err(status)?
                .into_inner();
            print(&out, entry_json(&e), || entry_text(&e));
        }
        Command::Entry(EntryCommand::Delete { id, out }) => {
            let e = c
                .delete_entry(pb::DeleteEntryRequest { id })
                .await
                .map_err(status)?
                .into_inner();
            print(&out, entry_json(&e), || format!("Deleted entry {}\n", e.id));
        }
        Command::Agent(AgentCommand::List { out }) => {
            let r = c
                .list_agents(pb::ListAgentsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print(
                &out,
                Value::Array(r.agents.iter().map(agent_json).collect()),
                || {
                    if r.agents.is_empty() {
                        return "No agents\n".into();
                    }
                    r.agents
                        .iter()
                        .map(agent_text)
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        Command::Agent(AgentCommand::Show { spiffe_id, out }) => {
            let a = c
                .get_agent(pb::GetAgentRequest { spiffe_id })
                .await
                .map_err(status)?
                .into_inner();
            print(&out, agent_json(&a), || agent_text(&a));
        }
        Command::Agent(AgentCommand::Evict { spiffe_id, out }) => {
            let a = c
                .evict_agent(pb::GetAgentRequest { spiffe_id })
                .await
                .map_err(status)?
                .into_inner();
            print(&out, agent_json(&a), || {
                format!("Agent {} is {}\n", a.spiffe_id, a.status)
            });
        }
        Command::Agent(AgentCommand::Ban { spiffe_id, out }) => {
            let a = c
                .ban_agent(pb::GetAgentRequest { spiffe_id })
                .await
                .map_err(status)?
                .into_inner();
            print(&out, agent_json(&a), || {
                format!("Agent {} is {}\n", a.spiffe_id, a.status)
            });
        }
        Command::Tpm(TpmCommand::Allow { ek_hash, out }) => {
            let e = c
                .allow_tpm_ek(pb::TpmEkRequest { ek_hash })
                .await
                .map_err(status)?
                .into_inner();
            print(&out, tpm_ek_json(&e), || {
                format!("Allowed EK {}\nAgent ID: {}\n", e.ek_hash, e.agent_id)
            });
        }
        Command::Tpm(TpmCommand::Remove { ek_hash, out }) => {
            let e = c
                .remove_tpm_ek(pb::TpmEkRequest { ek_hash })
                .await
                .map_err(status)?
                .into_inner();
            print(&out, tpm_ek_json(&e), || {
                format!("Removed EK {}\n", e.ek_hash)
            });
        }
        Command::Tpm(TpmCommand::List { out }) => {
            let r = c
                .list_tpm_eks(pb::ListTpmEksRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print(
                &out,
                Value::Array(r.eks.iter().map(tpm_ek_json).collect()),
                || {
                    r.eks
                        .iter()
                        .map(|e| format!("{}  {}\n", e.ek_hash, e.agent_id))
                        .collect()
                },
            );
        }
        Command::Keys(KeysCommand::Show { out }) => {
            let r = c
                .list_keys(pb::ListKeysRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let cas: Vec<Value> = r.x509_authorities.iter().map(ca_json).collect();
            print(
                &out,
                json!({
                    "x509_authorities": cas,
                    "jwt_keys": r.jwt_keys.iter().map(key_json).collect::<Vec<_>>(),
                }),
                || {
                    let mut s = String::new();
                    for a in &r.x509_authorities {
                        s.push_str(&ca_text(a));
                    }
                    for k in &r.jwt_keys {
                        s.push_str(&key_text(k));
                    }
                    s
                },
            );
        }
        Command::Keys(KeysCommand::Prepare { kind, out }) if kind.kind == KeyKind::X509 => {
            let a = c
                .prepare_x509_ca(pb::PrepareX509CaRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print(&out, ca_json(&a), || ca_text(&a));
        }
        Command::Keys(KeysCommand::Activate { kind, out }) if kind.kind == KeyKind::X509 => {
            let a = c
                .activate_x509_ca(pb::ActivateX509CaRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print(&out, ca_json(&a), || ca_text(&a));
        }
        Command::Keys(KeysCommand::Revoke { id, kind, out }) if kind.kind == KeyKind::X509 => {
            let a = c
                .revoke_x509_ca(pb::RevokeX509CaRequest { serial: id })
                .await
                .map_err(status)?
                .into_inner();
            print(&out, ca_json(&a), || {
                format!("Revoked X.509 CA {}\n", a.serial)
            });
        }
        Command::Keys(KeysCommand::Prepare { out, .. }) => {
            let k = c
                .prepare_jwt_key(pb::PrepareJwtKeyRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print(&out, key_json(&k), || key_text(&k));
        }
        Command::Keys(KeysCommand::Activate { out, .. }) => {
            let k = c
                .activate_jwt_key(pb::ActivateJwtKeyRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print(&out, key_json(&k), || key_text(&k));
        }
        Command::Keys(KeysCommand::Revoke { id, out, .. }) => {
            let k = c
                .revoke_jwt_key(pb::RevokeJwtKeyRequest { kid: id })
                .await
                .map_err(status)?
                .into_inner();
            print(&out, key_json(&k), || {
                format!("Revoked JWT key {}\n", k.kid)
            });
        }
        Command::Bundle(BundleCommand::Show { format, out }) => {
            let b = c
                .get_bundle(pb::GetBundleRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let body = match format {
                BundleFormat::Pem => b.pem,
                BundleFormat::Jwks => b.jwks,
                BundleFormat::Spiffe => b.spiffe,
            };
            match out.output {
                Output::Json => {
                    let doc: Value = if format == BundleFormat::Pem {
                        json!({ "trust_domain": b.trust_domain, "pem": body })
                    } else {
                        serde_json::from_str(&body).context("server sent invalid JSON")?
                    };
                    println!("{doc}");
                }
                Output::Text => {
                    if body.is_empty() {
                        bail!("the bundle is empty");
                    }
                    print!("{body}");
                    if !body.ends_with('\n') {
                        println!();
                    }
                }
            }
        }
    }
    Ok(())
}

fn tpm_ek_json(e: &pb::TpmEk) -> Value {
    json!({
        "ek_hash": e.ek_hash,
        "agent_id": e.agent_id,
        "added_at": e.added_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m").unwrap(), 600);
        assert_eq!(parse_duration("24h").unwrap(), 86400);
        assert_eq!(parse_duration("45").unwrap(), 45);
        for bad in ["", "0", "-5m", "ten", "5w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
