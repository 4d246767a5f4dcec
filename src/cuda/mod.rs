//! CUDA support of the ops: planning (pure Rust, [`plan`]), the argument
//! structs the kernels take by value ([`args`]) and, with the `cuda` feature,
//! the launch helpers the ops' `cuda_fwd` share ([`launch`]): loading the
//! kernels of `cuda-kernels/` (compiled to PTX by `build.rs`), descriptors of
//! the small tensors they read, and the work splits of the reductions.
//!
//! In unit tests, `emulator` compiles the same kernels for the host, and the
//! ops' `cuda_kernel_tests` run them against the CPU path of the ops;
//! [`memory`] is the CUDA memory pool's policy (`crate::cuda_memory`).
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

pub mod args;
pub(crate) mod kernels;
pub mod plan;

#[cfg(all(test, target_os = "linux"))]
pub(crate) mod emulator;

#[cfg(feature = "cuda")]
pub mod launch;
#[cfg(feature = "cuda")]
pub mod memory;
