//! In-place updates of the running statistics and of `num_batches_tracked`.

use super::{cpu_values_f64, strided_offsets};
use crate::element::{bf16_from_f64, f16_from_f64};
use candle::backend::BackendStorage;
use candle::{CpuStorage, DType, Device, InplaceOp1, InplaceOp3, Layout, Result, Tensor};

/// Adds one to a `num_batches_tracked` counter in place, on any device:
/// this crate's kernel where it has kernels (CPU, CUDA), else
/// candle's own ops (`slice_set` of the counter plus one).
pub fn increment_counter(counter: &Tensor) -> Result<()> {
    if super::has_kernels(counter.device()) {
        return counter.inplace_op1(&CounterIncrement);
    }
    increment_counter_composite(counter)
}

/// [`increment_counter`] through candle's own ops, on any device.
fn increment_counter_composite(counter: &Tensor) -> Result<()> {
    let flat = counter.flatten_all()?;
    let one = Tensor::new(&[1i64], &Device::Cpu)?
        .to_dtype(counter.dtype())?
        .to_device(counter.device())?;
    flat.slice_set(&flat.broadcast_add(&one)?, 0, 0)
}

/// The value of a counter scalar, read on the host (not every device has
/// f64). A counter that cannot be read, or does not hold one whole number
/// ≥ 0, is an error naming `layer` (formatted only then: the composite
/// layer reads the counter every training step with `momentum: None`).
pub(crate) fn counter_value(counter: &Tensor, layer: &dyn std::fmt::Display) -> Result<u64> {
    let values = counter
        .to_device(&Device::Cpu)
        .and_then(|t| t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>())
        .map_err(|e| {
            candle::Error::Msg(format!("{layer}: reading num_batches_tracked failed: {e}"))
        })?;
    match values[..] {
        [v] if v >= 0.0 && v.fract() == 0.0 && v < u64::MAX as f64 => Ok(v as u64),
        _ => candle::bail!(
            "{layer}: num_batches_tracked must hold one whole number >= 0, got {values:?} ({:?})",
            counter.dtype()
        ),
    }
}

/// Adds one to the `num_batches_tracked` counter (an integer or float scalar), in place.
#[derive(Debug, Clone, Copy, Default)]
pub struct CounterIncrement;

impl InplaceOp1 for CounterIncrement {
    fn name(&self) -> &'static str {
        "sync-batch-norm-counter-increment"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let idx = strided_offsets(layout);
        match storage {
            CpuStorage::I64(v) => idx.iter().for_each(|&i| v[i] += 1),
            CpuStorage::U32(v) => idx.iter().for_each(|&i| v[i] += 1),
            CpuStorage::F32(v) => idx.iter().for_each(|&i| v[i] += 1.0),
            CpuStorage::F64(v) => idx.iter().for_each(|&i| v[i] += 1.0),
            other => candle::bail!(
                "{}: unsupported counter dtype {:?}",
                self.name(),
                other.dtype()
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle::CudaStorage, layout: &Layout) -> Result<()> {
        use crate::cuda::launch as l;
        use candle::cuda_backend::cudarc::driver::PushKernelArg;
        use candle::DType;
        let dtype = storage.dtype();
        if !matches!(dtype, DType::I64 | DType::U32 | DType::F32 | DType::F64) {
            candle::bail!("{}: unsupported counter dtype {dtype:?}", self.name())
        }
        let len = layout.shape().elem_count();
        if len == 0 {
            return Ok(());
        }
        let v = l::vec1(layout, dtype, len, "counter")?;
        let dev = storage.device().clone();
        let f = l::function(&dev, l::Module::Stats, "bn_counter_increment")?;
        let stream = dev.cuda_stream();
        let n = len as i64;
        let mut args = stream.launch_builder(&f);
        l::push_storage_mut(&mut args, storage)?;
        args.arg(&v).arg(&n);
        // SAFETY: matches bn_counter_increment(void*, Vec1, long long); `v`
        // describes `len` elements of `storage`.
        unsafe { l::launch(args, l::grid(crate::cuda::plan::per_item_blocks(len))?) }
    }
}

/// Which running statistic a [`RunningStatsUpdate`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunningStat {
    /// `running_mean ← (1 − f)·running_mean + f·mean`.
    Mean,
    /// `running_var ← (1 − f)·running_var + f·var·n/(n − 1)` (unbiased).
    Var,
}

/// Updates `running_mean` or `running_var` in place from the all-reduced
/// `(3, C)` f64 sums `[n; Σx; Σx²]` and the (already incremented)
/// `num_batches_tracked`: the factor `f` is `momentum`, or
/// `1 / num_batches_tracked` when `momentum` is `None`, as in PyTorch.
#[derive(Debug, Clone, Copy)]
pub struct RunningStatsUpdate {
    /// `Some(m)`: exponential moving average; `None`: cumulative average.
    pub momentum: Option<f64>,
    /// The statistic this update writes.
    pub stat: RunningStat,
}

impl RunningStatsUpdate {
    /// The new value of one channel's statistic.
    pub fn updated(&self, old: f64, n: f64, s1: f64, s2: f64, factor: f64) -> f64 {
        let mean = s1 / n;
        let batch = match self.stat {
            RunningStat::Mean => mean,
            RunningStat::Var => (s2 / n - mean * mean).max(0.0) * n / (n - 1.0),
        };
        (1.0 - factor) * old + factor * batch
    }

    /// Updates the running statistic `dst` (a float CPU storage) of every
    /// channel from the `(3, C)` sums (row-major f64) with `factor`.
    pub(crate) fn update_cpu(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        sums: &[f64],
        factor: f64,
    ) -> Result<()> {
        let c_n = dst_l.dims().iter().product::<usize>();
        let idx = strided_offsets(dst_l);
        macro_rules! update {
            ($v:expr, $to:expr, $from:expr) => {
                for (c, &i) in idx.iter().enumerate() {
                    let new = self.updated(
                        $to($v[i]),
                        sums[c],
                        sums[c_n + c],
                        sums[2 * c_n + c],
                        factor,
                    );
                    $v[i] = $from(new);
                }
            };
        }
        match dst {
            CpuStorage::F32(v) => update!(v, |x: f32| x as f64, |x: f64| x as f32),
            CpuStorage::F64(v) => update!(v, |x: f64| x, |x: f64| x),
            CpuStorage::F16(v) => update!(v, |x: half::f16| x.to_f64(), f16_from_f64),
            CpuStorage::BF16(v) => update!(v, |x: half::bf16| x.to_f64(), bf16_from_f64),
            other => candle::bail!(
                "{}: unsupported running-stat dtype {:?}",
                self.name(),
                other.dtype()
            ),
        }
        Ok(())
    }

    /// The update factor for a counter value (after its increment).
    pub fn factor(&self, num_batches_tracked: f64) -> f64 {
        match self.momentum {
            Some(m) => m,
            None => 1.0 / num_batches_tracked.max(1.0),
        }
    }
}

impl InplaceOp3 for RunningStatsUpdate {
    fn name(&self) -> &'static str {
        "sync-batch-norm-running-stats-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        sums: &CpuStorage,
        sums_l: &Layout,
        counter: &CpuStorage,
        counter_l: &Layout,
    ) -> Result<()> {
        let c_n = dst_l.dims().iter().product::<usize>();
        if sums_l.dims() != [3, c_n] {
            candle::bail!(
                "{}: expected (3, {c_n}) sums, got {:?}",
                self.name(),
                sums_l.dims()
            )
        }
        let sums = cpu_values_f64(sums, sums_l, self.name())?;
        let counter = cpu_values_f64(counter, counter_l, self.name())?;
        let factor = self.factor(counter.first().copied().unwrap_or(1.0));
        self.update_cpu(dst, dst_l, &sums, factor)
    }

    // The layer runs this math inside its fused ops on a GPU: this op's own
    // CUDA path serves the GPU tests (and benchmarks) only.
    #[cfg(all(feature = "cuda", any(test, feature = "internals")))]
    fn cuda_fwd(
        &self,
        dst: &mut candle::CudaStorage,
        dst_l: &Layout,
        sums: &candle::CudaStorage,
        sums_l: &Layout,
        counter: &candle::CudaStorage,
        counter_l: &Layout,
    ) -> Result<()> {
        use crate::cuda::launch as l;
        use candle::cuda_backend::cudarc::driver::PushKernelArg;
        use candle::DType;
        let c_n = dst_l.dims().iter().product::<usize>();
        if sums_l.dims() != [3, c_n] {
            candle::bail!(
                "{}: expected (3, {c_n}) sums, got {:?}",
                self.name(),
                sums_l.dims()
            )
        }
        let dtype = dst.dtype();
        if !matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
            candle::bail!("{}: unsupported running-stat dtype {dtype:?}", self.name())
        }
        if c_n == 0 {
            return Ok(());
        }
        let d = l::vec1(dst_l, dtype, c_n, "running statistic")?;
        let s = l::mat2(sums_l, sums.dtype(), 3, c_n, "sums")?;
        // The factor is read from the counter on the device: no host copy.
        let counter_len = counter_l.shape().elem_count();
        let k = if counter_len == 0 {
            l::Vec1::ABSENT
        } else {
            l::vec1(counter_l, counter.dtype(), counter_len, "counter")?
        };
        let dev = dst.device().clone();
        let f = l::function(&dev, l::Module::Stats, "bn_running_update")?;
        let stream = dev.cuda_stream();
        let c = c_n as i64;
        let (has_momentum, momentum) = match self.momentum {
            Some(m) => (1i32, m),
            None => (0i32, 0.0f64),
        };
        let stat: i32 = match self.stat {
            RunningStat::Mean => 0,
            RunningStat::Var => 1,
        };
        let mut args = stream.launch_builder(&f);
        l::push_storage_mut(&mut args, dst)?;
        args.arg(&d);
        l::push_storage(&mut args, sums)?;
        args.arg(&s);
        l::push_storage(&mut args, counter)?;
        args.arg(&k)
            .arg(&c)
            .arg(&has_momentum)
            .arg(&momentum)
            .arg(&stat);
        // SAFETY: matches bn_running_update(void*, Vec1, const void*, Mat2,
        // const void*, Vec1, long long, int, double, int).
        unsafe { l::launch(args, l::grid(crate::cuda::plan::per_item_blocks(c_n))?) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_counter_increment_adds_one_in_place_for_every_counter_dtype() {
        for dtype in [DType::I64, DType::U32, DType::F32, DType::F64] {
            let counter = Tensor::new(41i64, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let alias = counter.clone();
            increment_counter_composite(&counter).unwrap();
            increment_counter_composite(&counter).unwrap();
            assert_eq!(counter.dims(), [0usize; 0], "{dtype:?}");
            // The storage itself changed: every handle sees 43.
            assert_eq!(counter_value(&alias, &"test").unwrap(), 43, "{dtype:?}");
        }
        let big = Tensor::new((1i64 << 40) + 5, &Device::Cpu).unwrap();
        increment_counter_composite(&big).unwrap();
        assert_eq!(big.to_scalar::<i64>().unwrap(), (1i64 << 40) + 6);
    }
}
