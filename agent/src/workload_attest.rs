//! Workload attestation: from a Unix socket peer to selectors.
//!
//! # PID reuse
//!
//! `SO_PEERCRED` gives the pid of the process that called `connect()`. That
//! process may exit, and its pid be reused, before anything reads
//! `/proc/<pid>`. So the agent *pins* the peer when it accepts the
//! connection ([`PinnedProcess::pin`]): it opens the `/proc/<pid>` directory
//! (a handle that keeps naming that one process: once it exits, reads through
//! the handle fail, even if the pid is reused), records the start time
//! (field 22 of `stat`) and checks that the process's effective uid is the
//! one `SO_PEERCRED` reported. Every later read goes through that handle, and
//! after attestation the caller re-checks with
//! [`PinnedProcess::ensure_unchanged`]: a process that exited, became a
//! zombie or whose start time changed gets nothing.
//!
//! One window remains with `/proc` alone: the peer exits and its pid is
//! reused *between* `connect()` and the agent opening `/proc/<pid>`. On
//! Linux ≥ 6.5 the agent closes it with `SO_PEERPIDFD`, a pidfd of the very
//! process that connected ([`PinnedProcess::pin_with_pidfd`]): after opening
//! the directory it checks that the pidfd's process still has that pid, and
//! re-checks the pidfd in [`PinnedProcess::ensure_unchanged`].
//!
//! What this does not catch: a peer that hands its connected socket to
//! another process (fork, `SCM_RIGHTS`) while staying alive is still
//! attested as itself — the kernel's answer to "who connected". SPIRE has
//! the same limit.
//!
//! # Selectors of [`UnixAttestor`]
//!
//! | selector | source |
//! |---|---|
//! | `unix:uid:N`, `unix:gid:N` | `SO_PEERCRED` (effective ids at connect) |
//! | `unix:user:NAME`, `unix:group:NAME` | those ids in the passwd / group files |
//! | `unix:supplementary_gid:N`, `unix:supplementary_group:NAME` | `Groups:` of `/proc/<pid>/status` |
//! | `unix:path:/abs/exe` | `/proc/<pid>/exe`; left out when the file was deleted or the caller is in another mount namespace (a container's `/usr/bin/x` is not the host's) |
//! | `unix:sha256:HEX` | SHA-256 of the executable read through `/proc/<pid>/exe` |
//! | `systemd:unit:NAME.service` | the system unit in `/proc/<pid>/cgroup` |
//! | `cgroup:container_id:HEX` | a 64-hex container id in `/proc/<pid>/cgroup` |
//!
//! Hashing is bounded ([`UnixAttestorConfig::max_exe_bytes`],
//! [`UnixAttestorConfig::hash_timeout`]) and fails closed: an executable too
//! large, too slow to read, or modified while being read gets no
//! `unix:sha256` selector (so no entry that requires one matches), and the
//! reason lands in [`Attestation::notes`]. Names come from the passwd and
//! group files, not NSS: users only in LDAP get `uid`/`gid` selectors only.
//!
//! Only system units count for `systemd:unit` (the cgroup path must start
//! with `/system.slice/`): a user's own systemd instance can name a unit
//! anything. The first `.service` below the slices wins, so a service with
//! cgroup delegation cannot claim a nested name. Container ids under
//! `/user.slice` are ignored for the same reason, and the outermost id wins.

use crate::selector::Selector;
use rustix::fs::{Mode, OFlags};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Largest `/proc` file read (status, stat, cgroup).
const MAX_PROC_FILE: u64 = 64 * 1024;
/// Largest passwd / group file read.
const MAX_ACCOUNT_FILE: u64 = 16 * 1024 * 1024;
/// Hashes kept in the executable hash cache before it is cleared.
const HASH_CACHE_ENTRIES: usize = 256;

/// The attestation method written to audit lines and `amr`.
pub const METHOD: &str = sigil::assurance::methods::PEERCRED;

/// The peer of a Unix socket, as `SO_PEERCRED` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Process ID (in the agent's PID namespace).
    pub pid: i32,
    /// Effective user ID at `connect()`.
    pub uid: u32,
    /// Effective group ID at `connect()`.
    pub gid: u32,
}

/// Why a caller could not be attested. All of these mean "no identity".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The socket peer has no pid (e.g. it is in a PID namespace the agent
    /// cannot see).
    #[error("socket peer has no pid")]
    NoPeerPid,
    /// `/proc/<pid>` could not be opened or read when the connection was
    /// accepted.
    #[error("peer process {0} is gone or unreadable")]
    ProcessGone(i32),
    /// The pinned process exited, became a zombie, or its start time changed.
    #[error("peer process {0} changed during attestation")]
    ProcessChanged(i32),
    /// `/proc` disagrees with `SO_PEERCRED` (e.g. the uid changed).
    #[error("peer process {0} no longer has the credentials it connected with")]
    CredentialsMismatch(i32),
    /// A `/proc` file did not have the expected format.
    #[error("malformed /proc/{pid}/{file}")]
    MalformedProc {
        /// The process.
        pid: i32,
        /// The file.
        file: &'static str,
    },
}

/// The facts of `/proc/<pid>/stat` the pin uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3, the state letter (`R`, `S`, `Z`, …).
    pub state: char,
    /// Field 22, start time in clock ticks after boot.
    pub start_time: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses
/// and may itself contain spaces and parentheses, so fields are counted from
/// the last `)`.
pub fn parse_stat(s: &str) -> Option<ProcStat> {
    let rest = &s[s.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // After the command: field 3 (state) is index 0, field 22 is index 19.
    let state = fields.next()?.chars().next()?;
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

/// The facts of `/proc/<pid>/status` attestation uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcStatus {
    /// Effective uid (second field of `Uid:`).
    pub euid: Option<u32>,
    /// Effective gid (second field of `Gid:`).
    pub egid: Option<u32>,
    /// Supplementary groups (`Groups:`).
    pub groups: Vec<u32>,
}

/// Parses `/proc/<pid>/status`; `None` if a present field is malformed.
pub fn parse_status(s: &str) -> Option<ProcStatus> {
    let mut out = ProcStatus::default();
    for line in s.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key {
            "Uid" => out.euid = Some(value.split_ascii_whitespace().nth(1)?.parse().ok()?),
            "Gid" => out.egid = Some(value.split_ascii_whitespace().nth(1)?.parse().ok()?),
            "Groups" => {
                out.groups = value
                    .split_ascii_whitespace()
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .ok()?;
            }
            _ => {}
        }
    }
    Some(out)
}

/// A caller's process, pinned when its connection was accepted.
#[derive(Debug)]
pub struct PinnedProcess {
    creds: PeerCredentials,
    dir: OwnedFd,
    start_time: u64,
    pidfd: Option<OwnedFd>,
}

/// The pid a pidfd refers to, from `/proc/self/fdinfo`: `Some(-1)` once the
/// process has exited, `None` if the kernel does not say.
pub fn pidfd_pid(pidfd: &OwnedFd) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
}

impl PinnedProcess {
    /// Pins the process named by `creds` under `/proc`.
    pub fn pin(creds: PeerCredentials) -> Result<Self, AttestError> {
        Self::pin_in(Path::new("/proc"), creds, None)
    }

    /// Pins the peer of a socket with the pidfd `SO_PEERPIDFD` gave (Linux
    /// ≥ 6.5): that pidfd names the very process that connected, so once
    /// `/proc/<pid>` is open, checking that the pidfd's process is alive
    /// with the same pid proves the directory is the connecting process's —
    /// no window for PID reuse at all. Without a pidfd, falls back to
    /// [`Self::pin`].
    pub fn pin_with_pidfd(
        creds: PeerCredentials,
        pidfd: Option<OwnedFd>,
    ) -> Result<Self, AttestError> {
        Self::pin_in(Path::new("/proc"), creds, pidfd)
    }

    /// True when the pin was checked against the peer's pidfd.
    pub fn pinned_by_pidfd(&self) -> bool {
        self.pidfd.is_some()
    }

    /// Pins the process under another procfs mount.
    pub fn pin_in(
        proc_root: &Path,
        creds: PeerCredentials,
        pidfd: Option<OwnedFd>,
    ) -> Result<Self, AttestError> {
        let pid = creds.pid;
        if pid <= 0 {
            return Err(AttestError::NoPeerPid);
        }
        let dir = rustix::fs::open(
            proc_root.join(pid.to_string()),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|_| AttestError::ProcessGone(pid))?;
        let mut pinned = Self {
            creds,
            dir,
            start_time: 0,
            pidfd: None,
        };
        let stat = pinned.stat().map_err(|_| AttestError::ProcessGone(pid))?;
        if matches!(stat.state, 'Z' | 'X' | 'x') {
            return Err(AttestError::ProcessGone(pid));
        }
        pinned.start_time = stat.start_time;
        let status = pinned.status()?;
        if status.euid != Some(creds.uid) || status.egid != Some(creds.gid) {
            return Err(AttestError::CredentialsMismatch(pid));
        }
        if let Some(fd) = pidfd {
            // After the directory was opened: is the connecting process still
            // the one with this pid? A kernel that does not say leaves the
            // start-time pin alone in charge.
            match pidfd_pid(&fd) {
                Some(p) if p == pid => pinned.pidfd = Some(fd),
                Some(_) => return Err(AttestError::ProcessGone(pid)),
                None => {}
            }
        }
        Ok(pinned)
    }

    /// The credentials the peer connected with.
    pub fn credentials(&self) -> PeerCredentials {
        self.creds
    }

    /// The pid.
    pub fn pid(&self) -> i32 {
        self.creds.pid
    }

    /// The start time recorded at pin (clock ticks after boot).
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// Fails unless the pinned process is still alive (not a zombie) with
    /// the start time recorded at pin.
    pub fn ensure_unchanged(&self) -> Result<(), AttestError> {
        let pid = self.creds.pid;
        if let Some(fd) = &self.pidfd
            && pidfd_pid(fd) != Some(pid)
        {
            return Err(AttestError::ProcessChanged(pid));
        }
        match self.stat() {
            Ok(s) if s.start_time == self.start_time && !matches!(s.state, 'Z' | 'X' | 'x') => {
                Ok(())
            }
            _ => Err(AttestError::ProcessChanged(pid)),
        }
    }

    /// Reads `/proc/<pid>/stat` through the pinned handle.
    pub fn stat(&self) -> Result<ProcStat, AttestError> {
        let pid = self.creds.pid;
        let raw = self
            .read_file("stat", MAX_PROC_FILE)
            .map_err(|_| AttestError::ProcessChanged(pid))?;
        parse_stat(&String::from_utf8_lossy(&raw))
            .ok_or(AttestError::MalformedProc { pid, file: "stat" })
    }

    /// Reads `/proc/<pid>/status` through the pinned handle.
    pub fn status(&self) -> Result<ProcStatus, AttestError> {
        let pid = self.creds.pid;
        let raw = self
            .read_file("status", MAX_PROC_FILE)
            .map_err(|_| AttestError::ProcessChanged(pid))?;
        parse_status(&String::from_utf8_lossy(&raw)).ok_or(AttestError::MalformedProc {
            pid,
            file: "status",
        })
    }

    /// Reads at most `limit` bytes of a file in the process's `/proc` dir.
    pub fn read_file(&self, name: &str, limit: u64) -> std::io::Result<Vec<u8>> {
        let fd = rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )?;
        let mut out = Vec::new();
        File::from(fd).take(limit).read_to_end(&mut out)?;
        Ok(out)
    }

    /// The executable's path (`/proc/<pid>/exe`), as the kernel prints it.
    pub fn exe_link(&self) -> std::io::Result<PathBuf> {
        let link = rustix::fs::readlinkat(&self.dir, "exe", Vec::new())?;
        let os: std::ffi::OsString = std::os::unix::ffi::OsStringExt::from_vec(link.into_bytes());
        Ok(PathBuf::from(os))
    }

    /// True when the process is in the agent's own mount namespace (so its
    /// executable path means what it means to the agent). False when either
    /// namespace cannot be read.
    pub fn shares_mount_namespace(&self) -> bool {
        let theirs = rustix::fs::readlinkat(&self.dir, "ns/mnt", Vec::new());
        let ours = rustix::fs::readlink("/proc/self/ns/mnt", Vec::new());
        matches!((theirs, ours), (Ok(a), Ok(b)) if a == b)
    }

    /// Opens the executable through `/proc/<pid>/exe`: the file the process
    /// runs, even if its path now names another file.
    pub fn open_exe(&self) -> std::io::Result<File> {
        let fd = rustix::fs::openat(
            &self.dir,
            "exe",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }
}

/// What attestation established about a caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attestation {
    /// The selectors.
    pub selectors: BTreeSet<Selector>,
    /// The executable's path, when known (for the audit log).
    pub exe_path: Option<String>,
    /// The executable's SHA-256, hex, when computed.
    pub exe_sha256: Option<String>,
    /// Why a selector is missing (hash skipped, name unknown…).
    pub notes: Vec<String>,
}

/// Turns a pinned caller into selectors. Implementations read only through
/// the [`PinnedProcess`] handle, and may block (they run on a blocking
/// thread); the caller re-checks the pin afterwards.
pub trait WorkloadAttestor: Send + Sync + 'static {
    /// Attests the process.
    fn attest(&self, process: &PinnedProcess) -> Result<Attestation, AttestError>;
}

/// [`UnixAttestor`] settings.
#[derive(Debug, Clone)]
pub struct UnixAttestorConfig {
    /// Executables larger than this get no `unix:sha256` selector.
    pub max_exe_bytes: u64,
    /// Hashing that takes longer than this is abandoned (no selector).
    pub hash_timeout: Duration,
    /// The passwd file for `unix:user`.
    pub passwd_file: PathBuf,
    /// The group file for `unix:group` and `unix:supplementary_group`.
    pub group_file: PathBuf,
}

impl Default for UnixAttestorConfig {
    fn default() -> Self {
        Self {
            max_exe_bytes: 512 * 1024 * 1024,
            hash_timeout: Duration::from_secs(5),
            passwd_file: PathBuf::from("/etc/passwd"),
            group_file: PathBuf::from("/etc/group"),
        }
    }
}

/// Identifies one version of an executable file: same device, inode, size,
/// mtime and ctime (which no one but the kernel sets) means same content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileVersion {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileVersion {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// Why no hash was computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HashSkip {
    /// The executable could not be opened or read.
    #[error("executable unreadable: {0}")]
    Unreadable(String),
    /// Not a regular file.
    #[error("executable is not a regular file")]
    NotRegular,
    /// Larger than the limit.
    #[error("executable is larger than {0} bytes")]
    TooLarge(u64),
    /// Took longer than the limit.
    #[error("hashing the executable took longer than {0:?}")]
    Timeout(Duration),
    /// Changed while being read.
    #[error("executable changed while being hashed")]
    Modified,
}

/// Unix, systemd and cgroup workload attestation from `/proc`.
#[derive(Debug, Default)]
pub struct UnixAttestor {
    config: UnixAttestorConfig,
    hashes: Mutex<HashMap<FileVersion, String>>,
}

impl UnixAttestor {
    /// An attestor with `config`.
    pub fn new(config: UnixAttestorConfig) -> Self {
        Self {
            config,
            hashes: Mutex::new(HashMap::new()),
        }
    }

    /// Hashes the file, bounded in size and time.
    pub fn sha256_file(&self, file: File) -> Result<String, HashSkip> {
        let meta = file
            .metadata()
            .map_err(|e| HashSkip::Unreadable(e.to_string()))?;
        if !meta.is_file() {
            return Err(HashSkip::NotRegular);
        }
        let max = self.config.max_exe_bytes;
        if meta.len() > max {
            return Err(HashSkip::TooLarge(max));
        }
        let version = FileVersion::of(&meta);
        if let Some(h) = self.cache().get(&version) {
            return Ok(h.clone());
        }
        let deadline = Instant::now() + self.config.hash_timeout;
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut reader = (&file).take(max.saturating_add(1));
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| HashSkip::Unreadable(e.to_string()))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > max {
                return Err(HashSkip::TooLarge(max));
            }
            ctx.update(&buf[..n]);
            if Instant::now() > deadline {
                return Err(HashSkip::Timeout(self.config.hash_timeout));
            }
        }
        let after = file
            .metadata()
            .map_err(|e| HashSkip::Unreadable(e.to_string()))?;
        if FileVersion::of(&after) != version || total != version.size {
            return Err(HashSkip::Modified);
        }
        let hex = to_hex(ctx.finish().as_ref());
        let mut cache = self.cache();
        if cache.len() >= HASH_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(version, hex.clone());
        Ok(hex)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<FileVersion, String>> {
        // A poisoned cache only means a panic elsewhere mid-insert; the map
        // itself is always valid.
        self.hashes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl WorkloadAttestor for UnixAttestor {
    fn attest(&self, p: &PinnedProcess) -> Result<Attestation, AttestError> {
        let creds = p.credentials();
        let mut out = Attestation::default();

        add(&mut out, "unix", format!("uid:{}", creds.uid));
        add(&mut out, "unix", format!("gid:{}", creds.gid));

        let passwd = read_bounded(&self.config.passwd_file);
        let group = read_bounded(&self.config.group_file);
        if let Some(name) = passwd.as_deref().and_then(|f| account_name(f, creds.uid)) {
            add(&mut out, "unix", format!("user:{name}"));
        }
        if let Some(name) = group.as_deref().and_then(|f| account_name(f, creds.gid)) {
            add(&mut out, "unix", format!("group:{name}"));
        }
        let status = p.status()?;
        if status.euid != Some(creds.uid) {
            return Err(AttestError::CredentialsMismatch(creds.pid));
        }
        for g in status.groups {
            add(&mut out, "unix", format!("supplementary_gid:{g}"));
            if let Some(name) = group.as_deref().and_then(|f| account_name(f, g)) {
                add(&mut out, "unix", format!("supplementary_group:{name}"));
            }
        }

        match p.exe_link() {
            Ok(path) => {
                let path = path.to_string_lossy().into_owned();
                if path.ends_with(" (deleted)") {
                    out.notes
                        .push("executable was deleted: no unix:path".into());
                } else if !p.shares_mount_namespace() {
                    // The path is relative to another root (a container):
                    // it names a file the agent cannot vouch for.
                    out.notes
                        .push("caller is in another mount namespace: no unix:path".into());
                } else {
                    add(&mut out, "unix", format!("path:{path}"));
                }
                out.exe_path = Some(path);
            }
            Err(e) => out.notes.push(format!("executable path unreadable: {e}")),
        }
        match p
            .open_exe()
            .map_err(|e| HashSkip::Unreadable(e.to_string()))
            .and_then(|f| self.sha256_file(f))
        {
            Ok(hex) => {
                add(&mut out, "unix", format!("sha256:{hex}"));
                out.exe_sha256 = Some(hex);
            }
            Err(e) => out.notes.push(format!("no unix:sha256: {e}")),
        }

        match p.read_file("cgroup", MAX_PROC_FILE) {
            Ok(raw) => {
                for s in cgroup_selectors(&String::from_utf8_lossy(&raw)) {
                    out.selectors.insert(s);
                }
            }
            Err(e) => out.notes.push(format!("cgroup unreadable: {e}")),
        }
        Ok(out)
    }
}

fn add(out: &mut Attestation, kind: &str, value: String) {
    match Selector::new(kind, value) {
        Ok(s) => {
            out.selectors.insert(s);
        }
        Err(e) => out.notes.push(format!("{kind} selector dropped: {e}")),
    }
}

fn read_bounded(path: &Path) -> Option<String> {
    let mut s = String::new();
    File::open(path)
        .ok()?
        .take(MAX_ACCOUNT_FILE)
        .read_to_string(&mut s)
        .ok()?;
    Some(s)
}

/// The name of the first account with `id` in a passwd- or group-format
/// file (`name:x:id:…`).
pub fn account_name(file: &str, id: u32) -> Option<&str> {
    file.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let this: u32 = f.next()?.parse().ok()?;
        (this == id && !name.is_empty()).then_some(name)
    })
}

/// Selectors from the content of `/proc/<pid>/cgroup` (v1, v2 or hybrid).
pub fn cgroup_selectors(content: &str) -> Vec<Selector> {
    let mut unified = None;
    let mut systemd = None;
    let mut paths = Vec::new();
    for line in content.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            unified = Some(path);
        }
        if controllers == "name=systemd" {
            systemd = Some(path);
        }
        paths.push(path);
    }
    let mut out = Vec::new();
    // The unit comes from the unified hierarchy, or systemd's own v1 one.
    let unit_path = [unified, systemd].into_iter().flatten().find(|p| *p != "/");
    if let Some(unit) = unit_path.and_then(system_unit)
        && let Ok(s) = Selector::new("systemd", format!("unit:{unit}"))
    {
        out.push(s);
    }
    if let Some(id) = paths.iter().find_map(|p| container_id(p))
        && let Ok(s) = Selector::new("cgroup", format!("container_id:{id}"))
    {
        out.push(s);
    }
    out
}

/// The system service a cgroup path belongs to: the first `.service`
/// component after the slices of `/system.slice/…`.
fn system_unit(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/system.slice/")?;
    rest.split('/')
        .find(|c| !c.ends_with(".slice"))
        .filter(|c| c.ends_with(".service") && c.len() > ".service".len())
}

/// The outermost 64-hex container id in a cgroup path outside `/user.slice`:
/// `…/<id>`, `docker-<id>.scope`, `cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `libpod-<id>.scope`.
fn container_id(path: &str) -> Option<&str> {
    if path == "/user.slice" || path.starts_with("/user.slice/") {
        return None;
    }
    path.split('/').find_map(|c| {
        let c = c.strip_suffix(".scope").unwrap_or(c);
        let id = c.rsplit('-').next()?;
        (id.len() == 64
            && id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then_some(id)
    })
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn self_creds() -> PeerCredentials {
        PeerCredentials {
            pid: std::process::id() as i32,
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        }
    }

    fn sels(a: &Attestation) -> Vec<String> {
        a.selectors.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stat_parsing() {
        let line =
            "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 100";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                state: 'S',
                start_time: 98765
            })
        );
        assert_eq!(parse_stat("1234 (x) S 1 2"), None);
        assert_eq!(parse_stat("no parens"), None);
    }

    #[test]
    fn status_parsing() {
        let s = "Name:\tx\nUid:\t1000\t1001\t1000\t1000\nGid:\t50\t51\t50\t50\nGroups:\t4 24 27 \n";
        assert_eq!(
            parse_status(s),
            Some(ProcStatus {
                euid: Some(1001),
                egid: Some(51),
                groups: vec![4, 24, 27],
            })
        );
        assert_eq!(
            parse_status("Groups:\t\n").unwrap().groups,
            Vec::<u32>::new()
        );
        assert_eq!(parse_status("Uid:\tx\ty\n"), None);
        assert_eq!(parse_status("Groups:\t1 x\n"), None);
    }

    #[test]
    fn account_names() {
        let f = "# comment\nroot:x:0:0:root:/root:/bin/sh\nbad\nalice:x:1000:1000::/h:/bin/sh\nalias:x:1000:1000::/h:/bin/sh\n";
        assert_eq!(account_name(f, 0), Some("root"));
        assert_eq!(account_name(f, 1000), Some("alice"));
        assert_eq!(account_name(f, 7), None);
    }

    #[test]
    fn cgroup_table() {
        let id = "a".repeat(64);
        let id2 = "b".repeat(64);
        let cases: Vec<(String, Vec<String>)> = vec![
            ("0::/\n".into(), vec![]),
            (
                "0::/system.slice/nginx.service\n".into(),
                vec!["systemd:unit:nginx.service".into()],
            ),
            (
                "0::/system.slice/system-getty.slice/getty@tty1.service\n".into(),
                vec!["systemd:unit:getty@tty1.service".into()],
            ),
            // Delegated sub-cgroups cannot rename the unit.
            (
                "0::/system.slice/app.service/fake.service\n".into(),
                vec!["systemd:unit:app.service".into()],
            ),
            // User units are not system units.
            (
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/postgres.service\n"
                    .into(),
                vec![],
            ),
            ("0::/system.slice/cron.scope\n".into(), vec![]),
            ("0::/init.scope\n".into(), vec![]),
            // Hybrid: unified root, systemd v1 hierarchy has the unit.
            (
                "1:name=systemd:/system.slice/sshd.service\n0::/\n".into(),
                vec!["systemd:unit:sshd.service".into()],
            ),
            (
                format!("0::/system.slice/docker-{id}.scope\n"),
                vec![format!("cgroup:container_id:{id}")],
            ),
            (
                format!("12:pids:/docker/{id}\n0::/docker/{id}\n"),
                vec![format!("cgroup:container_id:{id}")],
            ),
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234abcd_ef.slice/cri-containerd-{id}.scope\n"
                ),
                vec![format!("cgroup:container_id:{id}")],
            ),
            // Outermost id wins over one a container made inside itself.
            (
                format!("0::/system.slice/docker-{id}.scope/docker-{id2}.scope\n"),
                vec![format!("cgroup:container_id:{id}")],
            ),
            // Rootless containers live in a user's delegated tree: ignored.
            (
                format!("0::/user.slice/user-1000.slice/user@1000.service/docker-{id}.scope\n"),
                vec![],
            ),
            // Not 64 lowercase hex.
            (
                "4:memory:/process_api/d2c091d49d4b735ee3c410a54346d0ea\n".into(),
                vec![],
            ),
            (format!("0::/docker/{}\n", "A".repeat(64)), vec![]),
        ];
        for (content, want) in cases {
            let got: Vec<String> = cgroup_selectors(&content)
                .iter()
                .map(|s| s.to_string())
                .collect();
            assert_eq!(got, want, "{content:?}");
        }
    }

    #[test]
    fn attests_the_test_process_itself() {
        let p = PinnedProcess::pin(self_creds()).unwrap();
        let a = UnixAttestor::default().attest(&p).unwrap();
        let s = sels(&a);
        let creds = self_creds();
        assert!(s.contains(&format!("unix:uid:{}", creds.uid)), "{s:?}");
        assert!(s.contains(&format!("unix:gid:{}", creds.gid)), "{s:?}");
        let exe = std::env::current_exe().unwrap();
        assert!(s.contains(&format!("unix:path:{}", exe.display())), "{s:?}");
        let bytes = std::fs::read(&exe).unwrap();
        let want = to_hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes).as_ref());
        assert_eq!(a.exe_sha256.as_deref(), Some(want.as_str()));
        assert!(s.contains(&format!("unix:sha256:{want}")), "{s:?}");
        if creds.uid == 0 {
            assert!(s.contains(&"unix:user:root".to_string()), "{s:?}");
            assert!(s.contains(&"unix:group:root".to_string()), "{s:?}");
        }
        let status = p.status().unwrap();
        for g in status.groups {
            assert!(s.contains(&format!("unix:supplementary_gid:{g}")), "{s:?}");
        }
        p.ensure_unchanged().unwrap();
    }

    #[test]
    fn user_and_group_names_come_from_the_configured_files() {
        let dir = tempfile::tempdir().unwrap();
        let creds = self_creds();
        let passwd = dir.path().join("passwd");
        let group = dir.path().join("group");
        std::fs::write(&passwd, format!("tester:x:{}:0::/:/bin/sh\n", creds.uid)).unwrap();
        std::fs::write(&group, format!("testers:x:{}:\n", creds.gid)).unwrap();
        let att = UnixAttestor::new(UnixAttestorConfig {
            passwd_file: passwd,
            group_file: group,
            ..Default::default()
        });
        let a = att.attest(&PinnedProcess::pin(creds).unwrap()).unwrap();
        let s = sels(&a);
        assert!(s.contains(&"unix:user:tester".to_string()), "{s:?}");
        assert!(s.contains(&"unix:group:testers".to_string()), "{s:?}");
        assert!(!s.contains(&"unix:user:root".to_string()), "{s:?}");
    }

    #[test]
    fn hashing_is_bounded_and_fails_closed() {
        let exe = std::env::current_exe().unwrap();
        let small = UnixAttestor::new(UnixAttestorConfig {
            max_exe_bytes: 1024,
            ..Default::default()
        });
        assert_eq!(
            small.sha256_file(File::open(&exe).unwrap()),
            Err(HashSkip::TooLarge(1024))
        );
        let slow = UnixAttestor::new(UnixAttestorConfig {
            hash_timeout: Duration::ZERO,
            ..Default::default()
        });
        assert_eq!(
            slow.sha256_file(File::open(&exe).unwrap()),
            Err(HashSkip::Timeout(Duration::ZERO))
        );
        assert_eq!(
            small.sha256_file(File::open("/").unwrap()),
            Err(HashSkip::NotRegular)
        );
        // With the limit too small, attestation still succeeds, without a
        // hash selector.
        let a = small
            .attest(&PinnedProcess::pin(self_creds()).unwrap())
            .unwrap();
        assert!(a.exe_sha256.is_none());
        assert!(!a.selectors.iter().any(|s| s.value().starts_with("sha256:")));
        assert!(
            a.notes.iter().any(|n| n.contains("larger than")),
            "{:?}",
            a.notes
        );

        // Known content, and the cache gives the same answer.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"abc").unwrap();
        let att = UnixAttestor::default();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(att.sha256_file(File::open(&f).unwrap()).unwrap(), abc);
        assert_eq!(att.sha256_file(File::open(&f).unwrap()).unwrap(), abc);
    }

    #[test]
    fn pin_detects_an_exited_process() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let creds = PeerCredentials {
            pid: child.id() as i32,
            ..self_creds()
        };
        let pinned = PinnedProcess::pin(creds).unwrap();
        pinned.ensure_unchanged().unwrap();
        assert!(pinned.start_time() > 0);
        child.kill().unwrap();
        // Not yet reaped: a zombie must not pass either.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            pinned.ensure_unchanged(),
            Err(AttestError::ProcessChanged(creds.pid))
        );
        child.wait().unwrap();
        assert_eq!(
            pinned.ensure_unchanged(),
            Err(AttestError::ProcessChanged(creds.pid))
        );
        // Attestation through the stale handle fails too.
        assert!(UnixAttestor::default().attest(&pinned).is_err());
        // And the pid can no longer be pinned.
        assert_eq!(
            PinnedProcess::pin(creds).map(|_| ()),
            Err(AttestError::ProcessGone(creds.pid))
        );
    }

    #[test]
    fn no_path_selector_across_mount_namespaces() {
        let Ok(mut child) = Command::new("unshare")
            .args(["-m", "sleep", "30"])
            .stdin(Stdio::null())
            .spawn()
        else {
            eprintln!("unshare(1) unavailable; skipping");
            return;
        };
        let creds = PeerCredentials {
            pid: child.id() as i32,
            ..self_creds()
        };
        // Wait until unshare has exec'd sleep in its new namespace.
        let deadline = Instant::now() + Duration::from_secs(5);
        let pinned = loop {
            let p = PinnedProcess::pin(creds).unwrap();
            if p.exe_link().unwrap().ends_with("sleep") || Instant::now() > deadline {
                break p;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let a = UnixAttestor::default().attest(&pinned).unwrap();
        let shared = pinned.shares_mount_namespace();
        let _ = child.kill();
        let _ = child.wait();
        if shared {
            eprintln!("unshare -m did not create a mount namespace (no privilege); skipping");
            return;
        }
        assert!(
            !a.selectors.iter().any(|s| s.value().starts_with("path:")),
            "{a:?}"
        );
        assert!(a.exe_sha256.is_some());
        assert!(
            a.notes.iter().any(|n| n.contains("mount namespace")),
            "{a:?}"
        );
        // The test process itself shares its own namespace.
        assert!(
            PinnedProcess::pin(self_creds())
                .unwrap()
                .shares_mount_namespace()
        );
    }

    #[test]
    fn pidfd_pin_of_a_socket_peer() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let pidfd = match nix::sys::socket::getsockopt(&a, nix::sys::socket::sockopt::PeerPidfd) {
            Ok(fd) => fd,
            Err(e) => {
                eprintln!("SO_PEERPIDFD unsupported (Linux < 6.5?): {e}; skipping");
                return;
            }
        };
        assert_eq!(pidfd_pid(&pidfd), Some(self_creds().pid));
        let p = PinnedProcess::pin_with_pidfd(self_creds(), Some(pidfd)).unwrap();
        assert!(p.pinned_by_pidfd());
        p.ensure_unchanged().unwrap();
    }

    #[test]
    fn pidfd_of_another_process_than_the_pid_refuses_the_pin() {
        // What PID reuse looks like with SO_PEERPIDFD: the connecting
        // process (the pidfd) is not the one now holding the pid.
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let child_pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        let pidfd =
            rustix::process::pidfd_open(child_pid, rustix::process::PidfdFlags::empty()).unwrap();
        assert_eq!(
            PinnedProcess::pin_with_pidfd(self_creds(), Some(pidfd)).map(|_| ()),
            Err(AttestError::ProcessGone(self_creds().pid))
        );
        // And a pidfd pin notices the exit even before the pid is reaped.
        let creds = PeerCredentials {
            pid: child.id() as i32,
            ..self_creds()
        };
        let pidfd =
            rustix::process::pidfd_open(child_pid, rustix::process::PidfdFlags::empty()).unwrap();
        let p = PinnedProcess::pin_with_pidfd(creds, Some(pidfd)).unwrap();
        assert!(p.pinned_by_pidfd());
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(
            p.ensure_unchanged(),
            Err(AttestError::ProcessChanged(creds.pid))
        );
    }

    #[test]
    fn pin_refuses_mismatched_credentials_and_bad_pids() {
        let creds = self_creds();
        let wrong = PeerCredentials {
            uid: creds.uid.wrapping_add(4242),
            ..creds
        };
        assert_eq!(
            PinnedProcess::pin(wrong).map(|_| ()),
            Err(AttestError::CredentialsMismatch(creds.pid))
        );
        for pid in [0, -1] {
            assert_eq!(
                PinnedProcess::pin(PeerCredentials { pid, ..creds }).map(|_| ()),
                Err(AttestError::NoPeerPid)
            );
        }
    }
}
