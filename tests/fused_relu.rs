//! `SyncBatchNorm::forward_relu_t` (batch norm with the ReLU fused in) against
//! the f64 reference and against `forward_t` followed by candle's `relu`.
//! (k ranks against one: `tests/ranks.rs`; on CUDA: `tests/cuda.rs`.)

mod common;

use candle::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use common::*;

const SHAPES: [&[usize]; 4] = [&[8, 3], &[4, 3, 5], &[3, 2, 4, 5], &[2, 3, 3, 2, 4]];

/// A layer over a fresh `VarMap` with random weights (some negative) and
/// biases; returns them as f64 (1 and 0 without `affine`).
fn layer(
    c_n: usize,
    cfg: SyncBatchNormConfig,
    dtype: DType,
    rng: &mut Rng,
) -> (SyncBatchNorm, Vec<f64>, Vec<f64>) {
    let varmap = VarMap::new();
    let param_dtype = if matches!(dtype, DType::F16 | DType::BF16) {
        DType::F32
    } else {
        dtype
    };
    let vb = VarBuilder::from_varmap(&varmap, param_dtype, &Device::Cpu);
    let bn = SyncBatchNorm::new(c_n, cfg, vb.pp("bn"), ProcessGroup::single()).unwrap();
    let Some((wt, bt)) = bn.weight_and_bias() else {
        return (bn, vec![1.0; c_n], vec![0.0; c_n]);
    };
    let w: Vec<f64> = (0..c_n)
        .map(|c| (0.5 + rng.uniform()) * if c == 1 { -1.0 } else { 1.0 })
        .collect();
    let b: Vec<f64> = (0..c_n).map(|_| 0.5 * rng.normal()).collect();
    Var::from_tensor(wt)
        .unwrap()
        .set(&tensor(&w, &[c_n], param_dtype))
        .unwrap();
    Var::from_tensor(bt)
        .unwrap()
        .set(&tensor(&b, &[c_n], param_dtype))
        .unwrap();
    (bn, w, b)
}

/// The gradients of the input and, for an affine layer, of weight and bias.
type Grads = (Vec<f64>, Option<(Vec<f64>, Vec<f64>)>);

/// `Σ g·y` in f64 and its gradients with respect to `x` and the layer's
/// weight and bias.
fn grads(bn: &SyncBatchNorm, x: &Var, y: &Tensor, g: &Tensor) -> Grads {
    let loss = (y.to_dtype(DType::F64).unwrap() * g.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let store = loss.backward().unwrap();
    let gx = store.get(x.as_tensor()).expect("input gradient");
    assert_eq!(gx.dtype(), x.dtype());
    let affine = bn.weight_and_bias().map(|(w, b)| {
        (
            values(store.get(w).expect("weight gradient")),
            values(store.get(b).expect("bias gradient")),
        )
    });
    (values(gx), affine)
}

/// `dy` where the layer's output is positive, else 0: the defined gradient of
/// the fused op (the mask is the output's, as in PyTorch's `relu`).
fn masked(dy: &[f64], y: &[f64]) -> Vec<f64> {
    dy.iter()
        .zip(y)
        .map(|(&g, &v)| if v > 0.0 { g } else { 0.0 })
        .collect()
}

#[test]
fn fused_relu_matches_f64_reference_in_training() {
    let mut seed = 1;
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for shape in SHAPES {
            for affine in [true, false] {
                for channels_last in [false, true] {
                    if channels_last && shape.len() < 3 {
                        continue;
                    }
                    let label = format!(
                        "{dtype:?} {shape:?} affine={affine} channels_last={channels_last}"
                    );
                    let mut rng = Rng::new(seed);
                    seed += 1;
                    let cfg = SyncBatchNormConfig {
                        affine,
                        ..Default::default()
                    };
                    let c_n = shape[1];
                    let (bn, w, b) = layer(c_n, cfg, dtype, &mut rng);
                    let elems: usize = shape.iter().product();
                    let xs = values(&tensor(&rng.normals(elems, 1.0, 2.0), shape, dtype));
                    let gs = values(&tensor(&rng.normals(elems, 0.0, 1.0), shape, dtype));
                    let x = if channels_last {
                        // The same logical values, stored (N, *, C).
                        let rank = shape.len();
                        let mut perm: Vec<usize> = vec![0];
                        perm.extend(2..rank);
                        perm.push(1);
                        let t = tensor(&xs, shape, dtype)
                            .permute(perm.as_slice())
                            .unwrap()
                            .contiguous()
                            .unwrap();
                        let mut inverse = vec![0; rank];
                        for (i, &p) in perm.iter().enumerate() {
                            inverse[p] = i;
                        }
                        t.permute(inverse.as_slice()).unwrap()
                    } else {
                        tensor(&xs, shape, dtype)
                    };
                    assert_eq!(channels_last, !x.is_contiguous(), "{label}");
                    let xv = Var::from_tensor(&x).unwrap();
                    let y = bn.forward_relu_t(xv.as_tensor(), true).unwrap();
                    assert_eq!(y.dims(), shape, "{label}: output shape");
                    assert_eq!(y.dtype(), dtype, "{label}: output dtype");
                    let ys = values(&y);
                    let r = reference_forward(&xs, shape, &w, &b, 1e-5);
                    let want: Vec<f64> = r.y.iter().map(|v| v.max(0.0)).collect();
                    let (atol, rtol) = tolerance(dtype);
                    assert_close(&format!("{label}: output"), &ys, &want, atol, rtol);
                    assert!(ys.iter().all(|&v| v >= 0.0), "{label}: negative output");
                    let zeros = ys.iter().filter(|&&v| v == 0.0).count();
                    assert!(
                        zeros > 0 && zeros < elems,
                        "{label}: {zeros} of {elems} outputs are zero"
                    );

                    let (gx, affine_grads) = grads(&bn, &xv, &y, &tensor(&gs, shape, dtype));
                    let (dx, dw, db) = reference_backward(&xs, &masked(&gs, &ys), shape, &w, 1e-5);
                    assert_close(
                        &format!("{label}: input gradient"),
                        &gx,
                        &dx,
                        atol * 4.0,
                        rtol * 4.0,
                    );
                    if let Some((gw, gb)) = affine_grads {
                        let scale = (r.count as f64).sqrt() * 4.0;
                        assert_close(
                            &format!("{label}: weight gradient"),
                            &gw,
                            &dw,
                            atol * scale,
                            rtol * 4.0,
                        );
                        assert_close(
                            &format!("{label}: bias gradient"),
                            &gb,
                            &db,
                            atol * scale,
                            rtol * 4.0,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn fused_relu_in_eval_uses_running_statistics() {
    for (seed, dtype) in [(50, DType::F32), (51, DType::F64), (52, DType::BF16)] {
        let shape = [4usize, 3, 6];
        let c_n = shape[1];
        let mut rng = Rng::new(seed);
        let cfg = SyncBatchNormConfig::default();
        let (bn, w, b) = layer(c_n, cfg, dtype, &mut rng);
        let elems: usize = shape.iter().product();
        // Two training steps move the running statistics away from (0, 1).
        for _ in 0..2 {
            let x = tensor(&rng.normals(elems, 3.0, 2.0), &shape, dtype);
            bn.forward_relu_t(&x, true).unwrap();
        }
        assert_eq!(bn.num_batches_tracked(), 2);
        let (mean, var) = (
            values(&bn.running_mean().unwrap()),
            values(&bn.running_var().unwrap()),
        );
        let xs = values(&tensor(&rng.normals(elems, 3.0, 2.0), &shape, dtype));
        let gs = values(&tensor(&rng.normals(elems, 0.0, 1.0), &shape, dtype));
        let xv = Var::from_tensor(&tensor(&xs, &shape, dtype)).unwrap();
        let y = bn.forward_relu_t(xv.as_tensor(), false).unwrap();
        let ys = values(&y);
        let want: Vec<f64> = reference_eval(&xs, &shape, &mean, &var, &w, &b, 1e-5)
            .iter()
            .map(|v| v.max(0.0))
            .collect();
        let (atol, rtol) = tolerance(dtype);
        let label = format!("eval {dtype:?}");
        assert_close(&format!("{label}: output"), &ys, &want, atol, rtol);
        assert_eq!(bn.num_batches_tracked(), 2, "{label}: eval must not count");

        // Fixed statistics: dx = mask·dy·w·invstd, dw = Σ mask·dy·x̂, db = Σ mask·dy.
        let (gx, affine_grads) = grads(&bn, &xv, &y, &tensor(&gs, &shape, dtype));
        let dy = masked(&gs, &ys);
        let idx = channel_indices(&shape);
        let mut dx = vec![0.0; elems];
        let (mut dw, mut db) = (vec![0.0; c_n], vec![0.0; c_n]);
        for (c, ix) in idx.iter().enumerate() {
            let invstd = 1.0 / (var[c] + 1e-5).sqrt();
            for &i in ix {
                dx[i] = dy[i] * w[c] * invstd;
                dw[c] += dy[i] * (xs[i] - mean[c]) * invstd;
                db[c] += dy[i];
            }
        }
        assert_close(
            &format!("{label}: input gradient"),
            &gx,
            &dx,
            atol * 4.0,
            rtol * 4.0,
        );
        let (gw, gb) = affine_grads.unwrap();
        assert_close(
            &format!("{label}: weight gradient"),
            &gw,
            &dw,
            atol * 20.0,
            rtol * 4.0,
        );
        assert_close(
            &format!("{label}: bias gradient"),
            &gb,
            &db,
            atol * 20.0,
            rtol * 4.0,
        );
    }
}

#[test]
fn fused_relu_equals_batch_norm_then_relu() {
    for (seed, dtype) in [(70, DType::F32), (71, DType::F64)] {
        let shape = [6usize, 4, 7, 5];
        let mut rng = Rng::new(seed);
        let (bn, _, _) = layer(shape[1], SyncBatchNormConfig::default(), dtype, &mut rng);
        let elems: usize = shape.iter().product();
        let x = tensor(&rng.normals(elems, -1.0, 3.0), &shape, dtype);
        let g = tensor(&rng.normals(elems, 0.0, 1.0), &shape, dtype);
        let xv = Var::from_tensor(&x).unwrap();
        let fused = bn.forward_relu_t(xv.as_tensor(), true).unwrap();
        let fused_grads = grads(&bn, &xv, &fused, &g);
        let two_ops = bn.forward_t(xv.as_tensor(), true).unwrap().relu().unwrap();
        let two_ops_grads = grads(&bn, &xv, &two_ops, &g);
        let label = format!("{dtype:?}");
        // The same arithmetic in the same precision: the outputs are equal.
        assert_eq!(values(&fused), values(&two_ops), "{label}: outputs");
        // Both forwards normalize with the statistics of the same batch.
        let (atol, rtol) = tolerance(dtype);
        assert_close(
            &format!("{label}: input gradient"),
            &fused_grads.0,
            &two_ops_grads.0,
            atol,
            rtol,
        );
        let ((fw, fb), (tw, tb)) = (fused_grads.1.unwrap(), two_ops_grads.1.unwrap());
        assert_close(
            &format!("{label}: weight gradient"),
            &fw,
            &tw,
            atol * 10.0,
            rtol,
        );
        assert_close(
            &format!("{label}: bias gradient"),
            &fb,
            &tb,
            atol * 10.0,
            rtol,
        );
    }
}

#[test]
fn fused_relu_keeps_nan() {
    // A NaN in channel 0 makes that channel's statistics NaN; the ReLU must
    // not turn its outputs into zeros (PyTorch's relu keeps NaN too), and the
    // other channels are unaffected.
    let shape = [4usize, 2, 3];
    let mut xs = Rng::new(90).normals(24, 0.0, 1.0);
    xs[0] = f64::NAN;
    let mut rng = Rng::new(91);
    let (bn, _, _) = layer(2, SyncBatchNormConfig::default(), DType::F32, &mut rng);
    let y = values(
        &bn.forward_relu_t(&tensor(&xs, &shape, DType::F32), true)
            .unwrap(),
    );
    for (i, v) in y.iter().enumerate() {
        let channel = (i / 3) % 2;
        if channel == 0 {
            assert!(v.is_nan(), "element {i}: {v} instead of NaN");
        } else {
            assert!(*v >= 0.0, "element {i}: {v}");
        }
    }
}
