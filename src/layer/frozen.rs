//! `FrozenBatchNorm`: batch normalization with fixed statistics and
//! parameters (detectron2's `FrozenBN`, torchvision's
//! `ops.FrozenBatchNorm2d`), running on the eval path of the kernels.

use super::SyncBatchNorm;
use crate::error::bail_input;
use crate::{ProcessGroup, SyncBatchNormConfig};
use candle::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// Batch normalization frozen to a fixed per-channel affine map,
/// `y = (x − running_mean) / √(running_var + eps) · weight + bias`, in
/// training as in eval: no batch statistics, no running-statistics update,
/// no trainable parameters, no communication. What detection and
/// segmentation models use for a pretrained backbone trained with small
/// per-GPU batches.
///
/// It computes exactly what a [`SyncBatchNorm`] computes in eval mode (the
/// same kernels on the CPU and CUDA, including the fused
/// [`forward_relu_t`](Self::forward_relu_t) and
/// [`forward_add_relu_t`](Self::forward_add_relu_t)), whatever `train` says.
/// The gradient flows to the input (and the residual) only.
///
/// Variables keep PyTorch's names (`weight`, `bias`, `running_mean`,
/// `running_var`), so a checkpoint of a trained BatchNorm loads unchanged;
/// `num_batches_tracked` is accepted and ignored (like torchvision's).
///
/// # Why an optimizer cannot change it
///
/// The layer holds its tensors *detached*: not variables, so no gradient is
/// ever computed for them. candle-nn's optimizers (`SGD`, `AdamW`) only
/// update a variable that has a gradient, and
/// [`average_gradients`](crate::data_parallel::average_gradients) leaves
/// variables without a gradient alone: an optimizer over
/// `varmap.all_vars()` leaves a frozen layer bit for bit as it was.
///
/// - Built from a `VarBuilder` ([`new`](Self::new), or the
///   [`BatchNormRewriter`](crate::BatchNormRewriter)), the tensors are
///   detached *views* of the builder's tensors. Over a `VarMap` they share
///   its variables' storage, so loading a checkpoint into the map after
///   building the model (`varmap.load`,
///   [`load_checkpoint`](crate::convert::checkpoint::load_checkpoint)) or
///   [`broadcast_varmap`](crate::data_parallel::broadcast_varmap) reaches
///   the frozen layer, and `varmap.save` writes its values. Only code that
///   writes the map's variables itself changes it.
/// - Converted from a built layer ([`from_batch_norm`](Self::from_batch_norm),
///   [`SyncBatchNorm::to_frozen`]), the tensors are copies, taken at the
///   conversion (torchvision's `convert_frozen_batchnorm`): later training
///   of the source layer does not reach the frozen one.
///
/// ```
/// use candle::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_syncbn::FrozenBatchNorm;
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let bn = FrozenBatchNorm::new(3, 1e-5, vb.pp("backbone.bn1"))?;
/// let x = Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &Device::Cpu)?;
/// // Fresh statistics (mean 0, var 1) and parameters (1, 0): y = x / √(1 + eps).
/// let diff = (bn.forward(&x)? - (&x * (1.0 / (1.0f64 + 1e-5).sqrt()))?)?;
/// assert!(diff.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? < 1e-6);
/// # Ok::<(), candle::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct FrozenBatchNorm {
    /// The variable prefix, for [`Self::name`].
    path: String,
    /// A layer with running statistics, only ever run in eval mode.
    inner: SyncBatchNorm,
}

impl FrozenBatchNorm {
    /// A frozen layer for `num_features` channels from the variables under
    /// `vb` (`weight` and `bias` when `config.affine`, `running_mean`,
    /// `running_var`; `num_batches_tracked` is read only so that a `VarMap`
    /// holds the same keys as for the other layers, and then ignored). Same
    /// arguments as [`SyncBatchNorm::new`] without the group; `momentum` is
    /// kept (see [`config`](Self::config)) but not used. Running statistics
    /// are f32 when `vb`'s dtype is f16/bf16, as in [`SyncBatchNorm::new`].
    ///
    /// Errors on missing or mis-shaped variables and on
    /// `track_running_stats: false` (the map is made of the running
    /// statistics).
    pub fn new<C: Into<SyncBatchNormConfig>>(
        num_features: usize,
        config: C,
        vb: VarBuilder,
    ) -> Result<Self> {
        let config = config.into();
        let path = vb.prefix();
        if !config.track_running_stats {
            bail_input!(
                "FrozenBatchNorm '{}': track_running_stats: false is not supported (a frozen layer applies the running statistics); expected track_running_stats: true",
                display_path(&path)
            )
        }
        let weight_and_bias = if config.affine {
            let w = vb.get_with_hints(num_features, "weight", Init::Const(1.0))?;
            let b = vb.get_with_hints(num_features, "bias", Init::Const(0.0))?;
            Some((w.detach(), b.detach()))
        } else {
            None
        };
        let dtype = match vb.dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        let mean =
            vb.get_with_hints_dtype(num_features, "running_mean", Init::Const(0.0), dtype)?;
        let var = vb.get_with_hints_dtype(num_features, "running_var", Init::Const(1.0), dtype)?;
        // Accepted and ignored: created in a VarMap (same keys as the other
        // layers, so one checkpoint fits every choice), never read.
        let _ = vb.get_with_hints_dtype((), "num_batches_tracked", Init::Const(0.0), DType::I64);
        Self::from_tensors(
            path,
            num_features,
            config,
            weight_and_bias,
            mean.detach(),
            var.detach(),
        )
    }

    /// A frozen copy of a trained `candle_nn::BatchNorm`: its running
    /// statistics, weight and bias (copied now) and `eps`.
    ///
    /// Errors if `bn` was built with `remove_mean: false`.
    pub fn from_batch_norm(bn: &candle_nn::BatchNorm) -> Result<Self> {
        let mean = bn.running_mean();
        let num_features = match mean.dims() {
            [c] => *c,
            dims => bail_input!(
                "FrozenBatchNorm::from_batch_norm: expected a running_mean of shape [C], got {dims:?}"
            ),
        };
        let path = format!("frozen candle_nn::BatchNorm({num_features})");
        if crate::config::keeps_mean(bn) {
            bail_input!(
                "FrozenBatchNorm '{path}': cannot freeze a candle_nn::BatchNorm with remove_mean: false; expected remove_mean: true"
            )
        }
        let weight_and_bias = match bn.weight_and_bias() {
            Some((w, b)) => Some((w.detach().copy()?, b.detach().copy()?)),
            None => None,
        };
        let (mean, var) = (mean.detach().copy()?, bn.running_var().detach().copy()?);
        let config = SyncBatchNormConfig::from(bn.eps()).with_momentum(Some(bn.momentum()));
        Self::from_tensors(path, num_features, config, weight_and_bias, mean, var)
    }

    /// Builds the layer around tensors it keeps as they are (detached);
    /// `config`'s `affine` and `track_running_stats` follow the tensors.
    fn from_tensors(
        path: String,
        num_features: usize,
        config: SyncBatchNormConfig,
        weight_and_bias: Option<(Tensor, Tensor)>,
        mean: Tensor,
        var: Tensor,
    ) -> Result<Self> {
        let config = config
            .with_affine(weight_and_bias.is_some())
            .with_track_running_stats(true);
        let nbt = Tensor::zeros((), DType::I64, mean.device())?;
        let inner = SyncBatchNorm::from_frozen_parts(
            format!("{} (frozen)", display_path(&path)),
            num_features,
            config,
            weight_and_bias,
            (mean, var, nbt),
        )?;
        Ok(Self { path, inner })
    }

    /// The number of channels.
    pub fn num_features(&self) -> usize {
        self.inner.num_features()
    }

    /// The configuration it was built with (`affine` as built,
    /// `track_running_stats` always true).
    pub fn config(&self) -> &SyncBatchNormConfig {
        self.inner.config()
    }

    /// The `eps` added to the running variance.
    pub fn eps(&self) -> f64 {
        self.inner.eps()
    }

    /// The momentum it was built with; a frozen layer never updates its
    /// statistics, so it is not used.
    pub fn momentum(&self) -> Option<f64> {
        self.inner.momentum()
    }

    /// The layer's name (its variable prefix), used in error messages.
    pub fn name(&self) -> &str {
        display_path(&self.path)
    }

    /// The weight and bias (detached), when affine.
    pub fn weight_and_bias(&self) -> Option<(&Tensor, &Tensor)> {
        self.inner.weight_and_bias()
    }

    /// The running mean the map subtracts (detached; always `Some`: the
    /// `Option` is the type every layer returns).
    pub fn running_mean(&self) -> Option<&Tensor> {
        self.inner.running_mean()
    }

    /// The running variance the map divides by (detached; always `Some`).
    pub fn running_var(&self) -> Option<&Tensor> {
        self.inner.running_var()
    }

    /// Always 0: a frozen layer counts no batches (a checkpoint's counter is
    /// accepted and ignored). A `Result` like every layer's.
    pub fn num_batches_tracked(&self) -> Result<u64> {
        Ok(0)
    }

    /// The running mean and variance, for the map.
    fn statistics(&self) -> Result<(&Tensor, &Tensor)> {
        match (self.running_mean(), self.running_var()) {
            (Some(m), Some(v)) => Ok((m, v)),
            _ => bail_input!("FrozenBatchNorm '{}': no running statistics", self.name()),
        }
    }

    /// The fixed per-channel affine map the layer applies, `(scale, shift)`
    /// in f64 on the layer's device: `scale = weight / √(running_var + eps)`,
    /// `shift = bias − running_mean · scale`.
    pub fn scale_and_shift(&self) -> Result<(Tensor, Tensor)> {
        let (mean, var) = self.statistics()?;
        let (mean, var) = (mean.to_dtype(DType::F64)?, var.to_dtype(DType::F64)?);
        let mut scale = var.affine(1.0, self.eps())?.sqrt()?.recip()?;
        let mut shift = mean.neg()?.mul(&scale)?;
        if let Some((w, b)) = self.weight_and_bias() {
            scale = scale.mul(&w.to_dtype(DType::F64)?)?;
            shift = shift
                .mul(&w.to_dtype(DType::F64)?)?
                .add(&b.to_dtype(DType::F64)?)?;
        }
        Ok((scale, shift))
    }

    /// `relu(self.forward(x))` in one op (see [`SyncBatchNorm::forward_relu_t`]);
    /// `train` is ignored.
    pub fn forward_relu_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        self.inner.forward_impl(x, None, false, true)
    }

    /// `relu(self.forward(x) + residual)` in one op (see
    /// [`SyncBatchNorm::forward_add_relu_t`]); `train` is ignored.
    pub fn forward_add_relu_t(
        &self,
        x: &Tensor,
        residual: &Tensor,
        _train: bool,
    ) -> Result<Tensor> {
        self.inner.forward_impl(x, Some(residual), false, true)
    }
}

/// The frozen affine map (`ModuleT` comes with it, ignoring `train`).
impl candle::Module for FrozenBatchNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.forward_impl(x, None, false, false)
    }
}

impl SyncBatchNorm {
    /// A frozen copy of this layer: its running statistics, weight and bias
    /// (copied now) and `eps`, as a fixed affine map (detectron2's
    /// `FrozenBatchNorm2d.convert_frozen_batchnorm` for one layer).
    ///
    /// Errors if the layer does not track running statistics (there is
    /// nothing to freeze).
    pub fn to_frozen(&self) -> Result<FrozenBatchNorm> {
        let Some((mean, var, _)) = self.running_variables() else {
            bail_input!(
                "SyncBatchNorm '{}': cannot freeze a layer without running statistics (track_running_stats: false)",
                self.name()
            )
        };
        let weight_and_bias = match self.weight_and_bias() {
            Some((w, b)) => Some((w.detach().copy()?, b.detach().copy()?)),
            None => None,
        };
        FrozenBatchNorm::from_tensors(
            self.name().to_string(),
            self.num_features(),
            *self.config(),
            weight_and_bias,
            mean.copy()?,
            var.copy()?,
        )
    }

    /// The inner layer of a [`FrozenBatchNorm`]: the tensors are kept as
    /// given (not made variables), on a single-rank group.
    fn from_frozen_parts(
        name: String,
        num_features: usize,
        config: SyncBatchNormConfig,
        weight_and_bias: Option<(Tensor, Tensor)>,
        (mean, var, nbt): (Tensor, Tensor, Tensor),
    ) -> Result<Self> {
        // Checks the shapes and dtypes, then keeps the given tensors
        // (`from_parts` copies non-variables into new variables).
        let mut layer = Self::from_parts(
            name,
            num_features,
            config,
            weight_and_bias,
            Some((mean.clone(), var.clone(), nbt.clone())),
            ProcessGroup::single(),
        )?;
        layer.running = Some(super::RunningStats {
            mean,
            var,
            num_batches_tracked: nbt,
        });
        Ok(layer)
    }
}

/// A variable prefix for messages ("(root)" when empty).
fn display_path(path: &str) -> &str {
    if path.is_empty() {
        "(root)"
    } else {
        path
    }
}
