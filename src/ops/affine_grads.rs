//! The weight and bias gradients from the local gradient sums.

use super::{cpu_values_f64, f64_to_cpu_storage, host_f64};
use candle::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// From the local `(2, C)` f64 sums `[Σdy; Σdy·(x − mean)]` (see
/// [`super::GradStats`]), the `(2, C)` tensor `[dweight; dbias]` in the
/// parameters' dtype: `dweight = Σdy·(x − mean)·invstd`, `dbias = Σdy`.
///
/// These are this rank's contributions; averaging them over ranks belongs to
/// the data-parallel step, as in PyTorch.
#[derive(Debug, Clone)]
pub struct AffineGrads {
    /// The `(3, C)` f64 moments (mean, invstd, count) used in the forward.
    pub moments: Tensor,
    /// The dtype of the weight and bias.
    pub dtype: DType,
}

impl CustomOp1 for AffineGrads {
    fn name(&self) -> &'static str {
        "sync-batch-norm-affine-grads"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let sums = cpu_values_f64(storage, layout, self.name())?;
        let c_n = sums.len() / 2;
        let moments = host_f64(&self.moments)?;
        let mut out = vec![0.0f64; 2 * c_n];
        for c in 0..c_n {
            out[c] = sums[c_n + c] * moments[c_n + c];
            out[c_n + c] = sums[c];
        }
        Ok((
            f64_to_cpu_storage(&out, self.dtype, self.name())?,
            Shape::from((2, c_n)),
        ))
    }
}
