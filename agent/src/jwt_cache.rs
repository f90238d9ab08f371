//! A JWT-SVID cache in front of any [`IdentitySource`].
//!
//! Tokens are cached per (entry, SPIFFE ID, audience) and reused until half
//! their life; after that a fresh one is minted. When the source is
//! unavailable ([`SourceError::Unavailable`]), a cached token that has not
//! expired is served at once, so an outage does not stall callers; a token
//! for an audience never requested before fails with `Unavailable`.
//!
//! The cache only stores what the source minted for an already authorized
//! request ([`AuthorizedAudience`]): it never widens what a caller may get.
//! It holds at most [`MAX_CACHED_TOKENS`] tokens; expired ones go first.

use crate::entry::{AuthorizedAudience, KeyBinding, RegistrationEntry};
use crate::identity::{IdentitySnapshot, IdentitySource, MintedJwtSvid, SourceError};
use futures::future::BoxFuture;
use sigil::SpiffeId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Upper bound on cached tokens.
pub const MAX_CACHED_TOKENS: usize = 4096;

/// Wall-clock time in Unix seconds; injectable for tests.
pub trait Clock: Send + Sync + 'static {
    /// Now, Unix seconds.
    fn now_unix(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    entry_id: String,
    spiffe_id: SpiffeId,
    audience: String,
}

#[derive(Debug, Clone)]
struct Cached {
    svid: MintedJwtSvid,
    refresh_at: i64,
}

/// Caches JWT-SVIDs of an inner source. X.509 snapshots pass through.
pub struct JwtSvidCache<S> {
    inner: S,
    clock: Arc<dyn Clock>,
    tokens: Mutex<HashMap<Key, Cached>>,
}

impl<S> std::fmt::Debug for JwtSvidCache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self
            .tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        write!(f, "JwtSvidCache({n} tokens)")
    }
}

impl<S: IdentitySource> JwtSvidCache<S> {
    /// A cache in front of `inner`, on the system clock.
    pub fn new(inner: S) -> Self {
        Self::with_clock(inner, Arc::new(SystemClock))
    }

    /// A cache in front of `inner`, on `clock`.
    pub fn with_clock(inner: S, clock: Arc<dyn Clock>) -> Self {
        Self {
            inner,
            clock,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// The wrapped source.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Cached>> {
        // Entries are inserted whole; a poisoned map is still consistent.
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn fetch(&self, authorized: &AuthorizedAudience) -> Result<MintedJwtSvid, SourceError> {
        // Key-bound tokens are not cached: their `cnf` follows the entry's
        // current TPM key, which the cache cannot see.
        if authorized.entry().key_binding == KeyBinding::Tpm {
            return self.inner.fetch_jwt_svid(authorized).await;
        }
        let key = Key {
            entry_id: authorized.entry().id.clone(),
            spiffe_id: authorized.entry().spiffe_id.clone(),
            audience: authorized.audience().to_owned(),
        };
        let now = self.clock.now_unix();
        let cached = self.lock().get(&key).cloned();
        if let Some(c) = &cached
            && now < c.refresh_at
        {
            return Ok(c.svid.clone());
        }
        match self.inner.fetch_jwt_svid(authorized).await {
            Ok(svid) => {
                let minted_at = self.clock.now_unix();
                let life = svid.expiry.saturating_sub(minted_at).max(0);
                let entry = Cached {
                    refresh_at: minted_at.saturating_add(life / 2),
                    svid: svid.clone(),
                };
                let mut tokens = self.lock();
                if tokens.len() >= MAX_CACHED_TOKENS && !tokens.contains_key(&key) {
                    tokens.retain(|_, c| c.svid.expiry > minted_at);
                    if tokens.len() >= MAX_CACHED_TOKENS {
                        tokens.clear();
                    }
                }
                tokens.insert(key, entry);
                Ok(svid)
            }
            Err(SourceError::Unavailable(reason)) => match cached {
                Some(c) if now < c.svid.expiry => Ok(c.svid),
                _ => Err(SourceError::Unavailable(reason)),
            },
            Err(e) => {
                // The source refused (entry gone) or failed: drop the token.
                if matches!(e, SourceError::UnknownEntry(_)) {
                    self.lock().remove(&key);
                }
                Err(e)
            }
        }
    }
}

impl<S: IdentitySource> IdentitySource for JwtSvidCache<S> {
    fn subscribe(&self) -> watch::Receiver<Arc<IdentitySnapshot>> {
        self.inner.subscribe()
    }

    fn fetch_jwt_svid<'a>(
        &'a self,
        authorized: &'a AuthorizedAudience,
    ) -> BoxFuture<'a, Result<MintedJwtSvid, SourceError>> {
        Box::pin(self.fetch(authorized))
    }

    fn sign_with_bound_key<'a>(
        &'a self,
        entry: &'a RegistrationEntry,
        digest: [u8; 32],
    ) -> BoxFuture<'a, Result<[u8; 64], SourceError>> {
        self.inner.sign_with_bound_key(entry, digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{RegistrationEntry, authorize_jwt};
    use crate::local_ca::{LocalCa, LocalCaConfig};
    use crate::selector::Selector;
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
    use std::time::Duration;

    /// The real CA, wrapped to count mints and to simulate an outage.
    struct Flaky {
        ca: LocalCa,
        down: AtomicBool,
        mints: AtomicUsize,
    }

    impl IdentitySource for Flaky {
        fn subscribe(&self) -> watch::Receiver<Arc<IdentitySnapshot>> {
            self.ca.subscribe()
        }
        fn fetch_jwt_svid<'a>(
            &'a self,
            a: &'a AuthorizedAudience,
        ) -> BoxFuture<'a, Result<MintedJwtSvid, SourceError>> {
            if self.down.load(Ordering::SeqCst) {
                return Box::pin(async { Err(SourceError::Unavailable("server down".into())) });
            }
            self.mints.fetch_add(1, Ordering::SeqCst);
            self.ca.fetch_jwt_svid(a)
        }
    }

    struct FakeClock(AtomicI64);
    impl Clock for FakeClock {
        fn now_unix(&self) -> i64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn reuse_until_half_life_then_serve_cached_through_an_outage() {
        let ca = LocalCa::new(LocalCaConfig::new(
            sigil::TrustDomain::new("example.org").unwrap(),
        ))
        .unwrap();
        let mut e = RegistrationEntry::new(
            "e1",
            SpiffeId::parse("spiffe://example.org/w").unwrap(),
            vec![Selector::parse("unix:uid:1").unwrap()],
        );
        e.audiences = vec!["ehr-fhir".into(), "calendar".into()];
        e.jwt_ttl = Duration::from_secs(1000);
        ca.set_entries(vec![e]).unwrap();
        let snap = ca.subscribe().borrow().clone();
        let matched: Vec<_> = snap.entries.iter().collect();
        let ehr = authorize_jwt(&matched, None, "ehr-fhir").unwrap().remove(0);
        let cal = authorize_jwt(&matched, None, "calendar").unwrap().remove(0);

        let t0 = SystemClock.now_unix();
        let clock = Arc::new(FakeClock(AtomicI64::new(t0)));
        let cache = JwtSvidCache::with_clock(
            Flaky {
                ca,
                down: AtomicBool::new(false),
                mints: AtomicUsize::new(0),
            },
            clock.clone(),
        );
        let mints = || cache.inner().mints.load(Ordering::SeqCst);

        let a = cache.fetch_jwt_svid(&ehr).await.unwrap();
        let b = cache.fetch_jwt_svid(&ehr).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(mints(), 1);
        // Another audience is another token.
        let c = cache.fetch_jwt_svid(&cal).await.unwrap();
        assert_ne!(a.token, c.token);
        assert_eq!(mints(), 2);

        // Past half life: a fresh token.
        clock.0.store(t0 + 501, Ordering::SeqCst);
        let d = cache.fetch_jwt_svid(&ehr).await.unwrap();
        assert_ne!(a.token, d.token);
        assert_eq!(mints(), 3);

        // Outage: past half life of `d`, before its expiry: served cached.
        cache.inner().down.store(true, Ordering::SeqCst);
        clock.0.store(d.expiry - 10, Ordering::SeqCst);
        assert_eq!(cache.fetch_jwt_svid(&ehr).await.unwrap(), d);
        // After expiry: Unavailable.
        clock.0.store(d.expiry + 1, Ordering::SeqCst);
        assert!(matches!(
            cache.fetch_jwt_svid(&ehr).await,
            Err(SourceError::Unavailable(_))
        ));
        // A never-requested audience during the outage: Unavailable.
        let cache2 = JwtSvidCache::new(Flaky {
            ca: cache.inner().ca.clone(),
            down: AtomicBool::new(true),
            mints: AtomicUsize::new(0),
        });
        assert!(matches!(
            cache2.fetch_jwt_svid(&ehr).await,
            Err(SourceError::Unavailable(_))
        ));
    }
}
