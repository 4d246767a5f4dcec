//! Finite-difference gradients, determinism and numerical stability.

use crate::common;

use candle::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use common::*;

fn f64_layer(c: usize, affine: bool) -> (VarMap, SyncBatchNorm) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let cfg = SyncBatchNormConfig::default().with_affine(affine);
    let bn = SyncBatchNorm::new(c, cfg, vb, ProcessGroup::single()).unwrap();
    if let Some((w, b)) = bn.weight_and_bias() {
        Var::from_tensor(w)
            .unwrap()
            .set(&Tensor::new(&[0.7f64, 1.3, -0.4], &Device::Cpu).unwrap())
            .unwrap();
        Var::from_tensor(b)
            .unwrap()
            .set(&Tensor::new(&[0.1f64, 0.0, -0.3], &Device::Cpu).unwrap())
            .unwrap();
    }
    (varmap, bn)
}

/// `L(x) = Σ g·y(x)` in f64.
fn loss(bn: &SyncBatchNorm, x: &Tensor, g: &Tensor) -> Tensor {
    (bn.forward_t(x, true).unwrap() * g)
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn gradients_match_central_differences() {
    for (shape, affine) in [
        (vec![4usize, 3, 5], true),
        (vec![5, 3], false),
        (vec![2, 3, 2, 3], true),
    ] {
        let (_vm, bn) = f64_layer(3, affine);
        let mut rng = Rng::new(21);
        let n: usize = shape.iter().product();
        let xs = rng.normals(n, 0.5, 1.5);
        let g = tensor(&rng.normals(n, 0.0, 1.0), &shape, DType::F64);
        let x = Var::from_tensor(&tensor(&xs, &shape, DType::F64)).unwrap();
        let grads = loss(&bn, x.as_tensor(), &g).backward().unwrap();
        let analytic = values(grads.get(x.as_tensor()).unwrap());
        let h = 1e-6;
        for i in 0..n {
            let mut plus = xs.clone();
            plus[i] += h;
            let mut minus = xs.clone();
            minus[i] -= h;
            let lp = loss(&bn, &tensor(&plus, &shape, DType::F64), &g)
                .to_scalar::<f64>()
                .unwrap();
            let lm = loss(&bn, &tensor(&minus, &shape, DType::F64), &g)
                .to_scalar::<f64>()
                .unwrap();
            let numeric = (lp - lm) / (2.0 * h);
            assert!(
                (numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
                "{shape:?} x[{i}]: numeric {numeric}, analytic {}",
                analytic[i]
            );
        }
        if let Some((w, b)) = bn.weight_and_bias() {
            for (name, p) in [("weight", w), ("bias", b)] {
                let analytic = values(grads.get(p).unwrap());
                let base = values(p);
                for c in 0..3 {
                    let pv = Var::from_tensor(p).unwrap();
                    let mut v = base.clone();
                    v[c] += h;
                    pv.set(&tensor(&v, &[3], DType::F64)).unwrap();
                    let lp = loss(&bn, x.as_tensor(), &g).to_scalar::<f64>().unwrap();
                    v[c] -= 2.0 * h;
                    pv.set(&tensor(&v, &[3], DType::F64)).unwrap();
                    let lm = loss(&bn, x.as_tensor(), &g).to_scalar::<f64>().unwrap();
                    pv.set(&tensor(&base, &[3], DType::F64)).unwrap();
                    let numeric = (lp - lm) / (2.0 * h);
                    assert!(
                        (numeric - analytic[c]).abs() < 1e-6 * (1.0 + numeric.abs()),
                        "{name}[{c}]: numeric {numeric}, analytic {}",
                        analytic[c]
                    );
                }
            }
        }
    }
}

#[test]
fn eval_mode_gradients_match_central_differences() {
    let (_vm, bn) = f64_layer(3, true);
    let mut rng = Rng::new(5);
    bn.forward_t(
        &tensor(&rng.normals(60, 2.0, 3.0), &[4, 3, 5], DType::F64),
        true,
    )
    .unwrap();
    let xs = rng.normals(30, 0.0, 1.0);
    let g = tensor(&rng.normals(30, 0.0, 1.0), &[2, 3, 5], DType::F64);
    let x = Var::from_tensor(&tensor(&xs, &[2, 3, 5], DType::F64)).unwrap();
    let l = |x: &Tensor| {
        (bn.forward_t(x, false).unwrap() * &g)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let analytic = values(
        l(x.as_tensor())
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap(),
    );
    for i in 0..30 {
        let (mut p, mut m) = (xs.clone(), xs.clone());
        p[i] += 1e-6;
        m[i] -= 1e-6;
        let numeric = (l(&tensor(&p, &[2, 3, 5], DType::F64))
            .to_scalar::<f64>()
            .unwrap()
            - l(&tensor(&m, &[2, 3, 5], DType::F64))
                .to_scalar::<f64>()
                .unwrap())
            / 2e-6;
        assert!(
            (numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
            "x[{i}]: {numeric} vs {}",
            analytic[i]
        );
    }
}

#[test]
fn identical_runs_are_bitwise_equal() {
    let run = || {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let bn = SyncBatchNorm::new(
            16,
            SyncBatchNormConfig::default(),
            vb,
            ProcessGroup::single(),
        )
        .unwrap();
        let mut rng = Rng::new(99);
        let mut out = Vec::new();
        for shape in [[8usize, 16, 33, 31], [512, 16, 1, 1]] {
            let n = shape.iter().product();
            let x =
                Var::from_tensor(&tensor(&rng.normals(n, 3.0, 2.0), &shape, DType::F32)).unwrap();
            let y = bn.forward_t(x.as_tensor(), true).unwrap();
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            out.push(y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            out.push(
                grads
                    .get(x.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            out.push(bn.running_var().unwrap().to_vec1::<f32>().unwrap());
        }
        out
    };
    let a = run();
    let b = run();
    for (x, y) in a.iter().zip(&b) {
        assert!(
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "runs differ"
        );
    }
}

#[test]
fn large_mean_small_std_in_f32() {
    // Mean 1e4, std 1: naive f32 sums of squares lose every digit of the variance.
    let shape = [16usize, 4, 32, 32];
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(8);
    let x = tensor(&rng.normals(n, 1e4, 1.0), &shape, DType::F32);
    let xs = values(&x);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg = SyncBatchNormConfig::default().with_momentum(Some(1.0));
    let bn = SyncBatchNorm::new(4, cfg, vb, ProcessGroup::single()).unwrap();
    let y = values(&bn.forward_t(&x, true).unwrap());
    let r = reference_forward(&xs, &shape, &[1.0; 4], &[0.0; 4], 1e-5);
    // Normalized values are O(1): 1e-3 relative to that scale.
    assert_close("normalized output", &y, &r.y, 1e-3, 1e-3);
    let count = r.count as f64;
    let unbiased: Vec<f64> = r.var.iter().map(|v| v * count / (count - 1.0)).collect();
    assert_close(
        "running var",
        &values(bn.running_var().unwrap()),
        &unbiased,
        0.0,
        1e-3,
    );
    assert_close(
        "running mean",
        &values(bn.running_mean().unwrap()),
        &r.mean,
        0.0,
        1e-6,
    );
}
