//! The integration tests that start processes: this executable again as the
//! ranks and as the launcher (`multiprocess`, `launcher`), the training
//! example (`train_example`), and the rendezvous under attack and faults over
//! real sockets (`rendezvous`). One module per topic, so that
//! `cargo test --test multiprocess launcher::` runs the launcher's tests.
//!
//! A test that starts this executable again names the test the child is to
//! run by its whole path (`common::test_path`) with `--exact`, so that the
//! child runs that one test and none of the others in this binary.

#[path = "../common/mod.rs"]
mod common;

mod launcher;
mod multiprocess;
mod rendezvous;
mod train_example;
