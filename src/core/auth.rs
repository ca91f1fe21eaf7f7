//! The auth store: users, roles, per-key-range permissions and whether authentication is on,
//! replicated through the log like the key space, with etcd's rules and errors (etcd's
//! `server/auth/store.go` and `range_perm_cache.go`).
//!
//! Pure: passwords arrive already hashed (bcrypt, hashed by the API off the apply path), tokens
//! are the server's, and every check takes the caller's [`Caller`] as the API found it.
//!
//! Shapes, as etcd's:
//! - A permission covers `[key, range_end)`: `range_end` empty means the one key `key`,
//!   `range_end` `\0` means every key from `key` on. `key` `\0` with `range_end` `\0` is every
//!   key.
//! - A request's range is permitted when the union of the permissions of that type granted to
//!   the user's roles covers all of it; a user with role `root` may do anything.
//! - The auth revision starts at 1 and grows by one with every change to users, roles or
//!   permissions (and with disabling); a caller whose revision is older than the store's is
//!   refused with [`AuthError::OldRevision`], so that it authenticates again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::limits::{
    AUTH_NAME_BYTES_MAX, AUTH_ROLES_MAX, AUTH_USERS_MAX, KEY_BYTES_MAX, PERMISSIONS_PER_ROLE_MAX, ROLES_PER_USER_MAX,
};
use crate::storage::{Cf, Engine, StorageError, WriteBatch};

/// The user that may do anything once it has the role of the same name (etcd's `rootUser`).
pub const ROOT_USER: &str = "root";
/// The role that permits everything (etcd's `rootRole`).
pub const ROOT_ROLE: &str = "root";

/// What a permission allows, numbered as etcd's `authpb.Permission.Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PermType {
    Read,
    Write,
    ReadWrite,
}

impl PermType {
    /// From etcd's wire number (READ 0, WRITE 1, READWRITE 2).
    pub fn from_wire(n: i32) -> Option<PermType> {
        match n {
            0 => Some(PermType::Read),
            1 => Some(PermType::Write),
            2 => Some(PermType::ReadWrite),
            _ => None,
        }
    }

    /// etcd's wire number.
    pub fn wire(self) -> i32 {
        match self {
            PermType::Read => 0,
            PermType::Write => 1,
            PermType::ReadWrite => 2,
        }
    }

    fn allows(self, need: Access) -> bool {
        matches!(
            (self, need),
            (PermType::ReadWrite, _) | (PermType::Read, Access::Read) | (PermType::Write, Access::Write)
        )
    }
}

/// A permission on a key or a range of keys (see the module's shapes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    pub perm_type: PermType,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
}

/// A user as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    /// The bcrypt hash of the password; `None` for a user added with etcd's `--no-password`,
    /// who can only be authenticated by a client certificate.
    pub password_hash: Option<String>,
    /// Granted roles, sorted, without repeats.
    pub roles: Vec<String>,
}

impl User {
    fn is_root(&self) -> bool {
        self.roles.binary_search_by(|r| r.as_str().cmp(ROOT_ROLE)).is_ok()
    }
}

/// A role as stored: its permissions sorted by key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    pub name: String,
    pub permissions: Vec<Permission>,
}

/// Who sends a request, as the API established it (etcd's `AuthInfo`): the user named by a
/// valid token or client certificate, and the auth revision that token was issued at (a simple
/// token's is the store's revision when it is looked up).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub user: String,
    pub revision: u64,
}

/// One change to the auth store, carried by a log entry. Passwords are bcrypt hashes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthRequest {
    Enable,
    Disable,
    /// `password_hash` `None`: a user without a password (etcd's `no_password` option).
    UserAdd {
        name: String,
        password_hash: Option<String>,
    },
    UserDelete {
        name: String,
    },
    UserChangePassword {
        name: String,
        password_hash: String,
    },
    UserGrantRole {
        user: String,
        role: String,
    },
    UserRevokeRole {
        name: String,
        role: String,
    },
    RoleAdd {
        name: String,
    },
    RoleDelete {
        role: String,
    },
    RoleGrantPermission {
        name: String,
        permission: Permission,
    },
    RoleRevokePermission {
        role: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        range_end: Vec<u8>,
    },
    /// A password already checked by the member that received it, against the hash the store
    /// held at auth revision `checked_at`; the token is made of `token_prefix` and the entry's
    /// log index where the entry is applied. Refused with [`AuthError::OldRevision`] if the
    /// store moved on in between (the password may have changed), so no token is ever made
    /// for a password that was no longer the user's.
    Authenticate {
        name: String,
        token_prefix: String,
        checked_at: u64,
    },
}

impl AuthRequest {
    /// Whether only a root user may make it (etcd's `needAdminPermission`). Authenticate is
    /// anyone's.
    pub fn needs_admin(&self) -> bool {
        !matches!(self, AuthRequest::Authenticate { .. })
    }

    /// The user or role name it carries that must fit [`AUTH_NAME_BYTES_MAX`].
    fn names(&self) -> Vec<&str> {
        match self {
            AuthRequest::Enable | AuthRequest::Disable => vec![],
            AuthRequest::UserAdd { name, .. }
            | AuthRequest::UserDelete { name }
            | AuthRequest::UserChangePassword { name, .. }
            | AuthRequest::RoleAdd { name }
            | AuthRequest::Authenticate { name, .. }
            | AuthRequest::RoleGrantPermission { name, .. } => vec![name],
            AuthRequest::RoleDelete { role } | AuthRequest::RoleRevokePermission { role, .. } => vec![role],
            AuthRequest::UserGrantRole { user: name, role } | AuthRequest::UserRevokeRole { name, role } => {
                vec![name, role]
            }
        }
    }
}

/// Why an auth request or a permission check failed. The messages are etcd's, to the byte
/// (its `rpctypes`), except for geolock's bounds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum AuthError {
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: authentication is not enabled")]
    NotEnabled,
    #[error("etcdserver: invalid auth token")]
    InvalidToken,
    /// Deleting `root`, revoking `root` from `root` while auth is on, or a permission whose
    /// range is empty.
    #[error("etcdserver: invalid auth management")]
    InvalidMgmt,
    #[error("etcdserver: revision of auth store is old")]
    OldRevision,
    #[error("etcdserver: a user or role name of {len} bytes is over auth_name_bytes_max ({max})")]
    NameTooLong { len: usize, max: usize },
    #[error("etcdserver: a permission's key or range end of {len} bytes is over key_bytes_max ({max})")]
    KeyTooLarge { len: usize, max: usize },
    #[error("etcdserver: too many users (auth_users_max {max})")]
    TooManyUsers { max: usize },
    #[error("etcdserver: too many roles (auth_roles_max {max})")]
    TooManyRoles { max: usize },
    #[error("etcdserver: too many roles granted to one user (roles_per_user_max {max})")]
    TooManyRolesOfUser { max: usize },
    #[error("etcdserver: too many permissions granted to one role (permissions_per_role_max {max})")]
    TooManyPermissions { max: usize },
}

/// What a request needs of a key range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Users, roles, whether authentication is on, and the auth revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthStore {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
}

impl Default for AuthStore {
    fn default() -> Self {
        AuthStore::new()
    }
}

const ENABLED: &[u8] = b"enabled";
const REVISION: &[u8] = b"revision";
const USER: &[u8] = b"user/";
const ROLE: &[u8] = b"role/";

fn corrupt(what: &'static str) -> impl Fn(postcard::Error) -> StorageError {
    move |e| StorageError::Corrupt { what, detail: e.to_string() }
}

impl AuthStore {
    /// No users, no roles, authentication off, revision 1 (etcd's first).
    pub fn new() -> Self {
        AuthStore { enabled: false, revision: 1, users: BTreeMap::new(), roles: BTreeMap::new() }
    }

    /// Read back what [`AuthStore::apply`] wrote.
    pub fn load(engine: &dyn Engine) -> Result<Self, StorageError> {
        let mut s = AuthStore::new();
        if let Some(v) = engine.get(Cf::Auth, ENABLED)? {
            s.enabled = postcard::from_bytes(&v).map_err(corrupt("auth enabled"))?;
        }
        if let Some(v) = engine.get(Cf::Auth, REVISION)? {
            s.revision = postcard::from_bytes(&v).map_err(corrupt("auth revision"))?;
        }
        for (k, v) in engine.scan(Cf::Auth, USER, Some(&prefix_end(USER)), usize::MAX)? {
            let u: User = postcard::from_bytes(&v).map_err(corrupt("auth user"))?;
            debug_assert_eq!(&k[USER.len()..], u.name.as_bytes());
            s.users.insert(u.name.clone(), u);
        }
        for (_, v) in engine.scan(Cf::Auth, ROLE, Some(&prefix_end(ROLE)), usize::MAX)? {
            let r: Role = postcard::from_bytes(&v).map_err(corrupt("auth role"))?;
            s.roles.insert(r.name.clone(), r);
        }
        Ok(s)
    }

    /// Whether authentication is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The auth revision.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// A user, if it exists.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    /// A role, if it exists. The `root` role need not be added to be granted, as in etcd; it
    /// is then reported with its one permission, READWRITE on every key.
    pub fn role(&self, name: &str) -> Option<Role> {
        match self.roles.get(name) {
            Some(r) if name == ROOT_ROLE => Some(Role { name: r.name.clone(), permissions: vec![root_permission()] }),
            Some(r) => Some(r.clone()),
            None => None,
        }
    }

    /// Every user's name, sorted.
    pub fn user_names(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    /// Every role's name, sorted.
    pub fn role_names(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    /// Whether `user` exists and has role `role` (etcd's `HasRole`).
    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.roles.iter().any(|r| r == role))
    }

    /// Check a request's names against the bounds before it is proposed.
    pub fn validate(req: &AuthRequest) -> Result<(), AuthError> {
        for name in req.names() {
            if name.len() > AUTH_NAME_BYTES_MAX {
                return Err(AuthError::NameTooLong { len: name.len(), max: AUTH_NAME_BYTES_MAX });
            }
        }
        let (key, range_end) = match req {
            AuthRequest::RoleGrantPermission { permission: p, .. } => (&p.key, &p.range_end),
            AuthRequest::RoleRevokePermission { key, range_end, .. } => (key, range_end),
            _ => return Ok(()),
        };
        // A permission names keys: no key or range end could be longer than a key may be.
        if let Some(len) = [key.len(), range_end.len()].into_iter().find(|&l| l > KEY_BYTES_MAX) {
            return Err(AuthError::KeyTooLarge { len, max: KEY_BYTES_MAX });
        }
        if matches!(req, AuthRequest::RoleGrantPermission { .. }) && !valid_permission_range(key, range_end) {
            return Err(AuthError::InvalidMgmt);
        }
        Ok(())
    }

    /// Apply one change; on error nothing changed. `who` is the caller the proposing member
    /// established (`None`: none was given); changes other than Authenticate need a root caller
    /// while authentication is on. Returns the name Authenticate authenticated.
    pub fn apply(
        &mut self,
        req: &AuthRequest,
        who: Option<&Caller>,
        batch: &mut WriteBatch,
    ) -> Result<Option<String>, AuthError> {
        // Who asks comes first: a caller who may not make the change learns nothing about
        // what was wrong with it (etcd's applier checks admin before anything else).
        if req.needs_admin() {
            self.check_admin(who)?;
        }
        AuthStore::validate(req)?;
        match req {
            AuthRequest::Enable => {
                if self.enabled {
                    return Ok(None);
                }
                let root = self.users.get(ROOT_USER).ok_or(AuthError::RootUserNotExist)?;
                if !root.is_root() {
                    return Err(AuthError::RootRoleNotExist);
                }
                self.enabled = true;
                batch.put(Cf::Auth, ENABLED.to_vec(), encode(&true));
                // etcd does not move the revision on enable: tokens issued before stay valid.
                return Ok(None);
            }
            AuthRequest::Disable => {
                if !self.enabled {
                    return Ok(None);
                }
                self.enabled = false;
                batch.put(Cf::Auth, ENABLED.to_vec(), encode(&false));
            }
            AuthRequest::UserAdd { name, password_hash } => {
                if name.is_empty() {
                    return Err(AuthError::UserEmpty);
                }
                if self.users.contains_key(name) {
                    return Err(AuthError::UserAlreadyExist);
                }
                if self.users.len() >= AUTH_USERS_MAX {
                    return Err(AuthError::TooManyUsers { max: AUTH_USERS_MAX });
                }
                let u = User { name: name.clone(), password_hash: password_hash.clone(), roles: vec![] };
                self.put_user(u, batch);
            }
            AuthRequest::UserDelete { name } => {
                if self.enabled && name == ROOT_USER {
                    return Err(AuthError::InvalidMgmt);
                }
                self.users.remove(name).ok_or(AuthError::UserNotFound)?;
                batch.delete(Cf::Auth, user_key(name));
            }
            AuthRequest::UserChangePassword { name, password_hash } => {
                let mut u = self.users.get(name).ok_or(AuthError::UserNotFound)?.clone();
                // A user added without a password keeps none (etcd ignores the new one).
                if u.password_hash.is_some() {
                    u.password_hash = Some(password_hash.clone());
                }
                self.put_user(u, batch);
            }
            AuthRequest::UserGrantRole { user, role } => {
                let mut u = self.users.get(user).ok_or(AuthError::UserNotFound)?.clone();
                if role != ROOT_ROLE && !self.roles.contains_key(role) {
                    return Err(AuthError::RoleNotFound);
                }
                match u.roles.binary_search(role) {
                    // etcd ignores a repeated grant, and its revision stays.
                    Ok(_) => return Ok(None),
                    Err(at) => {
                        if u.roles.len() >= ROLES_PER_USER_MAX {
                            return Err(AuthError::TooManyRolesOfUser { max: ROLES_PER_USER_MAX });
                        }
                        u.roles.insert(at, role.clone());
                    }
                }
                self.put_user(u, batch);
            }
            AuthRequest::UserRevokeRole { name, role } => {
                if self.enabled && name == ROOT_USER && role == ROOT_ROLE {
                    return Err(AuthError::InvalidMgmt);
                }
                let mut u = self.users.get(name).ok_or(AuthError::UserNotFound)?.clone();
                let at = u.roles.binary_search(role).map_err(|_| AuthError::RoleNotGranted)?;
                u.roles.remove(at);
                self.put_user(u, batch);
            }
            AuthRequest::RoleAdd { name } => {
                if name.is_empty() {
                    return Err(AuthError::RoleEmpty);
                }
                if self.roles.contains_key(name) {
                    return Err(AuthError::RoleAlreadyExist);
                }
                if self.roles.len() >= AUTH_ROLES_MAX {
                    return Err(AuthError::TooManyRoles { max: AUTH_ROLES_MAX });
                }
                self.put_role(Role { name: name.clone(), permissions: vec![] }, batch);
            }
            AuthRequest::RoleDelete { role } => {
                if self.enabled && role == ROOT_ROLE {
                    return Err(AuthError::InvalidMgmt);
                }
                self.roles.remove(role).ok_or(AuthError::RoleNotFound)?;
                batch.delete(Cf::Auth, role_key(role));
                let holders: Vec<User> = self.users.values().filter(|u| u.roles.contains(role)).cloned().collect();
                for mut u in holders {
                    u.roles.retain(|r| r != role);
                    self.put_user(u, batch);
                }
            }
            AuthRequest::RoleGrantPermission { name, permission } => {
                let mut r = self.roles.get(name).ok_or(AuthError::RoleNotFound)?.clone();
                let at = r.permissions.partition_point(|p| p.key < permission.key);
                let same = r.permissions[at..]
                    .iter()
                    .position(|p| p.key == permission.key && p.range_end == permission.range_end);
                match same {
                    Some(i) => r.permissions[at + i].perm_type = permission.perm_type,
                    None => {
                        if r.permissions.len() >= PERMISSIONS_PER_ROLE_MAX {
                            return Err(AuthError::TooManyPermissions { max: PERMISSIONS_PER_ROLE_MAX });
                        }
                        r.permissions.insert(at, permission.clone());
                    }
                }
                self.put_role(r, batch);
            }
            AuthRequest::RoleRevokePermission { role, key, range_end } => {
                let mut r = self.roles.get(role).ok_or(AuthError::RoleNotFound)?.clone();
                let before = r.permissions.len();
                r.permissions.retain(|p| !(p.key == *key && p.range_end == *range_end));
                if r.permissions.len() == before {
                    return Err(AuthError::PermissionNotGranted);
                }
                self.put_role(r, batch);
            }
            AuthRequest::Authenticate { name, checked_at, .. } => {
                if !self.enabled {
                    return Err(AuthError::NotEnabled);
                }
                if *checked_at != self.revision {
                    return Err(AuthError::OldRevision);
                }
                // The password was checked before proposing; a user deleted or left without
                // a password since then is refused here.
                match self.users.get(name) {
                    Some(u) if u.password_hash.is_some() => return Ok(Some(name.clone())),
                    _ => return Err(AuthError::AuthFailed),
                }
            }
        }
        self.revision += 1;
        batch.put(Cf::Auth, REVISION.to_vec(), encode(&self.revision));
        Ok(None)
    }

    /// The bcrypt hash a password is checked against, and the revision at the time, for a
    /// user who may authenticate (etcd's `CheckPassword`, before its bcrypt comparison).
    pub fn password_of(&self, name: &str) -> Result<(&str, u64), AuthError> {
        if !self.enabled {
            return Err(AuthError::NotEnabled);
        }
        match self.users.get(name).and_then(|u| u.password_hash.as_deref()) {
            Some(hash) => Ok((hash, self.revision)),
            None => Err(AuthError::AuthFailed),
        }
    }

    /// Whether `who` may access `[key, range_end)` so (etcd's `isOpPermitted`).
    pub fn check(&self, who: Option<&Caller>, access: Access, key: &[u8], range_end: &[u8]) -> Result<(), AuthError> {
        let Some(user) = self.caller(who)? else { return Ok(()) };
        if user.is_root() || self.covered(user, access, key, range_end) {
            return Ok(());
        }
        Err(AuthError::PermissionDenied)
    }

    /// Whether `who` is a root user, when authentication is on (etcd's `IsAdminPermitted`).
    pub fn check_admin(&self, who: Option<&Caller>) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        let who = who.filter(|w| !w.user.is_empty()).ok_or(AuthError::UserEmpty)?;
        match self.users.get(&who.user) {
            None => Err(AuthError::UserNotFound),
            Some(u) if u.is_root() => Ok(()),
            Some(_) => Err(AuthError::PermissionDenied),
        }
    }

    /// Whether a caller was given at all while authentication is on (etcd 3.6 asks this of
    /// Status and of reading alarms).
    pub fn check_authenticated(&self, who: Option<&Caller>) -> Result<(), AuthError> {
        if self.enabled && who.is_none_or(|w| w.user.is_empty()) {
            return Err(AuthError::UserEmpty);
        }
        Ok(())
    }

    /// The caller's user when authentication is on; `None` when it is off.
    fn caller(&self, who: Option<&Caller>) -> Result<Option<&User>, AuthError> {
        if !self.enabled {
            return Ok(None);
        }
        let who = who.filter(|w| w.revision != 0).ok_or(AuthError::UserEmpty)?;
        if who.revision < self.revision {
            return Err(AuthError::OldRevision);
        }
        self.users.get(&who.user).map(Some).ok_or(AuthError::PermissionDenied)
    }

    /// Whether the union of the user's permissions allowing `access` covers the request's range.
    fn covered(&self, user: &User, access: Access, key: &[u8], range_end: &[u8]) -> bool {
        // Each permission as `[start, end)`; `None` ends after every key; one key `k` is
        // `[k, k\0)`, the smallest range holding it.
        let mut spans: Vec<(&[u8], Option<Vec<u8>>)> = user
            .roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .flat_map(|r| r.permissions.iter())
            .filter(|p| p.perm_type.allows(access))
            .map(|p| {
                let end = match p.range_end.as_slice() {
                    [] => Some([p.key.as_slice(), &[0]].concat()),
                    [0] => None,
                    e => Some(e.to_vec()),
                };
                (p.key.as_slice(), end)
            })
            .collect();
        spans.sort_by(|a, b| a.0.cmp(b.0));
        // One key, or a range that ends where it starts or before (which reads nothing but
        // names its first key), needs `[key, key\0)`.
        let want: Option<Vec<u8>> = match range_end {
            [0] => None,
            e if e.is_empty() || e <= key => Some([key, &[0]].concat()),
            e => Some(e.to_vec()),
        };
        let mut reached = key.to_vec();
        for (start, end) in spans {
            if start > reached.as_slice() {
                break;
            }
            match end {
                None => return true,
                Some(e) if e > reached => reached = e,
                Some(_) => {}
            }
            if want.as_ref().is_some_and(|w| reached >= *w) {
                return true;
            }
        }
        false
    }

    fn put_user(&mut self, u: User, batch: &mut WriteBatch) {
        batch.put(Cf::Auth, user_key(&u.name), encode(&u));
        self.users.insert(u.name.clone(), u);
    }

    fn put_role(&mut self, r: Role, batch: &mut WriteBatch) {
        batch.put(Cf::Auth, role_key(&r.name), encode(&r));
        self.roles.insert(r.name.clone(), r);
    }
}

fn root_permission() -> Permission {
    Permission { perm_type: PermType::ReadWrite, key: vec![], range_end: vec![0] }
}

/// etcd's `isValidPermissionRange`: a key, and a range end that is empty (one key), `\0` (every
/// key from `key` on) or after `key`.
pub fn valid_permission_range(key: &[u8], range_end: &[u8]) -> bool {
    !key.is_empty() && (range_end.is_empty() || range_end == [0] || key < range_end)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("auth records encode")
}

fn user_key(name: &str) -> Vec<u8> {
    [USER, name.as_bytes()].concat()
}

fn role_key(name: &str) -> Vec<u8> {
    [ROLE, name.as_bytes()].concat()
}

fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    *end.last_mut().expect("a non-empty prefix") += 1;
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash() -> Option<String> {
        Some("$2b$04$not-checked-here".into())
    }

    /// A store with auth on: `root` (role root) and `alice` with role `r` holding `perms`.
    fn store(perms: &[(PermType, &str, &str)]) -> (AuthStore, Caller, Caller) {
        let mut s = AuthStore::new();
        let mut b = WriteBatch::default();
        let reqs = [
            AuthRequest::UserAdd { name: "root".into(), password_hash: hash() },
            AuthRequest::UserGrantRole { user: "root".into(), role: "root".into() },
            AuthRequest::UserAdd { name: "alice".into(), password_hash: hash() },
            AuthRequest::RoleAdd { name: "r".into() },
            AuthRequest::UserGrantRole { user: "alice".into(), role: "r".into() },
        ];
        for r in reqs {
            s.apply(&r, None, &mut b).unwrap();
        }
        for (t, k, e) in perms {
            let permission = Permission { perm_type: *t, key: k.as_bytes().to_vec(), range_end: e.as_bytes().to_vec() };
            s.apply(&AuthRequest::RoleGrantPermission { name: "r".into(), permission }, None, &mut b).unwrap();
        }
        s.apply(&AuthRequest::Enable, None, &mut b).unwrap();
        let rev = s.revision();
        (s, Caller { user: "root".into(), revision: rev }, Caller { user: "alice".into(), revision: rev })
    }

    fn read(s: &AuthStore, who: &Caller, key: &[u8], end: &[u8]) -> Result<(), AuthError> {
        s.check(Some(who), Access::Read, key, end)
    }

    #[test]
    fn a_range_is_permitted_only_when_granted_permissions_cover_all_of_it() {
        let (s, _, alice) = store(&[
            (PermType::Read, "a", "c"),
            (PermType::Read, "c", "e"),
            (PermType::Read, "k", ""),
            (PermType::Write, "x", "\0"),
        ]);
        assert_eq!(read(&s, &alice, b"a", b"e"), Ok(()), "two adjacent grants join");
        assert_eq!(read(&s, &alice, b"b", b""), Ok(()));
        assert_eq!(read(&s, &alice, b"a", b"f"), Err(AuthError::PermissionDenied), "past the end");
        assert_eq!(read(&s, &alice, b"k", b""), Ok(()), "one key");
        assert_eq!(read(&s, &alice, b"k", b"k\0"), Ok(()), "one key as a range");
        assert_eq!(read(&s, &alice, b"k", b"l"), Err(AuthError::PermissionDenied), "keys after k");
        assert_eq!(read(&s, &alice, b"x", b""), Err(AuthError::PermissionDenied), "WRITE is not READ");
        assert_eq!(s.check(Some(&alice), Access::Write, b"z", b"\0"), Ok(()), "from key, open-ended");
        assert_eq!(s.check(Some(&alice), Access::Write, b"w", b"\0"), Err(AuthError::PermissionDenied));
    }

    /// etcd's published bypass: READ on one key let a from-key Watch or Range (`range_end`
    /// `\0`) read every later key.
    #[test]
    fn read_on_one_key_does_not_open_the_keys_after_it() {
        let (s, _, alice) = store(&[(PermType::Read, "k", "")]);
        assert_eq!(read(&s, &alice, b"k", b"\0"), Err(AuthError::PermissionDenied));
        assert_eq!(read(&s, &alice, b"\0", b"\0"), Err(AuthError::PermissionDenied));
        let (s, _, alice) = store(&[(PermType::ReadWrite, "\0", "\0")]);
        assert_eq!(read(&s, &alice, b"\0", b"\0"), Ok(()), "every key");
    }

    #[test]
    fn root_may_do_anything_and_nobody_may_do_anything_without_a_caller() {
        let (s, root, alice) = store(&[]);
        assert_eq!(read(&s, &root, b"\0", b"\0"), Ok(()));
        assert_eq!(s.check_admin(Some(&root)), Ok(()));
        assert_eq!(s.check_admin(Some(&alice)), Err(AuthError::PermissionDenied));
        assert_eq!(s.check_admin(None), Err(AuthError::UserEmpty));
        assert_eq!(s.check(None, Access::Read, b"a", b""), Err(AuthError::UserEmpty));
        let ghost = Caller { user: "ghost".into(), revision: s.revision() };
        assert_eq!(read(&s, &ghost, b"a", b""), Err(AuthError::PermissionDenied));
        assert_eq!(s.check_admin(Some(&ghost)), Err(AuthError::UserNotFound));
    }

    #[test]
    fn a_caller_older_than_a_change_is_refused_until_it_authenticates_again() {
        let (mut s, root, alice) = store(&[(PermType::Read, "a", "")]);
        let mut b = WriteBatch::default();
        s.apply(&AuthRequest::RoleAdd { name: "other".into() }, Some(&root), &mut b).unwrap();
        assert_eq!(read(&s, &alice, b"a", b""), Err(AuthError::OldRevision));
        let fresh = Caller { revision: s.revision(), ..alice };
        assert_eq!(read(&s, &fresh, b"a", b""), Ok(()));
    }

    #[test]
    fn enabling_needs_root_with_its_role_and_root_stays_while_enabled() {
        let mut s = AuthStore::new();
        let mut b = WriteBatch::default();
        assert_eq!(s.apply(&AuthRequest::Enable, None, &mut b), Err(AuthError::RootUserNotExist));
        s.apply(&AuthRequest::UserAdd { name: "root".into(), password_hash: hash() }, None, &mut b).unwrap();
        assert_eq!(s.apply(&AuthRequest::Enable, None, &mut b), Err(AuthError::RootRoleNotExist));
        s.apply(&AuthRequest::UserGrantRole { user: "root".into(), role: "root".into() }, None, &mut b).unwrap();
        let rev = s.revision();
        s.apply(&AuthRequest::Enable, None, &mut b).unwrap();
        assert_eq!(s.revision(), rev, "enabling keeps the revision, as etcd");
        let root = Caller { user: "root".into(), revision: rev };
        for (req, err) in [
            (AuthRequest::UserDelete { name: "root".into() }, AuthError::InvalidMgmt),
            (AuthRequest::UserRevokeRole { name: "root".into(), role: "root".into() }, AuthError::InvalidMgmt),
            (AuthRequest::RoleDelete { role: "root".into() }, AuthError::InvalidMgmt),
            (AuthRequest::UserAdd { name: "x".into(), password_hash: hash() }, AuthError::UserEmpty),
        ] {
            let who = if err == AuthError::UserEmpty { None } else { Some(&root) };
            assert_eq!(s.apply(&req, who, &mut b), Err(err), "{req:?}");
        }
        assert_eq!(s.apply(&AuthRequest::Disable, Some(&root), &mut b), Ok(None));
        assert_eq!(s.revision(), rev + 1, "disabling moves it");
    }

    /// Bad input: every refusal leaves the store as it was, revision included.
    #[test]
    fn a_refused_change_changes_nothing() {
        let (mut s, root, _) = store(&[(PermType::Read, "a", "")]);
        let long = "n".repeat(AUTH_NAME_BYTES_MAX + 1);
        let perm = |k: &str, e: &str| Permission {
            perm_type: PermType::Read,
            key: k.as_bytes().to_vec(),
            range_end: e.as_bytes().to_vec(),
        };
        let cases = [
            (
                AuthRequest::UserAdd { name: long.clone(), password_hash: hash() },
                AuthError::NameTooLong { len: 257, max: 256 },
            ),
            (AuthRequest::RoleAdd { name: long }, AuthError::NameTooLong { len: 257, max: 256 }),
            (AuthRequest::UserAdd { name: "".into(), password_hash: hash() }, AuthError::UserEmpty),
            (AuthRequest::UserAdd { name: "alice".into(), password_hash: hash() }, AuthError::UserAlreadyExist),
            (AuthRequest::RoleAdd { name: "".into() }, AuthError::RoleEmpty),
            (AuthRequest::RoleAdd { name: "r".into() }, AuthError::RoleAlreadyExist),
            (AuthRequest::UserGrantRole { user: "nobody".into(), role: "r".into() }, AuthError::UserNotFound),
            (AuthRequest::UserGrantRole { user: "alice".into(), role: "nope".into() }, AuthError::RoleNotFound),
            (AuthRequest::UserRevokeRole { name: "alice".into(), role: "root".into() }, AuthError::RoleNotGranted),
            (AuthRequest::RoleGrantPermission { name: "r".into(), permission: perm("b", "a") }, AuthError::InvalidMgmt),
            (AuthRequest::RoleGrantPermission { name: "r".into(), permission: perm("", "") }, AuthError::InvalidMgmt),
            (
                AuthRequest::RoleGrantPermission { name: "nope".into(), permission: perm("a", "") },
                AuthError::RoleNotFound,
            ),
            (
                AuthRequest::RoleRevokePermission { role: "r".into(), key: b"a".to_vec(), range_end: b"b".to_vec() },
                AuthError::PermissionNotGranted,
            ),
            (
                AuthRequest::RoleGrantPermission {
                    name: "r".into(),
                    permission: perm(&"k".repeat(KEY_BYTES_MAX + 1), ""),
                },
                AuthError::KeyTooLarge { len: KEY_BYTES_MAX + 1, max: KEY_BYTES_MAX },
            ),
            (
                AuthRequest::RoleGrantPermission {
                    name: "r".into(),
                    permission: perm("a", &"k".repeat(KEY_BYTES_MAX + 1)),
                },
                AuthError::KeyTooLarge { len: KEY_BYTES_MAX + 1, max: KEY_BYTES_MAX },
            ),
            (
                AuthRequest::RoleRevokePermission {
                    role: "r".into(),
                    key: vec![b'k'; KEY_BYTES_MAX + 1],
                    range_end: vec![],
                },
                AuthError::KeyTooLarge { len: KEY_BYTES_MAX + 1, max: KEY_BYTES_MAX },
            ),
            // A password checked against the hash of an older store: it may have changed since.
            (
                AuthRequest::Authenticate {
                    name: "alice".into(),
                    token_prefix: "t".into(),
                    checked_at: s.revision() - 1,
                },
                AuthError::OldRevision,
            ),
            (AuthRequest::RoleDelete { role: "nope".into() }, AuthError::RoleNotFound),
            (AuthRequest::UserDelete { name: "nobody".into() }, AuthError::UserNotFound),
            (
                AuthRequest::UserChangePassword { name: "nobody".into(), password_hash: "h".into() },
                AuthError::UserNotFound,
            ),
        ];
        for (req, err) in cases {
            let before = s.clone();
            let mut b = WriteBatch::default();
            assert_eq!(s.apply(&req, Some(&root), &mut b), Err(err), "{req:?}");
            assert_eq!(s, before, "{req:?}");
            assert!(b.is_empty(), "{req:?} wrote");
        }
    }

    /// A caller who may not make a change is told so, not what else was wrong with it.
    #[test]
    fn who_asks_is_checked_before_what_is_asked() {
        let (mut s, _, alice) = store(&[]);
        let long = "n".repeat(AUTH_NAME_BYTES_MAX + 1);
        for req in
            [AuthRequest::UserAdd { name: long.clone(), password_hash: hash() }, AuthRequest::RoleAdd { name: long }]
        {
            let mut b = WriteBatch::default();
            assert_eq!(s.apply(&req, Some(&alice), &mut b), Err(AuthError::PermissionDenied));
            assert_eq!(s.apply(&req, None, &mut b), Err(AuthError::UserEmpty));
        }
    }

    #[test]
    fn deleting_a_role_takes_it_from_its_users_and_the_store_reloads_as_written() {
        let mut s = AuthStore::new();
        let mut b = WriteBatch::default();
        let perm = Permission { perm_type: PermType::ReadWrite, key: b"a".to_vec(), range_end: b"b".to_vec() };
        for r in [
            AuthRequest::UserAdd { name: "root".into(), password_hash: hash() },
            AuthRequest::UserGrantRole { user: "root".into(), role: "root".into() },
            AuthRequest::UserAdd { name: "alice".into(), password_hash: None },
            AuthRequest::RoleAdd { name: "r".into() },
            AuthRequest::RoleAdd { name: "gone".into() },
            AuthRequest::RoleGrantPermission { name: "r".into(), permission: perm },
            AuthRequest::UserGrantRole { user: "alice".into(), role: "gone".into() },
            AuthRequest::UserGrantRole { user: "alice".into(), role: "r".into() },
            AuthRequest::Enable,
        ] {
            s.apply(&r, None, &mut b).unwrap();
        }
        let root = Caller { user: "root".into(), revision: s.revision() };
        s.apply(&AuthRequest::RoleDelete { role: "gone".into() }, Some(&root), &mut b).unwrap();
        assert_eq!(s.user("alice").unwrap().roles, vec!["r".to_string()]);
        let engine = crate::storage::MemEngine::new();
        engine.write(b, false).unwrap();
        assert_eq!(AuthStore::load(&*engine).unwrap(), s);
    }
}
