//! `SyncBatchNorm::forward_relu_t` (batch norm with the ReLU fused in) against
//! the f64 reference and against `forward_t` followed by candle's `relu`.
//! (k ranks against one: `tests/cpu/ranks.rs`; on CUDA: `tests/cuda.rs`.)

use crate::common;

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
fn grads(bn: &SyncBatchNorm, x: &Leaf, y: &Tensor, g: &Tensor) -> Grads {
    let loss = (y.to_dtype(DType::F64).unwrap() * g.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let store = loss.backward().unwrap();
    let gx = x.grad(&store);
    let affine = bn.weight_and_bias().map(|(w, b)| {
        (
            values(store.get(w).expect("weight gradient")),
            values(store.get(b).expect("bias gradient")),
        )
    });
    (gx, affine)
}

/// A leaf variable holding `values` of logical shape `shape` (N, C, *),
/// stored channels-last `(N, *, C)` when `channels_last` (rank ≥ 3). `x` is
/// the logical view the layer gets (a permuted view of the variable, so the
/// layout survives: `Var::from_tensor` itself would copy to contiguous).
struct Leaf {
    var: Var,
    x: Tensor,
    to_logical: Option<Vec<usize>>,
}

impl Leaf {
    fn new(values: &[f64], shape: &[usize], dtype: DType, channels_last: bool) -> Self {
        let t = tensor(values, shape, dtype);
        let rank = shape.len();
        if !channels_last || rank < 3 {
            let var = Var::from_tensor(&t).unwrap();
            let x = var.as_tensor().clone();
            return Self {
                var,
                x,
                to_logical: None,
            };
        }
        let (perm, inverse) = channels_last_perm(rank);
        let var =
            Var::from_tensor(&t.permute(perm.as_slice()).unwrap().contiguous().unwrap()).unwrap();
        let x = var.as_tensor().permute(inverse.as_slice()).unwrap();
        assert!(!x.is_contiguous());
        Self {
            var,
            x,
            to_logical: Some(inverse),
        }
    }

    /// The variable's gradient in logical order.
    fn grad(&self, store: &candle::backprop::GradStore) -> Vec<f64> {
        let g = store.get(self.var.as_tensor()).expect("gradient of a leaf");
        assert_eq!(g.dtype(), self.x.dtype(), "gradient dtype");
        match &self.to_logical {
            Some(p) => values(&g.permute(p.as_slice()).unwrap()),
            None => values(g),
        }
    }
}

/// `dy` where the layer's output is positive, else 0: the defined gradient of
/// the fused op (the mask is the output's, as in PyTorch's `relu`).
fn masked(dy: &[f64], y: &[f64]) -> Vec<f64> {
    dy.iter()
        .zip(y)
        .map(|(&g, &v)| if v > 0.0 { g } else { 0.0 })
        .collect()
}

/// One case of the fused op against the f64 reference: `forward_relu_t`
/// without a residual, `forward_add_relu_t` with one (stored channels-last
/// when `Some(true)`): output, the gradients of input, residual (exactly the
/// masked upstream gradient), weight and bias in training, then the eval
/// output with the running statistics.
fn check_fused(
    dtype: DType,
    shape: &[usize],
    affine: bool,
    x_last: bool,
    residual: Option<bool>,
    seed: u64,
) {
    let label =
        format!("{dtype:?} {shape:?} affine={affine} x_last={x_last} residual={residual:?}");
    let mut rng = Rng::new(seed);
    let cfg = SyncBatchNormConfig::default().with_affine(affine);
    let (bn, w, b) = layer(shape[1], cfg, dtype, &mut rng);
    let elems: usize = shape.iter().product();
    let (atol, rtol) = tolerance(dtype);
    let round = |v: Vec<f64>| values(&tensor(&v, shape, dtype));
    let xs = round(rng.normals(elems, 1.0, 2.0));
    let zs = round(rng.normals(elems, 0.0, 1.0));
    let gs = round(rng.normals(elems, 0.0, 1.0));
    let xv = Leaf::new(&xs, shape, dtype, x_last);
    let zv = residual.map(|z_last| Leaf::new(&zs, shape, dtype, z_last));
    let forward = |train: bool| match &zv {
        Some(z) => bn.forward_add_relu_t(&xv.x, &z.x, train).unwrap(),
        None => bn.forward_relu_t(&xv.x, train).unwrap(),
    };
    // relu(y + z) of the reference's normalized values (z = 0 without one).
    let expected = |normalized: &[f64]| -> Vec<f64> {
        let z = |i: usize| if zv.is_some() { zs[i] } else { 0.0 };
        normalized
            .iter()
            .enumerate()
            .map(|(i, v)| (v + z(i)).max(0.0))
            .collect()
    };

    let y = forward(true);
    assert_eq!(y.dims(), shape, "{label}: output shape");
    assert_eq!(y.dtype(), dtype, "{label}: output dtype");
    let ys = values(&y);
    let r = reference_forward(&xs, shape, &w, &b, 1e-5);
    assert_close(
        &format!("{label}: output"),
        &ys,
        &expected(&r.y),
        atol,
        rtol,
    );
    assert!(ys.iter().all(|&v| v >= 0.0), "{label}: negative output");
    let zeros = ys.iter().filter(|&&v| v == 0.0).count();
    assert!(
        zeros > 0 && zeros < elems,
        "{label}: {zeros} of {elems} outputs are zero"
    );

    let loss = (y.to_dtype(DType::F64).unwrap() * tensor(&gs, shape, DType::F64))
        .unwrap()
        .sum_all()
        .unwrap();
    let store = loss.backward().unwrap();
    let dy = masked(&gs, &ys);
    if let Some(z) = &zv {
        assert_eq!(z.grad(&store), dy, "{label}: residual gradient");
    }
    let (dx, dw, db) = reference_backward(&xs, &dy, shape, &w, 1e-5);
    assert_close(
        &format!("{label}: input gradient"),
        &xv.grad(&store),
        &dx,
        atol * 4.0,
        rtol * 4.0,
    );
    if let Some((wt, bt)) = bn.weight_and_bias() {
        let scale = (r.count as f64).sqrt() * 4.0;
        let gw = values(store.get(wt).expect("weight gradient"));
        let gb = values(store.get(bt).expect("bias gradient"));
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

    let (mean, var) = (
        values(bn.running_mean().unwrap()),
        values(bn.running_var().unwrap()),
    );
    let want = expected(&reference_eval(&xs, shape, &mean, &var, &w, &b, 1e-5));
    assert_close(
        &format!("{label}: eval output"),
        &values(&forward(false)),
        &want,
        atol,
        rtol,
    );
}

#[test]
fn fused_relu_matches_f64_reference() {
    let mut seed = 1;
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for shape in SHAPES {
            for affine in [true, false] {
                for x_last in [false, true] {
                    if !x_last || shape.len() >= 3 {
                        check_fused(dtype, shape, affine, x_last, None, seed);
                        seed += 1;
                    }
                }
            }
        }
    }
}

#[test]
fn fused_add_relu_matches_f64_reference() {
    let mut seed = 1000;
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for shape in SHAPES {
            for affine in [true, false] {
                // The residual may have its own layout, unlike the input's.
                for (x_last, z_last) in [(false, false), (true, false), (false, true)] {
                    if !(x_last || z_last) || shape.len() >= 3 {
                        check_fused(dtype, shape, affine, x_last, Some(z_last), seed);
                        seed += 1;
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
        assert_eq!(bn.num_batches_tracked().unwrap(), 2);
        let (mean, var) = (
            values(bn.running_mean().unwrap()),
            values(bn.running_var().unwrap()),
        );
        let xs = values(&tensor(&rng.normals(elems, 3.0, 2.0), &shape, dtype));
        let gs = values(&tensor(&rng.normals(elems, 0.0, 1.0), &shape, dtype));
        let xv = Leaf::new(&xs, &shape, dtype, false);
        let y = bn.forward_relu_t(&xv.x, false).unwrap();
        let ys = values(&y);
        let want: Vec<f64> = reference_eval(&xs, &shape, &mean, &var, &w, &b, 1e-5)
            .iter()
            .map(|v| v.max(0.0))
            .collect();
        let (atol, rtol) = tolerance(dtype);
        let label = format!("eval {dtype:?}");
        assert_close(&format!("{label}: output"), &ys, &want, atol, rtol);
        assert_eq!(
            bn.num_batches_tracked().unwrap(),
            2,
            "{label}: eval must not count"
        );

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
        let xv = Leaf::new(&rng.normals(elems, -1.0, 3.0), &shape, dtype, false);
        let g = tensor(&rng.normals(elems, 0.0, 1.0), &shape, dtype);
        let fused = bn.forward_relu_t(&xv.x, true).unwrap();
        let fused_grads = grads(&bn, &xv, &fused, &g);
        let two_ops = bn.forward_t(&xv.x, true).unwrap().relu().unwrap();
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

#[test]
fn fused_add_relu_equals_three_ops() {
    for (seed, dtype) in [(1100, DType::F32), (1101, DType::F64)] {
        let shape = [6usize, 4, 7, 5];
        let mut rng = Rng::new(seed);
        let (bn, _, _) = layer(shape[1], SyncBatchNormConfig::default(), dtype, &mut rng);
        let elems: usize = shape.iter().product();
        let x = Var::from_tensor(&tensor(&rng.normals(elems, -1.0, 3.0), &shape, dtype)).unwrap();
        let z = Var::from_tensor(&tensor(&rng.normals(elems, 0.0, 1.0), &shape, dtype)).unwrap();
        let g = tensor(&rng.normals(elems, 0.0, 1.0), &shape, dtype);
        let run = |fused: bool| {
            let y = if fused {
                bn.forward_add_relu_t(x.as_tensor(), z.as_tensor(), true)
                    .unwrap()
            } else {
                (bn.forward_t(x.as_tensor(), true).unwrap() + z.as_tensor())
                    .unwrap()
                    .relu()
                    .unwrap()
            };
            let store = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let (wt, bt) = bn.weight_and_bias().unwrap();
            let grad = |t: &Tensor| values(store.get(t).unwrap());
            (
                values(&y),
                [grad(x.as_tensor()), grad(z.as_tensor()), grad(wt), grad(bt)],
            )
        };
        let (y_fused, g_fused) = run(true);
        let (y_ops, g_ops) = run(false);
        let label = format!("{dtype:?}");
        // The same operations in the same precision and order.
        assert_eq!(y_fused, y_ops, "{label}: outputs");
        let (atol, rtol) = tolerance(dtype);
        for (i, what) in ["input", "residual", "weight", "bias"].iter().enumerate() {
            let scale = if i >= 2 { 10.0 } else { 1.0 };
            assert_close(
                &format!("{label}: {what} gradient"),
                &g_fused[i],
                &g_ops[i],
                atol * scale,
                rtol,
            );
        }
    }
}

#[test]
fn a_mismatched_residual_is_an_error_naming_the_layer() {
    let mut rng = Rng::new(1200);
    let (bn, _, _) = layer(3, SyncBatchNormConfig::default(), DType::F32, &mut rng);
    let x = tensor(&rng.normals(24, 0.0, 1.0), &[2, 3, 4], DType::F32);
    let cases = [
        (
            tensor(&rng.normals(18, 0.0, 1.0), &[2, 3, 3], DType::F32),
            "shape",
        ),
        (
            tensor(&rng.normals(24, 0.0, 1.0), &[2, 3, 4], DType::F64),
            "dtype",
        ),
    ];
    for (z, what) in cases {
        let err = bn.forward_add_relu_t(&x, &z, true).unwrap_err().to_string();
        assert!(
            err.contains("SyncBatchNorm 'bn'")
                && err.contains("residual")
                && err.contains("[2, 3, 4]"),
            "{what}: {err}"
        );
    }
    // Nothing was counted: the check comes before the statistics.
    assert_eq!(bn.num_batches_tracked().unwrap(), 0);
}
