//! Authentication's server side: simple tokens and password hashing. Who may do what is the
//! core's ([`geolock_core::auth`]); this module turns a request's token into a user.
//!
//! A simple token is etcd's: 16 random letters chosen by the member that checked the password,
//! a dot, and the log index of the Authenticate entry (`AbCd….42`). Every member registers it
//! when it applies that entry, so the token is valid on every member; a member that has not
//! applied the entry yet waits for it (the index says how long). Tokens live in memory only and
//! expire `auth_token_ttl` after their last use (etcd's 300 s by default); a restarted member
//! knows none, and its clients authenticate again, as with etcd.
//!
//! Or tokens are etcd's JSON Web Tokens ([`JwtTokens`]): signed by the member that checked the
//! password, verified by any member with the public key, nothing kept.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use geolock_core::auth::Caller;
use geolock_core::limits::{AUTH_PASSWORD_BYTES_MAX, AUTH_TOKEN_TTL_S_MAX, BCRYPT_QUEUED_MAX, SIMPLE_TOKENS_MAX};

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
    #[error("too many password checks waiting (bcrypt_queued_max {max})")]
    Busy { max: usize },
}

/// bcrypt runs on at most half of this machine's cores (at least one), whoever asks: anyone
/// may call Authenticate, and a thousand callers at once with all cores hashing would starve
/// the threads that send the leader's heartbeats, and the cluster would elect another.
static BCRYPT: std::sync::LazyLock<BcryptPool> = std::sync::LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    BcryptPool::new((cores / 2).max(1), BCRYPT_QUEUED_MAX)
});

/// bcrypt work: at most `slots` computations at once, each on a blocking thread, and at most
/// `queued_max` callers waiting for a slot.
struct BcryptPool {
    slots: tokio::sync::Semaphore,
    queued: std::sync::atomic::AtomicUsize,
    queued_max: usize,
}

impl BcryptPool {
    fn new(slots: usize, queued_max: usize) -> BcryptPool {
        BcryptPool { slots: tokio::sync::Semaphore::new(slots), queued: 0.into(), queued_max }
    }

    /// Run `f` once a slot is free; refused at once with `queued_max` callers already waiting.
    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, PasswordError> {
        use std::sync::atomic::Ordering;
        struct Queued<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Queued<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.queued_max {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(PasswordError::Busy { max: self.queued_max });
        }
        let queued = Queued(&self.queued);
        let _slot = self.slots.acquire().await.expect("the bcrypt semaphore is never closed");
        drop(queued);
        Ok(tokio::task::spawn_blocking(f).await?)
    }
}

/// The bcrypt hash of `password` at `cost`, computed off the async runtime's threads (at etcd's
/// default cost 10 one hash takes about 50 ms of CPU).
pub async fn hash_password(password: String, cost: u32) -> Result<String, PasswordError> {
    if password.len() > AUTH_PASSWORD_BYTES_MAX {
        return Err(PasswordError::TooLong { len: password.len(), max: AUTH_PASSWORD_BYTES_MAX });
    }
    Ok(BCRYPT.run(move || bcrypt::hash(password, cost)).await??)
}

/// Whether `password` matches the bcrypt `hash`, checked off the async runtime's threads. A
/// hash that does not parse matches nothing.
pub async fn password_matches(password: String, hash: String) -> Result<bool, PasswordError> {
    if password.len() > AUTH_PASSWORD_BYTES_MAX {
        return Ok(false);
    }
    BCRYPT.run(move || bcrypt::verify(password, &hash).unwrap_or(false)).await
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

/// The tokens by name, and the same tokens by expiry, so that the expired ones and, at the
/// bound, the one closest to expiring are found in O(log n) rather than by a scan of up to
/// [`SIMPLE_TOKENS_MAX`] on every Authenticate applied.
#[derive(Default)]
struct Table {
    by_token: HashMap<String, Held>,
    by_expiry: BTreeSet<(Instant, String)>,
}

impl Table {
    fn remove(&mut self, token: &str) -> Option<Held> {
        let h = self.by_token.remove(token)?;
        self.by_expiry.remove(&(h.expires, token.to_string()));
        Some(h)
    }

    fn insert(&mut self, token: String, held: Held) {
        self.remove(&token);
        self.by_expiry.insert((held.expires, token.clone()));
        self.by_token.insert(token, held);
    }
}

/// The simple tokens this member knows, each with its user and when it expires.
pub struct SimpleTokens {
    /// How long a token lives after its last use; `None` when this member's tokens are JWTs
    /// and no simple token is kept.
    ttl: Option<Duration>,
    /// At most this many tokens ([`SIMPLE_TOKENS_MAX`]; smaller in tests).
    max: usize,
    table: Mutex<Table>,
}

impl SimpleTokens {
    /// No tokens; each lives `ttl` after its last use.
    pub fn new(ttl: Duration) -> Self {
        SimpleTokens { ttl: Some(ttl), max: SIMPLE_TOKENS_MAX, table: Mutex::default() }
    }

    /// No tokens, and none kept: the member's tokens are JWTs, which carry their user.
    pub fn none() -> Self {
        SimpleTokens { ttl: None, max: 0, table: Mutex::default() }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("token table poisoned")
    }

    /// Register `token` for `user`, as the entry that authenticated it is applied. Expired
    /// tokens go first; at the bound, the one closest to expiring goes too.
    pub fn assign(&self, token: String, user: String, now: Instant) {
        let Some(ttl) = self.ttl else { return };
        let mut t = self.table();
        while let Some((expires, oldest)) = t.by_expiry.first().cloned() {
            if expires > now && t.by_token.len() < self.max {
                break;
            }
            t.remove(&oldest);
        }
        t.insert(token, Held { user, expires: now + ttl });
    }

    /// The user of a live token, whose life starts again from `now` (etcd extends a simple
    /// token's TTL on every use).
    pub fn user(&self, token: &str, now: Instant) -> Option<String> {
        let ttl = self.ttl?;
        let mut t = self.table();
        let held = t.remove(token)?;
        if held.expires <= now {
            return None;
        }
        let user = held.user.clone();
        t.insert(token.to_string(), Held { expires: now + ttl, ..held });
        Some(user)
    }

    /// Forget every token of `user` (deleted, or given a new password).
    pub fn invalidate_user(&self, user: &str) {
        let mut t = self.table();
        let theirs: Vec<String> = t.by_token.iter().filter(|(_, h)| h.user == user).map(|(k, _)| k.clone()).collect();
        for token in theirs {
            t.remove(&token);
        }
    }

    /// Forget every token (authentication turned off, or a snapshot replaced the auth store).
    pub fn clear(&self) {
        *self.table() = Table::default();
    }
}

/// What `--auth-token` asks for (etcd's option string): `simple`, or
/// `jwt,pub-key=FILE,priv-key=FILE,sign-method=RS256,ttl=5m`.
pub enum TokenProvider {
    Simple,
    Jwt(JwtTokens),
}

/// Why `--auth-token` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenOptionError {
    #[error("auth_token {0:?}: the provider is simple or jwt")]
    UnknownProvider(String),
    #[error("auth_token: jwt option {0:?} is not pub-key, priv-key, sign-method or ttl")]
    UnknownOption(String),
    #[error("auth_token: jwt needs {0}")]
    Missing(&'static str),
    #[error("auth_token: sign-method {0:?} is not one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384")]
    SignMethod(String),
    #[error("auth_token: ttl {value:?}: {why}")]
    Ttl { value: String, why: String },
    #[error("auth_token: {path}: {why}")]
    Key { path: String, why: String },
}

/// JSON Web Tokens as etcd makes them: claims `username`, `revision` (the auth revision the
/// password was checked at) and `exp`, signed with the member's private key. Any member with
/// the public key verifies them, a restarted one too: nothing about them is kept.
pub struct JwtTokens {
    algorithm: jsonwebtoken::Algorithm,
    /// `None` on a member given only the public key: it verifies tokens but makes none.
    signing: Option<jsonwebtoken::EncodingKey>,
    verifying: jsonwebtoken::DecodingKey,
    ttl: Duration,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    /// Seconds since the Unix epoch.
    exp: u64,
}

/// etcd's default JWT lifetime (its `--auth-token` `ttl` option).
const JWT_TTL_DEFAULT: Duration = Duration::from_secs(5 * 60);

impl TokenProvider {
    /// Parse etcd's `--auth-token` value and read the keys it names.
    pub fn from_option(option: &str) -> Result<TokenProvider, TokenOptionError> {
        use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
        let mut parts = option.split(',');
        match parts.next().unwrap_or_default() {
            "simple" => return Ok(TokenProvider::Simple),
            "jwt" => {}
            other => return Err(TokenOptionError::UnknownProvider(other.to_string())),
        }
        let (mut public, mut private, mut method, mut ttl) = (None, None, None, JWT_TTL_DEFAULT);
        for part in parts {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            match k {
                "pub-key" => public = Some(v.to_string()),
                "priv-key" => private = Some(v.to_string()),
                "sign-method" => method = Some(v.to_string()),
                "ttl" => {
                    ttl = humantime::parse_duration(v)
                        .map_err(|e| TokenOptionError::Ttl { value: v.into(), why: e.to_string() })?;
                    let max = Duration::from_secs(AUTH_TOKEN_TTL_S_MAX);
                    if ttl.is_zero() || ttl > max {
                        let why = format!("must be more than 0 and at most {max:?} (auth_token_ttl_s_max)");
                        return Err(TokenOptionError::Ttl { value: v.into(), why });
                    }
                }
                _ => return Err(TokenOptionError::UnknownOption(part.to_string())),
            }
        }
        let method = method.ok_or(TokenOptionError::Missing("sign-method"))?;
        let algorithm = match method.as_str() {
            "RS256" => Algorithm::RS256,
            "RS384" => Algorithm::RS384,
            "RS512" => Algorithm::RS512,
            "PS256" => Algorithm::PS256,
            "PS384" => Algorithm::PS384,
            "PS512" => Algorithm::PS512,
            "ES256" => Algorithm::ES256,
            "ES384" => Algorithm::ES384,
            _ => return Err(TokenOptionError::SignMethod(method)),
        };
        let ec = matches!(algorithm, Algorithm::ES256 | Algorithm::ES384);
        let read = |path: &str| {
            std::fs::read(path).map_err(|e| TokenOptionError::Key { path: path.into(), why: e.to_string() })
        };
        let bad = |path: &str, e: jsonwebtoken::errors::Error| TokenOptionError::Key {
            path: path.into(),
            why: e.to_string(),
        };
        let public = public.ok_or(TokenOptionError::Missing("pub-key"))?;
        let pem = read(&public)?;
        let verifying = if ec { DecodingKey::from_ec_pem(&pem) } else { DecodingKey::from_rsa_pem(&pem) }
            .map_err(|e| bad(&public, e))?;
        let signing = match private {
            None => None,
            Some(path) => {
                let pem = read(&path)?;
                Some(
                    if ec { EncodingKey::from_ec_pem(&pem) } else { EncodingKey::from_rsa_pem(&pem) }
                        .map_err(|e| bad(&path, e))?,
                )
            }
        };
        Ok(TokenProvider::Jwt(JwtTokens { algorithm, signing, verifying, ttl }))
    }
}

impl JwtTokens {
    /// A token for `user`, whose password was checked at auth `revision`; `None` on a member
    /// without the private key.
    pub fn issue(&self, user: &str, revision: u64, now: SystemTime) -> Option<String> {
        let key = self.signing.as_ref()?;
        let exp = (now + self.ttl).duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let claims = Claims { username: user.to_string(), revision, exp };
        jsonwebtoken::encode(&jsonwebtoken::Header::new(self.algorithm), &claims, key).ok()
    }

    /// The caller a token names, if its signature is this cluster's and it has not expired.
    pub fn verify(&self, token: &str) -> Option<Caller> {
        let mut v = jsonwebtoken::Validation::new(self.algorithm);
        // etcd allows no leeway: a token is dead at its `exp`.
        v.leeway = 0;
        let data = jsonwebtoken::decode::<Claims>(token, &self.verifying, &v).ok()?;
        Some(Caller { user: data.claims.username, revision: data.claims.revision })
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
    fn at_the_bound_expired_tokens_go_first_then_the_one_closest_to_expiring() {
        let t = SimpleTokens { max: 3, ..SimpleTokens::new(Duration::from_secs(10)) };
        let at = Instant::now();
        let s = Duration::from_secs;
        t.assign("a".into(), "alice".into(), at);
        t.assign("b".into(), "bob".into(), at + s(1));
        t.assign("c".into(), "carol".into(), at + s(2));
        // a was used last: b is now closest to expiring, and goes for d.
        assert_eq!(t.user("a", at + s(3)), Some("alice".into()));
        t.assign("d".into(), "dave".into(), at + s(4));
        assert_eq!(t.user("b", at + s(4)), None, "closest to expiring at the bound");
        assert_eq!(t.user("c", at + s(4)), Some("carol".into()));
        // By 16 s the others have expired (a last used at 3 s, c and d at 4 s): they go, and
        // e is alone in the table.
        t.assign("e".into(), "erin".into(), at + s(16));
        assert_eq!(t.table().by_token.len(), 1);
        assert_eq!(t.table().by_expiry.len(), 1);
        assert_eq!(t.user("e", at + s(16)), Some("erin".into()));
    }

    #[test]
    fn a_member_with_jwts_keeps_no_simple_token() {
        let t = SimpleTokens::none();
        let at = Instant::now();
        t.assign("a".into(), "alice".into(), at);
        assert_eq!(t.user("a", at), None);
        assert!(t.table().by_token.is_empty());
    }

    #[tokio::test]
    async fn password_checks_past_the_queue_bound_are_refused_at_once() {
        let pool = std::sync::Arc::new(BcryptPool::new(1, 3));
        // The one slot taken: three callers queue, the fourth is refused.
        let slot = pool.slots.acquire().await.unwrap();
        let queued: Vec<_> = (0..3)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.run(move || i).await })
            })
            .collect();
        while pool.queued.load(std::sync::atomic::Ordering::SeqCst) < 3 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(pool.run(|| 9).await, Err(PasswordError::Busy { max: 3 })));
        drop(slot);
        for (i, q) in queued.into_iter().enumerate() {
            assert_eq!(q.await.unwrap().unwrap(), i, "a queued call ran once the slot was free");
        }
        assert_eq!(pool.run(|| 9).await.unwrap(), 9, "the queue drained");
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

    /// An ES256 key pair as PEM files in `dir`: (public, private).
    fn ec_keys(dir: &std::path::Path, stem: &str) -> (String, String) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (public, private) = (dir.join(format!("{stem}.pub")), dir.join(format!("{stem}.key")));
        std::fs::write(&public, pair.public_key_pem()).unwrap();
        std::fs::write(&private, pair.serialize_pem()).unwrap();
        (public.display().to_string(), private.display().to_string())
    }

    fn jwt(option: &str) -> JwtTokens {
        match TokenProvider::from_option(option) {
            Ok(TokenProvider::Jwt(j)) => j,
            Ok(TokenProvider::Simple) => panic!("{option}: simple"),
            Err(e) => panic!("{option}: {e}"),
        }
    }

    #[test]
    fn a_jwt_names_its_user_and_revision_until_it_expires_and_only_for_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let (public, private) = ec_keys(dir.path(), "a");
        let (other_public, other_private) = ec_keys(dir.path(), "b");
        let signer = jwt(&format!("jwt,pub-key={public},priv-key={private},sign-method=ES256,ttl=1m"));
        let verifier = jwt(&format!("jwt,pub-key={public},sign-method=ES256"));
        let stranger = jwt(&format!("jwt,pub-key={other_public},priv-key={other_private},sign-method=ES256"));
        let now = SystemTime::now();
        let token = signer.issue("alice", 7, now).unwrap();
        assert_eq!(verifier.verify(&token), Some(Caller { user: "alice".into(), revision: 7 }));
        assert_eq!(stranger.verify(&token), None, "signed with another key");
        assert_eq!(verifier.issue("alice", 7, now), None, "a member with the public key only makes none");
        let expired = signer.issue("alice", 7, now - Duration::from_secs(61)).unwrap();
        assert_eq!(verifier.verify(&expired), None);
        let mut forged = token.clone();
        forged.insert(token.find('.').unwrap() + 2, 'x');
        assert_eq!(verifier.verify(&forged), None);
    }

    #[test]
    fn auth_token_options_are_etcds_and_bad_ones_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let (public, private) = ec_keys(dir.path(), "a");
        assert!(matches!(TokenProvider::from_option("simple"), Ok(TokenProvider::Simple)));
        let cases = [
            ("opaque".to_string(), "provider is simple or jwt"),
            (format!("jwt,pub-key={public},sign-method=HS256"), "sign-method \"HS256\""),
            (format!("jwt,pub-key={public}"), "needs sign-method"),
            ("jwt,sign-method=ES256".to_string(), "needs pub-key"),
            (format!("jwt,pub-key={public},sign-method=ES256,ttl=0s"), "ttl \"0s\""),
            (format!("jwt,pub-key={public},sign-method=ES256,ttl=soon"), "ttl \"soon\""),
            (format!("jwt,pub-key={public},sign-method=ES256,color=red"), "\"color=red\" is not"),
            (format!("jwt,pub-key={}/missing.pub,sign-method=ES256", dir.path().display()), "missing.pub"),
            (format!("jwt,pub-key={private},sign-method=RS256"), "a.key"),
        ];
        for (option, says) in cases {
            match TokenProvider::from_option(&option) {
                Err(e) => assert!(e.to_string().contains(says), "{option}: {e}"),
                Ok(_) => panic!("{option}: accepted"),
            }
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
