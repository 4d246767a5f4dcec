//! Local per-channel gradient sums of the backward pass.

use super::{channel_view, host_f64, unsupported_dtype, AffineGrads, FusedRelu};
use crate::cpu;
use crate::element::{with_float_type, Element};
use crate::layout::ChannelView;
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// Per-channel `[Σdy; Σdy·(x − mean)]` of the local batch as a `(2, C)` f64
/// tensor: the all-reduce payload of the backward pass, and the local weight
/// and bias gradients (see [`super::AffineGrads`]).
///
/// Applied as `dy.apply_op2_no_bwd(&x, &GradStats { .. })`, or with
/// [`GradStats::apply_with_affine_grads`] to get the weight and bias
/// gradients from the same op.
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

impl GradStats {
    /// The sums of `dy` and `x` (as `dy.apply_op2_no_bwd(&x, self)`) and, from
    /// the same op, this rank's `(2, C)` weight and bias gradients
    /// `[dweight; dbias]` in `dtype`, bit for bit what [`AffineGrads`]
    /// computes from the sums. On a GPU the kernel that combines the sums
    /// writes them: one launch instead of two.
    pub fn apply_with_affine_grads(
        &self,
        dy: &Tensor,
        x: &Tensor,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let name = "sync-batch-norm-grad-stats";
        if !dtype.is_float() {
            candle::bail!(
                "{name}: the weight and bias gradients must be a float dtype, got {dtype:?}"
            )
        }
        let Some(&c_n) = x.dims().get(self.axis) else {
            candle::bail!(
                "{name}: channel axis {} out of range for input shape {:?}",
                self.axis,
                x.dims()
            )
        };
        // SAFETY: `WithAffine` writes all 2 * C values before it returns Ok;
        // on an error the tensor is dropped unread.
        let affine = unsafe { Tensor::empty((2, c_n), dtype, x.device())? };
        let sums = dy.apply_op2_no_bwd(
            x,
            &WithAffine {
                stats: self,
                affine: &affine,
            },
        )?;
        Ok((sums, affine))
    }
}

/// [`GradStats`] that also writes the affine gradients into `affine`, a
/// fresh contiguous `(2, C)` tensor no other tensor shares (so its write
/// lock, taken inside the op, never waits for the op's own read locks).
struct WithAffine<'a> {
    stats: &'a GradStats,
    affine: &'a Tensor,
}

impl WithAffine<'_> {
    fn affine_grads(&self) -> AffineGrads {
        AffineGrads {
            moments: self.stats.moments.clone(),
            dtype: self.affine.dtype(),
        }
    }
}

impl CustomOp2 for WithAffine<'_> {
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
        let (sums, shape) = self.stats.cpu_fwd(dy, dl, x, xl)?;
        let (values, _) = self
            .affine_grads()
            .cpu_fwd(&sums, &Layout::contiguous(&shape))?;
        super::store_cpu(self.affine, self.name(), values)?;
        Ok((sums, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dy: &candle::CudaStorage,
        dl: &Layout,
        x: &candle::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        super::with_cuda_storage_mut(self.affine, self.name(), |affine, affine_l| {
            self.stats
                .cuda_sums((dy, dl), (x, xl), Some((affine, affine_l)))
        })
    }
}

impl GradStats {
    /// The channel views of `dy` and `x`, which must share shape and dtype.
    fn views(
        &self,
        (dy, dl): (DType, &Layout),
        (x, xl): (DType, &Layout),
    ) -> Result<(ChannelView, ChannelView)> {
        let name = CustomOp2::name(self);
        if dl.dims() != xl.dims() {
            candle::bail!(
                "{name}: gradient shape {:?} differs from input shape {:?}",
                dl.dims(),
                xl.dims()
            )
        }
        if dy != x {
            candle::bail!("{name}: gradient dtype {dy:?} differs from input dtype {x:?}")
        }
        Ok((
            channel_view(dl, self.axis, name)?,
            channel_view(xl, self.axis, name)?,
        ))
    }
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
        let (dv, xv) = self.views((dy.dtype(), dl), (x.dtype(), xl))?;
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
        self.cuda_sums((dy, dl), (x, xl), None)
    }
}

#[cfg(feature = "cuda")]
impl GradStats {
    /// The CUDA sums, writing the affine gradients into `affine` when given.
    fn cuda_sums(
        &self,
        (dy, dl): (&candle::CudaStorage, &Layout),
        (x, xl): (&candle::CudaStorage, &Layout),
        affine: Option<(&mut candle::CudaStorage, &Layout)>,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let name = CustomOp2::name(self);
        let (dv, xv) = self.views((dy.dtype(), dl), (x.dtype(), xl))?;
        let dev = x.device();
        let out = with_float_type!(x.dtype(), T => {
            cuda::grad_sums::<T>(dev, dy.as_cuda_slice::<T>()?, &dv, x.as_cuda_slice::<T>()?, &xv, &self.moments, self.relu.as_ref(), affine)?
        }, _ => return Err(unsupported_dtype(name, "input", x.dtype())));
        Ok((
            candle::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((2, xv.channels)),
        ))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::cuda::launch::{self as l, Module, ReductionSplit, Small};
    use crate::cuda::plan;
    use crate::layout::ChannelView;
    use crate::ops::FusedRelu;
    use candle::backend::BackendStorage;
    use candle::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
    use candle::{CudaDevice, CudaStorage, Layout, Result, Tensor, WithDType};

    /// Level 1 (`bn_grad_major_*` or `bn_grad_inner_*`) then level 2
    /// (`bn_grad_combine`): the `(2, C)` f64 sums `[Σdy; Σdy·(x − mean)]`.
    /// With `relu`, the forward's coefficients (`bn_coef_normalize_*`) come
    /// first, and level 1 is `bn_grad_relu_major_*` / `bn_grad_relu_inner_*`,
    /// which recompute the ReLU's mask from them. With `affine`, level 2 is
    /// `bn_grad_combine_affine`, which also writes the weight and bias
    /// gradients there (also for an empty input: zero partials).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn grad_sums<T: WithDType>(
        dev: &CudaDevice,
        dy: &CudaSlice<T>,
        dv: &ChannelView,
        x: &CudaSlice<T>,
        xv: &ChannelView,
        moments: &Tensor,
        relu: Option<&FusedRelu>,
        affine: Option<(&mut CudaStorage, &Layout)>,
    ) -> Result<CudaSlice<f64>> {
        let c = xv.channels;
        let moments = Small::new(moments, dev, "moments")?;
        let m = moments.mat2(3, c, "moments")?;
        if xv.is_empty() {
            return match affine {
                Some(a) => combine_affine(dev, None, c, 0, &moments, a),
                None => l::zeros::<f64>(dev, 2 * c),
            };
        }
        let relu_coef = match relu {
            Some(r) => Some(r.cuda_coefficients(
                dev,
                T::DTYPE,
                &moments,
                c,
                "sync-batch-norm-grad-stats",
            )?),
            None => None,
        };
        // After a fused ReLU: the bn_grad_relu_* kernels, with the coefficients.
        let prefix = if relu_coef.is_some() {
            "bn_grad_relu"
        } else {
            "bn_grad"
        };
        // x is the primary view (it picks the path); dy follows its structure.
        let (red, f) = l::reduction::<T>(
            dev,
            Module::Grad,
            prefix,
            &[*xv, *dv],
            &[l::aligned16(dev, x), l::aligned16(dev, dy)],
        )?;
        let parts = red.parts();
        // SAFETY: level 1 writes every (channel, part) entry (all parts are non-empty).
        let mut partial = unsafe { l::alloc::<f64>(dev, c * parts * 2)? };
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
                    coef.push(&mut args)?;
                }
                args.arg(&len).arg(&chunks).arg(&group).arg(&mut partial);
                // SAFETY: matches bn_grad_major_*(const T*, View, const T*, View,
                // const void*, Mat2, long long, long long, int, double*) and
                // its _half_ and _scalar_ entries, or bn_grad_relu_major_*
                // and its _half_ and _scalar_ entries with `const A* relu` (C * 8
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
                    coef.push(&mut args)?;
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
        match affine {
            Some(a) => combine_affine(dev, Some(&partial), c, parts, &moments, a),
            None => l::combine(dev, Module::Grad, "bn_grad_combine", &partial, c, parts, 2),
        }
    }

    /// Level 2 with the affine gradients (`bn_grad_combine_affine`): the
    /// `(2, C)` f64 sums of `parts` partials per channel (none: zeros), and
    /// `[Σdy·(x − mean)·invstd; Σdy]` into the `(2, C)` float tensor `affine`.
    fn combine_affine(
        dev: &CudaDevice,
        partial: Option<&CudaSlice<f64>>,
        c: usize,
        parts: usize,
        moments: &Small<'_>,
        (affine, affine_l): (&mut CudaStorage, &Layout),
    ) -> Result<CudaSlice<f64>> {
        let m = moments.mat2(3, c, "moments")?;
        let am = l::mat2(affine_l, affine.dtype(), 2, c, "weight and bias gradients")?;
        // SAFETY: the kernel writes all 2 * C values (zeros without partials).
        let out = unsafe { l::alloc::<f64>(dev, 2 * c)? };
        if c == 0 {
            return Ok(out);
        }
        let f = l::function(dev, Module::Grad, "bn_grad_combine_affine")?;
        let stream = dev.cuda_stream();
        let mut args = stream.launch_builder(&f);
        match partial {
            Some(p) => args.arg(p),
            None => args.arg(&l::NULL),
        };
        let (cn, pn) = (c as i64, parts as i64);
        args.arg(&cn).arg(&pn).arg(&out);
        l::push_storage(&mut args, moments.storage())?;
        args.arg(&m);
        l::push_storage_mut(&mut args, affine)?;
        args.arg(&am);
        // SAFETY: matches bn_grad_combine_affine(const double*, long long,
        // long long, double*, const void*, Mat2, void*, Mat2); `partial`
        // holds C * parts * 2 values (none read when parts is 0), both Mat2
        // views lie inside their buffers.
        unsafe { l::launch(args, l::grid(plan::per_warp_blocks(c))?)? };
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_bits as bits;
    use candle::Device;

    /// The fused op gives the separate ops' sums and affine gradients bit
    /// for bit, for every parameter dtype, after a fused ReLU or not, and on
    /// an empty batch.
    #[test]
    fn affine_grads_from_the_same_op_match_the_separate_op() {
        let dev = &Device::Cpu;
        for n in [6, 0] {
            let x = Tensor::randn(1f32, 2.0, (n, 3, 5), dev).unwrap();
            let dy = Tensor::randn(0f32, 1.0, (n, 3, 5), dev).unwrap();
            let moments = Tensor::new(
                &[[0.5f64, -1.0, 2.0], [0.8, 1.25, 0.3], [30.0, 30.0, 30.0]],
                dev,
            )
            .unwrap();
            let relus = [
                None,
                Some(FusedRelu {
                    weight: Some(Tensor::new(&[1.5f32, -0.5, 2.0], dev).unwrap()),
                    bias: Some(Tensor::new(&[0.1f32, 0.2, -0.3], dev).unwrap()),
                    coefficients: None,
                }),
            ];
            for relu in relus {
                let op = GradStats {
                    axis: 1,
                    moments: moments.clone(),
                    relu,
                };
                for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
                    let (sums, affine) = op.apply_with_affine_grads(&dy, &x, dtype).unwrap();
                    let alone = dy.apply_op2_no_bwd(&x, &op).unwrap();
                    let separate = alone
                        .apply_op1_no_bwd(&AffineGrads {
                            moments: moments.clone(),
                            dtype,
                        })
                        .unwrap();
                    assert_eq!(affine.dtype(), dtype);
                    assert_eq!(affine.dims(), [2, 3]);
                    assert_eq!(bits(&sums), bits(&alone), "n {n} {dtype:?}");
                    assert_eq!(bits(&affine), bits(&separate), "n {n} {dtype:?}");
                    if n == 0 {
                        assert!(bits(&affine).iter().all(|&b| b == 0), "{dtype:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn affine_grads_of_a_bad_dtype_or_axis_are_errors() {
        let dev = &Device::Cpu;
        let x = Tensor::ones((4, 3), DType::F32, dev).unwrap();
        let op = |axis| GradStats {
            axis,
            moments: Tensor::ones((3, 3), DType::F64, dev).unwrap(),
            relu: None,
        };
        let e = op(1)
            .apply_with_affine_grads(&x, &x, DType::U32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be a float dtype, got U32"), "{e}");
        let e = op(2)
            .apply_with_affine_grads(&x, &x, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("channel axis 2 out of range for input shape [4, 3]"),
            "{e}"
        );
    }
}
