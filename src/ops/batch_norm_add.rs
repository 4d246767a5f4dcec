//! Batch normalization plus a residual (then the fused ReLU), in one op.

use super::{cpu_values_f64, BatchNormOp};
use candle::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// `y = act((x − mean)·invstd·weight + bias + z)` per channel, with candle
/// autograd; `act` is the ReLU with `norm.relu`, else the identity. The
/// residual `z` has `x`'s shape and dtype, any strides.
///
/// Applied as `x.apply_op2(&z, op)` without an affine transform, or as
/// `x.apply_op3(&z, &wb, op)` with `wb` the `(2, C)` stack of weight and bias
/// ([`StackParams`](super::StackParams): candle's custom ops take three
/// inputs at most; the stack's backward hands each its row of the gradient). The backward masks the incoming
/// gradient once ([`super::ReluGrad`]); that masked gradient is `z`'s
/// gradient as it is, and [`BatchNormOp`]'s backward takes it from there.
#[derive(Debug, Clone)]
pub struct BatchNormAddOp {
    /// The normalization (its `relu` applies after the addition).
    pub norm: BatchNormOp,
}

impl BatchNormAddOp {
    /// The gradients of `x`, `z` and, with `wb`, of the `(2, C)` weight-bias stack.
    fn backward(
        &self,
        x: &Tensor,
        wb: Option<&Tensor>,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let dy = self.norm.pre_activation_grad(res, grad)?;
        let weight = match wb {
            Some(wb) => Some(wb.get(0)?),
            None => None,
        };
        let (dx, dwb) = self
            .norm
            .backward_normalization(x, weight.as_ref(), &dy, None)?;
        Ok((dx, dy, dwb))
    }
}

impl CustomOp2 for BatchNormAddOp {
    fn name(&self) -> &'static str {
        "sync-batch-norm-add"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        z: &CpuStorage,
        zl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.norm.forward_cpu(x, xl, None, None, Some((z, zl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle::CudaStorage,
        xl: &Layout,
        z: &candle::CudaStorage,
        zl: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.norm.forward_cuda(x, xl, None, Some((z, zl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _z: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dz, _) = self.backward(x, None, res, grad)?;
        Ok((Some(dx), Some(dz)))
    }
}

impl CustomOp3 for BatchNormAddOp {
    fn name(&self) -> &'static str {
        "sync-batch-norm-affine-add"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        z: &CpuStorage,
        zl: &Layout,
        wb: &CpuStorage,
        wbl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c_n = stack_channels(wbl, CustomOp3::name(self))?;
        let mut w = cpu_values_f64(wb, wbl, CustomOp3::name(self))?;
        let b = w.split_off(c_n);
        self.norm
            .forward_cpu(x, xl, Some(w), Some(b), Some((z, zl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle::CudaStorage,
        xl: &Layout,
        z: &candle::CudaStorage,
        zl: &Layout,
        wb: &candle::CudaStorage,
        wbl: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        stack_channels(wbl, CustomOp3::name(self))?;
        let (wl, bl) = (wbl.narrow(0, 0, 1)?, wbl.narrow(0, 1, 1)?);
        let (wl, bl) = (row_layout(&wl)?, row_layout(&bl)?);
        self.norm
            .forward_cuda(x, xl, Some(((wb, &wl), (wb, &bl))), Some((z, zl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _z: &Tensor,
        wb: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dz, dwb) = self.backward(x, Some(wb), res, grad)?;
        let Some(dwb) = dwb else {
            candle::bail!("sync-batch-norm: internal error, no affine gradients for an affine op")
        };
        Ok((Some(dx), Some(dz), Some(dwb)))
    }
}

/// The channel count of a `(2, C)` weight-bias stack, or an error naming the op.
fn stack_channels(wbl: &Layout, op: &str) -> Result<usize> {
    match wbl.dims() {
        [2, c] => Ok(*c),
        d => candle::bail!("{op}: expected the (2, C) stack of weight and bias, got shape {d:?}"),
    }
}

/// A `(1, C)` row of the stack as a `(C,)` layout.
#[cfg(feature = "cuda")]
fn row_layout(l: &Layout) -> Result<Layout> {
    let c = l.dims()[1];
    Ok(Layout::new(
        Shape::from(c),
        vec![l.stride()[1]],
        l.start_offset(),
    ))
}
