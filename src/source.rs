//! Where a validator gets its trust bundles from, kept current.
//!
//! A [`BundleSource`] hands out the current [`BundleSet`] as a cheap
//! `Arc`. Every source here keeps the last good set: a bundle that fails to
//! load never replaces a good one.
//!
//! - [`SharedBundles`]: updated by the owner (e.g. a task following the
//!   Workload API's `FetchJWTBundles` stream).
//! - [`FileBundleSource`]: `TD=FILE` pairs, reloaded when a file changes.

use crate::bundle::{Bundle, BundleSet};
use crate::id::TrustDomain;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// Hands out the current bundles.
pub trait BundleSource: Send + Sync {
    /// The current bundle set.
    fn bundles(&self) -> Arc<BundleSet>;
}

/// A bundle set that its owner replaces as a whole.
#[derive(Debug, Default)]
pub struct SharedBundles {
    current: RwLock<Arc<BundleSet>>,
}

impl SharedBundles {
    /// Starts with `set`.
    pub fn new(set: BundleSet) -> Self {
        Self {
            current: RwLock::new(Arc::new(set)),
        }
    }

    /// Replaces the whole set.
    pub fn update(&self, set: BundleSet) {
        let set = Arc::new(set);
        match self.current.write() {
            Ok(mut g) => *g = set,
            Err(p) => *p.into_inner() = set,
        }
    }
}

impl BundleSource for SharedBundles {
    fn bundles(&self) -> Arc<BundleSet> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// How often [`FileBundleSource`] looks at the files' modification times.
pub const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct FileState {
    checked: Option<Instant>,
    mtimes: Vec<Option<SystemTime>>,
    current: Arc<BundleSet>,
    last_error: Option<String>,
}

/// Bundles read from files (`TD=FILE`: SPIFFE bundle, JWKS or PEM), reloaded
/// when a file's modification time changes (checked at most once per
/// [`FILE_CHECK_INTERVAL`]). A reload that fails keeps the previous set.
#[derive(Debug)]
pub struct FileBundleSource {
    files: Vec<(TrustDomain, PathBuf)>,
    state: Mutex<FileState>,
}

/// A file could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("bundle file {path}: {reason}")]
pub struct FileSourceError {
    /// The file.
    pub path: String,
    /// Why.
    pub reason: String,
}

impl FileBundleSource {
    /// Loads every file now; any failure is an error (there is no good set
    /// to fall back on yet).
    pub fn new(files: Vec<(TrustDomain, PathBuf)>) -> Result<Self, FileSourceError> {
        let mtimes = Self::mtimes(&files);
        let current = Arc::new(Self::load(&files)?);
        Ok(Self {
            files,
            state: Mutex::new(FileState {
                checked: Some(Instant::now()),
                mtimes,
                current,
                last_error: None,
            }),
        })
    }

    fn mtimes(files: &[(TrustDomain, PathBuf)]) -> Vec<Option<SystemTime>> {
        files
            .iter()
            .map(|(_, p)| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    fn load(files: &[(TrustDomain, PathBuf)]) -> Result<BundleSet, FileSourceError> {
        let mut set = BundleSet::new();
        for (td, path) in files {
            let err = |reason: String| FileSourceError {
                path: path.display().to_string(),
                reason,
            };
            let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
            let bundle = Bundle::parse_any(td.clone(), &bytes).map_err(|e| err(e.to_string()))?;
            set.insert(bundle);
        }
        Ok(set)
    }

    /// The error of the last failed reload, if the current set is older than
    /// the files.
    pub fn last_error(&self) -> Option<String> {
        self.state.lock().ok().and_then(|s| s.last_error.clone())
    }

    /// Reloads if a file changed (ignoring the check interval).
    pub fn refresh(&self) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        self.refresh_locked(&mut st);
    }

    fn refresh_locked(&self, st: &mut FileState) {
        st.checked = Some(Instant::now());
        let mtimes = Self::mtimes(&self.files);
        if mtimes == st.mtimes {
            return;
        }
        match Self::load(&self.files) {
            Ok(set) => {
                st.current = Arc::new(set);
                st.mtimes = mtimes;
                st.last_error = None;
            }
            // Keep the last good set; try again when the files change again.
            Err(e) => {
                st.mtimes = mtimes;
                st.last_error = Some(e.to_string());
            }
        }
    }
}

impl BundleSource for FileBundleSource {
    fn bundles(&self) -> Arc<BundleSet> {
        let Ok(mut st) = self.state.lock() else {
            return Arc::new(BundleSet::new());
        };
        if st
            .checked
            .is_none_or(|t| t.elapsed() >= FILE_CHECK_INTERVAL)
        {
            self.refresh_locked(&mut st);
        }
        st.current.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::JwtKey;

    fn jwks(kid: &str) -> String {
        let pk = crate::PrivateKey::generate_p256()
            .unwrap()
            .public_key_sec1()
            .unwrap();
        let mut b = Bundle::empty(TrustDomain::new("example.org").unwrap());
        b.jwt.add_key(JwtKey::from_sec1(kid, &pk).unwrap()).unwrap();
        b.to_spiffe_json()
    }

    #[test]
    fn file_reload_keeps_last_good() {
        let dir = std::env::temp_dir().join(format!("sigil-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("b.json");
        std::fs::write(&f, jwks("one")).unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let src = FileBundleSource::new(vec![(td.clone(), f.clone())]).unwrap();
        let has = |kid: &str| src.bundles().get(&td).unwrap().jwt.key(kid).is_some();
        assert!(has("one"));

        // A broken file never replaces the good set.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&f, "{ not json").unwrap();
        bump_mtime(&f, 1);
        src.refresh();
        assert!(has("one"));
        assert!(src.last_error().is_some());

        // A good new file does.
        std::fs::write(&f, jwks("two")).unwrap();
        bump_mtime(&f, 2);
        src.refresh();
        assert!(has("two") && !has("one"));
        assert!(src.last_error().is_none());

        // A missing file at start is an error.
        assert!(FileBundleSource::new(vec![(td, dir.join("missing.json"))]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Coarse file-system timestamps could hide a rewrite; set them apart.
    fn bump_mtime(p: &std::path::Path, secs: u64) {
        let t = SystemTime::now() + Duration::from_secs(secs);
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn shared_update() {
        let s = SharedBundles::default();
        assert!(s.bundles().is_empty());
        s.update(
            [Bundle::empty(TrustDomain::new("a.org").unwrap())]
                .into_iter()
                .collect(),
        );
        assert!(!s.bundles().is_empty());
    }
}
