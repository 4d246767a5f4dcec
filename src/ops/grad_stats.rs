//! Local per-channel gradient sums of the backward pass.

use super::element::with_float_type;
use super::{channel_view, host_f64, unsupported_dtype};
use crate::cpu;
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Per-channel `[Σdy; Σdy·(x − mean)]` of the local batch as a `(2, C)` f64
/// tensor: the all-reduce payload of the backward pass, and the local weight
/// and bias gradients (see [`super::AffineGrads`]).
///
/// Applied as `dy.apply_op2_no_bwd(&x, &GradStats { .. })`.
#[derive(Debug, Clone)]
pub struct GradStats {
    /// The channel axis of `x` and `dy`.
    pub axis: usize,
    /// The `(3, C)` f64 moments (mean, invstd, count) used in the forward.
    pub moments: Tensor,
}

impl CustomOp2 for GradStats {
    fn name(&self) -> &'static str {
        "sync-batch-norm-grad-stats"
    }

    fn cpu_fwd(
        &self,
        dy: &CpuStorage,
        dl: &Layout,
        x: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if dl.dims() != xl.dims() {
            candle::bail!(
                "{}: gradient shape {:?} differs from input shape {:?}",
                self.name(),
                dl.dims(),
                xl.dims()
            )
        }
        if dy.dtype() != x.dtype() {
            candle::bail!(
                "{}: gradient dtype {:?} differs from input dtype {:?}",
                self.name(),
                dy.dtype(),
                x.dtype()
            )
        }
        let dv = channel_view(dl, self.axis, self.name())?;
        let xv = channel_view(xl, self.axis, self.name())?;
        let moments = host_f64(&self.moments)?;
        let mean = &moments[..xv.channels];
        let out = with_float_type!(x.dtype(), T => {
            cpu::grad_sums(dy.as_slice::<T>()?, &dv, x.as_slice::<T>()?, &xv, mean)
        }, _ => return Err(unsupported_dtype(self.name(), "input", x.dtype())));
        Ok((CpuStorage::F64(out), Shape::from((2, xv.channels))))
    }
}
