//! Per-channel mean and inverse standard deviation, from batch sums or from
//! running statistics.

use super::{cpu_values_f64, ForwardCoefficients};
use candle::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// Produces the `(3, C)` f64 "moments" tensor every normalizing op reads:
/// rows `mean`, `invstd = 1/√(var + eps)` and `count`.
///
/// - As a [`CustomOp1`] on `(3, C)` f64 sums `[n; Σx; Σx²]` (all-reduced):
///   `mean = Σx/n`, `var = Σx²/n − mean²` (biased), computed in f64.
/// - As a [`CustomOp2`] on `(running_mean, running_var)` (any float dtype):
///   `mean = running_mean`, `var = running_var`, `count = 0`.
#[derive(Debug, Clone, Copy)]
pub struct Moments {
    /// Added to the variance before the square root.
    pub eps: f64,
}

impl Moments {
    /// Moments of one channel from its sums.
    pub fn from_sums(n: f64, s1: f64, s2: f64, eps: f64) -> (f64, f64) {
        if n <= 0.0 {
            return (0.0, 1.0 / eps.sqrt());
        }
        let mean = s1 / n;
        let var = (s2 / n - mean * mean).max(0.0);
        (mean, 1.0 / (var + eps).sqrt())
    }
}

impl CustomOp1 for Moments {
    fn name(&self) -> &'static str {
        "sync-batch-norm-moments"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.dims();
        if dims.len() != 2 || dims[0] != 3 {
            candle::bail!(
                "{}: expected (3, C) sums, got {dims:?}",
                CustomOp1::name(self)
            )
        }
        let c_n = dims[1];
        let sums = cpu_values_f64(storage, layout, CustomOp1::name(self))?;
        let mut out = vec![0.0f64; 3 * c_n];
        for c in 0..c_n {
            let n = sums[c];
            let (mean, invstd) = Self::from_sums(n, sums[c_n + c], sums[2 * c_n + c], self.eps);
            out[c] = mean;
            out[c_n + c] = invstd;
            out[2 * c_n + c] = n;
        }
        Ok((CpuStorage::F64(out), Shape::from((3, c_n))))
    }

    // The layer runs this math inside its fused ops on a GPU: this op's own
    // CUDA path serves the GPU tests (and benchmarks) only.
    #[cfg(all(feature = "cuda", any(test, feature = "internals")))]
    fn cuda_fwd(
        &self,
        storage: &candle::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        use crate::cuda::launch as l;
        use candle::backend::BackendStorage;
        use candle::cuda_backend::cudarc::driver::PushKernelArg;
        let dims = layout.dims();
        if dims.len() != 2 || dims[0] != 3 {
            candle::bail!(
                "{}: expected (3, C) sums, got {dims:?}",
                CustomOp1::name(self)
            )
        }
        let c_n = dims[1];
        let dev = storage.device();
        let sums = l::mat2(layout, storage.dtype(), 3, c_n, "sums")?;
        // SAFETY: the kernel writes all 3 * C values.
        let mut out = unsafe { l::alloc::<f64>(dev, 3 * c_n)? };
        if c_n > 0 {
            let f = l::function(dev, l::Module::Stats, "bn_moments_from_sums")?;
            let stream = dev.cuda_stream();
            let (c, eps) = (c_n as i64, self.eps);
            let mut args = stream.launch_builder(&f);
            l::push_storage(&mut args, storage)?;
            args.arg(&sums).arg(&c).arg(&eps).arg(&mut out);
            // SAFETY: matches bn_moments_from_sums(const void*, Mat2, long long,
            // double, double*); `sums` describes `storage`.
            unsafe { l::launch(args, l::grid(crate::cuda::plan::per_item_blocks(c_n))?)? };
        }
        Ok((
            candle::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((3, c_n)),
        ))
    }
}

impl CustomOp2 for Moments {
    fn name(&self) -> &'static str {
        "sync-batch-norm-running-moments"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.dims().len() != 1 || l1.dims() != l2.dims() {
            candle::bail!(
                "{}: expected running mean and variance of shape (C), got {:?} and {:?}",
                CustomOp2::name(self),
                l1.dims(),
                l2.dims()
            )
        }
        let mean = cpu_values_f64(s1, l1, CustomOp2::name(self))?;
        let var = cpu_values_f64(s2, l2, CustomOp2::name(self))?;
        let c_n = mean.len();
        let mut out = vec![0.0f64; 3 * c_n];
        for c in 0..c_n {
            out[c] = mean[c];
            out[c_n + c] = 1.0 / (var[c] + self.eps).sqrt();
        }
        Ok((CpuStorage::F64(out), Shape::from((3, c_n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.running_cuda((s1, l1), (s2, l2), None)
    }
}

impl Moments {
    /// The moments of the running statistics (as the [`CustomOp2`]) and,
    /// from the same op (on a GPU, the same launch), the forward's
    /// per-channel coefficients for `coefficients`' input dtype and
    /// parameters: eval's moments and the `(C, 8)` coefficient tensor to
    /// give [`BatchNormOp::coefficients`](super::BatchNormOp::coefficients).
    pub fn running_with_coefficients(
        running_mean: &Tensor,
        running_var: &Tensor,
        eps: f64,
        coefficients: &ForwardCoefficients,
    ) -> Result<(Tensor, Tensor)> {
        let c_n = running_mean.elem_count();
        // SAFETY: both paths write every coefficient before the op returns
        // Ok; on an error the tensor is dropped unread.
        let coef = unsafe {
            coefficients.alloc(
                c_n,
                running_mean.device(),
                "sync-batch-norm-running-moments",
            )?
        };
        let moments = running_mean.apply_op2_no_bwd(
            running_var,
            &WithCoefficients {
                moments: Moments { eps },
                request: coefficients,
                coef: &coef,
            },
        )?;
        Ok((moments, coef))
    }

    /// The CUDA moments of the running statistics, with the coefficients
    /// written into `coef` when given.
    #[cfg(feature = "cuda")]
    fn running_cuda(
        &self,
        (s1, l1): (&candle::CudaStorage, &Layout),
        (s2, l2): (&candle::CudaStorage, &Layout),
        coef: Option<(&ForwardCoefficients, &mut candle::CudaStorage)>,
    ) -> Result<(candle::CudaStorage, Shape)> {
        use super::coefficients::cuda as coef_args;
        use crate::cuda::launch as l;
        use candle::backend::BackendStorage;
        use candle::cuda_backend::cudarc::driver::PushKernelArg;
        if l1.dims().len() != 1 || l1.dims() != l2.dims() {
            candle::bail!(
                "{}: expected running mean and variance of shape (C), got {:?} and {:?}",
                CustomOp2::name(self),
                l1.dims(),
                l2.dims()
            )
        }
        let c_n = l1.dims()[0];
        let dev = s1.device();
        let mean = l::vec1(l1, s1.dtype(), c_n, "running mean")?;
        let var = l::vec1(l2, s2.dtype(), c_n, "running variance")?;
        let (params, coef_dt) = match &coef {
            Some((request, _)) => (
                Some(coef_args::Params::new(request, dev, c_n)?),
                coef_args::dtype_code(request.input)?,
            ),
            None => (None, 0),
        };
        // SAFETY: the kernel writes all 3 * C values.
        let mut out = unsafe { l::alloc::<f64>(dev, 3 * c_n)? };
        if c_n > 0 {
            let f = l::function(dev, l::Module::Stats, "bn_moments_from_running")?;
            let stream = dev.cuda_stream();
            let (c, eps) = (c_n as i64, self.eps);
            let mut args = stream.launch_builder(&f);
            l::push_storage(&mut args, s1)?;
            args.arg(&mean);
            l::push_storage(&mut args, s2)?;
            args.arg(&var).arg(&c).arg(&eps).arg(&mut out);
            let request = match (&params, coef) {
                (Some(p), Some((_, storage))) => Some((p, storage)),
                _ => None,
            };
            coef_args::push(&mut args, request, &coef_dt)?;
            // SAFETY: matches bn_moments_from_running(const void*, Vec1, const
            // void*, Vec1, long long, double, double*, const void*, Vec1,
            // const void*, Vec1, void*, int); the coefficients hold C * 8
            // accumulator values.
            unsafe { l::launch(args, l::grid(crate::cuda::plan::per_item_blocks(c_n))?)? };
        }
        Ok((
            candle::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((3, c_n)),
        ))
    }
}

/// [`Moments`] of running statistics that also writes the forward's
/// coefficients into `coef`, a fresh `(C, 8)` tensor no other tensor shares.
struct WithCoefficients<'a> {
    moments: Moments,
    request: &'a ForwardCoefficients,
    coef: &'a Tensor,
}

impl CustomOp2 for WithCoefficients<'_> {
    fn name(&self) -> &'static str {
        "sync-batch-norm-running-moments"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (moments, shape) = CustomOp2::cpu_fwd(&self.moments, s1, l1, s2, l2)?;
        let values = self.request.cpu_values_of(&moments, &shape, self.name())?;
        super::store_cpu(self.coef, self.name(), values)?;
        Ok((moments, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        super::with_cuda_storage_mut(self.coef, self.name(), |coef, _| {
            self.moments
                .running_cuda((s1, l1), (s2, l2), Some((self.request, coef)))
        })
    }
}
