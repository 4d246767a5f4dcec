//! The layer composed of candle ops (`forward_composite_t`, the path on
//! devices without kernels of this crate, such as Metal) against the kernels
//! and against one rank holding the whole batch.

use crate::common;

use candle::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::ops::all_reduce_sum_with_grad;
use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use common::*;
use std::time::Duration;

/// `steps` batches of `shape` (means drifting from −1), their upstream
/// gradients, and an eval batch of 2 samples.
type Data = (Vec<Vec<f64>>, Vec<Vec<f64>>, (Vec<usize>, Vec<f64>));

fn data(shape: &[usize], steps: usize, seed: u64) -> Data {
    let elems: usize = shape.iter().product();
    let mut rng = Rng::new(seed);
    let xs = (0..steps)
        .map(|s| rng.normals(elems, s as f64 - 1.0, 1.5))
        .collect();
    let gs = (0..steps).map(|_| rng.normals(elems, 0.0, 1.0)).collect();
    let mut eval_shape = shape.to_vec();
    eval_shape[0] = 2;
    let eval = rng.normals(eval_shape.iter().product(), 0.5, 1.0);
    (xs, gs, (eval_shape, eval))
}

/// Asserts the composite run equals the kernels' run: outputs, eval and the
/// residual's gradient within `tolerance(dtype)`, input gradients within
/// 4×, weight and bias gradients (sums over the batch) with `atol` scaled
/// by 4·√count, running statistics within 1e-5 (1e-9 for f64: the
/// composite accumulates in f32, the kernels combine in f64) and the counter
/// exactly.
fn assert_same_run(label: &str, got: &RankRun, want: &RankRun, dtype: DType, count: usize) {
    let (atol, rtol) = tolerance(dtype);
    let scale = (count as f64).sqrt() * 4.0;
    for s in 0..want.outputs.len() {
        let what = |x: &str| format!("{label}: {x} step {s}");
        assert_close(
            &what("outputs"),
            &got.outputs[s],
            &want.outputs[s],
            atol,
            rtol,
        );
        assert_close(
            &what("input grads"),
            &got.input_grads[s],
            &want.input_grads[s],
            4.0 * atol,
            4.0 * rtol,
        );
        if !want.weight_grads.is_empty() {
            assert_close(
                &what("weight grads"),
                &got.weight_grads[s],
                &want.weight_grads[s],
                atol * scale,
                4.0 * rtol,
            );
            assert_close(
                &what("bias grads"),
                &got.bias_grads[s],
                &want.bias_grads[s],
                atol * scale,
                4.0 * rtol,
            );
        }
        if !want.residual_grads.is_empty() {
            assert_close(
                &what("residual grads"),
                &got.residual_grads[s],
                &want.residual_grads[s],
                atol,
                rtol,
            );
        }
    }
    let stat_tol = if dtype == DType::F64 { 1e-9 } else { 1e-5 };
    let what = |x: &str| format!("{label}: {x}");
    assert_close(
        &what("running mean"),
        &got.running_mean,
        &want.running_mean,
        stat_tol,
        stat_tol,
    );
    assert_close(
        &what("running var"),
        &got.running_var,
        &want.running_var,
        stat_tol,
        stat_tol,
    );
    assert_eq!(got.batches, want.batches, "{}", what("num_batches_tracked"));
    assert_close(&what("eval"), &got.eval, &want.eval, atol, rtol);
}

#[test]
fn composite_matches_the_kernels_on_one_rank() {
    let configs = [
        ("default", SyncBatchNormConfig::default()),
        (
            "cumulative",
            SyncBatchNormConfig::default().with_momentum(None),
        ),
        (
            "plain",
            SyncBatchNormConfig::default()
                .with_affine(false)
                .with_track_running_stats(false),
        ),
    ];
    let shapes: [&[usize]; 3] = [&[4, 3, 5, 6], &[12, 3], &[2, 3, 2, 3, 4]];
    let mut cases = 0;
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for (ci, (name, cfg)) in configs.iter().enumerate() {
            for (si, shape) in shapes.iter().enumerate() {
                for fusion in [Fusion::None, Fusion::Relu, Fusion::AddRelu] {
                    let (xs, gs, eval) = data(shape, 3, (ci * 10 + si) as u64);
                    let run = |composite| {
                        run_rank_with(
                            ProcessGroup::single(),
                            *cfg,
                            dtype,
                            vec![shape.to_vec(); 3],
                            xs.clone(),
                            gs.clone(),
                            eval.clone(),
                            fusion,
                            composite,
                        )
                        .unwrap()
                    };
                    let label = format!("{dtype:?} {name} {shape:?} {fusion:?}");
                    let count = shape.iter().product::<usize>() / shape[1];
                    assert_same_run(&label, &run(true), &run(false), dtype, count);
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 108);
}

/// Ranks holding `sizes` samples each train through the composite and are
/// checked against one rank holding the whole batch on the kernel path.
fn check_composite_ranks(sizes: &[usize], tail: &[usize], dtype: DType, fusion: Fusion) {
    let total: usize = sizes.iter().sum();
    let mut shape = vec![total];
    shape.extend_from_slice(tail);
    let steps = 3;
    let (xs, gs, eval) = data(&shape, steps, 7);
    let cfg = SyncBatchNormConfig::default();
    let whole = run_rank_with(
        ProcessGroup::single(),
        cfg,
        dtype,
        vec![shape.clone(); steps],
        xs.clone(),
        gs.clone(),
        eval.clone(),
        fusion,
        false,
    )
    .unwrap();
    let ranks = run_thread_ranks(sizes, &shape, &xs, &gs, &eval, cfg, dtype, fusion, true);
    let label = format!("composite {sizes:?} {tail:?} {dtype:?} {fusion:?}");
    // Its running-statistics tolerance (1e-6) holds for the composite's f32
    // statistics on batches this small.
    check_ranks_against_whole(&label, &ranks, &whole, tolerance(dtype), total);
}

#[test]
fn composite_synchronizes_statistics_and_gradients_over_ranks() {
    check_composite_ranks(&[3, 2], &[4, 3, 5], DType::F64, Fusion::None);
    check_composite_ranks(&[2, 1, 3], &[4, 3, 5], DType::F32, Fusion::Relu);
    // A rank with an empty batch still takes part in both all-reduces.
    check_composite_ranks(&[4, 0], &[3, 7], DType::F32, Fusion::AddRelu);
}

#[test]
fn composite_keeps_channels_last_and_strided_inputs() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bn = SyncBatchNorm::new(
        5,
        SyncBatchNormConfig::default(),
        vb,
        ProcessGroup::single(),
    )
    .unwrap();
    let mut rng = Rng::new(3);
    let (_, back) = channels_last_perm(4);
    let nhwc = tensor(
        &rng.normals(2 * 3 * 4 * 5, 1.0, 2.0),
        &[2, 3, 4, 5],
        DType::F32,
    );
    let x = nhwc.permute(back.as_slice()).unwrap();
    assert!(!x.is_contiguous());
    let want = bn.forward_t(&x.contiguous().unwrap(), false).unwrap();
    let got = bn.forward_composite_t(&x, None, false, false).unwrap();
    assert_eq!(got.dims(), [2, 5, 3, 4]);
    let (atol, rtol) = tolerance(DType::F32);
    assert_close(
        "channels-last eval",
        &values(&got),
        &values(&want),
        atol,
        rtol,
    );
    let want = bn.forward_t(&x.contiguous().unwrap(), true).unwrap();
    let got = bn.forward_composite_t(&x, None, false, true).unwrap();
    assert_close(
        "channels-last train",
        &values(&got),
        &values(&want),
        atol,
        rtol,
    );
}

#[test]
fn composite_rejects_what_the_kernels_reject() {
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let bn = SyncBatchNorm::new(
        3,
        SyncBatchNormConfig::default(),
        vb.pp("layer1.bn"),
        ProcessGroup::single(),
    )
    .unwrap();
    let one = Tensor::ones((1, 3), DType::F32, &Device::Cpu).unwrap();
    let err = bn
        .forward_composite_t(&one, None, false, true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'layer1.bn'") && err.contains("more than 1 value per channel"),
        "{err}"
    );
    let wrong = Tensor::ones((2, 4, 3), DType::F32, &Device::Cpu).unwrap();
    let err = bn
        .forward_composite_t(&wrong, None, false, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected 3 channels"), "{err}");
    let x = Tensor::ones((2, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let z = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let err = bn
        .forward_composite_t(&x, Some(&z), true, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("residual"), "{err}");
}

#[test]
fn all_reduce_with_grad_sums_values_forward_and_gradients_backward() {
    let groups = ProcessGroup::threads_with_timeout(3, Duration::from_secs(60)).unwrap();
    let handles: Vec<_> = groups
        .into_iter()
        .map(|group| {
            std::thread::spawn(move || {
                let r = group.rank() as f64;
                let x = Var::new(&[r, 10.0 * r], &Device::Cpu).unwrap();
                let y = all_reduce_sum_with_grad(x.as_tensor(), &group, "test").unwrap();
                // Rank r weighs the sum by (r + 1, 1).
                let g = Tensor::new(&[r + 1.0, 1.0], &Device::Cpu).unwrap();
                let grads = (y.clone() * g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (values(&y), values(grads.get(x.as_tensor()).unwrap()))
            })
        })
        .collect();
    for h in handles {
        let (y, dx) = h.join().unwrap();
        assert_eq!(y, [3.0, 30.0]);
        // d/dx_r of Σ_k g_k·Σ_j x_j = Σ_k g_k.
        assert_eq!(dx, [6.0, 3.0]);
    }
}

#[test]
fn composite_empty_batches_give_the_kernels_gradients() {
    for (train, track) in [(true, true), (false, true), (false, false)] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let cfg = SyncBatchNormConfig::default().with_track_running_stats(track);
        let bn = SyncBatchNorm::new(3, cfg, vb, ProcessGroup::single()).unwrap();
        let (w, b) = bn.weight_and_bias().unwrap();
        let mut grads = Vec::new();
        for composite in [false, true] {
            let x = Var::zeros((0, 3, 4), DType::F32, &Device::Cpu).unwrap();
            let z = Var::zeros((0, 3, 4), DType::F32, &Device::Cpu).unwrap();
            let y = if composite {
                bn.forward_composite_t(x.as_tensor(), Some(z.as_tensor()), true, train)
            } else {
                bn.forward_add_relu_t(x.as_tensor(), z.as_tensor(), train)
            };
            let y = match y {
                Ok(y) => y,
                // Batch statistics of an empty batch alone (training, or
                // eval without running statistics, as in PyTorch): both
                // paths refuse them.
                Err(e) => {
                    assert!(train || !track, "{e}");
                    assert!(e.to_string().contains("more than 1 value"), "{e}");
                    grads.push(None);
                    continue;
                }
            };
            assert_eq!(y.dims(), [0, 3, 4]);
            let g = y.sum_all().unwrap().backward().unwrap();
            let dims = |t: &Tensor| g.get(t).map(|t| t.dims().to_vec());
            grads.push(Some((
                dims(x.as_tensor()),
                dims(z.as_tensor()),
                g.get(w).map(values),
                g.get(b).map(values),
            )));
        }
        assert_eq!(
            grads[0], grads[1],
            "train {train}, running statistics {track}"
        );
    }
}
