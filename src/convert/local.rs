//! `LocalBatchNorm`: candle-nn's BatchNorm with PyTorch's
//! `num_batches_tracked` counter, for the sites the rewriter keeps local.

use super::display_path;
use crate::layer::precise::{BatchCount, PreciseSwitch};
use crate::ops::{counter_value, increment_counter};
use candle::{DType, Result, Tensor, Var};
use candle_nn::{BatchNormConfig, Init, ModuleT, VarBuilder};

/// A `candle_nn::BatchNorm` plus PyTorch's `num_batches_tracked` counter, so
/// that sites kept local have the same variables as converted ones.
///
/// The counter is loaded from (or, in a `VarMap`, created as) the variable
/// `num_batches_tracked` under the site's prefix, and counts training forward
/// passes; a checkpoint without it (candle-nn's) starts it at 0.
#[derive(Debug, Clone)]
pub struct LocalBatchNorm {
    inner: candle_nn::BatchNorm,
    num_batches_tracked: Tensor,
    precise: PreciseSwitch,
}

impl LocalBatchNorm {
    /// `candle_nn::batch_norm(num_features, config, vb)` and the counter.
    pub fn new<C: Into<BatchNormConfig>>(
        num_features: usize,
        config: C,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = candle_nn::batch_norm(num_features, config, vb.clone())?;
        let nbt = match vb.get_with_hints_dtype(
            (),
            "num_batches_tracked",
            Init::Const(0.0),
            DType::I64,
        ) {
            Ok(t) => t,
            Err(e) if vb.contains_tensor("num_batches_tracked") => {
                candle::bail!(
                    "BatchNorm '{}': cannot load num_batches_tracked: {e}",
                    display_path(&vb.prefix())
                )
            }
            Err(_) => Tensor::zeros((), DType::I64, vb.device())?,
        };
        Ok(Self {
            inner,
            num_batches_tracked: Var::from_tensor(&nbt)?.as_tensor().clone(),
            precise: PreciseSwitch::default(),
        })
    }

    /// The candle-nn layer.
    pub fn inner(&self) -> &candle_nn::BatchNorm {
        &self.inner
    }

    /// The number of training batches seen since the counter was created or loaded.
    /// An error when the counter cannot be read or does not hold one whole
    /// number ≥ 0.
    pub fn num_batches_tracked(&self) -> Result<u64> {
        counter_value(&self.num_batches_tracked, &"LocalBatchNorm")
    }

    /// The switch that makes training forwards store each batch's
    /// statistics as the running statistics (see [`crate::precise_bn`]).
    pub(crate) fn precise_switch(&self) -> &PreciseSwitch {
        &self.precise
    }

    /// The running-statistics variables `(running_mean, running_var,
    /// num_batches_tracked)` themselves (not copies).
    pub(crate) fn running_variables(&self) -> (&Tensor, &Tensor, &Tensor) {
        (
            self.inner.running_mean(),
            self.inner.running_var(),
            &self.num_batches_tracked,
        )
    }

    /// The candle-nn layer with momentum 1 over the same variables (candle-nn
    /// keeps its momentum private): its training forward stores the batch's
    /// statistics as the running statistics.
    fn with_momentum_one(&self) -> Result<candle_nn::BatchNorm> {
        let bn = &self.inner;
        let c = bn.running_mean().dims1()?;
        // Var::from_tensor shares a tensor that is already a variable, as
        // candle-nn's running statistics are.
        let (mean, var) = (bn.running_mean().clone(), bn.running_var().clone());
        match bn.weight_and_bias() {
            Some((w, b)) => candle_nn::BatchNorm::new_with_momentum(
                c,
                mean,
                var,
                w.clone(),
                b.clone(),
                bn.eps(),
                1.0,
            ),
            None => candle_nn::BatchNorm::new_no_bias_with_momentum(c, mean, var, bn.eps(), 1.0),
        }
    }
}

impl ModuleT for LocalBatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = if train && self.precise.is_on() {
            let y = self.with_momentum_one()?.forward_t(x, true)?;
            let channels = self.inner.running_mean().elem_count().max(1);
            self.precise
                .record(BatchCount::Local(x.elem_count() / channels));
            y
        } else {
            self.inner.forward_t(x, train)?
        };
        if train {
            increment_counter(&self.num_batches_tracked)?;
        }
        Ok(y)
    }
}
