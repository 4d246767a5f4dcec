//! CUDA support of the ops: planning (pure Rust, [`plan`]), the argument
//! structs the kernels take by value ([`args`]) and, with the `cuda` feature,
//! the launch helpers the ops' `cuda_fwd` share ([`launch`]): loading the
//! kernels of `cuda-kernels/` (compiled to PTX by `build.rs`), descriptors of
//! the small tensors they read, and the work splits of the reductions.
//!
//! In unit tests, `emulator` compiles the same kernels for the host and
//! `kernel_tests` runs them against the CPU path of the ops.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

pub mod args;
pub mod plan;

#[cfg(all(test, target_os = "linux"))]
mod emulator;
#[cfg(all(test, target_os = "linux"))]
mod kernel_tests;

#[cfg(feature = "cuda")]
pub mod launch;
