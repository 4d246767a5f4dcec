//! CUDA support of the ops: planning (pure Rust, [`plan`]) and, with the `cuda`
//! feature, the launch helpers the ops' `cuda_fwd` share ([`launch`]): loading
//! the kernels of `cuda-kernels/` (compiled to PTX by `build.rs`), descriptors
//! of the small tensors they read, and the work splits of the reductions.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

pub mod args;
pub mod plan;


#[cfg(feature = "cuda")]
pub mod launch;
