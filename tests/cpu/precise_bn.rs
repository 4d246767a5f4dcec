//! Precise running statistics (`precise_bn`): on 1 and on k in-process
//! ranks, the recomputed statistics of a synchronized layer are those of the
//! global batches combined — by default the population mean and variance of
//! all their values (fvcore's `_PopulationVarianceEstimator`, written out
//! below in f64), optionally the average of the batch means and unbiased
//! variances (`_MeanOfBatchVarianceEstimator`) — identical on every rank;
//! local layers get their rank's statistics (or, combined over the group,
//! the same on every rank); a layer skipped in a batch does not count it;
//! frozen layers, weights, counters and momentum are left alone; errors
//! leave the layers as they were.

use crate::common;

use candle::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::convert::checkpoint::{load_checkpoint, save_checkpoint, LoadOptions};
use candle_syncbn::precise_bn::{update_bn_stats, Estimator, PreciseBn};
use candle_syncbn::{BatchNormLayer, BatchNormRewriter, Outcome, ProcessGroup};
use common::{assert_close, channel_indices, scratch_dir, tensor, values, Rng};

const C: usize = 3;
const L: usize = 4;
/// Samples per rank, per batch (3 ranks, 4 batches, uneven).
const SIZES: [[usize; 3]; 4] = [[3, 5, 2], [4, 1, 6], [2, 2, 2], [5, 3, 1]];

fn bits(t: &Tensor) -> Vec<u64> {
    values(t).iter().map(|v| v.to_bits()).collect()
}

/// One batch's statistics as a layer sees them, in f64: the values per
/// channel, and per channel the mean and the unbiased variance.
struct Batch {
    n: f64,
    mean: Vec<f64>,
    var: Vec<f64>,
}

/// The [`Batch`] of `(N, C, *)` values (a variance of 0 for one value per
/// channel, whose unbiased variance is not finite: the population formula
/// multiplies it by `(n − 1)/n = 0`).
fn batch(x: &[f64], shape: &[usize]) -> Batch {
    let n = x.len() / shape[1];
    let (mean, var) = batch_stats(x, shape);
    let var = if n > 1 { var } else { vec![0.0; var.len()] };
    Batch {
        n: n as f64,
        mean,
        var,
    }
}

/// fvcore's `_PopulationVarianceEstimator`, written out in f64: with
/// `tot = Σ n`, `mean = Σ n·m / tot` and `var = Σ n·(m² + v·(n−1)/n) / tot −
/// mean²` (the biased variance of all the values of all the batches).
fn population(batches: &[Batch]) -> (Vec<f64>, Vec<f64>) {
    let tot: f64 = batches.iter().map(|b| b.n).sum();
    let c = batches[0].mean.len();
    (0..c)
        .map(|c| {
            let mean = batches.iter().map(|b| b.n * b.mean[c]).sum::<f64>() / tot;
            let square_mean = batches
                .iter()
                .map(|b| b.n * (b.mean[c].powi(2) + b.var[c] * (b.n - 1.0) / b.n))
                .sum::<f64>()
                / tot;
            (mean, square_mean - mean * mean)
        })
        .unzip()
}

/// fvcore's `_MeanOfBatchVarianceEstimator`: the plain average of the batch
/// means and unbiased variances.
fn mean_of_batch_variances(batches: &[Batch]) -> (Vec<f64>, Vec<f64>) {
    let means: Vec<_> = batches.iter().map(|b| b.mean.clone()).collect();
    let vars: Vec<_> = batches.iter().map(|b| b.var.clone()).collect();
    (average(&means), average(&vars))
}

/// Per-channel mean and unbiased variance of `(N, C, L)` values, in f64.
fn batch_stats(x: &[f64], shape: &[usize]) -> (Vec<f64>, Vec<f64>) {
    channel_indices(shape)
        .iter()
        .map(|ix| {
            let n = ix.len() as f64;
            let m = ix.iter().map(|&i| x[i]).sum::<f64>() / n;
            let v = ix.iter().map(|&i| (x[i] - m).powi(2)).sum::<f64>() / (n - 1.0);
            (m, v)
        })
        .unzip()
}

/// The element-wise average of equally long vectors.
fn average(vs: &[Vec<f64>]) -> Vec<f64> {
    (0..vs[0].len())
        .map(|c| vs.iter().map(|v| v[c]).sum::<f64>() / vs.len() as f64)
        .collect()
}

/// Frozen backbone, synchronized neck, local head.
struct Model {
    backbone: BatchNormLayer,
    neck: BatchNormLayer,
    head: BatchNormLayer,
}

impl Model {
    fn new(varmap: &VarMap, group: ProcessGroup) -> Model {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        let rw = BatchNormRewriter::new(vb, group).rule(|path| match path {
            p if p.starts_with("backbone") => Outcome::Frozen,
            p if p.starts_with("head") => Outcome::Local,
            _ => Outcome::Sync,
        });
        let vb = rw.vb();
        Model {
            backbone: rw.batch_norm(C, 1e-5, vb.pp("backbone.bn")).unwrap(),
            neck: rw.batch_norm(C, 1e-5, vb.pp("neck.bn")).unwrap(),
            head: rw.batch_norm(C, 1e-5, vb.pp("head.bn")).unwrap(),
        }
    }

    /// The forward, returning the inputs of the neck and the head.
    fn forward(&self, x: &Tensor, train: bool) -> candle::Result<(Tensor, Tensor)> {
        let h1 = self.backbone.forward_t(x, train)?;
        let h2 = self.neck.forward_relu_t(&h1, train)?;
        self.head.forward_t(&h2, train)?;
        Ok((h1, h2))
    }

    fn layers(&self) -> [&BatchNormLayer; 3] {
        [&self.backbone, &self.neck, &self.head]
    }
}

/// Batch `i` of `rank`: mean and spread change from batch to batch, so the
/// average of the batch statistics differs from any momentum average.
fn data(rank: usize, i: usize) -> Tensor {
    let n = SIZES[i][rank];
    let mut rng = Rng::new(100 * i as u64 + rank as u64);
    let mean = 0.5 * i as f64 - 0.3 * rank as f64;
    tensor(
        &rng.normals(n * C * L, mean, 1.0 + 0.4 * i as f64),
        &[n, C, L],
        DType::F32,
    )
}

/// The variables of a fresh model, with non-trivial statistics and
/// parameters (the same on every rank).
fn init(varmap: &VarMap) {
    let mut rng = Rng::new(77);
    let mut data = varmap.data().lock().unwrap();
    for prefix in ["backbone.bn", "neck.bn", "head.bn"] {
        for (name, vals) in [
            ("running_mean", rng.normals(C, 0.2, 0.5)),
            ("running_var", (0..C).map(|_| 0.5 + rng.uniform()).collect()),
            ("weight", rng.normals(C, 1.0, 0.3)),
            ("bias", rng.normals(C, 0.0, 0.3)),
        ] {
            let t = tensor(&vals, &[C], DType::F32);
            data.insert(
                format!("{prefix}.{name}"),
                candle::Var::from_tensor(&t).unwrap(),
            );
        }
    }
}

/// What one rank saw and ended with.
struct RankResult {
    /// Neck and head inputs of each batch of the precise pass.
    neck_inputs: Vec<Vec<f64>>,
    head_inputs: Vec<Vec<f64>>,
    /// (mean, var) after the precise pass.
    neck: (Vec<f64>, Vec<f64>),
    head: (Vec<f64>, Vec<f64>),
    neck_bits: Vec<u64>,
    head_bits: Vec<u64>,
    counters: (u64, u64),
    frozen_unchanged: bool,
    weights_unchanged: bool,
    /// Neck statistics after one more training step, and that step's batch
    /// statistics (neck input).
    after_step: (Vec<f64>, Vec<f64>),
    step_input: Vec<f64>,
}

fn run_rank(
    group: ProcessGroup,
    average_local: bool,
    estimator: Estimator,
) -> candle::Result<RankResult> {
    let rank = group.rank();
    let varmap = VarMap::new();
    init(&varmap);
    let model = Model::new(&varmap, group.clone());
    // Two ordinary training steps first: counters at 2, momentum averages.
    for i in 0..2 {
        model.forward(&data(rank, 3 - i), true)?;
    }
    let snapshot = |prefix: &str, names: &[&str]| -> Vec<Vec<u64>> {
        let d = varmap.data().lock().unwrap();
        names
            .iter()
            .map(|n| bits(d[&format!("{prefix}.{n}")].as_tensor()))
            .collect()
    };
    let all = [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ];
    let frozen_before = snapshot("backbone.bn", &all);
    let weights = |varmap_prefixes: &[&str]| -> Vec<Vec<Vec<u64>>> {
        varmap_prefixes
            .iter()
            .map(|p| snapshot(p, &["weight", "bias"]))
            .collect()
    };
    let weights_before = weights(&["neck.bn", "head.bn"]);
    let (mut neck_inputs, mut head_inputs) = (Vec::new(), Vec::new());
    let layers = model.layers();
    let precise = PreciseBn::new(SIZES.len()).estimator(estimator);
    let precise = if average_local {
        precise.average_local_over(group.clone())
    } else {
        precise
    };
    precise.run(&[layers[0], layers[1], layers[2]], |i| {
        let (h1, h2) = model.forward(&data(rank, i), true)?;
        neck_inputs.push(values(&h1));
        head_inputs.push(values(&h2));
        Ok(())
    })?;
    let stats = |l: &BatchNormLayer| {
        (
            values(l.running_mean().unwrap()),
            values(l.running_var().unwrap()),
        )
    };
    let both_bits = |l: &BatchNormLayer| {
        let mut b = bits(l.running_mean().unwrap());
        b.extend(bits(l.running_var().unwrap()));
        b
    };
    let result = RankResult {
        neck: stats(&model.neck),
        head: stats(&model.head),
        neck_bits: both_bits(&model.neck),
        head_bits: both_bits(&model.head),
        counters: (
            model.neck.num_batches_tracked().unwrap(),
            model.head.num_batches_tracked().unwrap(),
        ),
        frozen_unchanged: snapshot("backbone.bn", &all) == frozen_before,
        weights_unchanged: weights(&["neck.bn", "head.bn"]) == weights_before,
        neck_inputs,
        head_inputs,
        after_step: (vec![], vec![]),
        step_input: vec![],
    };
    // One more training step: the configured momentum (0.1) is back.
    let (h1, _) = model.forward(&data(rank, 0), true)?;
    Ok(RankResult {
        after_step: stats(&model.neck),
        step_input: values(&h1),
        ..result
    })
}

fn run_ranks(average_local: bool, estimator: Estimator) -> Vec<RankResult> {
    let handles: Vec<_> = ProcessGroup::threads(3)
        .unwrap()
        .into_iter()
        .map(|g| std::thread::spawn(move || run_rank(g, average_local, estimator)))
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect()
}

/// The concatenation over the ranks of each rank's `(n, C, L)` values.
fn global(parts: &[&Vec<f64>]) -> Vec<f64> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

/// Per-channel `(mean, var)`.
type Stats = (Vec<f64>, Vec<f64>);

/// An estimator's reference: the precise statistics of some batches.
type Reference = fn(&[Batch]) -> Stats;

/// The global batches the neck saw: every rank's inputs of batch `i`
/// together, in f64 from the layer's actual inputs.
fn neck_batches(results: &[RankResult]) -> Vec<Batch> {
    SIZES
        .iter()
        .enumerate()
        .map(|(i, sizes)| {
            let x = global(
                &results
                    .iter()
                    .map(|r| &r.neck_inputs[i])
                    .collect::<Vec<_>>(),
            );
            batch(&x, &[sizes.iter().sum(), C, L])
        })
        .collect()
}

/// The batches `rank`'s local head saw.
fn head_batches(r: &RankResult, rank: usize) -> Vec<Batch> {
    (0..SIZES.len())
        .map(|i| batch(&r.head_inputs[i], &[SIZES[i][rank], C, L]))
        .collect()
}

/// 3 thread ranks, uneven batches: the synchronized layer gets `reference`
/// of the global batches, bitwise equal on every rank; the local layer
/// `reference` of its rank's batches; the rest is left alone.
fn check_three_ranks(estimator: Estimator, reference: Reference) {
    let results = run_ranks(false, estimator);
    let (ref_mean, ref_var) = reference(&neck_batches(&results));
    for (rank, r) in results.iter().enumerate() {
        assert_close(
            &format!("rank {rank} neck mean"),
            &r.neck.0,
            &ref_mean,
            1e-6,
            1e-5,
        );
        assert_close(
            &format!("rank {rank} neck var"),
            &r.neck.1,
            &ref_var,
            1e-6,
            1e-5,
        );
        assert_eq!(
            r.neck_bits, results[0].neck_bits,
            "rank {rank}: synchronized stats differ"
        );
        // Local head: this rank's own batches.
        let (hm, hv) = reference(&head_batches(r, rank));
        assert_close(
            &format!("rank {rank} head mean"),
            &r.head.0,
            &hm,
            1e-6,
            1e-5,
        );
        assert_close(&format!("rank {rank} head var"), &r.head.1, &hv, 1e-6, 1e-5);
        assert_eq!(
            r.counters,
            (2, 2),
            "rank {rank}: num_batches_tracked changed"
        );
        assert!(r.frozen_unchanged, "rank {rank}: the frozen layer changed");
        assert!(
            r.weights_unchanged,
            "rank {rank}: weights or biases changed"
        );
        // The next training step uses momentum 0.1 again.
        let x = global(&results.iter().map(|r| &r.step_input).collect::<Vec<_>>());
        let (bm, bv) = batch_stats(&x, &[SIZES[0].iter().sum(), C, L]);
        let want_m: Vec<f64> = (0..C).map(|c| 0.9 * r.neck.0[c] + 0.1 * bm[c]).collect();
        let want_v: Vec<f64> = (0..C).map(|c| 0.9 * r.neck.1[c] + 0.1 * bv[c]).collect();
        assert_close("mean after a step", &r.after_step.0, &want_m, 1e-6, 1e-5);
        assert_close("var after a step", &r.after_step.1, &want_v, 1e-6, 1e-5);
    }
    // The local layers differ between ranks (their batches do).
    assert_ne!(results[0].head_bits, results[1].head_bits);
}

#[test]
fn precise_statistics_on_three_ranks_are_the_population_statistics_of_the_global_batches() {
    check_three_ranks(Estimator::Population, population);
}

#[test]
fn mean_of_batch_variances_on_three_ranks_averages_the_global_batches() {
    check_three_ranks(Estimator::MeanOfBatchVariances, mean_of_batch_variances);
}

#[test]
fn the_two_estimators_differ_on_these_batches() {
    // Otherwise the tests above could not tell them apart.
    let results = run_ranks(false, Estimator::Population);
    let batches = neck_batches(&results);
    let (pm, pv) = population(&batches);
    let (mm, mv) = mean_of_batch_variances(&batches);
    for c in 0..C {
        assert!(
            (pm[c] - mm[c]).abs() > 1e-3,
            "channel {c}: means {pm:?} {mm:?}"
        );
        assert!(
            (pv[c] - mv[c]).abs() > 1e-3 * mv[c],
            "channel {c}: vars {pv:?} {mv:?}"
        );
    }
}

/// Local layers combined over the group: `reference` of every rank's
/// batches together, bitwise equal on every rank.
fn check_local_combined(estimator: Estimator, reference: Reference) {
    let results = run_ranks(true, estimator);
    let pooled: Vec<Batch> = results
        .iter()
        .enumerate()
        .flat_map(|(rank, r)| head_batches(r, rank))
        .collect();
    let (want_m, want_v) = reference(&pooled);
    for (rank, r) in results.iter().enumerate() {
        assert_eq!(
            r.head_bits, results[0].head_bits,
            "rank {rank}: local stats differ"
        );
        assert_eq!(
            r.neck_bits, results[0].neck_bits,
            "rank {rank}: synchronized stats differ"
        );
        assert_close("combined head mean", &r.head.0, &want_m, 1e-6, 1e-5);
        assert_close("combined head var", &r.head.1, &want_v, 1e-6, 1e-5);
    }
}

#[test]
fn local_layers_combined_over_the_group_are_the_population_of_all_ranks_batches() {
    check_local_combined(Estimator::Population, population);
}

#[test]
fn local_layers_averaged_over_the_group_agree_on_every_rank() {
    // With every rank running every batch, the average over (rank, batch)
    // is pycls's average over ranks of each rank's average.
    check_local_combined(Estimator::MeanOfBatchVariances, mean_of_batch_variances);
}

/// A single-rank model with trained statistics, and its variables' bits.
fn trained_single() -> (VarMap, Model, Vec<(String, Vec<u64>)>) {
    let varmap = VarMap::new();
    init(&varmap);
    let model = Model::new(&varmap, ProcessGroup::single());
    model.forward(&data(1, 2), true).unwrap();
    let snap = snapshot(&varmap);
    (varmap, model, snap)
}

fn snapshot(varmap: &VarMap) -> Vec<(String, Vec<u64>)> {
    let d = varmap.data().lock().unwrap();
    let mut v: Vec<_> = d
        .iter()
        .map(|(k, v)| (k.clone(), bits(v.as_tensor())))
        .collect();
    v.sort();
    v
}

#[test]
fn errors_leave_the_layers_as_they_were() {
    let (varmap, model, before) = trained_single();
    let layers = model.layers();
    let layers = [layers[0], layers[1], layers[2]];
    let err = update_bn_stats(&layers, 0, |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_batches = 0"), "{err}");
    // Run in eval mode: nothing seen, an error rather than zero statistics.
    let err = update_bn_stats(&layers, 2, |i| {
        model.forward(&data(1, i), false).map(|_| ())
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("'neck.bn' ran 0 training forward(s) over 2 batches"),
        "{err}"
    );
    assert_eq!(snapshot(&varmap), before);
    // Run twice per batch.
    let err = update_bn_stats(&layers, 2, |i| {
        model.forward(&data(1, i), true)?;
        model.forward(&data(1, i), true).map(|_| ())
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("'neck.bn' ran 2 training forwards in batch 0 of 2"),
        "{err}"
    );
    assert_eq!(snapshot(&varmap), before);
    // The forward fails in the middle.
    let err = update_bn_stats(&layers, 3, |i| {
        if i == 1 {
            candle::bail!("data loader gave up")
        }
        model.forward(&data(1, i), true).map(|_| ())
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("batch 1 of 3") && err.contains("data loader gave up"),
        "{err}"
    );
    assert_eq!(snapshot(&varmap), before);
    // Nested call on the same layer.
    let err = update_bn_stats(&layers, 1, |_| update_bn_stats(&[layers[1]], 1, |_| Ok(())))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already having its statistics recomputed"),
        "{err}"
    );
    assert_eq!(snapshot(&varmap), before);
    // And afterwards training uses the configured momentum: 0.9·old + 0.1·batch.
    let old = values(model.neck.running_mean().unwrap());
    let (h1, _) = model.forward(&data(1, 0), true).unwrap();
    let (bm, _) = batch_stats(&values(&h1), &[SIZES[0][1], C, L]);
    let want: Vec<f64> = (0..C).map(|c| 0.9 * old[c] + 0.1 * bm[c]).collect();
    assert_close(
        "momentum after errors",
        &values(model.neck.running_mean().unwrap()),
        &want,
        1e-6,
        1e-5,
    );
}

#[test]
fn checkpoint_after_precise_statistics_loads_back_the_same_numbers() {
    let dir = scratch_dir("precise-ckpt");
    let (varmap, model, _) = trained_single();
    let layers = model.layers();
    update_bn_stats(&[layers[0], layers[1], layers[2]], 4, |i| {
        model.forward(&data(0, i), true).map(|_| ())
    })
    .unwrap();
    let path = dir.join("precise.safetensors");
    save_checkpoint(&varmap, &path).unwrap();
    let fresh = VarMap::new();
    let reloaded = Model::new(&fresh, ProcessGroup::single());
    load_checkpoint(&fresh, &path, &LoadOptions::default()).unwrap();
    assert_eq!(snapshot(&fresh), snapshot(&varmap));
    let x = data(0, 1);
    for (a, b) in model.layers().iter().zip(reloaded.layers()) {
        assert_eq!(
            bits(&a.forward_t(&x, false).unwrap()),
            bits(&b.forward_t(&x, false).unwrap())
        );
    }
    // PyTorch's names and dtypes in the file.
    let file = candle::safetensors::load(&path, &Device::Cpu).unwrap();
    assert_eq!(file["neck.bn.num_batches_tracked"].dtype(), DType::I64);
    assert_eq!(
        file["neck.bn.num_batches_tracked"]
            .to_scalar::<i64>()
            .unwrap(),
        1
    );
    assert_eq!(
        bits(&file["neck.bn.running_var"]),
        bits(model.neck.running_var().unwrap())
    );
    // A plain SyncBatchNorm (not through the rewriter) takes part too.
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let extra = candle_syncbn::SyncBatchNorm::new(
        C,
        candle_syncbn::SyncBatchNormConfig::default().with_momentum(None),
        vb.pp("extra"),
        ProcessGroup::single(),
    )
    .unwrap();
    update_bn_stats(&[&extra], 2, |i| {
        extra.forward_t(&data(0, i), false).map(|_| ())
    })
    .unwrap_err();
    update_bn_stats(&[&extra], 2, |i| {
        extra.forward_t(&data(0, i), true).map(|_| ())
    })
    .unwrap();
    let (want_m, want_v) = population(&[
        batch(&values(&data(0, 0)), &[SIZES[0][0], C, L]),
        batch(&values(&data(0, 1)), &[SIZES[1][0], C, L]),
    ]);
    assert_close(
        "plain layer mean",
        &values(extra.running_mean().unwrap()),
        &want_m,
        1e-6,
        1e-5,
    );
    assert_close(
        "plain layer var",
        &values(extra.running_var().unwrap()),
        &want_v,
        1e-6,
        1e-5,
    );
    assert_eq!(extra.num_batches_tracked().unwrap(), 0);
    // The layer composed of candle ops (other devices' path) notes its
    // global count too.
    update_bn_stats(&[&extra], 2, |i| {
        extra
            .forward_composite_t(&data(0, i), None, false, true)
            .map(|_| ())
    })
    .unwrap();
    assert_close(
        "composed layer var",
        &values(extra.running_var().unwrap()),
        &want_v,
        1e-6,
        1e-5,
    );
}

/// One rank, uneven batches, layers skipped in some batches: the neck skips
/// batch 3, the head batch 2 and sees one value per channel in batch 1
/// (with `single_value`). Returns the model's neck and head statistics and
/// the batches each saw.
fn run_with_skips(
    estimator: Estimator,
    single_value: bool,
) -> (Stats, Stats, Vec<Batch>, Vec<Batch>) {
    let (_varmap, model, _) = trained_single();
    let (mut neck, mut head) = (Vec::new(), Vec::new());
    let layers = model.layers();
    PreciseBn::new(SIZES.len())
        .estimator(estimator)
        .run(&[layers[0], layers[1], layers[2]], |i| {
            let x = data(0, i);
            let h1 = model.backbone.forward_t(&x, true)?;
            let h2 = if i == 3 {
                h1
            } else {
                neck.push(batch(&values(&h1), h1.dims()));
                model.neck.forward_relu_t(&h1, true)?
            };
            let h2 = if i == 1 && single_value {
                h2.narrow(0, 0, 1)?.narrow(2, 1, 1)?
            } else {
                h2
            };
            if i != 2 {
                head.push(batch(&values(&h2), h2.dims()));
                model.head.forward_t(&h2, true)?;
            }
            Ok(())
        })
        .unwrap();
    let stats = |l: &BatchNormLayer| {
        (
            values(l.running_mean().unwrap()),
            values(l.running_var().unwrap()),
        )
    };
    (stats(&model.neck), stats(&model.head), neck, head)
}

#[test]
fn on_one_rank_layers_skipped_in_a_batch_do_not_count_it() {
    let (neck, head, neck_batches, head_batches) = run_with_skips(Estimator::Population, true);
    assert_eq!((neck_batches.len(), head_batches.len()), (3, 3));
    assert_eq!(head_batches[1].n, 1.0);
    let (m, v) = population(&neck_batches);
    assert_close("neck mean", &neck.0, &m, 1e-6, 1e-5);
    assert_close("neck var", &neck.1, &v, 1e-6, 1e-5);
    let (m, v) = population(&head_batches);
    assert_close("head mean", &head.0, &m, 1e-6, 1e-5);
    assert_close("head var", &head.1, &v, 1e-6, 1e-5);
    // The old estimator skips alike (one value per channel has no unbiased
    // variance, so every batch holds several here).
    let (neck, head, neck_batches, head_batches) =
        run_with_skips(Estimator::MeanOfBatchVariances, false);
    let (m, v) = mean_of_batch_variances(&neck_batches);
    assert_close("old neck mean", &neck.0, &m, 1e-6, 1e-5);
    assert_close("old neck var", &neck.1, &v, 1e-6, 1e-5);
    let (m, v) = mean_of_batch_variances(&head_batches);
    assert_close("old head mean", &head.0, &m, 1e-6, 1e-5);
    assert_close("old head var", &head.1, &v, 1e-6, 1e-5);
}
