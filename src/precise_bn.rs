//! Precise running statistics: recomputing the running mean and variance of
//! every BatchNorm layer of a trained model as the plain average of the
//! statistics of many batches (fvcore's `update_bn_stats`, detectron2's
//! `PreciseBN` hook, pycls's `compute_precise_bn_stats`), instead of
//! trusting the momentum average of the last training steps.
//!
//! [`update_bn_stats`] runs `num_batches` training forwards through a
//! closure. For each layer, batch `i`'s statistics are those the layer
//! normalizes with in training — the *global* batch's for a
//! [`SyncBatchNorm`] (its own all-reduce, the only collective per layer and
//! batch), this rank's for a local layer — and the new running statistics
//! are
//!
//! ```text
//! running_mean = (1/K) Σ_i mean_i        running_var = (1/K) Σ_i unbiased_var_i
//! ```
//!
//! fvcore's definition (and what `momentum: None` accumulates). The sums are
//! kept in f64 (f32 on Metal, which has no f64) on the layer's device (no
//! copy to the host per batch) and rounded once at the end. Weights, biases, `num_batches_tracked` and the
//! momentum are left as they were; frozen layers are not touched, nor are
//! layers without running statistics.
//!
//! How: while it runs, each layer's training forward stores the batch's
//! statistics as its running statistics (momentum 1; a switch inside the
//! layer, shared by its clones); after each batch they are added to the
//! sums. At the end each layer must have seen exactly `num_batches`
//! training forwards (its `num_batches_tracked` counter, reset to 0 for the
//! run, says so): a layer run in eval mode, skipped, or run twice per batch
//! is an error, not wrong numbers. On any error the layers get their
//! running statistics, counter and momentum back.
//!
//! Local layers see their rank's batches only, so their averages differ
//! between ranks; [`PreciseBn::average_local_over`] also averages them over
//! a group at the end (pycls's `scaled_all_reduce`), in one all-reduce for
//! all local layers together.
//!
//! ```
//! use candle::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use candle_syncbn::precise_bn::update_bn_stats;
//! use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let bn = SyncBatchNorm::new(3, SyncBatchNormConfig::default(), vb.pp("bn"), ProcessGroup::single())?;
//! let batches: Vec<Tensor> = (0..4)
//!     .map(|i| Tensor::randn(i as f32, 1.0, (8, 3, 4, 4), &Device::Cpu))
//!     .collect::<candle::Result<_>>()?;
//! update_bn_stats(&[&bn], batches.len(), |i| {
//!     use candle_nn::ModuleT;
//!     bn.forward_t(&batches[i], true).map(|_| ())
//! })?;
//! // The batch means are about 0, 1, 2, 3: their average is about 1.5.
//! let mean = bn.running_mean().unwrap().mean_all()?.to_scalar::<f32>()?;
//! assert!((mean - 1.5).abs() < 0.2);
//! assert_eq!(bn.num_batches_tracked()?, 0); // left as it was
//! # Ok::<(), candle::Error>(())
//! ```

use crate::layer::precise::PreciseSwitch;
use crate::ops::counter_value;
use crate::{BatchNormLayer, FrozenBatchNorm, LocalBatchNorm, ProcessGroup, SyncBatchNorm};
use candle::{DType, Result, Tensor, Var};

/// A layer whose running statistics [`update_bn_stats`] can recompute:
/// [`SyncBatchNorm`], [`LocalBatchNorm`], [`FrozenBatchNorm`] (left alone)
/// and [`BatchNormLayer`]. Sealed: implemented by this crate only.
pub trait PreciseBnLayer: sealed::Sealed {
    /// The layer as [`update_bn_stats`] sees it (internal).
    #[doc(hidden)]
    fn precise_target(&self) -> sealed::Target<'_>;
}

mod sealed {
    /// Seals [`super::PreciseBnLayer`].
    pub trait Sealed {}

    /// The kinds of layer [`super::update_bn_stats`] handles.
    pub enum Target<'a> {
        Sync(&'a crate::SyncBatchNorm),
        Local(&'a crate::LocalBatchNorm),
        Frozen,
    }
}

use sealed::{Sealed, Target};

impl Sealed for SyncBatchNorm {}
impl PreciseBnLayer for SyncBatchNorm {
    fn precise_target(&self) -> Target<'_> {
        Target::Sync(self)
    }
}

impl Sealed for LocalBatchNorm {}
impl PreciseBnLayer for LocalBatchNorm {
    fn precise_target(&self) -> Target<'_> {
        Target::Local(self)
    }
}

impl Sealed for FrozenBatchNorm {}
impl PreciseBnLayer for FrozenBatchNorm {
    fn precise_target(&self) -> Target<'_> {
        Target::Frozen
    }
}

impl Sealed for BatchNormLayer {}
impl PreciseBnLayer for BatchNormLayer {
    fn precise_target(&self) -> Target<'_> {
        match self {
            BatchNormLayer::Sync(l) => Target::Sync(l),
            BatchNormLayer::Local(l) => Target::Local(l),
            BatchNormLayer::Frozen(_) => Target::Frozen,
        }
    }
}

/// Recomputes the running statistics of `layers` over `num_batches`
/// batches: `forward(i)` runs the model's training forward (`train = true`)
/// on batch `i` (on every rank, each on its slice of global batch `i`); see
/// the [module docs](self). Layers of one type as `&[&layer, …]`, of
/// several as `&[&a as &dyn PreciseBnLayer, &b]`. The same as
/// `PreciseBn::new(num_batches).run(layers, forward)`.
///
/// Errors (leaving the layers as they were) when `num_batches` is 0, when
/// `forward` fails, when a layer did not see exactly one training forward
/// per batch, for a local layer built with `remove_mean: false`, and when a
/// layer is already being recomputed (a nested or concurrent call).
pub fn update_bn_stats<L: PreciseBnLayer + ?Sized>(
    layers: &[&L],
    num_batches: usize,
    forward: impl FnMut(usize) -> Result<()>,
) -> Result<()> {
    PreciseBn::new(num_batches).run(layers, forward)
}

/// [`update_bn_stats`] with options.
#[derive(Debug, Clone)]
pub struct PreciseBn {
    num_batches: usize,
    local_group: Option<ProcessGroup>,
}

impl PreciseBn {
    /// Precise statistics over `num_batches` batches.
    pub fn new(num_batches: usize) -> Self {
        Self {
            num_batches,
            local_group: None,
        }
    }

    /// Also averages the precise statistics of the *local* layers over the
    /// ranks of `group` (pycls), so that every rank ends with the same
    /// numbers: one all-reduce at the end for all local layers together
    /// (none when the model has no local layer).
    /// Synchronized layers need no such step (their batch statistics are
    /// already global); without this option local layers keep their own
    /// rank's averages (fvcore).
    pub fn average_local_over(mut self, group: ProcessGroup) -> Self {
        self.local_group = Some(group);
        self
    }

    /// Runs the recomputation (see [`update_bn_stats`]).
    pub fn run<L: PreciseBnLayer + ?Sized>(
        &self,
        layers: &[&L],
        mut forward: impl FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        if self.num_batches == 0 {
            candle::bail!("update_bn_stats: expected at least 1 batch, got num_batches = 0")
        }
        let mut sites = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            if let Some(site) = Site::of(layer.precise_target(), i)? {
                sites.push(site);
            }
        }
        // Turn every switch on (or none): a switch already on belongs to a
        // recomputation in progress, whose statistics this one would spoil.
        for (k, site) in sites.iter().enumerate() {
            if site.switch.is_on() && !sites[..k].iter().any(|s| s.same_layer(site)) {
                for s in &sites[..k] {
                    s.switch.set(false);
                }
                candle::bail!(
                    "update_bn_stats: layer '{}' is already having its statistics recomputed (a nested or concurrent call)",
                    site.name
                )
            }
            site.switch.set(true);
        }
        let result = self.accumulate(&sites, &mut forward);
        let restored = sites
            .iter()
            .map(|s| s.restore())
            .collect::<Result<Vec<_>>>();
        match (result, restored) {
            (Ok(averages), Ok(_)) => {
                for (site, (mean, var)) in sites.iter().zip(averages) {
                    set_in_place(&site.mean, &mean.to_dtype(site.mean.dtype())?, &site.name)?;
                    set_in_place(&site.var, &var.to_dtype(site.var.dtype())?, &site.name)?;
                }
                Ok(())
            }
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        }
    }

    /// Resets the statistics, runs the batches and returns each site's
    /// averages `(mean, var)` (in f64, see [`sum_dtype`]).
    fn accumulate(
        &self,
        sites: &[Site],
        forward: &mut impl FnMut(usize) -> Result<()>,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let mut sums = Vec::with_capacity(sites.len());
        for site in sites {
            site.reset()?;
            let zeros = Tensor::zeros(site.mean.dims(), sum_dtype(site), site.mean.device())?;
            sums.push((zeros.clone(), zeros));
        }
        for i in 0..self.num_batches {
            forward(i).map_err(|e| {
                candle::Error::Msg(format!(
                    "update_bn_stats: the forward of batch {i} of {} failed: {e}",
                    self.num_batches
                ))
            })?;
            for (site, (mean, var)) in sites.iter().zip(sums.iter_mut()) {
                *mean = (&*mean + site.mean.to_dtype(mean.dtype())?)?;
                *var = (&*var + site.var.to_dtype(var.dtype())?)?;
            }
        }
        for site in sites {
            let seen = counter_value(
                &site.nbt,
                &format_args!("update_bn_stats: layer '{}'", site.name),
            )?;
            if seen != self.num_batches as u64 {
                candle::bail!(
                    "update_bn_stats: layer '{}' ran {seen} training forward(s) over {} batches; expected exactly one per batch (run the model with train = true, each layer once per batch)",
                    site.name,
                    self.num_batches
                )
            }
        }
        let scale = 1.0 / self.num_batches as f64;
        let mut averages: Vec<(Tensor, Tensor)> = sums
            .into_iter()
            .map(|(m, v)| Ok((m.affine(scale, 0.0)?, v.affine(scale, 0.0)?)))
            .collect::<Result<_>>()?;
        if let Some(group) = &self.local_group {
            average_local(sites, &mut averages, group)?;
        }
        Ok(averages)
    }
}

/// The dtype of a site's sums: f64, or f32 on devices without f64 (Metal).
fn sum_dtype(site: &Site) -> DType {
    if site.mean.device().is_metal() {
        DType::F32
    } else {
        DType::F64
    }
}

/// Replaces the averages of the local sites by their mean over `group`, in
/// one all-reduce (on the group's collective device, else the layers').
fn average_local(
    sites: &[Site],
    averages: &mut [(Tensor, Tensor)],
    group: &ProcessGroup,
) -> Result<()> {
    let local: Vec<usize> = (0..sites.len()).filter(|&i| sites[i].local).collect();
    if local.is_empty() {
        // The same on every rank (the same model): no collective at all.
        return Ok(());
    }
    let device = group
        .backend()
        .device()
        .unwrap_or_else(|| sites[local[0]].mean.device().clone());
    let mut parts = Vec::with_capacity(2 * local.len());
    let dtype = if device.is_metal() {
        DType::F32
    } else {
        DType::F64
    };
    for &i in &local {
        parts.push(averages[i].0.to_dtype(dtype)?.to_device(&device)?);
        parts.push(averages[i].1.to_dtype(dtype)?.to_device(&device)?);
    }
    let packed = Tensor::cat(&parts, 0)?;
    let summed = group.all_reduce_sum(&packed).map_err(|e| {
        candle::Error::Msg(format!(
            "update_bn_stats: averaging the local layers' statistics over the group failed: {e}"
        ))
    })?;
    let summed = summed.affine(1.0 / group.world_size() as f64, 0.0)?;
    let mut offset = 0;
    for &i in &local {
        let c = sites[i].mean.elem_count();
        let device = sites[i].mean.device();
        let dtype = averages[i].0.dtype();
        averages[i].0 = summed
            .narrow(0, offset, c)?
            .to_device(device)?
            .to_dtype(dtype)?;
        averages[i].1 = summed
            .narrow(0, offset + c, c)?
            .to_device(device)?
            .to_dtype(dtype)?;
        offset += 2 * c;
    }
    Ok(())
}

/// One layer being recomputed: its variables, and copies to restore.
struct Site {
    name: String,
    local: bool,
    mean: Tensor,
    var: Tensor,
    nbt: Tensor,
    switch: PreciseSwitch,
    saved: (Tensor, Tensor, Tensor),
}

impl Site {
    /// The site of the `i`-th layer, `None` for a layer left alone.
    fn of(target: Target<'_>, i: usize) -> Result<Option<Self>> {
        let (name, local, (mean, var, nbt), switch) = match target {
            Target::Frozen => return Ok(None),
            Target::Sync(l) => match l.running_variables() {
                Some(r) => (l.name().to_string(), false, r, l.precise_switch()),
                None => return Ok(None),
            },
            Target::Local(l) => {
                let name = format!("local BatchNorm #{i}");
                if crate::config::keeps_mean(l.inner()) {
                    candle::bail!(
                        "update_bn_stats: layer '{name}' was built with remove_mean: false; precise statistics need remove_mean: true"
                    )
                }
                (name, true, l.running_variables(), l.precise_switch())
            }
        };
        Ok(Some(Self {
            saved: (mean.copy()?, var.copy()?, nbt.copy()?),
            mean: mean.clone(),
            var: var.clone(),
            nbt: nbt.clone(),
            switch: switch.clone(),
            name,
            local,
        }))
    }

    /// Whether `other` is the same layer (or a clone of it).
    fn same_layer(&self, other: &Site) -> bool {
        self.switch.same(&other.switch)
    }

    /// Zero statistics and counter before the first batch.
    fn reset(&self) -> Result<()> {
        for t in [&self.mean, &self.var, &self.nbt] {
            set_in_place(t, &t.zeros_like()?, &self.name)?;
        }
        Ok(())
    }

    /// The statistics and counter as they were, and the momentum.
    fn restore(&self) -> Result<()> {
        self.switch.set(false);
        set_in_place(&self.mean, &self.saved.0, &self.name)?;
        set_in_place(&self.var, &self.saved.1, &self.name)?;
        set_in_place(&self.nbt, &self.saved.2, &self.name)
    }
}

/// Writes `value` into the variable `t` in place (every holder sees it).
fn set_in_place(t: &Tensor, value: &Tensor, layer: &str) -> Result<()> {
    if !t.is_variable() {
        candle::bail!(
            "update_bn_stats: layer '{layer}': a running statistic is not a variable and cannot be updated in place"
        )
    }
    Var::from_tensor(t)?.set(value)
}
