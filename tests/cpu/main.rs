//! The integration tests that run in this one process: the layer and its ops
//! against references, ranks as threads over the in-process and TCP groups,
//! conversion, checkpoints, data-parallel helpers. One module per topic, so
//! that `cargo test --test cpu tcp::` runs the TCP group's tests.
//!
//! One test starts a process: `checkpoint::killed_saves_leave_no_temp_files`
//! runs this executable again, that test alone (`common::test_path` with
//! `--exact`), as the saving child it kills. The other tests that start
//! processes are in `tests/multiprocess/`; the CUDA and NCCL tests in
//! `tests/cuda.rs` and `tests/nccl.rs`; the allocator policy, which holds for
//! the whole process, in `tests/allocator.rs`.

#[path = "../common/mod.rs"]
mod common;

mod checkpoint;
mod compat;
mod composite;
mod convert;
mod data_parallel;
mod errors;
mod frozen;
mod fused_relu;
mod numerics;
mod precise_bn;
mod ranks;
mod reference;
mod subgroups;
mod tcp;
