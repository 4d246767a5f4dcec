//! Synchronized batch normalization for [candle](https://github.com/huggingface/candle):
//! the counterpart of PyTorch's `torch.nn.SyncBatchNorm`.
//!
//! In data-parallel training every rank (one process per GPU, or one thread per
//! rank) runs the model on its slice of the global batch. A [`SyncBatchNorm`]
//! layer normalizes with the mean and variance of the *global* batch: with
//! this crate's CPU and CUDA kernels, one all-reduce of `O(C)` values per
//! training forward and one per backward, over a [`ProcessGroup`] (masked
//! subgroups send one slot per block; the layer composed of candle ops, on
//! other devices, makes two all-reduces per pass). Eval mode uses the running statistics and communicates
//! nothing. Arguments, numbers, running-statistics rules and variable names are
//! PyTorch's (`weight`, `bias`, `running_mean`, `running_var`,
//! `num_batches_tracked`).
//!
//! # A data-parallel training step
//!
//! candle has no DDP, so the step broadcasts the initial variables once
//! ([`data_parallel::broadcast_varmap`]) and averages the gradients after each
//! backward ([`data_parallel::GradientAverager`], kept across steps: after the
//! first step no host synchronization); the batch statistics of the
//! `SyncBatchNorm` layers are synchronized by the layers themselves.
//!
//! ```
//! use candle::{DType, Device, Module, ModuleT, Tensor};
//! use candle_nn::{Optimizer, VarBuilder, VarMap};
//! use candle_syncbn::data_parallel::{broadcast_varmap, AverageOptions, GradientAverager};
//! use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
//!
//! /// The training loop of one rank; `group` is this rank's handle.
//! fn train(group: ProcessGroup) -> candle::Result<Vec<f32>> {
//!     let dev = Device::Cpu;
//!     let varmap = VarMap::new();
//!     let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//!     let conv = candle_nn::conv2d(3, 8, 3, Default::default(), vb.pp("conv"))?;
//!     let bn = SyncBatchNorm::new(8, SyncBatchNormConfig::default(), vb.pp("bn"), group.clone())?;
//!     let head = candle_nn::linear(8, 2, vb.pp("head"))?;
//!     // Every rank starts from rank 0's weights.
//!     broadcast_varmap(&varmap, &group, 0)?;
//!     let mut opt = candle_nn::SGD::new(varmap.all_vars(), 0.1)?;
//!     let mut averager = GradientAverager::new(&group, AverageOptions::default());
//!     let mut running_mean = Vec::new();
//!     for _step in 0..3 {
//!         // This rank's slice of the global batch (random here).
//!         let x = Tensor::randn(0f32, 1.0, (4, 3, 8, 8), &dev)?;
//!         let labels = Tensor::new(&[0u32, 1, 0, 1], &dev)?;
//!         // Forward: the SyncBatchNorm all-reduces the batch statistics
//!         // (`forward_relu_t`: batch norm and ReLU in one op; `forward_t`
//!         // without the ReLU).
//!         let h = bn.forward_relu_t(&conv.forward(&x)?, true)?;
//!         let logits = head.forward(&h.mean((2, 3))?)?;
//!         let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
//!         // Backward: one more all-reduce per SyncBatchNorm layer.
//!         let mut grads = loss.backward()?;
//!         // Data-parallel step: average the gradients (bucketed all-reduces;
//!         // the first call agrees on which variables have gradients).
//!         averager.average(&varmap, &mut grads)?;
//!         opt.step(&grads)?;
//!         running_mean = bn.running_mean().unwrap().to_vec1::<f32>()?;
//!     }
//!     Ok(running_mean)
//! }
//!
//! // Two in-process ranks, one thread each. Across processes, build the group
//! // with `ProcessGroup::from_env(&device)?` under a launcher (torchrun-style
//! // variables, or the examples' `--nproc-per-node`): see `examples/train.rs`.
//! let handles: Vec<_> = ProcessGroup::threads(2)?
//!     .into_iter()
//!     .map(|group| std::thread::spawn(move || train(group)))
//!     .collect();
//! let results: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect::<candle::Result<_>>()?;
//! // Synchronized statistics: every rank holds the same running mean.
//! assert_eq!(results[0], results[1]);
//! # Ok::<(), candle::Error>(())
//! ```
//!
//! # Modules
//!
//! - [`SyncBatchNorm`] and [`SyncBatchNormConfig`]: the layer (a
//!   [`candle_nn::ModuleT`]) and its arguments.
//! - [`group`]: [`ProcessGroup`] handles over a [`Backend`]: single, in-process
//!   threads, TCP, NCCL (feature `nccl`), MPI (feature `mpi`), or your own; and subgroups
//!   ([`ProcessGroup::subgroups`], [`ProcessGroup::split`]) to synchronize
//!   the statistics within blocks of ranks (the GPUs of one node, say).
//! - [`ops`]: the functional pieces to compose a synchronized layer from
//!   candle ops ([`ops::all_reduce_sum_with_grad`], [`ops::increment_counter`]).
//! - [`keep_freed_memory`]`(&device)`, the memory policy to call at the start
//!   of training, on the CPU and on CUDA devices (candle re-allocates every
//!   activation and gradient each step; glibc's default, and the CUDA memory
//!   pool's, return that memory and fault or map it in again).
//! - [`convert`]: drop-in [`batch_norm`], `SyncBatchNorm::from_batch_norm`, the
//!   [`BatchNormRewriter`], and checkpoints to and from PyTorch and candle-nn.
//! - [`FrozenBatchNorm`]: a fixed affine map from a checkpoint's statistics
//!   (detectron2's `FrozenBN`); [`precise_bn`]: recomputing the running
//!   statistics as the average over many batches (fvcore's `update_bn_stats`).
//! - [`launch`]: rendezvous from the environment and the self-spawning launcher;
//!   [`data_parallel`]: broadcasting variables, averaging gradients, atomic
//!   checkpoints.
//!
//! # Features
//!
//! - default: CPU.
//! - `cuda`: the CUDA kernels of every op (needs nvcc at build time, see the README).
//! - `nccl`: the NCCL process group (implies `cuda`).
//! - `mpi`: the MPI process group, for CPU clusters under `mpirun` or
//!   `srun --mpi=pmix` (needs an MPI library; see docs/mpi.md).
//! - `metal`: candle's Metal backend. This crate has no Metal kernels: on
//!   devices it has no kernels for (Metal; CUDA without the `cuda` feature)
//!   the layer runs composed of candle ops
//!   ([`SyncBatchNorm::forward_composite_t`], same semantics, slower),
//!   synchronized through [`ops::all_reduce_sum_with_grad`].
//! - `internals`: **unstable, not covered by semver**; for this crate's
//!   benchmarks and GPU tests only. Makes the op structs of [`ops`] (candle
//!   custom ops, each one step of the layer: most launch one kernel, some a
//!   reduction and its combine), the CPU kernels in `cpu`, and the
//!   `element` and `layout` modules public.

#![warn(missing_docs)]

pub mod convert;
#[cfg(feature = "internals")]
pub mod cpu;
#[cfg(not(feature = "internals"))]
pub(crate) mod cpu;
pub mod data_parallel;
pub mod group;
pub mod launch;
pub mod ops;
pub mod precise_bn;

// The element types and tensor views the kernels work on: public only with
// the unstable `internals` feature (benchmarks of the CPU kernels).
#[cfg(feature = "internals")]
pub mod element;
#[cfg(not(feature = "internals"))]
pub(crate) mod element;
#[cfg(feature = "internals")]
pub mod layout;
#[cfg(not(feature = "internals"))]
pub(crate) mod layout;

mod atomic_file;
mod config;
#[cfg(any(feature = "cuda", test))]
mod cuda;
mod error;
mod grad_average;
mod grad_pack;
mod layer;
mod memory;

#[cfg(feature = "cuda")]
pub use cuda::memory as cuda_memory;

pub use config::SyncBatchNormConfig;
pub use convert::{
    batch_norm, BatchNormLayer, BatchNormRewriter, ConvertedSite, LocalBatchNorm, Outcome,
};
pub use error::{error_kind, Error, ErrorKind};
pub use group::{
    default_group, set_default_group, set_thread_default_group, Backend, ProcessGroup,
};
pub use launch::{init_rank, Rank};
pub use layer::{FrozenBatchNorm, SyncBatchNorm};

/// The README's Rust code blocks, compiled by `cargo test --doc` (and run,
/// unless marked `no_run`), so that they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
pub use memory::keep_freed_memory;
