//! The all-reduce as a differentiable op, for layers composed of candle ops.

use crate::ProcessGroup;
use candle::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// The sum of `t` over the ranks of `group`, with autograd: the gradient of
/// each rank's input is the sum of the output's gradients over the ranks
/// (the adjoint of a sum over ranks), so a layer built from candle ops on
/// top of it gets the synchronized backward pass without code of its own.
///
/// `t` is f32 or f64 on any device; every rank calls this with the same
/// shape and dtype, and backward reaches the op on every rank in the same
/// order relative to the group's other collectives (one model, one graph).
/// With world size 1 `t` is returned as is. Otherwise the values are reduced
/// on the group's device when its collectives take one device only (NCCL:
/// the rank's GPU; a tensor elsewhere is moved there and the result back),
/// else where they are (the in-process and TCP groups go through the host
/// anyway). The kernel paths of this crate do not use it, the composed one
/// ([`SyncBatchNorm::forward_composite_t`](crate::SyncBatchNorm::forward_composite_t))
/// does. `what` names the collective in error messages.
pub fn all_reduce_sum_with_grad(t: &Tensor, group: &ProcessGroup, what: &str) -> Result<Tensor> {
    if group.world_size() == 1 {
        return Ok(t.clone());
    }
    if !matches!(t.dtype(), DType::F32 | DType::F64) {
        candle::bail!("{what}: expected an f32 or f64 tensor, got {:?}", t.dtype())
    }
    let device = t.device().clone();
    let target = group.backend().device().unwrap_or_else(|| device.clone());
    // Differentiable moves (none when the devices agree): candle routes the
    // gradient back to `device`.
    let moved = t.to_device(&target)?;
    let sum = group
        .all_reduce_sum(&moved.detach())
        .map_err(|e| crate::error::keep_kind(&e, format!("{what}: all-reduce failed: {e}")))?
        .to_device(&target)?;
    let op = SumOverRanks {
        // A fresh, flat, contiguous buffer at offset 0.
        sum: sum.flatten_all()?.copy()?,
        // A layer's call: the backward is its counterpart (same tag otherwise).
        group: group.with_tag(group.tag().backward()),
        what: what.to_string(),
    };
    moved.apply_op1(op)?.to_device(&device)
}

/// Forward: the precomputed sum over the ranks (on the input's device);
/// backward: the sum of the gradient over the ranks.
#[derive(Debug, Clone)]
struct SumOverRanks {
    /// The all-reduced values, flat, contiguous, on the input's device.
    sum: Tensor,
    group: ProcessGroup,
    what: String,
}

impl SumOverRanks {
    fn check_len(&self, layout: &Layout) -> Result<()> {
        if layout.shape().elem_count() != self.sum.elem_count() {
            candle::bail!(
                "sync-batch-norm-sum-over-ranks: {} values for an input of shape {:?}",
                self.sum.elem_count(),
                layout.dims()
            )
        }
        Ok(())
    }
}

impl CustomOp1 for SumOverRanks {
    fn name(&self) -> &'static str {
        "sync-batch-norm-sum-over-ranks"
    }

    fn cpu_fwd(&self, _: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check_len(layout)?;
        let out = match self.sum.dtype() {
            DType::F32 => CpuStorage::F32(self.sum.to_vec1::<f32>()?),
            DType::F64 => CpuStorage::F64(self.sum.to_vec1::<f64>()?),
            other => candle::bail!("{}: unexpected dtype {other:?}", self.name()),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle::cuda_backend::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle::cuda_backend::CudaStorage, Shape)> {
        self.check_len(layout)?;
        let (storage, sum_layout) = self.sum.storage_and_layout();
        let candle::Storage::Cuda(sum) = &*storage else {
            candle::bail!("{}: the sum is not on a CUDA device", self.name())
        };
        Ok((
            candle::backend::BackendStorage::try_clone(sum, sum_layout)?,
            layout.shape().clone(),
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = self.group.all_reduce_sum(grad).map_err(|e| {
            crate::error::keep_kind(
                &e,
                format!("{}: all-reduce of the gradient failed: {e}", self.what),
            )
        })?;
        Ok(Some(g))
    }
}
