//! How long `sigil-server` takes to be ready with many registration entries
//! in its sled store.
//!
//! ```sh
//! cargo build -p sigil-server --bin sigil-server --example ready_100k
//! target/debug/examples/ready_100k [ENTRIES] [DATA_DIR]   # default 100000, a temp dir
//! ```
//!
//! It fills a data dir through the server's own `Store` (each entry a real
//! `create_entry`: transaction, change log, parent index, flush), then
//! starts the real `sigil-server` binary (next to this example's binary,
//! in `target/<profile>/`) several times and reports, per start, the time
//! from spawn until the admin socket accepts and until `GET /ready` answers
//! 200, and the same for an empty data dir as a baseline in the same run.
//! Nothing of the store is scanned at start (entries are read per agent and
//! incrementally), so the figure should not grow with the entry count.

use anyhow::{Context, Result, bail};
use sigil_server::entry::{self, EntryRequest};
use sigil_server::model::now_unix;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TD: &str = "example.org";
const RUNS: usize = 5;

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn args(data: &Path) -> sigil_server::config::RunArgs {
    sigil_server::config::RunArgs {
        data_dir: Some(data.to_path_buf()),
        trust_domain: Some(TD.into()),
        ..Default::default()
    }
}

/// Creates `n` entries spread over 1000 agents.
fn fill(data: &Path, n: usize) -> Result<Duration> {
    let cfg = sigil_server::config::Config::load(&args(data))?;
    let state = sigil_server::server::build_state(&cfg)?;
    let td = sigil::TrustDomain::new(TD).map_err(|e| anyhow::anyhow!("{e}"))?;
    let start = Instant::now();
    let have = state.store.entries()?.len();
    for i in have..n {
        let req = EntryRequest {
            spiffe_id: format!("spiffe://{TD}/w/{i}"),
            parent_id: format!("spiffe://{TD}/agent/join/{:04}", i % 1000),
            selectors: vec![format!("unix:uid:{}", 1000 + i % 60000)],
            audiences: vec!["ehr-fhir".into()],
            ..Default::default()
        };
        let e = entry::validate(&req, &td, &state.ttl, now_unix())
            .map_err(|e| anyhow::anyhow!("entry {i}: {e}"))?;
        state.store.create_entry(e)?;
        if i % 10_000 == 0 && i > have {
            eprintln!("  {i} entries, {:.1?}", start.elapsed());
        }
    }
    Ok(start.elapsed())
}

fn ready(http: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", http)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    r.starts_with("HTTP/1.1 200")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One start: (until the admin socket accepts, until /ready is 200).
fn start_once(bin: &Path, data: &Path) -> Result<(Duration, Duration)> {
    let sock = data.join("admin.sock");
    let http = free_port()?;
    let t0 = Instant::now();
    let mut child = Killed(
        Command::new(bin)
            .arg("run")
            .arg("--data-dir")
            .arg(data)
            .arg("--trust-domain")
            .arg(TD)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", free_port()?))
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{http}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
    );
    let (mut admin, mut rdy) = (None, None);
    while admin.is_none() || rdy.is_none() {
        if admin.is_none() && std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            admin = Some(t0.elapsed());
        }
        if rdy.is_none() && ready(http) {
            rdy = Some(t0.elapsed());
        }
        if let Some(status) = child.0.try_wait()? {
            bail!("sigil-server exited: {status}");
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("not ready after 60 s");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    drop(child);
    Ok((admin.unwrap_or_default(), rdy.unwrap_or_default()))
}

fn measure(bin: &Path, data: &Path, label: &str) -> Result<()> {
    let mut admin = Vec::new();
    let mut rdy = Vec::new();
    for _ in 0..RUNS {
        let (a, r) = start_once(bin, data)?;
        admin.push(a);
        rdy.push(r);
    }
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    // In start order: the first start after the fill may differ (sled
    // recovers its log then).
    let order: Vec<String> = rdy.iter().map(|d| format!("{:.0}", ms(d))).collect();
    println!(
        "{label}: /ready after [{}] ms, in start order",
        order.join(", ")
    );
    admin.sort();
    rdy.sort();
    println!(
        "{label}: admin socket accepts after {:.1} ms (median of {RUNS}, max {:.1}); /ready 200 after {:.1} ms (median, max {:.1})",
        ms(&admin[RUNS / 2]),
        ms(&admin[RUNS - 1]),
        ms(&rdy[RUNS / 2]),
        ms(&rdy[RUNS - 1]),
    );
    Ok(())
}

fn main() -> Result<()> {
    let mut argv = std::env::args().skip(1);
    let n: usize = match argv.next() {
        Some(s) => s.parse().context("ENTRIES must be a number")?,
        None => 100_000,
    };
    let tmp = tempfile::tempdir()?;
    let data: PathBuf = match argv.next() {
        Some(d) => PathBuf::from(d),
        None => tmp.path().join("data"),
    };
    let bin = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("sigil-server"))
        .context("no binary directory")?;
    if !bin.exists() {
        bail!(
            "{} is missing: cargo build -p sigil-server --bin sigil-server first",
            bin.display()
        );
    }
    let empty = tmp.path().join("empty");
    fill(&empty, 0)?;
    measure(&bin, &empty, "baseline, 0 entries")?;
    eprintln!("creating {n} entries in {}", data.display());
    let took = fill(&data, n)?;
    println!(
        "created {n} entries in {:.1} s ({:.0}/s, each flushed)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64().max(1e-9)
    );
    let db = data.join("db");
    let size = dir_size(&db);
    println!("sled dir: {:.1} MB", size as f64 / 1e6);
    measure(&bin, &data, &format!("{n} entries"))?;
    Ok(())
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
