//! Layer configuration, with PyTorch's argument names and defaults.

use crate::error::bail_input;

/// The arguments of a [`crate::SyncBatchNorm`] layer besides `num_features`,
/// as in `torch.nn.SyncBatchNorm`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncBatchNormConfig {
    /// Added to the variance for numerical stability (PyTorch default `1e-5`).
    pub eps: f64,
    /// Weight of the new batch statistics in the running statistics update:
    /// `running = (1 − momentum)·running + momentum·batch`. `None` gives the
    /// cumulative moving average (factor `1 / num_batches_tracked`).
    pub momentum: Option<f64>,
    /// Learnable per-channel `weight` (init 1) and `bias` (init 0).
    pub affine: bool,
    /// Keep `running_mean`, `running_var` and `num_batches_tracked` and use them
    /// in eval mode; when false, batch statistics are used in eval mode too.
    pub track_running_stats: bool,
}

impl Default for SyncBatchNormConfig {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            track_running_stats: true,
        }
    }
}

impl From<f64> for SyncBatchNormConfig {
    /// The default configuration with the given `eps`.
    fn from(eps: f64) -> Self {
        Self {
            eps,
            ..Default::default()
        }
    }
}

impl TryFrom<candle_nn::BatchNormConfig> for SyncBatchNormConfig {
    type Error = candle::Error;

    /// Same `eps`, `affine` and `momentum`; running statistics are tracked, as in
    /// `candle_nn::BatchNorm`. `remove_mean: false` has no SyncBatchNorm
    /// equivalent and is an error (the conversions of [`crate::convert`] name
    /// the layer in theirs).
    fn try_from(c: candle_nn::BatchNormConfig) -> candle::Result<Self> {
        if !c.remove_mean {
            bail_input!(
                "SyncBatchNormConfig: a candle_nn::BatchNormConfig with remove_mean: false has no synchronized equivalent (SyncBatchNorm always subtracts the mean)"
            )
        }
        Ok(Self {
            eps: c.eps,
            momentum: Some(c.momentum),
            affine: c.affine,
            track_running_stats: true,
        })
    }
}

impl SyncBatchNormConfig {
    /// Checks the values: `eps ≥ 0` and finite, `momentum` in `[0, 1]`.
    pub fn validate(&self, layer: &str) -> candle::Result<()> {
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            bail_input!(
                "SyncBatchNorm '{layer}': eps must be finite and non-negative, got {}",
                self.eps
            )
        }
        if let Some(m) = self.momentum {
            if !(0.0..=1.0).contains(&m) {
                bail_input!("SyncBatchNorm '{layer}': momentum must be in [0, 1], got {m}")
            }
        }
        Ok(())
    }
}

/// Whether a `candle_nn::BatchNorm` was built with `remove_mean: false`.
///
/// candle-nn 0.11 has no accessor for the flag; its `Debug` output (a derive,
/// so it names every field) is the only public view of it. If a future
/// version changes that output, the flag is assumed `true` — what every
/// `BatchNorm::new*` constructor sets.
pub(crate) fn keeps_mean(bn: &candle_nn::BatchNorm) -> bool {
    format!("{bn:?}").contains("remove_mean: false")
}
