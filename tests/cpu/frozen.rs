//! `FrozenBatchNorm` and the rewriter's three outcomes: the frozen layer
//! against an f64 reference, untouched by an optimizer, the conversions from
//! trained layers, and a model mixing frozen, synchronized and local layers
//! loaded from and saved to a checkpoint with PyTorch's names.

use crate::common;

use candle::{DType, Device, Module, Tensor};
use candle_nn::{ModuleT, Optimizer, VarBuilder, VarMap};
use candle_syncbn::convert::checkpoint::{load_checkpoint, save_checkpoint, LoadOptions};
use candle_syncbn::{
    BatchNormLayer, BatchNormRewriter, FrozenBatchNorm, Outcome, ProcessGroup, SyncBatchNorm,
    SyncBatchNormConfig,
};
use common::{assert_close, reference_eval, scratch_dir, tensor, tolerance, values, Rng};

/// Bits of a tensor's values (any float dtype), for bit-for-bit comparisons.
fn bits(t: &Tensor) -> Vec<u64> {
    values(t).iter().map(|v| v.to_bits()).collect()
}

/// A VarMap holding one BatchNorm's variables under `prefix`, with random
/// statistics and parameters; returns `(mean, var, weight, bias)`.
#[allow(clippy::type_complexity)]
fn set_vars(
    varmap: &VarMap,
    prefix: &str,
    c: usize,
    seed: u64,
    dtype: DType,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut rng = Rng::new(seed);
    let mean = rng.normals(c, 0.5, 1.0);
    let var: Vec<f64> = (0..c).map(|_| 0.2 + 2.0 * rng.uniform()).collect();
    let w = rng.normals(c, 1.0, 0.5);
    let b = rng.normals(c, 0.0, 0.5);
    let stat_dtype = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let mut data = varmap.data().lock().unwrap();
    for (name, v, d) in [
        ("running_mean", &mean, stat_dtype),
        ("running_var", &var, stat_dtype),
        ("weight", &w, dtype),
        ("bias", &b, dtype),
    ] {
        let t = tensor(v, &[c], d);
        data.insert(
            format!("{prefix}.{name}"),
            candle::Var::from_tensor(&t).unwrap(),
        );
    }
    // The stored (rounded) values are what the layer uses.
    let get = |name: &str| values(data[&format!("{prefix}.{name}")].as_tensor());
    (
        get("running_mean"),
        get("running_var"),
        get("weight"),
        get("bias"),
    )
}

#[test]
fn frozen_matches_the_f64_reference_in_training_and_eval() {
    let eps = 1e-3;
    let c = 5;
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for shape in [
            vec![6, c],
            vec![3, c, 7],
            vec![2, c, 4, 3],
            vec![2, c, 2, 3, 2],
        ] {
            let varmap = VarMap::new();
            let (mean, var, w, b) = set_vars(&varmap, "bn", c, 7, dtype);
            let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
            let bn = FrozenBatchNorm::new(c, eps, vb.pp("bn")).unwrap();
            let mut rng = Rng::new(shape.len() as u64);
            let n: usize = shape.iter().product();
            let x = tensor(&rng.normals(n, 0.3, 1.5), &shape, dtype);
            let z = tensor(&rng.normals(n, 0.0, 1.0), &shape, dtype);
            let (xv, zv) = (values(&x), values(&z));
            let y_ref = reference_eval(&xv, &shape, &mean, &var, &w, &b, eps);
            let relu_ref: Vec<f64> = y_ref.iter().map(|v| v.max(0.0)).collect();
            let add_relu_ref: Vec<f64> = y_ref
                .iter()
                .zip(&zv)
                .map(|(y, z)| (y + z).max(0.0))
                .collect();
            let (atol, rtol) = tolerance(dtype);
            let what = |op: &str, train: bool| format!("{dtype:?} {shape:?} {op} train={train}");
            for train in [false, true] {
                let y = bn.forward_t(&x, train).unwrap();
                assert_eq!(y.dtype(), dtype);
                assert_close(&what("forward", train), &values(&y), &y_ref, atol, rtol);
                let y = bn.forward_relu_t(&x, train).unwrap();
                assert_close(&what("relu", train), &values(&y), &relu_ref, atol, rtol);
                let y = bn.forward_add_relu_t(&x, &z, train).unwrap();
                assert_close(
                    &what("add_relu", train),
                    &values(&y),
                    &add_relu_ref,
                    atol,
                    rtol,
                );
            }
            // Channels-last input: same numbers.
            if shape.len() == 4 {
                let xl = x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
                let xl = xl.permute((0, 3, 1, 2)).unwrap();
                let y = bn.forward_t(&xl, true).unwrap();
                assert_close(
                    &what("channels-last", true),
                    &values(&y),
                    &y_ref,
                    atol,
                    rtol,
                );
            }
            // The reported affine map is the one applied.
            let (scale, shift) = bn.scale_and_shift().unwrap();
            let (scale, shift) = (values(&scale), values(&shift));
            for k in 0..c {
                let s = w[k] / (var[k] + eps).sqrt();
                assert!((scale[k] - s).abs() <= 1e-12 * s.abs().max(1.0));
                assert!((shift[k] - (b[k] - mean[k] * s)).abs() <= 1e-12);
            }
        }
    }
}

#[test]
fn frozen_gradient_reaches_the_input_only() {
    let c = 3;
    let varmap = VarMap::new();
    let (_, var, w, _) = set_vars(&varmap, "bn", c, 11, DType::F64);
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let bn = FrozenBatchNorm::new(c, 1e-5, vb.pp("bn")).unwrap();
    let mut rng = Rng::new(3);
    let shape = [4, c, 5];
    let x =
        candle::Var::from_tensor(&tensor(&rng.normals(60, 0.0, 1.0), &shape, DType::F64)).unwrap();
    let dy = tensor(&rng.normals(60, 0.0, 1.0), &shape, DType::F64);
    // Training mode: still the fixed map, so dx = dy · weight / √(var + eps).
    let loss = (bn.forward_t(x.as_tensor(), true).unwrap() * &dy)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let dx = values(grads.get(x.as_tensor()).expect("no input gradient"));
    let dyv = values(&dy);
    let expected: Vec<f64> = common::channel_indices(&shape)
        .iter()
        .enumerate()
        .flat_map(|(ch, ix)| ix.iter().map(move |&i| (ch, i)))
        .fold(vec![0.0; 60], |mut e, (ch, i)| {
            e[i] = dyv[i] * w[ch] / (var[ch] + 1e-5).sqrt();
            e
        });
    assert_close("frozen dx", &dx, &expected, 1e-12, 1e-12);
    let data = varmap.data().lock().unwrap();
    for name in ["weight", "bias", "running_mean", "running_var"] {
        let var = &data[&format!("bn.{name}")];
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "bn.{name} got a gradient"
        );
    }
}

/// A small model: a frozen backbone BN, a synchronized neck BN and a local head BN.
struct Model {
    conv: candle_nn::Conv2d,
    backbone: BatchNormLayer,
    neck: BatchNormLayer,
    head: BatchNormLayer,
}

impl Model {
    fn new(rw: &BatchNormRewriter) -> candle::Result<Self> {
        let vb = rw.vb();
        Ok(Self {
            conv: candle_nn::conv2d(2, 4, 3, Default::default(), vb.pp("conv"))?,
            backbone: rw.batch_norm(4, 1e-5, vb.pp("backbone").pp("bn1"))?,
            neck: rw.batch_norm(4, 1e-5, vb.pp("neck").pp("bn"))?,
            head: rw.batch_norm(4, 1e-5, vb.pp("head").pp("bn"))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle::Result<Tensor> {
        let h = self.conv.forward(x)?;
        let h = self.backbone.forward_relu_t(&h, train)?;
        let h = self.neck.forward_add_relu_t(&h, &h, train)?;
        self.head.forward_t(&h, train)
    }
}

/// The rule detection configs use: frozen backbone, synchronized neck, local head.
fn rule(path: &str) -> Outcome {
    if path.starts_with("backbone") {
        Outcome::Frozen
    } else if path.starts_with("head") {
        Outcome::Local
    } else {
        Outcome::Sync
    }
}

#[test]
fn optimizer_steps_leave_frozen_layers_bit_identical() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    set_vars(&varmap, "backbone.bn1", 4, 5, DType::F32);
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let rw = BatchNormRewriter::new(vb, ProcessGroup::single()).rule(rule);
    let model = Model::new(&rw).unwrap();
    let frozen = model.backbone.as_frozen().expect("backbone is frozen");
    let snapshot = |varmap: &VarMap| -> Vec<(String, Vec<u64>)> {
        let data = varmap.data().lock().unwrap();
        let mut v: Vec<_> = data
            .iter()
            .filter(|(k, _)| k.starts_with("backbone"))
            .map(|(k, v)| (k.clone(), bits(v.as_tensor())))
            .collect();
        v.sort();
        v
    };
    let before = snapshot(&varmap);
    assert_eq!(before.len(), 5, "weight, bias, running stats and counter");
    let layer_before: Vec<Vec<u64>> = vec![
        bits(frozen.weight_and_bias().unwrap().0),
        bits(frozen.weight_and_bias().unwrap().1),
        bits(frozen.running_mean().unwrap()),
        bits(frozen.running_var().unwrap()),
    ];
    let neck_w = bits(model.neck.weight_and_bias().unwrap().0);
    let mut sgd = candle_nn::SGD::new(varmap.all_vars(), 0.5).unwrap();
    let mut adamw = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = Rng::new(9);
    for step in 0..3 {
        let x = tensor(
            &rng.normals(2 * 2 * 36, 0.0, 1.0),
            &[2, 2, 6, 6],
            DType::F32,
        );
        let loss = model
            .forward_t(&x, true)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        if step % 2 == 0 {
            sgd.step(&grads).unwrap();
        } else {
            adamw.step(&grads).unwrap();
        }
    }
    assert_eq!(snapshot(&varmap), before, "the VarMap's frozen variables");
    let layer_after: Vec<Vec<u64>> = vec![
        bits(frozen.weight_and_bias().unwrap().0),
        bits(frozen.weight_and_bias().unwrap().1),
        bits(frozen.running_mean().unwrap()),
        bits(frozen.running_var().unwrap()),
    ];
    assert_eq!(layer_after, layer_before, "the frozen layer's tensors");
    // The step did train: the synchronized layer's weight moved.
    assert_ne!(bits(model.neck.weight_and_bias().unwrap().0), neck_w);
    assert_eq!(model.neck.num_batches_tracked().unwrap(), 3);
    assert_eq!(model.head.num_batches_tracked().unwrap(), 3);
}

#[test]
fn three_outcomes_load_and_save_pytorch_named_checkpoints() {
    let dir = scratch_dir("frozen-ckpt");
    let dev = Device::Cpu;
    // A checkpoint with PyTorch's names, counters included (i64), as a
    // BatchNorm2d state dict has them.
    let source = VarMap::new();
    let mut expected = std::collections::HashMap::new();
    for (k, prefix) in ["backbone.bn1", "neck.bn", "head.bn"].iter().enumerate() {
        let (m, v, w, b) = set_vars(&source, prefix, 4, 20 + k as u64, DType::F32);
        expected.insert(prefix.to_string(), (m, v, w, b));
    }
    {
        let mut data = source.data().lock().unwrap();
        for prefix in ["backbone.bn1", "neck.bn", "head.bn"] {
            let nbt = Tensor::new(1234i64, &dev).unwrap();
            data.insert(
                format!("{prefix}.num_batches_tracked"),
                candle::Var::from_tensor(&nbt).unwrap(),
            );
        }
        let mut rng = Rng::new(1);
        for (name, shape) in [("conv.weight", vec![4, 2, 3, 3]), ("conv.bias", vec![4])] {
            let n = shape.iter().product();
            let t = tensor(&rng.normals(n, 0.0, 0.3), &shape, DType::F32);
            data.insert(name.into(), candle::Var::from_tensor(&t).unwrap());
        }
    }
    let path = dir.join("model.safetensors");
    source.save(&path).unwrap();

    // Build first, load after (the usual order): the frozen layer sees the file.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let rw = BatchNormRewriter::new(vb, ProcessGroup::single()).rule(rule);
    let model = Model::new(&rw).unwrap();
    let report = load_checkpoint(&varmap, &path, &LoadOptions::default()).unwrap();
    assert_eq!(report.loaded.len(), 2 + 3 * 5, "{report:?}");
    let outcomes: Vec<(String, Outcome)> = rw
        .sites()
        .into_iter()
        .map(|s| (s.path, s.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("backbone.bn1".to_string(), Outcome::Frozen),
            ("neck.bn".to_string(), Outcome::Sync),
            ("head.bn".to_string(), Outcome::Local),
        ]
    );
    let converted: Vec<(String, Outcome)> = rw
        .report()
        .into_iter()
        .map(|s| (s.path, s.outcome))
        .collect();
    assert_eq!(converted, outcomes[..2]);
    assert_eq!(rw.kept_local(), ["head.bn"]);
    assert!(model.backbone.is_frozen() && model.neck.is_sync() && !model.head.is_sync());

    // Every layer holds the file's numbers.
    for (layer, prefix) in [
        (&model.backbone, "backbone.bn1"),
        (&model.neck, "neck.bn"),
        (&model.head, "head.bn"),
    ] {
        let (m, v, w, b) = &expected[prefix];
        assert_eq!(&values(layer.running_mean().unwrap()), m, "{prefix}");
        assert_eq!(&values(layer.running_var().unwrap()), v, "{prefix}");
        let (lw, lb) = layer.weight_and_bias().unwrap();
        assert_eq!((&values(lw), &values(lb)), (w, b), "{prefix}");
    }
    assert_eq!(model.neck.num_batches_tracked().unwrap(), 1234);
    let frozen = model.backbone.as_frozen().unwrap();
    let (m, v, w, b) = &expected["backbone.bn1"];
    let mut rng = Rng::new(2);
    let x = tensor(&rng.normals(2 * 4 * 9, 0.0, 1.0), &[2, 4, 3, 3], DType::F32);
    let y_ref = reference_eval(&values(&x), &[2, 4, 3, 3], m, v, w, b, 1e-5);
    assert_close(
        "frozen after load",
        &values(&frozen.forward(&x).unwrap()),
        &y_ref,
        2e-5,
        2e-5,
    );

    // Train a step (the frozen layer stays), save with PyTorch's names, load
    // into the plain local model: same numbers, frozen ones as in the file.
    let x = tensor(
        &rng.normals(2 * 2 * 36, 0.0, 1.0),
        &[2, 2, 6, 6],
        DType::F32,
    );
    let mut sgd = candle_nn::SGD::new(varmap.all_vars(), 0.1).unwrap();
    let loss = model
        .forward_t(&x, true)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    sgd.step(&loss.backward().unwrap()).unwrap();
    let saved = dir.join("saved.safetensors");
    save_checkpoint(&varmap, &saved).unwrap();
    let names = candle::safetensors::load(&saved, &dev).unwrap();
    for prefix in ["backbone.bn1", "neck.bn", "head.bn"] {
        for name in [
            "weight",
            "bias",
            "running_mean",
            "running_var",
            "num_batches_tracked",
        ] {
            assert!(
                names.contains_key(&format!("{prefix}.{name}")),
                "{prefix}.{name}"
            );
        }
    }
    assert_eq!(
        names["backbone.bn1.num_batches_tracked"].dtype(),
        DType::I64
    );
    assert_eq!(
        names["backbone.bn1.num_batches_tracked"]
            .to_scalar::<i64>()
            .unwrap(),
        1234,
        "the frozen layer's counter is kept as loaded"
    );
    assert_eq!(values(&names["backbone.bn1.running_mean"]), *m);
    assert_eq!(values(&names["backbone.bn1.weight"]), *w);
    let plain = VarMap::new();
    let rw_local = BatchNormRewriter::local(VarBuilder::from_varmap(&plain, DType::F32, &dev));
    let reloaded = Model::new(&rw_local).unwrap();
    assert!(rw_local.report().is_empty());
    load_checkpoint(&plain, &saved, &LoadOptions::default()).unwrap();
    for (a, b) in [
        (&model.backbone, &reloaded.backbone),
        (&model.neck, &reloaded.neck),
        (&model.head, &reloaded.head),
    ] {
        assert_eq!(
            bits(a.running_mean().unwrap()),
            bits(b.running_mean().unwrap())
        );
        assert_eq!(
            bits(a.running_var().unwrap()),
            bits(b.running_var().unwrap())
        );
        assert_eq!(
            bits(a.weight_and_bias().unwrap().0),
            bits(b.weight_and_bias().unwrap().0)
        );
    }
    // The local rewriter with the same rule freezes too (freezing needs no group).
    let again = VarMap::new();
    let rw_rule =
        BatchNormRewriter::local(VarBuilder::from_varmap(&again, DType::F32, &dev)).rule(rule);
    let m2 = Model::new(&rw_rule).unwrap();
    assert!(m2.backbone.is_frozen() && !m2.neck.is_sync() && !m2.neck.is_frozen());
}

#[test]
fn conversions_from_trained_layers_are_snapshots() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let sync = SyncBatchNorm::new(
        3,
        SyncBatchNormConfig::default(),
        vb.pp("bn"),
        ProcessGroup::single(),
    )
    .unwrap();
    let local = candle_nn::batch_norm(3, 1e-3, vb.pp("local")).unwrap();
    let mut rng = Rng::new(4);
    let batch = |rng: &mut Rng| tensor(&rng.normals(4 * 3 * 5, 1.0, 2.0), &[4, 3, 5], DType::F32);
    for _ in 0..3 {
        sync.forward_t(&batch(&mut rng), true).unwrap();
        local.forward_t(&batch(&mut rng), true).unwrap();
    }
    let frozen = sync.to_frozen().unwrap();
    let frozen_local = FrozenBatchNorm::from_batch_norm(&local).unwrap();
    let x = batch(&mut rng);
    // Bit for bit the source layer's eval output (same kernels, same numbers).
    let want = bits(&sync.forward_t(&x, false).unwrap());
    assert_eq!(bits(&frozen.forward_t(&x, true).unwrap()), want);
    let want_local = values(&local.forward_t(&x, false).unwrap());
    assert_close(
        "from_batch_norm vs candle-nn eval",
        &values(&frozen_local.forward_t(&x, true).unwrap()),
        &want_local,
        1e-5,
        1e-5,
    );
    // More training of the sources does not reach the copies.
    for _ in 0..2 {
        sync.forward_t(&batch(&mut rng), true).unwrap();
        local.forward_t(&batch(&mut rng), true).unwrap();
    }
    assert_eq!(bits(&frozen.forward_t(&x, false).unwrap()), want);
    assert_close(
        "from_batch_norm after more training of the source",
        &values(&frozen_local.forward_t(&x, false).unwrap()),
        &want_local,
        1e-5,
        1e-5,
    );
    assert_ne!(bits(&sync.forward_t(&x, false).unwrap()), want);
}

#[test]
fn frozen_errors_name_the_layer() {
    let dev = Device::Cpu;
    let vb = VarBuilder::zeros(DType::F32, &dev);
    let untracked = SyncBatchNorm::new(
        3,
        SyncBatchNormConfig::default().with_track_running_stats(false),
        vb.pp("stem.bn"),
        ProcessGroup::single(),
    )
    .unwrap();
    let err = untracked.to_frozen().unwrap_err().to_string();
    assert!(
        err.contains("'stem.bn'") && err.contains("track_running_stats: false"),
        "{err}"
    );
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let bn = FrozenBatchNorm::new(3, 1e-5, vb.pp("backbone.bn1")).unwrap();
    assert_eq!(bn.name(), "backbone.bn1");
    let x = Tensor::zeros((2, 4, 3), DType::F32, &dev).unwrap();
    let err = bn.forward(&x).unwrap_err().to_string();
    assert!(
        err.contains("backbone.bn1") && err.contains("expected 3 channels"),
        "{err}"
    );
    let cfg = SyncBatchNormConfig::default().with_track_running_stats(false);
    let err = FrozenBatchNorm::new(3, cfg, vb.pp("b2"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'b2'") && err.contains("track_running_stats: false"),
        "{err}"
    );
    // remove_mean: false (candle-nn's configuration) at a frozen site.
    let cfg = candle_nn::BatchNormConfig {
        remove_mean: false,
        ..Default::default()
    };
    let rw = candle_syncbn::BatchNormRewriter::new(vb.clone(), ProcessGroup::single())
        .rule(|_| candle_syncbn::Outcome::Frozen);
    let err = rw.batch_norm(3, cfg, vb.pp("b2")).unwrap_err().to_string();
    assert!(
        err.contains("'b2'") && err.contains("remove_mean: false"),
        "{err}"
    );
    // A checkpoint without some variable is an error naming it.
    let empty: std::collections::HashMap<String, Tensor> = Default::default();
    let vb = VarBuilder::from_tensors(empty, DType::F32, &dev);
    let err = FrozenBatchNorm::new(3, 1e-5, vb.pp("b3"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("b3.weight"), "{err}");
    // num_batches_tracked is accepted and ignored, whatever its shape or dtype.
    let mut file = std::collections::HashMap::new();
    for (name, v) in [
        ("weight", 2.0f32),
        ("bias", 0.5),
        ("running_mean", 1.0),
        ("running_var", 4.0),
    ] {
        file.insert(format!("b4.{name}"), Tensor::new(&[v; 3], &dev).unwrap());
    }
    file.insert(
        "b4.num_batches_tracked".into(),
        Tensor::new(&[7f32, 8.0], &dev).unwrap(),
    );
    let vb = VarBuilder::from_tensors(file, DType::F32, &dev);
    let bn = FrozenBatchNorm::new(3, 0.0, vb.pp("b4")).unwrap();
    let x = Tensor::new(&[[3f32, 1.0, -1.0]], &dev).unwrap();
    // (x − 1)/2·2 + 0.5
    assert_eq!(
        bn.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
        [[2.5f32, 0.5, -1.5]]
    );
}
