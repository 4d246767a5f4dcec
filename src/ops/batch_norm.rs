//! The normalizing op and its (synchronized) backward pass.

use super::{
    channel_view, cpu_values_f64, host_f64, unsupported_dtype, viewable, FusedRelu, GradStats,
    InputGrad, ReluGrad,
};
use crate::cpu::{self, ChannelCoefficients};
use crate::element::{with_float_type, Element};
use crate::ProcessGroup;
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `y = (x − mean)·invstd·weight + bias` per channel (then `max(y, 0)` with
/// `relu`), with candle autograd.
///
/// Applied as `x.apply_op3(&weight, &bias, op)` (affine) or `x.apply_op1(op)`.
/// The statistics come in as the `(3, C)` f64 `moments` tensor (mean, invstd,
/// count) and are constants for autograd; the backward pass adds their
/// gradient itself when they are batch statistics: it computes the local
/// `[Σdy; Σdy·(x−mean)]`, all-reduces it over `group` (one collective),
/// then `dx` element-wise; `dweight`/`dbias` are the local sums. With `relu`,
/// both passes mask the incoming gradient where the output was not positive,
/// recomputing the output from `x` ([`FusedRelu`]).
#[derive(Debug, Clone)]
pub struct BatchNormOp {
    /// The channel axis of the input.
    pub axis: usize,
    /// The `(3, C)` f64 moments (mean, invstd, count).
    pub moments: Tensor,
    /// Statistics of this batch (gradient flows through them, synchronized over
    /// `group`) rather than fixed running statistics.
    pub batch_stats: bool,
    /// The ranks that share the batch statistics.
    pub group: ProcessGroup,
    /// Apply a ReLU to the output (in the accumulator type, before rounding).
    pub relu: bool,
    /// The forward's per-channel coefficients, when they were computed with
    /// the moments ([`ForwardCoefficients`](super::ForwardCoefficients), for
    /// this op's weight and bias): on a GPU the forward then reads them
    /// instead of launching their kernel, and so does a fused ReLU's
    /// backward. The CPU path computes its own.
    pub coefficients: Option<Tensor>,
    /// The layer's name, for error messages.
    pub layer: String,
}

impl BatchNormOp {
    /// The CPU forward, plus `residual` (a tensor of `x`'s shape) when given.
    pub(super) fn forward_cpu(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: Option<Vec<f64>>,
        b: Option<Vec<f64>>,
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let v = channel_view(xl, self.axis, "sync-batch-norm")?;
        let m = host_f64(&self.moments)?;
        let c_n = v.channels;
        if m.len() != 3 * c_n {
            candle::bail!(
                "sync-batch-norm: moments for {} channels, input has {c_n}",
                m.len() / 3
            )
        }
        let w = w.unwrap_or_else(|| vec![1.0; c_n]);
        let b = b.unwrap_or_else(|| vec![0.0; c_n]);
        let scale: Vec<f64> = (0..c_n).map(|c| m[c_n + c] * w[c]).collect();
        let zeros = vec![0.0; c_n];
        let residual = match residual {
            Some((z, zl)) => {
                check_residual(z.dtype(), zl, x.dtype(), xl)?;
                Some((z, channel_view(zl, self.axis, "sync-batch-norm")?))
            }
            None => None,
        };
        let out = with_float_type!(x.dtype(), T => {
            let coef = ChannelCoefficients::<<T as Element>::Acc>::new(&m[..c_n], &zeros, &scale, &b);
            let residual = match &residual {
                Some((z, zv)) => Some((z.as_slice::<T>()?, zv)),
                None => None,
            };
            candle::WithDType::to_cpu_storage_owned(cpu::normalize(x.as_slice::<T>()?, &v, &coef, residual, self.relu))
        }, _ => return Err(unsupported_dtype("sync-batch-norm", "input", x.dtype())));
        Ok((out, xl.shape().clone()))
    }

    /// The CUDA forward: per-channel coefficients ([`Self::coefficients`], or
    /// `bn_coef_normalize_*`), then the element-wise pass (`bn_normalize_*`, or `bn_normalize_add_*` with a
    /// residual) into a contiguous output.
    #[cfg(feature = "cuda")]
    pub(super) fn forward_cuda(
        &self,
        x: &candle::CudaStorage,
        xl: &Layout,
        affine: Option<cuda::Affine<'_>>,
        residual: Option<(&candle::CudaStorage, &Layout)>,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let v = channel_view(xl, self.axis, "sync-batch-norm")?;
        let residual = match residual {
            Some((z, zl)) => {
                check_residual(z.dtype(), zl, x.dtype(), xl)?;
                Some((z, channel_view(zl, self.axis, "sync-batch-norm")?))
            }
            None => None,
        };
        let dev = x.device();
        let out = with_float_type!(x.dtype(), T => {
            let residual = match &residual {
                Some((z, zv)) => Some((z.as_cuda_slice::<T>()?, zv)),
                None => None,
            };
            let out = cuda::normalize::<T>(dev, x.as_cuda_slice::<T>()?, &v, self, affine, residual)?;
            candle::CudaStorage::wrap_cuda_slice(out, dev.clone())
        }, _ => return Err(unsupported_dtype("sync-batch-norm", "input", x.dtype())));
        Ok((out, xl.shape().clone()))
    }

    /// The gradient of the output before the fused ReLU: `grad` masked by
    /// the op's output `res` with `relu`, else `grad` (as a viewable tensor).
    /// For [`BatchNormAddOp`](super::BatchNormAddOp), whose residual's
    /// gradient is that masked gradient.
    pub(super) fn pre_activation_grad(&self, res: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let dy = viewable(grad, self.axis)?;
        if self.relu {
            dy.apply_op2_no_bwd(res, &ReluGrad { axis: self.axis })
        } else {
            Ok(dy)
        }
    }

    /// The gradients of the input and, with `affine` (weight, bias), of
    /// weight and bias. A fused ReLU's mask is recomputed from `x` inside
    /// both backward passes ([`FusedRelu`]).
    fn backward(
        &self,
        x: &Tensor,
        affine: Option<(&Tensor, &Tensor)>,
        grad: &Tensor,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let dy = viewable(grad, self.axis)?;
        let relu = self.relu.then(|| FusedRelu {
            weight: affine.map(|(w, _)| w.detach()),
            bias: affine.map(|(_, b)| b.detach()),
            coefficients: self.coefficients.clone(),
        });
        let (dx, affine) = self.backward_normalization(x, affine.map(|(w, _)| w), &dy, relu)?;
        let affine = match affine {
            Some(g) => Some((g.get(0)?, g.get(1)?)),
            None => None,
        };
        Ok((dx, affine))
    }

    /// [`Self::backward`] from the gradient `dy` of the normalization's
    /// output, or with `relu` of the fused ReLU's output: `dx` and, with
    /// `weight`, `[dweight; dbias]` as one `(2, C)` tensor in the weight's
    /// dtype.
    pub(super) fn backward_normalization(
        &self,
        x: &Tensor,
        weight: Option<&Tensor>,
        dy: &Tensor,
        relu: Option<FusedRelu>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let stats = GradStats {
            axis: self.axis,
            moments: self.moments.clone(),
            relu: relu.clone(),
        };
        // The weight and bias gradients come from the op that sums (on a
        // GPU, from the kernel that combines the sums: one launch fewer).
        let (local, affine) = match weight {
            Some(w) => {
                let (local, g) = stats.apply_with_affine_grads(dy, x, w.dtype())?;
                (local, Some(g))
            }
            None => (dy.apply_op2_no_bwd(x, &stats)?, None),
        };
        let grad_sums = if self.batch_stats {
            let global = self.group.all_reduce_sum(&local).map_err(|e| {
                crate::error::keep_kind(
                    &e,
                    format!(
                        "SyncBatchNorm '{}': all-reduce of the gradient sums failed: {e}",
                        self.layer
                    ),
                )
            })?;
            Some(global)
        } else {
            None
        };
        let dx = dy.apply_op2_no_bwd(
            x,
            &InputGrad {
                axis: self.axis,
                moments: self.moments.clone(),
                grad_sums,
                weight: weight.map(|w| w.detach()),
                relu,
            },
        )?;
        Ok((dx, affine))
    }
}

impl CustomOp1 for BatchNormOp {
    fn name(&self) -> &'static str {
        "sync-batch-norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward_cpu(x, xl, None, None, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.forward_cuda(x, xl, None, None)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(x, None, grad)?.0))
    }
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "sync-batch-norm-affine"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let w = cpu_values_f64(w, wl, CustomOp3::name(self))?;
        let b = cpu_values_f64(b, bl, CustomOp3::name(self))?;
        self.forward_cpu(x, xl, Some(w), Some(b), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle::CudaStorage,
        xl: &Layout,
        w: &candle::CudaStorage,
        wl: &Layout,
        b: &candle::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.forward_cuda(x, xl, Some(((w, wl), (b, bl))), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, affine) = self.backward(x, Some((w, b)), grad)?;
        let Some((dw, db)) = affine else {
            candle::bail!("sync-batch-norm: internal error, no affine gradients for an affine op")
        };
        let db = if db.dtype() == b.dtype() {
            db
        } else {
            db.to_dtype(b.dtype())?
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The residual must match the input's shape and dtype (the layer checks this
/// first with its own message; this guards direct users of the ops).
fn check_residual(z: DType, zl: &Layout, x: DType, xl: &Layout) -> Result<()> {
    if zl.dims() != xl.dims() || z != x {
        candle::bail!(
            "sync-batch-norm: residual {z:?} {:?} does not match input {x:?} {:?}",
            zl.dims(),
            xl.dims()
        )
    }
    Ok(())
}

#[cfg(feature = "cuda")]
pub(super) mod cuda {
    use crate::cuda::launch::{self as l, Module, Small};
    use crate::cuda::plan::{self, KView};
    use crate::layout::ChannelView;
    use crate::ops::coefficients::cuda::Coef;
    use candle::backend::BackendStorage;
    use candle::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
    use candle::{CudaDevice, CudaStorage, Layout, Result, WithDType};

    /// Weight and bias storages with their layouts.
    pub(super) type Affine<'a> = ((&'a CudaStorage, &'a Layout), (&'a CudaStorage, &'a Layout));

    /// The forward's per-channel coefficients (`bn_coef_normalize_*`, COEF
    /// accumulator values per channel: hi, lo, invstd·w, b, ...) for inputs
    /// of `dtype`; weight and bias as storages with their views (absent: 1,
    /// 0). The backward of a fused ReLU launches the same kernel on the
    /// same values to recompute the forward's output.
    pub(crate) fn normalize_coefficients(
        dev: &CudaDevice,
        dtype: candle::DType,
        moments: &Small<'_>,
        c: usize,
        weight: Option<(&CudaStorage, l::Vec1)>,
        bias: Option<(&CudaStorage, l::Vec1)>,
    ) -> Result<CudaSlice<u8>> {
        let m = moments.mat2(3, c, "moments")?;
        let stream = dev.cuda_stream();
        // SAFETY: the coefficient kernel writes all C entries.
        let mut coef = unsafe { l::alloc::<u8>(dev, l::coef_bytes(dtype, c))? };
        let name = format!("bn_coef_normalize_{}", l::acc_suffix(dtype));
        let f = l::function(dev, Module::Elementwise, &name)?;
        let cn = c as i64;
        let mut args = stream.launch_builder(&f);
        l::push_storage(&mut args, moments.storage())?;
        args.arg(&m);
        let absent = l::Vec1::ABSENT;
        for p in [&weight, &bias] {
            match p {
                Some((t, v)) => {
                    l::push_storage(&mut args, t)?;
                    args.arg(v);
                }
                None => {
                    args.arg(&l::NULL).arg(&absent);
                }
            }
        }
        args.arg(&cn).arg(&mut coef);
        // SAFETY: matches bn_coef_normalize_*(const void*, Mat2, const void*,
        // Vec1, const void*, Vec1, long long, A*); `coef` holds C * 8 values.
        unsafe { l::launch(args, l::grid(plan::per_item_blocks(c))?)? };
        Ok(coef)
    }

    /// `y = ((x − hi) − lo)·(invstd·w) + b` (plus `residual`, then
    /// `max(y, 0)` with `relu`), contiguous in `x`'s shape.
    pub(super) fn normalize<T: WithDType + DeviceRepr>(
        dev: &CudaDevice,
        x: &CudaSlice<T>,
        v: &ChannelView,
        op: &super::BatchNormOp,
        affine: Option<Affine<'_>>,
        residual: Option<(&CudaSlice<T>, &ChannelView)>,
    ) -> Result<CudaSlice<T>> {
        let c = v.channels;
        let len = v.len();
        // SAFETY: the element-wise kernel writes all `len` elements.
        let mut out = unsafe { l::alloc::<T>(dev, len)? };
        if len == 0 {
            return Ok(out);
        }
        let moments = Small::new(&op.moments, dev, "moments")?;
        let coef = Coef::given_or(
            op.coefficients.as_ref(),
            dev,
            T::DTYPE,
            c,
            "sync-batch-norm",
            || {
                let (weight, bias) = match affine {
                    Some(((w, wl), (b, bl))) => (
                        Some((w, l::vec1(wl, w.dtype(), c, "weight")?)),
                        Some((b, l::vec1(bl, b.dtype(), c, "bias")?)),
                    ),
                    None => (None, None),
                };
                normalize_coefficients(dev, T::DTYPE, &moments, c, weight, bias)
            },
        )?;
        let stream = dev.cuda_stream();
        let relu = i32::from(op.relu);
        if let Some((z, zv)) = residual {
            // x is the primary view (it picks the path); z and the output follow.
            let canon = plan::canonicalize(&[*v, *zv, plan::contiguous_like(v)]);
            let aligned = [
                l::aligned16(dev, x),
                l::aligned16(dev, z),
                l::aligned16(dev, &out),
            ];
            let mode = l::elementwise_mode(&canon, l::vec_width::<T>(), &aligned);
            let w = if mode == 0 { 1 } else { l::vec_width::<T>() };
            let (xk, zk, ok): (KView, KView, KView) =
                (canon.views[0], canon.views[1], canon.views[2]);
            let (f, blocks) = l::elementwise_pass(
                dev,
                "bn_normalize_add",
                T::DTYPE,
                true,
                mode,
                w,
                len,
                canon.sizes().1,
            )?;
            let mut args = stream.launch_builder(&f);
            args.arg(z).arg(&zk).arg(x).arg(&xk).arg(&mut out).arg(&ok);
            coef.push(&mut args)?;
            args.arg(&mode).arg(&relu);
            // SAFETY: matches bn_normalize_add_*(const T*, View, const T*, View,
            // T*, View, const A*, int, int); every view lies inside its buffer.
            unsafe { l::launch(args, l::grid(blocks)?)? };
            return Ok(out);
        }
        let canon = plan::canonicalize(&[*v, plan::contiguous_like(v)]);
        let aligned = [l::aligned16(dev, x), l::aligned16(dev, &out)];
        let mode = l::elementwise_mode(&canon, l::vec_width::<T>(), &aligned);
        let w = if mode == 0 { 1 } else { l::vec_width::<T>() };
        let (xv, ov): (KView, KView) = (canon.views[0], canon.views[1]);
        let (f, blocks) = l::elementwise_pass(
            dev,
            "bn_normalize",
            T::DTYPE,
            true,
            mode,
            w,
            len,
            canon.sizes().1,
        )?;
        let mut args = stream.launch_builder(&f);
        args.arg(x).arg(&xv).arg(&mut out).arg(&ov);
        coef.push(&mut args)?;
        args.arg(&mode).arg(&relu);
        // SAFETY: matches bn_normalize_*(const T*, View, T*, View, const A*,
        // int, int); both views lie inside their buffers.
        unsafe { l::launch(args, l::grid(blocks)?)? };
        Ok(out)
    }
}
