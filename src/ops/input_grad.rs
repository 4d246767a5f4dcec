//! The input gradient of the backward pass.

use super::{channel_view, host_f64, unsupported_dtype, FusedRelu};
use crate::cpu::{self, ChannelCoefficients};
use crate::element::with_float_type;
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `dx = dy·A + (x − mean)·B + C` per channel, applied as
/// `dy.apply_op2_no_bwd(&x, &InputGrad { .. })`; output contiguous in `x`'s shape.
///
/// With batch statistics (`grad_sums` = the all-reduced `[Σdy; Σdy·(x−mean)]`
/// over the global count `n`): `A = w·invstd`, `B = −w·invstd³·Σdy(x−mean)/n`,
/// `C = −A·Σdy/n`. With fixed (running) statistics: `A = w·invstd`, `B = C = 0`.
/// With `relu`, `dy` is the gradient of a fused ReLU's output and is first
/// masked where the forward's output, recomputed from `x`, was not positive.
#[derive(Debug, Clone)]
pub struct InputGrad {
    /// The channel axis of `x` and `dy`.
    pub axis: usize,
    /// The `(3, C)` f64 moments (mean, invstd, count) used in the forward.
    pub moments: Tensor,
    /// The global `(2, C)` f64 gradient sums, or `None` for fixed statistics.
    pub grad_sums: Option<Tensor>,
    /// The weight (`None`: no affine transform, weight 1).
    pub weight: Option<Tensor>,
    /// The forward's fused ReLU: `dy` is then the gradient of its output
    /// and is masked first.
    pub relu: Option<FusedRelu>,
}

impl InputGrad {
    /// The per-channel coefficients `(mean, A, B, C)` in f64.
    fn coefficients(&self, c_n: usize) -> Result<[Vec<f64>; 4]> {
        let m = host_f64(&self.moments)?;
        let w = match &self.weight {
            Some(w) => host_f64(w)?,
            None => vec![1.0; c_n],
        };
        let g = match &self.grad_sums {
            Some(g) => Some(host_f64(g)?),
            None => None,
        };
        let mut a = vec![0.0; c_n];
        let mut b = vec![0.0; c_n];
        let mut k = vec![0.0; c_n];
        for c in 0..c_n {
            let invstd = m[c_n + c];
            a[c] = w[c] * invstd;
            if let Some(g) = &g {
                let n = m[2 * c_n + c].max(1.0);
                b[c] = -w[c] * invstd * invstd * invstd * g[c_n + c] / n;
                k[c] = -a[c] * g[c] / n;
            }
        }
        Ok([m[..c_n].to_vec(), a, b, k])
    }
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "sync-batch-norm-input-grad"
    }

    fn cpu_fwd(
        &self,
        dy: &CpuStorage,
        dl: &Layout,
        x: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if dl.dims() != xl.dims() || dy.dtype() != x.dtype() {
            candle::bail!(
                "{}: gradient {:?} {:?} does not match input {:?} {:?}",
                self.name(),
                dy.dtype(),
                dl.dims(),
                x.dtype(),
                xl.dims()
            )
        }
        let dv = channel_view(dl, self.axis, self.name())?;
        let xv = channel_view(xl, self.axis, self.name())?;
        let [mean, a, b, k] = self.coefficients(xv.channels)?;
        let out = with_float_type!(x.dtype(), T => {
            type A = <T as crate::element::Element>::Acc;
            let coef = ChannelCoefficients::<A>::new(&mean, &a, &b, &k);
            let mask = match &self.relu {
                Some(r) => Some(r.cpu_mask::<A>(&host_f64(&self.moments)?, self.name())?),
                None => None,
            };
            candle::WithDType::to_cpu_storage_owned(cpu::backward_elemt(dy.as_slice::<T>()?, &dv, x.as_slice::<T>()?, &xv, &coef, mask.as_ref()))
        }, _ => return Err(unsupported_dtype(self.name(), "input", x.dtype())));
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dy: &candle::CudaStorage,
        dl: &Layout,
        x: &candle::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        if dl.dims() != xl.dims() || dy.dtype() != x.dtype() {
            candle::bail!(
                "{}: gradient {:?} {:?} does not match input {:?} {:?}",
                self.name(),
                dy.dtype(),
                dl.dims(),
                x.dtype(),
                xl.dims()
            )
        }
        let dv = channel_view(dl, self.axis, self.name())?;
        let xv = channel_view(xl, self.axis, self.name())?;
        let dev = x.device();
        let out = with_float_type!(x.dtype(), T => {
            let out = cuda::input_grad::<T>(dev, dy.as_cuda_slice::<T>()?, &dv, x.as_cuda_slice::<T>()?, &xv, self)?;
            candle::CudaStorage::wrap_cuda_slice(out, dev.clone())
        }, _ => return Err(unsupported_dtype(self.name(), "input", x.dtype())));
        Ok((out, xl.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::InputGrad;
    use crate::cuda::launch::{self as l, Module, Small};
    use crate::cuda::plan;
    use crate::layout::ChannelView;
    use candle::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
    use candle::{CudaDevice, Result, WithDType};

    /// Per-channel coefficients (`bn_coef_input_grad_*`, with a fused ReLU's
    /// mask coefficients), then the element-wise pass (`bn_input_grad_*`)
    /// into a contiguous output of `x`'s shape.
    pub(super) fn input_grad<T: WithDType + DeviceRepr>(
        dev: &CudaDevice,
        dy: &CudaSlice<T>,
        dv: &ChannelView,
        x: &CudaSlice<T>,
        xv: &ChannelView,
        op: &InputGrad,
    ) -> Result<CudaSlice<T>> {
        let c = xv.channels;
        let len = xv.len();
        // SAFETY: the element-wise kernel writes all `len` elements.
        let mut out = unsafe { l::alloc::<T>(dev, len)? };
        if len == 0 {
            return Ok(out);
        }
        let moments = Small::new(&op.moments, dev, "moments")?;
        let m = moments.mat2(3, c, "moments")?;
        let weight = match &op.weight {
            Some(w) => Some(Small::new(w, dev, "weight")?),
            None => None,
        };
        let wv = match &weight {
            Some(w) => w.vec1(c, "weight")?,
            None => l::Vec1::ABSENT,
        };
        // The fused ReLU's weight and bias, for its mask.
        let relu_params = [
            op.relu.as_ref().and_then(|r| r.weight.as_ref()),
            op.relu.as_ref().and_then(|r| r.bias.as_ref()),
        ];
        let mut relu_smalls = Vec::with_capacity(2);
        for (p, what) in relu_params.into_iter().zip(["ReLU weight", "ReLU bias"]) {
            relu_smalls.push(match p {
                Some(t) => {
                    let s = Small::new(t, dev, what)?;
                    let v = s.vec1(c, what)?;
                    Some((s, v))
                }
                None => None,
            });
        }
        let sums = match &op.grad_sums {
            Some(g) => Some(Small::new(g, dev, "gradient sums")?),
            None => None,
        };
        let gm = match &sums {
            Some(g) => g.mat2(2, c, "gradient sums")?,
            None => l::Mat2::ABSENT,
        };
        let relu = i32::from(op.relu.is_some());
        let stream = dev.cuda_stream();
        // SAFETY: the coefficient kernel writes all C entries.
        let mut coef = unsafe { l::alloc::<u8>(dev, l::coef_bytes(T::DTYPE, c))? };
        {
            let name = format!("bn_coef_input_grad_{}", l::acc_suffix(T::DTYPE));
            let f = l::function(dev, Module::Elementwise, &name)?;
            let cn = c as i64;
            let mut args = stream.launch_builder(&f);
            l::push_storage(&mut args, moments.storage())?;
            args.arg(&m);
            match &weight {
                Some(w) => l::push_storage(&mut args, w.storage())?,
                None => {
                    args.arg(&l::NULL);
                }
            }
            args.arg(&wv);
            match &sums {
                Some(g) => l::push_storage(&mut args, g.storage())?,
                None => {
                    args.arg(&l::NULL);
                }
            }
            args.arg(&gm);
            let absent = l::Vec1::ABSENT;
            for p in &relu_smalls {
                match p {
                    Some((s, v)) => {
                        l::push_storage(&mut args, s.storage())?;
                        args.arg(v);
                    }
                    None => {
                        args.arg(&l::NULL).arg(&absent);
                    }
                }
            }
            args.arg(&relu).arg(&cn).arg(&mut coef);
            // SAFETY: matches bn_coef_input_grad_*(const void*, Mat2, const void*,
            // Vec1, const void*, Mat2, const void*, Vec1, const void*, Vec1, int,
            // long long, A*); `coef` holds C * 8 values.
            unsafe { l::launch(args, l::grid(plan::per_item_blocks(c))?)? };
        }
        // x is the primary view (it picks the path); dy and the output follow.
        let canon = plan::canonicalize(&[*xv, *dv, plan::contiguous_like(xv)]);
        let aligned = [
            l::aligned16(dev, x),
            l::aligned16(dev, dy),
            l::aligned16(dev, &out),
        ];
        let mode = l::elementwise_mode(&canon, l::vec_width::<T>(), &aligned);
        let w = if mode == 0 { 1 } else { l::vec_width::<T>() };
        let (xk, dk, ok) = (canon.views[0], canon.views[1], canon.views[2]);
        let (f, blocks) = l::elementwise_pass(
            dev,
            "bn_input_grad",
            T::DTYPE,
            true,
            mode,
            w,
            len,
            canon.sizes().1,
        )?;
        let mut args = stream.launch_builder(&f);
        args.arg(dy)
            .arg(&dk)
            .arg(x)
            .arg(&xk)
            .arg(&mut out)
            .arg(&ok)
            .arg(&coef)
            .arg(&mode)
            .arg(&relu);
        // SAFETY: matches bn_input_grad_*(const T*, View, const T*, View, T*,
        // View, const A*, int, int); every view lies inside its buffer.
        unsafe { l::launch(args, l::grid(blocks)?)? };
        Ok(out)
    }
}
