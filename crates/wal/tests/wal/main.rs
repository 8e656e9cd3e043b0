//! Integration tests of the write-ahead log, in one binary to keep builds short.

mod behaviour;
mod corruption;
mod crash;
mod model;
mod support;
