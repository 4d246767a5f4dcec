//! Layer configuration, with PyTorch's argument names and defaults.

use crate::error::bail_input;

/// The arguments of a layer besides `num_features`, as in
/// `torch.nn.SyncBatchNorm`: the one configuration type of
/// [`crate::SyncBatchNorm`], [`crate::FrozenBatchNorm`] and
/// [`crate::LocalBatchNorm`] (each returns it from `config()`).
///
/// Unlike the crate's options and reports, this struct is deliberately
/// exhaustive: its four fields are exactly the arguments of PyTorch's
/// `SyncBatchNorm` besides `num_features` and `process_group`, and the
/// crate's API contract promises the struct literal below. Build it either
/// way: from [`Default`] (PyTorch's defaults) or an `f64` eps with the
/// `with_*` setters, which is what the README shows, or as a literal.
///
/// ```
/// use candle_syncbn::SyncBatchNormConfig;
///
/// let cfg = SyncBatchNormConfig::default().with_eps(1e-3).with_momentum(None);
/// assert_eq!((cfg.eps, cfg.momentum, cfg.affine), (1e-3, None, true));
/// assert_eq!(SyncBatchNormConfig::from(1e-3), SyncBatchNormConfig::default().with_eps(1e-3));
/// let literal = SyncBatchNormConfig { eps: 1e-5, momentum: Some(0.1), affine: true, track_running_stats: true };
/// assert_eq!(literal, SyncBatchNormConfig::default());
/// ```
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
    /// The configuration with `eps` (added to the variance).
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// The configuration with `momentum` (`None`: cumulative moving average).
    pub fn with_momentum(mut self, momentum: Option<f64>) -> Self {
        self.momentum = momentum;
        self
    }

    /// The configuration with or without a learnable weight and bias.
    pub fn with_affine(mut self, affine: bool) -> Self {
        self.affine = affine;
        self
    }

    /// The configuration with or without running statistics.
    pub fn with_track_running_stats(mut self, track_running_stats: bool) -> Self {
        self.track_running_stats = track_running_stats;
        self
    }

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
