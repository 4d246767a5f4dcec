//! Local per-channel gradient sums of the backward pass.

use super::element::with_float_type;
use super::{channel_view, host_f64, unsupported_dtype};
use crate::cpu;
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Per-channel `[Σdy; Σdy·(x − mean)]` of the local batch as a `(2, C)` f64
/// tensor: the all-reduce payload of the backward pass, and the local weight
/// and bias gradients (see [`super::AffineGrads`]).
///
/// Applied as `dy.apply_op2_no_bwd(&x, &GradStats { .. })`.
#[derive(Debug, Clone)]
pub struct GradStats {
    /// The channel axis of `x` and `dy`.
    pub axis: usize,
    /// The `(3, C)` f64 moments (mean, invstd, count) used in the forward.
    pub moments: Tensor,
}

impl CustomOp2 for GradStats {
    fn name(&self) -> &'static str {
        "sync-batch-norm-grad-stats"
    }

    fn cpu_fwd(
        &self,
        dy: &CpuStorage,
        dl: &Layout,
        x: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if dl.dims() != xl.dims() {
            candle::bail!(
                "{}: gradient shape {:?} differs from input shape {:?}",
                self.name(),
                dl.dims(),
                xl.dims()
            )
        }
        if dy.dtype() != x.dtype() {
            candle::bail!(
                "{}: gradient dtype {:?} differs from input dtype {:?}",
                self.name(),
                dy.dtype(),
                x.dtype()
            )
        }
        let dv = channel_view(dl, self.axis, self.name())?;
        let xv = channel_view(xl, self.axis, self.name())?;
        let moments = host_f64(&self.moments)?;
        let mean = &moments[..xv.channels];
        let out = with_float_type!(x.dtype(), T => {
            cpu::grad_sums(dy.as_slice::<T>()?, &dv, x.as_slice::<T>()?, &xv, mean)
        }, _ => return Err(unsupported_dtype(self.name(), "input", x.dtype())));
        Ok((CpuStorage::F64(out), Shape::from((2, xv.channels))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dy: &candle::CudaStorage,
        dl: &Layout,
        x: &candle::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        if dl.dims() != xl.dims() {
            candle::bail!(
                "{}: gradient shape {:?} differs from input shape {:?}",
                self.name(),
                dl.dims(),
                xl.dims()
            )
        }
        if dy.dtype() != x.dtype() {
            candle::bail!(
                "{}: gradient dtype {:?} differs from input dtype {:?}",
                self.name(),
                dy.dtype(),
                x.dtype()
            )
        }
        let dv = channel_view(dl, self.axis, self.name())?;
        let xv = channel_view(xl, self.axis, self.name())?;
        let dev = x.device();
        let out = with_float_type!(x.dtype(), T => {
            cuda::grad_sums::<T>(dev, dy.as_cuda_slice::<T>()?, &dv, x.as_cuda_slice::<T>()?, &xv, &self.moments)?
        }, _ => return Err(unsupported_dtype(self.name(), "input", x.dtype())));
        Ok((
            candle::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((2, xv.channels)),
        ))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::cuda::launch::{self as l, Module, Reduction, ReductionSplit, Small};
    use crate::cuda::plan;
    use crate::ops::layout::ChannelView;
    use candle::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
    use candle::{CudaDevice, Result, Tensor, WithDType};

    /// Level 1 (`bn_grad_major_*` or `bn_grad_inner_*`) then level 2
    /// (`bn_grad_combine`): the `(2, C)` f64 sums `[Σdy; Σdy·(x − mean)]`.
    pub(super) fn grad_sums<T: WithDType>(
        dev: &CudaDevice,
        dy: &CudaSlice<T>,
        dv: &ChannelView,
        x: &CudaSlice<T>,
        xv: &ChannelView,
        moments: &Tensor,
    ) -> Result<CudaSlice<f64>> {
        let c = xv.channels;
        let moments = Small::new(moments, dev, "moments")?;
        let m = moments.mat2(3, c, "moments")?;
        if xv.is_empty() {
            return l::zeros::<f64>(dev, 2 * c);
        }
        // x is the primary view (it picks the path); dy follows its structure.
        let red = Reduction::new(
            plan::canonicalize(&[*xv, *dv]),
            l::vec_width::<T>(),
            &[l::aligned16(dev, x), l::aligned16(dev, dy)],
            l::sm_count(dev)?,
        );
        let parts = red.parts();
        // SAFETY: level 1 writes every (channel, part) entry (all parts are non-empty).
        let mut partial = unsafe { l::alloc::<f64>(dev, c * parts * 2)? };
        let f = l::function(dev, Module::Grad, &red.kernel("bn_grad", T::DTYPE))?;
        let stream = dev.cuda_stream();
        let (xk, dk) = (red.canon.views[0], red.canon.views[1]);
        let vec = red.vec_arg();
        let cfg = red.config()?;
        match red.split {
            ReductionSplit::Major(s) => {
                let (len, chunks, group) = (s.chunk_len as i64, s.chunks as i64, s.group as i32);
                let mut args = stream.launch_builder(&f);
                args.arg(dy).arg(&dk).arg(x).arg(&xk);
                l::push_storage(&mut args, moments.storage())?;
                args.arg(&m)
                    .arg(&len)
                    .arg(&chunks)
                    .arg(&group)
                    .arg(&vec)
                    .arg(&mut partial);
                // SAFETY: matches bn_grad_major_*(const T*, View, const T*, View,
                // const void*, Mat2, long long, long long, int, int, double*).
                unsafe { l::launch(args, cfg)? };
            }
            ReductionSplit::Inner(s) => {
                let rows = s.rows_per_block as i64;
                let mut args = stream.launch_builder(&f);
                args.arg(dy).arg(&dk).arg(x).arg(&xk);
                l::push_storage(&mut args, moments.storage())?;
                args.arg(&m).arg(&rows).arg(&vec).arg(&mut partial);
                // SAFETY: matches bn_grad_inner_*(const T*, View, const T*, View,
                // const void*, Mat2, long long, int, double*).
                unsafe { l::launch(args, cfg)? };
            }
        }
        l::combine(dev, Module::Grad, "bn_grad_combine", &partial, c, parts, 2)
    }
}
