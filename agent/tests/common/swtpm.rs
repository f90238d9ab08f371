//! A real swtpm per test: started in a temp dir on a free TCP port pair
//! (server P, control P+1), killed on drop.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running swtpm.
pub struct Swtpm {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    ek_ca: Option<PathBuf>,
}

impl std::fmt::Debug for Swtpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Swtpm(port {})", self.port)
    }
}

fn random_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    // Even ports in 20000..32766, so P+1 stays below 32767.
    20000 + (h.finish() % 6383) as u16 * 2
}

impl Swtpm {
    /// A fresh TPM without an EK certificate.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("state")).unwrap();
        Self::spawn(dir, None)
    }

    /// A TPM manufactured by swtpm_setup with an RSA-2048 EK certificate in
    /// NV (index 0x01c00002), issued by a fresh local CA.
    pub fn start_with_ek_cert() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["state", "ca"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        let p = |f: &str| d.join(f).display().to_string();
        std::fs::write(
            d.join("swtpm_setup.conf"),
            format!(
                "create_certs_tool = /usr/bin/swtpm_localca\n\
                 create_certs_tool_config = {}\n\
                 create_certs_tool_options = {}\n\
                 active_pcr_banks = sha256\n",
                p("swtpm-localca.conf"),
                p("swtpm-localca.options")
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("swtpm-localca.conf"),
            format!(
                "statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n",
                ca = p("ca")
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("swtpm-localca.options"),
            "--platform-manufacturer Sigil\n--platform-version 2.1\n--platform-model test\n",
        )
        .unwrap();
        let out = Command::new("swtpm_setup")
            .args(["--tpm2", "--create-ek-cert", "--overwrite", "--tpmstate"])
            .arg(d.join("state"))
            .arg("--config")
            .arg(d.join("swtpm_setup.conf"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "swtpm_setup failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let ca = d.join("ca");
        Self::spawn(dir, Some(ca))
    }

    fn spawn(dir: tempfile::TempDir, ek_ca: Option<PathBuf>) -> Self {
        for _ in 0..20 {
            let port = random_port();
            let mut child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", dir.path().join("state").display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port}"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={}", port + 1))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(_status) = child.try_wait().unwrap() {
                    // Most likely "Address already in use": another port.
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port + 1)).is_ok() {
                    return Self {
                        child,
                        port,
                        dir,
                        ek_ca,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        panic!("could not start swtpm on a free port");
    }

    /// The TCTI string for tss-esapi.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The local CA that issued the EK certificate: (root, intermediate)
    /// PEM files.
    pub fn ek_ca_certs(&self) -> Option<(PathBuf, PathBuf)> {
        self.ek_ca.as_ref().map(|ca| {
            (
                ca.join("swtpm-localca-rootca-cert.pem"),
                ca.join("issuercert.pem"),
            )
        })
    }

    /// The temp dir (holds the TPM state).
    #[allow(dead_code)]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
