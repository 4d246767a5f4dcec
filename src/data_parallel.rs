//! What a data-parallel training loop needs besides `SyncBatchNorm`, since
//! candle has no DDP: start every rank from rank 0's variables
//! ([`broadcast_varmap`]), average the gradients over the ranks before the
//! optimizer step, in a few large bucketed all-reduces rather than one call
//! per tensor ([`GradientAverager`], kept across steps: no host
//! synchronization after the first step; or [`average_gradients`], which
//! agrees on the variables to average on every call), and write checkpoints
//! atomically ([`save_varmap_atomic`]).
//!
//! Variables are visited in the order of their names, so every rank makes the
//! same calls whatever the order of the `VarMap`'s hash map.

use crate::grad_pack::{buckets, sorted_vars, unflatten, DEFAULT_BUCKET_BYTES};
use crate::ProcessGroup;
use candle::{DType, Result, Tensor};
use candle_nn::VarMap;
use std::path::Path;

pub use crate::grad_average::{AverageOptions, GradientAverager};

/// Sets every variable of `varmap` to its value on rank `root` (all ranks
/// must hold the same variables), in a few bucketed broadcasts.
pub fn broadcast_varmap(varmap: &VarMap, group: &ProcessGroup, root: usize) -> Result<()> {
    if group.world_size() == 1 {
        return Ok(());
    }
    let vars = sorted_vars(varmap);
    let items: Vec<(DType, usize)> = vars
        .iter()
        .map(|(_, v)| (v.dtype(), v.elem_count() * v.dtype().size_in_bytes()))
        .collect();
    for range in buckets(&items, DEFAULT_BUCKET_BYTES) {
        let part = &vars[range];
        let flat: Vec<Tensor> = part
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all())
            .collect::<Result<_>>()?;
        let flat = Tensor::cat(&flat, 0)?;
        let out = group.broadcast(&flat, root)?;
        let shapes: Vec<&candle::Shape> = part.iter().map(|(_, v)| v.shape()).collect();
        for ((name, var), value) in part.iter().zip(unflatten(&out, &shapes)?) {
            var.set(&value).map_err(|e| {
                candle::Error::Msg(format!("broadcast_varmap: setting '{name}' failed: {e}"))
            })?;
        }
    }
    Ok(())
}

/// Replaces each gradient in `grads` of a floating-point variable of `varmap`
/// by its average over the ranks of `group`, with buckets of 25 MiB, as
/// PyTorch's DDP (see [`average_gradients_with`]).
pub fn average_gradients(
    varmap: &VarMap,
    grads: &mut candle::backprop::GradStore,
    group: &ProcessGroup,
) -> Result<()> {
    average_gradients_with(varmap, grads, group, &AverageOptions::default())
}

/// Like [`average_gradients`] with buckets of at most `bucket_bytes`.
pub fn average_gradients_bucketed(
    varmap: &VarMap,
    grads: &mut candle::backprop::GradStore,
    group: &ProcessGroup,
    bucket_bytes: usize,
) -> Result<()> {
    let options = AverageOptions {
        bucket_bytes,
        ..AverageOptions::default()
    };
    average_gradients_with(varmap, grads, group, &options)
}

/// Replaces each gradient in `grads` of a floating-point variable of `varmap`
/// by its average over the ranks of `group`, agreeing with the other ranks
/// on which variables have gradients on every call.
///
/// The floating-point variables are taken in name order; a variable that has
/// a gradient on some rank but not on this one (e.g. a branch this rank did
/// not take) counts as a zero gradient here, and one without a gradient on
/// any rank (running statistics, frozen weights) is left alone. Finding that
/// out costs one small all-reduce whose result the host reads: a host
/// synchronization (on a GPU, a wait for everything enqueued so far) on
/// every call. A training loop whose set of variables with gradients is the
/// same from step to step (most are) should keep a [`GradientAverager`]
/// instead, which agrees once and then averages without any host
/// synchronization; the buckets and the arithmetic are the same (see there):
/// `1 + number of buckets` collectives per call.
pub fn average_gradients_with(
    varmap: &VarMap,
    grads: &mut candle::backprop::GradStore,
    group: &ProcessGroup,
    options: &AverageOptions,
) -> Result<()> {
    GradientAverager::new(group, *options).average(varmap, grads)
}

/// Saves `varmap` as safetensors to `path` atomically (written to a fresh
/// temporary file beside it, then renamed: a reader sees the old file or the
/// new one; see [`save_checkpoint`](crate::convert::checkpoint::save_checkpoint)):
/// every variable under its name, in its dtype, read back by `VarMap::load`.
pub fn save_varmap_atomic(varmap: &VarMap, path: impl AsRef<Path>) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = sorted_vars(varmap)
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    crate::atomic_file::save_safetensors_atomic(path.as_ref(), &tensors, None)
}
