//! Authentication and role-based access control, as etcd 3.4/3.5 does them: users with
//! bcrypt passwords and roles, roles with key-range permissions, the `root` user and role,
//! tokens (simple or JWT), and the client certificate's common name as the user name when
//! `--client-cert-auth` is on.
//!
//! Where each check happens, and why there:
//! - Writes (put, delete, txn, lease revoke, compaction) are checked when they *apply*, by
//!   the replicated store ([`AuthStore`] as the KV store's `Authorizer`), against the auth
//!   state at that entry: a permission revoked before the write applies already stops it,
//!   and every member decides alike. The command carries its author and the auth revision
//!   its credentials were checked at; an older revision is refused ("revision of auth store
//!   is old") and the client authenticates again.
//! - Reads (range, read-only txn) are checked by the member serving them, after the read
//!   barrier, against its applied auth state, which is at least as new as the barrier.
//! - Watches are checked when created (etcd's rule). A permission revoked later does not
//!   cancel a watch that is already running: it keeps receiving events, as in etcd. New
//!   watches are refused.
//! - Changes to users and roles, and every Auth, Maintenance and Cluster call that changes
//!   or exposes the whole store, need the root role.

pub mod credentials;
mod error;
pub mod password;
pub mod permissions;
mod store;
pub mod tokens;

pub use error::AuthError;
pub use permissions::Access;
pub use store::{AuthApplied, AuthStore, ROOT, no_password};
pub use tokens::{TokenInfo, TokenKind, Tokens};
