//! Local per-channel statistics of a batch.

use super::{channel_view, unsupported_dtype};
use crate::cpu;
use crate::element::with_float_type;
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp1, Layout, Result, Shape};

/// Per-channel `[count; Σx; Σx²]` of the local batch as a `(3, C)` f64 tensor:
/// the all-reduce payload of the training forward.
///
/// The sums are assembled from per-block count, mean and M2 (f32 accumulation
/// for f32/f16/bf16, f64 for f64, blocks combined in f64), so `Σx²` is exact
/// to f64 rounding even when `|mean| ≫ std`. No backward: the gradient of the
/// statistics is part of [`super::BatchNormOp`]'s backward.
///
/// On CUDA the same two levels run as kernels: per-(channel, chunk) partials
/// `(n, mean, M2)`, then one warp per channel combines them in f64 in a fixed
/// order (deterministic, no atomics).
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let v = channel_view(layout, self.axis, self.name())?;
        let dev = storage.device();
        let out = with_float_type!(storage.dtype(), T => {
            cuda::stats::<T>(dev, storage.as_cuda_slice::<T>()?, &v)?
        }, _ => return Err(unsupported_dtype(self.name(), "input", storage.dtype())));
        Ok((
            candle::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((3, v.channels)),
        ))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::cuda::launch::{self as l, Module, ReductionSplit};
    use crate::layout::ChannelView;
    use candle::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
    use candle::{CudaDevice, Result, WithDType};

    /// Level 1 (`bn_stats_major_*` or `bn_stats_inner_*`) then level 2
    /// (`bn_stats_combine`): the `(3, C)` f64 sums of `x`.
    pub(super) fn stats<T: WithDType>(
        dev: &CudaDevice,
        x: &CudaSlice<T>,
        v: &ChannelView,
    ) -> Result<CudaSlice<f64>> {
        let c = v.channels;
        if v.is_empty() {
            return l::zeros::<f64>(dev, 3 * c);
        }
        let (red, f) = l::reduction::<T>(
            dev,
            Module::Stats,
            "bn_stats",
            &[*v],
            &[l::aligned16(dev, x)],
        )?;
        let parts = red.parts();
        // SAFETY: level 1 writes every (channel, part) entry (all parts are non-empty).
        let mut partial = unsafe { l::alloc::<f64>(dev, c * parts * 3)? };
        let stream = dev.cuda_stream();
        let kv = red.canon.views[0];
        let cfg = red.config()?;
        match red.split {
            ReductionSplit::Major(s) => {
                let (len, chunks, group) = (s.chunk_len as i64, s.chunks as i64, s.group as i32);
                let mut args = stream.launch_builder(&f);
                args.arg(x)
                    .arg(&kv)
                    .arg(&len)
                    .arg(&chunks)
                    .arg(&group)
                    .arg(&mut partial);
                // SAFETY: matches bn_stats_major_*(const T*, View, long long,
                // long long, int, double*) and its _half_ and _scalar_ entries; the
                // view lies inside `x`.
                unsafe { l::launch(args, cfg)? };
            }
            ReductionSplit::Inner(s) => {
                let rows = s.rows_per_block as i64;
                let mut args = stream.launch_builder(&f);
                args.arg(x).arg(&kv).arg(&rows).arg(&mut partial);
                // SAFETY: matches bn_stats_inner_*(const T*, View, long long,
                // double*) and bn_stats_inner_scalar_*; the view lies inside `x`.
                unsafe { l::launch(args, cfg)? };
            }
        }
        l::combine(
            dev,
            Module::Stats,
            "bn_stats_combine",
            &partial,
            c,
            parts,
            3,
        )
    }
}
