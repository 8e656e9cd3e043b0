//! Access control's part in the state machine. The store knows nothing of users and roles;
//! the server hands apply an [`Authorizer`] that decides, from the command's author, whether
//! the command may run. The decision is taken at apply, on the state every member has at
//! that entry, so every member decides alike, and a permission revoked before the entry
//! applies is already in force for it (etcd's authApplierV3).

use crate::command::{Author, Operation};
use crate::error::KvError;
use crate::store::KvStore;

/// Decides whether a command's author may run it.
pub trait Authorizer {
    /// `Ok` if `author` may run `operation` on `store` as it is now (before the command).
    /// The store is there for what the request does not say itself: the keys attached to a
    /// lease being revoked or written under.
    fn authorize(
        &self,
        author: Option<&Author>,
        operation: &Operation,
        store: &KvStore,
    ) -> Result<(), KvError>;
}

/// Lets everything run: a cluster without authentication.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _: Option<&Author>, _: &Operation, _: &KvStore) -> Result<(), KvError> {
        Ok(())
    }
}
