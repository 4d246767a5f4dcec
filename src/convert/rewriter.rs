//! The `VarBuilder` rewriter: builds a local or a synchronized BatchNorm at
//! every site a model builds one, chosen by a filter on the variable path.

use super::{display_path, sync_config};
use crate::ops::{counter_value, increment_counter};
use crate::{ProcessGroup, SyncBatchNorm};
use candle::{DType, Result, Tensor, Var};
use candle_nn::{BatchNormConfig, Init, ModuleT, VarBuilder};
use std::fmt;
use std::sync::{Arc, Mutex};

/// A BatchNorm site the [`BatchNormRewriter`] built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertedSite {
    /// The site's variable prefix, as in the checkpoint (`layer1.0.bn1` for
    /// `layer1.0.bn1.weight`, …); empty for a layer at the root.
    pub path: String,
    /// The number of channels.
    pub num_features: usize,
    /// Whether the layer has a learnable weight and bias.
    pub affine: bool,
    /// Whether the layer tracks running statistics (always true for layers
    /// built from a `candle_nn::BatchNormConfig`).
    pub track_running_stats: bool,
}

/// The filter deciding which sites are converted.
type PathFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Builds the BatchNorm layers of a model, synchronized or local per site.
///
/// Model code takes a `&BatchNormRewriter` beside its `VarBuilder` and calls
/// [`BatchNormRewriter::batch_norm`] where it called `candle_nn::batch_norm`,
/// with the same arguments; fields become [`BatchNormLayer`]. Sites whose
/// variable prefix passes the [`filter`](Self::filter) (all by default) get a
/// [`SyncBatchNorm`] over the rewriter's group, the others a plain
/// `candle_nn::BatchNorm` (wrapped in [`LocalBatchNorm`]). Either way the
/// variables keep their names — `weight`, `bias`, `running_mean`,
/// `running_var` and `num_batches_tracked` under the site's prefix — so a
/// `VarMap` saves and loads the same checkpoint whether the model was built
/// local or synchronized.
///
/// The rewriter wraps the model's root `VarBuilder` ([`vb`](Self::vb)), so one
/// value carries both; it records every site it builds ([`report`](Self::report),
/// [`kept_local`](Self::kept_local)).
pub struct BatchNormRewriter<'a> {
    vb: VarBuilder<'a>,
    group: Option<ProcessGroup>,
    filter: Option<PathFilter>,
    converted: Mutex<Vec<ConvertedSite>>,
    kept_local: Mutex<Vec<String>>,
}

impl<'a> BatchNormRewriter<'a> {
    /// A rewriter converting every site to a [`SyncBatchNorm`] over `group`.
    pub fn new(vb: VarBuilder<'a>, group: ProcessGroup) -> Self {
        Self {
            vb,
            group: Some(group),
            filter: None,
            converted: Mutex::new(Vec::new()),
            kept_local: Mutex::new(Vec::new()),
        }
    }

    /// A rewriter over [`crate::default_group`] (taken now, when the rewriter is made).
    pub fn with_default_group(vb: VarBuilder<'a>) -> Self {
        Self::new(vb, crate::default_group())
    }

    /// A rewriter that converts nothing: every site is the `candle_nn::BatchNorm`
    /// that `candle_nn::batch_norm` builds (plus the `num_batches_tracked`
    /// counter). Model code written against the rewriter builds the original,
    /// unsynchronized model with it.
    pub fn local(vb: VarBuilder<'a>) -> Self {
        Self {
            group: None,
            ..Self::new(vb, ProcessGroup::single())
        }
    }

    /// Converts only the sites whose variable prefix `f` accepts (the prefix as
    /// in the checkpoint, e.g. `"layer1.0.bn1"`); the others stay local. For
    /// example `.filter(|path| !path.starts_with("head"))` keeps a head local.
    /// Replaces any previous filter.
    pub fn filter<F: Fn(&str) -> bool + Send + Sync + 'static>(mut self, f: F) -> Self {
        self.filter = Some(Arc::new(f));
        self
    }

    /// The root `VarBuilder` the rewriter wraps; build the model from it.
    pub fn vb(&self) -> VarBuilder<'a> {
        self.vb.clone()
    }

    /// The group converted sites synchronize over (`None` for [`Self::local`]).
    pub fn group(&self) -> Option<&ProcessGroup> {
        self.group.as_ref()
    }

    /// Whether the site with variable prefix `path` is converted.
    pub fn converts(&self, path: &str) -> bool {
        self.group.is_some() && self.filter.as_ref().is_none_or(|f| f(path))
    }

    /// Builds the BatchNorm layer of one site: what `candle_nn::batch_norm(
    /// num_features, config, vb)` builds, or a [`SyncBatchNorm`] with the same
    /// configuration and variables if the site is converted.
    ///
    /// Errors like `candle_nn::batch_norm` (missing or mis-shaped variables),
    /// and for a converted site built with `remove_mean: false`, naming the path.
    pub fn batch_norm<C: Into<BatchNormConfig>>(
        &self,
        num_features: usize,
        config: C,
        vb: VarBuilder,
    ) -> Result<BatchNormLayer> {
        let config = config.into();
        let path = vb.prefix();
        match &self.group {
            Some(group) if self.converts(&path) => {
                let sync_cfg = sync_config(&config, &path)?;
                let layer = SyncBatchNorm::new(num_features, sync_cfg, vb, group.clone())?;
                lock(&self.converted).push(ConvertedSite {
                    path,
                    num_features,
                    affine: sync_cfg.affine,
                    track_running_stats: sync_cfg.track_running_stats,
                });
                Ok(BatchNormLayer::Sync(layer))
            }
            _ => {
                let layer = LocalBatchNorm::new(num_features, config, vb)?;
                lock(&self.kept_local).push(path);
                Ok(BatchNormLayer::Local(layer))
            }
        }
    }

    /// The sites converted so far, in construction order.
    pub fn report(&self) -> Vec<ConvertedSite> {
        lock(&self.converted).clone()
    }

    /// The variable prefixes of the sites kept local so far, in construction order.
    pub fn kept_local(&self) -> Vec<String> {
        lock(&self.kept_local).clone()
    }
}

impl fmt::Debug for BatchNormRewriter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchNormRewriter")
            .field("prefix", &self.vb.prefix())
            .field("group", &self.group)
            .field("filter", &self.filter.as_ref().map(|_| "<fn>"))
            .field("converted", &lock(&self.converted).len())
            .field("kept_local", &lock(&self.kept_local).len())
            .finish()
    }
}

/// Locks a site list, recovering it from a poisoned lock (the lists are only
/// appended to, so they are always consistent).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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
        })
    }

    /// The candle-nn layer.
    pub fn inner(&self) -> &candle_nn::BatchNorm {
        &self.inner
    }

    /// The number of training batches seen since the counter was created or loaded.
    pub fn num_batches_tracked(&self) -> u64 {
        counter_value(&self.num_batches_tracked)
    }
}

impl ModuleT for LocalBatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.inner.forward_t(x, train)?;
        if train {
            increment_counter(&self.num_batches_tracked)?;
        }
        Ok(y)
    }
}

/// The layer the [`BatchNormRewriter`] builds at each site: one type for model
/// fields, whichever way the site went.
#[derive(Debug, Clone)]
pub enum BatchNormLayer {
    /// Kept local: candle-nn's BatchNorm (statistics of this rank's batch only).
    Local(LocalBatchNorm),
    /// Converted: statistics synchronized over the rewriter's group.
    Sync(SyncBatchNorm),
}

impl BatchNormLayer {
    /// Whether the site was converted.
    pub fn is_sync(&self) -> bool {
        matches!(self, Self::Sync(_))
    }

    /// The synchronized layer, if converted.
    pub fn as_sync(&self) -> Option<&SyncBatchNorm> {
        match self {
            Self::Sync(l) => Some(l),
            Self::Local(_) => None,
        }
    }

    /// The local layer, if not converted.
    pub fn as_local(&self) -> Option<&LocalBatchNorm> {
        match self {
            Self::Local(l) => Some(l),
            Self::Sync(_) => None,
        }
    }

    /// The number of channels.
    pub fn num_features(&self) -> usize {
        match self {
            Self::Local(l) => l.inner.running_mean().dims1().unwrap_or(0),
            Self::Sync(l) => l.num_features(),
        }
    }

    /// The weight and bias, when affine.
    pub fn weight_and_bias(&self) -> Option<(&Tensor, &Tensor)> {
        match self {
            Self::Local(l) => l.inner.weight_and_bias(),
            Self::Sync(l) => l.weight_and_bias(),
        }
    }

    /// A copy of the running mean (`None` if not tracked).
    pub fn running_mean(&self) -> Option<Tensor> {
        match self {
            Self::Local(l) => l.inner.running_mean().copy().ok(),
            Self::Sync(l) => l.running_mean(),
        }
    }

    /// A copy of the running variance (`None` if not tracked).
    pub fn running_var(&self) -> Option<Tensor> {
        match self {
            Self::Local(l) => l.inner.running_var().copy().ok(),
            Self::Sync(l) => l.running_var(),
        }
    }

    /// The number of training batches seen.
    pub fn num_batches_tracked(&self) -> u64 {
        match self {
            Self::Local(l) => l.num_batches_tracked(),
            Self::Sync(l) => l.num_batches_tracked(),
        }
    }

    /// Batch norm followed by a ReLU: fused into one op when converted
    /// ([`SyncBatchNorm::forward_relu_t`]), candle-nn's layer then `relu`
    /// when kept local.
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Local(l) => l.forward_t(x, train)?.relu(),
            Self::Sync(l) => l.forward_relu_t(x, train),
        }
    }

    /// `relu(batch_norm(x) + residual)`: fused into one op when converted
    /// ([`SyncBatchNorm::forward_add_relu_t`]), candle-nn's layer, `+` and
    /// `relu` when kept local.
    pub fn forward_add_relu_t(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Local(l) => (l.forward_t(x, train)? + residual)?.relu(),
            Self::Sync(l) => l.forward_add_relu_t(x, residual, train),
        }
    }
}

impl ModuleT for BatchNormLayer {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Local(l) => l.forward_t(x, train),
            Self::Sync(l) => l.forward_t(x, train),
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
