//! Authentication's server side: simple tokens and password hashing. Who may do what is the
//! core's ([`geolock_core::auth`]); this module turns a request's token into a user.
//!
//! A simple token is etcd's: 16 random letters chosen by the member that checked the password,
//! a dot, and the log index of the Authenticate entry (`AbCd….42`). Every member registers it
//! when it applies that entry, so the token is valid on every member; a member that has not
//! applied the entry yet waits for it (the index says how long). Tokens live in memory only and
//! expire `auth_token_ttl` after their last use (etcd's 300 s by default); a restarted member
//! knows none, and its clients authenticate again, as with etcd.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use geolock_core::limits::{AUTH_PASSWORD_BYTES_MAX, SIMPLE_TOKENS_MAX};

/// Letters in a simple token's random part (etcd's `defaultSimpleTokenLength`).
const TOKEN_PREFIX_LETTERS: usize = 16;

/// Why a password could not be hashed or checked.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("a password of {len} bytes is over auth_password_bytes_max ({max}): bcrypt reads no more")]
    TooLong { len: usize, max: usize },
    #[error("bcrypt: {0}")]
    Bcrypt(#[from] bcrypt::BcryptError),
    #[error("password hashing stopped: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The bcrypt hash of `password` at `cost`, computed off the async runtime's threads (at etcd's
/// default cost 10 one hash takes about 50 ms of CPU).
pub async fn hash_password(password: String, cost: u32) -> Result<String, PasswordError> {
    if password.len() > AUTH_PASSWORD_BYTES_MAX {
        return Err(PasswordError::TooLong { len: password.len(), max: AUTH_PASSWORD_BYTES_MAX });
    }
    Ok(tokio::task::spawn_blocking(move || bcrypt::hash(password, cost)).await??)
}

/// Whether `password` matches the bcrypt `hash`, checked off the async runtime's threads. A
/// hash that does not parse matches nothing.
pub async fn password_matches(password: String, hash: String) -> Result<bool, PasswordError> {
    if password.len() > AUTH_PASSWORD_BYTES_MAX {
        return Ok(false);
    }
    Ok(tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false)).await?)
}

/// A fresh random token prefix: 16 letters.
pub fn new_token_prefix() -> String {
    use rand::Rng;
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut rng = rand::rng();
    (0..TOKEN_PREFIX_LETTERS).map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char).collect()
}

/// The log index a simple token names, if it is shaped as one.
pub fn token_index(token: &str) -> Option<u64> {
    let (prefix, index) = token.split_once('.')?;
    (prefix.len() == TOKEN_PREFIX_LETTERS).then_some(())?;
    index.parse().ok()
}

struct Held {
    user: String,
    expires: Instant,
}

/// The simple tokens this member knows, each with its user and when it expires.
pub struct SimpleTokens {
    ttl: Duration,
    held: Mutex<HashMap<String, Held>>,
}

impl SimpleTokens {
    /// No tokens; each lives `ttl` after its last use.
    pub fn new(ttl: Duration) -> Self {
        SimpleTokens { ttl, held: Mutex::new(HashMap::new()) }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().expect("token table poisoned")
    }

    /// Register `token` for `user`, as the entry that authenticated it is applied. At
    /// [`SIMPLE_TOKENS_MAX`] the expired tokens go, and if none had expired, the one closest
    /// to expiring.
    pub fn assign(&self, token: String, user: String, now: Instant) {
        let mut held = self.held();
        if held.len() >= SIMPLE_TOKENS_MAX {
            held.retain(|_, h| h.expires > now);
            if held.len() >= SIMPLE_TOKENS_MAX {
                let soonest = held.iter().min_by_key(|(_, h)| h.expires).map(|(t, _)| t.clone());
                if let Some(t) = soonest {
                    held.remove(&t);
                }
            }
        }
        held.insert(token, Held { user, expires: now + self.ttl });
    }

    /// The user of a live token, whose life starts again from `now` (etcd extends a simple
    /// token's TTL on every use).
    pub fn user(&self, token: &str, now: Instant) -> Option<String> {
        let mut held = self.held();
        let h = held.get_mut(token)?;
        if h.expires <= now {
            held.remove(token);
            return None;
        }
        h.expires = now + self.ttl;
        Some(h.user.clone())
    }

    /// Forget every token of `user` (deleted, or given a new password).
    pub fn invalidate_user(&self, user: &str) {
        self.held().retain(|_, h| h.user != user);
    }

    /// Forget every token (authentication turned off, or a snapshot replaced the auth store).
    pub fn clear(&self) {
        self.held().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_lives_its_ttl_after_its_last_use() {
        let t = SimpleTokens::new(Duration::from_secs(10));
        let at = Instant::now();
        t.assign("a".into(), "alice".into(), at);
        assert_eq!(t.user("a", at + Duration::from_secs(9)), Some("alice".into()));
        assert_eq!(t.user("a", at + Duration::from_secs(18)), Some("alice".into()), "extended by the use at 9 s");
        assert_eq!(t.user("a", at + Duration::from_secs(28)), None);
        assert_eq!(t.user("a", at), None, "gone once expired");
    }

    #[test]
    fn invalidating_a_user_forgets_only_their_tokens() {
        let t = SimpleTokens::new(Duration::from_secs(10));
        let at = Instant::now();
        t.assign("a1".into(), "alice".into(), at);
        t.assign("a2".into(), "alice".into(), at);
        t.assign("b".into(), "bob".into(), at);
        t.invalidate_user("alice");
        assert_eq!((t.user("a1", at), t.user("a2", at)), (None, None));
        assert_eq!(t.user("b", at), Some("bob".into()));
    }

    #[test]
    fn tokens_are_shaped_as_etcds() {
        let p = new_token_prefix();
        assert!(p.len() == 16 && p.bytes().all(|b| b.is_ascii_alphabetic()));
        assert_eq!(token_index(&format!("{p}.42")), Some(42));
        for bad in ["", "x.1", &format!("{p}.x"), &format!("{p}42")] {
            assert_eq!(token_index(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn passwords_hash_with_bcrypt_and_overlong_ones_are_refused() {
        let h = hash_password("secret".into(), 4).await.unwrap();
        assert!(h.starts_with("$2b$04$"));
        assert!(password_matches("secret".into(), h.clone()).await.unwrap());
        assert!(!password_matches("Secret".into(), h.clone()).await.unwrap());
        assert!(!password_matches("secret".into(), "not a hash".into()).await.unwrap());
        let long = "p".repeat(AUTH_PASSWORD_BYTES_MAX + 1);
        assert!(matches!(hash_password(long, 4).await, Err(PasswordError::TooLong { len: 73, max: 72 })));
    }
}
