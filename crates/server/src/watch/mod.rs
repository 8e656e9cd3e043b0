//! Watches (etcd-api.md §1.5): any member serves them from its own applied state.
//!
//! - [`hub`]: the apply thread publishes each revision's events to the subscribed watchers'
//!   bounded queues, never waiting for one.
//! - [`watcher`]: one watcher's position in the revision sequence: history first (read from
//!   the store), then live (from its queue), with the seam between them made under the state's
//!   read lock; a watcher whose queue overflowed goes back to history.
//! - [`stream`]: the task serving one Watch stream and its many watchers.
//! - [`event`]: events shared by their watchers, each encoded once for all of them.
//! - [`service`]: the gRPC Watch method, which writes those encodings as they are.

pub mod event;
pub mod hub;
pub mod service;
pub mod stream;
pub mod watcher;

pub use hub::{QueueBounds, WatchHub};
pub use stream::WatchContext;
