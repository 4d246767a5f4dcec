//! The weight and the bias as one `(2, C)` tensor, the third input of the
//! op with a residual.

use super::{cpu_values_f64, f64_to_cpu_storage};
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `[weight; bias]` as a contiguous `(2, C)` tensor with autograd (each gets
/// its row of the gradient, in its own dtype), applied as
/// `weight.apply_op2(&bias, StackParams)`: the third input of
/// [`BatchNormAddOp`](super::BatchNormAddOp), whose custom op takes three
/// inputs at most. In the weight's dtype when the bias shares it, else f32.
///
/// `Tensor::stack` gives the same values, with two copies on a GPU (and two
/// conversions more when the dtypes differ); this is one launch.
#[derive(Debug, Clone, Copy)]
pub struct StackParams;

impl StackParams {
    /// The stack's dtype for a weight and a bias of these dtypes.
    pub fn dtype(weight: DType, bias: DType) -> DType {
        if weight == bias {
            weight
        } else {
            DType::F32
        }
    }

    /// The channel count, after checking that both are float vectors of it.
    fn channels(&self, (w, wl): (DType, &Layout), (b, bl): (DType, &Layout)) -> Result<usize> {
        let (c_w, c_b) = (wl.shape().elem_count(), bl.shape().elem_count());
        if !w.is_float() || !b.is_float() || c_w != c_b {
            candle::bail!(
                "{}: expected a float weight and bias of the same length, got {w:?} {:?} and {b:?} {:?}",
                self.name(),
                wl.dims(),
                bl.dims()
            )
        }
        Ok(c_w)
    }
}

impl CustomOp2 for StackParams {
    fn name(&self) -> &'static str {
        "sync-batch-norm-stack-params"
    }

    fn cpu_fwd(
        &self,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c_n = self.channels((w.dtype(), wl), (b.dtype(), bl))?;
        let mut values = cpu_values_f64(w, wl, self.name())?;
        values.extend(cpu_values_f64(b, bl, self.name())?);
        let dtype = Self::dtype(w.dtype(), b.dtype());
        Ok((
            f64_to_cpu_storage(&values, dtype, self.name())?,
            Shape::from((2, c_n)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &candle::CudaStorage,
        wl: &Layout,
        b: &candle::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        use crate::cuda::launch as l;
        use crate::element::with_float_type;
        use candle::backend::BackendStorage;
        use candle::cuda_backend::cudarc::driver::PushKernelArg;
        let c_n = self.channels((w.dtype(), wl), (b.dtype(), bl))?;
        let dev = w.device();
        let wv = l::vec1(wl, w.dtype(), c_n, "weight")?;
        let bv = l::vec1(bl, b.dtype(), c_n, "bias")?;
        let dtype = Self::dtype(w.dtype(), b.dtype());
        let code = crate::cuda::args::dtype_code(dtype, "stack")?;
        let out = with_float_type!(dtype, T => {
            // SAFETY: the kernel writes all 2 * C values.
            let mut out = unsafe { l::alloc::<T>(dev, 2 * c_n)? };
            if c_n > 0 {
                let f = l::function(dev, l::Module::Elementwise, "bn_stack_params")?;
                let stream = dev.cuda_stream();
                let c = c_n as i64;
                let mut args = stream.launch_builder(&f);
                l::push_storage(&mut args, w)?;
                args.arg(&wv);
                l::push_storage(&mut args, b)?;
                args.arg(&bv).arg(&mut out).arg(&code).arg(&c);
                // SAFETY: matches bn_stack_params(const void*, Vec1, const
                // void*, Vec1, void*, int, long long); both views lie inside
                // their buffers and `out` holds 2 * C values of `code`'s dtype.
                unsafe { l::launch(args, l::grid(crate::cuda::plan::per_item_blocks(c_n))?)? };
            }
            candle::CudaStorage::wrap_cuda_slice(out, dev.clone())
        }, _ => candle::bail!("{}: unsupported dtype {dtype:?}", self.name()));
        Ok((out, Shape::from((2, c_n))))
    }

    fn bwd(
        &self,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let row = |i: usize, like: &Tensor| -> Result<Tensor> {
            let g = grad.get(i)?.reshape(like.shape())?;
            if g.dtype() == like.dtype() {
                Ok(g)
            } else {
                g.to_dtype(like.dtype())
            }
        };
        Ok((Some(row(0, w)?), Some(row(1, b)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_bits as bits;
    use candle::{Device, Var};

    /// The values of `Tensor::stack` (after the conversions the layer made
    /// before), bit for bit, and each parameter's row of the gradient in its
    /// own dtype, for equal and mixed dtypes and strided inputs.
    #[test]
    fn stack_params_is_the_stack_with_each_row_its_gradient() {
        let dev = &Device::Cpu;
        let pairs = [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::F16, DType::F16),
            (DType::F64, DType::F64),
            (DType::F64, DType::F16),
            (DType::BF16, DType::F32),
        ];
        for (wd, bd) in pairs {
            let base =
                Tensor::new(&[0.3f64, 1.7, -2.25, 1e-3, 5.0, 7.5e10, -0.1, 2.0], dev).unwrap();
            // Strided: every other element.
            let w = Var::from_tensor(&base.to_dtype(wd).unwrap()).unwrap();
            let b =
                Var::from_tensor(&base.affine(-0.5, 0.25).unwrap().to_dtype(bd).unwrap()).unwrap();
            let (ws, bs) = (
                w.as_tensor()
                    .reshape((4, 2))
                    .unwrap()
                    .narrow(1, 0, 1)
                    .unwrap()
                    .squeeze(1)
                    .unwrap(),
                b.as_tensor()
                    .reshape((4, 2))
                    .unwrap()
                    .narrow(1, 1, 1)
                    .unwrap()
                    .squeeze(1)
                    .unwrap(),
            );
            for (w_in, b_in) in [(w.as_tensor().clone(), b.as_tensor().clone()), (ws, bs)] {
                let got = w_in.apply_op2(&b_in, StackParams).unwrap();
                let dtype = StackParams::dtype(wd, bd);
                let want = Tensor::stack(
                    &[w_in.to_dtype(dtype).unwrap(), b_in.to_dtype(dtype).unwrap()],
                    0,
                )
                .unwrap();
                assert_eq!(got.dtype(), dtype);
                assert_eq!(got.dims(), want.dims());
                assert_eq!(bits(&got), bits(&want), "{wd:?} {bd:?}");
                let g = Tensor::arange(0f32, got.elem_count() as f32, dev)
                    .unwrap()
                    .reshape(got.shape())
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let grads = (&got * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let c = w_in.elem_count();
                for (i, t) in [&w, &b].iter().enumerate() {
                    let gt = grads.get(t.as_tensor()).unwrap();
                    assert_eq!(gt.dtype(), t.dtype(), "{wd:?} {bd:?}");
                    let v = gt.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
                    let rows: Vec<f64> = (0..c).map(|j| (i * c + j) as f64).collect();
                    if c == 8 {
                        assert_eq!(v, rows, "{wd:?} {bd:?} row {i}");
                    } else {
                        // Strided inputs: the row lands on every other element.
                        let spread: Vec<f64> = (0..8)
                            .map(|k| if k % 2 == i { rows[k / 2] } else { 0.0 })
                            .collect();
                        assert_eq!(v, spread, "{wd:?} {bd:?} strided row {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn stack_params_of_mismatched_or_integer_tensors_are_errors() {
        let dev = &Device::Cpu;
        let w = Tensor::ones(3, DType::F32, dev).unwrap();
        let e = w
            .apply_op2_no_bwd(&Tensor::ones(2, DType::F32, dev).unwrap(), &StackParams)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "expected a float weight and bias of the same length, got F32 [3] and F32 [2]"
            ),
            "{e}"
        );
        let e = w
            .apply_op2_no_bwd(&Tensor::ones(3, DType::U32, dev).unwrap(), &StackParams)
            .unwrap_err()
            .to_string();
        assert!(e.contains("got F32 [3] and U32 [3]"), "{e}");
    }
}
