//! Local per-channel gradient sums of the backward pass.

use super::element::{with_float_type, Element};
use super::{channel_view, host_f64, unsupported_dtype, FusedRelu};
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
    /// The forward's fused ReLU: `dy` is then the gradient of its output
    /// and is masked first.
    pub relu: Option<FusedRelu>,
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
        if moments.len() != 3 * xv.channels {
            candle::bail!(
                "{}: moments for {} channels, input has {}",
                self.name(),
                moments.len() / 3,
                xv.channels
            )
        }
        let mean = &moments[..xv.channels];
        let out = with_float_type!(x.dtype(), T => {
            let mask = match &self.relu {
                Some(r) => Some(r.cpu_mask::<<T as Element>::Acc>(&moments, self.name())?),
                None => None,
            };
            cpu::grad_sums(dy.as_slice::<T>()?, &dv, x.as_slice::<T>()?, &xv, mean, mask.as_ref())
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
            cuda::grad_sums::<T>(dev, dy.as_cuda_slice::<T>()?, &dv, x.as_cuda_slice::<T>()?, &xv, &self.moments, self.relu.as_ref())?
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
    use crate::ops::FusedRelu;
    use candle::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
    use candle::{CudaDevice, Result, Tensor, WithDType};

    /// Level 1 (`bn_grad_major_*` or `bn_grad_inner_*`) then level 2
    /// (`bn_grad_combine`): the `(2, C)` f64 sums `[Σdy; Σdy·(x − mean)]`.
    /// With `relu`, the forward's coefficients (`bn_coef_normalize_*`) come
    /// first, and level 1 is `bn_grad_relu_major_*` / `bn_grad_relu_inner_*`,
    /// which recompute the ReLU's mask from them.
    pub(super) fn grad_sums<T: WithDType>(
        dev: &CudaDevice,
        dy: &CudaSlice<T>,
        dv: &ChannelView,
        x: &CudaSlice<T>,
        xv: &ChannelView,
        moments: &Tensor,
        relu: Option<&FusedRelu>,
    ) -> Result<CudaSlice<f64>> {
        let c = xv.channels;
        let moments = Small::new(moments, dev, "moments")?;
        let m = moments.mat2(3, c, "moments")?;
        if xv.is_empty() {
            return l::zeros::<f64>(dev, 2 * c);
        }
        let relu_coef = match relu {
            Some(r) => Some(r.cuda_coefficients(dev, T::DTYPE, &moments, c)?),
            None => None,
        };
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
        // After a fused ReLU: the bn_grad_relu_* kernels, with the coefficients.
        let prefix = if relu_coef.is_some() {
            "bn_grad_relu"
        } else {
            "bn_grad"
        };
        let f = l::function(dev, Module::Grad, &red.kernel(prefix, T::DTYPE))?;
        let stream = dev.cuda_stream();
        let (xk, dk) = (red.canon.views[0], red.canon.views[1]);
        let cfg = red.config()?;
        match red.split {
            ReductionSplit::Major(s) => {
                let (len, chunks, group) = (s.chunk_len as i64, s.chunks as i64, s.group as i32);
                let mut args = stream.launch_builder(&f);
                args.arg(dy).arg(&dk).arg(x).arg(&xk);
                l::push_storage(&mut args, moments.storage())?;
                args.arg(&m);
                if let Some(coef) = &relu_coef {
                    args.arg(coef);
                }
                args.arg(&len).arg(&chunks).arg(&group).arg(&mut partial);
                // SAFETY: matches bn_grad_major_*(const T*, View, const T*, View,
                // const void*, Mat2, long long, long long, int, double*) and
                // bn_grad_major_scalar_*, or bn_grad_relu_major_* and
                // bn_grad_relu_major_scalar_* with `const A* relu` (C * 8
                // values) after the Mat2.
                unsafe { l::launch(args, cfg)? };
            }
            ReductionSplit::Inner(s) => {
                let rows = s.rows_per_block as i64;
                let mut args = stream.launch_builder(&f);
                args.arg(dy).arg(&dk).arg(x).arg(&xk);
                l::push_storage(&mut args, moments.storage())?;
                args.arg(&m);
                if let Some(coef) = &relu_coef {
                    args.arg(coef);
                }
                args.arg(&rows).arg(&mut partial);
                // SAFETY: matches bn_grad_inner_*(const T*, View, const T*, View,
                // const void*, Mat2, long long, double*) and
                // bn_grad_inner_scalar_*, or bn_grad_relu_inner_* and
                // bn_grad_relu_inner_scalar_* with `const A* relu` (C * 8
                // values) after the Mat2.
                unsafe { l::launch(args, cfg)? };
            }
        }
        l::combine(dev, Module::Grad, "bn_grad_combine", &partial, c, parts, 2)
    }
}
