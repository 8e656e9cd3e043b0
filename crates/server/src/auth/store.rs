//! The replicated auth store: whether authentication is on, the users (with their bcrypt
//! password hashes and roles) and the roles (with their key permissions), and the auth
//! revision that grows with every change. It lives in the state machine, changes only by
//! applying log entries, and is saved in the snapshot, so every member holds the same store
//! at the same index.
//!
//! It also decides, at apply, whether a KV command's author may run it (the
//! [`Authorizer`] impl): etcd's authApplierV3.

use std::collections::BTreeMap;

use flotilla_kv::{Author, Authorizer, ErrorKind, KvError, KvStore, Operation};
use flotilla_proto::authpb::{Permission, Role, User, UserAddOptions};
use flotilla_proto::etcdserverpb::request_op::Request as Op;
use flotilla_proto::etcdserverpb::{DeleteRangeRequest, PutRequest, RequestOp, TxnRequest};

use super::AuthError;
use super::permissions::{Access, covers};
use crate::peer_proto::{AuthCommand, AuthState, auth_command};

/// The user and role with every permission; the user must exist to enable auth.
pub const ROOT: &str = "root";

/// What applying an auth command did, beyond the replicated state: what the member's token
/// table must learn.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthApplied {
    /// A simple token to register for a user (an Authenticate).
    pub token: Option<(String, String)>,
    /// A user whose tokens are void (deleted, or a new password).
    pub revoke_tokens_of: Option<String>,
    /// Auth was switched off: every token is void.
    pub disabled: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AuthStore {
    enabled: bool,
    /// Starts at 1 (so that 0 means "no credentials"); grows with each change.
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
}

impl Default for AuthStore {
    fn default() -> Self {
        AuthStore {
            enabled: false,
            revision: 1,
            users: BTreeMap::new(),
            roles: BTreeMap::new(),
        }
    }
}

impl AuthStore {
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    pub fn user_names(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    pub fn role_names(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|u| u.roles.iter().any(|r| r == role))
    }

    pub fn is_root(&self, user: &str) -> bool {
        self.has_role(user, ROOT)
    }

    // ----- Checks ----------------------------------------------------------------------------

    /// etcd's IsAdminPermitted: with auth on, only a user with the root role.
    pub fn check_admin(&self, user: &str) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        if !self.users.contains_key(user) {
            return Err(AuthError::UserNotFound);
        }
        if !self.is_root(user) {
            return Err(AuthError::PermissionDenied);
        }
        Ok(())
    }

    /// etcd's isOpPermitted: `access` to `key`..`range_end` for credentials checked at
    /// `auth_revision`.
    pub fn check_keys(
        &self,
        user: &str,
        auth_revision: u64,
        access: Access,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() || auth_revision == 0 {
            return Err(AuthError::UserEmpty);
        }
        if auth_revision < self.revision {
            return Err(AuthError::AuthOldRevision);
        }
        let Some(found) = self.users.get(user) else {
            return Err(AuthError::PermissionDenied);
        };
        if self.is_root(user) {
            return Ok(());
        }
        let permissions = found
            .roles
            .iter()
            .filter_map(|role| self.roles.get(role))
            .flat_map(|role| role.key_permission.iter());
        if covers(permissions, access, key, range_end) {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }

    /// A transaction's compares (read), and each branch's operations, nested ones included.
    /// `store` shows the keys attached to leases (for a put under a lease); a read-only txn
    /// checked before it is served has no puts and passes none.
    pub fn check_txn(
        &self,
        user: &str,
        revision: u64,
        txn: &TxnRequest,
        store: Option<&KvStore>,
    ) -> Result<(), AuthError> {
        for compare in &txn.compare {
            self.check_keys(
                user,
                revision,
                Access::Read,
                &compare.key,
                &compare.range_end,
            )?;
        }
        txn.success
            .iter()
            .chain(&txn.failure)
            .try_for_each(|op| self.check_op(user, revision, op, store))
    }

    fn check_op(
        &self,
        user: &str,
        revision: u64,
        op: &RequestOp,
        store: Option<&KvStore>,
    ) -> Result<(), AuthError> {
        match &op.request {
            None => Ok(()),
            Some(Op::RequestRange(range)) => {
                self.check_keys(user, revision, Access::Read, &range.key, &range.range_end)
            }
            Some(Op::RequestPut(put)) => self.check_put(user, revision, put, store),
            Some(Op::RequestDeleteRange(delete)) => self.check_delete(user, revision, delete),
            Some(Op::RequestTxn(txn)) => self.check_txn(user, revision, txn, store),
        }
    }

    /// Write on the key; read too with `prev_kv`; write on every key of its lease.
    fn check_put(
        &self,
        user: &str,
        revision: u64,
        put: &PutRequest,
        store: Option<&KvStore>,
    ) -> Result<(), AuthError> {
        self.check_keys(user, revision, Access::Write, &put.key, &[])?;
        if put.prev_kv {
            self.check_keys(user, revision, Access::Read, &put.key, &[])?;
        }
        self.check_lease_keys(user, revision, put.lease, store)
    }

    /// Write on the range; read too with `prev_kv`.
    fn check_delete(
        &self,
        user: &str,
        revision: u64,
        delete: &DeleteRangeRequest,
    ) -> Result<(), AuthError> {
        self.check_keys(
            user,
            revision,
            Access::Write,
            &delete.key,
            &delete.range_end,
        )?;
        if delete.prev_kv {
            self.check_keys(user, revision, Access::Read, &delete.key, &delete.range_end)?;
        }
        Ok(())
    }

    /// Writing under a lease, or revoking it, touches every key attached to it (etcd's
    /// checkLeasePuts).
    fn check_lease_keys(
        &self,
        user: &str,
        revision: u64,
        lease: i64,
        store: Option<&KvStore>,
    ) -> Result<(), AuthError> {
        let Some(lease) = store.and_then(|store| store.lease(lease)) else {
            return Ok(());
        };
        lease
            .keys()
            .try_for_each(|key| self.check_keys(user, revision, Access::Write, key, &[]))
    }

    // ----- Apply -----------------------------------------------------------------------------

    /// Applies one auth command at log entry `index`.
    pub fn apply(&mut self, index: u64, command: &AuthCommand) -> Result<AuthApplied, AuthError> {
        use auth_command::Request as R;
        let Some(request) = &command.request else {
            return Err(AuthError::BadRequest(
                "an auth command without a request (written by a newer version?)".into(),
            ));
        };
        if !matches!(request, R::Authenticate(_)) {
            self.check_admin(&command.user)?;
        }
        match request {
            R::AuthEnable(_) => self.enable().map(|()| AuthApplied::default()),
            R::AuthDisable(_) => Ok(self.disable()),
            R::Authenticate(authenticate) => self.authenticate(index, authenticate),
            R::UserAdd(add) => self.user_add(add).map(|()| AuthApplied::default()),
            R::UserDelete(delete) => self.user_delete(&delete.name),
            R::UserChangePassword(change) => self.user_change_password(change),
            R::UserGrantRole(grant) => self
                .user_grant_role(&grant.user, &grant.role)
                .map(|()| AuthApplied::default()),
            R::UserRevokeRole(revoke) => self
                .user_revoke_role(&revoke.name, &revoke.role)
                .map(|()| AuthApplied::default()),
            R::RoleAdd(add) => self.role_add(&add.name).map(|()| AuthApplied::default()),
            R::RoleDelete(delete) => self
                .role_delete(&delete.role)
                .map(|()| AuthApplied::default()),
            R::RoleGrantPermission(grant) => {
                let permission = grant.perm.clone().ok_or_else(|| {
                    AuthError::BadRequest("RoleGrantPermission without a permission".into())
                })?;
                self.role_grant_permission(&grant.name, permission)
                    .map(|()| AuthApplied::default())
            }
            R::RoleRevokePermission(revoke) => self
                .role_revoke_permission(&revoke.role, &revoke.key, &revoke.range_end)
                .map(|()| AuthApplied::default()),
        }
    }

    fn commit(&mut self) {
        self.revision += 1;
    }

    fn enable(&mut self) -> Result<(), AuthError> {
        if self.enabled {
            return Ok(());
        }
        if !self.users.contains_key(ROOT) {
            return Err(AuthError::RootUserNotExist);
        }
        if !self.is_root(ROOT) {
            return Err(AuthError::RootRoleNotExist);
        }
        self.enabled = true;
        Ok(())
    }

    fn disable(&mut self) -> AuthApplied {
        if !self.enabled {
            return AuthApplied::default();
        }
        self.enabled = false;
        self.commit();
        AuthApplied {
            disabled: true,
            ..AuthApplied::default()
        }
    }

    fn authenticate(
        &self,
        index: u64,
        authenticate: &crate::peer_proto::AuthenticateCommand,
    ) -> Result<AuthApplied, AuthError> {
        if !self.enabled {
            return Err(AuthError::AuthNotEnabled);
        }
        let user = self
            .users
            .get(&authenticate.name)
            .ok_or(AuthError::AuthFailed)?;
        if no_password(user) {
            return Err(AuthError::AuthFailed);
        }
        Ok(AuthApplied {
            token: Some((
                format!("{}.{index}", authenticate.token_prefix),
                authenticate.name.clone(),
            )),
            ..AuthApplied::default()
        })
    }

    fn user_add(
        &mut self,
        add: &flotilla_proto::etcdserverpb::AuthUserAddRequest,
    ) -> Result<(), AuthError> {
        if add.name.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        if self.users.contains_key(&add.name) {
            return Err(AuthError::UserAlreadyExist);
        }
        let options = add.options.unwrap_or(UserAddOptions { no_password: false });
        if !options.no_password && add.hashed_password.is_empty() {
            return Err(AuthError::BadRequest(
                "UserAdd reached the log without a password hash".into(),
            ));
        }
        let user = User {
            name: add.name.clone().into_bytes().into(),
            password: if options.no_password {
                Default::default()
            } else {
                add.hashed_password.clone().into_bytes().into()
            },
            roles: Vec::new(),
            options: Some(options),
        };
        self.users.insert(add.name.clone(), user);
        self.commit();
        Ok(())
    }

    fn user_delete(&mut self, name: &str) -> Result<AuthApplied, AuthError> {
        if self.enabled && name == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        self.users.remove(name).ok_or(AuthError::UserNotFound)?;
        self.commit();
        Ok(AuthApplied {
            revoke_tokens_of: Some(name.to_string()),
            ..AuthApplied::default()
        })
    }

    fn user_change_password(
        &mut self,
        change: &flotilla_proto::etcdserverpb::AuthUserChangePasswordRequest,
    ) -> Result<AuthApplied, AuthError> {
        if change.hashed_password.is_empty() {
            return Err(AuthError::BadRequest(
                "UserChangePassword reached the log without a password hash".into(),
            ));
        }
        let user = self
            .users
            .get_mut(&change.name)
            .ok_or(AuthError::UserNotFound)?;
        user.password = change.hashed_password.clone().into_bytes().into();
        user.options = Some(UserAddOptions { no_password: false });
        self.commit();
        Ok(AuthApplied {
            revoke_tokens_of: Some(change.name.clone()),
            ..AuthApplied::default()
        })
    }

    fn user_grant_role(&mut self, name: &str, role: &str) -> Result<(), AuthError> {
        if !self.users.contains_key(name) {
            return Err(AuthError::UserNotFound);
        }
        // The root role need not exist as a role to be granted (etcd's rule).
        if role != ROOT && !self.roles.contains_key(role) {
            return Err(AuthError::RoleNotFound);
        }
        let user = self.users.get_mut(name).expect("checked above");
        if let Err(at) = user.roles.binary_search_by(|r| r.as_str().cmp(role)) {
            user.roles.insert(at, role.to_string());
            self.commit();
        }
        Ok(())
    }

    fn user_revoke_role(&mut self, name: &str, role: &str) -> Result<(), AuthError> {
        if self.enabled && name == ROOT && role == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        let user = self.users.get_mut(name).ok_or(AuthError::UserNotFound)?;
        let at = user
            .roles
            .iter()
            .position(|r| r == role)
            .ok_or(AuthError::RoleNotGranted)?;
        user.roles.remove(at);
        self.commit();
        Ok(())
    }

    fn role_add(&mut self, name: &str) -> Result<(), AuthError> {
        if name.is_empty() {
            return Err(AuthError::RoleEmpty);
        }
        if self.roles.contains_key(name) {
            return Err(AuthError::RoleAlreadyExist);
        }
        let role = Role {
            name: name.as_bytes().to_vec().into(),
            key_permission: Vec::new(),
        };
        self.roles.insert(name.to_string(), role);
        self.commit();
        Ok(())
    }

    fn role_delete(&mut self, name: &str) -> Result<(), AuthError> {
        if self.enabled && name == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        self.roles.remove(name).ok_or(AuthError::RoleNotFound)?;
        for user in self.users.values_mut() {
            user.roles.retain(|r| r != name);
        }
        self.commit();
        Ok(())
    }

    fn role_grant_permission(
        &mut self,
        name: &str,
        permission: Permission,
    ) -> Result<(), AuthError> {
        let role = self.roles.get_mut(name).ok_or(AuthError::RoleNotFound)?;
        let same = |p: &Permission| p.key == permission.key && p.range_end == permission.range_end;
        match role.key_permission.iter_mut().find(|p| same(p)) {
            Some(existing) => existing.perm_type = permission.perm_type,
            None => {
                let at = role
                    .key_permission
                    .partition_point(|p| p.key <= permission.key);
                role.key_permission.insert(at, permission);
            }
        }
        self.commit();
        Ok(())
    }

    fn role_revoke_permission(
        &mut self,
        name: &str,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), AuthError> {
        let role = self.roles.get_mut(name).ok_or(AuthError::RoleNotFound)?;
        let at = role
            .key_permission
            .iter()
            .position(|p| p.key.as_ref() == key && p.range_end.as_ref() == range_end)
            .ok_or(AuthError::PermissionNotGranted)?;
        role.key_permission.remove(at);
        self.commit();
        Ok(())
    }

    // ----- Snapshot --------------------------------------------------------------------------

    pub fn to_state(&self) -> AuthState {
        AuthState {
            enabled: self.enabled,
            revision: self.revision,
            users: self.users.values().cloned().collect(),
            roles: self.roles.values().cloned().collect(),
        }
    }

    /// The store a snapshot holds; a snapshot from before auth existed holds none.
    pub fn from_state(state: Option<&AuthState>) -> AuthStore {
        let Some(state) = state else {
            return AuthStore::default();
        };
        let name = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        AuthStore {
            enabled: state.enabled,
            revision: state.revision.max(1),
            users: state
                .users
                .iter()
                .map(|u| (name(&u.name), u.clone()))
                .collect(),
            roles: state
                .roles
                .iter()
                .map(|r| (name(&r.name), r.clone()))
                .collect(),
        }
    }
}

/// A user added with no_password can authenticate only by TLS certificate.
pub fn no_password(user: &User) -> bool {
    user.options.is_some_and(|o| o.no_password)
}

impl Authorizer for AuthStore {
    /// A command without an author is the server's own (lease expiry, checkpoints, session
    /// bookkeeping) and always runs; a client's command always has one, empty when it came
    /// without credentials.
    fn authorize(
        &self,
        author: Option<&Author>,
        operation: &Operation,
        store: &KvStore,
    ) -> Result<(), KvError> {
        let Some(author) = author else {
            return Ok(());
        };
        if !self.enabled {
            return Ok(());
        }
        let (user, revision) = (author.user.as_str(), author.auth_revision);
        let checked = match operation {
            Operation::Put(put) => self.check_put(user, revision, put, Some(store)),
            Operation::DeleteRange(delete) => self.check_delete(user, revision, delete),
            Operation::Txn(txn) => self.check_txn(user, revision, txn, Some(store)),
            // Compaction drops history every user reads: root only.
            Operation::Compaction(_) => self.check_admin(user).map_err(|error| match error {
                AuthError::UserNotFound => AuthError::PermissionDenied,
                other => other,
            }),
            Operation::LeaseRevoke(revoke) => {
                self.check_lease_keys(user, revision, revoke.id, Some(store))
            }
            Operation::LeaseGrant(_)
            | Operation::LeaseCheckpoint(_)
            | Operation::RegisterSession(_)
            | Operation::ExpireSessions(_) => Ok(()),
        };
        checked.map_err(kv_error)
    }
}

/// The store's error for an auth refusal at apply (same text and code as etcd's).
fn kv_error(error: AuthError) -> KvError {
    match error {
        AuthError::AuthOldRevision => KvError::new(ErrorKind::AuthOldRevision),
        AuthError::UserEmpty => KvError::new(ErrorKind::UserEmpty),
        _ => KvError::new(ErrorKind::PermissionDenied),
    }
}

#[cfg(test)]
mod tests {
    use flotilla_proto::authpb::permission::Type;
    use flotilla_proto::etcdserverpb::*;

    use super::*;

    fn by(user: &str, request: auth_command::Request) -> AuthCommand {
        AuthCommand {
            user: user.into(),
            auth_revision: 0,
            request: Some(request),
        }
    }

    fn add_user(name: &str) -> auth_command::Request {
        auth_command::Request::UserAdd(AuthUserAddRequest {
            name: name.into(),
            hashed_password: "$2a$04$hash".into(),
            ..Default::default()
        })
    }

    fn grant_role(user: &str, role: &str) -> auth_command::Request {
        auth_command::Request::UserGrantRole(AuthUserGrantRoleRequest {
            user: user.into(),
            role: role.into(),
        })
    }

    fn grant(role: &str, kind: Type, key: &str, end: &str) -> auth_command::Request {
        auth_command::Request::RoleGrantPermission(AuthRoleGrantPermissionRequest {
            name: role.into(),
            perm: Some(Permission {
                perm_type: kind as i32,
                key: key.as_bytes().to_vec().into(),
                range_end: end.as_bytes().to_vec().into(),
            }),
        })
    }

    fn enable() -> auth_command::Request {
        auth_command::Request::AuthEnable(AuthEnableRequest {})
    }

    /// root (with the root role) and alice (role "app": read-write on "app/" and below).
    fn enabled_store() -> AuthStore {
        let mut store = AuthStore::default();
        for request in [
            add_user(ROOT),
            grant_role(ROOT, ROOT),
            add_user("alice"),
            auth_command::Request::RoleAdd(AuthRoleAddRequest { name: "app".into() }),
            grant("app", Type::Readwrite, "app/", "app0"),
            grant_role("alice", "app"),
            enable(),
        ] {
            store.apply(1, &by(ROOT, request)).unwrap();
        }
        store
    }

    #[test]
    fn enabling_needs_a_root_user_with_the_root_role() {
        let mut store = AuthStore::default();
        assert_eq!(
            store.apply(1, &by("", enable())),
            Err(AuthError::RootUserNotExist)
        );
        store.apply(2, &by("", add_user(ROOT))).unwrap();
        assert_eq!(
            store.apply(3, &by("", enable())),
            Err(AuthError::RootRoleNotExist)
        );
        store.apply(4, &by("", grant_role(ROOT, ROOT))).unwrap();
        store.apply(5, &by("", enable())).unwrap();
        assert!(store.enabled());
    }

    #[test]
    fn once_enabled_only_root_changes_users_and_roles() {
        let mut store = enabled_store();
        let revision = store.revision();
        for user in ["alice", "", "nobody"] {
            let refused = store.apply(9, &by(user, add_user("eve")));
            assert!(refused.is_err(), "{user:?} added a user");
        }
        assert_eq!(
            store.apply(9, &by("", add_user("eve"))),
            Err(AuthError::UserEmpty)
        );
        assert_eq!(
            store.apply(9, &by("nobody", add_user("eve"))),
            Err(AuthError::UserNotFound)
        );
        assert_eq!(
            store.apply(9, &by("alice", add_user("eve"))),
            Err(AuthError::PermissionDenied)
        );
        assert_eq!(store.revision(), revision, "refusals change nothing");
        store.apply(9, &by(ROOT, add_user("eve"))).unwrap();
        assert_eq!(store.revision(), revision + 1);
    }

    #[test]
    fn root_cannot_be_removed_or_demoted_while_auth_is_on() {
        let mut store = enabled_store();
        let delete_root =
            auth_command::Request::UserDelete(AuthUserDeleteRequest { name: ROOT.into() });
        assert_eq!(
            store.apply(9, &by(ROOT, delete_root)),
            Err(AuthError::InvalidAuthMgmt)
        );
        let revoke = auth_command::Request::UserRevokeRole(AuthUserRevokeRoleRequest {
            name: ROOT.into(),
            role: ROOT.into(),
        });
        assert_eq!(
            store.apply(9, &by(ROOT, revoke)),
            Err(AuthError::InvalidAuthMgmt)
        );
        let delete_role =
            auth_command::Request::RoleDelete(AuthRoleDeleteRequest { role: ROOT.into() });
        assert_eq!(
            store.apply(9, &by(ROOT, delete_role)),
            Err(AuthError::InvalidAuthMgmt)
        );
    }

    #[test]
    fn key_checks_follow_roles_revisions_and_root() {
        let store = enabled_store();
        let rev = store.revision();
        let check = |user: &str, revision: u64, access: Access, key: &str, end: &str| {
            store.check_keys(user, revision, access, key.as_bytes(), end.as_bytes())
        };
        assert_eq!(check("alice", rev, Access::Write, "app/x", ""), Ok(()));
        assert_eq!(check("alice", rev, Access::Read, "app/", "app0"), Ok(()));
        assert_eq!(
            check("alice", rev, Access::Read, "other", ""),
            Err(AuthError::PermissionDenied)
        );
        assert_eq!(
            check("alice", rev, Access::Read, "app/", "\0"),
            Err(AuthError::PermissionDenied),
            "past the granted prefix"
        );
        assert_eq!(
            check("alice", rev - 1, Access::Read, "app/x", ""),
            Err(AuthError::AuthOldRevision)
        );
        assert_eq!(
            check("", rev, Access::Read, "app/x", ""),
            Err(AuthError::UserEmpty)
        );
        assert_eq!(
            check("ghost", rev, Access::Read, "app/x", ""),
            Err(AuthError::PermissionDenied)
        );
        assert_eq!(check(ROOT, rev, Access::Write, "anything", "\0"), Ok(()));
    }

    #[test]
    fn a_revoked_permission_or_deleted_role_stops_the_user() {
        let mut store = enabled_store();
        let revoke = auth_command::Request::RoleRevokePermission(AuthRoleRevokePermissionRequest {
            role: "app".into(),
            key: "app/".as_bytes().to_vec().into(),
            range_end: "app0".as_bytes().to_vec().into(),
        });
        store.apply(9, &by(ROOT, revoke.clone())).unwrap();
        let rev = store.revision();
        assert_eq!(
            store.check_keys("alice", rev, Access::Write, b"app/x", b""),
            Err(AuthError::PermissionDenied)
        );
        assert_eq!(
            store.apply(10, &by(ROOT, revoke)),
            Err(AuthError::PermissionNotGranted)
        );
        let delete =
            auth_command::Request::RoleDelete(AuthRoleDeleteRequest { role: "app".into() });
        store.apply(11, &by(ROOT, delete)).unwrap();
        assert!(
            store.user("alice").unwrap().roles.is_empty(),
            "the role left its users"
        );
    }

    #[test]
    fn the_authorizer_checks_writes_and_lets_the_server_s_own_commands_through() {
        let store = enabled_store();
        let kv = KvStore::new(flotilla_kv::Limits::default());
        let author = |user: &str, revision: u64| Author {
            user: user.into(),
            auth_revision: revision,
        };
        let rev = store.revision();
        let put = |key: &str| {
            Operation::Put(PutRequest {
                key: key.as_bytes().to_vec().into(),
                ..Default::default()
            })
        };
        assert!(
            store
                .authorize(Some(&author("alice", rev)), &put("app/1"), &kv)
                .is_ok()
        );
        let denied = store.authorize(Some(&author("alice", rev)), &put("etc/1"), &kv);
        assert_eq!(denied.unwrap_err().kind(), ErrorKind::PermissionDenied);
        let stale = store.authorize(Some(&author("alice", rev - 1)), &put("app/1"), &kv);
        assert_eq!(stale.unwrap_err().kind(), ErrorKind::AuthOldRevision);
        let anonymous = store.authorize(Some(&author("", rev)), &put("app/1"), &kv);
        assert_eq!(anonymous.unwrap_err().kind(), ErrorKind::UserEmpty);
        assert!(
            store.authorize(None, &put("etc/1"), &kv).is_ok(),
            "the server's own"
        );
        let compact = Operation::Compaction(CompactionRequest {
            revision: 1,
            ..Default::default()
        });
        assert!(
            store
                .authorize(Some(&author("alice", rev)), &compact, &kv)
                .is_err()
        );
        assert!(
            store
                .authorize(Some(&author(ROOT, rev)), &compact, &kv)
                .is_ok()
        );
        // A txn is checked op by op, compares included.
        let txn = Operation::Txn(TxnRequest {
            compare: vec![Compare {
                key: "etc/secret".as_bytes().to_vec().into(),
                ..Default::default()
            }],
            success: vec![RequestOp {
                request: Some(Op::RequestPut(PutRequest {
                    key: "app/1".as_bytes().to_vec().into(),
                    ..Default::default()
                })),
            }],
            failure: Vec::new(),
        });
        assert!(
            store
                .authorize(Some(&author("alice", rev)), &txn, &kv)
                .is_err()
        );
    }

    #[test]
    fn the_store_survives_its_snapshot_form() {
        let store = enabled_store();
        assert_eq!(AuthStore::from_state(Some(&store.to_state())), store);
        assert_eq!(AuthStore::from_state(None), AuthStore::default());
    }

    #[test]
    fn authenticate_names_a_token_by_entry_index_and_refuses_strangers() {
        let store = enabled_store();
        let authenticate = |name: &str| {
            by(
                "",
                auth_command::Request::Authenticate(crate::peer_proto::AuthenticateCommand {
                    name: name.into(),
                    token_prefix: "abc".into(),
                }),
            )
        };
        let mut store = store;
        let applied = store.apply(42, &authenticate("alice")).unwrap();
        assert_eq!(applied.token, Some(("abc.42".into(), "alice".into())));
        assert_eq!(
            store.apply(43, &authenticate("ghost")),
            Err(AuthError::AuthFailed)
        );
    }
}
