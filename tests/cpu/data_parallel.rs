//! Data-parallel helpers over in-process ranks: parameter broadcast, bucketed
//! gradient averaging, atomic checkpoints.

use crate::common::on_groups;
use candle::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use candle_syncbn::data_parallel::{
    average_gradients_bucketed, average_gradients_with, broadcast_varmap, save_varmap_atomic,
    AverageOptions, GradientAverager,
};
use candle_syncbn::group::Backend;
use candle_syncbn::ProcessGroup;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A backend that logs the dtype and size of every all-reduce, over an
/// in-process group.
#[derive(Debug)]
struct Logged {
    inner: ProcessGroup,
    log: Arc<Mutex<Vec<(DType, usize)>>>,
}

impl Backend for Logged {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, t: &Tensor) -> candle::Result<Tensor> {
        self.log.lock().unwrap().push((t.dtype(), t.elem_count()));
        self.inner.all_reduce_sum(t)
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> candle::Result<Tensor> {
        self.inner.broadcast(t, root)
    }
    fn name(&self) -> &str {
        "logged"
    }
}

/// bf16 and f16 gradients are reduced in f32 by default and in their own
/// dtype on request (half the bytes, as PyTorch's DDP); either way the
/// average comes back in the variable's dtype, and the division by the
/// world size is folded into the pack (the sum of the packed values is the
/// average).
#[test]
fn half_gradients_reduce_in_f32_or_in_their_own_dtype() {
    for own in [false, true] {
        let groups = ProcessGroup::threads(3).unwrap();
        let handles: Vec<_> = groups
            .into_iter()
            .map(|inner| {
                std::thread::spawn(move || {
                    let log = Arc::new(Mutex::new(Vec::new()));
                    let g = ProcessGroup::from_backend(Logged {
                        inner,
                        log: log.clone(),
                    });
                    let r = g.rank() as f32;
                    let varmap = VarMap::new();
                    let vb = VarBuilder::from_varmap(&varmap, DType::BF16, &Device::Cpu);
                    let h = vb.get_with_hints(7, "h", Init::Const(0.0)).unwrap();
                    let f = vb
                        .get_with_hints_dtype(3, "f", Init::Const(0.0), DType::F16)
                        .unwrap();
                    // Gradients (i + 1)(r + 1) for h and (r, -2r, 1/2) for f.
                    let gh: Vec<f32> = (0..7).map(|i| (i as f32 + 1.0) * (r + 1.0)).collect();
                    let gh = Tensor::new(gh, &Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::BF16)
                        .unwrap();
                    let gf = Tensor::new(&[r, -2.0 * r, 0.5], &Device::Cpu).unwrap();
                    let gf = gf.to_dtype(DType::F16).unwrap();
                    let loss = (h
                        .mul(&gh)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        + f.mul(&gf)
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .to_dtype(DType::F32)
                            .unwrap())
                    .unwrap();
                    let mut grads = loss.backward().unwrap();
                    let options = AverageOptions::default().with_half_in_own_dtype(own);
                    average_gradients_with(&varmap, &mut grads, &g, &options).unwrap();
                    let out = |t: &Tensor| {
                        let g = grads.get(t).unwrap();
                        (
                            g.dtype(),
                            g.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
                        )
                    };
                    let log = log.lock().unwrap().clone();
                    (out(&h), out(&f), log)
                })
            })
            .collect();
        for h in handles {
            let ((dh, vh), (df, vf), log) = h.join().unwrap();
            assert_eq!((dh, df), (DType::BF16, DType::F16));
            // (1 + 2 + 3) / 3 = 2 times (i + 1); (0 + 1 + 2) / 3 = 1.
            let want: Vec<f32> = (0..7).map(|i| 2.0 * (i as f32 + 1.0)).collect();
            for (g, w) in vh.iter().zip(&want) {
                assert!((g - w).abs() <= 0.02 * w, "own {own}: {vh:?}");
            }
            for (g, w) in vf.iter().zip([1.0f32, -2.0, 0.5]) {
                assert!((g - w).abs() <= 2e-3, "own {own}: {vf:?}");
            }
            // The "has gradient" flags, then the buckets.
            let buckets = &log[1..];
            if own {
                assert_eq!(buckets, &[(DType::F16, 3), (DType::BF16, 7)], "{log:?}");
            } else {
                assert_eq!(buckets, &[(DType::F32, 10)], "{log:?}");
            }
        }
    }
}

/// A varmap with two weights (f32, f64), a counter (i64) and a stat without
/// gradient, all different per rank.
fn model(rank: usize) -> (VarMap, Tensor, Tensor, Tensor) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let c = rank as f64 + 1.0;
    let a = vb.get_with_hints((3, 2), "a", Init::Const(c)).unwrap();
    let b = vb
        .get_with_hints_dtype(5, "b", Init::Const(-c), DType::F64)
        .unwrap();
    let s = vb.get_with_hints(4, "stat", Init::Const(10.0 * c)).unwrap();
    vb.get_with_hints_dtype((), "n", Init::Const(c), DType::I64)
        .unwrap();
    (varmap, a, b, s)
}

#[test]
fn broadcast_and_average() {
    let groups = ProcessGroup::threads(3).unwrap();
    let handles: Vec<_> = groups
        .into_iter()
        .map(|g| {
            std::thread::spawn(move || {
                let r = g.rank();
                let (varmap, a, b, s) = model(r);
                broadcast_varmap(&varmap, &g, 0).unwrap();
                let all: Vec<f64> = [&a, &b, &s]
                    .iter()
                    .flat_map(|t| {
                        t.to_dtype(DType::F64)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f64>()
                            .unwrap()
                    })
                    .collect();
                let n = varmap.data().lock().unwrap()["n"]
                    .as_tensor()
                    .to_scalar::<i64>()
                    .unwrap();
                // gradients: d(sum(a)·(r+1))/da = r+1; b has a gradient on rank 1 only.
                let mut loss = (a.sum_all().unwrap() * (r as f64 + 1.0)).unwrap();
                if r == 1 {
                    loss = (loss + b.sum_all().unwrap().to_dtype(DType::F32).unwrap()).unwrap();
                }
                let mut grads = loss.backward().unwrap();
                // 8-byte buckets: one call per variable, exercising the split.
                average_gradients_bucketed(&varmap, &mut grads, &g, 8).unwrap();
                let ga = grads
                    .get(&a)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let gb = grads.get(&b).unwrap().to_vec1::<f64>().unwrap();
                assert!(
                    grads.get(&s).is_none(),
                    "no gradient must appear for a stat"
                );
                (all, n, ga, gb)
            })
        })
        .collect();
    for h in handles {
        let (all, n, ga, gb) = h.join().unwrap();
        assert_eq!(&all[..6], &[1.0; 6]);
        assert_eq!(&all[6..11], &[-1.0; 5]);
        assert_eq!(&all[11..], &[10.0; 4]);
        assert_eq!(n, 1);
        assert_eq!(ga, vec![2.0; 6]); // (1 + 2 + 3) / 3
        assert_eq!(gb, vec![1.0 / 3.0; 5]); // (0 + 1 + 0) / 3
    }
}

#[test]
fn checkpoint_is_written_atomically_and_reloads() {
    let (varmap, ..) = model(2);
    let dir = std::env::temp_dir().join(format!("syncbn-dp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("m.safetensors");
    save_varmap_atomic(&varmap, &p).unwrap();
    save_varmap_atomic(&varmap, &p).unwrap();
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("m.safetensors")]);
    let (mut other, a, ..) = model(0);
    other.load(&p).unwrap();
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![3.0; 6]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rank `r`'s [`model`] with an averager that agreed on a step where no rank
/// had a gradient for `b`.
fn agreed_without_b(g: &ProcessGroup) -> (VarMap, Tensor, Tensor, GradientAverager) {
    let (varmap, a, b, _) = model(g.rank());
    let mut averager = GradientAverager::new(g, AverageOptions::default());
    let mut grads = model_grads(&a, &b, g.rank(), false);
    averager.average(&varmap, &mut grads).unwrap();
    assert!(grads.get(&b).is_none());
    (varmap, a, b, averager)
}

/// Rank `r`'s gradients of [`model`]: `a` gets r + 1 everywhere, `b` gets 1
/// where `with_b(r)`, the stat none.
fn model_grads(a: &Tensor, b: &Tensor, r: usize, with_b: bool) -> candle::backprop::GradStore {
    let mut loss = (a.sum_all().unwrap() * (r as f64 + 1.0)).unwrap();
    if with_b {
        loss = (loss + b.sum_all().unwrap().to_dtype(DType::F32).unwrap()).unwrap();
    }
    loss.backward().unwrap()
}

/// A `GradientAverager` agrees on the variables with gradients at its first
/// call only (the flags' all-reduce), then makes one all-reduce per bucket
/// and nothing else, with `average_gradients`'s results: a gradient missing
/// on some ranks counts as zero there, a variable without one anywhere is
/// left alone. After `reset`, it agrees again.
#[test]
fn averager_agrees_once_then_reduces_only_the_buckets() {
    let groups = ProcessGroup::threads(3).unwrap();
    let results = on_groups(groups, |inner| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let g = ProcessGroup::from_backend(Logged {
            inner,
            log: log.clone(),
        });
        let r = g.rank();
        let (varmap, a, b, s) = model(r);
        let mut averager = GradientAverager::new(&g, AverageOptions::default());
        let mut out = Vec::new();
        for step in 0..4 {
            if step == 3 {
                averager.reset();
            }
            let mut grads = model_grads(&a, &b, r, r == 1);
            log.lock().unwrap().clear();
            averager.average(&varmap, &mut grads).unwrap();
            let calls = log.lock().unwrap().clone();
            let ga = grads.get(&a).unwrap().flatten_all().unwrap();
            let gb = grads.get(&b).unwrap().to_vec1::<f64>().unwrap();
            assert!(
                grads.get(&s).is_none(),
                "no gradient must appear for a stat"
            );
            out.push((calls, ga.to_vec1::<f32>().unwrap(), gb));
        }
        out
    });
    for result in results {
        for (step, (calls, ga, gb)) in result.into_iter().enumerate() {
            // The flags of the three floating-point variables first, at the
            // first call and after the reset; then one bucket per dtype.
            let buckets = [(DType::F32, 6), (DType::F64, 5)];
            if step == 0 || step == 3 {
                assert_eq!(calls[0], (DType::F32, 3), "step {step}: {calls:?}");
                assert_eq!(&calls[1..], &buckets, "step {step}: {calls:?}");
            } else {
                assert_eq!(&calls[..], &buckets, "step {step}: {calls:?}");
            }
            assert_eq!(ga, vec![2.0; 6]); // (1 + 2 + 3) / 3
            assert_eq!(gb, vec![1.0 / 3.0; 5]); // (0 + 1 + 0) / 3
        }
    }
}

/// A rank that finds a gradient outside the agreed set fails, naming the
/// variable, before any collective; the other ranks, waiting in the
/// collective, fail within the group's timeout instead of hanging. Ranks
/// that reset together agree on the new set.
#[test]
fn averager_refuses_a_gradient_outside_the_agreed_set() {
    let timeout = Duration::from_secs(2);
    let groups = ProcessGroup::threads_with_timeout(3, timeout).unwrap();
    let results = on_groups(groups, |g| {
        let r = g.rank();
        let (varmap, a, b, mut averager) = agreed_without_b(&g);
        // Now rank 1 has one.
        let mut grads = model_grads(&a, &b, r, r == 1);
        let start = Instant::now();
        let err = averager.average(&varmap, &mut grads).unwrap_err();
        (r, err.to_string(), start.elapsed())
    });
    for result in results {
        let (r, err, took) = result;
        if r == 1 {
            assert!(err.contains("'b'") && err.contains("reset"), "{err}");
        } else {
            assert!(!err.contains("'b'"), "rank {r}: {err}");
        }
        assert!(took < timeout * 10, "rank {r} took {took:?}: {err}");
    }

    let groups = ProcessGroup::threads(3).unwrap();
    let results = on_groups(groups, |g| {
        let r = g.rank();
        let (varmap, a, b, mut averager) = agreed_without_b(&g);
        averager.reset();
        let mut grads = model_grads(&a, &b, r, r == 1);
        averager.average(&varmap, &mut grads).unwrap();
        grads.get(&b).unwrap().to_vec1::<f64>().unwrap()
    });
    for result in results {
        assert_eq!(result, vec![1.0 / 3.0; 5]);
    }
}

/// `all_reduce_mean` of a backend without one of its own: the sum divided
/// by the world size; integers are refused on every rank alike.
#[test]
fn all_reduce_mean_by_default_divides_the_sum() {
    let groups = ProcessGroup::threads(3).unwrap();
    let results = on_groups(groups, |g| {
        let r = g.rank() as f64;
        let t = Tensor::new(&[r, 3.0 * r, -6.0], &Device::Cpu).unwrap();
        let mean = g.all_reduce_mean(&t).unwrap().to_vec1::<f64>().unwrap();
        let ints = t.to_dtype(DType::I64).unwrap();
        (mean, g.all_reduce_mean(&ints).unwrap_err().to_string())
    });
    for result in results {
        let (mean, err) = result;
        assert_eq!(mean, vec![1.0, 3.0, -6.0]);
        assert!(err.contains("floating-point"), "{err}");
    }
}
