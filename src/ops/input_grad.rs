//! The input gradient of the backward pass.

use super::element::with_float_type;
use super::{channel_view, host_f64, unsupported_dtype};
use crate::cpu::{self, ChannelCoefficients};
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `dx = dy·A + (x − mean)·B + C` per channel, applied as
/// `dy.apply_op2_no_bwd(&x, &InputGrad { .. })`; output contiguous in `x`'s shape.
///
/// With batch statistics (`grad_sums` = the all-reduced `[Σdy; Σdy·(x−mean)]`
/// over the global count `n`): `A = w·invstd`, `B = −w·invstd³·Σdy(x−mean)/n`,
/// `C = −A·Σdy/n`. With fixed (running) statistics: `A = w·invstd`, `B = C = 0`.
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
            let coef = ChannelCoefficients::<<T as crate::ops::element::Element>::Acc>::new(&mean, &a, &b, &k);
            candle::WithDType::to_cpu_storage_owned(cpu::backward_elemt(dy.as_slice::<T>()?, &dv, x.as_slice::<T>()?, &xv, &coef))
        }, _ => return Err(unsupported_dtype(self.name(), "input", x.dtype())));
        Ok((out, xl.shape().clone()))
    }
}
