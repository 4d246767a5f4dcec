//! k in-process ranks (one thread each) against one rank holding the whole batch.

use crate::common;

use candle::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use common::*;
use std::time::Duration;

fn check_split(
    sizes: &[usize],
    shape_tail: &[usize],
    dtype: DType,
    cfg: SyncBatchNormConfig,
    seed: u64,
) {
    check_split_with(sizes, shape_tail, dtype, cfg, seed, Fusion::None)
}

/// [`check_split`] through the forward of `fusion`.
fn check_split_with(
    sizes: &[usize],
    shape_tail: &[usize],
    dtype: DType,
    cfg: SyncBatchNormConfig,
    seed: u64,
    fusion: Fusion,
) {
    let k = sizes.len();
    let total: usize = sizes.iter().sum();
    let mut shape = vec![total];
    shape.extend_from_slice(shape_tail);
    let elems: usize = shape.iter().product();
    let mut rng = Rng::new(seed);
    let steps = 3;
    let xs: Vec<Vec<f64>> = (0..steps)
        .map(|s| rng.normals(elems, s as f64 - 1.0, 2.0))
        .collect();
    let gs: Vec<Vec<f64>> = (0..steps).map(|_| rng.normals(elems, 0.0, 1.0)).collect();
    let mut eval_shape = shape.clone();
    eval_shape[0] = 2;
    let eval_x = rng.normals(eval_shape.iter().product(), 0.5, 1.0);

    let whole = run_rank_with(
        ProcessGroup::single(),
        cfg,
        dtype,
        vec![shape.clone(); steps],
        xs.clone(),
        gs.clone(),
        (eval_shape.clone(), eval_x.clone()),
        fusion,
        false,
    )
    .unwrap();

    let eval = (eval_shape.clone(), eval_x.clone());
    let ranks = run_thread_ranks(sizes, &shape, &xs, &gs, &eval, cfg, dtype, fusion, false);

    let label = format!("{k} ranks {sizes:?} {dtype:?} {shape:?} {cfg:?} {fusion:?}");
    check_ranks_against_whole(&label, &ranks, &whole, tolerance(dtype), total);
    if fusion == Fusion::AddRelu {
        // The residual's gradient is the masked upstream gradient: each
        // rank's slice of the whole batch's, as exactly as the outputs.
        let (atol, rtol) = tolerance(dtype);
        for s in 0..steps {
            let got: Vec<f64> = ranks
                .iter()
                .flat_map(|r| r.residual_grads[s].clone())
                .collect();
            assert_close(
                &format!("{label}: residual grads, step {s}"),
                &got,
                &whole.residual_grads[s],
                atol,
                rtol,
            );
        }
    }
    for (r, run) in ranks.iter().enumerate() {
        if sizes[r] == 0 {
            for s in 0..steps {
                assert!(
                    run.weight_grads
                        .get(s)
                        .into_iter()
                        .chain(run.bias_grads.get(s))
                        .flatten()
                        .all(|&v| v == 0.0),
                    "{label}: empty rank {r} must get zero weight/bias grads"
                );
                assert!(
                    run.input_grads[s].is_empty(),
                    "{label}: empty rank {r} must get an empty input grad"
                );
            }
        }
    }
}

#[test]
fn k_ranks_equal_one_rank_on_the_whole_batch() {
    let cfgs = [
        SyncBatchNormConfig::default(),
        SyncBatchNormConfig::default()
            .with_momentum(None)
            .with_affine(false),
    ];
    let splits: [&[usize]; 6] = [
        &[7],
        &[3, 4],
        &[5, 0],
        &[2, 0, 5],
        &[1, 3, 0, 4],
        &[0, 6, 1, 1],
    ];
    let mut seed = 100;
    for sizes in splits {
        for cfg in cfgs {
            for (tail, dtype) in [
                (vec![3usize, 4, 5], DType::F32),
                (vec![5], DType::F64),
                (vec![2, 3, 2, 2], DType::F32),
            ] {
                check_split(sizes, &tail, dtype, cfg, seed);
                seed += 1;
            }
        }
    }
}

#[test]
fn half_precision_ranks_match_one_rank() {
    for dtype in [DType::F16, DType::BF16] {
        check_split(
            &[2, 0, 3],
            &[4, 6],
            dtype,
            SyncBatchNormConfig::default(),
            7,
        );
    }
}

#[test]
fn k_ranks_with_fused_relu_and_residual_equal_one_rank() {
    let cfgs = [
        SyncBatchNormConfig::default(),
        SyncBatchNormConfig::default()
            .with_affine(false)
            .with_momentum(None),
    ];
    let mut seed = 300;
    for sizes in [&[3usize, 4][..], &[2, 0, 5], &[1, 3, 0, 4]] {
        for cfg in cfgs {
            for (tail, dtype) in [
                (vec![3usize, 4, 5], DType::F32),
                (vec![5], DType::F64),
                (vec![4, 6], DType::BF16),
            ] {
                for fusion in [Fusion::Relu, Fusion::AddRelu] {
                    check_split_with(sizes, &tail, dtype, cfg, seed, fusion);
                    seed += 1;
                }
            }
        }
    }
}

#[test]
fn global_count_of_one_fails_on_every_rank() {
    // One sample of shape (1, C) on rank 0, nothing elsewhere: one value per channel.
    let groups = ProcessGroup::threads_with_timeout(3, Duration::from_secs(30)).unwrap();
    let handles: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(r, group)| {
            std::thread::spawn(move || {
                let varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
                let bn = SyncBatchNorm::new(
                    4,
                    SyncBatchNormConfig::default(),
                    vb.pp("layer1.bn"),
                    group,
                )
                .unwrap();
                let n = usize::from(r == 0);
                let x = Tensor::ones((n, 4), DType::F32, &Device::Cpu).unwrap();
                bn.forward_t(&x, true)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    for (r, h) in handles.into_iter().enumerate() {
        let err = h
            .join()
            .unwrap()
            .expect_err("training with one value per channel must fail");
        assert!(
            err.contains("layer1.bn") && err.contains("more than 1 value per channel"),
            "rank {r}: {err}"
        );
    }
}

#[test]
fn ranks_disagreeing_on_channels_fail_instead_of_hanging() {
    let groups = ProcessGroup::threads_with_timeout(2, Duration::from_secs(30)).unwrap();
    let start = std::time::Instant::now();
    let handles: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(r, group)| {
            std::thread::spawn(move || {
                let c = if r == 0 { 4 } else { 6 };
                let varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
                let bn = SyncBatchNorm::new(c, SyncBatchNormConfig::default(), vb.pp("bn"), group)
                    .unwrap();
                let x = Tensor::ones((3, c, 2), DType::F32, &Device::Cpu).unwrap();
                bn.forward_t(&x, true)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    for h in handles {
        let err = h
            .join()
            .unwrap()
            .expect_err("mismatched channel counts must fail");
        assert!(
            err.contains("disagree") && err.contains("[3, 4]") && err.contains("[3, 6]"),
            "{err}"
        );
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "detected without waiting for the timeout"
    );
}

#[test]
fn a_failing_rank_makes_the_others_fail_not_hang() {
    // Rank 1 fails on bad input before the collective and its thread ends: the
    // others get an error as soon as its handle is dropped.
    let groups = ProcessGroup::threads_with_timeout(3, Duration::from_secs(60)).unwrap();
    let start = std::time::Instant::now();
    let handles: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(r, group)| {
            std::thread::spawn(move || {
                let varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
                let bn = SyncBatchNorm::new(4, SyncBatchNormConfig::default(), vb, group).unwrap();
                let c = if r == 1 { 5 } else { 4 };
                let x = Tensor::ones((3, c), DType::F32, &Device::Cpu).unwrap();
                bn.forward_t(&x, true)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let errs: Vec<String> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap_err())
        .collect();
    assert!(errs[1].contains("expected 4 channels"), "{}", errs[1]);
    for r in [0, 2] {
        assert!(errs[r].contains("left the group"), "rank {r}: {}", errs[r]);
    }
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_silent_rank_makes_the_others_time_out() {
    let mut groups = ProcessGroup::threads_with_timeout(2, Duration::from_millis(300)).unwrap();
    let silent = groups.pop().unwrap(); // kept alive, never calls
    let group = groups.pop().unwrap();
    let start = std::time::Instant::now();
    let err = group
        .all_reduce_sum(&Tensor::ones(3, DType::F64, &Device::Cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("timed out") && err.contains("[1]"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
    // The group is poisoned: the late rank fails at once too.
    let err = silent
        .all_reduce_sum(&Tensor::ones(3, DType::F64, &Device::Cpu).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
}

#[test]
fn in_process_collectives_are_exact_and_ordered() {
    let groups = ProcessGroup::threads(4).unwrap();
    let handles: Vec<_> = groups
        .into_iter()
        .map(|g| {
            std::thread::spawn(move || {
                let r = g.rank() as f64;
                let t = Tensor::new(&[r, 10.0 * r, 0.5], &Device::Cpu).unwrap();
                let sum = values(&g.all_reduce_sum(&t).unwrap());
                let f = Tensor::new(&[r as f32 + 1.0], &Device::Cpu).unwrap();
                let root = values(&g.broadcast(&f, 2).unwrap());
                (sum, root, g.world_size())
            })
        })
        .collect();
    for h in handles {
        let (sum, root, world) = h.join().unwrap();
        assert_eq!(sum, vec![6.0, 60.0, 2.0]);
        assert_eq!(root, vec![3.0]);
        assert_eq!(world, 4);
    }
}

/// `f(group)` on each of `world` in-process ranks (threads, 30 s timeout).
fn on_threads<T: Send + 'static>(
    world: usize,
    f: impl Fn(ProcessGroup) -> T + Send + Clone + 'static,
) -> Vec<T> {
    let groups = ProcessGroup::threads_with_timeout(world, Duration::from_secs(30)).unwrap();
    on_groups(groups, f)
}

/// Two layers of the same shape called in a different order on two ranks:
/// every rank gets an error naming both layers at once, and no running
/// statistic takes mixed numbers (issue 23 item 11).
#[test]
fn layers_called_in_a_different_order_fail_on_every_rank() {
    for (composite, converted) in [(false, false), (true, false), (false, true)] {
        let start = std::time::Instant::now();
        let runs = on_threads(2, move |g| swapped_layers(g, composite, converted));
        check_swapped(&runs, composite);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "detected without waiting for the timeout"
        );
    }
}

/// Layers with equal names — a teacher's and a student's `bn`, two layers
/// built from an empty prefix, two converted layers of the same width —
/// called in a different order on two ranks: every rank gets an error at
/// the first swapped call naming both, and no running statistic moves
/// (issue 29 item 5). Called in the same order, they agree.
#[test]
fn same_name_layers_called_in_a_different_order_fail_on_every_rank() {
    for case in [
        SameName::TwoModels,
        SameName::EmptyPrefix,
        SameName::Converted,
    ] {
        for swap in [true, false] {
            let start = std::time::Instant::now();
            let runs = on_threads(3, move |g| swapped_same_name(g, case, swap));
            if swap {
                check_swapped_same_name(&runs, case);
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "{case:?}: detected without waiting for the timeout"
                );
            } else {
                for (r, run) in runs.iter().enumerate() {
                    assert_eq!(run.error, None, "{case:?}, rank {r}");
                    // Every rank saw the same union of batches.
                    assert_eq!(run.running_means, runs[0].running_means, "{case:?}");
                    assert!(run.running_means[1][0] < -1.0, "{case:?}: {run:?}");
                }
            }
        }
    }
}

/// Many layers of the same shape (one called twice per step), several steps
/// forward and backward, in the same order on every rank: the call tags
/// agree and the ranks match one rank on the whole batch.
#[test]
fn a_stack_of_same_shaped_layers_matches_one_rank() {
    for composite in [false, true] {
        let bounds = [0, 2, 3, 6];
        let groups = ProcessGroup::threads_with_timeout(3, Duration::from_secs(60)).unwrap();
        let handles: Vec<_> = groups
            .into_iter()
            .enumerate()
            .map(|(r, g)| {
                let rows = bounds[r]..bounds[r + 1];
                std::thread::spawn(move || layer_stack(g, rows, composite).unwrap())
            })
            .collect();
        let runs: Vec<StackRun> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        check_layer_stack(
            &format!("threads, composite {composite}"),
            &runs,
            &bounds,
            composite,
        );
    }
}
