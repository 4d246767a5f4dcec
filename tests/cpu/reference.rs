//! The layer against the f64 reference, one rank, over the whole matrix:
//! dtype × input rank 2..5 × affine × momentum Some/None × track_running_stats.

use crate::common;

use candle::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use common::*;

const SHAPES: [&[usize]; 4] = [&[6, 3], &[4, 3, 5], &[3, 2, 4, 5], &[2, 3, 3, 2, 4]];

struct Case {
    dtype: DType,
    shape: &'static [usize],
    affine: bool,
    momentum: Option<f64>,
    track: bool,
}

fn run_case(case: &Case, seed: u64) {
    let Case {
        dtype,
        shape,
        affine,
        momentum,
        track,
    } = *case;
    let label = format!("{dtype:?} {shape:?} affine={affine} momentum={momentum:?} track={track}");
    let c_n = shape[1];
    let eps = 1e-5;
    let varmap = VarMap::new();
    // Half inputs with f32 parameters, as under PyTorch's autocast.
    let param_dtype = if matches!(dtype, DType::F16 | DType::BF16) {
        DType::F32
    } else {
        dtype
    };
    let vb = VarBuilder::from_varmap(&varmap, param_dtype, &Device::Cpu);
    let cfg = SyncBatchNormConfig::default()
        .with_eps(eps)
        .with_momentum(momentum)
        .with_affine(affine)
        .with_track_running_stats(track);
    let bn = SyncBatchNorm::new(c_n, cfg, vb.pp("bn"), ProcessGroup::single()).unwrap();
    let mut rng = Rng::new(seed);
    let (w, b) = if affine {
        let w: Vec<f64> = (0..c_n).map(|_| 0.5 + rng.uniform()).collect();
        let b: Vec<f64> = (0..c_n).map(|_| rng.normal()).collect();
        let (wt, bt) = bn.weight_and_bias().unwrap();
        Var::from_tensor(wt)
            .unwrap()
            .set(&tensor(&w, &[c_n], param_dtype))
            .unwrap();
        Var::from_tensor(bt)
            .unwrap()
            .set(&tensor(&b, &[c_n], param_dtype))
            .unwrap();
        (w, b)
    } else {
        (vec![1.0; c_n], vec![0.0; c_n])
    };
    let (atol, rtol) = tolerance(dtype);
    let mut run_mean = vec![0.0; c_n];
    let mut run_var = vec![1.0; c_n];
    let elems: usize = shape.iter().product();
    for step in 1..=3u64 {
        let x = tensor(&rng.normals(elems, 2.0 * step as f64, 1.5), shape, dtype);
        let xs = values(&x);
        let g = tensor(&rng.normals(elems, 0.0, 1.0), shape, dtype);
        let gs = values(&g);
        let xvar = Var::from_tensor(&x).unwrap();
        let y = bn.forward_t(xvar.as_tensor(), true).unwrap();
        assert_eq!(y.dtype(), dtype, "{label}: output dtype");
        assert_eq!(y.dims(), shape, "{label}: output shape");
        let r = reference_forward(&xs, shape, &w, &b, eps);
        assert_close(
            &format!("{label}: train output, step {step}"),
            &values(&y),
            &r.y,
            atol,
            rtol,
        );

        let loss = (y.to_dtype(DType::F64).unwrap() * g.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let (dx, dw, db) = reference_backward(&xs, &gs, shape, &w, eps);
        let gx = grads.get(xvar.as_tensor()).expect("input gradient");
        assert_eq!(gx.dtype(), dtype, "{label}: input gradient dtype");
        assert_close(
            &format!("{label}: input gradient, step {step}"),
            &values(gx),
            &dx,
            atol * 4.0,
            rtol * 4.0,
        );
        if affine {
            let (wt, bt) = bn.weight_and_bias().unwrap();
            let scale = (r.count as f64).sqrt();
            let gw = grads.get(wt).expect("weight gradient");
            let gb = grads.get(bt).expect("bias gradient");
            assert_eq!(gw.dtype(), param_dtype);
            assert_close(
                &format!("{label}: weight gradient"),
                &values(gw),
                &dw,
                atol * scale * 4.0,
                rtol * 4.0,
            );
            assert_close(
                &format!("{label}: bias gradient"),
                &values(gb),
                &db,
                atol * scale * 4.0,
                rtol * 4.0,
            );
        }

        let factor = momentum.unwrap_or(1.0 / step as f64);
        let n = r.count as f64;
        for c in 0..c_n {
            run_mean[c] = (1.0 - factor) * run_mean[c] + factor * r.mean[c];
            run_var[c] = (1.0 - factor) * run_var[c] + factor * r.var[c] * n / (n - 1.0);
        }
        if track {
            let stat_tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            assert_close(
                &format!("{label}: running mean"),
                &values(bn.running_mean().unwrap()),
                &run_mean,
                stat_tol,
                stat_tol,
            );
            assert_close(
                &format!("{label}: running var"),
                &values(bn.running_var().unwrap()),
                &run_var,
                stat_tol,
                stat_tol,
            );
            assert_eq!(
                bn.num_batches_tracked().unwrap(),
                step,
                "{label}: num_batches_tracked"
            );
            let rm_dtype = bn.running_mean().unwrap().dtype();
            assert_eq!(rm_dtype, param_dtype, "{label}: running stats dtype");
        } else {
            assert!(bn.running_mean().is_none() && bn.running_var().is_none());
            assert_eq!(bn.num_batches_tracked().unwrap(), 0);
        }
    }
    // Eval: running statistics, or batch statistics without tracking.
    let x = tensor(&rng.normals(elems, 1.0, 2.0), shape, dtype);
    let xs = values(&x);
    let y = bn.forward_t(&x, false).unwrap();
    let expected = if track {
        reference_eval(&xs, shape, &run_mean, &run_var, &w, &b, eps)
    } else {
        reference_forward(&xs, shape, &w, &b, eps).y
    };
    assert_close(
        &format!("{label}: eval output"),
        &values(&y),
        &expected,
        atol * 2.0,
        rtol * 2.0,
    );
    if track {
        assert_eq!(
            bn.num_batches_tracked().unwrap(),
            3,
            "{label}: eval must not count batches"
        );
    }
}

#[test]
fn full_matrix_against_f64_reference() {
    let mut seed = 1;
    let mut cases = 0;
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for shape in SHAPES {
            for affine in [true, false] {
                for momentum in [Some(0.1), None] {
                    for track in [true, false] {
                        run_case(
                            &Case {
                                dtype,
                                shape,
                                affine,
                                momentum,
                                track,
                            },
                            seed,
                        );
                        seed += 1;
                        cases += 1;
                    }
                }
            }
        }
    }
    assert_eq!(cases, 128);
}

#[test]
fn half_input_with_half_parameters() {
    for dtype in [DType::F16, DType::BF16] {
        let shape = [4usize, 3, 6];
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
        let bn = SyncBatchNorm::new(
            3,
            SyncBatchNormConfig::default(),
            vb,
            ProcessGroup::single(),
        )
        .unwrap();
        let (w, b) = bn.weight_and_bias().unwrap();
        assert_eq!(w.dtype(), dtype);
        assert_eq!(b.dtype(), dtype);
        // Statistics are kept in f32 even with half parameters.
        assert_eq!(bn.running_mean().unwrap().dtype(), DType::F32);
        let mut rng = Rng::new(7);
        let x = tensor(&rng.normals(72, 0.5, 2.0), &shape, dtype);
        let xvar = Var::from_tensor(&x).unwrap();
        let y = bn.forward_t(xvar.as_tensor(), true).unwrap();
        let r = reference_forward(&values(&x), &shape, &[1.0; 3], &[0.0; 3], 1e-5);
        let (atol, rtol) = tolerance(dtype);
        assert_close("half params output", &values(&y), &r.y, atol, rtol);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(grads.get(w).unwrap().dtype(), dtype);
        assert_eq!(grads.get(b).unwrap().dtype(), dtype);
        assert_eq!(grads.get(xvar.as_tensor()).unwrap().dtype(), dtype);
    }
}

type View = fn(&Tensor) -> Tensor;

/// Output, input gradient, weight gradient, gradient of `sum(y)`, running
/// variance and output strides of one training step on `view(base)`;
/// gradients are taken with respect to `base` and seen through `view`.
fn strided_step(c: usize, base: &Tensor, view: View) -> [Vec<f64>; 6] {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bn = SyncBatchNorm::new(c, 1e-5, vb, ProcessGroup::single()).unwrap();
    let bv = Var::from_tensor(base).unwrap();
    let x = view(bv.as_tensor());
    let y = bn.forward_t(&x, true).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let gx = view(grads.get(bv.as_tensor()).unwrap());
    let (wt, _) = bn.weight_and_bias().unwrap();
    let gw = grads.get(wt).unwrap().clone();
    // A broadcast (all-zero-stride) upstream gradient: d(sum y)/dx.
    let y2 = bn.forward_t(&x, true).unwrap();
    let g2 = y2.sum_all().unwrap().backward().unwrap();
    let gx2 = view(g2.get(bv.as_tensor()).unwrap());
    let strides = y.stride().iter().map(|&s| s as f64).collect();
    [
        values(&y),
        values(&gx),
        values(&gw),
        values(&gx2),
        values(bn.running_var().unwrap()),
        strides,
    ]
}

#[test]
fn strided_inputs_match_contiguous() {
    // Channels-last (a permuted view), a narrowed batch and a transposed
    // spatial pair give the numbers of the contiguous input.
    let mut rng = Rng::new(11);
    let (n, c, h, w) = (3usize, 4usize, 5usize, 6usize);
    let cases: Vec<(&str, Tensor, View)> = vec![
        (
            "channels-last",
            tensor(
                &rng.normals(n * h * w * c, 1.0, 3.0),
                &[n, h, w, c],
                DType::F32,
            ),
            |t| t.permute((0, 3, 1, 2)).unwrap(),
        ),
        (
            "narrowed",
            tensor(
                &rng.normals(2 * n * c * h * w, 0.0, 1.0),
                &[2 * n, c, h, w],
                DType::F32,
            ),
            |t| t.narrow(0, 1, 3).unwrap(),
        ),
        (
            "transposed",
            tensor(
                &rng.normals(n * c * w * h, 0.0, 1.0),
                &[n, c, w, h],
                DType::F32,
            ),
            |t| t.transpose(2, 3).unwrap(),
        ),
    ];
    for (label, base, view) in cases {
        let strided = strided_step(c, &base, view);
        let dense = strided_step(c, &view(&base).contiguous().unwrap(), |t| t.clone());
        let names = [
            "output",
            "input gradient",
            "weight gradient",
            "gradient of sum",
            "running var",
        ];
        for (k, name) in names.iter().enumerate() {
            assert_close(
                &format!("{label}: {name}"),
                &strided[k],
                &dense[k],
                1e-5,
                1e-5,
            );
        }
        if label == "channels-last" {
            // The output keeps the channels-last memory order.
            let expected = [h * w * c, 1, w * c, c].map(|s| s as f64);
            assert_eq!(strided[5], expected, "channels-last output strides");
        }
    }
}
