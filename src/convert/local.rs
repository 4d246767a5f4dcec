//! `LocalBatchNorm`: candle-nn's BatchNorm with PyTorch's
//! `num_batches_tracked` counter, for the sites the rewriter keeps local.

use super::display_path;
use crate::layer::precise::{BatchCount, PreciseSwitch};
use crate::ops::{counter_value, increment_counter};
use crate::SyncBatchNormConfig;
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
    /// The variable prefix, for [`Self::name`].
    path: String,
    config: SyncBatchNormConfig,
    inner: candle_nn::BatchNorm,
    num_batches_tracked: Tensor,
    precise: PreciseSwitch,
}

impl LocalBatchNorm {
    /// `candle_nn::batch_norm(num_features, config, vb)` and the counter,
    /// from the configuration every layer of this crate takes.
    ///
    /// candle-nn's BatchNorm always tracks running statistics with a fixed
    /// momentum: `momentum: None` and `track_running_stats: false` are
    /// errors naming the layer.
    pub fn new<C: Into<SyncBatchNormConfig>>(
        num_features: usize,
        config: C,
        vb: VarBuilder,
    ) -> Result<Self> {
        let config = config.into();
        let name = display_path(&vb.prefix()).to_string();
        let Some(momentum) = config.momentum else {
            candle::bail!(
                "LocalBatchNorm '{name}': momentum: None (cumulative average) is not supported by candle_nn::BatchNorm; expected Some(momentum)"
            )
        };
        if !config.track_running_stats {
            candle::bail!(
                "LocalBatchNorm '{name}': track_running_stats: false is not supported by candle_nn::BatchNorm; expected true"
            )
        }
        let nn_config = BatchNormConfig {
            eps: config.eps,
            remove_mean: true,
            affine: config.affine,
            momentum,
        };
        Self::from_candle_config(num_features, nn_config, vb)
    }

    /// `candle_nn::batch_norm(num_features, config, vb)` and the counter
    /// (the rewriter's local sites, which take candle-nn's configuration,
    /// `remove_mean: false` included).
    pub(crate) fn from_candle_config(
        num_features: usize,
        nn_config: BatchNormConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let config = SyncBatchNormConfig::from(nn_config.eps)
            .with_momentum(Some(nn_config.momentum))
            .with_affine(nn_config.affine);
        let path = vb.prefix();
        let inner = candle_nn::batch_norm(num_features, nn_config, vb.clone())?;
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
            path,
            config,
            inner,
            num_batches_tracked: Var::from_tensor(&nbt)?.as_tensor().clone(),
            precise: PreciseSwitch::default(),
        })
    }

    /// The candle-nn layer.
    pub fn inner(&self) -> &candle_nn::BatchNorm {
        &self.inner
    }

    /// The layer's name (its variable prefix), used in error messages.
    pub fn name(&self) -> &str {
        display_path(&self.path)
    }

    /// The number of channels.
    pub fn num_features(&self) -> usize {
        self.inner.running_mean().dims1().unwrap_or(0)
    }

    /// The configuration it was built with (`momentum` is always `Some`,
    /// running statistics always tracked). A layer the rewriter built from
    /// a `candle_nn::BatchNormConfig` with `remove_mean: false` keeps that
    /// flag in [`inner`](Self::inner) only.
    pub fn config(&self) -> &SyncBatchNormConfig {
        &self.config
    }

    /// The `eps` added to the variance.
    pub fn eps(&self) -> f64 {
        self.config.eps
    }

    /// The momentum (always `Some`: candle-nn has no cumulative average).
    pub fn momentum(&self) -> Option<f64> {
        self.config.momentum
    }

    /// The weight and bias, when affine.
    pub fn weight_and_bias(&self) -> Option<(&Tensor, &Tensor)> {
        self.inner.weight_and_bias()
    }

    /// The running mean: candle-nn's variable itself, updated in place by
    /// training (always `Some`; the `Option` is the type every layer returns).
    pub fn running_mean(&self) -> Option<&Tensor> {
        Some(self.inner.running_mean())
    }

    /// The running variance: candle-nn's variable itself (always `Some`).
    pub fn running_var(&self) -> Option<&Tensor> {
        Some(self.inner.running_var())
    }

    /// The number of training batches seen since the counter was created or loaded.
    /// An error when the counter cannot be read or does not hold one whole
    /// number ≥ 0.
    pub fn num_batches_tracked(&self) -> Result<u64> {
        counter_value(
            &self.num_batches_tracked,
            &format_args!("LocalBatchNorm '{}'", self.name()),
        )
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
