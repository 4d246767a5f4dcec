//! The gradient mask of the ReLU fused into the normalization: recomputed
//! inside the backward passes ([`FusedRelu`]), or as a pass of its own over
//! the output ([`ReluGrad`], for the residual op).

use super::{channel_view, host_f64, unsupported_dtype};
use crate::cpu::{self, ReluMask};
use crate::element::{with_float_type, Accum};
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// A ReLU fused into the normalization, as the backward passes of
/// [`BatchNormOp`](super::BatchNormOp) see it: [`GradStats`](super::GradStats)
/// and [`InputGrad`](super::InputGrad) recompute its gradient mask (`dy`
/// where the output is > 0, or NaN) from the input with the forward's
/// arithmetic, so the mask costs no pass over memory of its own.
#[derive(Debug, Clone, Default)]
pub struct FusedRelu {
    /// The forward's weight (`None`: 1).
    pub weight: Option<Tensor>,
    /// The forward's bias (`None`: 0).
    pub bias: Option<Tensor>,
    /// The forward's coefficients, if it computed them with the moments
    /// ([`ForwardCoefficients`](super::ForwardCoefficients)): on a GPU the
    /// backward reads them instead of launching their kernel again.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub coefficients: Option<Tensor>,
}

impl FusedRelu {
    /// The mask coefficients of the CPU kernels: `invstd·weight` and `bias`,
    /// from the `(3, C)` f64 `moments`, computed and rounded as the forward
    /// computes them.
    pub(crate) fn cpu_mask<A: Accum>(&self, moments: &[f64], op: &str) -> Result<ReluMask<A>> {
        let c_n = moments.len() / 3;
        let values = |t: &Option<Tensor>, absent: f64, what: &str| -> Result<Vec<f64>> {
            let v = match t {
                Some(t) => host_f64(t)?,
                None => vec![absent; c_n],
            };
            if v.len() != c_n {
                candle::bail!(
                    "{op}: fused ReLU {what} has {} values for {c_n} channels",
                    v.len()
                )
            }
            Ok(v)
        };
        let w = values(&self.weight, 1.0, "weight")?;
        let b = values(&self.bias, 0.0, "bias")?;
        let scale: Vec<f64> = (0..c_n).map(|c| moments[c_n + c] * w[c]).collect();
        Ok(ReluMask::new(&scale, &b))
    }

    /// The forward's coefficients on the GPU, for inputs of `dtype` with `c`
    /// channels: [`Self::coefficients`], else the forward's own kernel
    /// (`bn_coef_normalize_*`) on the same moments, weight and bias.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_coefficients<'a>(
        &'a self,
        dev: &candle::CudaDevice,
        dtype: candle::DType,
        moments: &crate::cuda::launch::Small<'_>,
        c: usize,
        op: &str,
    ) -> Result<super::coefficients::cuda::Coef<'a>> {
        use crate::cuda::launch::Small;
        super::coefficients::cuda::Coef::given_or(
            self.coefficients.as_ref(),
            dev,
            dtype,
            c,
            op,
            || {
                let w = match &self.weight {
                    Some(w) => Some(Small::new(w, dev, "weight")?),
                    None => None,
                };
                let b = match &self.bias {
                    Some(b) => Some(Small::new(b, dev, "bias")?),
                    None => None,
                };
                let weight = match &w {
                    Some(w) => Some((w.storage(), w.vec1(c, "weight")?)),
                    None => None,
                };
                let bias = match &b {
                    Some(b) => Some((b.storage(), b.vec1(c, "bias")?)),
                    None => None,
                };
                super::batch_norm::cuda::normalize_coefficients(
                    dev, dtype, moments, c, weight, bias,
                )
            },
        )
    }
}

/// `dy` where the fused op's output `y > 0`, else 0, applied as
/// `dy.apply_op2_no_bwd(&y, &ReluGrad { axis })`; the output is contiguous in
/// `y`'s shape.
///
/// The mask is read from the output, as PyTorch's `threshold_backward` does:
/// an output rounded to zero (f16 underflow) passes no gradient, and a NaN
/// output passes it. [`BatchNormAddOp`](super::BatchNormAddOp) runs it, since
/// the masked gradient is its residual's gradient; [`FusedRelu`] gives the
/// same mask without this pass.
#[derive(Debug, Clone, Copy)]
pub struct ReluGrad {
    /// The channel axis of `dy` and `y` (it only picks the traversal order).
    pub axis: usize,
}

impl ReluGrad {
    fn check(&self, dy: candle::DType, dl: &Layout, y: candle::DType, yl: &Layout) -> Result<()> {
        if dl.dims() != yl.dims() || dy != y {
            candle::bail!(
                "{}: gradient {dy:?} {:?} does not match output {y:?} {:?}",
                self.name(),
                dl.dims(),
                yl.dims()
            )
        }
        Ok(())
    }
}

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "sync-batch-norm-relu-grad"
    }

    fn cpu_fwd(
        &self,
        dy: &CpuStorage,
        dl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(dy.dtype(), dl, y.dtype(), yl)?;
        let dv = channel_view(dl, self.axis, self.name())?;
        let yv = channel_view(yl, self.axis, self.name())?;
        let out = with_float_type!(y.dtype(), T => {
            candle::WithDType::to_cpu_storage_owned(cpu::relu_grad(dy.as_slice::<T>()?, &dv, y.as_slice::<T>()?, &yv))
        }, _ => return Err(unsupported_dtype(self.name(), "output", y.dtype())));
        Ok((out, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dy: &candle::CudaStorage,
        dl: &Layout,
        y: &candle::CudaStorage,
        yl: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.check(dy.dtype(), dl, y.dtype(), yl)?;
        let dv = channel_view(dl, self.axis, self.name())?;
        let yv = channel_view(yl, self.axis, self.name())?;
        let dev = y.device();
        let out = with_float_type!(y.dtype(), T => {
            let out = cuda::relu_grad::<T>(dev, dy.as_cuda_slice::<T>()?, &dv, y.as_cuda_slice::<T>()?, &yv)?;
            candle::CudaStorage::wrap_cuda_slice(out, dev.clone())
        }, _ => return Err(unsupported_dtype(self.name(), "output", y.dtype())));
        Ok((out, yl.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::cuda::launch as l;
    use crate::cuda::plan;
    use crate::layout::ChannelView;
    use candle::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
    use candle::{CudaDevice, Result, WithDType};

    /// The element-wise pass `bn_relu_grad_*` into a contiguous output of
    /// `y`'s shape.
    pub(super) fn relu_grad<T: WithDType + DeviceRepr>(
        dev: &CudaDevice,
        dy: &CudaSlice<T>,
        dv: &ChannelView,
        y: &CudaSlice<T>,
        yv: &ChannelView,
    ) -> Result<CudaSlice<T>> {
        let len = yv.len();
        // SAFETY: the element-wise kernel writes all `len` elements.
        let mut out = unsafe { l::alloc::<T>(dev, len)? };
        if len == 0 {
            return Ok(out);
        }
        // y is the primary view (it picks the path); dy and the output follow.
        let canon = plan::canonicalize(&[*yv, *dv, plan::contiguous_like(yv)]);
        let aligned = [
            l::aligned16(dev, y),
            l::aligned16(dev, dy),
            l::aligned16(dev, &out),
        ];
        let mode = l::elementwise_mode(&canon, l::vec_width::<T>(), &aligned);
        let w = if mode == 0 { 1 } else { l::vec_width::<T>() };
        let (yk, dk, ok) = (canon.views[0], canon.views[1], canon.views[2]);
        let (f, blocks) = l::elementwise_pass(
            dev,
            "bn_relu_grad",
            T::DTYPE,
            false,
            mode,
            w,
            len,
            canon.sizes().1,
        )?;
        let stream = dev.cuda_stream();
        let mut args = stream.launch_builder(&f);
        args.arg(dy)
            .arg(&dk)
            .arg(y)
            .arg(&yk)
            .arg(&mut out)
            .arg(&ok)
            .arg(&mode);
        // SAFETY: matches bn_relu_grad_*(const T*, View, const T*, View, T*,
        // View, int); every view lies inside its buffer.
        unsafe { l::launch(args, l::grid(blocks)?)? };
        Ok(out)
    }
}
