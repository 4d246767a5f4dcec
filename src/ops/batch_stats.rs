//! Local per-channel statistics of a batch.

use super::element::with_float_type;
use super::{channel_view, unsupported_dtype};
use crate::cpu;
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp1, Layout, Result, Shape};

/// Per-channel `[count; Σx; Σx²]` of the local batch as a `(3, C)` f64 tensor:
/// the all-reduce payload of the training forward.
///
/// The sums are assembled from per-block count, mean and M2 (f32 accumulation
/// for f32/f16/bf16, f64 for f64, blocks combined in f64), so `Σx²` is exact
/// to f64 rounding even when `|mean| ≫ std`. No backward: the gradient of the
/// statistics is part of [`super::BatchNormOp`]'s backward.
#[derive(Debug, Clone, Copy)]
pub struct BatchStats {
    /// The channel axis of the input (1, or the last axis for channel-innermost views).
    pub axis: usize,
}

impl CustomOp1 for BatchStats {
    fn name(&self) -> &'static str {
        "sync-batch-norm-stats"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = channel_view(layout, self.axis, self.name())?;
        let out = with_float_type!(storage.dtype(), T => {
            cpu::batch_stats(storage.as_slice::<T>()?, &v)
        }, _ => return Err(unsupported_dtype(self.name(), "input", storage.dtype())));
        Ok((CpuStorage::F64(out), Shape::from((3, v.channels))))
    }
}
