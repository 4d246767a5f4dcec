//! The weight and bias gradients from the local gradient sums.

use super::{cpu_values_f64, f64_to_cpu_storage, host_f64};
use candle::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// From the local `(2, C)` f64 sums `[Σdy; Σdy·(x − mean)]` (see
/// [`super::GradStats`]), the `(2, C)` tensor `[dweight; dbias]` in the
/// parameters' dtype: `dweight = Σdy·(x − mean)·invstd`, `dbias = Σdy`.
///
/// These are this rank's contributions; averaging them over ranks belongs to
/// the data-parallel step, as in PyTorch. The layer gets the same values from
/// [`GradStats::apply_with_affine_grads`](super::GradStats::apply_with_affine_grads),
/// which saves this op's launch on a GPU.
#[derive(Debug, Clone)]
pub struct AffineGrads {
    /// The `(3, C)` f64 moments (mean, invstd, count) used in the forward.
    pub moments: Tensor,
    /// The dtype of the weight and bias.
    pub dtype: DType,
}

impl CustomOp1 for AffineGrads {
    fn name(&self) -> &'static str {
        "sync-batch-norm-affine-grads"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let sums = cpu_values_f64(storage, layout, self.name())?;
        let c_n = sums.len() / 2;
        let moments = host_f64(&self.moments)?;
        let mut out = vec![0.0f64; 2 * c_n];
        for c in 0..c_n {
            out[c] = sums[c_n + c] * moments[c_n + c];
            out[c_n + c] = sums[c];
        }
        Ok((
            f64_to_cpu_storage(&out, self.dtype, self.name())?,
            Shape::from((2, c_n)),
        ))
    }

    // The layer runs this math inside its fused ops on a GPU: this op's own
    // CUDA path serves the GPU tests (and benchmarks) only.
    #[cfg(all(feature = "cuda", any(test, feature = "internals")))]
    fn cuda_fwd(
        &self,
        storage: &candle::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        use crate::cuda::launch::{self as l, Module, Small};
        use crate::element::with_float_type;
        use candle::backend::BackendStorage;
        use candle::cuda_backend::cudarc::driver::PushKernelArg;
        let dims = layout.dims();
        if dims.len() != 2 || dims[0] != 2 {
            candle::bail!("{}: expected (2, C) sums, got {dims:?}", self.name())
        }
        let c_n = dims[1];
        let dev = storage.device();
        let sums = l::mat2(layout, storage.dtype(), 2, c_n, "gradient sums")?;
        let moments = Small::new(&self.moments, dev, "moments")?;
        let m = moments.mat2(3, c_n, "moments")?;
        let out = with_float_type!(self.dtype, T => {
            // SAFETY: the kernel writes all 2 * C values.
            let mut out = unsafe { l::alloc::<T>(dev, 2 * c_n)? };
            if c_n > 0 {
                let name = format!("bn_affine_grads_{}", self.dtype.as_str());
                let f = l::function(dev, Module::Grad, &name)?;
                let stream = dev.cuda_stream();
                let c = c_n as i64;
                let mut args = stream.launch_builder(&f);
                l::push_storage(&mut args, storage)?;
                args.arg(&sums);
                l::push_storage(&mut args, moments.storage())?;
                args.arg(&m).arg(&c).arg(&mut out);
                // SAFETY: matches bn_affine_grads_*(const void*, Mat2, const void*,
                // Mat2, long long, T*).
                unsafe { l::launch(args, l::grid(crate::cuda::plan::per_item_blocks(c_n))?)? };
            }
            candle::CudaStorage::wrap_cuda_slice(out, dev.clone())
        }, _ => return Err(super::unsupported_dtype(self.name(), "parameter", self.dtype)));
        Ok((out, Shape::from((2, c_n))))
    }
}
