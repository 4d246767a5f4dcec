//! Converting candle-nn BatchNorm models: the drop-in constructor, `from_batch_norm`
//! and the `VarBuilder` rewriter, against `candle_nn::BatchNorm` itself.

use crate::common;

use candle::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{BatchNormConfig, ModuleT, Optimizer, VarBuilder, VarMap};
use candle_syncbn::{
    set_thread_default_group, BatchNormLayer, BatchNormRewriter, ConvertedSite, Outcome,
    ProcessGroup, SyncBatchNorm, SyncBatchNormConfig,
};
use common::{values, Rng};
use std::collections::BTreeSet;

/// Float tolerance for f32 computations compared between implementations.
const ATOL: f64 = 1e-5;

fn randn(rng: &mut Rng, shape: &[usize], mean: f64, std: f64) -> Tensor {
    let n = shape.iter().product();
    common::tensor(&rng.normals(n, mean, std), shape, DType::F32)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    values(a)
        .iter()
        .zip(values(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, atol: f64) {
    let d = max_diff(a, b);
    assert!(d <= atol, "{what}: max abs difference {d:e} > {atol:e}");
}

/// Sets the BatchNorm variables under `prefix` to non-trivial values.
fn set_bn_vars(varmap: &mut VarMap, prefix: &str, c: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let w = randn(&mut rng, &[c], 1.0, 0.3);
    let b = randn(&mut rng, &[c], 0.0, 0.5);
    let m = randn(&mut rng, &[c], 0.2, 0.5);
    let v = randn(&mut rng, &[c], 0.0, 0.3)
        .abs()
        .unwrap()
        .affine(1.0, 0.5)
        .unwrap();
    for (name, t) in [
        ("weight", w),
        ("bias", b),
        ("running_mean", m),
        ("running_var", v),
    ] {
        varmap.set_one(format!("{prefix}.{name}"), t).unwrap();
    }
}

fn cfg(eps: f64, momentum: f64) -> BatchNormConfig {
    BatchNormConfig {
        eps,
        remove_mean: true,
        affine: true,
        momentum,
    }
}

/// The drop-in constructor with world size 1 gives candle-nn's outputs, running
/// statistics and gradients, over several training steps and in eval.
#[test]
fn drop_in_matches_candle_nn_at_world_size_one() {
    for (eps, momentum) in [(1e-5, 0.1), (1e-3, 0.35)] {
        let (mut map_nn, mut map_sync) = (VarMap::new(), VarMap::new());
        let vb_nn = VarBuilder::from_varmap(&map_nn, DType::F32, &Device::Cpu);
        let vb_sync = VarBuilder::from_varmap(&map_sync, DType::F32, &Device::Cpu);
        let nn = candle_nn::batch_norm(4, cfg(eps, momentum), vb_nn.pp("bn")).unwrap();
        let sync = candle_syncbn::batch_norm(4, cfg(eps, momentum), vb_sync.pp("bn")).unwrap();
        assert_eq!(sync.group().world_size(), 1);
        assert_eq!(
            *sync.config(),
            SyncBatchNormConfig::default()
                .with_eps(eps)
                .with_momentum(Some(momentum))
                .with_affine(true)
                .with_track_running_stats(true)
        );
        set_bn_vars(&mut map_nn, "bn", 4, 7);
        set_bn_vars(&mut map_sync, "bn", 4, 7);

        let mut rng = Rng::new(11);
        for step in 0..3 {
            let x =
                Var::from_tensor(&randn(&mut rng, &[3, 4, 2, 5], 0.5 * step as f64, 2.0)).unwrap();
            let r = randn(&mut rng, &[3, 4, 2, 5], 0.0, 1.0);
            let y_nn = nn.forward_t(&x, true).unwrap();
            let y_sync = sync.forward_t(&x, true).unwrap();
            assert_close(&format!("train output, step {step}"), &y_nn, &y_sync, ATOL);
            let g_nn = (&y_nn * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g_sync = (&y_sync * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (w_nn, b_nn) = nn.weight_and_bias().unwrap();
            let (w_s, b_s) = sync.weight_and_bias().unwrap();
            for (what, a, b) in [
                ("d input", g_nn.get(&x), g_sync.get(&x)),
                ("d weight", g_nn.get(w_nn), g_sync.get(w_s)),
                ("d bias", g_nn.get(b_nn), g_sync.get(b_s)),
            ] {
                assert_close(
                    &format!("{what}, step {step}"),
                    a.unwrap(),
                    b.unwrap(),
                    1e-4,
                );
            }
            assert_close(
                "running_mean",
                nn.running_mean(),
                sync.running_mean().unwrap(),
                1e-6,
            );
            assert_close(
                "running_var",
                nn.running_var(),
                sync.running_var().unwrap(),
                1e-5,
            );
        }
        assert_eq!(sync.num_batches_tracked().unwrap(), 3);
        let x = randn(&mut rng, &[2, 4, 3, 3], 1.0, 3.0);
        assert_close(
            "eval output",
            &nn.forward_t(&x, false).unwrap(),
            &sync.forward_t(&x, false).unwrap(),
            ATOL,
        );
    }
}

/// The drop-in constructor synchronizes over the (thread) default group: two
/// in-process ranks on half batches give one rank's output on the whole batch.
#[test]
fn drop_in_uses_the_default_group() {
    let mut rng = Rng::new(3);
    let x = randn(&mut rng, &[6, 3, 4], 1.0, 2.0);
    let full = {
        let map = VarMap::new();
        let nn = candle_nn::batch_norm(
            3,
            1e-5,
            VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let y = nn.forward_t(&x, true).unwrap();
        (
            y,
            nn.running_mean().copy().unwrap(),
            nn.running_var().copy().unwrap(),
        )
    };
    let groups = ProcessGroup::threads(2).unwrap();
    let handles: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(rank, group)| {
            let x = x.narrow(0, rank * 3, 3).unwrap();
            std::thread::spawn(move || {
                set_thread_default_group(Some(group));
                let map = VarMap::new();
                let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
                let bn = candle_syncbn::batch_norm(3, 1e-5, vb).unwrap();
                assert_eq!(bn.group().world_size(), 2);
                assert_eq!(bn.group().rank(), rank);
                let y = bn.forward_t(&x, true).unwrap();
                (
                    y,
                    bn.running_mean().unwrap().copy().unwrap(),
                    bn.running_var().unwrap().copy().unwrap(),
                )
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let y = Tensor::cat(&[&results[0].0, &results[1].0], 0).unwrap();
    assert_close("2-rank output vs 1-rank candle-nn", &y, &full.0, ATOL);
    for (rank, r) in results.iter().enumerate() {
        assert_close(&format!("running_mean rank {rank}"), &r.1, &full.1, 1e-6);
        assert_close(&format!("running_var rank {rank}"), &r.2, &full.2, 1e-5);
    }
}

/// `remove_mean: false` cannot be synchronized: every way of converting says so,
/// naming the layer; a site the rewriter keeps local is fine.
#[test]
fn remove_mean_false_is_a_clear_error() {
    let keep = BatchNormConfig {
        remove_mean: false,
        ..Default::default()
    };
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let err = candle_syncbn::batch_norm(4, keep, vb.pp("enc.bn"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("enc.bn") && err.contains("remove_mean"),
        "{err}"
    );

    let nn = candle_nn::batch_norm(4, keep, vb.pp("dec.bn")).unwrap();
    let err = SyncBatchNorm::from_batch_norm(&nn, ProcessGroup::single())
        .unwrap_err()
        .to_string();
    assert!(err.contains("remove_mean: false"), "{err}");

    let rw = BatchNormRewriter::new(vb.clone(), ProcessGroup::single())
        .filter(|p| !p.starts_with("head"));
    let err = rw
        .batch_norm(4, keep, vb.pp("body.bn"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("body.bn") && err.contains("remove_mean"),
        "{err}"
    );
    let head = rw.batch_norm(4, keep, vb.pp("head.bn")).unwrap();
    assert!(!head.is_sync());
    assert_eq!(rw.kept_local(), vec!["head.bn".to_string()]);
    assert!(rw.report().is_empty());
}

/// `from_batch_norm` shares the weight, bias and running statistics with the
/// candle-nn layer, copies eps and momentum, and an optimizer over the `VarMap`
/// keeps training the shared weight.
#[test]
fn from_batch_norm_shares_parameters_and_statistics() {
    let mut map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let local = candle_nn::batch_norm(3, cfg(1e-3, 0.2), vb.pp("bn")).unwrap();
    set_bn_vars(&mut map, "bn", 3, 5);
    // An independent candle-nn copy (fresh variables) to compute the expectations.
    let expected = candle_nn::BatchNorm::new_with_momentum(
        3,
        local.running_mean().copy().unwrap(),
        local.running_var().copy().unwrap(),
        local.weight_and_bias().unwrap().0.copy().unwrap(),
        local.weight_and_bias().unwrap().1.copy().unwrap(),
        1e-3,
        0.2,
    )
    .unwrap();

    let sync = SyncBatchNorm::from_batch_norm(&local, ProcessGroup::single()).unwrap();
    assert_eq!(sync.num_features(), 3);
    assert_eq!(
        *sync.config(),
        SyncBatchNormConfig::default()
            .with_eps(1e-3)
            .with_momentum(Some(0.2))
            .with_affine(true)
            .with_track_running_stats(true)
    );
    assert_eq!(sync.num_batches_tracked().unwrap(), 0);
    let (w_l, b_l) = local.weight_and_bias().unwrap();
    let (w_s, b_s) = sync.weight_and_bias().unwrap();
    assert!(
        w_l.id() == w_s.id() && b_l.id() == b_s.id(),
        "not the same tensors"
    );

    let mut rng = Rng::new(9);
    let x = randn(&mut rng, &[4, 3, 5], -1.0, 2.0);
    assert_close(
        "eval output",
        &sync.forward_t(&x, false).unwrap(),
        &local.forward_t(&x, false).unwrap(),
        ATOL,
    );

    // A synchronized training step updates the candle-nn layer's statistics.
    let y = sync.forward_t(&x, true).unwrap();
    assert_close(
        "train output",
        &y,
        &expected.forward_t(&x, true).unwrap(),
        ATOL,
    );
    assert_close(
        "shared running_mean",
        local.running_mean(),
        expected.running_mean(),
        1e-6,
    );
    assert_close(
        "shared running_var",
        local.running_var(),
        expected.running_var(),
        1e-5,
    );
    assert_eq!(sync.num_batches_tracked().unwrap(), 1);

    // An optimizer over the VarMap trains the weight the sync layer uses.
    let before = w_l.copy().unwrap();
    let mut sgd = candle_nn::SGD::new(map.all_vars(), 0.5).unwrap();
    let r = randn(&mut rng, &[4, 3, 5], 0.0, 1.0);
    let loss = (sync.forward_t(&x, true).unwrap() * &r)
        .unwrap()
        .sum_all()
        .unwrap();
    sgd.backward_step(&loss).unwrap();
    assert!(max_diff(&before, w_l) > 1e-3, "the weight did not change");
    assert_close("weight seen by both", w_l, w_s, 0.0);

    // Without affine there is no weight and bias.
    let plain = BatchNormConfig {
        affine: false,
        ..Default::default()
    };
    let nn = candle_nn::batch_norm(3, plain, vb.pp("plain")).unwrap();
    let sync = SyncBatchNorm::from_batch_norm(&nn, ProcessGroup::single()).unwrap();
    assert!(sync.weight_and_bias().is_none() && !sync.config().affine);
    assert_close(
        "no-affine eval output",
        &sync.forward_t(&x, false).unwrap(),
        &nn.forward_t(&x, false).unwrap(),
        ATOL,
    );
}

/// A small model written against the rewriter (candle-nn style construction).
struct Net {
    stem: candle_nn::Conv2d,
    stem_bn: BatchNormLayer,
    block_bn: BatchNormLayer,
    head_bn: BatchNormLayer,
}

impl Net {
    fn new(vb: VarBuilder, bn: &BatchNormRewriter) -> Result<Self> {
        let conv_cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            stem: candle_nn::conv2d(2, 4, 3, conv_cfg, vb.pp("stem").pp("conv"))?,
            stem_bn: bn.batch_norm(4, 1e-5, vb.pp("stem").pp("bn"))?,
            block_bn: bn.batch_norm(4, cfg(1e-4, 0.3), vb.pp("layer1").pp("0").pp("bn1"))?,
            head_bn: bn.batch_norm(
                4,
                BatchNormConfig {
                    affine: false,
                    ..Default::default()
                },
                vb.pp("head").pp("bn"),
            )?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // Fused when converted, candle-nn's layer then `relu` when local.
        let x = self.stem_bn.forward_relu_t(&self.stem.forward(x)?, train)?;
        let x = self.block_bn.forward_add_relu_t(&x, &x, train)?;
        self.head_bn.forward_t(&x, train)
    }

    fn layers(&self) -> [&BatchNormLayer; 3] {
        [&self.stem_bn, &self.block_bn, &self.head_bn]
    }
}

fn keys(map: &VarMap) -> BTreeSet<String> {
    map.data().lock().unwrap().keys().cloned().collect()
}

/// The rewriter converts the sites its filter accepts, reports them, keeps the
/// variable names (same VarMap keys local and sync), and with world size 1 the
/// converted model computes what the local one computes, in eval and training.
#[test]
fn rewriter_converts_filtered_sites_and_keeps_checkpoints() {
    let dir = std::env::temp_dir().join(format!("candle-syncbn-convert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let mut map_local = VarMap::new();
    let rw_local = BatchNormRewriter::local(VarBuilder::from_varmap(
        &map_local,
        DType::F32,
        &Device::Cpu,
    ));
    let local = Net::new(rw_local.vb(), &rw_local).unwrap();
    assert!(local.layers().iter().all(|l| !l.is_sync()));
    assert!(rw_local.report().is_empty());
    assert_eq!(
        rw_local.kept_local(),
        ["stem.bn", "layer1.0.bn1", "head.bn"]
    );
    set_bn_vars(&mut map_local, "stem.bn", 4, 1);
    set_bn_vars(&mut map_local, "layer1.0.bn1", 4, 2);
    let mut rng = Rng::new(4);
    map_local
        .set_one("head.bn.running_mean", randn(&mut rng, &[4], 0.5, 0.2))
        .unwrap();
    let ckpt = dir.join("local.safetensors");
    map_local.save(&ckpt).unwrap();

    let mut map_sync = VarMap::new();
    let rw = BatchNormRewriter::new(
        VarBuilder::from_varmap(&map_sync, DType::F32, &Device::Cpu),
        ProcessGroup::single(),
    )
    .filter(|path| !path.starts_with("head"));
    let sync = Net::new(rw.vb(), &rw).unwrap();
    let fields = |s: &ConvertedSite| {
        (
            s.path.clone(),
            s.num_features,
            s.affine,
            s.track_running_stats,
            s.outcome,
        )
    };
    assert_eq!(
        rw.report().iter().map(fields).collect::<Vec<_>>(),
        vec![
            ("stem.bn".to_string(), 4, true, true, Outcome::Sync),
            ("layer1.0.bn1".to_string(), 4, true, true, Outcome::Sync),
        ]
    );
    assert_eq!(rw.kept_local(), ["head.bn"]);
    assert!(sync.stem_bn.is_sync() && sync.block_bn.is_sync() && !sync.head_bn.is_sync());
    let block = sync.block_bn.as_sync().unwrap();
    assert_eq!(block.name(), "layer1.0.bn1");
    assert_eq!(block.config().momentum, Some(0.3));
    assert_eq!(block.config().eps, 1e-4);
    assert!(sync.head_bn.weight_and_bias().is_none());

    // Same variable names, num_batches_tracked included, so candle's own
    // VarMap::load reads a local checkpoint into the synchronized model.
    assert_eq!(keys(&map_local), keys(&map_sync));
    assert!(keys(&map_sync).contains("head.bn.num_batches_tracked"));
    map_sync.load(&ckpt).unwrap();

    let x = randn(&mut rng, &[3, 2, 5, 4], 0.3, 1.5);
    assert_close(
        "eval output, local vs converted",
        &local.forward_t(&x, false).unwrap(),
        &sync.forward_t(&x, false).unwrap(),
        ATOL,
    );
    for step in 0..2 {
        assert_close(
            &format!("train output step {step}, local vs converted"),
            &local.forward_t(&x, true).unwrap(),
            &sync.forward_t(&x, true).unwrap(),
            1e-4,
        );
    }
    for (l, s) in local.layers().iter().zip(sync.layers()) {
        assert_eq!(l.num_features(), s.num_features());
        assert_close(
            "running_mean",
            l.running_mean().unwrap(),
            s.running_mean().unwrap(),
            1e-5,
        );
        assert_close(
            "running_var",
            l.running_var().unwrap(),
            s.running_var().unwrap(),
            1e-4,
        );
        assert_eq!(l.num_batches_tracked().unwrap(), 2);
        assert_eq!(s.num_batches_tracked().unwrap(), 2);
    }

    // And back: the synchronized model's checkpoint loads into the local one.
    let ckpt2 = dir.join("sync.safetensors");
    map_sync.save(&ckpt2).unwrap();
    let map_back = VarMap::new();
    let rw_back =
        BatchNormRewriter::local(VarBuilder::from_varmap(&map_back, DType::F32, &Device::Cpu));
    let back = Net::new(rw_back.vb(), &rw_back).unwrap();
    let mut map_back = map_back;
    map_back.load(&ckpt2).unwrap();
    assert_close(
        "eval output after sync → local checkpoint",
        &back.forward_t(&x, false).unwrap(),
        &sync.forward_t(&x, false).unwrap(),
        ATOL,
    );
    assert!(back
        .layers()
        .iter()
        .all(|l| l.num_batches_tracked().unwrap() == 2));
    std::fs::remove_dir_all(&dir).ok();
}

/// The rewriter over two in-process ranks: a model converted everywhere, each
/// rank on half the batch, gives one rank's training output on the whole batch.
#[test]
fn rewriter_synchronizes_over_two_ranks() {
    let mut rng = Rng::new(21);
    let x = randn(&mut rng, &[4, 2, 3, 3], 0.0, 1.0);
    let weights = {
        let map = VarMap::new();
        let rw = BatchNormRewriter::local(VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu));
        Net::new(rw.vb(), &rw).unwrap();
        let mut tensors = std::collections::HashMap::new();
        for (k, v) in map.data().lock().unwrap().iter() {
            tensors.insert(k.clone(), v.as_tensor().copy().unwrap());
        }
        tensors
    };
    let build = |group: ProcessGroup| {
        let map = VarMap::new();
        let rw = BatchNormRewriter::new(
            VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
            group,
        );
        let net = Net::new(rw.vb(), &rw).unwrap();
        let mut map = map;
        map.set(weights.iter()).unwrap();
        (map, net)
    };
    let (_map, single) = build(ProcessGroup::single());
    let full = single.forward_t(&x, true).unwrap();
    let results: Vec<Tensor> = std::thread::scope(|s| {
        let handles: Vec<_> = ProcessGroup::threads(2)
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(rank, group)| {
                let (x, build) = (&x, &build);
                s.spawn(move || {
                    let (_map, net) = build(group);
                    assert!(net.layers().iter().all(|l| l.is_sync()));
                    net.forward_t(&x.narrow(0, rank * 2, 2).unwrap(), true)
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let y = Tensor::cat(&results, 0).unwrap();
    assert_close("2 ranks vs 1 rank, converted model", &y, &full, 1e-4);
}

/// Bad inputs are errors naming the layer, not panics.
#[test]
fn layer_errors_do_not_panic() {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let rw = BatchNormRewriter::new(vb.clone(), ProcessGroup::single());
    let bn = rw.batch_norm(4, 1e-5, vb.pp("a.bn")).unwrap();
    let x = Tensor::zeros((2, 3, 5), DType::F32, &Device::Cpu).unwrap();
    let err = bn.forward_t(&x, true).unwrap_err().to_string();
    assert!(err.contains("a.bn") && err.contains("4 channels"), "{err}");
    // A site whose variables exist with another shape.
    let err = rw
        .batch_norm(6, 1e-5, vb.pp("a.bn"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shape mismatch") || err.contains("shape"),
        "{err}"
    );
    let local = BatchNormRewriter::local(vb.clone());
    let err = local
        .batch_norm(6, 1e-5, vb.pp("a.bn"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("shape"), "{err}");
}
