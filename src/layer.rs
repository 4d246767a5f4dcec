//! The `SyncBatchNorm` layer.

use crate::error::bail_input;
use crate::group::{CallTag, LayerId, Part};
use crate::ops::{
    BatchMoments, BatchNormAddOp, BatchNormOp, BatchStats, ForwardCoefficients, Moments,
    RunningTensors, StackParams,
};
use crate::{ProcessGroup, SyncBatchNormConfig};
use candle::{DType, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

mod composite;
mod eval_only;
mod frozen;
pub(crate) mod precise;

pub use frozen::FrozenBatchNorm;

/// Running statistics kept by a layer with `track_running_stats`.
#[derive(Debug, Clone)]
struct RunningStats {
    mean: Tensor,
    var: Tensor,
    num_batches_tracked: Tensor,
}

/// Synchronized batch normalization over the ranks of a [`ProcessGroup`]
/// (PyTorch's `torch.nn.SyncBatchNorm`).
///
/// In training mode the per-channel mean and variance are those of the union of
/// the mini-batches of all ranks (one all-reduce in the forward pass and one in
/// the backward pass, each of `O(C)` values); in eval mode the running
/// statistics are used and nothing is communicated.
///
/// Input `(N, C, *)` of rank 2 to 5, f32, f64, f16 or bf16, any strides
/// (channels-last inputs keep their layout); statistics are computed in f32
/// (f64 for f64 inputs) and combined in f64. That is on the CPU and on CUDA
/// devices (feature `cuda`); on other devices (Metal) the layer is composed
/// of candle ops, see [`SyncBatchNorm::forward_composite_t`].
///
/// Variables (under the [`VarBuilder`]'s prefix, PyTorch's names): `weight`,
/// `bias` (with `affine`), `running_mean`, `running_var`, `num_batches_tracked`
/// (i64 scalar; with `track_running_stats`).
///
/// Each all-reduce carries a [`CallTag`] made of the layer's identity and
/// its call counter, which the TCP and in-process groups (and NCCL with its
/// debug checks) compare across ranks: ranks that call two layers of the
/// same shape in a different order get an error naming both, not mixed
/// statistics. The identity is the layer's name (its prefix) and its
/// construction index among the layers of that name built on the same
/// group handle, so layers with equal names (a teacher's and a student's
/// `bn`, empty prefixes, converted layers) are told apart too, provided
/// every rank builds its layers in the same order. Clones are the same
/// layer (same identity, shared counter).
///
/// A layer whose group has more than one rank and that has run 100
/// forwards in eval mode and none in training mode prints a warning to
/// stderr, once: that is what a model calling it as `apply_t(&bn, false)`
/// (inside a `Func`, say) does, and it never synchronizes (see
/// docs/converting.md for the `FuncT` pattern).
#[derive(Debug, Clone)]
pub struct SyncBatchNorm {
    name: String,
    /// The name's identity in call tags.
    id: LayerId,
    /// The synchronized training calls so far (the index in call tags).
    calls: Arc<AtomicU64>,
    num_features: usize,
    config: SyncBatchNormConfig,
    weight_and_bias: Option<(Tensor, Tensor)>,
    running: Option<RunningStats>,
    group: ProcessGroup,
    precise: precise::PreciseSwitch,
    /// Counts eval-mode forwards until the first training one (a warning
    /// when a synchronized layer never trains).
    eval_only: eval_only::EvalOnlyWatch,
}

impl SyncBatchNorm {
    /// Builds a layer for `num_features` channels, creating or loading its
    /// variables through `vb` and synchronizing over `group`.
    ///
    /// With a `VarBuilder` over a `VarMap`, the weight and bias are trainable
    /// variables and the running statistics live in the same map (so
    /// `varmap.save()` persists them). A checkpoint without
    /// `num_batches_tracked` (e.g. from candle-nn) loads with the counter at 0.
    /// Running statistics are f32 when `vb`'s dtype is f16/bf16.
    pub fn new<C: Into<SyncBatchNormConfig>>(
        num_features: usize,
        config: C,
        vb: VarBuilder,
        group: ProcessGroup,
    ) -> Result<Self> {
        let config = config.into();
        let name = layer_name(&vb);
        config.validate(&name)?;
        if num_features == 0 {
            bail_input!("SyncBatchNorm '{name}': num_features must be at least 1")
        }
        let weight_and_bias = if config.affine {
            let w = vb.get_with_hints(num_features, "weight", Init::Const(1.0))?;
            let b = vb.get_with_hints(num_features, "bias", Init::Const(0.0))?;
            Some((w, b))
        } else {
            None
        };
        let running = if config.track_running_stats {
            let dtype = match vb.dtype() {
                DType::F16 | DType::BF16 => DType::F32,
                d => d,
            };
            let mean =
                vb.get_with_hints_dtype(num_features, "running_mean", Init::Const(0.0), dtype)?;
            let var =
                vb.get_with_hints_dtype(num_features, "running_var", Init::Const(1.0), dtype)?;
            // Created in a VarMap (so it is saved), loaded from a checkpoint that
            // has it, and zero for checkpoints without it (candle-nn's).
            let nbt = match vb.get_with_hints_dtype(
                (),
                "num_batches_tracked",
                Init::Const(0.0),
                DType::I64,
            ) {
                Ok(t) => t,
                Err(e) if vb.contains_tensor("num_batches_tracked") => return Err(e),
                Err(_) => Tensor::zeros((), DType::I64, vb.device())?,
            };
            Some(RunningStats {
                mean: Var::from_tensor(&mean)?.as_tensor().clone(),
                var: Var::from_tensor(&var)?.as_tensor().clone(),
                num_batches_tracked: Var::from_tensor(&nbt)?.as_tensor().clone(),
            })
        } else {
            None
        };
        Ok(Self {
            id: group.register_layer(&name),
            calls: Arc::new(AtomicU64::new(0)),
            name,
            num_features,
            config,
            weight_and_bias,
            running,
            group,
            precise: Default::default(),
            eval_only: Default::default(),
        })
    }

    /// Builds a layer from existing tensors (used by the conversion helpers in
    /// [`crate::convert`]).
    ///
    /// `weight_and_bias` are kept as given (the same tensors, so an optimizer
    /// holding them as variables keeps training them). `running` is
    /// `(running_mean, running_var, num_batches_tracked)`: tensors that are
    /// already variables are shared (updates are visible to every holder),
    /// others are copied into new variables. Shapes and dtypes are checked.
    pub(crate) fn from_parts(
        name: String,
        num_features: usize,
        config: SyncBatchNormConfig,
        weight_and_bias: Option<(Tensor, Tensor)>,
        running: Option<(Tensor, Tensor, Tensor)>,
        group: ProcessGroup,
    ) -> Result<Self> {
        config.validate(&name)?;
        if num_features == 0 {
            bail_input!("SyncBatchNorm '{name}': num_features must be at least 1")
        }
        if config.affine != weight_and_bias.is_some() {
            bail_input!(
                "SyncBatchNorm '{name}': affine is {} but weight and bias were {}given",
                config.affine,
                if weight_and_bias.is_some() {
                    ""
                } else {
                    "not "
                }
            )
        }
        if config.track_running_stats != running.is_some() {
            bail_input!(
                "SyncBatchNorm '{name}': track_running_stats is {} but running statistics were {}given",
                config.track_running_stats,
                if running.is_some() { "" } else { "not " }
            )
        }
        let expect = |what: &str, t: &Tensor, dims: &[usize], float: bool| -> Result<()> {
            if t.dims() != dims {
                bail_input!(
                    "SyncBatchNorm '{name}': expected {what} of shape {dims:?}, got {:?}",
                    t.dims()
                )
            }
            if float && !t.dtype().is_float() {
                bail_input!(
                    "SyncBatchNorm '{name}': expected a float {what}, got {:?}",
                    t.dtype()
                )
            }
            Ok(())
        };
        if let Some((w, b)) = &weight_and_bias {
            expect("weight", w, &[num_features], true)?;
            expect("bias", b, &[num_features], true)?;
        }
        let running = match running {
            Some((mean, var, nbt)) => {
                expect("running_mean", &mean, &[num_features], true)?;
                expect("running_var", &var, &[num_features], true)?;
                expect("num_batches_tracked", &nbt, &[], false)?;
                Some(RunningStats {
                    mean: Var::from_tensor(&mean)?.as_tensor().clone(),
                    var: Var::from_tensor(&var)?.as_tensor().clone(),
                    num_batches_tracked: Var::from_tensor(&nbt)?.as_tensor().clone(),
                })
            }
            None => None,
        };
        Ok(Self {
            id: group.register_layer(&name),
            calls: Arc::new(AtomicU64::new(0)),
            name,
            num_features,
            config,
            weight_and_bias,
            running,
            group,
            precise: Default::default(),
            eval_only: Default::default(),
        })
    }

    /// The number of channels.
    pub fn num_features(&self) -> usize {
        self.num_features
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &SyncBatchNormConfig {
        &self.config
    }

    /// The group the statistics are synchronized over.
    pub fn group(&self) -> &ProcessGroup {
        &self.group
    }

    /// The layer's name (its `VarBuilder` prefix), used in error messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The layer renamed `name` (for messages and for the call tags that
    /// the groups compare across ranks): give layers made by
    /// [`SyncBatchNorm::from_batch_norm`], which are named after their
    /// channel count only, their model path, so that errors name them.
    /// Ranks tell layers of one name apart by the order they were built or
    /// renamed in (see [`CallTag`]), so every rank must rename the same
    /// layers to the same names in the same order.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self.id = self.group.register_layer(&self.name);
        self
    }

    /// The weight and bias, when `affine`.
    pub fn weight_and_bias(&self) -> Option<(&Tensor, &Tensor)> {
        self.weight_and_bias.as_ref().map(|(w, b)| (w, b))
    }

    /// The `eps` added to the variance.
    pub fn eps(&self) -> f64 {
        self.config.eps
    }

    /// The configured momentum (`None`: cumulative moving average).
    pub fn momentum(&self) -> Option<f64> {
        self.config.momentum
    }

    /// The running mean: the variable itself, which training updates in
    /// place (`.copy()` it for a snapshot); `None` exactly when the layer
    /// does not track running statistics.
    pub fn running_mean(&self) -> Option<&Tensor> {
        self.running.as_ref().map(|r| &r.mean)
    }

    /// The running (unbiased) variance: the variable itself, as
    /// [`running_mean`](Self::running_mean).
    pub fn running_var(&self) -> Option<&Tensor> {
        self.running.as_ref().map(|r| &r.var)
    }

    /// The number of training batches seen (0 without `track_running_stats`).
    /// Reads the counter variable (on a GPU this copies one value to the
    /// host); an error when it cannot be read or does not hold one whole
    /// number ≥ 0 (a checkpoint's counter, say).
    pub fn num_batches_tracked(&self) -> Result<u64> {
        match &self.running {
            Some(r) => crate::ops::counter_value(
                &r.num_batches_tracked,
                &format_args!("SyncBatchNorm '{}'", self.name),
            ),
            None => Ok(0),
        }
    }

    /// Makes `counter` (an i64 scalar variable) the layer's
    /// `num_batches_tracked`; an error without running statistics.
    pub(crate) fn replace_counter(&mut self, counter: Tensor) -> Result<()> {
        let name = &self.name;
        let Some(r) = &mut self.running else {
            candle::bail!(
                "SyncBatchNorm '{name}': no running statistics (track_running_stats: false), so no num_batches_tracked to register"
            )
        };
        if !counter.dims().is_empty() || counter.dtype() != DType::I64 {
            candle::bail!(
                "SyncBatchNorm '{name}': expected num_batches_tracked as an i64 scalar, got shape {:?} and dtype {:?}",
                counter.dims(),
                counter.dtype()
            )
        }
        r.num_batches_tracked = Var::from_tensor(&counter)?.as_tensor().clone();
        Ok(())
    }

    /// PyTorch's `reset_running_stats()`: `running_mean` to 0, `running_var`
    /// to 1 and `num_batches_tracked` to 0, written in place, so that every
    /// holder of these variables (the `VarMap`, clones of the layer) sees
    /// them. Nothing to do without `track_running_stats`.
    pub fn reset_running_stats(&self) -> Result<()> {
        let Some(r) = &self.running else {
            return Ok(());
        };
        self.set_variable("running_mean", &r.mean, &r.mean.zeros_like()?)?;
        self.set_variable("running_var", &r.var, &r.var.ones_like()?)?;
        self.set_variable(
            "num_batches_tracked",
            &r.num_batches_tracked,
            &r.num_batches_tracked.zeros_like()?,
        )
    }

    /// PyTorch's `reset_parameters()`: [`Self::reset_running_stats`], then,
    /// with `affine`, `weight` to 1 and `bias` to 0, in place.
    ///
    /// Errors, changing nothing, when one of them is not a variable (a layer
    /// built from a `VarBuilder` over a file rather than a `VarMap`): a copy
    /// could be reset, but the layer would not see it.
    pub fn reset_parameters(&self) -> Result<()> {
        if let Some((w, b)) = &self.weight_and_bias {
            for (what, t) in [("weight", w), ("bias", b)] {
                self.require_variable(what, t)?;
            }
        }
        self.reset_running_stats()?;
        if let Some((w, b)) = &self.weight_and_bias {
            self.set_variable("weight", w, &w.ones_like()?)?;
            self.set_variable("bias", b, &b.zeros_like()?)?;
        }
        Ok(())
    }

    fn require_variable(&self, what: &str, t: &Tensor) -> Result<()> {
        if t.is_variable() {
            return Ok(());
        }
        bail_input!(
            "SyncBatchNorm '{}': {what} is not a variable (the layer was built from a VarBuilder over a file, not a VarMap), so it cannot be reset in place",
            self.name
        )
    }

    /// Writes `value` into the variable `t` in place.
    fn set_variable(&self, what: &str, t: &Tensor, value: &Tensor) -> Result<()> {
        self.require_variable(what, t)?;
        Var::from_tensor(t)?.set(value)
    }

    /// Checks the input against the layer and returns the tensor the ops run on
    /// with its channel axis, and the permutation to restore the output (for
    /// channels-last inputs).
    fn prepare_input(&self, x: &Tensor) -> Result<(Tensor, usize, Option<Vec<usize>>)> {
        let name = &self.name;
        let dims = x.dims();
        if !(2..=5).contains(&dims.len()) {
            bail_input!(
                "SyncBatchNorm '{name}': expected an input of rank 2 to 5, (N, C, *), got shape {dims:?} (rank {})",
                dims.len()
            )
        }
        if dims[1] != self.num_features {
            bail_input!(
                "SyncBatchNorm '{name}': expected {} channels (dim 1), got shape {dims:?} with {} channels",
                self.num_features,
                dims[1]
            )
        }
        let dtype = x.dtype();
        if !matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
            bail_input!(
                "SyncBatchNorm '{name}': expected an f32, f64, f16 or bf16 input, got {dtype:?}"
            )
        }
        let params = self
            .weight_and_bias
            .iter()
            .flat_map(|(w, b)| [("weight", w), ("bias", b)]);
        let stats = self
            .running
            .iter()
            .flat_map(|r| [("running_mean", &r.mean), ("running_var", &r.var)]);
        for (what, t) in params.clone().chain(stats) {
            if !t.device().same_device(x.device()) {
                bail_input!(
                    "SyncBatchNorm '{name}': input is on {:?} but {what} is on {:?}",
                    x.device().location(),
                    t.device().location()
                )
            }
            if t.dims() != [self.num_features] {
                bail_input!(
                    "SyncBatchNorm '{name}': expected {what} of shape [{}], got {:?}",
                    self.num_features,
                    t.dims()
                )
            }
        }
        for (what, t) in params {
            if t.dtype() != dtype && t.dtype() != DType::F32 {
                bail_input!(
                    "SyncBatchNorm '{name}': {what} must have the input's dtype {dtype:?} or f32, got {:?}",
                    t.dtype()
                )
            }
        }
        let rank = dims.len();
        if rank >= 3 && !x.is_contiguous() {
            let perm: Vec<usize> = std::iter::once(0)
                .chain(2..rank)
                .chain(std::iter::once(1))
                .collect();
            let permuted = x.permute(perm.as_slice())?;
            if permuted.is_contiguous() {
                let mut inverse = vec![0; rank];
                for (i, &p) in perm.iter().enumerate() {
                    inverse[p] = i;
                }
                return Ok((permuted, rank - 1, Some(inverse)));
            }
        }
        Ok((crate::ops::viewable(x, 1)?, 1, None))
    }

    /// Normalizes `x` with the given moments (see [`BatchNormOp`]), adding
    /// `residual` (see [`BatchNormAddOp`]).
    #[allow(clippy::too_many_arguments)]
    fn normalize(
        &self,
        x: &Tensor,
        axis: usize,
        (moments, coefficients): (Tensor, Option<Tensor>),
        batch_stats: bool,
        group: ProcessGroup,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        let op = BatchNormOp {
            axis,
            moments,
            batch_stats,
            group,
            relu,
            layer: self.name.clone(),
            coefficients,
        };
        match (&self.weight_and_bias, residual) {
            (Some((w, b)), None) => x.apply_op3(w, b, op),
            (None, None) => x.apply_op1(op),
            (Some((w, b)), Some(z)) => {
                // One (2, C) input for both (custom ops take three inputs).
                let wb = w.apply_op2(b, StackParams)?;
                x.apply_op3(z, &wb, BatchNormAddOp { norm: op })
            }
            (None, Some(z)) => x.apply_op2(z, BatchNormAddOp { norm: op }),
        }
    }

    /// Checks a residual against the input `x` (before any permutation) and
    /// returns it in the layout the ops take: permuted like `x` for a
    /// channels-last input (`restore` is the inverse permutation).
    fn prepare_residual(
        &self,
        x: &Tensor,
        z: &Tensor,
        axis: usize,
        restore: Option<&[usize]>,
    ) -> Result<Tensor> {
        let name = &self.name;
        if z.dims() != x.dims() || z.dtype() != x.dtype() {
            bail_input!(
                "SyncBatchNorm '{name}': expected a residual of the input's shape {:?} and dtype {:?}, got shape {:?} and dtype {:?}",
                x.dims(),
                x.dtype(),
                z.dims(),
                z.dtype()
            )
        }
        if !z.device().same_device(x.device()) {
            bail_input!(
                "SyncBatchNorm '{name}': input is on {:?} but the residual is on {:?}",
                x.device().location(),
                z.device().location()
            )
        }
        let z = match restore {
            Some(inverse) => {
                let mut perm = vec![0; inverse.len()];
                for (i, &p) in inverse.iter().enumerate() {
                    perm[p] = i;
                }
                z.permute(perm.as_slice())?
            }
            None => z.clone(),
        };
        crate::ops::viewable(&z, axis)
    }

    /// On a GPU, the forward's per-channel coefficients to compute with the
    /// moments, in the same launch (the normalization then reads them
    /// instead of launching their own kernel); `None` on the CPU, which
    /// computes its own, and when the op with a residual normalizes with a
    /// weight and bias of different dtypes (it sees both converted to f32).
    fn coefficients_for(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
    ) -> Option<ForwardCoefficients> {
        if !x.device().is_cuda() {
            return None;
        }
        match &self.weight_and_bias {
            Some((w, b)) if residual.is_some() && w.dtype() != b.dtype() => None,
            Some((w, b)) => Some(ForwardCoefficients {
                input: x.dtype(),
                weight: Some(w.detach()),
                bias: Some(b.detach()),
            }),
            None => Some(ForwardCoefficients {
                input: x.dtype(),
                weight: None,
                bias: None,
            }),
        }
    }

    /// Training forward (or eval without running statistics, `sync = false`).
    fn forward_batch_stats(
        &self,
        x: &Tensor,
        axis: usize,
        sync: bool,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        let name = &self.name;
        let local = x.apply_op1_no_bwd(&BatchStats { axis })?;
        let group = if sync {
            let [tag] = self.next_call_tags([Part::Statistics]);
            self.group.with_tag(tag)
        } else {
            ProcessGroup::single()
        };
        let sums = group.all_reduce_sum(&local).map_err(|e| {
            crate::error::keep_kind(
                &e,
                format!("SyncBatchNorm '{name}': all-reduce of the batch statistics failed: {e}"),
            )
        })?;
        let local_count = x.elem_count() / self.num_features;
        if local_count <= 1 {
            // Only a rank with at most one value per channel needs the global
            // count (a copy to the host); every rank of a group with a global
            // count ≤ 1 takes this branch, so they all fail alike.
            let global = sums
                .get(0)?
                .get(0)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            if global <= 1.0 {
                bail_input!(
                    "SyncBatchNorm '{name}': expected more than 1 value per channel when training, got {} over {} rank(s) (input shape {:?})",
                    global as u64,
                    group.world_size(),
                    x.dims()
                )
            }
        }
        if sync {
            self.note_precise_batch(|| sums.get(0))?;
        }
        // Training updates the running statistics (and the counter) in the
        // pass that computes the moments: one launch on a GPU.
        let running = match (&self.running, sync) {
            (Some(r), true) => Some(RunningTensors {
                mean: r.mean.clone(),
                var: r.var.clone(),
                num_batches_tracked: r.num_batches_tracked.clone(),
                momentum: self.update_momentum(),
            }),
            _ => None,
        };
        let moments = match self.coefficients_for(x, residual) {
            Some(request) => {
                let (moments, coef) = BatchMoments::apply_with_coefficients(
                    &sums,
                    self.config.eps,
                    running.as_ref(),
                    &request,
                )?;
                (moments, Some(coef))
            }
            None => (
                BatchMoments::apply(&sums, self.config.eps, running.as_ref())?,
                None,
            ),
        };
        // The backward pass's all-reduce: the same call's counterpart.
        let group = group.with_tag(group.tag().backward());
        self.normalize(x, axis, moments, true, group, residual, relu)
    }

    /// Notes the mode of a forward; prints, once per layer, the warning for
    /// a synchronized layer that has only ever run in eval mode.
    fn note_mode(&self, train: bool) {
        if let Some(warning) = self
            .eval_only
            .note(train, &self.name, self.group.world_size())
        {
            eprintln!("{warning}");
        }
    }

    /// The tags of the next synchronized call's forward collectives, one
    /// per part in `parts` (counts the call).
    fn next_call_tags<const N: usize>(&self, parts: [Part; N]) -> [CallTag; N] {
        let index = self.calls.fetch_add(1, Ordering::Relaxed);
        parts.map(|part| CallTag::forward(self.id, part, index))
    }

    /// The forward pass, with a residual added and the ReLU fused in or not.
    fn forward_impl(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        train: bool,
        relu: bool,
    ) -> Result<Tensor> {
        self.note_mode(train);
        let (xv, axis, restore) = self.prepare_input(x)?;
        let z = match residual {
            Some(z) => Some(self.prepare_residual(x, z, axis, restore.as_deref())?),
            None => None,
        };
        if !crate::ops::has_kernels(x.device()) {
            return self.forward_composite(x, residual, train, relu);
        }
        let z = z.as_ref();
        let y = match (&self.running, train) {
            (_, true) => self.forward_batch_stats(&xv, axis, true, z, relu)?,
            (None, false) => self.forward_batch_stats(&xv, axis, false, z, relu)?,
            (Some(r), false) => {
                let eps = self.config.eps;
                let moments = match self.coefficients_for(&xv, z) {
                    Some(request) => {
                        let (moments, coef) =
                            Moments::running_with_coefficients(&r.mean, &r.var, eps, &request)?;
                        (moments, Some(coef))
                    }
                    None => (r.mean.apply_op2_no_bwd(&r.var, &Moments { eps })?, None),
                };
                let single = ProcessGroup::single();
                self.normalize(&xv, axis, moments, false, single, z, relu)?
            }
        };
        match restore {
            Some(inverse) => y.permute(inverse.as_slice()),
            None => Ok(y),
        }
    }

    /// `relu(self.forward_t(x, train))` in one op: the ReLU is applied by the
    /// normalization pass itself, and backward both passes mask the incoming
    /// gradient where the output was not positive, recomputing it from `x`
    /// with the forward's arithmetic. The pair moves the bytes of
    /// `forward_t` alone in both directions, and candle keeps one activation
    /// for both instead of two (apex's `fuse_relu`).
    ///
    /// Same numbers as the two ops apart from ties at zero: the ReLU is
    /// applied before the output is rounded to a half dtype, and the gradient
    /// passes where the output is positive (PyTorch's rule for `relu`; candle's
    /// own `relu` also passes it where the output is exactly 0). NaN stays NaN.
    ///
    /// ```
    /// use candle::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
    ///
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// let bn = SyncBatchNorm::new(3, SyncBatchNormConfig::default(), vb.pp("bn1"), ProcessGroup::single())?;
    /// let x = Tensor::randn(0f32, 1.0, (4, 3, 5, 5), &Device::Cpu)?;
    /// let y = bn.forward_relu_t(&x, true)?;
    /// assert!(y.flatten_all()?.min(0)?.to_scalar::<f32>()? >= 0.0);
    /// # Ok::<(), candle::Error>(())
    /// ```
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(x, None, train, true)
    }

    /// `relu(self.forward_t(x, train) + residual)` in one op: the end of a
    /// ResNet block, where the block's last batch norm meets the shortcut
    /// (apex's `SyncBatchNorm` with `z`). `residual` has `x`'s shape and
    /// dtype, any strides.
    ///
    /// The normalization pass reads the residual, adds it and clamps, in f32
    /// for half inputs, rounding once; backward, the masked incoming gradient
    /// is the residual's gradient as it is, so the addition costs no pass of
    /// its own in either direction (three element-wise ops and their
    /// gradient bookkeeping fewer than `forward_t`, `+` and `relu`).
    ///
    /// ```
    /// use candle::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
    ///
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// let bn3 = SyncBatchNorm::new(8, SyncBatchNormConfig::default(), vb.pp("bn3"), ProcessGroup::single())?;
    /// let identity = Tensor::randn(0f32, 1.0, (2, 8, 4, 4), &Device::Cpu)?;
    /// let branch = Tensor::randn(0f32, 1.0, (2, 8, 4, 4), &Device::Cpu)?; // conv3's output
    /// let out = bn3.forward_add_relu_t(&branch, &identity, true)?;
    /// assert_eq!(out.dims(), identity.dims());
    /// # Ok::<(), candle::Error>(())
    /// ```
    pub fn forward_add_relu_t(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(x, Some(residual), train, true)
    }

    /// The layer computed with candle's own tensor ops instead of this
    /// crate's kernels: `relu(forward_t(x) + residual)`, without the ReLU
    /// when `relu` is false and without the sum when `residual` is `None`.
    ///
    /// This is what every forward method runs on devices this crate has no
    /// kernels for (Metal, …), so the layer works wherever candle does. It
    /// has the same semantics: batch statistics over the group in training,
    /// the same running-statistics update, eval with running statistics, and
    /// a synchronized backward through candle's autograd (the all-reduces are
    /// [`all_reduce_sum_with_grad`](crate::ops::all_reduce_sum_with_grad)).
    /// It is slower: about ten passes over the input forward and more
    /// backward, two all-reduces per pass instead of one, through the host
    /// when the world size is above 1, and candle's gradient bookkeeping for
    /// each op. Statistics are computed in f32 (f64 for f64 inputs) in two
    /// passes, the second on centered values.
    ///
    /// On the CPU and CUDA it serves as an independent reference for the
    /// kernels (the tests compare the two).
    ///
    /// ```
    /// use candle::{DType, Device, Tensor};
    /// use candle_nn::{ModuleT, VarBuilder, VarMap};
    /// use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
    ///
    /// let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    /// let bn = SyncBatchNorm::new(3, SyncBatchNormConfig::default(), vb, ProcessGroup::single())?;
    /// let x = Tensor::randn(0f32, 1.0, (4, 3, 5, 5), &Device::Cpu)?;
    /// let kernels = bn.forward_t(&x, false)?;
    /// let composed = bn.forward_composite_t(&x, None, false, false)?;
    /// let diff = (kernels - composed)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    /// assert!(diff < 1e-5);
    /// # Ok::<(), candle::Error>(())
    /// ```
    pub fn forward_composite_t(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
        train: bool,
    ) -> Result<Tensor> {
        self.note_mode(train);
        let (_, axis, restore) = self.prepare_input(x)?;
        if let Some(z) = residual {
            self.prepare_residual(x, z, axis, restore.as_deref())?;
        }
        self.forward_composite(x, residual, train, relu)
    }
}

impl candle_nn::ModuleT for SyncBatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(x, None, train, false)
    }
}

/// The layer's name for messages: the `VarBuilder` prefix, or "(root)".
fn layer_name(vb: &VarBuilder) -> String {
    let p = vb.prefix();
    if p.is_empty() {
        "(root)".to_string()
    } else {
        p
    }
}
