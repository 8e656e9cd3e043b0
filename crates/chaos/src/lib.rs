//! # flotilla-chaos: fault injection on a real cluster, with linearizability checking
//!
//! Work in progress.

pub mod checkers;
pub mod history;
pub mod linearizability;
pub mod rng;
