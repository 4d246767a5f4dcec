//! The NCCL group on the GPUs of one machine, its ranks as threads of this
//! process (each on its own GPU; the rendezvous over TCP on 127.0.0.1): the
//! collectives against their exact results, the layer on k NCCL ranks against
//! one rank (and, on the emulated GPU, without a host wait in any step), and
//! failures (a rank that leaves, a rank that stalls) that must
//! become errors on the other ranks within the timeout instead of hangs.
//!
//! NCCL needs a GPU per rank: with fewer than two (or without the `nccl`
//! feature) every test prints that it was skipped; with fewer than two and
//! `SYNCBN_REQUIRE_CUDA=1`, each fails instead. On the emulated GPU
//! (`scripts/emulated-gpu.sh`: four devices, and an emulated NCCL whose
//! collectives stay pending on their streams until every rank has enqueued
//! its part) they run for real. (The multi-process path, one process per GPU
//! through the launcher, is smoke-run there by `scripts/test.sh` with the
//! training example.)
#![cfg(feature = "nccl")]

mod common;

use candle::cuda_backend::cudarc::driver::CudaContext;
use candle::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::group::NcclOptions;
use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use common::*;
use std::time::{Duration, Instant};

/// The number of ranks to run (one per GPU, at most 3), or `None` after
/// printing that `test` was skipped (a failure under `SYNCBN_REQUIRE_CUDA=1`;
/// tests that need three or four GPUs still skip on two).
fn world_or_skip(test: &str) -> Option<usize> {
    match CudaContext::device_count() {
        Ok(n) if n >= 2 => Some((n as usize).min(3)),
        Ok(n) => {
            skip_without_gpu(&format!(
                "skipped {test}: NCCL needs two GPUs, this machine has {n}"
            ));
            None
        }
        Err(e) => {
            skip_without_gpu(&format!("skipped {test}: no CUDA device ({e:?})"));
            None
        }
    }
}

/// How long a test's ranks may take in all: past it the test fails (a hang)
/// instead of blocking the test run.
const TEST_LIMIT: Duration = Duration::from_secs(180);

/// Runs `f(rank, device, group)` on `world` ranks, rank r on GPU r, with
/// NCCL's `timeout`; fails if a rank panics or the ranks take longer than
/// [`TEST_LIMIT`].
fn run<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(usize, Device, ProcessGroup) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let options = NcclOptions::default().with_timeout(timeout);
    run_with(world, options, f)
}

/// [`run`] with the group's `options`.
fn run_with<T: Send + 'static>(
    world: usize,
    options: NcclOptions,
    f: impl Fn(usize, Device, ProcessGroup) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    run_ranks(
        world,
        options,
        |r| r,
        |_| {},
        move |r, dev, g| f(r, dev, g.unwrap()),
    )
}

/// As [`run`], with NCCL's `options`, rank r on GPU `gpu(r)`, `prepare(r)`
/// on the rank's thread before it joins, and `f` gets what joining the group
/// gave.
fn run_ranks<T: Send + 'static>(
    world: usize,
    options: NcclOptions,
    gpu: impl Fn(usize) -> usize,
    prepare: impl Fn(usize) + Send + Sync + Clone + 'static,
    f: impl Fn(usize, Device, candle::Result<ProcessGroup>) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let _shared = ALONE.read().unwrap_or_else(|e| e.into_inner());
    run_ranks_unlocked(world, options, gpu, prepare, f)
}

/// Held for reading by the tests' ranks, for writing by a test that must
/// run alone: on the emulated GPU every thread shares a device's stream
/// (candle's per-thread stream is one stream there) and kernels run when
/// issued, so a kernel launched behind another test's pending collective
/// waits for that test's peers; two tests that launch many kernels between
/// their collectives on the same GPUs can wait for each other in a cycle.
static ALONE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// [`run`] while no other test runs ranks.
fn run_alone<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(usize, Device, ProcessGroup) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let _alone = ALONE.write().unwrap_or_else(|e| e.into_inner());
    let options = NcclOptions::default().with_timeout(timeout);
    run_ranks_unlocked(
        world,
        options,
        |r| r,
        |_| {},
        move |r, dev, g| f(r, dev, g.unwrap()),
    )
}

/// [`run_ranks`] without taking [`ALONE`].
fn run_ranks_unlocked<T: Send + 'static>(
    world: usize,
    options: NcclOptions,
    gpu: impl Fn(usize) -> usize,
    prepare: impl Fn(usize) + Send + Sync + Clone + 'static,
    f: impl Fn(usize, Device, candle::Result<ProcessGroup>) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let pf = port_file("nccl-test");
    let (tx, rx) = std::sync::mpsc::channel();
    for r in 0..world {
        let (f, pf, tx, gpu) = (f.clone(), pf.clone(), tx.clone(), gpu(r));
        let prepare = prepare.clone();
        std::thread::spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                prepare(r);
                let dev = Device::new_cuda(gpu).unwrap();
                let rv = loopback_rendezvous(r, world, &pf, "nccl-test");
                let g = ProcessGroup::nccl(&rv, &dev, options);
                f(r, dev, g)
            }));
            // Before reporting: the test may return, and its process exit,
            // as soon as the last rank reports; the port file's directory
            // goes with the last clone.
            drop(pf);
            let _ = tx.send((r, result));
        });
    }
    let deadline = Instant::now() + TEST_LIMIT;
    let mut out: Vec<Option<T>> = (0..world).map(|_| None).collect();
    for _ in 0..world {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((r, Ok(v))) => out[r] = Some(v),
            Ok((r, Err(_))) => panic!("rank {r} failed (its panic is printed above)"),
            Err(_) => panic!("the ranks did not finish within {TEST_LIMIT:?}: a hang"),
        }
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Rank `r`'s values: small integers, exact in every dtype and in their sums.
fn rank_values(r: usize, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| ((i * 7 + r * 3) % 11) as f64 - 5.0)
        .collect()
}

#[test]
fn collectives_give_exact_results() {
    let Some(world) = world_or_skip("collectives_give_exact_results") else {
        return;
    };
    let n = 37;
    run(world, Duration::from_secs(60), move |r, dev, g| {
        assert_eq!((g.rank(), g.world_size()), (r, world));
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16, DType::I64] {
            let mine = rank_values(r, n);
            let t = if dtype == DType::I64 {
                tensor(&mine, &[n], DType::F64)
                    .to_dtype(DType::I64)
                    .unwrap()
            } else {
                tensor(&mine, &[n], dtype)
            }
            .to_device(&dev)
            .unwrap();
            let sum = g.all_reduce_sum(&t).unwrap();
            assert_eq!(sum.dtype(), dtype);
            assert!(sum.device().same_device(&dev));
            let expected: Vec<f64> = (0..n)
                .map(|i| (0..world).map(|q| rank_values(q, n)[i]).sum())
                .collect();
            assert_close(
                &format!("rank {r} sum {dtype:?}"),
                &values(&sum),
                &expected,
                0.0,
                0.0,
            );
            // The mean is one ncclAvg; integers are refused on every rank.
            if dtype.is_float() {
                let mean = g.all_reduce_mean(&t).unwrap();
                assert_eq!(mean.dtype(), dtype);
                let expected: Vec<f64> = expected.iter().map(|v| v / world as f64).collect();
                let (atol, rtol) = tolerance(dtype);
                assert_close(
                    &format!("rank {r} mean {dtype:?}"),
                    &values(&mean),
                    &expected,
                    atol,
                    rtol,
                );
            } else {
                let err = g.all_reduce_mean(&t).unwrap_err().to_string();
                assert!(err.contains("floating-point"), "{err}");
            }
            let root = world - 1;
            let b = g.broadcast(&t, root).unwrap();
            assert_close(
                &format!("rank {r} broadcast {dtype:?}"),
                &values(&b),
                &rank_values(root, n),
                0.0,
                0.0,
            );
        }
        // A non-contiguous input (a transposed matrix) is summed in its logical order.
        let m = tensor(&rank_values(r, 12), &[3, 4], DType::F32)
            .to_device(&dev)
            .unwrap()
            .t()
            .unwrap();
        let s = g.all_reduce_sum(&m).unwrap();
        let expected: Vec<f64> = (0..4)
            .flat_map(|j| (0..3).map(move |i| (i, j)))
            .map(|(i, j)| (0..world).map(|q| rank_values(q, 12)[i * 4 + j]).sum())
            .collect();
        assert_close(
            &format!("rank {r} transposed"),
            &values(&s),
            &expected,
            0.0,
            0.0,
        );
        g.barrier().unwrap();
        // A tensor on another device is an error, not a wrong result.
        let cpu = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let err = g.all_reduce_sum(&cpu).unwrap_err().to_string();
        assert!(err.contains("expected a tensor on"), "{err}");
    });
}

/// One rank's results of a few training steps and an eval pass.
#[derive(Default)]
struct Run {
    outputs: Vec<Vec<f64>>,
    input_grads: Vec<Vec<f64>>,
    weight_grads: Vec<Vec<f64>>,
    running_mean: Vec<f64>,
    running_var: Vec<f64>,
    eval: Vec<f64>,
    /// Per step, the host's waits for the GPU during the step (forward,
    /// loss, backward), when the emulated driver counts them.
    host_waits: Vec<Option<u64>>,
}

/// One training step's input: shape, x and the upstream gradient.
type Step = (Vec<usize>, Vec<f64>, Vec<f64>);

/// Trains a SyncBatchNorm of `c` channels for `xs.len()` steps on `dev`
/// with `group` (loss: Σ y·g), then runs `eval` in eval mode.
fn train(
    dev: &Device,
    group: ProcessGroup,
    c: usize,
    xs: &[Step],
    eval: &(Vec<usize>, Vec<f64>),
) -> Run {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let cfg = SyncBatchNormConfig::default()
        .with_eps(1e-5)
        .with_momentum(Some(0.1))
        .with_affine(true)
        .with_track_running_stats(true);
    let bn = SyncBatchNorm::new(c, cfg, vb.pp("bn"), group).unwrap();
    let mut run = Run::default();
    for (shape, x, g) in xs {
        let var = Var::from_tensor(&tensor(x, shape, DType::F32).to_device(dev).unwrap()).unwrap();
        let g = tensor(g, shape, DType::F32).to_device(dev).unwrap();
        let before = emulated_host_syncs();
        let y = bn.forward_t(var.as_tensor(), true).unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        run.host_waits
            .push(before.map(|b| emulated_host_syncs().unwrap() - b));
        run.outputs.push(values(&y));
        run.input_grads
            .push(values(grads.get(var.as_tensor()).unwrap()));
        let (w, _) = bn.weight_and_bias().unwrap();
        run.weight_grads.push(values(grads.get(w).unwrap()));
    }
    run.running_mean = values(bn.running_mean().unwrap());
    run.running_var = values(bn.running_var().unwrap());
    let xe = tensor(&eval.1, &eval.0, DType::F32).to_device(dev).unwrap();
    run.eval = values(&bn.forward_t(&xe, false).unwrap());
    run
}

/// Checks `ranks` (rank, run) of one group against `one`, a single rank that
/// held all their batches: outputs and input gradients (the ranks' slices in
/// rank order), summed weight gradients, running statistics, eval outputs,
/// and no host wait in any step.
fn check_against_one_rank(label: &str, ranks: &[(usize, &Run)], one: &Run) {
    for s in 0..one.outputs.len() {
        let cat = |f: &dyn Fn(&Run) -> &Vec<Vec<f64>>| -> Vec<f64> {
            ranks.iter().flat_map(|(_, r)| f(r)[s].clone()).collect()
        };
        assert_close(
            &format!("{label}step {s} outputs"),
            &cat(&|r| &r.outputs),
            &one.outputs[s],
            1e-5,
            1e-5,
        );
        assert_close(
            &format!("{label}step {s} input grads"),
            &cat(&|r| &r.input_grads),
            &one.input_grads[s],
            1e-4,
            1e-4,
        );
        let mut summed = vec![0.0; one.weight_grads[s].len()];
        for (_, r) in ranks {
            for (a, v) in summed.iter_mut().zip(&r.weight_grads[s]) {
                *a += v;
            }
        }
        assert_close(
            &format!("{label}step {s} summed weight grads"),
            &summed,
            &one.weight_grads[s],
            1e-3,
            1e-4,
        );
    }
    for &(r, run) in ranks {
        // No host synchronization in a step, NCCL collectives included (the
        // first step loads the modules, which does not wait either).
        for (s, w) in run.host_waits.iter().enumerate() {
            assert!(
                matches!(w, None | Some(0)),
                "{label}rank {r} step {s}: the host waited for the GPU {w:?} time(s)"
            );
        }
        for (what, got, want, tol) in [
            ("running mean", &run.running_mean, &one.running_mean, 1e-6),
            ("running var", &run.running_var, &one.running_var, 1e-6),
            ("eval", &run.eval, &one.eval, 1e-5),
        ] {
            assert_close(&format!("{label}rank {r} {what}"), got, want, tol, tol);
        }
    }
}

#[test]
fn layer_on_nccl_ranks_matches_one_rank() {
    let Some(world) = world_or_skip("layer_on_nccl_ranks_matches_one_rank") else {
        return;
    };
    // Uneven per-rank batches of (n, 5, 3, 4), one of a single sample.
    let sizes = [3usize, 1, 4][..world].to_vec();
    let (c, h, w) = (5, 3, 4);
    let per = c * h * w;
    let total: usize = sizes.iter().sum();
    let mut rng = Rng::new(77);
    let steps: Vec<(Vec<f64>, Vec<f64>)> = (0..3)
        .map(|_| {
            let x = (0..total * per)
                .map(|i| 2.0 * ((i / (h * w)) % c) as f64 - 3.0 + rng.normal())
                .collect();
            (x, rng.normals(total * per, 0.0, 1.0))
        })
        .collect();
    let eval = (vec![2, c, h, w], rng.normals(2 * per, 0.5, 2.0));
    let whole: Vec<_> = steps
        .iter()
        .map(|(x, g)| (vec![total, c, h, w], x.clone(), g.clone()))
        .collect();
    let reference = train(
        &Device::new_cuda(0).unwrap(),
        ProcessGroup::single(),
        c,
        &whole,
        &eval,
    );
    let (steps2, eval2, sizes2) = (steps.clone(), eval.clone(), sizes.clone());
    let ranks = run(world, Duration::from_secs(120), move |r, dev, g| {
        let start: usize = sizes2[..r].iter().sum();
        let mine: Vec<_> = steps2
            .iter()
            .map(|(x, gr)| {
                let span = start * per..(start + sizes2[r]) * per;
                (
                    vec![sizes2[r], c, h, w],
                    x[span.clone()].to_vec(),
                    gr[span].to_vec(),
                )
            })
            .collect();
        train(&dev, g, c, &mine, &eval2)
    });
    check_against_one_rank(
        "",
        &ranks.iter().enumerate().collect::<Vec<_>>(),
        &reference,
    );
}

/// Calls all-reduce (and reads the result back) until it fails; returns the
/// error and how long after the first call it came.
fn collect_until_error(dev: &Device, g: &ProcessGroup, limit: Duration) -> (String, Duration) {
    let t = Tensor::ones(16, DType::F32, dev).unwrap();
    let start = Instant::now();
    loop {
        match g.all_reduce_sum(&t).and_then(|s| s.to_vec1::<f32>()) {
            Err(e) => return (e.to_string(), start.elapsed()),
            Ok(_) if start.elapsed() > limit => {
                panic!("rank {}: no error after {limit:?}", g.rank())
            }
            Ok(_) => {}
        }
    }
}

#[test]
fn a_rank_that_leaves_is_an_error_on_the_others() {
    let Some(world) = world_or_skip("a_rank_that_leaves_is_an_error_on_the_others") else {
        return;
    };
    let timeout = Duration::from_secs(3);
    let results = run(world, timeout, move |r, dev, g| {
        // One collective together, then the last rank drops its group.
        let one = Tensor::ones(4, DType::F32, &dev).unwrap();
        assert_eq!(
            g.all_reduce_sum(&one).unwrap().to_vec1::<f32>().unwrap()[0],
            world as f32
        );
        if r == world - 1 {
            drop(g);
            return None;
        }
        Some(collect_until_error(&dev, &g, Duration::from_secs(30)))
    });
    for (r, res) in results.into_iter().enumerate().take(world - 1) {
        let (err, after) = res.unwrap();
        assert!(err.contains("nccl group"), "rank {r}: {err}");
        assert!(after < timeout * 3, "rank {r}: the error took {after:?}");
    }
}

#[test]
fn a_rank_that_stalls_past_the_timeout_is_an_error_on_every_rank() {
    let Some(world) =
        world_or_skip("a_rank_that_stalls_past_the_timeout_is_an_error_on_every_rank")
    else {
        return;
    };
    let timeout = Duration::from_secs(2);
    let results = run(world, timeout, move |r, dev, g| {
        if r == world - 1 {
            // Late by twice the timeout: the others have given up by then.
            std::thread::sleep(timeout * 2);
        }
        collect_until_error(&dev, &g, Duration::from_secs(30))
    });
    for (r, (err, after)) in results.into_iter().enumerate() {
        assert!(err.contains("nccl group"), "rank {r}: {err}");
        assert!(after < timeout * 4, "rank {r}: the error took {after:?}");
        if r < world - 1 {
            assert!(
                err.contains("did not finish within")
                    || err.contains("did not complete within")
                    || err.contains("asynchronous NCCL error"),
                "rank {r}: {err}"
            );
        }
    }
}

/// Subgroups over NCCL (`ProcessGroup::subgroups`): on four GPUs in pairs,
/// each pair's layers equal one rank holding the pair's batches, the pairs
/// keep their own statistics, and no step waits on the host. Needs four GPUs
/// (the emulated GPU has them).
#[test]
fn layer_on_nccl_subgroups_matches_one_rank_per_subgroup() {
    let test = "layer_on_nccl_subgroups_matches_one_rank_per_subgroup";
    match CudaContext::device_count() {
        Ok(n) if n >= 4 => {}
        Ok(n) => {
            report_skip(&format!(
                "skipped {test}: needs four GPUs, this machine has {n}"
            ));
            return;
        }
        Err(e) => {
            skip_without_gpu(&format!("skipped {test}: no CUDA device ({e:?})"));
            return;
        }
    }
    let (c, h, w) = (4, 3, 5);
    let per = c * h * w;
    let sizes = [2usize, 3, 1, 4];
    let mut rng = Rng::new(91);
    // Per rank, two steps of (shape, x, upstream gradient); the pairs differ in mean.
    let data: Vec<Vec<Step>> = sizes
        .iter()
        .enumerate()
        .map(|(r, &n)| {
            (0..2)
                .map(|_| {
                    let mean = if r < 2 { 2.0 } else { -3.0 };
                    let x = rng.normals(n * per, mean, 1.5);
                    (vec![n, c, h, w], x, rng.normals(n * per, 0.0, 1.0))
                })
                .collect()
        })
        .collect();
    let eval = (vec![2, c, h, w], rng.normals(2 * per, 0.0, 2.0));
    let (data2, eval2) = (data.clone(), eval.clone());
    let ranks = run(4, Duration::from_secs(120), move |r, dev, g| {
        let pair = g.subgroups(2).unwrap();
        assert_eq!((pair.rank(), pair.world_size()), (r % 2, 2));
        // A communicator of its own (ncclCommSplit), not masked collectives
        // of the whole group.
        assert_eq!(pair.backend().name(), "nccl", "{pair:?}");
        train(&dev, pair, c, &data2[r], &eval2)
    });
    for first in [0usize, 2] {
        let union: Vec<_> = (0..2)
            .map(|s| {
                let (a, b) = (&data[first][s], &data[first + 1][s]);
                let n = sizes[first] + sizes[first + 1];
                (
                    vec![n, c, h, w],
                    [a.1.clone(), b.1.clone()].concat(),
                    [a.2.clone(), b.2.clone()].concat(),
                )
            })
            .collect();
        let one = train(
            &Device::new_cuda(0).unwrap(),
            ProcessGroup::single(),
            c,
            &union,
            &eval,
        );
        let pair = [(first, &ranks[first]), (first + 1, &ranks[first + 1])];
        check_against_one_rank(&format!("pair {first}-{}: ", first + 1), &pair, &one);
    }
    let gap = (ranks[0].running_mean[0] - ranks[2].running_mean[0]).abs();
    assert!(gap > 0.1, "the pairs' running means agree ({gap})");
}

/// NCCL subgroups are independent communicators: ranks 0 and 1 pair up and
/// run collectives that rank 2, alone in its subgroup, never joins (masked
/// subgroups would need it in every one); rank 2's handle has world size 1.
#[test]
fn split_communicators_are_independent() {
    let test = "split_communicators_are_independent";
    let Some(world) = world_or_skip(test) else {
        return;
    };
    if world < 3 {
        report_skip(&format!(
            "skipped {test}: needs three GPUs, this machine has {world}"
        ));
        return;
    }
    // Alone: in CI's emulated-GPU run of 2026-12-08 rank 0's first subgroup
    // sum came back as zeros once (142 s for the file, against 22 s in the
    // run before), a symptom of sharing the emulated devices' one stream
    // with other tests (see ALONE).
    let out = run_alone(3, Duration::from_secs(60), move |r, dev, g| {
        let sub = g.split((r == 2) as u32).unwrap();
        let t = tensor(&rank_values(r, 9), &[9], DType::F32)
            .to_device(&dev)
            .unwrap();
        let mut sums = Vec::new();
        if r < 2 {
            assert_eq!(
                (sub.rank(), sub.world_size(), sub.backend().name()),
                (r, 2, "nccl")
            );
            for _ in 0..3 {
                sums.push(values(&sub.all_reduce_sum(&t).unwrap()));
            }
            let b = sub.broadcast(&t, 1).unwrap();
            assert_eq!(values(&b), rank_values(1, 9), "rank {r}");
            sub.barrier().unwrap();
        } else {
            assert_eq!((sub.rank(), sub.world_size()), (0, 1));
            sums.push(values(&sub.all_reduce_sum(&t).unwrap()));
        }
        // The whole group still works afterwards.
        let all = values(&g.all_reduce_sum(&t).unwrap());
        (sums, all)
    });
    let pair: Vec<f64> = (0..9)
        .map(|i| rank_values(0, 9)[i] + rank_values(1, 9)[i])
        .collect();
    let all: Vec<f64> = (0..9)
        .map(|i| (0..3).map(|q| rank_values(q, 9)[i]).sum())
        .collect();
    for (r, (sums, total)) in out.iter().enumerate() {
        let expected = if r < 2 { &pair } else { &rank_values(2, 9) };
        for s in sums {
            assert_eq!(s, expected, "rank {r}");
        }
        assert_eq!(total, &all, "rank {r}");
    }
}

/// With the debug checks, layers of the same shape called in a different
/// order are an error on every rank naming both layers (their call tags
/// differ), before anything is enqueued: no mixed statistics.
#[test]
fn debug_checks_catch_layers_called_in_a_different_order() {
    let Some(world) = world_or_skip("debug_checks_catch_layers_called_in_a_different_order") else {
        return;
    };
    let options = NcclOptions::default()
        .with_timeout(Duration::from_secs(60))
        .with_debug_checks(true);
    let start = Instant::now();
    let runs = run_with(world, options, |_, dev, g| {
        swapped_layers_on(&dev, g, false, false)
    });
    check_swapped(&runs, false);
    for run in &runs {
        let e = run.error.as_deref().unwrap_or_default();
        assert!(e.contains("nccl group (debug check)"), "{e}");
    }
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
}

/// The emulated NCCL's test hook: the calling thread's next communicator
/// initialization joins its clique only `ms` milliseconds later. `false` on
/// a real NCCL, which has no such hook.
fn delay_next_init(ms: u64) -> bool {
    emulator_hook(c"syncbn_emu_nccl_delay_next_init", ms)
}

/// Calls the emulated NCCL's test hook `name` (a `void
/// name(unsigned long long)`) with `ms`; `false` on a real NCCL, which has no
/// such hook.
fn emulator_hook(name: &std::ffi::CStr, ms: u64) -> bool {
    #[cfg(target_os = "linux")]
    // SAFETY: dlsym with a NUL-terminated name; the symbol, when present, is
    // one of the emulated NCCL's `void syncbn_emu_nccl_…(unsigned long long)`.
    unsafe {
        let f = libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr());
        if !f.is_null() {
            let f: extern "C" fn(u64) = std::mem::transmute(f);
            f(ms);
            return true;
        }
    }
    let _ = (name, ms);
    false
}

/// Two ranks on one GPU: NCCL refuses it (ncclInvalidUsage) on both ranks,
/// as real NCCL does ("Duplicate GPU detected").
#[test]
fn two_ranks_on_one_gpu_are_an_error_on_both() {
    let test = "two_ranks_on_one_gpu_are_an_error_on_both";
    match CudaContext::device_count() {
        Ok(n) if n >= 1 => {}
        other => {
            skip_without_gpu(&format!("skipped {test}: no CUDA device ({other:?})"));
            return;
        }
    }
    let timeout = Duration::from_secs(5);
    let start = Instant::now();
    let options = NcclOptions::default().with_timeout(timeout);
    let out = run_ranks(
        2,
        options,
        |_| 0,
        |_| {},
        |_, _, g| g.map(|_| ()).map_err(|e| e.to_string()),
    );
    for (r, res) in out.into_iter().enumerate() {
        let err = res.expect_err(&format!("rank {r}: two ranks on one GPU were accepted"));
        assert!(err.contains("ncclInvalidUsage"), "rank {r}: {err}");
    }
    assert!(start.elapsed() < timeout, "took {:?}", start.elapsed());
}

/// A peer late for initialization (past the timeout): every rank gets an
/// error within about the timeout, instead of waiting in ncclCommInitRank.
/// Needs the emulated NCCL's hook that delays one rank's initialization.
#[test]
fn a_peer_late_for_init_is_an_error_on_every_rank_within_the_timeout() {
    let test = "a_peer_late_for_init_is_an_error_on_every_rank_within_the_timeout";
    let Some(world) = world_or_skip(test) else {
        return;
    };
    if !delay_next_init(0) {
        report_skip(&format!("skipped {test}: needs the emulated NCCL"));
        return;
    }
    let timeout = Duration::from_secs(2);
    let late = (timeout * 3).as_millis() as u64;
    let options = NcclOptions::default().with_timeout(timeout);
    let start = Instant::now();
    let out = run_ranks(
        world,
        options,
        |r| r,
        move |r| {
            if r == world - 1 {
                delay_next_init(late);
            }
        },
        move |_, _, g| g.map(|_| ()).map_err(|e| e.to_string()),
    );
    for (r, res) in out.into_iter().enumerate() {
        let err = res.expect_err(&format!(
            "rank {r}: joined a group whose last rank was late"
        ));
        assert!(err.contains("did not complete within"), "rank {r}: {err}");
    }
    // Not waiting for the late rank (3 timeouts).
    let took = start.elapsed();
    assert!(took < timeout * 5 / 2, "the errors took {took:?}");
}

/// Connected with small collectives, a peer stalls (past the timeout) while
/// the others have a small collective in flight and start the first large
/// one, which NCCL connects separately (another algorithm), inside the call.
/// The watchdog's abort of the small one (at the timeout) must not free the
/// communicator under that call (a use after free, which the emulated NCCL
/// turns into a crash), and the large one must not wait for the peer past
/// the timeout: every other rank gets an error within about the timeout.
#[test]
fn a_peer_late_for_the_first_large_collective_is_an_error_not_a_use_after_free() {
    let test = "a_peer_late_for_the_first_large_collective_is_an_error_not_a_use_after_free";
    let Some(world) = world_or_skip(test) else {
        return;
    };
    let timeout = Duration::from_secs(2);
    let out = run(world, timeout, move |r, dev, g| {
        let small = Tensor::ones(8, DType::F32, &dev).unwrap();
        let s = g.all_reduce_sum(&small).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(s[0], world as f32);
        if r == world - 1 {
            std::thread::sleep(timeout * 2);
            return None;
        }
        // 512 KiB, a gradient bucket's size class (made first: on the
        // emulated GPU, work on a stream behind a pending collective waits).
        let large = Tensor::ones(1 << 17, DType::F32, &dev).unwrap();
        let start = Instant::now();
        // In flight until the watchdog gives up on it.
        let _pending = g.all_reduce_sum(&small).unwrap();
        let res = g
            .all_reduce_sum(&large)
            .and_then(|s| s.to_vec1::<f32>())
            .map(|v| v[0]);
        // An error here, or at the latest at the next call (the read may
        // return an undefined result after the abort).
        let res = res.and_then(|_| g.all_reduce_sum(&small).map(|_| 0.0));
        Some((res.map_err(|e| e.to_string()), start.elapsed()))
    });
    for (r, res) in out.into_iter().enumerate().take(world - 1) {
        let (res, took) = res.unwrap();
        let err = res.expect_err(&format!("rank {r}: no error"));
        assert!(err.contains("nccl group"), "rank {r}: {err}");
        assert!(took < timeout * 2, "rank {r}: the error took {took:?}");
    }
}

/// A peer stalls while the others have a collective in flight and split the
/// group (the split exchanges colors, then calls ncclCommSplit, whose
/// non-blocking progress is polled against the timeout): every rank gets an
/// error within about the timeout of its call.
#[test]
fn a_peer_stalled_at_a_split_is_an_error_on_every_rank() {
    let test = "a_peer_stalled_at_a_split_is_an_error_on_every_rank";
    let Some(world) = world_or_skip(test) else {
        return;
    };
    let timeout = Duration::from_secs(2);
    let out = run(world, timeout, move |r, dev, g| {
        let t = Tensor::ones(8, DType::F32, &dev).unwrap();
        let s = g.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(s[0], world as f32);
        if r == world - 1 {
            std::thread::sleep(timeout * 2);
        } else {
            // In flight, never finished: the late rank does not join it.
            g.all_reduce_sum(&t).unwrap();
        }
        let start = Instant::now();
        let res = g.split(0).map(|_| ()).map_err(|e| e.to_string());
        (res, start.elapsed())
    });
    for (r, (res, took)) in out.into_iter().enumerate() {
        let err = res.expect_err(&format!("rank {r}: the split succeeded"));
        assert!(err.contains("nccl group"), "rank {r}: {err}");
        assert!(took < timeout * 2, "rank {r}: the error took {took:?}");
    }
}

/// The watchdog aborts a communicator that reports an error while a split
/// of it is in progress (polled, a peer never joins it): the abort abandons
/// the split at once, instead of waiting for the split's poll to time out
/// (it held the communicator's lock until then), and the split is an error
/// on that rank within a fraction of a second (asserted with a margin for a
/// loaded machine: under 2 s past the failure, against the 10 s timeout
/// the split waited for before). The peer that never joined
/// gets its own error at its timeout.
#[test]
fn an_abort_during_a_split_is_prompt() {
    let test = "an_abort_during_a_split_is_prompt";
    let Some(world) = world_or_skip(test) else {
        return;
    };
    if !emulator_hook(c"syncbn_emu_nccl_delay_next_split", 0) {
        report_skip(&format!(
            "skipped {test}: needs the emulated NCCL's test hooks"
        ));
        return;
    }
    let timeout = Duration::from_secs(10);
    let fail_after = Duration::from_millis(300);
    let out = run(world, timeout, move |r, dev, g| {
        let t = Tensor::ones(8, DType::F32, &dev).unwrap();
        let s = g.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(s[0], world as f32);
        if r == world - 1 {
            assert!(emulator_hook(c"syncbn_emu_nccl_delay_next_split", u64::MAX));
        } else {
            assert!(emulator_hook(
                c"syncbn_emu_nccl_fail_parent_of_next_split",
                fail_after.as_millis() as u64
            ));
        }
        let start = Instant::now();
        let res = g.split(0).map(|_| ()).map_err(|e| e.to_string());
        let took = start.elapsed();
        // The group was aborted: its next call fails at once.
        let start = Instant::now();
        let next = g.barrier().map_err(|e| e.to_string());
        (res, took, next, start.elapsed())
    });
    for (r, (res, took, next, next_took)) in out.into_iter().enumerate() {
        eprintln!("{test}: rank {r}: split error after {took:?}, next call's after {next_took:?}");
        let err = res.expect_err(&format!("rank {r}: the split succeeded"));
        let next = next.expect_err(&format!("rank {r}: the group works after the abort"));
        assert!(next.contains("nccl group"), "rank {r}: {next}");
        assert!(next_took < timeout, "rank {r}: {next_took:?}");
        if r == world - 1 {
            assert!(err.contains("did not complete within"), "rank {r}: {err}");
            assert!(took < timeout * 2, "rank {r}: the error took {took:?}");
        } else {
            assert!(
                err.contains("ncclCommSplit was abandoned") && err.contains("ncclRemoteError"),
                "rank {r}: {err}"
            );
            assert!(
                took < fail_after + Duration::from_secs(2),
                "rank {r}: the split's error took {took:?}: the abort waited for its poll"
            );
        }
    }
}

/// A rank that drops its group right after enqueueing a collective does not
/// cancel its part: a peer that joins the collective later still gets the
/// full sum (the drop waits for it, within the timeout, then finalizes).
#[test]
fn a_rank_that_drops_after_a_collective_still_delivers_its_part() {
    let test = "a_rank_that_drops_after_a_collective_still_delivers_its_part";
    let Some(world) = world_or_skip(test) else {
        return;
    };
    let timeout = Duration::from_secs(3);
    let out = run(world, timeout, move |r, dev, g| {
        let t = tensor(&rank_values(r, 9), &[9], DType::F32)
            .to_device(&dev)
            .unwrap();
        // Connected first: the late collective below is not a first one.
        // (Other values: a result left undefined by an abort must not
        // find the right sum in reused memory.)
        let warm = Tensor::ones(9, DType::F32, &dev).unwrap();
        g.all_reduce_sum(&warm).unwrap().to_vec1::<f32>().unwrap();
        if r == 0 {
            // The result stays allocated past the drop: only the group goes.
            let s = g.all_reduce_sum(&t).unwrap();
            drop(g);
            drop(s);
            return None;
        }
        std::thread::sleep(Duration::from_millis(500));
        Some(values(&g.all_reduce_sum(&t).unwrap()))
    });
    let expected: Vec<f64> = (0..9)
        .map(|i| (0..world).map(|q| rank_values(q, 9)[i]).sum())
        .collect();
    for (r, got) in out.into_iter().enumerate().skip(1) {
        assert_eq!(got.unwrap(), expected, "rank {r}");
    }
}

/// "Collective; barrier; drop" on one rank while a peer reads the
/// collective's result only after the barrier: the barrier waits for the
/// device work it orders, so the drop cancels nothing.
#[test]
fn collective_then_barrier_then_drop_loses_nothing() {
    let test = "collective_then_barrier_then_drop_loses_nothing";
    let Some(world) = world_or_skip(test) else {
        return;
    };
    let timeout = Duration::from_secs(3);
    let out = run(world, timeout, move |r, dev, g| {
        let t = tensor(&rank_values(r, 9), &[9], DType::F32)
            .to_device(&dev)
            .unwrap();
        let warm = Tensor::ones(9, DType::F32, &dev).unwrap();
        g.all_reduce_sum(&warm).unwrap().to_vec1::<f32>().unwrap();
        let s = g.all_reduce_sum(&t).unwrap();
        g.barrier().unwrap();
        if r == 0 {
            drop(g);
            return None;
        }
        std::thread::sleep(Duration::from_millis(300));
        Some(values(&s))
    });
    let expected: Vec<f64> = (0..9)
        .map(|i| (0..world).map(|q| rank_values(q, 9)[i]).sum())
        .collect();
    for (r, got) in out.into_iter().enumerate().skip(1) {
        assert_eq!(got.unwrap(), expected, "rank {r}");
    }
}

/// The composed layer (candle ops and the differentiable all-reduce) on
/// NCCL ranks: the all-reduces run on the GPU, forward and backward, and
/// give what the kernels give.
#[test]
fn composite_layer_on_nccl_ranks_matches_the_kernels() {
    let test = "composite_layer_on_nccl_ranks_matches_the_kernels";
    let Some(world) = world_or_skip(test) else {
        return;
    };
    let (c, h, w) = (3, 2, 5);
    let out = run(world, Duration::from_secs(60), move |r, dev, g| {
        let mut rng = Rng::new(500 + r as u64);
        let n = r + 2;
        let shape = [n, c, h, w];
        let x = tensor(&rng.normals(n * c * h * w, 1.0, 2.0), &shape, DType::F32)
            .to_device(&dev)
            .unwrap();
        let up = tensor(&rng.normals(n * c * h * w, 0.0, 1.0), &shape, DType::F32)
            .to_device(&dev)
            .unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let bn = SyncBatchNorm::new(c, SyncBatchNormConfig::default(), vb.pp("bn"), g).unwrap();
        let mut got = Vec::new();
        for composite in [false, true] {
            let var = Var::from_tensor(&x).unwrap();
            let y = if composite {
                bn.forward_composite_t(var.as_tensor(), None, false, true)
            } else {
                bn.forward_t(var.as_tensor(), true)
            }
            .unwrap();
            assert!(y.device().same_device(&dev));
            let grads = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            got.push((values(&y), values(grads.get(var.as_tensor()).unwrap())));
        }
        got
    });
    for (r, got) in out.iter().enumerate() {
        let ((yk, dk), (yc, dc)) = (&got[0], &got[1]);
        assert_close(&format!("rank {r} output"), yc, yk, 1e-5, 1e-5);
        assert_close(&format!("rank {r} input grad"), dc, dk, 1e-4, 1e-4);
    }
}

/// The debug agreement check covers split communicators: members of a pair
/// that make different calls get an error on both, at the call, instead of
/// a hang or mixed numbers; matching calls still give the right sums.
#[test]
fn debug_check_covers_split_communicators() {
    let test = "debug_check_covers_split_communicators";
    let Some(world) = world_or_skip(test) else {
        return;
    };
    let options = NcclOptions::default()
        .with_timeout(Duration::from_secs(3))
        .with_debug_checks(true);
    let out = run_ranks(
        world,
        options,
        |r| r,
        |_| {},
        move |r, dev, g| {
            let g = g.unwrap();
            // Ranks 0 and 1 pair up; any third rank is alone.
            let sub = g.split((r >= 2) as u32).unwrap();
            if r >= 2 {
                return None;
            }
            let t = Tensor::ones(8, DType::F32, &dev).unwrap();
            let s = sub.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(s, vec![2.0; 8], "rank {r}");
            // Same dtype and operation, different counts: a layer mix-up.
            let n = if r == 0 { 8 } else { 4 };
            let t = Tensor::ones(n, DType::F32, &dev).unwrap();
            let start = Instant::now();
            let res = sub
                .all_reduce_sum(&t)
                .map(|_| ())
                .map_err(|e| e.to_string());
            Some((res, start.elapsed()))
        },
    );
    for (r, res) in out.into_iter().enumerate().take(2) {
        let (res, took) = res.unwrap();
        let err = res.expect_err(&format!(
            "rank {r}: mismatched calls passed the debug check"
        ));
        assert!(
            err.contains("debug check") && err.contains("differ"),
            "rank {r}: {err}"
        );
        assert!(
            took < Duration::from_secs(3),
            "rank {r}: the error took {took:?}"
        );
    }
}

/// Dropping the group with a collective that a dead peer never joins
/// returns within about the timeout (the drop waits for the work in flight,
/// then gives up and aborts), instead of hanging in the teardown.
#[test]
fn dropping_the_group_with_a_dead_peer_returns_within_the_timeout() {
    let test = "dropping_the_group_with_a_dead_peer_returns_within_the_timeout";
    let Some(world) = world_or_skip(test) else {
        return;
    };
    let timeout = Duration::from_secs(2);
    let out = run(world, timeout, move |r, dev, g| {
        let t = Tensor::ones(4, DType::F32, &dev).unwrap();
        g.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap();
        if r != 0 {
            return None;
        }
        let s = g.all_reduce_sum(&t).unwrap();
        let start = Instant::now();
        drop(g);
        let took = start.elapsed();
        drop(s);
        Some(took)
    });
    let took = out[0].unwrap();
    assert!(took < timeout * 2, "the drop took {took:?}");
}

/// What one rank saw in [`data_parallel_step`]: the host syncs and
/// device-to-host copies of each step (when the emulated driver counts
/// them), its variables after the last step, and the last step's gradients
/// before and after averaging (`None`: none on this rank).
struct StepRun {
    syncs: Vec<Option<(u64, u64)>>,
    /// Per step, the launches of candle's `affine_*` kernels (a division
    /// pass) during the averaging.
    averaging_affines: Vec<Option<u64>>,
    layer_syncs: Vec<Option<(u64, u64)>>,
    vars: Vec<(String, Vec<f64>)>,
    local: Vec<Option<Vec<f64>>>,
    averaged: Vec<Option<Vec<f64>>>,
}

/// Trains linear → SyncBatchNorm+ReLU → linear head (plus a second head
/// that only rank 1 uses: its gradient is missing on rank 0) with SGD for
/// five steps on `dev`, averaging with a [`GradientAverager`] kept across
/// steps, and counts the host's waits for the GPU in every step: forward,
/// backward, averaging and the optimizer step. Then runs the SyncBatchNorm
/// layer alone (forward and backward) for two steps, counted the same way.
fn data_parallel_step(dev: &Device, group: ProcessGroup) -> StepRun {
    use candle::Module;
    use candle_nn::Optimizer;
    use candle_syncbn::data_parallel::{broadcast_varmap, AverageOptions, GradientAverager};
    let r = group.rank();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let lin = candle_nn::linear(8, 4, vb.pp("lin")).unwrap();
    let bn = SyncBatchNorm::new(
        4,
        SyncBatchNormConfig::default(),
        vb.pp("bn"),
        group.clone(),
    )
    .unwrap();
    let head = candle_nn::linear(4, 2, vb.pp("head")).unwrap();
    let branch = candle_nn::linear(4, 2, vb.pp("branch")).unwrap();
    broadcast_varmap(&varmap, &group, 0).unwrap();
    // SGD: AdamW makes no host sync either, but its dozen element-wise
    // kernels per variable take seconds on the emulated GPU.
    let mut opt = candle_nn::SGD::new(varmap.all_vars(), 0.1).unwrap();
    let mut averager = GradientAverager::new(&group, AverageOptions::default());
    let mut sorted = varmap
        .data()
        .lock()
        .unwrap()
        .clone()
        .into_iter()
        .collect::<Vec<_>>();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    // Every step's input is on the GPU before the counting starts.
    let mut rng = Rng::new(40 + r as u64);
    let data: Vec<(Tensor, Tensor)> = (0..5)
        .map(|_| {
            let x = tensor(&rng.normals(3 * 8, 0.5, 2.0), &[3, 8], DType::F32);
            let y = tensor(&rng.normals(3 * 2, 0.0, 1.0), &[3, 2], DType::F32);
            (x.to_device(dev).unwrap(), y.to_device(dev).unwrap())
        })
        .collect();
    let counters = || emulated_host_syncs().zip(emulated_dtoh_copies());
    let mut syncs = Vec::new();
    let mut averaging_affines = Vec::new();
    let (mut local, mut averaged) = (Vec::new(), Vec::new());
    for (x, y) in &data {
        let before = counters();
        let h = bn.forward_relu_t(&lin.forward(x).unwrap(), true).unwrap();
        let mut out = head.forward(&h).unwrap();
        if r == 1 {
            out = (out + branch.forward(&h).unwrap()).unwrap();
        }
        let loss = candle_nn::loss::mse(&out, y).unwrap();
        let mut grads = loss.backward().unwrap();
        // Handles on the gradients (read once the steps are done).
        let get = |grads: &candle::backprop::GradStore| -> Vec<Option<Tensor>> {
            sorted.iter().map(|(_, v)| grads.get(v).cloned()).collect()
        };
        local = get(&grads);
        let affines = emulated_launches_named(c"affine_");
        averager.average(&varmap, &mut grads).unwrap();
        averaging_affines.push(affines.map(|b| emulated_launches_named(c"affine_").unwrap() - b));
        averaged = get(&grads);
        opt.step(&grads).unwrap();
        drop((h, out, loss, grads));
        syncs.push(before.zip(counters()).map(|(b, a)| (a.0 - b.0, a.1 - b.1)));
    }
    let mut layer_syncs = Vec::new();
    for (x, _) in &data[..2] {
        let x = lin.forward(x).unwrap();
        let before = counters();
        let h = bn.forward_t(&x, true).unwrap();
        let grads = h.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        drop((h, grads));
        layer_syncs.push(before.zip(counters()).map(|(b, a)| (a.0 - b.0, a.1 - b.1)));
    }
    let read = |ts: Vec<Option<Tensor>>| -> Vec<Option<Vec<f64>>> {
        ts.iter()
            .map(|t| t.as_ref().map(|t| values(&t.to_dtype(DType::F64).unwrap())))
            .collect()
    };
    StepRun {
        syncs,
        averaging_affines,
        layer_syncs,
        vars: sorted
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    values(&v.as_tensor().to_dtype(DType::F64).unwrap()),
                )
            })
            .collect(),
        local: read(local),
        averaged: read(averaged),
    }
}

/// A data-parallel step on NCCL ranks (forward, backward, averaging with a
/// `GradientAverager`, SGD) makes no host synchronization and no
/// device-to-host copy after the first step, nor does the layer alone; the
/// averaging divides by the world size inside the all-reduce (`ncclAvg`),
/// without an element-wise pass of its own; a
/// gradient missing on a rank (a head only rank 1 uses) is still averaged
/// as a zero there, and variables without a gradient on any rank (the
/// running statistics) are left without one.
#[test]
fn data_parallel_step_makes_no_host_sync_after_the_first() {
    let Some(_) = world_or_skip("data_parallel_step_makes_no_host_sync_after_the_first") else {
        return;
    };
    let runs = run_alone(2, Duration::from_secs(120), |_, dev, g| {
        data_parallel_step(&dev, g)
    });
    let names: Vec<&String> = runs[0].vars.iter().map(|(k, _)| k).collect();
    for (i, name) in names.iter().enumerate() {
        // The last step's average: the mean of the ranks' gradients, a
        // missing one counting as zero; none where no rank had one.
        let locals: Vec<Option<&Vec<f64>>> = runs.iter().map(|run| run.local[i].as_ref()).collect();
        let want: Option<Vec<f64>> = locals.iter().flatten().next().map(|first| {
            (0..first.len())
                .map(|j| locals.iter().flatten().map(|g| g[j]).sum::<f64>() / 2.0)
                .collect()
        });
        if name.starts_with("branch") {
            assert!(locals[0].is_none() && locals[1].is_some(), "{name}");
        }
        if name.contains("running") {
            assert!(want.is_none(), "{name}");
        }
        for (r, run) in runs.iter().enumerate() {
            match (&run.averaged[i], &want) {
                (Some(got), Some(want)) => {
                    assert_close(&format!("rank {r} {name} averaged"), got, want, 1e-6, 1e-6)
                }
                (None, None) => {}
                (got, want) => panic!("rank {r} {name}: averaged {got:?}, expected {want:?}"),
            }
            // Every rank ends with the same variables.
            assert_close(
                &format!("rank {r} vs rank 0: {name}"),
                &run.vars[i].1,
                &runs[0].vars[i].1,
                0.0,
                0.0,
            );
        }
    }
    for (r, run) in runs.iter().enumerate() {
        if run.syncs[0].is_none() {
            continue; // a real driver does not count
        }
        // The first step agrees on the variables: the host reads the flags.
        let (_, dtoh) = run.syncs[0].unwrap();
        assert!(
            dtoh >= 1,
            "rank {r}: the agreement must read the flags back"
        );
        for (s, c) in run.syncs.iter().enumerate().skip(1) {
            assert_eq!(
                *c,
                Some((0, 0)),
                "rank {r} step {}: (host syncs, device-to-host copies) in forward + backward + averaging + SGD",
                s + 1
            );
        }
        // One pass: the division by the world size is NCCL's (ncclAvg), not
        // an affine kernel of its own.
        for (s, c) in run.averaging_affines.iter().enumerate() {
            assert_eq!(
                *c,
                Some(0),
                "rank {r} step {}: affine passes in the averaging",
                s + 1
            );
        }
        for (s, c) in run.layer_syncs.iter().enumerate() {
            assert_eq!(
                *c,
                Some((0, 0)),
                "rank {r}: the layer alone, step {}",
                s + 1
            );
        }
    }
}
