//! Synchronized batch normalization for [candle](https://github.com/huggingface/candle).
//!
//! See the README for the overview; the crate docs are completed below.

pub mod convert;
pub mod cpu;
pub mod group;
pub mod ops;

mod config;
#[cfg(any(feature = "cuda", test))]
mod cuda;
mod layer;

pub use config::SyncBatchNormConfig;
pub use convert::{batch_norm, BatchNormLayer, BatchNormRewriter, ConvertedSite, LocalBatchNorm};
pub use group::{
    default_group, set_default_group, set_thread_default_group, Backend, ProcessGroup,
};
pub use layer::SyncBatchNorm;
