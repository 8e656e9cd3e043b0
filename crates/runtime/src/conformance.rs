//! Conformance suites to run in your own tests, one line each: [`storage::run_suite`] for a
//! storage of your own, [`state_machine::run_suite`] for your state machine. Each check that
//! fails panics and says what it expected, as a test assertion does.

pub mod state_machine;
pub mod storage;
