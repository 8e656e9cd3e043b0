//! etcd's Auth service: switching auth on and off, Authenticate, users and roles.
//!
//! Changes go through the log as `AuthCommand`s and are checked when they apply (the root
//! role, once auth is on; see [`crate::auth::AuthStore::apply`]). Passwords are hashed here,
//! by the member that took the request, off the async runtime, so only bcrypt hashes reach
//! the log. Reads (UserGet, RoleGet, the lists, AuthStatus) are linearizable: a read barrier,
//! then the applied store.

use flotilla_proto::etcdserverpb::auth_server::Auth;
use flotilla_proto::etcdserverpb::*;
use tonic::{Request, Response, Status};

use crate::auth::{AuthError, Tokens, no_password, password};
use crate::members::encode_server_command;
use crate::peer_proto::{
    AuthCommand, AuthenticateCommand, ServerCommand, auth_command, server_command,
};
use crate::routing::AnswerResult;
use crate::services::{AUTH, ClientServices};

type Reply<T> = Result<Response<T>, Status>;

/// An Authenticate retries this many times when the auth store changed between the
/// password check and the token's registration (etcd retries likewise, unbounded).
const AUTHENTICATE_ATTEMPTS_MAX: usize = 5;

impl ClientServices {
    /// Proposes an auth change on behalf of `request`'s caller; the store revision after it.
    async fn auth_write<T>(
        &self,
        request: &Request<T>,
        body: auth_command::Request,
    ) -> Result<(i64, Option<String>), Status> {
        self.frontend.refuse_learner()?;
        let caller = self.frontend.caller(request)?;
        let command = ServerCommand {
            command: Some(server_command::Command::Auth(AuthCommand {
                user: caller.user,
                auth_revision: caller.auth_revision,
                request: Some(body),
            })),
        };
        let response = self
            .frontend
            .write(encode_server_command(&command), 0)
            .await?;
        let token = match response.result {
            AnswerResult::AuthToken(token) => Some(token),
            _ => None,
        };
        Ok((response.revision, token))
    }

    /// An Auth call that only changes the store: its request as the log entry `body`, and an
    /// answer carrying just the header (`respond`).
    async fn change<T: Clone, R>(
        &self,
        method: &'static str,
        request: Request<T>,
        body: impl FnOnce(T) -> auth_command::Request,
        respond: impl FnOnce(Option<ResponseHeader>) -> R,
    ) -> Reply<R> {
        self.observe(AUTH, method, async {
            let entry = body(request.get_ref().clone());
            let (revision, _) = self.auth_write(&request, entry).await?;
            Ok(respond(self.header_at(revision)))
        })
        .await
    }

    fn header_at(&self, revision: i64) -> Option<ResponseHeader> {
        self.frontend.header(revision)
    }

    fn header_now(&self) -> Option<ResponseHeader> {
        self.frontend.header(self.frontend.current_revision())
    }

    /// A linearizable read of the auth store by `request`'s caller.
    async fn auth_read<T, R>(
        &self,
        request: &Request<T>,
        read: impl FnOnce(&crate::auth::AuthStore, &str) -> Result<R, AuthError>,
    ) -> Result<R, Status> {
        self.frontend.refuse_learner()?;
        self.frontend.linearizable_barrier().await?;
        let caller = self.frontend.caller(request)?;
        Ok(self.frontend.read_auth(|auth| read(auth, &caller.user))?)
    }

    /// The bcrypt hash of `password`, computed off the runtime.
    async fn hash_password(&self, password: String) -> Result<String, Status> {
        let cost = self.frontend.bcrypt_cost;
        tokio::task::spawn_blocking(move || password::hash(&password, cost))
            .await
            .map_err(|e| Status::internal(format!("flotilla: hashing a password: {e}")))?
            .map_err(|e| Status::internal(format!("flotilla: {e}")))
    }

    /// One password check and token; `None` when the auth store changed meanwhile, so the
    /// check may be stale and must be done again.
    async fn authenticate_once(&self, name: &str, given: &str) -> Result<Option<String>, Status> {
        let (enabled, revision, user) = self
            .frontend
            .read_auth(|auth| (auth.enabled(), auth.revision(), auth.user(name).cloned()));
        if !enabled {
            return Err(AuthError::AuthNotEnabled.into());
        }
        let user = user.ok_or(AuthError::AuthFailed)?;
        if no_password(&user) {
            return Err(AuthError::AuthFailed.into());
        }
        let (given, stored) = (given.to_string(), user.password.clone());
        let matches = tokio::task::spawn_blocking(move || password::matches(&given, &stored))
            .await
            .map_err(|e| Status::internal(format!("flotilla: checking a password: {e}")))?;
        if !matches {
            tracing::info!(user = name, "authentication failed: wrong password");
            return Err(AuthError::AuthFailed.into());
        }
        if self.frontend.tokens.is_jwt() {
            return self
                .frontend
                .tokens
                .sign_jwt(name, revision)
                .map(Some)
                .map_err(|e| Status::internal(format!("flotilla: signing a token: {e}")));
        }
        let body = auth_command::Request::Authenticate(AuthenticateCommand {
            name: name.to_string(),
            token_prefix: Tokens::simple_prefix(),
        });
        let (_, token) = self.auth_write(&Request::new(()), body).await?;
        let token = token
            .ok_or_else(|| Status::internal("flotilla: Authenticate applied without a token"))?;
        // The password was checked at `revision`: if the store changed meanwhile (a new
        // password, the user deleted), the check may be stale, so do it again.
        let current = self.frontend.read_auth(|auth| auth.revision());
        Ok((current == revision).then_some(token))
    }
}

#[tonic::async_trait]
impl Auth for ClientServices {
    async fn auth_enable(&self, request: Request<AuthEnableRequest>) -> Reply<AuthEnableResponse> {
        self.observe(AUTH, "AuthEnable", async {
            let body = auth_command::Request::AuthEnable(AuthEnableRequest {});
            let (revision, _) = self.auth_write(&request, body).await?;
            tracing::warn!("authentication enabled");
            Ok(AuthEnableResponse {
                header: self.header_at(revision),
            })
        })
        .await
    }

    async fn auth_disable(
        &self,
        request: Request<AuthDisableRequest>,
    ) -> Reply<AuthDisableResponse> {
        self.observe(AUTH, "AuthDisable", async {
            let body = auth_command::Request::AuthDisable(AuthDisableRequest {});
            let (revision, _) = self.auth_write(&request, body).await?;
            tracing::warn!("authentication disabled");
            Ok(AuthDisableResponse {
                header: self.header_at(revision),
            })
        })
        .await
    }

    async fn auth_status(&self, request: Request<AuthStatusRequest>) -> Reply<AuthStatusResponse> {
        self.observe(AUTH, "AuthStatus", async {
            let (enabled, auth_revision) = self
                .auth_read(&request, |auth, _| Ok((auth.enabled(), auth.revision())))
                .await?;
            Ok(AuthStatusResponse {
                header: self.header_now(),
                enabled,
                auth_revision,
            })
        })
        .await
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Reply<AuthenticateResponse> {
        self.observe(AUTH, "Authenticate", async {
            self.frontend.refuse_learner()?;
            self.frontend.linearizable_barrier().await?;
            let AuthenticateRequest { name, password } = request.into_inner();
            for _ in 0..AUTHENTICATE_ATTEMPTS_MAX {
                if let Some(token) = self.authenticate_once(&name, &password).await? {
                    return Ok(AuthenticateResponse {
                        header: self.header_now(),
                        token,
                    });
                }
            }
            Err(AuthError::AuthOldRevision.into())
        })
        .await
    }

    async fn user_add(&self, request: Request<AuthUserAddRequest>) -> Reply<AuthUserAddResponse> {
        self.observe(AUTH, "UserAdd", async {
            // Refuse strangers before the costly hash.
            self.frontend.require_root(&request)?;
            let mut add = request.get_ref().clone();
            if add.name.is_empty() {
                return Err(AuthError::UserEmpty.into());
            }
            let no_password = add.options.is_some_and(|o| o.no_password);
            add.hashed_password = if no_password {
                String::new()
            } else {
                self.hash_password(std::mem::take(&mut add.password))
                    .await?
            };
            add.password.clear();
            let (revision, _) = self
                .auth_write(&request, auth_command::Request::UserAdd(add))
                .await?;
            Ok(AuthUserAddResponse {
                header: self.header_at(revision),
            })
        })
        .await
    }

    async fn user_get(&self, request: Request<AuthUserGetRequest>) -> Reply<AuthUserGetResponse> {
        self.observe(AUTH, "UserGet", async {
            let name = request.get_ref().name.clone();
            let roles = self
                .auth_read(&request, |auth, caller| {
                    // A user may look at itself; anyone else needs root.
                    if caller != name {
                        auth.check_admin(caller)?;
                    }
                    let user = auth.user(&name).ok_or(AuthError::UserNotFound)?;
                    Ok(user.roles.clone())
                })
                .await?;
            Ok(AuthUserGetResponse {
                header: self.header_now(),
                roles,
            })
        })
        .await
    }

    async fn user_list(
        &self,
        request: Request<AuthUserListRequest>,
    ) -> Reply<AuthUserListResponse> {
        self.observe(AUTH, "UserList", async {
            let users = self
                .auth_read(&request, |auth, caller| {
                    auth.check_admin(caller)?;
                    Ok(auth.user_names())
                })
                .await?;
            Ok(AuthUserListResponse {
                header: self.header_now(),
                users,
            })
        })
        .await
    }

    async fn user_delete(
        &self,
        request: Request<AuthUserDeleteRequest>,
    ) -> Reply<AuthUserDeleteResponse> {
        let respond = |header| AuthUserDeleteResponse { header };
        self.change(
            "UserDelete",
            request,
            auth_command::Request::UserDelete,
            respond,
        )
        .await
    }

    async fn user_change_password(
        &self,
        request: Request<AuthUserChangePasswordRequest>,
    ) -> Reply<AuthUserChangePasswordResponse> {
        self.observe(AUTH, "UserChangePassword", async {
            self.frontend.require_root(&request)?;
            let mut change = request.get_ref().clone();
            change.hashed_password = self
                .hash_password(std::mem::take(&mut change.password))
                .await?;
            let body = auth_command::Request::UserChangePassword(change);
            let (revision, _) = self.auth_write(&request, body).await?;
            Ok(AuthUserChangePasswordResponse {
                header: self.header_at(revision),
            })
        })
        .await
    }

    async fn user_grant_role(
        &self,
        request: Request<AuthUserGrantRoleRequest>,
    ) -> Reply<AuthUserGrantRoleResponse> {
        let respond = |header| AuthUserGrantRoleResponse { header };
        self.change(
            "UserGrantRole",
            request,
            auth_command::Request::UserGrantRole,
            respond,
        )
        .await
    }

    async fn user_revoke_role(
        &self,
        request: Request<AuthUserRevokeRoleRequest>,
    ) -> Reply<AuthUserRevokeRoleResponse> {
        let respond = |header| AuthUserRevokeRoleResponse { header };
        self.change(
            "UserRevokeRole",
            request,
            auth_command::Request::UserRevokeRole,
            respond,
        )
        .await
    }

    async fn role_add(&self, request: Request<AuthRoleAddRequest>) -> Reply<AuthRoleAddResponse> {
        let respond = |header| AuthRoleAddResponse { header };
        self.change("RoleAdd", request, auth_command::Request::RoleAdd, respond)
            .await
    }

    async fn role_get(&self, request: Request<AuthRoleGetRequest>) -> Reply<AuthRoleGetResponse> {
        self.observe(AUTH, "RoleGet", async {
            let name = request.get_ref().role.clone();
            let perm = self
                .auth_read(&request, |auth, caller| {
                    // A user may look at its own roles; anything else needs root.
                    if !auth.has_role(caller, &name) {
                        auth.check_admin(caller)?;
                    }
                    let role = auth.role(&name).ok_or(AuthError::RoleNotFound)?;
                    Ok(role.key_permission.clone())
                })
                .await?;
            Ok(AuthRoleGetResponse {
                header: self.header_now(),
                perm,
            })
        })
        .await
    }

    async fn role_list(
        &self,
        request: Request<AuthRoleListRequest>,
    ) -> Reply<AuthRoleListResponse> {
        self.observe(AUTH, "RoleList", async {
            let roles = self
                .auth_read(&request, |auth, caller| {
                    auth.check_admin(caller)?;
                    Ok(auth.role_names())
                })
                .await?;
            Ok(AuthRoleListResponse {
                header: self.header_now(),
                roles,
            })
        })
        .await
    }

    async fn role_delete(
        &self,
        request: Request<AuthRoleDeleteRequest>,
    ) -> Reply<AuthRoleDeleteResponse> {
        let respond = |header| AuthRoleDeleteResponse { header };
        self.change(
            "RoleDelete",
            request,
            auth_command::Request::RoleDelete,
            respond,
        )
        .await
    }

    async fn role_grant_permission(
        &self,
        request: Request<AuthRoleGrantPermissionRequest>,
    ) -> Reply<AuthRoleGrantPermissionResponse> {
        self.observe(AUTH, "RoleGrantPermission", async {
            if request.get_ref().perm.is_none() {
                return Err(Status::invalid_argument(
                    "flotilla: RoleGrantPermission needs a permission (perm)",
                ));
            }
            let body = auth_command::Request::RoleGrantPermission(request.get_ref().clone());
            let (revision, _) = self.auth_write(&request, body).await?;
            Ok(AuthRoleGrantPermissionResponse {
                header: self.header_at(revision),
            })
        })
        .await
    }

    async fn role_revoke_permission(
        &self,
        request: Request<AuthRoleRevokePermissionRequest>,
    ) -> Reply<AuthRoleRevokePermissionResponse> {
        let respond = |header| AuthRoleRevokePermissionResponse { header };
        self.change(
            "RoleRevokePermission",
            request,
            auth_command::Request::RoleRevokePermission,
            respond,
        )
        .await
    }
}
