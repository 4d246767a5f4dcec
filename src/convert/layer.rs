//! `BatchNormLayer`: the one layer type the rewriter builds at each site.

use super::{LocalBatchNorm, Outcome};
use crate::{FrozenBatchNorm, SyncBatchNorm, SyncBatchNormConfig};
use candle::{Result, Tensor};
use candle_nn::ModuleT;

/// The layer the [`BatchNormRewriter`](super::BatchNormRewriter) builds at
/// each site: one type for model fields, whichever way the site went.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum BatchNormLayer {
    /// Kept local: candle-nn's BatchNorm (statistics of this rank's batch only).
    Local(LocalBatchNorm),
    /// Converted: statistics synchronized over the rewriter's group.
    Sync(SyncBatchNorm),
    /// Frozen: a fixed affine map from the checkpoint's statistics and
    /// parameters, in training as in eval.
    Frozen(FrozenBatchNorm),
}

impl BatchNormLayer {
    /// What the site became.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Local(_) => Outcome::Local,
            Self::Sync(_) => Outcome::Sync,
            Self::Frozen(_) => Outcome::Frozen,
        }
    }

    /// Whether the site was converted to a synchronized layer.
    pub fn is_sync(&self) -> bool {
        matches!(self, Self::Sync(_))
    }

    /// Whether the site was frozen.
    pub fn is_frozen(&self) -> bool {
        matches!(self, Self::Frozen(_))
    }

    /// The synchronized layer, if converted.
    pub fn as_sync(&self) -> Option<&SyncBatchNorm> {
        match self {
            Self::Sync(l) => Some(l),
            _ => None,
        }
    }

    /// The local layer, if kept local.
    pub fn as_local(&self) -> Option<&LocalBatchNorm> {
        match self {
            Self::Local(l) => Some(l),
            _ => None,
        }
    }

    /// The frozen layer, if frozen.
    pub fn as_frozen(&self) -> Option<&FrozenBatchNorm> {
        match self {
            Self::Frozen(l) => Some(l),
            _ => None,
        }
    }

    /// The number of channels.
    pub fn num_features(&self) -> usize {
        match self {
            Self::Local(l) => l.num_features(),
            Self::Sync(l) => l.num_features(),
            Self::Frozen(l) => l.num_features(),
        }
    }

    /// The layer's name (its variable prefix), used in error messages.
    pub fn name(&self) -> &str {
        match self {
            Self::Local(l) => l.name(),
            Self::Sync(l) => l.name(),
            Self::Frozen(l) => l.name(),
        }
    }

    /// The configuration the layer was built with.
    pub fn config(&self) -> &SyncBatchNormConfig {
        match self {
            Self::Local(l) => l.config(),
            Self::Sync(l) => l.config(),
            Self::Frozen(l) => l.config(),
        }
    }

    /// The `eps` added to the variance.
    pub fn eps(&self) -> f64 {
        self.config().eps
    }

    /// The configured momentum (`None`: cumulative moving average; unused
    /// by a frozen layer).
    pub fn momentum(&self) -> Option<f64> {
        self.config().momentum
    }

    /// The weight and bias, when affine.
    pub fn weight_and_bias(&self) -> Option<(&Tensor, &Tensor)> {
        match self {
            Self::Local(l) => l.inner().weight_and_bias(),
            Self::Sync(l) => l.weight_and_bias(),
            Self::Frozen(l) => l.weight_and_bias(),
        }
    }

    /// The running mean: the variable itself (`None` exactly when not tracked).
    pub fn running_mean(&self) -> Option<&Tensor> {
        match self {
            Self::Local(l) => l.running_mean(),
            Self::Sync(l) => l.running_mean(),
            Self::Frozen(l) => l.running_mean(),
        }
    }

    /// The running variance: the variable itself (`None` exactly when not tracked).
    pub fn running_var(&self) -> Option<&Tensor> {
        match self {
            Self::Local(l) => l.running_var(),
            Self::Sync(l) => l.running_var(),
            Self::Frozen(l) => l.running_var(),
        }
    }

    /// The number of training batches seen (0 for a frozen layer, which
    /// sees none); an error when the counter cannot be read or does not hold
    /// one whole number ≥ 0.
    pub fn num_batches_tracked(&self) -> Result<u64> {
        match self {
            Self::Local(l) => l.num_batches_tracked(),
            Self::Sync(l) => l.num_batches_tracked(),
            Self::Frozen(l) => l.num_batches_tracked(),
        }
    }

    /// Batch norm followed by a ReLU: fused into one op when synchronized or
    /// frozen ([`SyncBatchNorm::forward_relu_t`],
    /// [`FrozenBatchNorm::forward_relu_t`]), candle-nn's layer then `relu`
    /// when kept local.
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Local(l) => l.forward_t(x, train)?.relu(),
            Self::Sync(l) => l.forward_relu_t(x, train),
            Self::Frozen(l) => l.forward_relu_t(x, train),
        }
    }

    /// `relu(batch_norm(x) + residual)`: fused into one op when synchronized
    /// or frozen ([`SyncBatchNorm::forward_add_relu_t`],
    /// [`FrozenBatchNorm::forward_add_relu_t`]), candle-nn's layer, `+` and
    /// `relu` when kept local.
    pub fn forward_add_relu_t(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Local(l) => (l.forward_t(x, train)? + residual)?.relu(),
            Self::Sync(l) => l.forward_add_relu_t(x, residual, train),
            Self::Frozen(l) => l.forward_add_relu_t(x, residual, train),
        }
    }
}

impl ModuleT for BatchNormLayer {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Local(l) => l.forward_t(x, train),
            Self::Sync(l) => l.forward_t(x, train),
            Self::Frozen(l) => l.forward_t(x, train),
        }
    }
}

impl From<SyncBatchNorm> for BatchNormLayer {
    fn from(l: SyncBatchNorm) -> Self {
        Self::Sync(l)
    }
}

impl From<LocalBatchNorm> for BatchNormLayer {
    fn from(l: LocalBatchNorm) -> Self {
        Self::Local(l)
    }
}

impl From<FrozenBatchNorm> for BatchNormLayer {
    fn from(l: FrozenBatchNorm) -> Self {
        Self::Frozen(l)
    }
}
