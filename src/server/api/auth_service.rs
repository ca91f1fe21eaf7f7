//! etcd's `Auth` service: users, roles, permissions, turning authentication on and off, and
//! Authenticate, which checks a password and hands out a token.
//!
//! Changes go through the log as [`AuthRequest`]s, checked again where they are applied (only
//! a root user may make them while authentication is on). Passwords are hashed here, on the
//! member that received them, off the async runtime's threads, so the log carries hashes only
//! and applying an entry never waits on bcrypt (etcd 3.5 does the same). Reads (status, get,
//! list) are linearizable, as etcd's, which sends them through its log.

use tonic::{Request, Response, Status};

use super::{Api, ApiError, Credentials};
use crate::auth::{hash_password, new_token_prefix, password_matches, TokenProvider};
use geolock_core::auth::{AuthError, AuthRequest, PermType, Permission};
use geolock_core::machine::{Command, Response as Done};
use geolock_proto::authpb;
use geolock_proto::etcdserverpb as pb;

/// Times Authenticate checks a password again when the auth store changed while it was being
/// checked (etcd loops until it did not change; a bound keeps a busy store from holding the
/// request forever).
const AUTHENTICATE_ATTEMPTS_MAX: usize = 3;

impl Api {
    /// Make one change as the caller, who must be a root user while authentication is on.
    async fn change_auth(&self, req: AuthRequest) -> Result<pb::ResponseHeader, ApiError> {
        self.must_be_admin()?;
        match self.propose(Command::Auth(req)).await? {
            (Done::Auth, rev) => Ok(self.header(rev)),
            (other, _) => Err(ApiError::UnexpectedApply { got: format!("{other:?}") }),
        }
    }

    /// The bcrypt hash of a new password, made only for a root caller (hashing costs tens of
    /// milliseconds of CPU; nobody else gets to spend them).
    async fn hashed(&self, password: String) -> Result<String, ApiError> {
        self.must_be_admin()?;
        hash_password(password, self.auth.bcrypt_cost).await.map_err(ApiError::from)
    }

    /// A linearizable read of the auth store.
    async fn read_auth<R>(
        &self,
        f: impl FnOnce(&geolock_core::auth::AuthStore) -> Result<R, AuthError>,
    ) -> Result<(R, i64), ApiError> {
        self.read(false, |m| Ok(f(&m.auth)?)).await
    }
}

fn name_of(user: &str) -> Result<(), ApiError> {
    geolock_core::auth::AuthStore::validate(&AuthRequest::UserDelete { name: user.to_string() })?;
    Ok(())
}

#[tonic::async_trait]
impl pb::auth_server::Auth for Api {
    async fn auth_enable(
        &self,
        req: Request<pb::AuthEnableRequest>,
    ) -> Result<Response<pb::AuthEnableResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        Ok(Response::new(pb::AuthEnableResponse { header: Some(api.change_auth(AuthRequest::Enable).await?) }))
    }

    async fn auth_disable(
        &self,
        req: Request<pb::AuthDisableRequest>,
    ) -> Result<Response<pb::AuthDisableResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        Ok(Response::new(pb::AuthDisableResponse { header: Some(api.change_auth(AuthRequest::Disable).await?) }))
    }

    async fn auth_status(
        &self,
        req: Request<pb::AuthStatusRequest>,
    ) -> Result<Response<pb::AuthStatusResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let ((enabled, auth_revision), rev) = api.read_auth(|a| Ok((a.enabled(), a.revision()))).await?;
        Ok(Response::new(pb::AuthStatusResponse { header: Some(self.header(rev)), enabled, auth_revision }))
    }

    /// etcd's order: a linearizable read, the password checked against the hash as of then,
    /// then the entry that makes the token; if the auth store changed in between (the password
    /// may be another by now), all again.
    async fn authenticate(
        &self,
        req: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let r = req.into_inner();
        name_of(&r.name)?;
        let api = Api { caller: None, ..self.clone() };
        for _ in 0..AUTHENTICATE_ATTEMPTS_MAX {
            let ((hash, checked_at), _) =
                api.read_auth(|a| a.password_of(&r.name).map(|(h, rev)| (h.to_string(), rev))).await?;
            let matches = password_matches(r.password.clone(), hash).await.map_err(ApiError::from)?;
            if !matches {
                tracing::info!(user = %r.name, "authentication failed: wrong password");
                return Err(ApiError::from(AuthError::AuthFailed).into());
            }
            let cmd = Command::Auth(AuthRequest::Authenticate {
                name: r.name.clone(),
                token_prefix: new_token_prefix(),
                checked_at,
            });
            match api.propose(cmd).await {
                Ok((Done::Authenticated { token, .. }, rev)) => {
                    // The entry was applied at `checked_at` (it is refused otherwise), which a
                    // JWT carries as the revision its user was authenticated at.
                    let token = match &*self.auth.tokens {
                        TokenProvider::Simple => token,
                        TokenProvider::Jwt(jwt) => {
                            jwt.issue(&r.name, checked_at, std::time::SystemTime::now()).ok_or(ApiError::VerifyOnly)?
                        }
                    };
                    return Ok(Response::new(pb::AuthenticateResponse { header: Some(self.header(rev)), token }));
                }
                // The store moved on while the password was checked: check it again.
                Err(ApiError::Auth(AuthError::OldRevision)) => continue,
                Ok((other, _)) => return Err(ApiError::UnexpectedApply { got: format!("{other:?}") }.into()),
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::from(AuthError::OldRevision).into())
    }

    async fn user_add(
        &self,
        req: Request<pb::AuthUserAddRequest>,
    ) -> Result<Response<pb::AuthUserAddResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let r = req.into_inner();
        name_of(&r.name)?;
        if r.name.is_empty() {
            return Err(ApiError::from(AuthError::UserEmpty).into());
        }
        let password_hash = match r.options {
            Some(authpb::UserAddOptions { no_password: true }) => None,
            _ => Some(api.hashed(r.password).await?),
        };
        let header = api.change_auth(AuthRequest::UserAdd { name: r.name, password_hash }).await?;
        Ok(Response::new(pb::AuthUserAddResponse { header: Some(header) }))
    }

    /// A root user may look up anyone, others only themselves (etcd's rule).
    async fn user_get(
        &self,
        req: Request<pb::AuthUserGetRequest>,
    ) -> Result<Response<pb::AuthUserGetResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let name = req.into_inner().name;
        if api.caller.as_ref().is_none_or(|c| c.user != name) {
            api.must_be_admin()?;
        }
        let (roles, rev) =
            api.read_auth(|a| a.user(&name).map(|u| u.roles.clone()).ok_or(AuthError::UserNotFound)).await?;
        Ok(Response::new(pb::AuthUserGetResponse { header: Some(self.header(rev)), roles }))
    }

    async fn user_list(
        &self,
        req: Request<pb::AuthUserListRequest>,
    ) -> Result<Response<pb::AuthUserListResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        api.must_be_admin()?;
        let (users, rev) = api.read_auth(|a| Ok(a.user_names())).await?;
        Ok(Response::new(pb::AuthUserListResponse { header: Some(self.header(rev)), users }))
    }

    async fn user_delete(
        &self,
        req: Request<pb::AuthUserDeleteRequest>,
    ) -> Result<Response<pb::AuthUserDeleteResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let name = req.into_inner().name;
        let header = api.change_auth(AuthRequest::UserDelete { name }).await?;
        Ok(Response::new(pb::AuthUserDeleteResponse { header: Some(header) }))
    }

    async fn user_change_password(
        &self,
        req: Request<pb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<pb::AuthUserChangePasswordResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let r = req.into_inner();
        name_of(&r.name)?;
        let password_hash = api.hashed(r.password).await?;
        let header = api.change_auth(AuthRequest::UserChangePassword { name: r.name, password_hash }).await?;
        Ok(Response::new(pb::AuthUserChangePasswordResponse { header: Some(header) }))
    }

    async fn user_grant_role(
        &self,
        req: Request<pb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<pb::AuthUserGrantRoleResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let r = req.into_inner();
        let header = api.change_auth(AuthRequest::UserGrantRole { user: r.user, role: r.role }).await?;
        Ok(Response::new(pb::AuthUserGrantRoleResponse { header: Some(header) }))
    }

    async fn user_revoke_role(
        &self,
        req: Request<pb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<pb::AuthUserRevokeRoleResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let r = req.into_inner();
        let header = api.change_auth(AuthRequest::UserRevokeRole { name: r.name, role: r.role }).await?;
        Ok(Response::new(pb::AuthUserRevokeRoleResponse { header: Some(header) }))
    }

    async fn role_add(
        &self,
        req: Request<pb::AuthRoleAddRequest>,
    ) -> Result<Response<pb::AuthRoleAddResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let header = api.change_auth(AuthRequest::RoleAdd { name: req.into_inner().name }).await?;
        Ok(Response::new(pb::AuthRoleAddResponse { header: Some(header) }))
    }

    /// A root user may look up any role, others only roles they have (etcd's rule).
    async fn role_get(
        &self,
        req: Request<pb::AuthRoleGetRequest>,
    ) -> Result<Response<pb::AuthRoleGetResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let role = req.into_inner().role;
        let holds = api.caller.as_ref().is_some_and(|c| self.node.read(|m| m.auth.has_role(&c.user, &role)));
        if !holds {
            api.must_be_admin()?;
        }
        let (r, rev) = api.read_auth(|a| a.role(&role).ok_or(AuthError::RoleNotFound)).await?;
        let perm = r
            .permissions
            .into_iter()
            .map(|p| authpb::Permission { perm_type: p.perm_type.wire(), key: p.key, range_end: p.range_end })
            .collect();
        Ok(Response::new(pb::AuthRoleGetResponse { header: Some(self.header(rev)), perm }))
    }

    async fn role_list(
        &self,
        req: Request<pb::AuthRoleListRequest>,
    ) -> Result<Response<pb::AuthRoleListResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        api.must_be_admin()?;
        let (roles, rev) = api.read_auth(|a| Ok(a.role_names())).await?;
        Ok(Response::new(pb::AuthRoleListResponse { header: Some(self.header(rev)), roles }))
    }

    async fn role_delete(
        &self,
        req: Request<pb::AuthRoleDeleteRequest>,
    ) -> Result<Response<pb::AuthRoleDeleteResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let header = api.change_auth(AuthRequest::RoleDelete { role: req.into_inner().role }).await?;
        Ok(Response::new(pb::AuthRoleDeleteResponse { header: Some(header) }))
    }

    async fn role_grant_permission(
        &self,
        req: Request<pb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<pb::AuthRoleGrantPermissionResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let r = req.into_inner();
        let p = r.perm.ok_or(ApiError::from(AuthError::PermissionNotGiven))?;
        let perm_type = PermType::from_wire(p.perm_type).ok_or_else(|| {
            ApiError::InvalidArgument(format!(
                "permission type {} is not READ (0), WRITE (1) or READWRITE (2)",
                p.perm_type
            ))
        })?;
        let permission = Permission { perm_type, key: p.key, range_end: p.range_end };
        let header = api.change_auth(AuthRequest::RoleGrantPermission { name: r.name, permission }).await?;
        Ok(Response::new(pb::AuthRoleGrantPermissionResponse { header: Some(header) }))
    }

    async fn role_revoke_permission(
        &self,
        req: Request<pb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<pb::AuthRoleRevokePermissionResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let r = req.into_inner();
        let header = api
            .change_auth(AuthRequest::RoleRevokePermission { role: r.role, key: r.key, range_end: r.range_end })
            .await?;
        Ok(Response::new(pb::AuthRoleRevokePermissionResponse { header: Some(header) }))
    }
}
