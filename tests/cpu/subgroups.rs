//! Subgroups (`ProcessGroup::split` / `subgroups`) over the in-process group:
//! a layer on a subgroup equals one rank holding the subgroup's batches, the
//! subgroup collectives are exact, and bad splits and failing ranks are errors
//! on every rank, never a hang.

use crate::common;

use candle::{DType, Device, Tensor};
use candle_syncbn::{ProcessGroup, SyncBatchNormConfig};
use common::*;
use std::time::{Duration, Instant};

/// Runs `f(rank, group)` on the ranks of a new in-process group, one thread
/// each, and returns their results in rank order.
fn on_threads<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(usize, ProcessGroup) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let handles: Vec<_> = ProcessGroup::threads_with_timeout(world, timeout)
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(r, g)| {
            let f = f.clone();
            std::thread::spawn(move || f(r, g))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// One rank's shapes, inputs and upstream gradients, step by step.
type RankData = (Vec<Vec<usize>>, Vec<Vec<f64>>, Vec<Vec<f64>>);

/// Subgroups of 2 out of 4 ranks: each subgroup's layers behave as one rank
/// holding both members' batches, and the two subgroups keep different
/// statistics (they do not synchronize with each other).
#[test]
fn a_layer_on_a_subgroup_equals_one_rank_on_the_subgroups_batches() {
    let (c, h, w) = (3, 4, 5);
    let per = c * h * w;
    // Uneven batches, one empty: subgroup {0, 1} holds 2 + 3 samples,
    // subgroup {2, 3} holds 0 + 4, with a different mean per subgroup.
    let sizes = [2usize, 3, 0, 4];
    let steps = 3;
    let cfg = SyncBatchNormConfig::default();
    for (dtype, atol, rtol) in [(DType::F32, 2e-5, 2e-5), (DType::F64, 1e-10, 1e-10)] {
        let mut rng = Rng::new(41);
        let data: Vec<RankData> = sizes
            .iter()
            .enumerate()
            .map(|(r, &n)| {
                let xs = (0..steps)
                    .map(|s| {
                        let mean = if r < 2 { 1.0 + s as f64 } else { -4.0 };
                        rng.normals(n * per, mean, 1.5)
                    })
                    .collect();
                let gs = (0..steps).map(|_| rng.normals(n * per, 0.0, 1.0)).collect();
                (vec![vec![n, c, h, w]; steps], xs, gs)
            })
            .collect();
        let eval = (vec![2, c, h, w], rng.normals(2 * per, 0.0, 2.0));
        let (data2, eval2) = (data.clone(), eval.clone());
        let ranks = on_threads(4, Duration::from_secs(60), move |r, g| {
            let sub = g.subgroups(2).unwrap();
            assert_eq!((sub.rank(), sub.world_size()), (r % 2, 2));
            let (shapes, xs, gs) = data2[r].clone();
            run_rank(sub, cfg, dtype, shapes, xs, gs, eval2.clone()).unwrap()
        });
        for first in [0usize, 2] {
            let label = format!("subgroup {{{first}, {}}} {dtype:?}", first + 1);
            let (da, db) = (&data[first], &data[first + 1]);
            let n = sizes[first] + sizes[first + 1];
            let join = |a: &[Vec<f64>], b: &[Vec<f64>]| -> Vec<Vec<f64>> {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| [x.clone(), y.clone()].concat())
                    .collect()
            };
            let one = run_rank(
                ProcessGroup::single(),
                cfg,
                dtype,
                vec![vec![n, c, h, w]; steps],
                join(&da.1, &db.1),
                join(&da.2, &db.2),
                eval.clone(),
            )
            .unwrap();
            check_ranks_against_whole(&label, &ranks[first..first + 2], &one, (atol, rtol), n);
        }
        // The subgroups saw different data and did not synchronize.
        let gap = (ranks[0].running_mean[0] - ranks[2].running_mean[0]).abs();
        assert!(
            gap > 0.1,
            "{dtype:?}: the subgroups' running means agree ({gap})"
        );
    }
}

/// Rank r's values: small integers, so every sum is exact.
fn rank_values(r: usize, n: usize) -> Vec<f64> {
    (0..n).map(|i| ((i * 5 + r * 3) % 9) as f64 - 4.0).collect()
}

/// Uneven colors in any order: members are ranked in their parent order, and
/// all-reduce, broadcast and barrier give each subgroup exactly its own
/// results, signed zeros included, for every dtype.
#[test]
fn split_collectives_are_exact_within_each_subgroup() {
    let colors = [7u32, 2, 7, 7, 2];
    let results = on_threads(5, Duration::from_secs(60), move |r, g| {
        let sub = g.split(colors[r]).unwrap();
        let members: Vec<usize> = (0..5).filter(|&q| colors[q] == colors[r]).collect();
        assert_eq!(sub.world_size(), members.len(), "rank {r}");
        assert_eq!(members[sub.rank()], r, "rank {r}");
        assert!(format!("{sub:?}").contains("threads/split"), "{sub:?}");
        let n = 13;
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            let t = tensor(&rank_values(r, n), &[n], dtype);
            let sum = sub.all_reduce_sum(&t).unwrap();
            assert_eq!((sum.dtype(), sum.dims()), (dtype, &[n][..]));
            let expected: Vec<f64> = (0..n)
                .map(|i| members.iter().map(|&q| rank_values(q, n)[i]).sum())
                .collect();
            assert_close(
                &format!("rank {r} {dtype:?} sum"),
                &values(&sum),
                &expected,
                0.0,
                0.0,
            );
            // Each subgroup broadcasts from its own last member.
            let root = members.len() - 1;
            let got = sub.broadcast(&t.reshape((1, n)).unwrap(), root).unwrap();
            assert_eq!(got.dims(), &[1, n]);
            let expected = rank_values(members[root], n);
            assert_close(
                &format!("rank {r} {dtype:?} broadcast"),
                &values(&got),
                &expected,
                0.0,
                0.0,
            );
        }
        // Signed zeros survive: -0.0 summed over a subgroup stays -0.0, and a
        // broadcast -0.0 arrives as -0.0, though the other subgroup sends +0.0.
        let z = if colors[r] == 2 { -0.0f32 } else { 0.0 };
        let zs = Tensor::new(&[z, z], &Device::Cpu).unwrap();
        let sum = sub.all_reduce_sum(&zs).unwrap().to_vec1::<f32>().unwrap();
        let bcast = sub.broadcast(&zs, 0).unwrap().to_vec1::<f32>().unwrap();
        for v in sum.iter().chain(&bcast) {
            assert_eq!(v.to_bits(), z.to_bits(), "rank {r}: {v:?} instead of {z:?}");
        }
        sub.barrier().unwrap();
        // A split of a split is decided by all ranks of the root: {0, 2, 3}
        // would leave its rank 2 (root rank 3) alone, so {1, 4} fails too.
        let nested = if colors[r] == 7 { (r == 3) as u32 } else { 0 };
        let err = sub.split(nested).map(|_| ()).unwrap_err().to_string();
        // Splitting both subgroups by one color keeps them as they are.
        let same = sub.split(9).unwrap();
        assert_eq!(
            (same.rank(), same.world_size()),
            (sub.rank(), sub.world_size())
        );
        let t = tensor(&rank_values(r, 4), &[4], DType::F64);
        let (a, b) = (
            values(&same.all_reduce_sum(&t).unwrap()),
            values(&sub.all_reduce_sum(&t).unwrap()),
        );
        assert_eq!(a, b, "rank {r}");
        err
    });
    for (r, err) in results.iter().enumerate() {
        let expected = if colors[r] == 7 {
            "rank 2 (of the group being split) would be alone"
        } else {
            "rank 3 (of the root group) would be alone"
        };
        assert!(err.contains(expected), "rank {r}: {err}");
    }
}

/// Subgroups of subgroups are subgroups of the root: 8 ranks in 2 blocks of 4,
/// each split in 2 blocks of 2, equal the 4 blocks of 2 of the root.
#[test]
fn subgroups_of_subgroups_equal_subgroups_of_the_root() {
    let out = on_threads(8, Duration::from_secs(60), |r, g| {
        let nested = g.subgroups(4).unwrap().subgroups(2).unwrap();
        let direct = g.subgroups(2).unwrap();
        assert_eq!((nested.rank(), nested.world_size()), (r % 2, 2));
        let t = tensor(&rank_values(r, 6), &[2, 3], DType::F32);
        let a = values(&nested.all_reduce_sum(&t).unwrap());
        let b = values(&direct.all_reduce_sum(&t).unwrap());
        assert_eq!(a, b, "rank {r}");
        a
    });
    for (r, got) in out.iter().enumerate() {
        let first = r - r % 2;
        let expected: Vec<f64> = (0..6)
            .map(|i| rank_values(first, 6)[i] + rank_values(first + 1, 6)[i])
            .collect();
        assert_eq!(got, &expected, "rank {r}");
    }
}

/// Bad splits fail on every rank with the same message; a split where every
/// rank is alone gives world-size-1 groups that communicate nothing.
#[test]
fn bad_splits_fail_on_every_rank() {
    let out = on_threads(4, Duration::from_secs(30), |r, g| {
        let e1 = g.subgroups(3).unwrap_err().to_string();
        let e2 = g.subgroups(0).unwrap_err().to_string();
        // Ranks 0, 1, 2 together and rank 3 alone.
        let e3 = g.split((r == 3) as u32).unwrap_err().to_string();
        let alone = g.split(10 + r as u32).unwrap();
        assert_eq!((alone.rank(), alone.world_size()), (0, 1));
        let one = g.subgroups(1).unwrap();
        assert_eq!(one.world_size(), 1);
        let t = Tensor::new(&[r as f32], &Device::Cpu).unwrap();
        assert_eq!(values(&one.all_reduce_sum(&t).unwrap()), vec![r as f64]);
        // The same group afterwards: the failed splits left no collective behind.
        let sum = g.all_reduce_sum(&t).unwrap();
        assert_eq!(values(&sum), vec![6.0]);
        // Within subgroups of 2, splitting in subgroups of 2 keeps them whole;
        // of 3 does not divide, and every rank of the root learns it.
        let pairs = g.subgroups(2).unwrap();
        assert_eq!(pairs.subgroups(2).unwrap().world_size(), 2);
        let e4 = pairs.subgroups(3).unwrap_err().to_string();
        (e1, e2, e3, e4)
    });
    for (r, (e1, e2, e3, e4)) in out.iter().enumerate() {
        assert!(
            e1.contains("group size 3 does not divide the world size 4"),
            "rank {r}: {e1}"
        );
        assert!(
            e2.contains("group size 0 does not divide"),
            "rank {r}: {e2}"
        );
        assert!(
            e3.contains("rank 3 (of the group being split) would be alone"),
            "rank {r}: {e3}"
        );
        assert!(
            e4.contains("group size 3 does not divide the world size 2"),
            "rank {r}: {e4}"
        );
        assert_eq!(e3, &out[0].2);
    }
}

/// A subgroup whose ranks disagree with another subgroup's (here: a different
/// channel count), or a rank that leaves, is an error on every rank of the
/// root, within the timeout, not a hang.
#[test]
fn failures_in_another_subgroup_are_errors_not_hangs() {
    let timeout = Duration::from_secs(5);
    let errs = on_threads(4, timeout, |r, g| {
        let sub = g.subgroups(2).unwrap();
        let n = if r < 2 { 3 } else { 4 };
        let t = Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
        sub.all_reduce_sum(&t).unwrap_err().to_string()
    });
    for (r, e) in errs.iter().enumerate() {
        assert!(
            e.contains("shape") || e.contains("disagree"),
            "rank {r}: {e}"
        );
    }
    let started = Instant::now();
    let errs = on_threads(4, timeout, |r, g| {
        let sub = g.subgroups(2).unwrap();
        if r == 3 {
            return String::new(); // leaves: its handles are dropped
        }
        let t = Tensor::ones(5, DType::F32, &Device::Cpu).unwrap();
        let mut last = String::new();
        for _ in 0..3 {
            match sub.all_reduce_sum(&t) {
                Ok(_) => {}
                Err(e) => {
                    last = e.to_string();
                    break;
                }
            }
        }
        last
    });
    for (r, e) in errs.iter().enumerate().take(3) {
        assert!(!e.is_empty(), "rank {r} saw no error");
    }
    assert!(
        started.elapsed() < 2 * timeout,
        "took {:?}",
        started.elapsed()
    );
}

/// Layers of the same shape called in a different order within subgroups:
/// the root group's collective carries the layers' call tags, so every rank
/// gets an error naming both layers instead of mixed statistics.
#[test]
fn layers_called_in_a_different_order_in_subgroups_fail() {
    let start = Instant::now();
    let runs = on_threads(4, Duration::from_secs(30), |_, g| {
        swapped_layers(g.subgroups(2).unwrap(), false, false)
    });
    check_swapped(&runs, false);
    assert!(start.elapsed() < Duration::from_secs(10));
}
