//! The normalizing op and its (synchronized) backward pass.

use super::element::{with_float_type, Element};
use super::{
    channel_view, cpu_values_f64, host_f64, unsupported_dtype, viewable, AffineGrads, GradStats,
    InputGrad,
};
use crate::cpu::{self, ChannelCoefficients};
use crate::ProcessGroup;
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

/// `y = (x − mean)·invstd·weight + bias` per channel, with candle autograd.
///
/// Applied as `x.apply_op3(&weight, &bias, op)` (affine) or `x.apply_op1(op)`.
/// The statistics come in as the `(3, C)` f64 `moments` tensor (mean, invstd,
/// count) and are constants for autograd; the backward pass adds their
/// gradient itself when they are batch statistics: it computes the local
/// `[Σdy; Σdy·(x−mean)]`, all-reduces it over `group` (one collective),
/// then `dx` element-wise; `dweight`/`dbias` are the local sums.
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
    /// The layer's name, for error messages.
    pub layer: String,
}

impl BatchNormOp {
    fn forward_cpu(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: Option<Vec<f64>>,
        b: Option<Vec<f64>>,
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
        let out = with_float_type!(x.dtype(), T => {
            let coef = ChannelCoefficients::<<T as Element>::Acc>::new(&m[..c_n], &zeros, &scale, &b);
            candle::WithDType::to_cpu_storage_owned(cpu::normalize(x.as_slice::<T>()?, &v, &coef))
        }, _ => return Err(unsupported_dtype("sync-batch-norm", "input", x.dtype())));
        Ok((out, xl.shape().clone()))
    }

    /// The gradients of the input and, with `weight`, of weight and bias.
    fn backward(
        &self,
        x: &Tensor,
        weight: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let dy = viewable(grad, self.axis)?;
        let local = dy.apply_op2_no_bwd(
            x,
            &GradStats {
                axis: self.axis,
                moments: self.moments.clone(),
            },
        )?;
        let affine = match weight {
            Some(w) => {
                let g = local.apply_op1_no_bwd(&AffineGrads {
                    moments: self.moments.clone(),
                    dtype: w.dtype(),
                })?;
                Some((g.get(0)?, g.get(1)?))
            }
            None => None,
        };
        let grad_sums = if self.batch_stats {
            let global = self.group.all_reduce_sum(&local).map_err(|e| {
                candle::Error::Msg(format!(
                    "SyncBatchNorm '{}': all-reduce of the gradient sums failed: {e}",
                    self.layer
                ))
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
        self.forward_cpu(x, xl, None, None)
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
        self.forward_cpu(x, xl, Some(w), Some(b))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, affine) = self.backward(x, Some(w), grad)?;
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
