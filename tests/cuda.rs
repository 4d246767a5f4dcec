//! The CUDA path against the CPU path: every op on the layout matrix, the whole
//! layer on the configuration matrix, k in-process ranks on CUDA against one
//! rank, and bitwise determinism.
//!
//! Every test first opens CUDA device 0; without one (no GPU, a stub driver, or
//! a build without the `cuda` feature) it prints that it was skipped and passes,
//! or fails where `SYNCBN_REQUIRE_CUDA=1` says a GPU is expected.
//!
//! They all also run on the emulated GPU (`scripts/emulated-gpu.sh`), which
//! runs this crate's kernels and candle's element-wise, cast, fill and
//! reduction kernels compiled for the host.
//!
//! Empty tensors on CUDA: the driver rejects empty allocations and empty
//! launches, and candle 0.11 makes both for its own ops on empty tensors
//! (huggingface/candle#2327). The op tests therefore take their empty batch as
//! an empty view of a non-empty buffer, and the k-rank test gives every rank
//! at least one sample (ranks with empty batches are tested on the CPU, in
//! tests/cpu/ranks.rs).

mod common;

use candle::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::ops::{
    AffineGrads, BatchMoments, BatchNormOp, BatchStats, CounterIncrement, ForwardCoefficients,
    FusedRelu, GradStats, InputGrad, Moments, RunningStat, RunningStatsUpdate, RunningTensors,
    StackParams, COEFFICIENTS_PER_CHANNEL,
};
use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use common::*;
use std::time::Duration;

/// CUDA device 0, or return from the test after printing that it was skipped
/// (a failure under `SYNCBN_REQUIRE_CUDA=1`).
macro_rules! cuda_or_skip {
    ($name:expr) => {
        match Device::new_cuda(0) {
            Ok(d) => d,
            Err(e) => {
                skip_without_gpu(&format!("skipped {}: no CUDA device ({e})", $name));
                return;
            }
        }
    };
}

const FLOATS: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];

/// Tolerance of op outputs of unit scale, CUDA vs CPU.
fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-10, 1e-10),
        DType::F32 => (1e-5, 1e-5),
        DType::F16 => (5e-3, 5e-3),
        DType::BF16 => (3e-2, 3e-2),
        _ => unreachable!(),
    }
}

/// Tolerance of f64 sums accumulated in the input's accumulator, relative to
/// the sums' scale.
fn sum_tol(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-11
    } else {
        2e-6
    }
}

/// Compares two tensors (any devices, dtypes, layouts) element-wise.
fn close(what: &str, got: &Tensor, expected: &Tensor, atol: f64, rtol: f64) {
    assert_eq!(got.dims(), expected.dims(), "{what}: shapes differ");
    assert_close(what, &values(got), &values(expected), atol, rtol);
}

/// Compares `(rows, C)` sums row by row, each relative to its largest magnitude.
fn close_sums(what: &str, got: &Tensor, expected: &Tensor, rel: f64) {
    assert_eq!(got.dims(), expected.dims(), "{what}: shapes differ");
    let (g, e) = (values(got), values(expected));
    let c = got.dims()[1].max(1);
    for (r, (gr, er)) in g.chunks(c).zip(e.chunks(c)).enumerate() {
        let scale = er.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        assert_close(&format!("{what} row {r}"), gr, er, rel * scale, 0.0);
    }
}

/// One input layout of the op matrix: the tensor (CPU) and its channel axis.
struct Case {
    name: String,
    x: Tensor,
    axis: usize,
}

/// Data of logical shape `shape` (`(N, C, *)`) in `dtype`, with per-channel
/// means far from zero so that centering matters.
fn data(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let c = shape[1];
    let inner: usize = shape[2..].iter().product();
    let xs: Vec<f64> = (0..n)
        .map(|i| {
            let ch = (i / inner.max(1)) % c.max(1);
            3.0 * ch as f64 - 4.0 + (1.0 + 0.25 * ch as f64) * rng.normal()
        })
        .collect();
    tensor(&xs, shape, dtype)
}

/// The layout matrix for `dtype`: contiguous ranks 2 to 5, the sizes that pick
/// each work split (few large channels, many tiny channels, 2-D batches),
/// channels-last (as the layer passes it, and as a permuted NCHW view),
/// narrowed and offset views, a transposed 2-D batch, odd sizes, an empty batch.
fn cases(dtype: DType) -> Vec<Case> {
    let mut out = Vec::new();
    let mut push = |name: &str, x: Tensor, axis: usize| {
        out.push(Case {
            name: format!("{name} {dtype:?}"),
            x,
            axis,
        })
    };
    push("rank 2", data(&[37, 5], dtype, 1), 1);
    push("rank 3", data(&[4, 3, 33], dtype, 2), 1);
    push("rank 4", data(&[3, 4, 8, 8], dtype, 3), 1);
    push("rank 5", data(&[2, 3, 4, 5, 6], dtype, 4), 1);
    push("few large channels", data(&[4, 3, 64, 64], dtype, 5), 1);
    push("many tiny channels", data(&[8, 256, 7, 7], dtype, 6), 1);
    push("2-D many channels", data(&[512, 96], dtype, 7), 1);
    push("odd sizes", data(&[3, 5, 7], dtype, 8), 1);
    // 14x14 maps: rows of 196, 8-byte loads of f16/bf16 (the *_half_* kernels).
    push("14x14 maps", data(&[4, 8, 14, 14], dtype, 16), 1);
    let nchw = data(&[4, 16, 6, 10], dtype, 9);
    let nhwc = nchw.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
    push("channels-last (N,H,W,C) axis 3", nhwc.clone(), 3);
    push(
        "channels-last permuted (N,C,H,W)",
        nhwc.permute((0, 3, 1, 2)).unwrap(),
        1,
    );
    let odd = data(&[3, 6, 5, 3], dtype, 10)
        .permute((0, 2, 3, 1))
        .unwrap()
        .contiguous()
        .unwrap();
    push("channels-last odd sizes axis 3", odd, 3);
    push(
        "narrowed batch",
        data(&[5, 4, 8, 8], dtype, 11).narrow(0, 1, 3).unwrap(),
        1,
    );
    push(
        "narrowed inner (offset 1)",
        data(&[3, 4, 20], dtype, 12).narrow(2, 1, 17).unwrap(),
        1,
    );
    push(
        "narrowed channels",
        data(&[3, 9, 16], dtype, 13).narrow(1, 2, 5).unwrap(),
        1,
    );
    push("transposed 2-D", data(&[24, 40], dtype, 14).t().unwrap(), 1);
    // An empty batch as it arises on a GPU: a slice of a batch. (CUDA rejects
    // empty allocations, so candle cannot copy an empty buffer to the device.)
    push(
        "empty batch",
        data(&[2, 4, 3, 3], dtype, 15).narrow(0, 1, 0).unwrap(),
        1,
    );
    out
}

/// The `(3, C)` moments of `x` (via the CPU ops) on `dev`.
fn moments_of(x: &Tensor, axis: usize, dev: &Device) -> Tensor {
    let sums = x.apply_op1_no_bwd(&BatchStats { axis }).unwrap();
    sums.apply_op1_no_bwd(&Moments { eps: 1e-5 })
        .unwrap()
        .to_device(dev)
        .unwrap()
}

#[test]
fn batch_stats_match_cpu() {
    let dev = cuda_or_skip!("batch_stats_match_cpu");
    for dtype in FLOATS {
        for case in cases(dtype) {
            let op = BatchStats { axis: case.axis };
            let cpu = case.x.apply_op1_no_bwd(&op).unwrap();
            let gpu = case
                .x
                .to_device(&dev)
                .unwrap()
                .apply_op1_no_bwd(&op)
                .unwrap();
            assert!(gpu.device().is_cuda());
            close_sums(&case.name, &gpu, &cpu, sum_tol(dtype));
            // Counts are exact.
            close(
                &format!("{} counts", case.name),
                &gpu.get(0).unwrap(),
                &cpu.get(0).unwrap(),
                0.0,
                0.0,
            );
        }
    }
}

#[test]
fn batch_stats_keep_precision_for_large_means() {
    let dev = cuda_or_skip!("batch_stats_keep_precision_for_large_means");
    // |mean| / std = 1e4: f32 sums of squares would lose everything.
    let mut rng = Rng::new(99);
    let shape = [16, 3, 32, 32];
    let n: usize = shape.iter().product();
    let xs: Vec<f64> = (0..n).map(|_| 1e4 + rng.normal()).collect();
    let x = tensor(&xs, &shape, DType::F32);
    let cpu = x
        .apply_op1_no_bwd(&BatchStats { axis: 1 })
        .unwrap()
        .apply_op1_no_bwd(&Moments { eps: 0.0 })
        .unwrap();
    let gpu = x
        .to_device(&dev)
        .unwrap()
        .apply_op1_no_bwd(&BatchStats { axis: 1 })
        .unwrap()
        .apply_op1_no_bwd(&Moments { eps: 0.0 })
        .unwrap();
    // invstd agrees to a few f32 ulps of the data, relative.
    close("large-mean moments", &gpu, &cpu, 0.0, 1e-4);
}

#[test]
fn moments_match_cpu() {
    let dev = cuda_or_skip!("moments_match_cpu");
    // From sums, with an empty channel (count 0).
    let sums = Tensor::new(
        &[
            [10.0f64, 0.0, 3.0, 1e6],
            [25.0, 0.0, -1.5, 3e9],
            [80.0, 0.0, 2.0, 9.0000001e12],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let op = Moments { eps: 1e-5 };
    let cpu = sums.apply_op1_no_bwd(&op).unwrap();
    let gpu = sums.to_device(&dev).unwrap().apply_op1_no_bwd(&op).unwrap();
    close("moments from sums", &gpu, &cpu, 0.0, 1e-15);
    // Transposed (strided) sums.
    let st = sums.t().unwrap().contiguous().unwrap().t().unwrap();
    let gpu = st.to_device(&dev).unwrap().apply_op1_no_bwd(&op).unwrap();
    close("moments from strided sums", &gpu, &cpu, 0.0, 1e-15);
    // From running statistics of every float dtype.
    for dtype in FLOATS {
        let m = tensor(&[0.5, -1.0, 2.0], &[3], dtype);
        let v = tensor(&[1.0, 0.25, 4.0], &[3], dtype);
        let cpu = m.apply_op2_no_bwd(&v, &op).unwrap();
        let gpu = m
            .to_device(&dev)
            .unwrap()
            .apply_op2_no_bwd(&v.to_device(&dev).unwrap(), &op)
            .unwrap();
        close(
            &format!("running moments {dtype:?}"),
            &gpu,
            &cpu,
            0.0,
            1e-15,
        );
        // With the forward's coefficients (eval's one launch): the same
        // moments, and coefficients bit for bit the CPU's.
        let (w, b) = params(3, dtype);
        for input in FLOATS {
            let request = |d: &Device| ForwardCoefficients {
                input,
                weight: Some(w.to_device(d).unwrap()),
                bias: Some(b.to_device(d).unwrap()),
            };
            let (cm, cc) =
                Moments::running_with_coefficients(&m, &v, 1e-5, &request(&Device::Cpu)).unwrap();
            let (gm, gc) = Moments::running_with_coefficients(
                &m.to_device(&dev).unwrap(),
                &v.to_device(&dev).unwrap(),
                1e-5,
                &request(&dev),
            )
            .unwrap();
            let what = format!("running moments {dtype:?} with coefficients for {input:?}");
            assert_eq!(values(&cm), values(&cpu), "{what}: cpu moments");
            close(&what, &gm, &cpu, 0.0, 1e-15);
            assert_eq!(gc.dtype(), ForwardCoefficients::dtype(input).unwrap());
            assert_eq!(values(&gc), values(&cc), "{what}: coefficients");
        }
    }
}

/// Coefficients computed with the moments and handed to the ops give their
/// results bit for bit: the forward (affine or not, with the fused ReLU and
/// the residual) and the gradient sums after a fused ReLU, which read them
/// instead of launching the coefficient kernel. Coefficients of the wrong
/// shape or dtype are errors that say what was expected.
#[test]
fn handed_coefficients_give_the_ops_results_bit_for_bit() {
    let dev = cuda_or_skip!("handed_coefficients_give_the_ops_results_bit_for_bit");
    let bits = |t: &Tensor| -> Vec<u64> { values(t).iter().map(|v| v.to_bits()).collect() };
    for dtype in FLOATS {
        for case in cases(dtype) {
            let c = case.x.dims()[case.axis];
            let x = case.x.to_device(&dev).unwrap();
            let sums = x.apply_op1_no_bwd(&BatchStats { axis: case.axis }).unwrap();
            let (w, b) = params(c, dtype);
            let (w, b) = (w.to_device(&dev).unwrap(), b.to_device(&dev).unwrap());
            let z = x.affine(0.5, -1.0).unwrap();
            for affine in [false, true] {
                let request = ForwardCoefficients {
                    input: dtype,
                    weight: affine.then(|| w.clone()),
                    bias: affine.then(|| b.clone()),
                };
                let (moments, coef) =
                    BatchMoments::apply_with_coefficients(&sums, 1e-5, None, &request).unwrap();
                for relu in [false, true] {
                    let what = format!("{} affine {affine} relu {relu}", case.name);
                    let op = |coefficients: Option<Tensor>| BatchNormOp {
                        relu,
                        coefficients,
                        ..norm_op(moments.clone(), case.axis)
                    };
                    let (plain, handed) = (op(None), op(Some(coef.clone())));
                    let forward = |op: &BatchNormOp| {
                        if affine {
                            x.apply_op3_no_bwd(&w, &b, op).unwrap()
                        } else {
                            x.apply_op1_no_bwd(op).unwrap()
                        }
                    };
                    assert_eq!(bits(&forward(&handed)), bits(&forward(&plain)), "{what}");
                    // With the residual (BatchNormAddOp), without weight and bias.
                    if !affine {
                        let add = |norm: BatchNormOp| {
                            x.apply_op2_no_bwd(&z, &candle_syncbn::ops::BatchNormAddOp { norm })
                                .unwrap()
                        };
                        assert_eq!(
                            bits(&add(handed.clone())),
                            bits(&add(plain.clone())),
                            "{what} + z"
                        );
                    }
                }
                // The gradient sums after a fused ReLU, its mask from the
                // handed coefficients or from the coefficient kernel.
                let dy = x.affine(-0.3, 0.7).unwrap();
                let grad_op = |coefficients: Option<Tensor>| GradStats {
                    axis: case.axis,
                    moments: moments.clone(),
                    relu: Some(FusedRelu {
                        weight: affine.then(|| w.clone()),
                        bias: affine.then(|| b.clone()),
                        coefficients,
                    }),
                };
                let handed = dy
                    .apply_op2_no_bwd(&x, &grad_op(Some(coef.clone())))
                    .unwrap();
                let plain = dy.apply_op2_no_bwd(&x, &grad_op(None)).unwrap();
                assert_eq!(
                    bits(&handed),
                    bits(&plain),
                    "{} affine {affine}: gradient sums",
                    case.name
                );
            }
        }
    }
    // Coefficients that do not fit the input.
    let x = data(&[4, 3, 5], DType::F32, 1).to_device(&dev).unwrap();
    let sums = x.apply_op1_no_bwd(&BatchStats { axis: 1 }).unwrap();
    let moments = BatchMoments::apply(&sums, 1e-5, None).unwrap();
    let wrong = [
        Tensor::zeros((3, 8), DType::F64, &dev).unwrap(),
        Tensor::zeros((4, 8), DType::F32, &dev).unwrap(),
        Tensor::zeros((3, 16), DType::F32, &dev)
            .unwrap()
            .narrow(1, 8, 8)
            .unwrap(),
    ];
    for coef in wrong {
        let op = BatchNormOp {
            coefficients: Some(coef.clone()),
            ..norm_op(moments.clone(), 1)
        };
        let e = x.apply_op1_no_bwd(&op).unwrap_err().to_string();
        assert!(
            e.contains("expected coefficients of shape [3, 8] in F32, contiguous from the start of their storage"),
            "{:?} {:?}: {e}",
            coef.dtype(),
            coef.dims()
        );
    }
}

#[test]
fn running_stats_update_and_counter_match_cpu() {
    let dev = cuda_or_skip!("running_stats_update_and_counter_match_cpu");
    let sums = Tensor::new(
        &[[10.0f64, 4.0, 7.0], [25.0, -2.0, 70.0], [80.0, 9.0, 720.0]],
        &Device::Cpu,
    )
    .unwrap();
    for dtype in FLOATS {
        for momentum in [Some(0.1), None] {
            for stat in [RunningStat::Mean, RunningStat::Var] {
                for count in [1i64, 5] {
                    let update = RunningStatsUpdate { momentum, stat };
                    let start = tensor(&[0.5, 1.0, -2.0], &[3], dtype);
                    let cpu = Var::from_tensor(&start).unwrap();
                    let counter = Tensor::new(count, &Device::Cpu).unwrap();
                    cpu.as_tensor()
                        .inplace_op3(&sums, &counter, &update)
                        .unwrap();
                    let gpu = Var::from_tensor(&start.to_device(&dev).unwrap()).unwrap();
                    gpu.as_tensor()
                        .inplace_op3(
                            &sums.to_device(&dev).unwrap(),
                            &counter.to_device(&dev).unwrap(),
                            &update,
                        )
                        .unwrap();
                    let (atol, rtol) = tol(dtype);
                    close(
                        &format!(
                            "running {stat:?} {dtype:?} momentum {momentum:?} counter {count}"
                        ),
                        gpu.as_tensor(),
                        cpu.as_tensor(),
                        atol.min(1e-12),
                        rtol.min(1e-12),
                    );
                }
            }
        }
    }
    for dtype in [DType::I64, DType::U32, DType::F32, DType::F64] {
        let t = Tensor::new(41u32, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_device(&dev)
            .unwrap();
        let v = Var::from_tensor(&t).unwrap();
        v.as_tensor().inplace_op1(&CounterIncrement).unwrap();
        v.as_tensor().inplace_op1(&CounterIncrement).unwrap();
        let got = values(v.as_tensor());
        assert_eq!(got, vec![43.0], "counter {dtype:?}");
    }
}

/// The training step's moments, running statistics and counter in one
/// launch (`bn_batch_moments`), and the forward's coefficients with them,
/// bit for bit the CPU's.
#[test]
fn batch_moments_match_cpu() {
    let dev = cuda_or_skip!("batch_moments_match_cpu");
    let sums = Tensor::new(
        &[[10.0f64, 4.0, 7.0], [25.0, -2.0, 70.0], [80.0, 9.0, 720.0]],
        &Device::Cpu,
    )
    .unwrap();
    // 300 channels: more than one block's threads.
    let wide = Tensor::rand(1.0f64, 3.0, (3, 300), &Device::Cpu).unwrap();
    for sums in [sums, wide] {
        let c = sums.dims()[1];
        let start: Vec<f64> = (0..c).map(|i| 0.5 + 0.01 * i as f64).collect();
        for dtype in FLOATS {
            for counter in [DType::I64, DType::U32, DType::F32, DType::F64] {
                for momentum in [Some(0.1), None] {
                    let make = |d: &Device| {
                        let var = |t: Tensor| {
                            Var::from_tensor(&t.to_device(d).unwrap())
                                .unwrap()
                                .as_tensor()
                                .clone()
                        };
                        RunningTensors {
                            mean: var(tensor(&start, &[c], dtype)),
                            var: var(tensor(&start, &[c], dtype).affine(2.0, 0.0).unwrap()),
                            num_batches_tracked: var(Tensor::new(4i64, &Device::Cpu)
                                .unwrap()
                                .to_dtype(counter)
                                .unwrap()),
                            momentum,
                        }
                    };
                    let (cpu, gpu) = (make(&Device::Cpu), make(&dev));
                    let gpu_sums = sums.to_device(&dev).unwrap();
                    let (w, b) = params(c, dtype);
                    let request = |d: &Device, affine: bool| ForwardCoefficients {
                        input: dtype,
                        weight: affine.then(|| w.to_device(d).unwrap()),
                        bias: affine.then(|| b.to_device(d).unwrap()),
                    };
                    // Step 0 alone; steps 1 and 2 with the forward's
                    // coefficients (with and without weight and bias), and
                    // step 3 with them but no running statistics.
                    for step in 0..4 {
                        let what =
                            format!("C {c} {dtype:?} counter {counter:?} {momentum:?} step {step}");
                        let (cpu_run, gpu_run) = if step == 3 {
                            (None, None)
                        } else {
                            (Some(&cpu), Some(&gpu))
                        };
                        let (want, got) = if step == 0 {
                            (
                                BatchMoments::apply(&sums, 1e-5, cpu_run).unwrap(),
                                BatchMoments::apply(&gpu_sums, 1e-5, gpu_run).unwrap(),
                            )
                        } else {
                            let affine = step != 2;
                            let (want, want_coef) = BatchMoments::apply_with_coefficients(
                                &sums,
                                1e-5,
                                cpu_run,
                                &request(&Device::Cpu, affine),
                            )
                            .unwrap();
                            let (got, got_coef) = BatchMoments::apply_with_coefficients(
                                &gpu_sums,
                                1e-5,
                                gpu_run,
                                &request(&dev, affine),
                            )
                            .unwrap();
                            assert_eq!(got_coef.dims(), [c, COEFFICIENTS_PER_CHANNEL]);
                            assert_eq!(
                                values(&got_coef),
                                values(&want_coef),
                                "coefficients {what}"
                            );
                            (want, got)
                        };
                        assert_eq!(values(&got), values(&want), "moments {what}");
                        assert_eq!(values(&gpu.mean), values(&cpu.mean), "running mean {what}");
                        assert_eq!(values(&gpu.var), values(&cpu.var), "running var {what}");
                        assert_eq!(
                            values(&gpu.num_batches_tracked),
                            values(&cpu.num_batches_tracked),
                            "counter {what}"
                        );
                    }
                    assert_eq!(values(&gpu.num_batches_tracked), [7.0]);
                }
            }
        }
    }
}

fn params(c: usize, dtype: DType) -> (Tensor, Tensor) {
    let w: Vec<f64> = (0..c).map(|i| 0.75 + 0.1 * i as f64).collect();
    let b: Vec<f64> = (0..c).map(|i| 0.2 - 0.05 * i as f64).collect();
    (tensor(&w, &[c], dtype), tensor(&b, &[c], dtype))
}

fn norm_op(moments: Tensor, axis: usize) -> BatchNormOp {
    BatchNormOp {
        axis,
        moments,
        batch_stats: true,
        group: ProcessGroup::single(),
        relu: false,
        layer: "test".to_string(),
        coefficients: None,
    }
}

#[test]
fn batch_norm_op_matches_cpu() {
    let dev = cuda_or_skip!("batch_norm_op_matches_cpu");
    for dtype in FLOATS {
        for case in cases(dtype) {
            let c = case.x.dims()[case.axis];
            let xg = case.x.to_device(&dev).unwrap();
            let cpu_op = norm_op(moments_of(&case.x, case.axis, &Device::Cpu), case.axis);
            let gpu_op = norm_op(moments_of(&case.x, case.axis, &dev), case.axis);
            let (atol, rtol) = tol(dtype);
            let cpu = case.x.apply_op1_no_bwd(&cpu_op).unwrap();
            let gpu = xg.apply_op1_no_bwd(&gpu_op).unwrap();
            assert!(gpu.is_contiguous());
            close(&format!("{} plain", case.name), &gpu, &cpu, atol, rtol);
            for pdtype in [dtype, DType::F32] {
                let (w, b) = params(c, pdtype);
                let cpu = case.x.apply_op3_no_bwd(&w, &b, &cpu_op).unwrap();
                let gpu = xg
                    .apply_op3_no_bwd(
                        &w.to_device(&dev).unwrap(),
                        &b.to_device(&dev).unwrap(),
                        &gpu_op,
                    )
                    .unwrap();
                assert_eq!(gpu.dtype(), dtype);
                close(
                    &format!("{} affine {pdtype:?}", case.name),
                    &gpu,
                    &cpu,
                    atol,
                    rtol,
                );
            }
        }
    }
}

/// Upstream gradients for a case: contiguous, and a broadcast of ones (the
/// gradient of `y.sum()`), both in the case's logical shape.
fn grads_for(case: &Case, seed: u64) -> Vec<(String, Tensor)> {
    let dims = case.x.dims().to_vec();
    let dtype = case.x.dtype();
    let mut rng = Rng::new(seed);
    let n: usize = dims.iter().product();
    let g = if n == 0 {
        // An empty view of a one-sample buffer (see "empty batch" in `cases`).
        let zero = dims.iter().position(|&d| d == 0).unwrap();
        let mut one = dims.clone();
        one[zero] = 1;
        let len: usize = one.iter().product();
        tensor(&rng.normals(len, 0.1, 1.0), &one, dtype)
            .narrow(zero, 0, 0)
            .unwrap()
    } else {
        tensor(&rng.normals(n, 0.1, 1.0), &dims, dtype)
    };
    let ones = Tensor::ones((), dtype, &Device::Cpu)
        .unwrap()
        .broadcast_as(dims.as_slice())
        .unwrap();
    vec![("dy".to_string(), g), ("broadcast dy".to_string(), ones)]
}

/// Per-channel `[Σ|dy|; Σ|dy·(x − mean)|]` (`(2, C)` flattened) of a case.
fn grad_scales(dy: &Tensor, x: &Tensor, axis: usize, mean: &[f64]) -> Vec<f64> {
    let dims = x.dims();
    let c = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let mut s = vec![0.0; 2 * c];
    for (i, (g, e)) in values(dy).iter().zip(values(x)).enumerate() {
        let ch = (i / inner.max(1)) % c.max(1);
        s[ch] += g.abs();
        s[c + ch] += (g * (e - mean[ch])).abs();
    }
    s
}

#[test]
fn grad_stats_match_cpu() {
    let dev = cuda_or_skip!("grad_stats_match_cpu");
    for dtype in FLOATS {
        for case in cases(dtype) {
            let xg = case.x.to_device(&dev).unwrap();
            let c = case.x.dims()[case.axis];
            let (w, b) = params(c, dtype);
            // Without a ReLU, then after a fused one (its mask recomputed from
            // x), with and without an affine transform.
            let relus = [
                None,
                Some(FusedRelu::default()),
                Some(FusedRelu {
                    weight: Some(w),
                    bias: Some(b),
                    coefficients: None,
                }),
            ];
            for ((gname, dy), relu) in grads_for(&case, 21)
                .into_iter()
                .flat_map(|g| relus.iter().map(move |r| (g.clone(), r.clone())))
            {
                let gname = format!(
                    "{gname}, relu {:?}",
                    relu.as_ref().map(|r| r.weight.is_some())
                );
                let cpu_op = GradStats {
                    axis: case.axis,
                    moments: moments_of(&case.x, case.axis, &Device::Cpu),
                    relu: relu.clone(),
                };
                let gpu_op = GradStats {
                    axis: case.axis,
                    moments: moments_of(&case.x, case.axis, &dev),
                    relu: relu.map(|r| FusedRelu {
                        weight: r.weight.map(|t| t.to_device(&dev).unwrap()),
                        bias: r.bias.map(|t| t.to_device(&dev).unwrap()),
                        coefficients: None,
                    }),
                };
                let cpu = dy.apply_op2_no_bwd(&case.x, &cpu_op).unwrap();
                let gpu = dy
                    .to_device(&dev)
                    .unwrap()
                    .apply_op2_no_bwd(&xg, &gpu_op)
                    .unwrap();
                // Sums of signed terms may cancel: each entry is compared
                // relative to its own value, with a floor proportional to its
                // channel's Σ|dy| or Σ|dy·(x − μ)| (the scale of the rounding
                // of either path's accumulation) and to the count.
                let n = (case.x.elem_count() / case.x.dims()[case.axis].max(1)).max(1) as f64;
                let (g, e) = (values(&gpu), values(&cpu));
                let floor = n * if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                let mean = values(&cpu_op.moments);
                let scales = grad_scales(&dy, &case.x, case.axis, &mean);
                let rtol = sum_tol(dtype) * 10.0;
                for (j, ((gv, ev), s)) in g.iter().zip(&e).zip(&scales).enumerate() {
                    let tol = floor.max(rtol * s) + rtol * ev.abs();
                    assert!(
                        (gv - ev).abs() <= tol,
                        "{} {gname}: entry {j}: got {gv}, expected {ev} (tolerance {tol:e})",
                        case.name
                    );
                }
            }
        }
    }
}

#[test]
fn input_grad_and_affine_grads_match_cpu() {
    let dev = cuda_or_skip!("input_grad_and_affine_grads_match_cpu");
    for dtype in FLOATS {
        for case in cases(dtype) {
            let c = case.x.dims()[case.axis];
            let xg = case.x.to_device(&dev).unwrap();
            let (atol, rtol) = tol(dtype);
            for (gname, dy) in grads_for(&case, 31) {
                let dyg = dy.to_device(&dev).unwrap();
                let m_cpu = moments_of(&case.x, case.axis, &Device::Cpu);
                let m_gpu = m_cpu.to_device(&dev).unwrap();
                let sums = dy
                    .apply_op2_no_bwd(
                        &case.x,
                        &GradStats {
                            axis: case.axis,
                            moments: m_cpu.clone(),
                            relu: None,
                        },
                    )
                    .unwrap();
                for pdtype in [dtype, DType::F32] {
                    let cpu = sums
                        .apply_op1_no_bwd(&AffineGrads {
                            moments: m_cpu.clone(),
                            dtype: pdtype,
                        })
                        .unwrap();
                    let gpu = sums
                        .to_device(&dev)
                        .unwrap()
                        .apply_op1_no_bwd(&AffineGrads {
                            moments: m_gpu.clone(),
                            dtype: pdtype,
                        })
                        .unwrap();
                    assert_eq!(gpu.dtype(), pdtype);
                    let (a, r) = tol(pdtype);
                    close(
                        &format!("{} {gname} affine grads {pdtype:?}", case.name),
                        &gpu,
                        &cpu,
                        a,
                        r,
                    );
                }
                let (w, b) = params(c, dtype);
                let on_dev = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(&dev).unwrap());
                for with_sums in [true, false] {
                    for (weight, relu) in [
                        (None, false),
                        (Some(w.clone()), false),
                        (None, true),
                        (Some(w.clone()), true),
                    ] {
                        // A fused ReLU's mask uses the forward's weight and bias.
                        let fused = relu.then(|| FusedRelu {
                            weight: weight.clone(),
                            bias: weight.as_ref().map(|_| b.clone()),
                            coefficients: None,
                        });
                        let cpu_op = InputGrad {
                            axis: case.axis,
                            moments: m_cpu.clone(),
                            grad_sums: with_sums.then(|| sums.clone()),
                            weight: weight.clone(),
                            relu: fused.clone(),
                        };
                        let gpu_op = InputGrad {
                            axis: case.axis,
                            moments: m_gpu.clone(),
                            grad_sums: with_sums.then(|| sums.to_device(&dev).unwrap()),
                            weight: on_dev(&weight),
                            relu: fused.map(|r| FusedRelu {
                                weight: on_dev(&r.weight),
                                bias: on_dev(&r.bias),
                                coefficients: None,
                            }),
                        };
                        let cpu = dy.apply_op2_no_bwd(&case.x, &cpu_op).unwrap();
                        let gpu = dyg.apply_op2_no_bwd(&xg, &gpu_op).unwrap();
                        assert!(gpu.is_contiguous());
                        close(
                            &format!(
                                "{} {gname} input grad (sums {with_sums}, weight {}, relu {relu})",
                                case.name,
                                weight.is_some()
                            ),
                            &gpu,
                            &cpu,
                            atol * 4.0,
                            rtol * 4.0,
                        );
                    }
                }
            }
        }
    }
}

/// The weight and bias gradients written by the kernel that combines the
/// gradient sums (`GradStats::apply_with_affine_grads`, one launch fewer) are
/// bit for bit those of `AffineGrads` on the same GPU sums, and the sums bit
/// for bit those of `GradStats` alone, on the GPU and on the CPU. Every
/// layout case (the empty batch included), after a fused ReLU or not,
/// parameters in the input's dtype and in f32.
#[test]
fn grad_stats_with_affine_grads_match_separate_ops() {
    let dev = cuda_or_skip!("grad_stats_with_affine_grads_match_separate_ops");
    let bits = |t: &Tensor| -> Vec<u64> { values(t).iter().map(|v| v.to_bits()).collect() };
    for dtype in FLOATS {
        for case in cases(dtype) {
            let c = case.x.dims()[case.axis];
            let xg = case.x.to_device(&dev).unwrap();
            let (w, b) = params(c, dtype);
            for (gname, dy) in grads_for(&case, 41) {
                let dyg = dy.to_device(&dev).unwrap();
                for relu in [None, Some((w.clone(), b.clone()))] {
                    let op_on = |d: &Device| GradStats {
                        axis: case.axis,
                        moments: moments_of(&case.x, case.axis, d),
                        relu: relu.as_ref().map(|(w, b)| FusedRelu {
                            weight: Some(w.to_device(d).unwrap()),
                            bias: Some(b.to_device(d).unwrap()),
                            coefficients: None,
                        }),
                    };
                    let (gpu_op, cpu_op) = (op_on(&dev), op_on(&Device::Cpu));
                    for pdtype in [dtype, DType::F32] {
                        let what = format!(
                            "{} {gname} relu {} params {pdtype:?}",
                            case.name,
                            relu.is_some()
                        );
                        let (sums, affine) =
                            gpu_op.apply_with_affine_grads(&dyg, &xg, pdtype).unwrap();
                        let alone = dyg.apply_op2_no_bwd(&xg, &gpu_op).unwrap();
                        let separate = alone
                            .apply_op1_no_bwd(&AffineGrads {
                                moments: gpu_op.moments.clone(),
                                dtype: pdtype,
                            })
                            .unwrap();
                        assert_eq!(affine.dtype(), pdtype, "{what}");
                        assert_eq!(affine.dims(), [2, c], "{what}");
                        assert_eq!(bits(&sums), bits(&alone), "{what}: sums");
                        assert_eq!(bits(&affine), bits(&separate), "{what}: affine grads");
                        // The CPU's fused op likewise matches its separate
                        // ops bit for bit (GPU against CPU: the two tests above).
                        let (cpu_sums, cpu_affine) = cpu_op
                            .apply_with_affine_grads(&dy, &case.x, pdtype)
                            .unwrap();
                        let cpu_alone = dy.apply_op2_no_bwd(&case.x, &cpu_op).unwrap();
                        let cpu_separate = cpu_alone
                            .apply_op1_no_bwd(&AffineGrads {
                                moments: cpu_op.moments.clone(),
                                dtype: pdtype,
                            })
                            .unwrap();
                        assert_eq!(bits(&cpu_sums), bits(&cpu_alone), "{what}: cpu sums");
                        assert_eq!(
                            bits(&cpu_affine),
                            bits(&cpu_separate),
                            "{what}: cpu affine grads"
                        );
                    }
                }
            }
        }
    }
}

/// `StackParams` on the GPU (one launch): the CPU's values bit for bit, for
/// equal and mixed dtypes and strided parameters, and each parameter's row of
/// the gradient in its own dtype.
#[test]
fn stack_params_match_cpu() {
    let dev = cuda_or_skip!("stack_params_match_cpu");
    let pairs = [
        (DType::F32, DType::F32),
        (DType::BF16, DType::BF16),
        (DType::F16, DType::F16),
        (DType::F64, DType::F64),
        (DType::F64, DType::F16),
        (DType::BF16, DType::F32),
    ];
    let base = data(&[1, 300], DType::F64, 17).flatten_all().unwrap();
    for (wd, bd) in pairs {
        for strided in [false, true] {
            let make = |d: &Device| {
                let on = |t: Tensor| Var::from_tensor(&t.to_device(d).unwrap()).unwrap();
                let (w, b) = (
                    on(base.to_dtype(wd).unwrap()),
                    on(base.affine(-0.5, 0.25).unwrap().to_dtype(bd).unwrap()),
                );
                // Strided: the weight a contiguous half at offset 10, the
                // bias every other element from offset 1.
                let (wv, bv) = if strided {
                    (
                        w.as_tensor().narrow(0, 10, 150).unwrap(),
                        b.as_tensor()
                            .reshape((150, 2))
                            .unwrap()
                            .narrow(1, 1, 1)
                            .unwrap()
                            .squeeze(1)
                            .unwrap(),
                    )
                } else {
                    (w.as_tensor().clone(), b.as_tensor().clone())
                };
                let wb = wv.apply_op2(&bv, StackParams).unwrap();
                let g = Tensor::arange(0f32, wb.elem_count() as f32, d)
                    .unwrap()
                    .reshape(wb.shape())
                    .unwrap()
                    .to_dtype(wb.dtype())
                    .unwrap();
                let grads = (&wb * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let gw = grads.get(w.as_tensor()).unwrap().clone();
                let gb = grads.get(b.as_tensor()).unwrap().clone();
                (wb, gw, gb)
            };
            let (cpu, gpu) = (make(&Device::Cpu), make(&dev));
            let what = format!("{wd:?} {bd:?} strided {strided}");
            assert_eq!(gpu.0.dtype(), StackParams::dtype(wd, bd), "{what}");
            assert_eq!(gpu.0.dims(), cpu.0.dims(), "{what}");
            assert_eq!(values(&gpu.0), values(&cpu.0), "{what}: stack");
            assert_eq!((gpu.1.dtype(), gpu.2.dtype()), (wd, bd), "{what}");
            assert_eq!(values(&gpu.1), values(&cpu.1), "{what}: weight gradient");
            assert_eq!(values(&gpu.2), values(&cpu.2), "{what}: bias gradient");
        }
    }
}

#[test]
fn unsupported_dtypes_are_errors() {
    let dev = cuda_or_skip!("unsupported_dtypes_are_errors");
    let x = Tensor::zeros((2, 3, 4), DType::U32, &dev).unwrap();
    assert!(x.apply_op1_no_bwd(&BatchStats { axis: 1 }).is_err());
    let m = moments_of(&data(&[2, 3, 4], DType::F32, 1), 1, &dev);
    assert!(x.apply_op1_no_bwd(&norm_op(m.clone(), 1)).is_err());
    assert!(x
        .apply_op2_no_bwd(
            &x,
            &GradStats {
                axis: 1,
                moments: m,
                relu: None,
            }
        )
        .is_err());
    let c = Var::from_tensor(&Tensor::zeros((), DType::U8, &dev).unwrap()).unwrap();
    assert!(c.as_tensor().inplace_op1(&CounterIncrement).is_err());
}

/// One rank's inputs: per step `(shape, x, dy)` in logical `(N, C, *)` order.
type Steps = Vec<(Vec<usize>, Vec<f64>, Vec<f64>)>;

/// Runs the layer on `dev`: training steps with upstream gradients, then an
/// eval forward. `channels_last` feeds NHWC-strided inputs (rank ≥ 3).
#[allow(clippy::too_many_arguments)]
fn run_layer(
    dev: &Device,
    group: ProcessGroup,
    cfg: SyncBatchNormConfig,
    dtype: DType,
    c_n: usize,
    steps: &Steps,
    eval: &(Vec<usize>, Vec<f64>),
    channels_last: bool,
) -> candle::Result<RankRun> {
    run_layer_with(
        dev,
        group,
        cfg,
        dtype,
        c_n,
        steps,
        eval,
        channels_last,
        false,
    )
}

/// [`run_layer`] through `forward_relu_t` (the fused ReLU) when `relu`.
#[allow(clippy::too_many_arguments)]
fn run_layer_with(
    dev: &Device,
    group: ProcessGroup,
    cfg: SyncBatchNormConfig,
    dtype: DType,
    c_n: usize,
    steps: &Steps,
    eval: &(Vec<usize>, Vec<f64>),
    channels_last: bool,
    relu: bool,
) -> candle::Result<RankRun> {
    let varmap = VarMap::new();
    let param_dtype = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let vb = VarBuilder::from_varmap(&varmap, param_dtype, dev);
    let bn = SyncBatchNorm::new(c_n, cfg, vb.pp("bn"), group)?;
    if let Some((w, b)) = bn.weight_and_bias() {
        let (wv, bv) = params(c_n, param_dtype);
        Var::from_tensor(w)?.set(&wv.to_device(dev)?)?;
        Var::from_tensor(b)?.set(&bv.to_device(dev)?)?;
    }
    // The input variable, the input in logical (N, C, *) order (a permuted view
    // of NHWC storage for channels_last), and the permutation from the
    // variable's layout back to the logical order.
    let input =
        |shape: &[usize], xs: &[f64]| -> candle::Result<(Var, Tensor, Option<Vec<usize>>)> {
            let t = tensor(xs, shape, dtype).to_device(dev)?;
            if channels_last && shape.len() >= 3 {
                let (to_last, back) = channels_last_perm(shape.len());
                let v = Var::from_tensor(&t.permute(to_last)?.contiguous()?)?;
                let x = v.as_tensor().permute(back.clone())?;
                Ok((v, x, Some(back)))
            } else {
                let v = Var::from_tensor(&t)?;
                let x = v.as_tensor().clone();
                Ok((v, x, None))
            }
        };
    let mut run = RankRun::default();
    for (shape, xs, gs) in steps {
        let (var, x, back) = input(shape, xs)?;
        let g = tensor(gs, shape, DType::F64).to_device(dev)?;
        let y = forward_maybe_relu(&bn, &x, true, relu)?;
        let loss = (y.to_dtype(DType::F64)? * g)?.sum_all()?;
        let store = loss.backward()?;
        run.outputs.push(values(&y));
        let gx = store.get(var.as_tensor()).expect("input gradient");
        let gx = match &back {
            Some(back) => gx.permute(back.clone())?,
            None => gx.clone(),
        };
        run.input_grads.push(values(&gx));
        if let Some((w, b)) = bn.weight_and_bias() {
            run.weight_grads
                .push(values(store.get(w).expect("weight gradient")));
            run.bias_grads
                .push(values(store.get(b).expect("bias gradient")));
        }
    }
    if let (Some(m), Some(v)) = (bn.running_mean(), bn.running_var()) {
        run.running_mean = values(m);
        run.running_var = values(v);
    }
    run.batches = bn.num_batches_tracked().unwrap();
    run.eval = values(&forward_maybe_relu(
        &bn,
        &input(&eval.0, &eval.1)?.1,
        false,
        relu,
    )?);
    Ok(run)
}

/// `steps` random training steps of `shape` and an eval batch.
fn make_steps(shape: &[usize], steps: usize, seed: u64) -> (Steps, (Vec<usize>, Vec<f64>)) {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let s = (0..steps)
        .map(|k| {
            (
                shape.to_vec(),
                rng.normals(n, k as f64 - 1.0, 2.0),
                rng.normals(n, 0.0, 1.0),
            )
        })
        .collect();
    let mut eval_shape = shape.to_vec();
    eval_shape[0] = 2;
    let e = rng.normals(eval_shape.iter().product(), 0.5, 1.0);
    (s, (eval_shape, e))
}

fn compare_runs(label: &str, got: &RankRun, expected: &RankRun, dtype: DType) {
    let (atol, rtol) = tol(dtype);
    for s in 0..expected.outputs.len() {
        assert_close(
            &format!("{label}: output step {s}"),
            &got.outputs[s],
            &expected.outputs[s],
            atol,
            rtol,
        );
        assert_close(
            &format!("{label}: input grad step {s}"),
            &got.input_grads[s],
            &expected.input_grads[s],
            atol * 4.0,
            rtol * 4.0,
        );
    }
    let n = expected.outputs.first().map_or(1, |o| o.len().max(1)) as f64;
    for (what, g, e) in [
        ("weight grads", &got.weight_grads, &expected.weight_grads),
        ("bias grads", &got.bias_grads, &expected.bias_grads),
    ] {
        assert_eq!(g.len(), e.len(), "{label}: {what} steps");
        for (s, (gs, es)) in g.iter().zip(e).enumerate() {
            assert_close(
                &format!("{label}: {what} step {s}"),
                gs,
                es,
                atol * n.sqrt() * 4.0,
                rtol * 4.0,
            );
        }
    }
    assert_close(
        &format!("{label}: running mean"),
        &got.running_mean,
        &expected.running_mean,
        1e-6,
        1e-6,
    );
    assert_close(
        &format!("{label}: running var"),
        &got.running_var,
        &expected.running_var,
        1e-6,
        1e-6,
    );
    assert_eq!(
        got.batches, expected.batches,
        "{label}: num_batches_tracked"
    );
    assert_close(
        &format!("{label}: eval"),
        &got.eval,
        &expected.eval,
        atol,
        rtol,
    );
}

#[test]
fn layer_matches_cpu_on_the_configuration_matrix() {
    let dev = cuda_or_skip!("layer_matches_cpu_on_the_configuration_matrix");
    let shapes: [&[usize]; 4] = [&[16, 6], &[4, 6, 9], &[3, 6, 5, 4], &[2, 6, 3, 4, 5]];
    let mut seed = 100;
    for dtype in FLOATS {
        for shape in shapes {
            for affine in [true, false] {
                for momentum in [Some(0.1), None] {
                    for track in [true, false] {
                        for channels_last in [false, true] {
                            if channels_last && shape.len() < 3 {
                                continue;
                            }
                            seed += 1;
                            let cfg = SyncBatchNormConfig::default()
                                .with_eps(1e-5)
                                .with_momentum(momentum)
                                .with_affine(affine)
                                .with_track_running_stats(track);
                            let (steps, eval) = make_steps(shape, 2, seed);
                            let run = |d: &Device| {
                                run_layer(
                                    d,
                                    ProcessGroup::single(),
                                    cfg,
                                    dtype,
                                    shape[1],
                                    &steps,
                                    &eval,
                                    channels_last,
                                )
                                .unwrap()
                            };
                            let cpu = run(&Device::Cpu);
                            let gpu = run(&dev);
                            compare_runs(
                                &format!(
                                    "{dtype:?} {shape:?} {cfg:?} channels_last {channels_last}"
                                ),
                                &gpu,
                                &cpu,
                                dtype,
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn fused_relu_layer_matches_cpu() {
    let dev = cuda_or_skip!("fused_relu_layer_matches_cpu");
    let shapes: [&[usize]; 3] = [&[16, 6], &[3, 6, 5, 4], &[2, 6, 3, 4, 5]];
    let mut seed = 500;
    for dtype in FLOATS {
        for shape in shapes {
            for (affine, track) in [(true, true), (false, false)] {
                for channels_last in [false, true] {
                    if channels_last && shape.len() < 3 {
                        continue;
                    }
                    seed += 1;
                    let cfg = SyncBatchNormConfig::default()
                        .with_affine(affine)
                        .with_track_running_stats(track);
                    let (steps, eval) = make_steps(shape, 2, seed);
                    let run = |d: &Device| {
                        run_layer_with(
                            d,
                            ProcessGroup::single(),
                            cfg,
                            dtype,
                            shape[1],
                            &steps,
                            &eval,
                            channels_last,
                            true,
                        )
                        .unwrap()
                    };
                    let (cpu, gpu) = (run(&Device::Cpu), run(&dev));
                    let label =
                        format!("relu {dtype:?} {shape:?} {cfg:?} channels_last {channels_last}");
                    // Not vacuous: the ReLU clamps some outputs and passes others.
                    let zeros = cpu.outputs[0].iter().filter(|&&v| v == 0.0).count();
                    assert!(
                        zeros > 0 && zeros < cpu.outputs[0].len(),
                        "{label}: {zeros} zeros"
                    );
                    compare_runs(&label, &gpu, &cpu, dtype);
                }
            }
        }
    }
}

/// `forward_add_relu_t` (normalization, residual, ReLU in one op) on the GPU
/// against the CPU: outputs and the gradients of input, residual, weight and
/// bias, training then eval, with the input channels-last or the residual
/// transposed.
#[test]
fn fused_add_relu_layer_matches_cpu() {
    let dev = cuda_or_skip!("fused_add_relu_layer_matches_cpu");
    let mut seed = 700;
    for dtype in FLOATS {
        for (shape, x_last, z_transposed) in [
            (vec![16usize, 6], false, false),
            (vec![3, 6, 5, 4], true, false),
            (vec![3, 6, 5, 4], false, true),
            (vec![2, 6, 3, 4, 5], false, false),
        ] {
            seed += 1;
            let label =
                format!("add+relu {dtype:?} {shape:?} x_last {x_last} z_transposed {z_transposed}");
            let mut rng = Rng::new(seed);
            let n: usize = shape.iter().product();
            let (xs, zs, gs) = (
                rng.normals(n, 0.5, 2.0),
                rng.normals(n, 0.0, 1.0),
                rng.normals(n, 0.0, 1.0),
            );
            let rank = shape.len();
            let (to_last, back) = channels_last_perm(rank);
            let run = |d: &Device| -> Vec<Vec<f64>> {
                let varmap = VarMap::new();
                let pdt = if dtype == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                let vb = VarBuilder::from_varmap(&varmap, pdt, d);
                let bn = SyncBatchNorm::new(
                    6,
                    SyncBatchNormConfig::default(),
                    vb.pp("bn"),
                    ProcessGroup::single(),
                )
                .unwrap();
                let (w, b) = bn.weight_and_bias().unwrap();
                let (wv, bv) = params(6, pdt);
                Var::from_tensor(w)
                    .unwrap()
                    .set(&wv.to_device(d).unwrap())
                    .unwrap();
                Var::from_tensor(b)
                    .unwrap()
                    .set(&bv.to_device(d).unwrap())
                    .unwrap();
                let t = |v: &[f64]| tensor(v, &shape, dtype).to_device(d).unwrap();
                // x: a variable stored (N, *, C) seen as (N, C, *) when x_last.
                let (xvar, x) = if x_last {
                    let v = Var::from_tensor(
                        &t(&xs)
                            .permute(to_last.as_slice())
                            .unwrap()
                            .contiguous()
                            .unwrap(),
                    )
                    .unwrap();
                    let x = v.as_tensor().permute(back.as_slice()).unwrap();
                    (v, x)
                } else {
                    let v = Var::from_tensor(&t(&xs)).unwrap();
                    let x = v.as_tensor().clone();
                    (v, x)
                };
                // z: the last two dims stored swapped when z_transposed.
                let (zvar, z) = if z_transposed {
                    let v = Var::from_tensor(
                        &t(&zs)
                            .transpose(rank - 2, rank - 1)
                            .unwrap()
                            .contiguous()
                            .unwrap(),
                    )
                    .unwrap();
                    let z = v.as_tensor().transpose(rank - 2, rank - 1).unwrap();
                    (v, z)
                } else {
                    let v = Var::from_tensor(&t(&zs)).unwrap();
                    let z = v.as_tensor().clone();
                    (v, z)
                };
                let y = bn.forward_add_relu_t(&x, &z, true).unwrap();
                let g = tensor(&gs, &shape, DType::F64).to_device(d).unwrap();
                let store = (y.to_dtype(DType::F64).unwrap() * g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                // Gradients in logical order (seen through the same views).
                let gx = store.get(xvar.as_tensor()).unwrap();
                let gx = if x_last {
                    gx.permute(back.as_slice()).unwrap()
                } else {
                    gx.clone()
                };
                let gz = store.get(zvar.as_tensor()).unwrap();
                let gz = if z_transposed {
                    gz.transpose(rank - 2, rank - 1).unwrap()
                } else {
                    gz.clone()
                };
                let eval = bn.forward_add_relu_t(&x, &z, false).unwrap();
                vec![
                    values(&y),
                    values(&gx),
                    values(&gz),
                    values(store.get(w).unwrap()),
                    values(store.get(b).unwrap()),
                    values(&eval),
                ]
            };
            let (cpu, gpu) = (run(&Device::Cpu), run(&dev));
            let zeros = cpu[0].iter().filter(|&&v| v == 0.0).count();
            assert!(zeros > 0 && zeros < n, "{label}: {zeros} zeros");
            let (atol, rtol) = tol(dtype);
            let scale = (n as f64 / 6.0).sqrt() * 4.0;
            for (i, (what, a, r)) in [
                ("output", atol, rtol),
                ("input grad", atol * 4.0, rtol * 4.0),
                ("residual grad", 0.0, 0.0),
                ("weight grad", atol * scale, rtol * 4.0),
                ("bias grad", atol * scale, rtol * 4.0),
                ("eval output", atol, rtol),
            ]
            .into_iter()
            .enumerate()
            {
                if what == "residual grad" {
                    // The masked upstream gradient: exact wherever both sides
                    // agree on the mask, i.e. wherever the outputs agree on it.
                    for (k, ((g, c), y)) in gpu[i].iter().zip(&cpu[i]).zip(&gpu[0]).enumerate() {
                        if (*y > 0.0) == (cpu[0][k] > 0.0) {
                            assert_eq!(g, c, "{label}: {what} element {k}");
                        }
                    }
                    continue;
                }
                assert_close(&format!("{label}: {what}"), &gpu[i], &cpu[i], a, r);
            }
        }
    }
}

#[test]
fn k_cuda_ranks_match_one_rank() {
    let dev = cuda_or_skip!("k_cuda_ranks_match_one_rank");
    // Uneven splits, ranks of one sample; no empty rank (see the module docs).
    let cases: [(&[usize], &[usize], DType); 5] = [
        (&[3, 2], &[4, 5, 5], DType::F32),
        (&[4, 2, 1, 3], &[3, 4, 4], DType::F32),
        (&[2, 3, 1], &[8, 3], DType::F64),
        (&[5, 2, 1, 1, 2], &[4, 2, 3], DType::F16),
        (&[3, 3], &[6, 4, 4], DType::BF16),
    ];
    for (i, (sizes, tail, dtype)) in cases.into_iter().enumerate() {
        for channels_last in [false, true] {
            if channels_last && tail.len() < 2 {
                continue;
            }
            let cfg = SyncBatchNormConfig::default()
                .with_eps(1e-5)
                .with_momentum(if i % 2 == 0 { Some(0.1) } else { None })
                .with_affine(true)
                .with_track_running_stats(true);
            let total: usize = sizes.iter().sum();
            let mut shape = vec![total];
            shape.extend_from_slice(tail);
            let (steps, eval) = make_steps(&shape, 3, 500 + i as u64);
            let whole = run_layer(
                &dev,
                ProcessGroup::single(),
                cfg,
                dtype,
                tail[0],
                &steps,
                &eval,
                channels_last,
            )
            .unwrap();
            let k = sizes.len();
            let groups = ProcessGroup::threads_with_timeout(k, Duration::from_secs(120)).unwrap();
            let handles: Vec<_> = groups
                .into_iter()
                .enumerate()
                .map(|(r, group)| {
                    let mine: Steps = steps
                        .iter()
                        .map(|(s, x, g)| {
                            let (shape_r, xr) = split_batch(x, s, sizes)[r].clone();
                            (shape_r, xr, split_batch(g, s, sizes)[r].1.clone())
                        })
                        .collect();
                    let eval = eval.clone();
                    let c_n = tail[0];
                    std::thread::spawn(move || {
                        // Each rank opens its own handle (its own stream): on GPU r
                        // when the machine has one, else on GPU 0 beside the others.
                        let dev = Device::new_cuda(r).or_else(|_| Device::new_cuda(0))?;
                        run_layer(&dev, group, cfg, dtype, c_n, &mine, &eval, channels_last)
                    })
                })
                .collect();
            let ranks: Vec<RankRun> = handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect();
            let label = format!(
                "{k} CUDA ranks {sizes:?} {dtype:?} {shape:?} channels_last {channels_last}"
            );
            check_ranks_against_whole(&label, &ranks, &whole, tol(dtype), total);
        }
    }
}

#[test]
fn cuda_results_are_bitwise_deterministic() {
    let dev = cuda_or_skip!("cuda_results_are_bitwise_deterministic");
    for dtype in FLOATS {
        for case in cases(dtype) {
            let xg = case.x.to_device(&dev).unwrap();
            let stats = || {
                values(
                    &xg.apply_op1_no_bwd(&BatchStats { axis: case.axis })
                        .unwrap(),
                )
            };
            assert_eq!(stats(), stats(), "{}: batch stats", case.name);
            let m = moments_of(&case.x, case.axis, &dev);
            for (gname, dy) in grads_for(&case, 41) {
                let dyg = dy.to_device(&dev).unwrap();
                let op = GradStats {
                    axis: case.axis,
                    moments: m.clone(),
                    relu: None,
                };
                let sums = || values(&dyg.apply_op2_no_bwd(&xg, &op).unwrap());
                assert_eq!(sums(), sums(), "{} {gname}: grad sums", case.name);
            }
        }
    }
    // The whole layer, twice.
    let cfg = SyncBatchNormConfig::default()
        .with_eps(1e-5)
        .with_momentum(Some(0.1))
        .with_affine(true)
        .with_track_running_stats(true);
    let (steps, eval) = make_steps(&[8, 32, 16, 16], 2, 7);
    let run = || one_rank_f32(&dev, cfg, &steps, &eval);
    assert_same_runs(&run(), &run());
}

/// The layer's steps and eval on one f32 rank of 32 channels.
fn one_rank_f32(
    dev: &Device,
    cfg: SyncBatchNormConfig,
    steps: &Steps,
    eval: &(Vec<usize>, Vec<f64>),
) -> RankRun {
    run_layer(
        dev,
        ProcessGroup::single(),
        cfg,
        DType::F32,
        32,
        steps,
        eval,
        false,
    )
    .unwrap()
}

/// Two runs agree bit for bit.
fn assert_same_runs(a: &RankRun, b: &RankRun) {
    assert_eq!(a.outputs, b.outputs);
    assert_eq!(a.input_grads, b.input_grads);
    assert_eq!(a.weight_grads, b.weight_grads);
    assert_eq!(a.bias_grads, b.bias_grads);
    assert_eq!(a.running_mean, b.running_mean);
    assert_eq!(a.running_var, b.running_var);
    assert_eq!(a.eval, b.eval);
}

/// `keep_freed_memory` raises the pool's release threshold and
/// changes no result: the layer's step, bit for bit, before and after. (The
/// module exists with the `cuda` feature only.)
#[cfg(feature = "cuda")]
#[test]
fn keep_freed_memory_keeps_the_pool_and_changes_no_result() {
    let dev = cuda_or_skip!("keep_freed_memory_keeps_the_pool_and_changes_no_result");
    use candle_syncbn::cuda_memory::release_threshold;
    use candle_syncbn::keep_freed_memory;
    // The CPU has no pool (its allocator policy, which the same
    // `keep_freed_memory` applies there, is tested by that function's doctest).
    assert_eq!(release_threshold(&Device::Cpu).unwrap(), None);
    let cfg = SyncBatchNormConfig::default();
    let (steps, eval) = make_steps(&[8, 32, 16, 16], 2, 11);
    let run = || one_rank_f32(&dev, cfg, &steps, &eval);
    let before = run();
    let Some(default_threshold) = release_threshold(&dev).unwrap() else {
        report_skip(
            "keep_freed_memory_keeps_the_pool_and_changes_no_result: this GPU has no memory pools",
        );
        return;
    };
    assert!(keep_freed_memory(&dev).unwrap());
    assert_eq!(
        release_threshold(&dev).unwrap(),
        Some(u64::MAX),
        "default was {default_threshold}"
    );
    let after = run();
    assert_same_runs(&before, &after);
}

#[test]
fn large_shapes_use_every_work_split_and_match_cpu() {
    let dev = cuda_or_skip!("large_shapes_use_every_work_split_and_match_cpu");
    // (shape, channel axis): few large channels (many chunks per channel), many
    // tiny channels (a warp per task), a 2-D batch and channels-last (both
    // channel-innermost). The first has 524288 values per channel: 32 chunks
    // of 64 values per thread on the emulated 132 SMs, so each thread runs the
    // unrolled loop 2-4 times (a 4x larger shape took minutes there).
    let shapes: [(&[usize], usize); 4] = [
        (&[8, 32, 256, 256], 1),
        (&[32, 2048, 7, 7], 1),
        (&[4096, 1024], 1),
        (&[8, 128, 128, 32], 3),
    ];
    for dtype in [DType::F32, DType::BF16] {
        for (shape, axis) in shapes {
            let c = shape[axis];
            let mut offset_shape = vec![1; shape.len()];
            offset_shape[axis] = c;
            let offsets: Vec<f64> = (0..c).map(|i| (i % 7) as f64 - 3.0).collect();
            let x = Tensor::randn(0f32, 1f32, shape, &Device::Cpu)
                .unwrap()
                .broadcast_add(&tensor(&offsets, &offset_shape, DType::F32))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let dy = Tensor::randn(0f32, 1f32, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let (xg, dyg) = (x.to_device(&dev).unwrap(), dy.to_device(&dev).unwrap());
            let label = format!("{shape:?} axis {axis} {dtype:?}");
            let stats = BatchStats { axis };
            let cpu = x.apply_op1_no_bwd(&stats).unwrap();
            let gpu = xg.apply_op1_no_bwd(&stats).unwrap();
            close_sums(&format!("{label} stats"), &gpu, &cpu, 1e-5);
            let m_cpu = moments_of(&x, axis, &Device::Cpu);
            let m_gpu = m_cpu.to_device(&dev).unwrap();
            let (atol, rtol) = tol(dtype);
            let y_cpu = x.apply_op1_no_bwd(&norm_op(m_cpu.clone(), axis)).unwrap();
            let y_gpu = xg.apply_op1_no_bwd(&norm_op(m_gpu.clone(), axis)).unwrap();
            close(&format!("{label} normalize"), &y_gpu, &y_cpu, atol, rtol);
            let gs_cpu = dy
                .apply_op2_no_bwd(
                    &x,
                    &GradStats {
                        axis,
                        moments: m_cpu.clone(),
                        relu: None,
                    },
                )
                .unwrap();
            let gs_gpu = dyg
                .apply_op2_no_bwd(
                    &xg,
                    &GradStats {
                        axis,
                        moments: m_gpu.clone(),
                        relu: None,
                    },
                )
                .unwrap();
            let n = (x.elem_count() / c) as f64;
            assert_close(
                &format!("{label} grad sums"),
                &values(&gs_gpu),
                &values(&gs_cpu),
                n.sqrt() * 1e-3,
                1e-4,
            );
            let ig = |m: &Tensor, g: &Tensor| InputGrad {
                axis,
                moments: m.clone(),
                grad_sums: Some(g.clone()),
                weight: None,
                relu: None,
            };
            let dx_cpu = dy.apply_op2_no_bwd(&x, &ig(&m_cpu, &gs_cpu)).unwrap();
            let dx_gpu = dyg
                .apply_op2_no_bwd(&xg, &ig(&m_gpu, &gs_cpu.to_device(&dev).unwrap()))
                .unwrap();
            close(
                &format!("{label} input grad"),
                &dx_gpu,
                &dx_cpu,
                atol * 4.0,
                rtol * 4.0,
            );
        }
    }
}

/// The "no host synchronization in a step", checked call by call: on
/// the emulated GPU, whose driver counts every call that makes the host wait
/// for the device (synchronizations, device-to-host copies, synchronous
/// frees), a training step (forward, the loss, backward through autograd,
/// the running statistics) and an eval forward make none. On a real GPU the
/// benchmark shows it by timing (the host time to enqueue a step).
#[test]
fn a_step_never_makes_the_host_wait_for_the_gpu() {
    let dev = cuda_or_skip!("a_step_never_makes_the_host_wait_for_the_gpu");
    if emulated_host_syncs().is_none() {
        report_skip(
            "skipped a_step_never_makes_the_host_wait_for_the_gpu: host waits are counted on the emulated GPU only",
        );
        return;
    }
    let syncs = || emulated_host_syncs().unwrap();
    for dtype in [DType::F32, DType::BF16] {
        for momentum in [Some(0.1), None] {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let cfg = SyncBatchNormConfig::default()
                .with_eps(1e-5)
                .with_momentum(momentum)
                .with_affine(true)
                .with_track_running_stats(true);
            let bn = SyncBatchNorm::new(6, cfg, vb.pp("bn"), ProcessGroup::single()).unwrap();
            let x =
                Var::from_tensor(&data(&[4, 6, 5, 5], dtype, 3).to_device(&dev).unwrap()).unwrap();
            let g = data(&[4, 6, 5, 5], dtype, 4).to_device(&dev).unwrap();
            // A step through forward_t, one through forward_relu_t (the
            // backward recomputes the ReLU's mask from the forward's
            // coefficients), one through forward_add_relu_t (the residual and
            // the ReLU's gradient mask: one more kernel, the (2, C)
            // weight-bias stack), then an eval forward.
            let step = || {
                let y = bn.forward_t(x.as_tensor(), true).unwrap();
                let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let f = bn.forward_relu_t(x.as_tensor(), true).unwrap();
                let fused_grads = (&f * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let r = bn.forward_add_relu_t(x.as_tensor(), &g, true).unwrap();
                let relu_grads = (&r * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let eval = bn.forward_t(x.as_tensor(), false).unwrap();
                (y, grads, fused_grads, relu_grads, eval)
            };
            drop(step()); // the first step loads the modules
            let before = syncs();
            let (y, grads, fused_grads, relu_grads, eval) = step();
            let waits = syncs() - before;
            assert_eq!(
                waits, 0,
                "{dtype:?} momentum {momentum:?}: a step made the host wait for the GPU {waits} time(s)"
            );
            // The step did compute: its results are finite (read after counting).
            for t in [
                &y,
                grads.get(x.as_tensor()).unwrap(),
                fused_grads.get(x.as_tensor()).unwrap(),
                relu_grads.get(x.as_tensor()).unwrap(),
                &eval,
            ] {
                assert!(values(t).iter().all(|v| v.is_finite()));
            }
            drop((y, grads, fused_grads, relu_grads, eval));
        }
    }
}

/// The launch profile of the layer on one GPU, counted by the emulated
/// driver: kernels of this crate per forward and per backward (candle's own
/// launches, the loss and the gradient bookkeeping, are not counted). Back to
/// back, each launch costs a few microseconds whatever its size, which is
/// what the small shapes of a network spend most of their time on; this pins
/// the counts the README gives, so that a change that adds one shows here.
#[test]
fn a_step_makes_the_profiled_number_of_launches() {
    let dev = cuda_or_skip!("a_step_makes_the_profiled_number_of_launches");
    if emulated_crate_launches().is_none() {
        report_skip(
            "skipped a_step_makes_the_profiled_number_of_launches: launches are counted on the emulated GPU only",
        );
        return;
    }
    let launches = || emulated_crate_launches().unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let bn = SyncBatchNorm::new(
            6,
            SyncBatchNormConfig::default(),
            vb.pp("bn"),
            ProcessGroup::single(),
        )
        .unwrap();
        let x = Var::from_tensor(&data(&[4, 6, 5, 5], dtype, 3).to_device(&dev).unwrap()).unwrap();
        let g = data(&[4, 6, 5, 5], dtype, 4).to_device(&dev).unwrap();
        let z = Var::from_tensor(&data(&[4, 6, 5, 5], dtype, 5).to_device(&dev).unwrap()).unwrap();
        type Forward<'a> = Box<dyn Fn(bool) -> Tensor + 'a>;
        // (name, forward, launches of the training forward, its backward, eval)
        let forwards: [(&str, Forward, [u64; 3]); 3] = [
            (
                "forward_t",
                Box::new(|train| bn.forward_t(x.as_tensor(), train).unwrap()),
                [4, 4, 2],
            ),
            (
                "forward_relu_t",
                Box::new(|train| bn.forward_relu_t(x.as_tensor(), train).unwrap()),
                [4, 4, 2],
            ),
            (
                "forward_add_relu_t",
                Box::new(|train| {
                    bn.forward_add_relu_t(x.as_tensor(), z.as_tensor(), train)
                        .unwrap()
                }),
                // One more each way: the (2, C) weight-bias stack forward,
                // the ReLU's gradient mask (the residual's gradient) backward.
                [5, 5, 3],
            ),
        ];
        for (name, forward, want) in &forwards {
            drop(forward(true)); // loads the modules
            let before = launches();
            let y = forward(true);
            let after_forward = launches();
            let loss = (&y * &g).unwrap().sum_all().unwrap();
            let before_backward = launches();
            let grads = loss.backward().unwrap();
            let after_backward = launches();
            let eval = forward(false);
            let after_eval = launches();
            let got = [
                after_forward - before,
                after_backward - before_backward,
                after_eval - after_backward,
            ];
            assert_eq!(
                &got, want,
                "{name} {dtype:?}: (training forward, backward, eval forward) launches"
            );
            assert!(values(grads.get(x.as_tensor()).unwrap())
                .iter()
                .all(|v| v.is_finite()));
            assert!(values(&eval).iter().all(|v| v.is_finite()));
        }
    }
}

/// Subgroups of the in-process group with CUDA tensors: the masked
/// collectives run on the device (`-0.0` padding, concatenation, the sum read
/// back through a view at an offset), and each pair of ranks equals one rank
/// holding the pair's batches.
#[test]
fn cuda_subgroups_match_one_rank_per_pair() {
    let dev = cuda_or_skip!("cuda_subgroups_match_one_rank_per_pair");
    let sizes = [2usize, 3, 1, 4];
    let tail = [3usize, 4, 5];
    let cfg = SyncBatchNormConfig::default();
    for (i, dtype) in [DType::F32, DType::BF16].into_iter().enumerate() {
        let mut shape = vec![sizes.iter().sum::<usize>()];
        shape.extend_from_slice(&tail);
        let (steps, eval) = make_steps(&shape, 2, 900 + i as u64);
        // Step inputs of the given ranks' slices of the batch, concatenated.
        let slice = |ranks: std::ops::Range<usize>| -> Steps {
            steps
                .iter()
                .map(|(s, x, g)| {
                    let (xs, gs) = (split_batch(x, s, &sizes), split_batch(g, s, &sizes));
                    let n: usize = sizes[ranks.clone()].iter().sum();
                    let mut shape_r = s.clone();
                    shape_r[0] = n;
                    let cat = |parts: &[(Vec<usize>, Vec<f64>)]| -> Vec<f64> {
                        parts[ranks.clone()]
                            .iter()
                            .flat_map(|p| p.1.clone())
                            .collect()
                    };
                    (shape_r, cat(&xs), cat(&gs))
                })
                .collect()
        };
        let groups = ProcessGroup::threads_with_timeout(4, Duration::from_secs(120)).unwrap();
        let handles: Vec<_> = groups
            .into_iter()
            .enumerate()
            .map(|(r, group)| {
                let (mine, eval) = (slice(r..r + 1), eval.clone());
                std::thread::spawn(move || {
                    let pair = group.subgroups(2)?;
                    let dev = Device::new_cuda(r).or_else(|_| Device::new_cuda(0))?;
                    run_layer(&dev, pair, cfg, dtype, tail[0], &mine, &eval, false)
                })
            })
            .collect();
        let ranks: Vec<RankRun> = handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        for first in [0usize, 2] {
            let union = slice(first..first + 2);
            let whole = run_layer(
                &dev,
                ProcessGroup::single(),
                cfg,
                dtype,
                tail[0],
                &union,
                &eval,
                false,
            )
            .unwrap();
            let label = format!("CUDA pair {first}-{} {dtype:?}", first + 1);
            let n = union[0].0[0];
            check_ranks_against_whole(&label, &ranks[first..first + 2], &whole, tol(dtype), n);
        }
        assert_ne!(
            ranks[0].running_mean, ranks[2].running_mean,
            "{dtype:?}: the pairs agree"
        );
    }
}

/// What [`composite_run`] observed: per step the output, the input, residual,
/// weight and bias gradients; then the running mean and variance, the counter
/// and an eval output.
type CompositeRun = (Vec<[Vec<f64>; 5]>, [Vec<f64>; 3], Vec<f64>);

/// Two training steps of `relu(bn(x) + z)` on `dev` through the kernels
/// (`forward_add_relu_t`) or through candle's ops (`forward_composite_t`),
/// with this rank's batch of `n` samples, then an eval forward.
fn composite_run(
    dev: &Device,
    group: ProcessGroup,
    dtype: DType,
    n: usize,
    seed: u64,
    composite: bool,
) -> candle::Result<CompositeRun> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let cfg = SyncBatchNormConfig::default().with_momentum(None);
    let bn = SyncBatchNorm::new(4, cfg, vb.pp("bn"), group)?;
    let (w, b) = bn.weight_and_bias().expect("affine");
    let (wv, bv) = params(4, DType::F32);
    Var::from_tensor(w)?.set(&wv.to_device(dev)?)?;
    Var::from_tensor(b)?.set(&bv.to_device(dev)?)?;
    let forward = |x: &Tensor, z: &Tensor, train: bool| {
        if composite {
            bn.forward_composite_t(x, Some(z), true, train)
        } else {
            bn.forward_add_relu_t(x, z, train)
        }
    };
    let shape = [n, 4, 3, 5];
    let mut steps = Vec::new();
    for s in 0..2 {
        let x = Var::from_tensor(&data(&shape, dtype, seed + s).to_device(dev)?)?;
        let z = Var::from_tensor(&data(&shape, dtype, seed + 10 + s).to_device(dev)?)?;
        let g = data(&shape, DType::F64, seed + 20 + s).to_device(dev)?;
        let y = forward(x.as_tensor(), z.as_tensor(), true)?;
        let store = (y.to_dtype(DType::F64)? * g)?.sum_all()?.backward()?;
        let grad = |t: &Tensor| values(store.get(t).expect("gradient"));
        steps.push([
            values(&y),
            grad(x.as_tensor()),
            grad(z.as_tensor()),
            grad(w),
            grad(b),
        ]);
    }
    let stats = [
        values(bn.running_mean().expect("running mean")),
        values(bn.running_var().expect("running var")),
        vec![bn.num_batches_tracked().unwrap() as f64],
    ];
    let x = data(&shape, dtype, seed + 30).to_device(dev)?;
    let z = data(&shape, dtype, seed + 40).to_device(dev)?;
    Ok((steps, stats, values(&forward(&x, &z, false)?)))
}

/// The layer composed of candle ops, the path on devices without kernels of
/// this crate, on a GPU (on the emulated one in CI: candle's own CUDA
/// kernels): its device code, the host staging of its all-reduces and the
/// gradients routed back to the device, against the kernels on the same
/// GPU, on one rank and on 2 thread ranks (batches of 3 and 2).
#[test]
fn composite_path_on_the_gpu_matches_the_kernels() {
    let dev = cuda_or_skip!("composite_path_on_the_gpu_matches_the_kernels");
    for world in [1usize, 2] {
        let groups = if world == 1 {
            vec![ProcessGroup::single()]
        } else {
            ProcessGroup::threads_with_timeout(2, Duration::from_secs(120)).unwrap()
        };
        let handles: Vec<_> = groups
            .into_iter()
            .map(|group| {
                let dev = dev.clone();
                std::thread::spawn(move || {
                    let r = group.rank();
                    for dtype in [DType::F32, DType::BF16] {
                        let seed = 100 * r as u64;
                        let run = |composite| {
                            composite_run(&dev, group.clone(), dtype, 3 - r, seed, composite)
                                .unwrap()
                        };
                        let (want, got) = (run(false), run(true));
                        let label = format!("world {world} rank {r} {dtype:?}");
                        let (atol, rtol) = tol(dtype);
                        let names = [
                            "output",
                            "input grad",
                            "residual grad",
                            "weight grad",
                            "bias grad",
                        ];
                        for (s, (g, w)) in got.0.iter().zip(&want.0).enumerate() {
                            for (k, name) in names.iter().enumerate() {
                                // Gradients: 4×; weight and bias gradients are
                                // sums over 45 values per channel and rank.
                                let scale = [1.0, 4.0, 4.0, 40.0, 40.0][k];
                                assert_close(
                                    &format!("{label} step {s} {name}"),
                                    &g[k],
                                    &w[k],
                                    atol * scale,
                                    rtol * scale,
                                );
                            }
                        }
                        assert_close(
                            &format!("{label} running mean"),
                            &got.1[0],
                            &want.1[0],
                            1e-5,
                            1e-5,
                        );
                        assert_close(
                            &format!("{label} running var"),
                            &got.1[1],
                            &want.1[1],
                            1e-5,
                            1e-5,
                        );
                        assert_eq!(got.1[2], want.1[2], "{label} counter");
                        assert_close(&format!("{label} eval"), &got.2, &want.2, atol, rtol);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
}

/// `FrozenBatchNorm` on the GPU against the CPU: the eval path of the
/// kernels in training mode too, plain, with the fused ReLU and with the
/// residual, and the input gradient; then precise statistics
/// (`update_bn_stats`) of a layer on the GPU against the same on the CPU.
#[test]
fn frozen_layer_and_precise_statistics_match_cpu() {
    use candle_nn::Module;
    use candle_syncbn::precise_bn::update_bn_stats;
    use candle_syncbn::FrozenBatchNorm;
    let dev = cuda_or_skip!("frozen_layer_and_precise_statistics_match_cpu");
    let shapes: [&[usize]; 3] = [&[16, 6], &[3, 6, 5, 4], &[2, 6, 3, 4, 5]];
    let mut seed = 900;
    for dtype in FLOATS {
        let stat_dtype = if dtype == DType::F64 {
            dtype
        } else {
            DType::F32
        };
        for shape in shapes {
            seed += 1;
            let mut rng = Rng::new(seed);
            let c = shape[1];
            let stats = [
                ("running_mean", rng.normals(c, 0.5, 2.0), stat_dtype),
                (
                    "running_var",
                    (0..c).map(|_| 0.3 + 2.0 * rng.uniform()).collect(),
                    stat_dtype,
                ),
                ("weight", rng.normals(c, 1.0, 0.5), dtype),
                ("bias", rng.normals(c, 0.0, 0.5), dtype),
            ];
            let layer = |d: &Device| {
                let varmap = VarMap::new();
                for (name, v, t) in &stats {
                    let value = tensor(v, &[c], *t).to_device(d).unwrap();
                    varmap
                        .data()
                        .lock()
                        .unwrap()
                        .insert(format!("bn.{name}"), Var::from_tensor(&value).unwrap());
                }
                let vb = VarBuilder::from_varmap(&varmap, dtype, d);
                FrozenBatchNorm::new(c, 1e-5, vb.pp("bn")).unwrap()
            };
            let (cpu_bn, gpu_bn) = (layer(&Device::Cpu), layer(&dev));
            let x = data(shape, dtype, seed);
            let z = data(shape, dtype, seed + 1000);
            let (xg, zg) = (x.to_device(&dev).unwrap(), z.to_device(&dev).unwrap());
            let (atol, rtol) = tol(dtype);
            let label = format!("frozen {dtype:?} {shape:?}");
            close(
                &format!("{label} forward"),
                &gpu_bn.forward_t(&xg, true).unwrap(),
                &cpu_bn.forward(&x).unwrap(),
                atol,
                rtol,
            );
            close(
                &format!("{label} relu"),
                &gpu_bn.forward_relu_t(&xg, true).unwrap(),
                &cpu_bn.forward_relu_t(&x, true).unwrap(),
                atol,
                rtol,
            );
            close(
                &format!("{label} add relu"),
                &gpu_bn.forward_add_relu_t(&xg, &zg, true).unwrap(),
                &cpu_bn.forward_add_relu_t(&x, &z, true).unwrap(),
                atol,
                rtol,
            );
            let grad = |bn: &FrozenBatchNorm, x: &Tensor| {
                let v = Var::from_tensor(x).unwrap();
                let y = bn.forward_relu_t(v.as_tensor(), true).unwrap();
                let loss = y.to_dtype(DType::F32).unwrap().sum_all().unwrap();
                loss.backward().unwrap().get(v.as_tensor()).unwrap().clone()
            };
            close(
                &format!("{label} input gradient"),
                &grad(&gpu_bn, &xg),
                &grad(&cpu_bn, &x),
                atol,
                rtol,
            );
        }
    }
    // Precise statistics of a synchronized layer, GPU against CPU.
    let shape = [4, 5, 6];
    let batches: Vec<Tensor> = (0..3).map(|i| data(&shape, DType::F32, 950 + i)).collect();
    let stats = |d: &Device| {
        let vb = VarBuilder::zeros(DType::F32, d);
        let bn = SyncBatchNorm::new(
            5,
            SyncBatchNormConfig::default(),
            vb,
            ProcessGroup::single(),
        )
        .unwrap();
        update_bn_stats(&[&bn], batches.len(), |i| {
            bn.forward_t(&batches[i].to_device(d)?, true).map(|_| ())
        })
        .unwrap();
        assert_eq!(bn.num_batches_tracked().unwrap(), 0);
        (
            bn.running_mean().unwrap().copy().unwrap(),
            bn.running_var().unwrap().copy().unwrap(),
        )
    };
    let (cpu, gpu) = (stats(&Device::Cpu), stats(&dev));
    close("precise mean", &gpu.0, &cpu.0, 1e-5, 1e-5);
    close("precise var", &gpu.1, &cpu.1, 1e-5, 1e-5);
}

/// The launcher's bound on CUDA ranks is the GPUs it sees: one rank more is
/// refused before any process starts (the program does not exist, so a
/// spawn would fail with another error); as many pass the check.
#[test]
fn launcher_refuses_more_cuda_ranks_than_gpus() {
    let _device = cuda_or_skip!("launcher_refuses_more_cuda_ranks_than_gpus");
    #[cfg(feature = "cuda")]
    {
        use candle::cuda_backend::cudarc::driver::CudaContext;
        use candle_syncbn::launch::{launch, LaunchConfig, RankDevice};
        let n = usize::try_from(CudaContext::device_count().unwrap()).unwrap();
        let mut cfg = LaunchConfig::new(n + 1, "/nonexistent/syncbn-rank", Vec::new());
        cfg.device = RankDevice::Cuda;
        let e = launch(&cfg).unwrap_err().to_string();
        let expected = format!(
            "launcher: {} ranks requested (--nproc-per-node), but this process sees {n} CUDA device(s)",
            n + 1
        );
        assert!(
            e.contains(&expected) && e.contains("SYNCBN_MAX_NPROC"),
            "{e}"
        );
        cfg.nproc = n;
        let e = launch(&cfg).unwrap_err().to_string();
        assert!(e.contains("could not start rank 0 of"), "{e}");
    }
}

/// `SYNCBN_REQUIRE_CUDA=1` turns "no CUDA device, skipped" into a failure,
/// and changes nothing where there is a device: this executable runs one
/// cheap GPU test again as a child, with and without the variable.
#[test]
fn require_cuda_turns_a_skip_for_want_of_a_gpu_into_a_failure() {
    let child = test_path(module_path!(), "unsupported_dtypes_are_errors");
    let run = |require: Option<&str>| {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", &child, "--test-threads", "1"]);
        match require {
            Some(v) => cmd.env(REQUIRE_CUDA_VAR, v),
            None => cmd.env_remove(REQUIRE_CUDA_VAR),
        };
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("1 passed") || text.contains("1 failed"),
            "{text}"
        );
        (out.status.success(), text)
    };
    let has_gpu = Device::new_cuda(0).is_ok();
    let (plain_ok, plain) = run(None);
    assert!(plain_ok, "without {REQUIRE_CUDA_VAR}: {plain}");
    let (other_ok, other) = run(Some("0"));
    assert!(other_ok, "{REQUIRE_CUDA_VAR}=0: {other}");
    let (required_ok, required) = run(Some("1"));
    if has_gpu {
        assert!(required_ok, "{REQUIRE_CUDA_VAR}=1 on a GPU: {required}");
    } else {
        assert!(
            !required_ok,
            "{REQUIRE_CUDA_VAR}=1 without a GPU passed: {required}"
        );
        assert!(required.contains(REQUIRE_CUDA_VAR), "{required}");
        assert!(
            plain.contains("skipped unsupported_dtypes_are_errors"),
            "{plain}"
        );
    }
}
