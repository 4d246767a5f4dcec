//! Agreement with candle-nn's BatchNorm, and variables under PyTorch's names.

use crate::common;

use candle::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use common::*;

#[test]
fn agrees_with_candle_nn_batch_norm_in_train_and_eval() {
    let dev = Device::Cpu;
    let shape = [4usize, 3, 5, 6];
    let mut rng = Rng::new(3);
    let cfg = candle_nn::BatchNormConfig {
        eps: 1e-5,
        momentum: 0.2,
        affine: true,
        remove_mean: true,
    };
    let vm_nn = VarMap::new();
    let nn_bn =
        candle_nn::batch_norm(3, cfg, VarBuilder::from_varmap(&vm_nn, DType::F32, &dev)).unwrap();
    let vm_sync = VarMap::new();
    let sync_bn = SyncBatchNorm::new(
        3,
        SyncBatchNormConfig::try_from(cfg).unwrap(),
        VarBuilder::from_varmap(&vm_sync, DType::F32, &dev),
        ProcessGroup::single(),
    )
    .unwrap();
    let w = tensor(&[0.5, 1.5, -1.0], &[3], DType::F32);
    let b = tensor(&[0.1, -0.2, 0.3], &[3], DType::F32);
    for bn_wb in [
        nn_bn.weight_and_bias().unwrap(),
        sync_bn.weight_and_bias().unwrap(),
    ] {
        Var::from_tensor(bn_wb.0).unwrap().set(&w).unwrap();
        Var::from_tensor(bn_wb.1).unwrap().set(&b).unwrap();
    }
    for step in 0..3 {
        let x = Var::from_tensor(&tensor(
            &rng.normals(360, step as f64, 2.0),
            &shape,
            DType::F32,
        ))
        .unwrap();
        let g = tensor(&rng.normals(360, 0.0, 1.0), &shape, DType::F32);
        let y_nn = nn_bn.forward_t(x.as_tensor(), true).unwrap();
        let y_sync = sync_bn.forward_t(x.as_tensor(), true).unwrap();
        assert_close("train output", &values(&y_sync), &values(&y_nn), 2e-5, 2e-5);
        let gr_nn = (&y_nn * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gr_sync = (&y_sync * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_close(
            "input gradient",
            &values(gr_sync.get(x.as_tensor()).unwrap()),
            &values(gr_nn.get(x.as_tensor()).unwrap()),
            1e-4,
            1e-4,
        );
        let (wn, bn_) = nn_bn.weight_and_bias().unwrap();
        let (ws, bs) = sync_bn.weight_and_bias().unwrap();
        assert_close(
            "weight gradient",
            &values(gr_sync.get(ws).unwrap()),
            &values(gr_nn.get(wn).unwrap()),
            1e-3,
            1e-4,
        );
        assert_close(
            "bias gradient",
            &values(gr_sync.get(bs).unwrap()),
            &values(gr_nn.get(bn_).unwrap()),
            1e-3,
            1e-4,
        );
        assert_close(
            "running mean",
            &values(sync_bn.running_mean().unwrap()),
            &values(nn_bn.running_mean()),
            1e-6,
            1e-6,
        );
        assert_close(
            "running var",
            &values(sync_bn.running_var().unwrap()),
            &values(nn_bn.running_var()),
            1e-6,
            1e-6,
        );
    }
    let x = tensor(&rng.normals(360, 0.3, 1.0), &shape, DType::F32);
    assert_close(
        "eval output",
        &values(&sync_bn.forward_t(&x, false).unwrap()),
        &values(&nn_bn.forward_t(&x, false).unwrap()),
        2e-5,
        2e-5,
    );
}

#[test]
fn variables_live_in_the_var_map_under_pytorch_names() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let bn = SyncBatchNorm::new(
        2,
        SyncBatchNormConfig::default(),
        vb.pp("layer1").pp("bn"),
        ProcessGroup::single(),
    )
    .unwrap();
    let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "bias",
            "num_batches_tracked",
            "running_mean",
            "running_var",
            "weight"
        ]
        .map(|n| format!("layer1.bn.{n}"))
    );
    let x = tensor(&[1.0, 2.0, 3.0, 5.0, 8.0, 13.0], &[3, 2], DType::F32);
    bn.forward_t(&x, true).unwrap();
    bn.forward_t(&x, true).unwrap();
    let data = varmap.data().lock().unwrap();
    let nbt = data.get("layer1.bn.num_batches_tracked").unwrap();
    assert_eq!(nbt.dtype(), DType::I64);
    assert_eq!(nbt.dims(), &[] as &[usize]);
    assert_eq!(nbt.to_scalar::<i64>().unwrap(), 2);
    let rm = values(data.get("layer1.bn.running_mean").unwrap());
    // mean of channel 0 is (1+3+8)/3 = 4, two updates with momentum 0.1.
    assert!(
        (rm[0] - (1.0 - 0.9f64.powi(2)) * 4.0).abs() < 1e-6,
        "{rm:?}"
    );
}

#[test]
fn checkpoints_save_and_load_with_running_stats() {
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("syncbn-compat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bn.safetensors");
    let x = tensor(
        &[1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0],
        &[4, 2],
        DType::F32,
    );
    let (rm, rv, y_eval) = {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let bn = SyncBatchNorm::new(
            2,
            SyncBatchNormConfig::default().with_momentum(None),
            vb.pp("bn"),
            ProcessGroup::single(),
        )
        .unwrap();
        for _ in 0..3 {
            bn.forward_t(&(&x * 1.5).unwrap(), true).unwrap();
        }
        varmap.save(&path).unwrap();
        (
            values(bn.running_mean().unwrap()),
            values(bn.running_var().unwrap()),
            values(&bn.forward_t(&x, false).unwrap()),
        )
    };
    // Loaded read-only from the file ...
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &dev).unwrap() };
    let bn = SyncBatchNorm::new(
        2,
        SyncBatchNormConfig::default(),
        vb.pp("bn"),
        ProcessGroup::single(),
    )
    .unwrap();
    assert_eq!(values(bn.running_mean().unwrap()), rm);
    assert_eq!(values(bn.running_var().unwrap()), rv);
    assert_eq!(bn.num_batches_tracked().unwrap(), 3);
    assert_eq!(values(&bn.forward_t(&x, false).unwrap()), y_eval);
    // ... and into a VarMap for further training.
    let mut varmap = VarMap::new();
    let bn = SyncBatchNorm::new(
        2,
        SyncBatchNormConfig::default(),
        VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("bn"),
        ProcessGroup::single(),
    )
    .unwrap();
    varmap.load(&path).unwrap();
    assert_eq!(bn.num_batches_tracked().unwrap(), 3);
    assert_eq!(values(&bn.forward_t(&x, false).unwrap()), y_eval);
    // A candle-nn checkpoint has no num_batches_tracked: the counter starts at 0.
    let nn_map = VarMap::new();
    candle_nn::batch_norm(
        2,
        1e-5,
        VarBuilder::from_varmap(&nn_map, DType::F32, &dev).pp("bn"),
    )
    .unwrap();
    let nn_path = dir.join("nn.safetensors");
    nn_map.save(&nn_path).unwrap();
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&nn_path], DType::F32, &dev).unwrap() };
    let bn = SyncBatchNorm::new(
        2,
        SyncBatchNormConfig::default(),
        vb.pp("bn"),
        ProcessGroup::single(),
    )
    .unwrap();
    assert_eq!(bn.num_batches_tracked().unwrap(), 0);
    bn.forward_t(&x, true).unwrap();
    assert_eq!(bn.num_batches_tracked().unwrap(), 1);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn config_conversions() {
    assert_eq!(
        SyncBatchNormConfig::default(),
        SyncBatchNormConfig::default()
            .with_eps(1e-5)
            .with_momentum(Some(0.1))
            .with_affine(true)
            .with_track_running_stats(true)
    );
    assert_eq!(SyncBatchNormConfig::from(1e-3).eps, 1e-3);
    let c: SyncBatchNormConfig = candle_nn::BatchNormConfig {
        eps: 2e-5,
        remove_mean: true,
        affine: false,
        momentum: 0.3,
    }
    .try_into()
    .unwrap();
    assert_eq!(
        c,
        SyncBatchNormConfig::default()
            .with_eps(2e-5)
            .with_momentum(Some(0.3))
            .with_affine(false)
            .with_track_running_stats(true)
    );
    // `remove_mean: false` has no synchronized equivalent: an error, not a
    // configuration that silently subtracts the mean.
    let keep_mean = candle_nn::BatchNormConfig {
        remove_mean: false,
        ..Default::default()
    };
    let err = SyncBatchNormConfig::try_from(keep_mean)
        .unwrap_err()
        .to_string();
    assert!(err.contains("remove_mean: false"), "{err}");
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
}

/// `reset_running_stats()` and `reset_parameters()` mean what PyTorch's do,
/// written in place where the `VarMap` (and so a checkpoint) sees them.
#[test]
fn reset_running_stats_and_parameters_as_pytorch() {
    use candle_nn::Optimizer;
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let bn = SyncBatchNorm::new(
        3,
        SyncBatchNormConfig::default(),
        VarBuilder::from_varmap(&vm, DType::F32, &dev).pp("bn"),
        ProcessGroup::single(),
    )
    .unwrap();
    let x = Tensor::randn(2f32, 3.0, (4, 3, 5), &dev).unwrap();
    let mut opt = candle_nn::SGD::new(vm.all_vars(), 0.5).unwrap();
    for _ in 0..2 {
        let loss = (bn.forward_t(&x, true).unwrap() * &x)
            .unwrap()
            .sum_all()
            .unwrap();
        opt.backward_step(&loss).unwrap();
    }
    let vec = |name: &str| -> Vec<f32> {
        let data = vm.data().lock().unwrap();
        data[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(bn.num_batches_tracked().unwrap(), 2);
    assert!(vec("bn.running_mean").iter().all(|&m| m != 0.0));
    assert!(vec("bn.weight").iter().any(|&w| w != 1.0));

    bn.reset_running_stats().unwrap();
    assert_eq!(vec("bn.running_mean"), [0.0; 3]);
    assert_eq!(vec("bn.running_var"), [1.0; 3]);
    assert_eq!(bn.num_batches_tracked().unwrap(), 0);
    assert!(vec("bn.weight").iter().any(|&w| w != 1.0), "weights kept");

    bn.reset_parameters().unwrap();
    assert_eq!(vec("bn.weight"), [1.0; 3]);
    assert_eq!(vec("bn.bias"), [0.0; 3]);
    // The layer computes with what it was reset to: a fresh layer's output.
    let fresh = SyncBatchNorm::new(
        3,
        SyncBatchNormConfig::default(),
        VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev),
        ProcessGroup::single(),
    )
    .unwrap();
    let (a, b) = (
        bn.forward_t(&x, true).unwrap(),
        fresh.forward_t(&x, true).unwrap(),
    );
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);

    // Parameters that are not variables cannot be reset in place: an error
    // naming the layer, and nothing changes.
    let tensors = std::collections::HashMap::from([
        (
            "bn.weight".to_string(),
            Tensor::full(2f32, 3, &dev).unwrap(),
        ),
        ("bn.bias".to_string(), Tensor::full(3f32, 3, &dev).unwrap()),
        (
            "bn.running_mean".to_string(),
            Tensor::full(4f32, 3, &dev).unwrap(),
        ),
        (
            "bn.running_var".to_string(),
            Tensor::full(5f32, 3, &dev).unwrap(),
        ),
    ]);
    let from_file = SyncBatchNorm::new(
        3,
        SyncBatchNormConfig::default(),
        VarBuilder::from_tensors(tensors, DType::F32, &dev).pp("bn"),
        ProcessGroup::single(),
    )
    .unwrap();
    let err = from_file.reset_parameters().unwrap_err().to_string();
    assert!(
        err.contains("'bn'") && err.contains("weight is not a variable"),
        "{err}"
    );
    let mean = from_file.running_mean().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(mean, [4.0; 3]);
}

/// A counter that does not hold one whole number ≥ 0 (a hand-edited or
/// corrupt checkpoint) is an error naming the layer, not a count of 0.
#[test]
fn unreadable_counters_are_errors_not_zero() {
    let dev = Device::Cpu;
    for (counter, what) in [
        (Tensor::new(-3i64, &dev).unwrap(), "-3"),
        (Tensor::new(-1e9f32, &dev).unwrap(), "-1e9"),
    ] {
        let tensors = std::collections::HashMap::from([
            (
                "bn.weight".to_string(),
                Tensor::ones(2, DType::F32, &dev).unwrap(),
            ),
            (
                "bn.bias".to_string(),
                Tensor::zeros(2, DType::F32, &dev).unwrap(),
            ),
            (
                "bn.running_mean".to_string(),
                Tensor::zeros(2, DType::F32, &dev).unwrap(),
            ),
            (
                "bn.running_var".to_string(),
                Tensor::ones(2, DType::F32, &dev).unwrap(),
            ),
            ("bn.num_batches_tracked".to_string(), counter),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let cfg = SyncBatchNormConfig::default();
        let bn = SyncBatchNorm::new(2, cfg, vb.pp("bn"), ProcessGroup::single()).unwrap();
        let err = bn.num_batches_tracked().unwrap_err().to_string();
        assert!(
            err.contains("SyncBatchNorm 'bn'")
                && err.contains("num_batches_tracked must hold one whole number"),
            "{what}: {err}"
        );
    }
}
