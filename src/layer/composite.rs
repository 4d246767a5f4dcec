//! The layer composed of candle's own tensor ops: the path on devices this
//! crate has no kernels for (Metal, …), and a reference for the kernels.
//!
//! Same semantics as the kernel path (training, running statistics, eval,
//! fused ReLU and residual); autograd is candle's, and the synchronized
//! backward comes from [`all_reduce_sum_with_grad`], whose gradient is
//! summed over the ranks. Statistics are computed in f32 (f64 for f64
//! inputs, which Metal does not have) in two passes over the input, the
//! second on centered values, with one all-reduce each: the mean with the
//! count, then the sum of squared deviations.

use super::{RunningStats, SyncBatchNorm};
use crate::error::bail_input;
use crate::group::Part;
use crate::ops::{all_reduce_sum_with_grad, increment_counter};
use crate::ProcessGroup;
use candle::{DType, Device, Result, Tensor};

/// A 1-element tensor of `dtype` on `device` (built on the host, so any
/// dtype the device can hold works).
fn scalar(value: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::new(&[value], &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// Per-channel sums of a `(C, M)` tensor, as a `(C)` tensor.
fn channel_sums(x2: &Tensor) -> Result<Tensor> {
    x2.sum_keepdim(1)?.flatten_all()
}

/// `t` of shape `(N, C, *)` as a contiguous `(C, M)` tensor in `dtype`, so
/// that every reduction runs along the last, contiguous dim (the fast path
/// of candle's reductions on every device) and every broadcast is along it.
fn channels_first(t: &Tensor, dtype: DType) -> Result<Tensor> {
    t.to_dtype(dtype)?
        .transpose(0, 1)?
        .flatten_from(1)?
        .contiguous()
}

impl SyncBatchNorm {
    /// The forward pass composed of candle ops (see the module docs); `x`
    /// and `residual` are checked by the caller.
    pub(super) fn forward_composite(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        train: bool,
        relu: bool,
    ) -> Result<Tensor> {
        let name = &self.name;
        let dims = x.dims();
        let (n, c) = (dims[0], dims[1]);
        let l: usize = dims[2..].iter().product();
        let acc = if x.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let device = x.device();
        // Batch statistics: (C, M), reductions along the contiguous dim.
        // Running statistics need no reduction forward: (N, C, L) as it is,
        // without the two transposing copies.
        let running_eval = self.running.is_some() && !train;
        let x2 = if running_eval {
            x.to_dtype(acc)?.reshape((n, c, l))?
        } else {
            channels_first(x, acc)?
        };
        let channel_shape: &[usize] = if running_eval { &[1, c, 1] } else { &[c, 1] };
        let per_channel = |t: &Tensor| t.reshape(channel_shape);
        let eps = self.config.eps;
        // The input centered on the mean, and the mean, per channel.
        let (centered, mean, invstd) = match (&self.running, train) {
            (Some(r), false) => {
                let mean = r.mean.detach().to_dtype(acc)?;
                let var = r.var.detach().to_dtype(acc)?;
                let centered = x2.broadcast_sub(&per_channel(&mean)?)?;
                (centered, mean, var.affine(1.0, eps)?.sqrt()?.recip()?)
            }
            _ => {
                // Eval without running statistics: this rank's batch alone.
                let (group, mean_group, var_group) = if train {
                    let [mean, var] = self.next_call_tags([Part::Mean, Part::Variance]);
                    let group = &self.group;
                    (group.clone(), group.with_tag(mean), group.with_tag(var))
                } else {
                    let single = ProcessGroup::single();
                    (single.clone(), single.clone(), single)
                };
                let local_count = n * l;
                let count = scalar(local_count as f64, acc, device)?;
                let packed = Tensor::cat(&[&channel_sums(&x2)?, &count], 0)?;
                let what = format!("SyncBatchNorm '{name}': batch statistics");
                let packed = all_reduce_sum_with_grad(&packed, &mean_group, &what)?;
                let total = packed.narrow(0, c, 1)?;
                if local_count <= 1 {
                    // As on the kernel path: only ranks with at most one
                    // value per channel read the global count, and all ranks
                    // of a group whose count is ≤ 1 are such ranks.
                    let global = total.to_dtype(DType::F32)?.to_vec1::<f32>()?[0];
                    if global <= 1.0 {
                        bail_input!(
                            "SyncBatchNorm '{name}': expected more than 1 value per channel when training, got {} over {} rank(s) (input shape {dims:?})",
                            global as u64,
                            group.world_size()
                        )
                    }
                }
                let mean = packed.narrow(0, 0, c)?.broadcast_div(&total)?;
                let centered = x2.broadcast_sub(&per_channel(&mean)?)?;
                let squares = channel_sums(&centered.sqr()?)?;
                let what = format!("SyncBatchNorm '{name}': batch variance");
                let var =
                    all_reduce_sum_with_grad(&squares, &var_group, &what)?.broadcast_div(&total)?;
                if train {
                    if let Some(r) = &self.running {
                        self.update_running_composite(r, &mean, &var, &total)?;
                    }
                    self.note_precise_batch(|| Ok(total.clone()))?;
                }
                (centered, mean, var.affine(1.0, eps)?.sqrt()?.recip()?)
            }
        };
        let (scale, shift) = match &self.weight_and_bias {
            Some((w, b)) => (
                invstd.broadcast_mul(&w.to_dtype(acc)?)?,
                Some(b.to_dtype(acc)?),
            ),
            None => (invstd, None),
        };
        let mut y = centered.broadcast_mul(&per_channel(&scale)?)?;
        if let Some(b) = &shift {
            y = y.broadcast_add(&per_channel(b)?)?;
        }
        let z2 = match residual {
            Some(z) if running_eval => Some(z.to_dtype(acc)?.reshape((n, c, l))?),
            Some(z) => Some(channels_first(z, acc)?),
            None => None,
        };
        if let Some(z2) = &z2 {
            y = (y + z2)?;
        }
        if relu {
            y = y.relu()?;
        }
        if y.elem_count() == 0 {
            // candle skips element-wise ops on empty tensors (returning their
            // left operand), which would cut the statistics, the residual
            // and the parameters out of this rank's graph, and with them the
            // backward all-reduces that the other ranks wait for. An empty
            // concatenation keeps them all in the graph.
            let empty = y.shape().clone();
            let mut parts = vec![y, per_channel(&mean)?.broadcast_as(&empty)?];
            parts.push(per_channel(&scale)?.broadcast_as(&empty)?);
            if let Some(b) = &shift {
                parts.push(per_channel(b)?.broadcast_as(&empty)?);
            }
            parts.extend(z2);
            // Along an empty dim, so that the shape stays.
            let dim = empty.dims().iter().position(|&d| d == 0).unwrap_or(0);
            y = Tensor::cat(&parts, dim)?;
        }
        if running_eval {
            return y.to_dtype(x.dtype())?.reshape(dims);
        }
        // Back to (N, C, *), contiguous like the kernels' output.
        let mut transposed = dims.to_vec();
        transposed.swap(0, 1);
        y.to_dtype(x.dtype())?
            .reshape(transposed)?
            .transpose(0, 1)?
            .contiguous()
    }

    /// The running-statistics update of a training step (PyTorch's rules,
    /// as [`RunningStatsUpdate`](crate::ops::RunningStatsUpdate)), in place
    /// through candle's `slice_set`: counter plus one, then
    /// `running = (1 − f)·running + f·batch` with the unbiased variance.
    fn update_running_composite(
        &self,
        r: &RunningStats,
        mean: &Tensor,
        var: &Tensor,
        total: &Tensor,
    ) -> Result<()> {
        let acc = mean.dtype();
        increment_counter(&r.num_batches_tracked)?;
        let factor = match self.update_momentum() {
            Some(m) => m,
            None => 1.0 / (self.num_batches_tracked()? as f64).max(1.0),
        };
        let (mean, var, total) = (mean.detach(), var.detach(), total.detach());
        let unbiased = var.broadcast_mul(&(&total / total.affine(1.0, -1.0)?)?)?;
        for (running, batch) in [(&r.mean, &mean), (&r.var, &unbiased)] {
            let updated = (running.to_dtype(acc)?.affine(1.0 - factor, 0.0)?
                + batch.affine(factor, 0.0)?)?
            .to_dtype(running.dtype())?;
            running.slice_set(&updated, 0, 0)?;
        }
        Ok(())
    }
}
