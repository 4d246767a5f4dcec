//! The math of SyncBatchNorm as candle custom ops, one struct per op with its
//! CPU path (and, with the `cuda` feature, its CUDA path) side by side.
//!
//! Public: the pieces a user composes a synchronized layer from on devices
//! without this crate's kernels, [`all_reduce_sum_with_grad`] and
//! [`increment_counter`]. The op structs below are public only with the
//! unstable `internals` feature (this crate's benchmarks and GPU tests).
//!
//! Training forward: `BatchStats` (local `[n; Σx; Σx²]` per channel) → one
//! all-reduce → `BatchMoments` (mean, invstd, and in the same pass the
//! running statistics and the counter, in place: what `CounterIncrement`,
//! `RunningStatsUpdate` and `Moments` do one at a time; on a GPU also the
//! normalization's `ForwardCoefficients`) → `BatchNormOp` (normalize,
//! with autograd). Eval: `Moments` of the running statistics (with the
//! coefficients on a GPU) → `BatchNormOp`.
//! Backward of `BatchNormOp`: `GradStats` (local `[Σdy; Σdy·(x−μ)]`, and
//! from the same op the local dweight and dbias, what `AffineGrads`
//! computes from them) → one all-reduce → `InputGrad` (dx).
//! With a fused ReLU (`FusedRelu`), both passes mask the incoming gradient
//! where the forward's output, recomputed from the input, was not positive.
//! `BatchNormAddOp` adds a residual before the ReLU: `ReluGrad` masks the
//! incoming gradient by its output first (that masked gradient is the
//! residual's gradient); its weight and bias come as one `StackParams`.
//!
//! On devices without these kernels (Metal, …) the layer is composed of
//! candle ops instead; [`all_reduce_sum_with_grad`] (a sum over the ranks
//! whose gradient is summed over the ranks) gives it the synchronized
//! backward, and [`increment_counter`] the counter update on any device.

mod affine_grads;
mod all_reduce;
mod batch_moments;
mod batch_norm;
mod batch_norm_add;
mod batch_stats;
mod coefficients;
#[cfg(all(test, target_os = "linux"))]
mod cuda_kernel_tests;
mod grad_stats;
mod input_grad;
mod moments;
mod relu_grad;
mod running_stats;
mod stack_params;

pub use all_reduce::all_reduce_sum_with_grad;
pub(crate) use running_stats::counter_value;
pub use running_stats::increment_counter;

#[cfg(feature = "internals")]
pub use op_structs::*;
#[cfg(not(feature = "internals"))]
pub(crate) use op_structs::*;

/// The op structs, re-exported with the visibility the `internals` feature
/// gives (public with it, for this crate's benchmarks and GPU tests; some
/// are used only there).
#[cfg_attr(not(feature = "internals"), allow(unused_imports))]
mod op_structs {
    pub use super::affine_grads::AffineGrads;
    pub use super::batch_moments::{BatchMoments, RunningTensors};
    pub use super::batch_norm::BatchNormOp;
    pub use super::batch_norm_add::BatchNormAddOp;
    pub use super::batch_stats::BatchStats;
    pub use super::coefficients::{ForwardCoefficients, COEFFICIENTS_PER_CHANNEL};
    pub use super::grad_stats::GradStats;
    pub use super::input_grad::InputGrad;
    pub use super::moments::Moments;
    pub use super::relu_grad::{FusedRelu, ReluGrad};
    pub use super::running_stats::{CounterIncrement, RunningStat, RunningStatsUpdate};
    pub use super::stack_params::StackParams;
}

use crate::error::{error, ErrorKind};
use crate::layout::ChannelView;
use candle::backend::BackendStorage;
use candle::{CpuStorage, DType, Layout, Result, Tensor};

/// Whether this crate has kernels for tensors on `device`: the CPU, and
/// CUDA devices when built with the `cuda` feature. Elsewhere (Metal, or a
/// CUDA device of a candle whose `cuda` feature another crate enabled) the
/// layer is composed of candle ops
/// ([`SyncBatchNorm::forward_composite_t`](crate::SyncBatchNorm::forward_composite_t)).
pub(crate) fn has_kernels(device: &candle::Device) -> bool {
    device.is_cpu() || (cfg!(feature = "cuda") && device.is_cuda())
}

/// The view of `layout` around `axis`, or an error naming the op.
pub(crate) fn channel_view(layout: &Layout, axis: usize, op: &str) -> Result<ChannelView> {
    ChannelView::new(layout, axis).ok_or_else(|| {
        error(ErrorKind::BadInput, format!(
            "{op}: unsupported strides {:?} for shape {:?} (the dims before and after axis {axis} must each form one strided run; make the tensor contiguous)",
            layout.stride(),
            layout.dims()
        ))
    })
}

/// `t` itself when its dims around `axis` merge into one strided view, else a contiguous copy.
pub(crate) fn viewable(t: &Tensor, axis: usize) -> Result<Tensor> {
    if ChannelView::new(t.layout(), axis).is_some() {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// The values of a small tensor (per-channel statistics) as f64 on the host.
pub(crate) fn host_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

/// The error for an input dtype an op does not take.
pub(crate) fn unsupported_dtype(op: &str, what: &str, dtype: DType) -> candle::Error {
    error(
        ErrorKind::BadInput,
        format!("{op}: {what} must be f32, f64, f16 or bf16, got {dtype:?}"),
    )
}

/// Storage offsets of the elements of `layout`, in logical (row-major) order.
pub(crate) fn strided_offsets(layout: &Layout) -> Vec<usize> {
    let dims = layout.dims();
    let strides = layout.stride();
    let mut offsets = vec![layout.start_offset()];
    for (&d, &s) in dims.iter().zip(strides.iter()) {
        offsets = offsets
            .iter()
            .flat_map(|&base| (0..d).map(move |k| base + k * s))
            .collect();
    }
    offsets
}

/// The values of a small CPU tensor (per-channel statistics) as f64.
pub(crate) fn cpu_values_f64(storage: &CpuStorage, layout: &Layout, op: &str) -> Result<Vec<f64>> {
    let idx = strided_offsets(layout);
    Ok(match storage {
        CpuStorage::F64(v) => idx.iter().map(|&i| v[i]).collect(),
        CpuStorage::F32(v) => idx.iter().map(|&i| v[i] as f64).collect(),
        CpuStorage::F16(v) => idx.iter().map(|&i| v[i].to_f64()).collect(),
        CpuStorage::BF16(v) => idx.iter().map(|&i| v[i].to_f64()).collect(),
        CpuStorage::I64(v) => idx.iter().map(|&i| v[i] as f64).collect(),
        CpuStorage::U32(v) => idx.iter().map(|&i| v[i] as f64).collect(),
        other => {
            return Err(error(
                ErrorKind::BadInput,
                format!("{op}: unsupported statistics dtype {:?}", other.dtype()),
            ))
        }
    })
}

/// Rounds f64 values to a float dtype's CPU storage, to nearest as the CUDA
/// kernels round (see [`element::bf16_from_f64`]).
pub(crate) fn f64_to_cpu_storage(values: &[f64], dtype: DType, op: &str) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F64 => CpuStorage::F64(values.to_vec()),
        DType::F32 => CpuStorage::F32(values.iter().map(|&v| v as f32).collect()),
        DType::F16 => CpuStorage::F16(
            values
                .iter()
                .map(|&v| crate::element::f16_from_f64(v))
                .collect(),
        ),
        DType::BF16 => CpuStorage::BF16(
            values
                .iter()
                .map(|&v| crate::element::bf16_from_f64(v))
                .collect(),
        ),
        other => return Err(unsupported_dtype(op, "parameter", other)),
    })
}

/// The bits of a tensor's values as f64, for tests that compare ops bit for bit.
#[cfg(test)]
pub(crate) fn test_bits(t: &Tensor) -> Vec<u64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// Lends the storage of a tensor to a closure from inside an in-place op on
/// it, so that an op can write a second output it was handed: `t`'s storage
/// is write-locked while `f` runs. `t` must share its storage with no tensor
/// the caller holds locked (the lock would wait for itself); the ops make
/// such tensors themselves, fresh.
struct Lend<F, R> {
    name: &'static str,
    f: std::cell::RefCell<Option<F>>,
    out: std::cell::RefCell<Option<R>>,
}

impl<F, R> Lend<F, R> {
    fn new(name: &'static str, f: F) -> Self {
        Self {
            name,
            f: std::cell::RefCell::new(Some(f)),
            out: std::cell::RefCell::new(None),
        }
    }

    fn take_f(&self) -> Result<F> {
        self.f.borrow_mut().take().ok_or_else(|| {
            candle::Error::Msg(format!("{}: internal error, storage lent twice", self.name))
        })
    }

    fn result(self) -> Result<R> {
        self.out.into_inner().ok_or_else(|| {
            candle::Error::Msg(format!("{}: internal error, storage not lent", self.name))
        })
    }
}

/// Runs `f` on the CPU storage of `t`, write-locked (see [`Lend`]).
pub(crate) fn with_cpu_storage_mut<R>(
    t: &Tensor,
    name: &'static str,
    f: impl FnOnce(&mut CpuStorage, &Layout) -> Result<R>,
) -> Result<R> {
    struct OnCpu<F, R>(Lend<F, R>);
    impl<F: FnOnce(&mut CpuStorage, &Layout) -> Result<R>, R> candle::InplaceOp1 for OnCpu<F, R> {
        fn name(&self) -> &'static str {
            self.0.name
        }

        fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
            let r = (self.0.take_f()?)(storage, layout)?;
            *self.0.out.borrow_mut() = Some(r);
            Ok(())
        }
    }
    let op = OnCpu(Lend::new(name, f));
    t.inplace_op1(&op)?;
    op.0.result()
}

/// Replaces the CPU storage of `t`, a fresh tensor made for `values` (same
/// dtype, contiguous from the start): how an op fills a second output.
pub(crate) fn store_cpu(t: &Tensor, name: &'static str, values: CpuStorage) -> Result<()> {
    with_cpu_storage_mut(t, name, |storage, _| {
        *storage = values;
        Ok(())
    })
}

/// Runs `f` on the CUDA storage of `t`, write-locked (see [`Lend`]).
#[cfg(feature = "cuda")]
pub(crate) fn with_cuda_storage_mut<R>(
    t: &Tensor,
    name: &'static str,
    f: impl FnOnce(&mut candle::CudaStorage, &Layout) -> Result<R>,
) -> Result<R> {
    struct OnCuda<F, R>(Lend<F, R>);
    impl<F: FnOnce(&mut candle::CudaStorage, &Layout) -> Result<R>, R> candle::InplaceOp1
        for OnCuda<F, R>
    {
        fn name(&self) -> &'static str {
            self.0.name
        }

        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
            candle::bail!(
                "{}: internal error, an output tensor is on the CPU, not on the GPU",
                self.0.name
            )
        }

        fn cuda_fwd(&self, storage: &mut candle::CudaStorage, layout: &Layout) -> Result<()> {
            let r = (self.0.take_f()?)(storage, layout)?;
            *self.0.out.borrow_mut() = Some(r);
            Ok(())
        }
    }
    let op = OnCuda(Lend::new(name, f));
    t.inplace_op1(&op)?;
    op.0.result()
}
