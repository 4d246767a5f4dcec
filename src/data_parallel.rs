//! What a data-parallel training loop needs besides `SyncBatchNorm`, since
//! candle has no DDP: start every rank from rank 0's variables
//! ([`broadcast_varmap`]), average the gradients over the ranks before the
//! optimizer step ([`average_gradients`], in a few large bucketed all-reduces
//! rather than one call per tensor), and write checkpoints atomically
//! ([`save_varmap_atomic`]).
//!
//! Variables are visited in the order of their names, so every rank makes the
//! same calls whatever the order of the `VarMap`'s hash map.

use crate::ProcessGroup;
use candle::{DType, Result, Tensor, Var};
use candle_nn::VarMap;
use std::path::Path;

/// The default size of a gradient bucket: 25 MiB, as PyTorch's DDP.
pub(crate) const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// The variables of `varmap` sorted by name.
fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Splits `items` (with their dtype and byte size) into runs of equal dtype
/// of at most `bucket_bytes` each (a larger item gets a bucket of its own).
fn buckets(items: &[(DType, usize)], bucket_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, &(dtype, size)) in items.iter().enumerate() {
        if i > start && (dtype != items[start].0 || bytes + size > bucket_bytes) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < items.len() {
        out.push(start..items.len());
    }
    out
}

/// Splits a flat tensor into pieces of the given shapes.
fn unflatten(flat: &Tensor, shapes: &[&candle::Shape]) -> Result<Vec<Tensor>> {
    let mut offset = 0;
    shapes
        .iter()
        .map(|s| {
            let n = s.elem_count();
            let t = flat.narrow(0, offset, n)?.reshape(*s)?;
            offset += n;
            Ok(t)
        })
        .collect()
}

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
    average_gradients_bucketed(varmap, grads, group, DEFAULT_BUCKET_BYTES)
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

/// How [`average_gradients_with`] averages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AverageOptions {
    /// The largest bucket, in bytes of the reduced dtype (default 25 MiB, as
    /// PyTorch's DDP); a larger gradient gets a bucket of its own.
    pub bucket_bytes: usize,
    /// Reduce bf16 and f16 gradients in their own dtype (half the bytes on
    /// the wire, as PyTorch's DDP does) instead of f32 (the default: each
    /// rank's gradient rounded once to f32, summed in f32, rounded once back).
    pub half_in_own_dtype: bool,
}

impl Default for AverageOptions {
    fn default() -> Self {
        Self {
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            half_in_own_dtype: false,
        }
    }
}

/// Replaces each gradient in `grads` of a floating-point variable of `varmap`
/// by its average over the ranks of `group`.
///
/// The floating-point variables are taken in name order; a variable that has
/// a gradient on some rank but not on this one (e.g. a branch this rank did
/// not take) counts as a zero gradient here, and one without a gradient on
/// any rank (running statistics, frozen weights) is left alone. Per bucket
/// (a run of variables of one reduced dtype, at most
/// [`AverageOptions::bucket_bytes`]), the gradients are packed once into one
/// flat tensor, converted to the reduced dtype (f64 stays f64, f32 and, by
/// default, bf16/f16 are reduced in f32) and divided by the world size in the
/// same pass (on the CPU; on a GPU the division is a second pass on the
/// device), summed with one all-reduce, and handed back to `grads` as views
/// of the sum (converted back for half-precision variables reduced in f32):
/// `1 + number of buckets` collectives in all, one bucket of extra memory at
/// a time besides what the backend stages.
pub fn average_gradients_with(
    varmap: &VarMap,
    grads: &mut candle::backprop::GradStore,
    group: &ProcessGroup,
    options: &AverageOptions,
) -> Result<()> {
    let world = group.world_size();
    if world == 1 {
        return Ok(());
    }
    let vars: Vec<(String, Var)> = sorted_vars(varmap)
        .into_iter()
        .filter(|(_, v)| v.dtype().is_float())
        .collect();
    if vars.is_empty() {
        return Ok(());
    }
    let device = vars[0].1.device().clone();
    let has: Vec<f32> = vars
        .iter()
        .map(|(_, v)| if grads.get(v).is_some() { 1.0 } else { 0.0 })
        .collect();
    let has = Tensor::from_vec(has, vars.len(), &device)?;
    let has = group.all_reduce_sum(&has)?.to_vec1::<f32>()?;
    let used: Vec<&(String, Var)> = vars
        .iter()
        .zip(has)
        .filter(|(_, h)| *h > 0.0)
        .map(|(v, _)| v)
        .collect();
    let reduce_dtype = |d: DType| match d {
        DType::F64 => DType::F64,
        DType::BF16 | DType::F16 if options.half_in_own_dtype => d,
        _ => DType::F32,
    };
    let items: Vec<(DType, usize)> = used
        .iter()
        .map(|(_, v)| {
            let d = reduce_dtype(v.dtype());
            (d, v.elem_count() * d.size_in_bytes())
        })
        .collect();
    for range in buckets(&items, options.bucket_bytes.max(1)) {
        let part = &used[range.clone()];
        let dtype = items[range.start].0;
        let parts: Vec<crate::grad_pack::Part> = part
            .iter()
            .map(|(name, v)| match grads.get(v) {
                Some(g) if g.shape() != v.shape() => candle::bail!(
                    "average_gradients: the gradient of '{name}' has shape {:?}, the variable {:?}",
                    g.dims(),
                    v.dims()
                ),
                g => Ok((g, v.elem_count())),
            })
            .collect::<Result<_>>()?;
        let flat = crate::grad_pack::pack_scaled(&parts, dtype, world, &device)?;
        drop(parts);
        let mean = group.all_reduce_sum(&flat)?;
        drop(flat);
        let shapes: Vec<&candle::Shape> = part.iter().map(|(_, v)| v.shape()).collect();
        for ((_, var), g) in part.iter().zip(unflatten(&mean, &shapes)?) {
            grads.insert(var.as_tensor(), g.to_dtype(var.dtype())?);
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_split() {
        let items = [
            (DType::F32, 40),
            (DType::F32, 40),
            (DType::F32, 40),
            (DType::F64, 8),
            (DType::F32, 200),
            (DType::F32, 4),
        ];
        assert_eq!(buckets(&items, 100), vec![0..2, 2..3, 3..4, 4..5, 5..6]);
        assert_eq!(buckets(&items, 1000), vec![0..3, 3..4, 4..6]);
        assert!(buckets(&[], 10).is_empty());
    }
}
