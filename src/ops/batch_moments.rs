//! The training forward's per-channel step in one op: the moments of the
//! all-reduced batch sums and, in the same pass, the running statistics.

use super::{
    cpu_values_f64, host_f64, CounterIncrement, ForwardCoefficients, Moments, RunningStat,
    RunningStatsUpdate,
};
use candle::{CpuStorage, CustomOp1, DType, InplaceOp1, Layout, Result, Shape, Tensor};

/// The running statistics a [`BatchMoments`] updates in place.
#[derive(Debug, Clone)]
pub struct RunningTensors {
    /// `running_mean`, `(C)`, a float dtype.
    pub mean: Tensor,
    /// `running_var`, `(C)`, a float dtype.
    pub var: Tensor,
    /// `num_batches_tracked`: i64, u32, f32 or f64, usually a scalar.
    pub num_batches_tracked: Tensor,
    /// `Some(m)`: exponential moving average; `None`: cumulative average.
    pub momentum: Option<f64>,
}

/// The `(3, C)` f64 moments of `(3, C)` all-reduced sums `[n; Σx; Σx²]` (as
/// [`Moments`]) and, with running statistics, the training step's update of
/// them: the counter plus one, then the mean and the variance as
/// [`RunningStatsUpdate`] with the incremented counter's factor.
///
/// Bit for bit what [`CounterIncrement`], two [`RunningStatsUpdate`]s and
/// [`Moments`] compute one after the other, in one CUDA launch instead of
/// four (a training step of a small layer is bound by its launches: see
/// the README). Built and applied by [`BatchMoments::apply`], which checks
/// that the four tensors are distinct; the running tensors are written
/// under candle's write locks, taken one inside the other (mean, variance,
/// counter) while the sums are read-locked.
#[derive(Debug, Clone)]
pub struct BatchMoments {
    eps: f64,
    running: Option<RunningTensors>,
    /// The forward's coefficients to compute too, and the fresh tensor
    /// that receives them.
    coefficients: Option<(ForwardCoefficients, Tensor)>,
}

impl BatchMoments {
    /// The moments of `sums`, updating `running` (if any) in place.
    pub fn apply(sums: &Tensor, eps: f64, running: Option<&RunningTensors>) -> Result<Tensor> {
        Self::check(sums, running)?;
        sums.apply_op1_no_bwd(&BatchMoments {
            eps,
            running: running.cloned(),
            coefficients: None,
        })
    }

    /// [`Self::apply`], and from the same op (on a GPU, the same launch) the
    /// forward's per-channel coefficients for `coefficients`' input dtype and
    /// parameters: the moments and the `(C, 8)` coefficient tensor to give
    /// [`BatchNormOp::coefficients`](super::BatchNormOp::coefficients).
    pub fn apply_with_coefficients(
        sums: &Tensor,
        eps: f64,
        running: Option<&RunningTensors>,
        coefficients: &ForwardCoefficients,
    ) -> Result<(Tensor, Tensor)> {
        Self::check(sums, running)?;
        if let Some(r) = running {
            // The parameters are read while the running tensors are
            // write-locked: a shared storage would wait for itself.
            let params = [
                ("weight", &coefficients.weight),
                ("bias", &coefficients.bias),
            ];
            for (what, p) in params {
                let Some(p) = p else { continue };
                for (other, t) in [
                    ("running mean", &r.mean),
                    ("running variance", &r.var),
                    ("counter", &r.num_batches_tracked),
                ] {
                    if storage_id(p) == storage_id(t) {
                        candle::bail!(
                            "sync-batch-norm-batch-moments: the {what} and the {other} share their storage"
                        )
                    }
                }
            }
        }
        let c_n = sums.dims()[1];
        // SAFETY: both paths write every coefficient before the op returns
        // Ok; on an error the tensor is dropped unread.
        let coef =
            unsafe { coefficients.alloc(c_n, sums.device(), "sync-batch-norm-batch-moments")? };
        let moments = sums.apply_op1_no_bwd(&BatchMoments {
            eps,
            running: running.cloned(),
            coefficients: Some((coefficients.clone(), coef.clone())),
        })?;
        Ok((moments, coef))
    }

    /// Checks the sums and the running tensors (devices, sizes, dtypes, no
    /// shared storage: the nested write locks would wait for themselves).
    fn check(sums: &Tensor, running: Option<&RunningTensors>) -> Result<()> {
        let name = "sync-batch-norm-batch-moments";
        let dims = sums.dims();
        if dims.len() != 2 || dims[0] != 3 {
            candle::bail!("{name}: expected (3, C) sums, got {dims:?}")
        }
        if let Some(r) = running {
            let c_n = dims[1];
            let tensors = [
                ("sums", sums),
                ("running mean", &r.mean),
                ("running variance", &r.var),
                ("counter", &r.num_batches_tracked),
            ];
            for (i, (what, t)) in tensors.iter().enumerate() {
                if !t.device().same_device(sums.device()) {
                    candle::bail!(
                        "{name}: the sums are on {:?} but the {what} is on {:?}",
                        sums.device().location(),
                        t.device().location()
                    )
                }
                for (other, u) in &tensors[..i] {
                    if storage_id(t) == storage_id(u) {
                        candle::bail!("{name}: the {what} and the {other} share their storage")
                    }
                }
            }
            for (what, t) in [("running mean", &r.mean), ("running variance", &r.var)] {
                if t.elem_count() != c_n || !t.dtype().is_float() {
                    candle::bail!(
                        "{name}: expected a float {what} of {c_n} elements, got {:?} {:?}",
                        t.dtype(),
                        t.dims()
                    )
                }
            }
            let k = r.num_batches_tracked.dtype();
            if !matches!(k, DType::I64 | DType::U32 | DType::F32 | DType::F64) {
                candle::bail!("{name}: unsupported counter dtype {k:?}")
            }
        }
        Ok(())
    }

    fn update(&self, stat: RunningStat) -> RunningStatsUpdate {
        RunningStatsUpdate {
            momentum: self.running.as_ref().and_then(|r| r.momentum),
            stat,
        }
    }
}

/// The address of a tensor's storage: equal for tensors that share it (the
/// nested locks of [`BatchMoments`] would wait for themselves).
fn storage_id(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    &*storage as *const candle::Storage as usize
}

/// Updates a running statistic on the CPU from sums already read.
struct UpdateFrom<'a> {
    update: RunningStatsUpdate,
    sums: &'a [f64],
    factor: f64,
}

impl InplaceOp1 for UpdateFrom<'_> {
    fn name(&self) -> &'static str {
        "sync-batch-norm-batch-moments"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        self.update
            .update_cpu(storage, layout, self.sums, self.factor)
    }
}

impl CustomOp1 for BatchMoments {
    fn name(&self) -> &'static str {
        "sync-batch-norm-batch-moments"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = Moments { eps: self.eps }.cpu_fwd(storage, layout)?;
        if let Some(r) = &self.running {
            // Each tensor is locked on its own: the sums are read once.
            let sums = cpu_values_f64(storage, layout, self.name())?;
            r.num_batches_tracked.inplace_op1(&CounterIncrement)?;
            let count = host_f64(&r.num_batches_tracked)?;
            let factor = self
                .update(RunningStat::Mean)
                .factor(count.first().copied().unwrap_or(1.0));
            for (t, stat) in [(&r.mean, RunningStat::Mean), (&r.var, RunningStat::Var)] {
                t.inplace_op1(&UpdateFrom {
                    update: self.update(stat),
                    sums: &sums,
                    factor,
                })?;
            }
        }
        if let Some((request, coef)) = &self.coefficients {
            let (moments, shape) = &out;
            let values = request.cpu_values_of(moments, shape, self.name())?;
            super::store_cpu(coef, self.name(), values)?;
        }
        Ok(out)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        if self.running.is_none() && self.coefficients.is_none() {
            return Moments { eps: self.eps }.cuda_fwd(storage, layout);
        }
        cuda::apply(self, storage, layout)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! One launch of `bn_batch_moments`, with the write locks of the
    //! coefficient tensor and the three running tensors held, taken one
    //! inside the other.

    use super::super::coefficients::cuda as coef_args;
    use super::super::with_cuda_storage_mut as lend;
    use super::BatchMoments;
    use crate::cuda::launch as l;
    use crate::cuda::plan;
    use candle::backend::BackendStorage;
    use candle::cuda_backend::cudarc::driver::PushKernelArg;
    use candle::{CudaStorage, Layout, Result, Shape};

    const NAME: &str = "sync-batch-norm-batch-moments";

    /// The running tensors' storages, write-locked.
    struct Running<'a> {
        mean: (&'a mut CudaStorage, &'a Layout),
        var: (&'a mut CudaStorage, &'a Layout),
        counter: (&'a mut CudaStorage, &'a Layout),
    }

    pub(super) fn apply(
        op: &BatchMoments,
        sums: &CudaStorage,
        sums_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let c_n = sums_l.dims()[1];
        let with_running = |coef: Option<(&mut CudaStorage, &Layout)>| match &op.running {
            None => launch(op, sums, sums_l, None, coef),
            Some(r) => lend(&r.mean, NAME, |mean, mean_l| {
                lend(&r.var, NAME, |var, var_l| {
                    lend(&r.num_batches_tracked, NAME, |counter, counter_l| {
                        let running = Running {
                            mean: (mean, mean_l),
                            var: (var, var_l),
                            counter: (counter, counter_l),
                        };
                        launch(op, sums, sums_l, Some(running), coef)
                    })
                })
            }),
        };
        let out = match &op.coefficients {
            None => with_running(None)?,
            Some((_, t)) => lend(t, NAME, |coef, coef_l| with_running(Some((coef, coef_l))))?,
        };
        Ok((
            CudaStorage::wrap_cuda_slice(out, sums.device().clone()),
            Shape::from((3, c_n)),
        ))
    }

    /// Enqueues `bn_batch_moments` and returns its `(3, C)` f64 moments.
    fn launch(
        op: &BatchMoments,
        sums: &CudaStorage,
        sums_l: &Layout,
        running: Option<Running<'_>>,
        coef: Option<(&mut CudaStorage, &Layout)>,
    ) -> Result<candle::cuda_backend::cudarc::driver::CudaSlice<f64>> {
        let c_n = sums_l.dims()[1];
        let dev = sums.device().clone();
        let s = l::mat2(sums_l, sums.dtype(), 3, c_n, "sums")?;
        // SAFETY: the kernel writes all 3 * C values.
        let mut out = unsafe { l::alloc::<f64>(&dev, 3 * c_n)? };
        let f = l::function(&dev, l::Module::Stats, "bn_batch_moments")?;
        let stream = dev.cuda_stream();
        let (has_momentum, momentum) = match op.running.as_ref().and_then(|r| r.momentum) {
            Some(m) => (1i32, m),
            None => (0i32, 0.0f64),
        };
        let params = match &op.coefficients {
            Some((request, _)) => Some(coef_args::Params::new(request, &dev, c_n)?),
            None => None,
        };
        let coef_dt = match &op.coefficients {
            Some((request, _)) => coef_args::dtype_code(request.input)?,
            None => 0,
        };
        let (views, counter_len) = match &running {
            Some(r) => {
                let (counter, counter_l) = (&r.counter.0, r.counter.1);
                let counter_len = counter_l.shape().elem_count();
                let views = [
                    l::vec1(r.mean.1, r.mean.0.dtype(), c_n, "running mean")?,
                    l::vec1(r.var.1, r.var.0.dtype(), c_n, "running variance")?,
                    if counter_len == 0 {
                        l::Vec1::ABSENT
                    } else {
                        l::vec1(counter_l, counter.dtype(), counter_len, "counter")?
                    },
                ];
                (views, counter_len as i64)
            }
            None => ([l::Vec1::ABSENT; 3], 0),
        };
        let mut args = stream.launch_builder(&f);
        l::push_storage(&mut args, sums)?;
        args.arg(&s);
        match running {
            Some(Running {
                mean: (mean, _),
                var: (var, _),
                counter: (counter, _),
            }) => {
                for (storage, v) in [mean, var, counter].into_iter().zip(&views) {
                    l::push_storage_mut(&mut args, storage)?;
                    args.arg(v);
                }
            }
            None => {
                for v in &views {
                    args.arg(&l::NULL).arg(v);
                }
            }
        }
        let (c, eps) = (c_n as i64, op.eps);
        args.arg(&counter_len)
            .arg(&c)
            .arg(&has_momentum)
            .arg(&momentum)
            .arg(&eps)
            .arg(&mut out);
        let request = match (&params, coef) {
            (Some(p), Some((coef, _))) => Some((p, coef)),
            _ => None,
        };
        coef_args::push(&mut args, request, &coef_dt)?;
        // SAFETY: matches bn_batch_moments(const void*, Mat2, void*, Vec1,
        // void*, Vec1, void*, Vec1, long long, long long, int, double,
        // double, double*, const void*, Vec1, const void*, Vec1, void*, int);
        // every view lies inside its buffer, `out` holds 3 * C values, the
        // coefficients (C, 8) accumulator values, and the kernel runs as ONE
        // block where it reads the counter (it orders the counter's reads
        // before its write with a block barrier).
        unsafe {
            l::launch(
                args,
                l::grid(moments_blocks(c_n, has_momentum == 1, counter_len > 0))?,
            )?
        };
        Ok(out)
    }

    /// Blocks of `bn_batch_moments` over `channels`: one where the running
    /// factor reads the counter that the kernel also increments (a cumulative
    /// average, no momentum), so that every read precedes the write; otherwise a
    /// thread per channel.
    fn moments_blocks(channels: usize, has_momentum: bool, has_counter: bool) -> usize {
        if has_counter && !has_momentum {
            1
        } else {
            plan::per_item_blocks(channels)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_bits as bits;
    use candle::{Device, Var};

    fn running(dtype: DType, counter: DType, count: i64, momentum: Option<f64>) -> RunningTensors {
        let t = |v: &[f64]| {
            Var::from_tensor(
                &Tensor::new(v, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap()
            .as_tensor()
            .clone()
        };
        let k = Tensor::new(count, &Device::Cpu)
            .unwrap()
            .to_dtype(counter)
            .unwrap();
        RunningTensors {
            mean: t(&[0.5, 1.0, -2.0]),
            var: t(&[1.5, 0.25, 3.0]),
            num_batches_tracked: Var::from_tensor(&k).unwrap().as_tensor().clone(),
            momentum,
        }
    }

    #[test]
    fn one_pass_equals_the_separate_ops_bit_for_bit() {
        let sums = Tensor::new(
            &[[10.0f64, 4.0, 7.0], [25.0, -2.0, 70.0], [80.0, 9.0, 720.0]],
            &Device::Cpu,
        )
        .unwrap();
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            for counter in [DType::I64, DType::U32, DType::F32, DType::F64] {
                for momentum in [Some(0.1), None] {
                    let fused = running(dtype, counter, 3, momentum);
                    let separate = running(dtype, counter, 3, momentum);
                    for step in 0..2 {
                        // Step 1 also computes the forward's coefficients:
                        // the moments' values and the same running update.
                        let got = if step == 0 {
                            BatchMoments::apply(&sums, 1e-5, Some(&fused)).unwrap()
                        } else {
                            let request = ForwardCoefficients {
                                input: dtype,
                                weight: None,
                                bias: None,
                            };
                            let (moments, coef) = BatchMoments::apply_with_coefficients(
                                &sums,
                                1e-5,
                                Some(&fused),
                                &request,
                            )
                            .unwrap();
                            // hi, lo, invstd·1, bias 0, then zeros.
                            let m = host_f64(&moments).unwrap();
                            let want: Vec<f64> = (0..3)
                                .flat_map(|c| {
                                    let (mean, invstd) = (m[c], m[3 + c]);
                                    let (hi, lo, b) = if dtype == DType::F64 {
                                        (mean, 0.0, invstd)
                                    } else {
                                        let hi = mean as f32;
                                        (
                                            hi as f64,
                                            (mean - hi as f64) as f32 as f64,
                                            invstd as f32 as f64,
                                        )
                                    };
                                    [hi, lo, b, 0.0, 0.0, 0.0, 0.0, 0.0]
                                })
                                .collect();
                            assert_eq!(coef.dims(), [3, 8]);
                            assert_eq!(host_f64(&coef).unwrap(), want, "{dtype:?} coefficients");
                            moments
                        };
                        separate
                            .num_batches_tracked
                            .inplace_op1(&CounterIncrement)
                            .unwrap();
                        for (t, stat) in [
                            (&separate.mean, RunningStat::Mean),
                            (&separate.var, RunningStat::Var),
                        ] {
                            let update = RunningStatsUpdate { momentum, stat };
                            t.inplace_op3(&sums, &separate.num_batches_tracked, &update)
                                .unwrap();
                        }
                        let want = sums.apply_op1_no_bwd(&Moments { eps: 1e-5 }).unwrap();
                        let what =
                            format!("{dtype:?} counter {counter:?} {momentum:?} step {step}");
                        assert_eq!(bits(&got), bits(&want), "moments {what}");
                        assert_eq!(bits(&fused.mean), bits(&separate.mean), "mean {what}");
                        assert_eq!(bits(&fused.var), bits(&separate.var), "var {what}");
                        assert_eq!(
                            bits(&fused.num_batches_tracked),
                            bits(&separate.num_batches_tracked),
                            "counter {what}"
                        );
                    }
                    assert_eq!(
                        crate::ops::counter_value(&fused.num_batches_tracked, &"test").unwrap(),
                        5,
                        "{dtype:?} {counter:?}"
                    );
                }
            }
        }
        // Without running statistics: the moments alone.
        let alone = BatchMoments::apply(&sums, 1e-3, None).unwrap();
        let want = sums.apply_op1_no_bwd(&Moments { eps: 1e-3 }).unwrap();
        assert_eq!(bits(&alone), bits(&want));
    }

    #[test]
    fn shared_storages_and_bad_tensors_are_errors_not_deadlocks() {
        let sums = Tensor::ones((3, 3), DType::F64, &Device::Cpu).unwrap();
        let r = running(DType::F32, DType::I64, 0, Some(0.1));
        let same = RunningTensors {
            var: r.mean.clone(),
            ..r.clone()
        };
        let err = BatchMoments::apply(&sums, 1e-5, Some(&same))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("running variance and the running mean share their storage"),
            "{err}"
        );
        let flat = sums.flatten_all().unwrap();
        let aliased = RunningTensors {
            mean: flat.narrow(0, 0, 3).unwrap(),
            ..r.clone()
        };
        let err = BatchMoments::apply(&sums, 1e-5, Some(&aliased))
            .unwrap_err()
            .to_string();
        assert!(err.contains("running mean and the sums share"), "{err}");
        let short = RunningTensors {
            var: Tensor::ones(2, DType::F32, &Device::Cpu).unwrap(),
            ..r.clone()
        };
        let err = BatchMoments::apply(&sums, 1e-5, Some(&short))
            .unwrap_err()
            .to_string();
        assert!(err.contains("running variance of 3 elements"), "{err}");
        let err = BatchMoments::apply(&sums.get(0).unwrap(), 1e-5, Some(&r))
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected (3, C) sums"), "{err}");
        // The coefficients' weight read while the running mean is written.
        let request = ForwardCoefficients {
            input: DType::F32,
            weight: Some(r.mean.clone()),
            bias: None,
        };
        let err = BatchMoments::apply_with_coefficients(&sums, 1e-5, Some(&r), &request)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the weight and the running mean share their storage"),
            "{err}"
        );
        let request = ForwardCoefficients {
            bias: Some(Tensor::ones(2, DType::F32, &Device::Cpu).unwrap()),
            ..request
        };
        let request = ForwardCoefficients {
            weight: None,
            ..request
        };
        let err = BatchMoments::apply_with_coefficients(&sums, 1e-5, Some(&r), &request)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expected a float bias of 3 elements for the coefficients, got F32 [2]"),
            "{err}"
        );
    }
}
