//! The `VarBuilder` rewriter: builds a synchronized, a local or a frozen
//! BatchNorm at every site a model builds one, chosen by a rule on the
//! variable path.

use super::{sync_config, BatchNormLayer, LocalBatchNorm};
use crate::{FrozenBatchNorm, ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use candle::Result;
use candle_nn::{BatchNormConfig, VarBuilder};
use std::fmt;
use std::sync::{Arc, Mutex};

/// What the [`BatchNormRewriter`] builds at a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// A [`SyncBatchNorm`]: batch statistics synchronized over the group
    /// (detectron2's and mmdetection's `SyncBN`).
    Sync,
    /// candle-nn's BatchNorm ([`LocalBatchNorm`]): statistics of this rank's
    /// batch only (`BN`).
    Local,
    /// A [`FrozenBatchNorm`]: a fixed affine map from the checkpoint's
    /// statistics and parameters, in training as in eval, not trained
    /// (detectron2's `FrozenBN`, torchvision's `FrozenBatchNorm2d`).
    Frozen,
}

/// A BatchNorm site the [`BatchNormRewriter`] built.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConvertedSite {
    /// The site's variable prefix, as in the checkpoint (`layer1.0.bn1` for
    /// `layer1.0.bn1.weight`, …); empty for a layer at the root.
    pub path: String,
    /// The number of channels.
    pub num_features: usize,
    /// Whether the layer has a weight and bias (learnable unless frozen).
    pub affine: bool,
    /// Whether the layer tracks running statistics (always true for layers
    /// built from a `candle_nn::BatchNormConfig`).
    pub track_running_stats: bool,
    /// What the site became.
    pub outcome: Outcome,
}

/// The rule deciding what each site becomes.
type PathRule = Arc<dyn Fn(&str) -> Outcome + Send + Sync>;

/// Builds the BatchNorm layers of a model, synchronized, local or frozen per
/// site.
///
/// Model code takes a `&BatchNormRewriter` beside its `VarBuilder` and calls
/// [`BatchNormRewriter::batch_norm`] where it called `candle_nn::batch_norm`,
/// with the same arguments; fields become [`BatchNormLayer`]. A
/// [`rule`](Self::rule) on the site's variable prefix says what each site
/// becomes ([`Outcome`]): a [`SyncBatchNorm`] over the rewriter's group (all
/// sites by default), a plain `candle_nn::BatchNorm` (wrapped in
/// [`LocalBatchNorm`]), or a [`FrozenBatchNorm`];
/// [`filter`](Self::filter) is the two-way rule (synchronized or local).
/// Whatever the outcome, the variables keep their names — `weight`, `bias`,
/// `running_mean`, `running_var` and `num_batches_tracked` under the site's
/// prefix — so a `VarMap` saves and loads the same checkpoint whichever way
/// the model was built.
///
/// The rewriter wraps the model's root `VarBuilder` ([`vb`](Self::vb)), so one
/// value carries both; it records every site it builds ([`sites`](Self::sites),
/// [`report`](Self::report), [`kept_local`](Self::kept_local)).
///
/// ```
/// # use candle::{DType, Device};
/// # use candle_nn::{VarBuilder, VarMap};
/// use candle_syncbn::{BatchNormRewriter, Outcome, ProcessGroup};
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let rw = BatchNormRewriter::new(vb, ProcessGroup::single()).rule(|path| {
///     if path.starts_with("backbone") { Outcome::Frozen } else { Outcome::Sync }
/// });
/// let stem = rw.batch_norm(8, 1e-5, rw.vb().pp("backbone.bn1"))?;
/// let head = rw.batch_norm(8, 1e-5, rw.vb().pp("head.bn"))?;
/// assert_eq!((stem.outcome(), head.outcome()), (Outcome::Frozen, Outcome::Sync));
/// # Ok::<(), candle::Error>(())
/// ```
pub struct BatchNormRewriter<'a> {
    vb: VarBuilder<'a>,
    group: Option<ProcessGroup>,
    rule: Option<PathRule>,
    sites: Mutex<Vec<ConvertedSite>>,
}

impl<'a> BatchNormRewriter<'a> {
    /// A rewriter converting every site to a [`SyncBatchNorm`] over `group`.
    pub fn new(vb: VarBuilder<'a>, group: ProcessGroup) -> Self {
        Self {
            vb,
            group: Some(group),
            rule: None,
            sites: Mutex::new(Vec::new()),
        }
    }

    /// A rewriter over [`crate::default_group`] (taken now, when the rewriter is made).
    pub fn with_default_group(vb: VarBuilder<'a>) -> Self {
        Self::new(vb, crate::default_group())
    }

    /// A rewriter that synchronizes nothing: every site is the
    /// `candle_nn::BatchNorm` that `candle_nn::batch_norm` builds (plus the
    /// `num_batches_tracked` counter), except the sites a [`rule`](Self::rule)
    /// freezes. Model code written against the rewriter builds the original,
    /// unsynchronized model with it.
    pub fn local(vb: VarBuilder<'a>) -> Self {
        Self {
            group: None,
            ..Self::new(vb, ProcessGroup::single())
        }
    }

    /// Decides per site what it becomes: `f` gets the site's variable prefix
    /// (as in the checkpoint, e.g. `"backbone.layer1.0.bn1"`) and returns an
    /// [`Outcome`]. For example, a detector's pretrained backbone frozen and
    /// the rest synchronized:
    /// `.rule(|path| if path.starts_with("backbone") { Outcome::Frozen } else { Outcome::Sync })`.
    /// With [`Self::local`] (no group), [`Outcome::Sync`] sites stay local.
    /// Replaces any previous rule or filter.
    pub fn rule<F: Fn(&str) -> Outcome + Send + Sync + 'static>(mut self, f: F) -> Self {
        self.rule = Some(Arc::new(f));
        self
    }

    /// Converts only the sites whose variable prefix `f` accepts (the prefix as
    /// in the checkpoint, e.g. `"layer1.0.bn1"`); the others stay local. For
    /// example `.filter(|path| !path.starts_with("head"))` keeps a head local.
    /// The two-way [`rule`](Self::rule) ([`Outcome::Sync`] or
    /// [`Outcome::Local`]); replaces any previous rule or filter.
    pub fn filter<F: Fn(&str) -> bool + Send + Sync + 'static>(self, f: F) -> Self {
        self.rule(move |path| {
            if f(path) {
                Outcome::Sync
            } else {
                Outcome::Local
            }
        })
    }

    /// The root `VarBuilder` the rewriter wraps; build the model from it.
    pub fn vb(&self) -> VarBuilder<'a> {
        self.vb.clone()
    }

    /// The group converted sites synchronize over (`None` for [`Self::local`]).
    pub fn group(&self) -> Option<&ProcessGroup> {
        self.group.as_ref()
    }

    /// What the site with variable prefix `path` becomes.
    pub fn outcome(&self, path: &str) -> Outcome {
        let outcome = self.rule.as_ref().map_or(Outcome::Sync, |f| f(path));
        match (outcome, &self.group) {
            (Outcome::Sync, None) => Outcome::Local,
            (o, _) => o,
        }
    }

    /// Whether the site with variable prefix `path` is converted to a
    /// synchronized layer.
    pub fn converts(&self, path: &str) -> bool {
        self.outcome(path) == Outcome::Sync
    }

    /// Builds the BatchNorm layer of one site: what `candle_nn::batch_norm(
    /// num_features, config, vb)` builds, a [`SyncBatchNorm`] with the same
    /// configuration and variables, or a [`FrozenBatchNorm`] of the same
    /// variables, as the site's [`Outcome`] says.
    ///
    /// Errors like `candle_nn::batch_norm` (missing or mis-shaped variables),
    /// and for a synchronized or frozen site built with `remove_mean: false`,
    /// naming the path.
    pub fn batch_norm<C: Into<BatchNormConfig>>(
        &self,
        num_features: usize,
        config: C,
        vb: VarBuilder,
    ) -> Result<BatchNormLayer> {
        let config = config.into();
        let path = vb.prefix();
        let outcome = self.outcome(&path);
        let layer = match (outcome, &self.group) {
            (Outcome::Sync, Some(group)) => {
                let sync_cfg = sync_config(&config, &path)?;
                BatchNormLayer::Sync(SyncBatchNorm::new(
                    num_features,
                    sync_cfg,
                    vb,
                    group.clone(),
                )?)
            }
            (Outcome::Frozen, _) => {
                let frozen_cfg = frozen_config(&config, &path)?;
                BatchNormLayer::Frozen(FrozenBatchNorm::new(num_features, frozen_cfg, vb)?)
            }
            _ => BatchNormLayer::Local(LocalBatchNorm::from_candle_config(
                num_features,
                config,
                vb,
            )?),
        };
        lock(&self.sites).push(ConvertedSite {
            path,
            num_features,
            affine: config.affine,
            track_running_stats: true,
            outcome: layer.outcome(),
        });
        Ok(layer)
    }

    /// Every site built so far, with its outcome, in construction order.
    pub fn sites(&self) -> Vec<ConvertedSite> {
        lock(&self.sites).clone()
    }

    /// The sites converted so far (synchronized or frozen), in construction order.
    pub fn report(&self) -> Vec<ConvertedSite> {
        self.sites_where(|o| o != Outcome::Local)
    }

    /// The variable prefixes of the sites kept local so far, in construction order.
    pub fn kept_local(&self) -> Vec<String> {
        self.sites_where(|o| o == Outcome::Local)
            .into_iter()
            .map(|s| s.path)
            .collect()
    }

    fn sites_where(&self, keep: impl Fn(Outcome) -> bool) -> Vec<ConvertedSite> {
        lock(&self.sites)
            .iter()
            .filter(|s| keep(s.outcome))
            .cloned()
            .collect()
    }
}

impl fmt::Debug for BatchNormRewriter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchNormRewriter")
            .field("prefix", &self.vb.prefix())
            .field("group", &self.group)
            .field("rule", &self.rule.as_ref().map(|_| "<fn>"))
            .field("sites", &lock(&self.sites).len())
            .finish()
    }
}

/// Locks the site list, recovering it from a poisoned lock (the list is only
/// appended to, so it is always consistent).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The configuration of a frozen site: candle-nn's, where `remove_mean:
/// false` is an error naming the site.
fn frozen_config(config: &BatchNormConfig, path: &str) -> Result<SyncBatchNormConfig> {
    if !config.remove_mean {
        candle::bail!(
            "FrozenBatchNorm '{}': remove_mean: false is not supported (a frozen layer subtracts the running mean); expected remove_mean: true",
            super::display_path(path)
        )
    }
    SyncBatchNormConfig::try_from(*config)
}
