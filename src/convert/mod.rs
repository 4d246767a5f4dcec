//! Converting models that use `candle_nn::BatchNorm` to synchronized BatchNorm,
//! and keeping their checkpoints (the candle counterpart of PyTorch's
//! `torch.nn.SyncBatchNorm.convert_sync_batchnorm`).
//!
//! There are three ways, from the least change to the most control:
//!
//! | Way | Change to the model | Use it when |
//! |-----|---------------------|-------------|
//! | [`batch_norm`] (drop-in) | `candle_nn::batch_norm` → `candle_syncbn::batch_norm`, field type `candle_nn::BatchNorm` → [`SyncBatchNorm`] | you own the model code and want every BatchNorm synchronized |
//! | [`SyncBatchNorm::from_batch_norm`] | none to the constructor; convert the built layers | you get `candle_nn::BatchNorm` layers from code you cannot change, or convert after loading |
//! | [`BatchNormRewriter`] | take a `&BatchNormRewriter` beside the `VarBuilder`, field type [`BatchNormLayer`] | one model code for local and synchronized runs, some layers kept local (e.g. a head), a report of what was converted |
//!
//! # 1. Drop-in constructor
//!
//! [`batch_norm`] takes the same arguments as `candle_nn::batch_norm` and uses
//! the same variable names; the layer synchronizes over [`default_group`] (set
//! it once per rank with [`crate::set_default_group`] or, for in-process ranks,
//! [`crate::set_thread_default_group`], before building the model). With world
//! size 1 it computes what `candle_nn::BatchNorm` computes.
//!
//! ```
//! # use candle::{DType, Device, Module, Result};
//! # use candle_nn::{VarBuilder, VarMap};
//! // Before: `bn: candle_nn::BatchNorm` built with `candle_nn::batch_norm(..)`.
//! struct Block { conv: candle_nn::Conv2d, bn: candle_syncbn::SyncBatchNorm }
//! impl Block {
//!     fn new(vb: VarBuilder) -> Result<Self> {
//!         let conv = candle_nn::conv2d_no_bias(3, 8, 3, Default::default(), vb.pp("conv"))?;
//!         let bn = candle_syncbn::batch_norm(8, 1e-5, vb.pp("bn"))?; // was candle_nn::batch_norm
//!         Ok(Self { conv, bn })
//!     }
//! }
//! # let varmap = VarMap::new();
//! # let block = Block::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
//! # assert_eq!(block.bn.group().world_size(), 1);
//! # Ok::<(), candle::Error>(())
//! ```
//!
//! # 2. Converting built layers
//!
//! [`SyncBatchNorm::from_batch_norm`] turns a `candle_nn::BatchNorm` into a
//! synchronized layer with the same `eps` and `momentum`. The weight and bias
//! are the *same* tensors (an optimizer that holds them as variables keeps
//! training them) and the running statistics are the *same* variables
//! (candle-nn keeps them as `Var`s): a training step of either layer updates
//! both. `num_batches_tracked`, which candle-nn does not have, starts at 0
//! in a variable of its own: [`SyncBatchNorm::with_counter`] puts it in the
//! `VarMap`, so that checkpoints keep it.
//!
//! ```
//! # use candle::{DType, Device, Result};
//! # use candle_nn::{VarBuilder, VarMap};
//! # use candle_syncbn::{ProcessGroup, SyncBatchNorm};
//! # let varmap = VarMap::new();
//! # let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let local = candle_nn::batch_norm(8, 1e-5, vb.pp("bn"))?;
//! let sync = SyncBatchNorm::from_batch_norm(&local, ProcessGroup::single())?;
//! # assert_eq!(sync.num_features(), 8);
//! # Ok::<(), candle::Error>(())
//! ```
//!
//! # 3. The `VarBuilder` rewriter
//!
//! For model code one wants to keep generic: the model takes a
//! `&BatchNormRewriter` beside its `VarBuilder` and calls
//! [`BatchNormRewriter::batch_norm`] wherever it called `candle_nn::batch_norm`
//! (same arguments). Each site becomes a [`BatchNormLayer`] (one `ModuleT`
//! type): synchronized where the path filter accepts the site's variable
//! prefix, plain candle-nn otherwise; or, with a [`rule`](BatchNormRewriter::rule)
//! returning an [`Outcome`] per site, synchronized, local or frozen
//! ([`FrozenBatchNorm`](crate::FrozenBatchNorm): a pretrained backbone's
//! fixed affine map). [`BatchNormRewriter::local`] converts
//! nothing, so the same code builds the original model;
//! [`BatchNormRewriter::report`] lists what was converted (path, channels,
//! affine, tracked) and [`BatchNormRewriter::kept_local`] what was not.
//!
//! Passing the rewriter explicitly, rather than hiding it in global state,
//! keeps construction code plain Rust: one extra argument, no trait bounds.
//! Local sites also carry a `num_batches_tracked` counter, so a `VarMap` has
//! exactly the same keys — and saves the same checkpoint — whether the model
//! was built local or synchronized (candle's own `VarMap::load` reads either
//! into the other). `examples/convert_resnet.rs` converts a small ResNet this
//! way and trains it on 2 in-process ranks.
//!
//! ```
//! # use candle::{DType, Device, Result};
//! # use candle_nn::{VarBuilder, VarMap};
//! use candle_syncbn::{BatchNormLayer, BatchNormRewriter, ProcessGroup};
//!
//! struct Net { bn1: BatchNormLayer, head_bn: BatchNormLayer }
//! impl Net {
//!     fn new(vb: VarBuilder, bn: &BatchNormRewriter) -> Result<Self> {
//!         Ok(Self {
//!             bn1: bn.batch_norm(8, 1e-5, vb.pp("bn1"))?,
//!             head_bn: bn.batch_norm(8, 1e-5, vb.pp("head").pp("bn"))?,
//!         })
//!     }
//! }
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let rw = BatchNormRewriter::new(vb, ProcessGroup::single())
//!     .filter(|path| !path.starts_with("head"));
//! let net = Net::new(rw.vb(), &rw)?;
//! assert!(net.bn1.is_sync() && !net.head_bn.is_sync());
//! assert_eq!(rw.report()[0].path, "bn1");
//! # Ok::<(), candle::Error>(())
//! ```
//!
//! # Models that build layers in closures
//!
//! A converted layer synchronizes only in training mode, so the model must
//! pass `train` on to it. Models that wrap their layers in `Func` closures
//! (candle-transformers' ResNet: `Func::new(move |xs| xs.apply(&conv)?.apply_t(&bn, false))`)
//! always run it in eval mode: it never trains nor synchronizes (the layer
//! warns on stderr after 100 such forwards on several ranks). Use `FuncT`,
//! which takes `train`. With a `&BatchNormRewriter` beside the `VarBuilder`,
//! a builder returning the closure needs its lifetime spelled out
//! (`error[E0106]: missing lifetime specifier`): the closure owns what it
//! captures, so it is `'static`.
//!
//! ```
//! # use candle::{DType, Device, Module, ModuleT, Result, Tensor};
//! # use candle_nn::{Conv2dConfig, FuncT, VarBuilder, VarMap};
//! use candle_syncbn::{BatchNormRewriter, ProcessGroup};
//!
//! fn downsample(
//!     c_in: usize,
//!     c_out: usize,
//!     stride: usize,
//!     vb: VarBuilder,
//!     bn: &BatchNormRewriter,
//! ) -> Result<FuncT<'static>> {
//!     let cfg = Conv2dConfig { stride, ..Default::default() };
//!     let conv = candle_nn::conv2d_no_bias(c_in, c_out, 1, cfg, vb.pp(0))?;
//!     let norm = bn.batch_norm(c_out, 1e-5, vb.pp(1))?;
//!     // Was: Func::new(move |xs| xs.apply(&conv)?.apply_t(&norm, false))
//!     Ok(FuncT::new(move |xs, train| xs.apply(&conv)?.apply_t(&norm, train)))
//! }
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let rw = BatchNormRewriter::new(vb, ProcessGroup::single());
//! let block = downsample(3, 8, 2, rw.vb().pp("down"), &rw)?;
//! let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu)?;
//! block.forward_t(&x, true)?; // trains (and synchronizes) the batch norm
//! let counter = varmap.data().lock().unwrap()["down.1.num_batches_tracked"].as_tensor().to_scalar::<i64>()?;
//! assert_eq!(counter, 1);
//! # Ok::<(), candle::Error>(())
//! ```
//!
//! # Checkpoints
//!
//! Every way keeps candle-nn's and PyTorch's variable names (`weight`, `bias`,
//! `running_mean`, `running_var`, plus `num_batches_tracked`, an i64 scalar), so
//! a `VarMap` saves the same checkpoint whether the model was built local or
//! synchronized. [`checkpoint`] loads PyTorch `BatchNorm*d`/`SyncBatchNorm`
//! state dicts (safetensors, or `.pth` through candle's pickle reader) and
//! candle-nn checkpoints (which lack `num_batches_tracked`) into a `VarMap`, and
//! saves safetensors that PyTorch's `load_state_dict` accepts.
//!
//! ```
//! # use candle::{DType, Device};
//! # use candle_nn::{VarBuilder, VarMap};
//! use candle_syncbn::convert::checkpoint::{load_checkpoint, save_checkpoint, LoadOptions};
//! # let dir = std::env::temp_dir().join(format!("candle-syncbn-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # let path = dir.join("bn.safetensors");
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let bn = candle_syncbn::batch_norm(8, 1e-5, vb.pp("bn"))?;
//! save_checkpoint(&varmap, &path)?; // bn.weight, …, bn.num_batches_tracked (i64)
//! let report = load_checkpoint(&varmap, &path, &LoadOptions::default())?;
//! assert_eq!(report.loaded.len(), 5);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), candle::Error>(())
//! ```
//!
//! [`SyncBatchNorm`]: crate::SyncBatchNorm
//! [`SyncBatchNorm::from_batch_norm`]: crate::SyncBatchNorm::from_batch_norm
//! [`SyncBatchNorm::with_counter`]: crate::SyncBatchNorm::with_counter
//! [`default_group`]: crate::default_group

pub mod checkpoint;
mod layer;
mod local;
mod pickle_guard;
mod pth_entries;
mod rewriter;
mod safetensors_guard;

pub use layer::BatchNormLayer;
pub use local::LocalBatchNorm;
pub use rewriter::{BatchNormRewriter, ConvertedSite, Outcome};

use crate::error::bail_input;
use crate::{default_group, ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use candle::{DType, Result, Tensor, Var};
use candle_nn::{BatchNormConfig, Init, VarBuilder};

/// Drop-in replacement for `candle_nn::batch_norm`: same arguments, same
/// variable names (`weight`, `bias`, `running_mean`, `running_var`, plus
/// PyTorch's `num_batches_tracked`), synchronized over [`default_group`].
///
/// `config` is a `candle_nn::BatchNormConfig` (or an `f64` eps); its `momentum`
/// becomes `Some(momentum)` and running statistics are tracked, as in
/// candle-nn. With world size 1 the outputs and running statistics are
/// candle-nn's (up to rounding). `remove_mean: false` has no synchronized
/// equivalent and is an error.
pub fn batch_norm<C: Into<BatchNormConfig>>(
    num_features: usize,
    config: C,
    vb: VarBuilder,
) -> Result<SyncBatchNorm> {
    let config = config.into();
    let path = vb.prefix();
    let config = sync_config(&config, &path)?;
    SyncBatchNorm::new(num_features, config, vb, default_group())
}

/// The synchronized configuration for a candle-nn one, rejecting `remove_mean: false`.
pub(crate) fn sync_config(config: &BatchNormConfig, path: &str) -> Result<SyncBatchNormConfig> {
    if !config.remove_mean {
        bail_input!(
            "SyncBatchNorm '{}': cannot convert a candle_nn::BatchNorm with remove_mean: false \
             (SyncBatchNorm always subtracts the batch mean); expected remove_mean: true",
            display_path(path)
        )
    }
    SyncBatchNormConfig::try_from(*config)
}

/// A variable prefix for messages ("(root)" when empty).
pub(crate) fn display_path(path: &str) -> &str {
    if path.is_empty() {
        "(root)"
    } else {
        path
    }
}

impl SyncBatchNorm {
    /// A synchronized layer from a `candle_nn::BatchNorm` (PyTorch's
    /// `convert_sync_batchnorm` for one layer), synchronizing over `group`.
    ///
    /// - `weight` and `bias` are the same tensors as `bn`'s, so an optimizer
    ///   that holds them (e.g. from a `VarMap`) keeps training them;
    /// - `running_mean` and `running_var` are the same variables as `bn`'s
    ///   (candle-nn always keeps them as `Var`s): training either layer updates
    ///   the statistics both see;
    /// - `eps` and `momentum` are copied (momentum `m` becomes `Some(m)`);
    ///   running statistics are tracked;
    /// - `num_batches_tracked`, which candle-nn does not keep, starts at 0 in a
    ///   new variable that is not part of any `VarMap`: register it with
    ///   [`with_counter`](Self::with_counter), or `save_checkpoint` writes no
    ///   counter for the layer.
    ///
    /// The layer is named after its channel count (a `candle_nn::BatchNorm`
    /// knows no path): rename it with [`SyncBatchNorm::with_name`] so that
    /// errors name it. The groups' agreement check tells converted layers of
    /// the same channel count apart by the order they were converted in (see
    /// [`CallTag`](crate::group::CallTag)), which must be the same on every
    /// rank.
    ///
    /// Errors if `bn` was built with `remove_mean: false`, or if its tensors
    /// are inconsistent (shapes, dtypes).
    pub fn from_batch_norm(bn: &candle_nn::BatchNorm, group: ProcessGroup) -> Result<Self> {
        Self::convert_batch_norm(bn, group)
    }

    /// The layer counting its training batches in the variable
    /// `num_batches_tracked` under `vb`'s prefix, so that the `VarMap`
    /// behind `vb` saves the counter with the layer's other variables
    /// (`varmap.save`, [`checkpoint::save_checkpoint`]) and loads it.
    ///
    /// For layers made by [`SyncBatchNorm::from_batch_norm`], whose counter
    /// belongs to no map: pass the `VarBuilder` prefix the candle-nn layer
    /// was built under. A counter the map already holds (loaded from a
    /// checkpoint, say) is used as it is; otherwise one is created there
    /// with the layer's count so far.
    ///
    /// Without it the checkpoint has no `num_batches_tracked` for the layer:
    /// this crate's loaders then start the counter at 0
    /// ([`LoadReport::counters_defaulted`](checkpoint::LoadReport::counters_defaulted)),
    /// and PyTorch's `load_state_dict` accepts the file even with
    /// `strict=True` and keeps the module's own counter (0 in a fresh
    /// model): a layer with `momentum=None` then weighs its next batches as
    /// if it had seen none.
    ///
    /// ```
    /// # use candle::{DType, Device, Tensor};
    /// # use candle_nn::{ModuleT, VarBuilder, VarMap};
    /// # use candle_syncbn::{ProcessGroup, SyncBatchNorm};
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// let local = candle_nn::batch_norm(8, 1e-5, vb.pp("bn"))?;
    /// let sync = SyncBatchNorm::from_batch_norm(&local, ProcessGroup::single())?
    ///     .with_name("bn")
    ///     .with_counter(vb.pp("bn"))?;
    /// sync.forward_t(&Tensor::randn(0f32, 1.0, (4, 8), &Device::Cpu)?, true)?;
    /// let counter = varmap.data().lock().unwrap()["bn.num_batches_tracked"].as_tensor().to_scalar::<i64>()?;
    /// assert_eq!(counter, 1);
    /// # Ok::<(), candle::Error>(())
    /// ```
    ///
    /// An error when the layer has no running statistics, or when `vb`
    /// cannot give the variable (a file without it, a mis-shaped one).
    pub fn with_counter(mut self, vb: VarBuilder) -> Result<Self> {
        let path = vb.prefix();
        let context = |e: candle::Error| {
            candle::Error::Msg(format!(
                "SyncBatchNorm '{}': cannot register num_batches_tracked under '{}': {e}",
                self.name(),
                display_path(&path)
            ))
        };
        let existed = vb.contains_tensor("num_batches_tracked");
        let count = self.num_batches_tracked()?;
        let counter = vb
            .get_with_hints_dtype((), "num_batches_tracked", Init::Const(0.0), DType::I64)
            .map_err(context)?;
        if !existed && count != 0 {
            let value = i64::try_from(count).unwrap_or(i64::MAX);
            Var::from_tensor(&counter)?.set(&Tensor::new(value, counter.device())?)?;
        }
        self.replace_counter(counter)?;
        Ok(self)
    }

    fn convert_batch_norm(bn: &candle_nn::BatchNorm, group: ProcessGroup) -> Result<Self> {
        let mean = bn.running_mean();
        let num_features = match mean.dims() {
            [c] => *c,
            dims => bail_input!(
                "SyncBatchNorm::from_batch_norm: expected a running_mean of shape [C], got {dims:?}"
            ),
        };
        let name = format!("converted candle_nn::BatchNorm({num_features})");
        if crate::config::keeps_mean(bn) {
            bail_input!(
                "SyncBatchNorm '{name}': cannot convert a candle_nn::BatchNorm with remove_mean: false \
                 (SyncBatchNorm always subtracts the batch mean); expected remove_mean: true"
            )
        }
        let weight_and_bias = bn.weight_and_bias().map(|(w, b)| (w.clone(), b.clone()));
        let config = SyncBatchNormConfig {
            eps: bn.eps(),
            momentum: Some(bn.momentum()),
            affine: weight_and_bias.is_some(),
            track_running_stats: true,
        };
        let nbt = Tensor::zeros((), DType::I64, mean.device())?;
        let running = (mean.clone(), bn.running_var().clone(), nbt);
        Self::from_parts(
            name,
            num_features,
            config,
            weight_and_bias,
            Some(running),
            group,
        )
    }
}
