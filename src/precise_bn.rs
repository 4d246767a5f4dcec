//! Precise running statistics: recomputing the running mean and variance of
//! every BatchNorm layer of a trained model from the statistics of many
//! batches (fvcore's `update_bn_stats`, detectron2's `PreciseBN` hook,
//! pycls's `compute_precise_bn_stats`), instead of trusting the momentum
//! average of the last training steps.
//!
//! [`update_bn_stats`] runs `num_batches` training forwards through a
//! closure. For each layer, batch `i`'s statistics are those the layer
//! normalizes with in training — the *global* batch's for a
//! [`SyncBatchNorm`] (its own all-reduce, the only collective per layer and
//! batch), this rank's for a local layer: the count `n_i` of values per
//! channel (`numel / C`, spatial positions count as samples), the mean
//! `m_i` and the unbiased variance `v_i`. How they are combined is the
//! [`Estimator`]:
//!
//! - [`Estimator::Population`] (the default; what fvcore's `update_bn_stats`
//!   computes today, `_PopulationVarianceEstimator`, after Wu & Johnson,
//!   "Rethinking 'Batch' in BatchNorm", 2021, appendix): the mean and the
//!   (biased) variance of all the values of all the batches together,
//!
//!   ```text
//!   N = Σ_i n_i    running_mean = Σ_i n_i·m_i / N
//!   running_var  = Σ_i n_i·(m_i² + v_i·(n_i − 1)/n_i) / N − running_mean²
//!   ```
//!
//!   computed in the equivalent, cancellation-free form of Chan et al.
//!   (running count, mean and sum of squared deviations, batch after batch).
//! - [`Estimator::MeanOfBatchVariances`] (fvcore's older
//!   `_MeanOfBatchVarianceEstimator`, pycls; what `momentum: None`
//!   accumulates): `running_mean = (1/K) Σ_i m_i`, `running_var = (1/K) Σ_i
//!   v_i` over the `K` batches. It leaves out the spread of the means
//!   between batches and keeps each batch's Bessel correction, so it differs
//!   from the population variance most where batches hold few values per
//!   channel (the late layers of a CNN at small batch sizes).
//!
//! The sums are kept in f64 (f32 on Metal, which has no f64) on the layer's
//! device (no copy to the host per batch) and rounded once at the end.
//! Weights, biases, `num_batches_tracked` and the momentum are left as they
//! were; frozen layers are not touched, nor are layers without running
//! statistics.
//!
//! How: while it runs, each layer's training forward stores the batch's
//! statistics as its running statistics (momentum 1; a switch inside the
//! layer, shared by its clones) and notes the batch's count (for a
//! synchronized layer the global count its all-reduce returned, left on the
//! device); after each batch they are added to the sums. As in fvcore, a
//! layer that did not run in a batch (or ran in eval mode) does not count
//! that batch; a layer that ran twice in one batch is an error, and so is a
//! layer that ran in none of the batches. On any error the layers get their
//! running statistics, counter and momentum back.
//!
//! Local layers see their rank's batches only, so their statistics differ
//! between ranks; [`PreciseBn::average_local_over`] also combines them over
//! a group at the end, in one all-reduce for all local layers together:
//! with the population estimator the values of every rank's batches
//! together (count-weighted means and second moments), with the
//! mean-of-batch-variances estimator the average over every rank's batches
//! (pycls's `scaled_all_reduce` when all ranks ran every batch).
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
//! // The batch means are about 0, 1, 2, 3: their average is about 1.5, and
//! // the population variance is about 1 + 1.25 (the spread of the means).
//! let mean = bn.running_mean().unwrap().mean_all()?.to_scalar::<f32>()?;
//! let var = bn.running_var().unwrap().mean_all()?.to_scalar::<f32>()?;
//! assert!((mean - 1.5).abs() < 0.2);
//! assert!((var - 2.25).abs() < 0.3);
//! assert_eq!(bn.num_batches_tracked()?, 0); // left as it was
//! # Ok::<(), candle::Error>(())
//! ```

use crate::layer::precise::{BatchCount, PreciseSwitch};
use crate::{BatchNormLayer, FrozenBatchNorm, LocalBatchNorm, ProcessGroup, SyncBatchNorm};
use candle::{DType, Device, Result, Tensor, Var};

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

/// How [`update_bn_stats`] combines the statistics of the batches (see the
/// [module docs](self) for the formulas).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Estimator {
    /// The mean and (biased) variance of all the values of all the batches
    /// together, each batch weighted by its count of values per channel:
    /// fvcore's `update_bn_stats` today (`_PopulationVarianceEstimator`; Wu
    /// & Johnson, "Rethinking 'Batch' in BatchNorm", 2021, appendix). The
    /// default.
    #[default]
    Population,
    /// The plain average of the batches' means and unbiased variances:
    /// fvcore's older `_MeanOfBatchVarianceEstimator` and pycls, for
    /// reproducing results computed with them.
    MeanOfBatchVariances,
}

/// Recomputes the running statistics of `layers` over `num_batches`
/// batches with the default [`Estimator::Population`]: `forward(i)` runs
/// the model's training forward (`train = true`) on batch `i` (on every
/// rank, each on its slice of global batch `i`); see the [module
/// docs](self). Layers of one type as `&[&layer, …]`, of several as
/// `&[&a as &dyn PreciseBnLayer, &b]`. The same as
/// `PreciseBn::new(num_batches).run(layers, forward)`.
///
/// Errors (leaving the layers as they were) when `num_batches` is 0, when
/// `forward` fails, when a layer ran more than one training forward in a
/// batch or none in all the batches, for a local layer built with
/// `remove_mean: false`, and when a layer is already being recomputed (a
/// nested or concurrent call).
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
    estimator: Estimator,
    local_group: Option<ProcessGroup>,
}

impl PreciseBn {
    /// Precise statistics over `num_batches` batches, with the default
    /// [`Estimator::Population`].
    pub fn new(num_batches: usize) -> Self {
        Self {
            num_batches,
            estimator: Estimator::default(),
            local_group: None,
        }
    }

    /// Combines the batches' statistics with `estimator`.
    pub fn estimator(mut self, estimator: Estimator) -> Self {
        self.estimator = estimator;
        self
    }

    /// Also combines the precise statistics of the *local* layers over the
    /// ranks of `group`, as if one rank had run every rank's batches
    /// (weighted by counts with [`Estimator::Population`], by batches with
    /// [`Estimator::MeanOfBatchVariances`], pycls's average over ranks), so
    /// that every rank ends with the same numbers: one all-reduce at the end
    /// for all local layers together (none when the model has no local
    /// layer). Synchronized layers need no such step (their batch statistics
    /// are already global); without this option local layers keep their own
    /// rank's statistics (fvcore).
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
        let mut sites: Vec<Site> = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            if let Some(site) = Site::of(layer.precise_target(), i)? {
                // A layer listed twice (or with a clone) is recomputed once.
                if !sites.iter().any(|s| s.same_layer(&site)) {
                    sites.push(site);
                }
            }
        }
        // Turn every switch on (or none): a switch already on belongs to a
        // recomputation in progress, whose statistics this one would spoil.
        for (k, site) in sites.iter().enumerate() {
            if !site.switch.claim() {
                for s in &sites[..k] {
                    s.switch.release();
                }
                candle::bail!(
                    "update_bn_stats: layer '{}' is already having its statistics recomputed (a nested or concurrent call)",
                    site.name
                )
            }
        }
        let result = self.accumulate(&sites, &mut forward);
        let restored = sites
            .iter()
            .map(|s| s.restore())
            .collect::<Result<Vec<_>>>();
        match (result, restored) {
            (Ok(stats), Ok(_)) => {
                for (site, (mean, var)) in sites.iter().zip(stats) {
                    set_in_place(&site.mean, &mean.to_dtype(site.mean.dtype())?, &site.name)?;
                    set_in_place(&site.var, &var.to_dtype(site.var.dtype())?, &site.name)?;
                }
                Ok(())
            }
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        }
    }

    /// Resets the statistics, runs the batches and returns each site's
    /// precise `(mean, var)` (in f64, see [`sum_dtype`]).
    fn accumulate(
        &self,
        sites: &[Site],
        forward: &mut impl FnMut(usize) -> Result<()>,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let mut sums = Vec::with_capacity(sites.len());
        for site in sites {
            site.reset()?;
            sums.push(Sums::new(self.estimator, site)?);
        }
        let n = self.num_batches;
        for i in 0..n {
            forward(i).map_err(|e| {
                crate::error::keep_kind(
                    &e,
                    format!("update_bn_stats: the forward of batch {i} of {n} failed: {e}"),
                )
            })?;
            for (site, sums) in sites.iter().zip(sums.iter_mut()) {
                let batch = site.switch.take();
                if batch.forwards > 1 {
                    candle::bail!(
                        "update_bn_stats: layer '{}' ran {} training forwards in batch {i} of {n}; expected at most one per batch (a layer used twice in a forward is not supported)",
                        site.name,
                        batch.forwards
                    )
                }
                if let Some(count) = batch.count {
                    let few = matches!(count, BatchCount::Local(k) if k <= 1);
                    sums.add(site, count)?;
                    if few {
                        // candle-nn leaves NaN statistics for 0 or 1 values
                        // per channel, which the next batch's momentum-1
                        // update would keep (0·NaN).
                        site.clear_statistics()?;
                    }
                }
            }
        }
        let averaged = match &self.local_group {
            Some(group) => combine_local(sites, &mut sums, group, n)?,
            None => vec![false; sites.len()],
        };
        sites
            .iter()
            .zip(sums)
            .zip(averaged)
            .map(|((site, sums), averaged)| {
                if !averaged && sums.batches == 0 {
                    candle::bail!(
                        "update_bn_stats: layer '{}' ran 0 training forward(s) over {n} batches; expected one per batch it is used in (run the model with train = true)",
                        site.name
                    )
                }
                sums.finish()
            })
            .collect()
    }
}

/// The dtype of a site's sums: f64, or f32 on devices without f64 (Metal).
fn sum_dtype(device: &Device) -> DType {
    if device.is_metal() {
        DType::F32
    } else {
        DType::F64
    }
}

/// A `(c)` tensor of `value` in `dtype` on `device` (built on the host, so
/// that any dtype the device holds works).
fn filled(value: f64, c: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::new(&[value], &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?
        .broadcast_as(c)?
        .contiguous()
}

/// One layer's statistics over the batches it ran in so far, per channel,
/// in [`sum_dtype`].
struct Sums {
    estimator: Estimator,
    /// The batches counted.
    batches: u64,
    /// Population: the number of values `N` (a `(C)` tensor); mean of
    /// batch variances: unused.
    weight: Tensor,
    /// Population: the mean of all values; mean of batch variances: the sum
    /// of the batch means.
    mean: Tensor,
    /// Population: the sum of the squared deviations of all values from
    /// `mean` (Chan's `M2`); mean of batch variances: the sum of the batch
    /// variances.
    spread: Tensor,
}

impl Sums {
    /// No batch yet.
    fn new(estimator: Estimator, site: &Site) -> Result<Self> {
        let zeros = Tensor::zeros(
            site.mean.dims(),
            sum_dtype(site.mean.device()),
            site.mean.device(),
        )?;
        Ok(Self {
            estimator,
            batches: 0,
            weight: zeros.clone(),
            mean: zeros.clone(),
            spread: zeros,
        })
    }

    /// Adds the batch the layer just ran over `count` values per channel:
    /// its statistics are the layer's running statistics (momentum 1).
    fn add(&mut self, site: &Site, count: BatchCount) -> Result<()> {
        let dtype = self.mean.dtype();
        let (c, device) = (site.mean.elem_count(), site.mean.device());
        let (m, v) = (site.mean.to_dtype(dtype)?, site.var.to_dtype(dtype)?);
        let first = self.batches == 0;
        match self.estimator {
            Estimator::MeanOfBatchVariances => {
                if matches!(count, BatchCount::Local(0)) {
                    return Ok(()); // an empty batch has no statistics
                }
                self.mean = (&self.mean + m)?;
                self.spread = (&self.spread + v)?;
            }
            Estimator::Population => {
                let (n, m2) = match count {
                    // An empty batch adds nothing; one value per channel
                    // has no spread (its unbiased variance is not finite).
                    BatchCount::Local(0) => return Ok(()),
                    BatchCount::Local(1) => (filled(1.0, c, dtype, device)?, m.zeros_like()?),
                    BatchCount::Local(k) => (
                        filled(k as f64, c, dtype, device)?,
                        v.affine(k as f64 - 1.0, 0.0)?,
                    ),
                    BatchCount::Global(n) => {
                        let n = n.to_dtype(dtype)?.to_device(device)?.broadcast_as(c)?;
                        let m2 = (&v * n.affine(1.0, -1.0)?)?;
                        (n, m2)
                    }
                };
                if first {
                    (self.weight, self.mean, self.spread) = (n, m, m2);
                } else {
                    // Chan et al.: the union of (N, mean, M2) and (n, m, m2).
                    let total = (&self.weight + &n)?;
                    let delta = (m - &self.mean)?;
                    let share = (n / &total)?;
                    self.mean = (&self.mean + (&delta * &share)?)?;
                    let between = (delta.sqr()? * &self.weight)?.mul(&share)?;
                    self.spread = ((&self.spread + m2)? + between)?;
                    self.weight = total;
                }
                self.batches += 1;
                return Ok(());
            }
        }
        self.batches += 1;
        Ok(())
    }

    /// The precise `(mean, var)`.
    fn finish(self) -> Result<(Tensor, Tensor)> {
        match self.estimator {
            Estimator::Population => Ok((self.mean, (self.spread / self.weight)?)),
            Estimator::MeanOfBatchVariances => {
                let k = 1.0 / self.batches as f64;
                Ok((self.mean.affine(k, 0.0)?, self.spread.affine(k, 0.0)?))
            }
        }
    }

    /// The additive form over ranks, `[batches, w, a, b]`: population `[B,
    /// N, N·mean, M2 + N·mean²]`, mean of batch variances `[B, B, Σm, Σv]`.
    fn additive(&self) -> Result<Vec<Tensor>> {
        let batches = filled(
            self.batches as f64,
            1,
            self.mean.dtype(),
            self.mean.device(),
        )?;
        Ok(match self.estimator {
            Estimator::Population => {
                let a = (&self.weight * &self.mean)?;
                let b = (&self.spread + (&a * &self.mean)?)?;
                vec![batches, self.weight.clone(), a, b]
            }
            Estimator::MeanOfBatchVariances => {
                let w = batches.broadcast_as(self.mean.elem_count())?.contiguous()?;
                vec![batches, w, self.mean.clone(), self.spread.clone()]
            }
        })
    }

    /// Replaces the sums by those of the additive form `[w, a, b]` summed
    /// over the ranks, with `batches` batches in all.
    fn set_additive(&mut self, batches: u64, w: Tensor, a: Tensor, b: Tensor) -> Result<()> {
        self.batches = batches;
        match self.estimator {
            Estimator::Population => {
                // M2 = b − N·mean² (never below 0 after rounding).
                let mean = (&a / &w)?;
                self.spread = (b - (&a * &mean)?)?.relu()?;
                self.mean = mean;
            }
            Estimator::MeanOfBatchVariances => {
                (self.mean, self.spread) = (a, b);
            }
        }
        self.weight = w;
        Ok(())
    }
}

/// Combines the sums of the local sites over `group`, in one all-reduce (on
/// the group's collective device, else the layers'); returns which sites
/// were combined. A local layer that ran in no batch of any rank is an
/// error, on every rank alike.
fn combine_local(
    sites: &[Site],
    sums: &mut [Sums],
    group: &ProcessGroup,
    num_batches: usize,
) -> Result<Vec<bool>> {
    let local: Vec<usize> = (0..sites.len()).filter(|&i| sites[i].local).collect();
    let mut combined = vec![false; sites.len()];
    if local.is_empty() {
        // The same on every rank (the same model): no collective at all.
        return Ok(combined);
    }
    let device = group
        .backend()
        .device()
        .unwrap_or_else(|| sites[local[0]].mean.device().clone());
    let dtype = sum_dtype(&device);
    let mut parts = Vec::with_capacity(4 * local.len());
    for &i in &local {
        for t in sums[i].additive()? {
            parts.push(t.to_dtype(dtype)?.to_device(&device)?);
        }
    }
    let packed = Tensor::cat(&parts, 0)?;
    let summed = group.all_reduce_sum(&packed).map_err(|e| {
        crate::error::keep_kind(
            &e,
            format!(
            "update_bn_stats: combining the local layers' statistics over the group failed: {e}"
        ),
        )
    })?;
    // The batch counts, on the host (one copy, at the end).
    let mut offsets = Vec::with_capacity(local.len());
    let mut offset = 0;
    for &i in &local {
        offsets.push(offset);
        offset += 1 + 3 * sites[i].mean.elem_count();
    }
    let counts = offsets
        .iter()
        .map(|&o| summed.narrow(0, o, 1))
        .collect::<Result<Vec<_>>>()?;
    let counts = Tensor::cat(&counts, 0)?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    for ((&i, &o), &batches) in local.iter().zip(&offsets).zip(&counts) {
        let site = &sites[i];
        if batches < 1.0 {
            candle::bail!(
                "update_bn_stats: layer '{}' ran 0 training forward(s) over {num_batches} batches on all {} rank(s); expected one per batch it is used in (run the model with train = true)",
                site.name,
                group.world_size()
            )
        }
        let c = site.mean.elem_count();
        let (dtype, device) = (sums[i].mean.dtype(), site.mean.device());
        let part = |k: usize| {
            summed
                .narrow(0, o + 1 + k * c, c)?
                .to_device(device)?
                .to_dtype(dtype)
        };
        sums[i].set_additive(batches as u64, part(0)?, part(1)?, part(2)?)?;
        combined[i] = true;
    }
    Ok(combined)
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
        self.clear_statistics()?;
        set_in_place(&self.nbt, &self.nbt.zeros_like()?, &self.name)
    }

    /// Zero running mean and variance.
    fn clear_statistics(&self) -> Result<()> {
        for t in [&self.mean, &self.var] {
            set_in_place(t, &t.zeros_like()?, &self.name)?;
        }
        Ok(())
    }

    /// The statistics and counter as they were, and the momentum.
    fn restore(&self) -> Result<()> {
        self.switch.release();
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
