//! Configuration: a TOML file and command-line flags; flags win.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// `sigil-server run` flags. Every option can also be set in the TOML file
/// given with `--config` (same names, with `_` for `-`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// TOML configuration file (see server/server.toml). Flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the database (sled) and, by default, the admin socket
    /// and audit log. Created with mode 0700 if missing.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Trust domain, e.g. example.org.
    #[arg(long, value_name = "NAME")]
    pub trust_domain: Option<String>,
    /// Node API address (gRPC over TLS 1.3). Default 127.0.0.1:8081.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<SocketAddr>,
    /// Admin API Unix socket (mode 0600). Default <data-dir>/admin.sock.
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// HTTP endpoint for the bundle, JWKS, OIDC discovery, /live, /ready
    /// and /metrics; HTTPS with --http-tls-cert/--http-tls-key. Default: off.
    #[arg(long, value_name = "HOST:PORT")]
    pub http_listen: Option<SocketAddr>,
    /// PEM certificate chain (a web-PKI certificate, leaf first) to serve
    /// the HTTP endpoint over HTTPS (TLS 1.2 and 1.3). Re-read when the file
    /// changes. Needs --http-tls-key.
    #[arg(long, value_name = "FILE", requires = "http_tls_key")]
    pub http_tls_cert: Option<PathBuf>,
    /// PEM private key of --http-tls-cert.
    #[arg(long, value_name = "FILE", requires = "http_tls_cert")]
    pub http_tls_key: Option<PathBuf>,
    /// PEM certificate of an upstream CA: the server's signing CAs are then
    /// intermediates under it, and the bundle holds this certificate.
    /// Needs --upstream-ca-key.
    #[arg(long, value_name = "FILE", requires = "upstream_ca_key")]
    pub upstream_ca_cert: Option<PathBuf>,
    /// PEM ECDSA P-256 private key of --upstream-ca-cert (PKCS#8 or SEC1).
    /// Read at start, kept in memory only.
    #[arg(long, value_name = "FILE", requires = "upstream_ca_cert")]
    pub upstream_ca_key: Option<PathBuf>,
    /// Audit log file (JSON lines). Default <data-dir>/audit.log.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Extra DNS names for the server certificate (localhost is always in).
    #[arg(long = "server-dns-name", value_name = "NAME")]
    pub server_dns_names: Vec<String>,
    /// Life of a new self-signed CA, e.g. 365d. Default 365d.
    #[arg(long, value_name = "DURATION")]
    pub ca_ttl: Option<String>,
    /// Agent SVID lifetime, e.g. 1h. Default 1h.
    #[arg(long, value_name = "DURATION")]
    pub agent_svid_ttl: Option<String>,
    /// Default X.509-SVID TTL of new entries. Default 1h.
    #[arg(long, value_name = "DURATION")]
    pub default_x509_ttl: Option<String>,
    /// Default JWT-SVID TTL of new entries. Default 24h (also the maximum).
    #[arg(long, value_name = "DURATION")]
    pub default_jwt_ttl: Option<String>,
    /// `iss` claim of JWT-SVIDs. Default: none.
    #[arg(long, value_name = "URL")]
    pub jwt_issuer: Option<String>,
    /// Log format: human or json. Default human.
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// PEM file of TPM manufacturer CA certificates (roots and
    /// intermediates): a TPM whose EK certificate one of them issued attests
    /// at assurance al3. Repeatable. Without it, only EKs on the allow-list
    /// (`sigil tpm allow`) attest, at al2.
    #[arg(long = "tpm-ek-ca", value_name = "FILE")]
    pub tpm_ek_ca: Vec<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    trust_domain: Option<String>,
    listen: Option<SocketAddr>,
    admin_socket: Option<PathBuf>,
    http_listen: Option<SocketAddr>,
    http_tls_cert: Option<PathBuf>,
    http_tls_key: Option<PathBuf>,
    upstream_ca_cert: Option<PathBuf>,
    upstream_ca_key: Option<PathBuf>,
    audit_log: Option<PathBuf>,
    #[serde(default)]
    server_dns_names: Vec<String>,
    ca_ttl: Option<String>,
    agent_svid_ttl: Option<String>,
    default_x509_ttl: Option<String>,
    default_jwt_ttl: Option<String>,
    jwt_issuer: Option<String>,
    log_format: Option<String>,
    #[serde(default)]
    tpm_ek_ca: Vec<PathBuf>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable.
    Human,
    /// One JSON object per line.
    Json,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Trust domain.
    pub trust_domain: sigil::TrustDomain,
    /// Node API address.
    pub listen: SocketAddr,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// HTTP endpoint address, if enabled.
    pub http_listen: Option<SocketAddr>,
    /// HTTPS certificate and key files for the HTTP endpoint.
    pub http_tls: Option<(PathBuf, PathBuf)>,
    /// Upstream CA certificate and key files.
    pub upstream_ca: Option<(PathBuf, PathBuf)>,
    /// Audit log path.
    pub audit_log: PathBuf,
    /// Extra server DNS names.
    pub server_dns_names: Vec<String>,
    /// CA lifetime, seconds.
    pub ca_ttl: i64,
    /// Agent SVID lifetime, seconds.
    pub agent_svid_ttl: i64,
    /// Default X.509-SVID TTL, seconds.
    pub default_x509_ttl: i64,
    /// Default JWT-SVID TTL, seconds.
    pub default_jwt_ttl: i64,
    /// JWT `iss`.
    pub jwt_issuer: Option<String>,
    /// Log format.
    pub log_format: LogFormat,
    /// TPM manufacturer CA files.
    pub tpm_ek_ca: Vec<PathBuf>,
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
        .with_context(|| format!("invalid duration {s:?} (use e.g. 30s, 10m, 1h, 7d)"))?;
    if n <= 0 {
        bail!("duration {s:?} must be positive");
    }
    n.checked_mul(mult)
        .with_context(|| format!("duration {s:?} is too large"))
}

impl Config {
    /// Merges the file (if any) and the flags.
    pub fn load(args: &RunArgs) -> Result<Self> {
        let file = match &args.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config {}", p.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parsing config {}", p.display()))?
            }
            None => FileConfig::default(),
        };
        let data_dir = args
            .data_dir
            .clone()
            .or(file.data_dir)
            .context("--data-dir (or data_dir in the config file) is required")?;
        let td = args
            .trust_domain
            .clone()
            .or(file.trust_domain)
            .context("--trust-domain (or trust_domain in the config file) is required")?;
        let trust_domain = sigil::TrustDomain::new(&td)
            .map_err(|e| anyhow::anyhow!("invalid trust domain {td:?}: {e}"))?;
        let dur = |flag: &Option<String>, file: Option<String>, default: i64| -> Result<i64> {
            match flag.clone().or(file) {
                Some(s) => parse_duration(&s),
                None => Ok(default),
            }
        };
        let log_format = match args
            .log_format
            .clone()
            .or(file.log_format)
            .as_deref()
            .unwrap_or("human")
        {
            "human" => LogFormat::Human,
            "json" => LogFormat::Json,
            other => bail!("log format {other:?} is not human or json"),
        };
        let mut tpm_ek_ca = file.tpm_ek_ca;
        tpm_ek_ca.extend(args.tpm_ek_ca.iter().cloned());
        let pair = |what: &str,
                    c: Option<PathBuf>,
                    k: Option<PathBuf>|
         -> Result<Option<(PathBuf, PathBuf)>> {
            match (c, k) {
                (Some(c), Some(k)) => Ok(Some((c, k))),
                (None, None) => Ok(None),
                _ => bail!("{what}_cert and {what}_key go together"),
            }
        };
        let http_tls = pair(
            "http_tls",
            args.http_tls_cert.clone().or(file.http_tls_cert),
            args.http_tls_key.clone().or(file.http_tls_key),
        )?;
        let upstream_ca = pair(
            "upstream_ca",
            args.upstream_ca_cert.clone().or(file.upstream_ca_cert),
            args.upstream_ca_key.clone().or(file.upstream_ca_key),
        )?;
        let mut server_dns_names = file.server_dns_names;
        server_dns_names.extend(args.server_dns_names.iter().cloned());
        let cfg = Self {
            admin_socket: args
                .admin_socket
                .clone()
                .or(file.admin_socket)
                .unwrap_or_else(|| data_dir.join("admin.sock")),
            http_listen: args.http_listen.or(file.http_listen),
            http_tls,
            upstream_ca,
            audit_log: args
                .audit_log
                .clone()
                .or(file.audit_log)
                .unwrap_or_else(|| data_dir.join("audit.log")),
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8081))),
            ca_ttl: dur(&args.ca_ttl, file.ca_ttl, 365 * 86400)?,
            agent_svid_ttl: dur(&args.agent_svid_ttl, file.agent_svid_ttl, 3600)?,
            default_x509_ttl: dur(&args.default_x509_ttl, file.default_x509_ttl, 3600)?,
            default_jwt_ttl: dur(&args.default_jwt_ttl, file.default_jwt_ttl, 86400)?,
            jwt_issuer: args.jwt_issuer.clone().or(file.jwt_issuer),
            server_dns_names,
            log_format,
            tpm_ek_ca,
            trust_domain,
            data_dir,
        };
        if cfg.default_jwt_ttl > 86400 {
            bail!("default_jwt_ttl cannot exceed 24h");
        }
        if cfg.http_tls.is_some()
            && let Some(iss) = &cfg.jwt_issuer
            && !iss.starts_with("https://")
        {
            bail!(
                "jwt_issuer {iss:?} must be an https:// URL when the HTTP endpoint serves HTTPS (OIDC discovery)"
            );
        }
        Ok(cfg)
    }

    /// The sled database directory.
    pub fn db_dir(&self) -> PathBuf {
        self.data_dir.join("db")
    }
}

/// Creates `dir` with mode 0700 if it does not exist.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// Creates the data dir with mode 0700, or tightens an existing one to
/// 0700: the database inside holds the CA and JWT private keys, and sled
/// creates its files with the process umask. Returns true when it had to
/// tighten the mode.
pub fn secure_data_dir(dir: &Path) -> Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    ensure_private_dir(dir)?;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("stat {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 == 0 {
        return Ok(false);
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", dir.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert_eq!(parse_duration("30s").unwrap(), 30);
        assert_eq!(parse_duration("10m").unwrap(), 600);
        assert_eq!(parse_duration("1h").unwrap(), 3600);
        assert_eq!(parse_duration("7d").unwrap(), 7 * 86400);
        for bad in ["", "m", "-1h", "0", "1x", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_win_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(
            &p,
            "data_dir = \"/tmp/x\"\ntrust_domain = \"a.org\"\nlisten = \"127.0.0.1:9\"\n",
        )
        .unwrap();
        let args = RunArgs {
            config: Some(p.clone()),
            trust_domain: Some("b.org".into()),
            ..RunArgs::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!(c.trust_domain.name(), "b.org");
        assert_eq!(c.listen.port(), 9);
        assert_eq!(c.admin_socket, PathBuf::from("/tmp/x/admin.sock"));
        std::fs::write(&p, "bogus = 1\n").unwrap();
        assert!(Config::load(&args).is_err());
    }

    #[test]
    fn https_needs_both_files_and_an_https_issuer() {
        let base = RunArgs {
            data_dir: Some("/tmp/x".into()),
            trust_domain: Some("a.org".into()),
            http_tls_cert: Some("c.pem".into()),
            http_tls_key: Some("k.pem".into()),
            jwt_issuer: Some("https://sigil.a.org".into()),
            ..RunArgs::default()
        };
        let c = Config::load(&base).unwrap();
        assert_eq!(
            c.http_tls,
            Some((PathBuf::from("c.pem"), PathBuf::from("k.pem")))
        );
        let plain = RunArgs {
            jwt_issuer: Some("http://sigil.a.org".into()),
            ..base.clone()
        };
        let err = Config::load(&plain).unwrap_err().to_string();
        assert!(err.contains("https://"), "{err}");
        let half = RunArgs {
            http_tls_key: None,
            ..base.clone()
        };
        assert!(Config::load(&half).is_err());
        let up = RunArgs {
            upstream_ca_cert: Some("u.pem".into()),
            ..base
        };
        assert!(Config::load(&up).is_err(), "upstream cert without key");
    }

    #[test]
    fn data_dir_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("new");
        assert!(!secure_data_dir(&fresh).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&fresh), 0o700);
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(secure_data_dir(&fresh).unwrap());
        assert_eq!(mode(&fresh), 0o700);
    }

    #[test]
    fn sample_config_parses() {
        let text = include_str!("../server.toml");
        toml::from_str::<FileConfig>(text).unwrap();
    }
}
