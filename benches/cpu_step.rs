//! Criterion benchmark of one training step (forward + backward through candle's
//! autograd) on the CPU: SyncBatchNorm against candle-nn's BatchNorm, and
//! batch norm + ReLU (+ residual) fused against the same as separate ops.

use candle::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use criterion::{criterion_group, criterion_main, Criterion};

fn training_step(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("train_fwd_bwd_32x64x56x56_f32");
    group.sample_size(10);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (32, 64, 56, 56), &dev).unwrap()).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let bn = SyncBatchNorm::new(
        64,
        SyncBatchNormConfig::default(),
        vb,
        ProcessGroup::single(),
    )
    .unwrap();
    group.bench_function("candle_syncbn", |b| {
        b.iter(|| {
            bn.forward_t(x.as_tensor(), true)
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    let nn_map = VarMap::new();
    let nn_bn = candle_nn::batch_norm(64, 1e-5, VarBuilder::from_varmap(&nn_map, DType::F32, &dev))
        .unwrap();
    group.bench_function("candle_nn", |b| {
        b.iter(|| {
            nn_bn
                .forward_t(x.as_tensor(), true)
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    group.finish();
}

fn relu_steps(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("relu_train_fwd_bwd_32x64x56x56_f32");
    group.sample_size(10);
    let randn =
        || Var::from_tensor(&Tensor::randn(0f32, 1.0, (32, 64, 56, 56), &dev).unwrap()).unwrap();
    let (x, z) = (randn(), randn());
    let (x, z) = (x.as_tensor(), z.as_tensor());
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let bn = SyncBatchNorm::new(
        64,
        SyncBatchNormConfig::default(),
        vb,
        ProcessGroup::single(),
    )
    .unwrap();
    group.bench_function("relu_fused", |b| {
        b.iter(|| bn.forward_relu_t(x, true).unwrap().backward().unwrap())
    });
    group.bench_function("relu_separate", |b| {
        b.iter(|| {
            bn.forward_t(x, true)
                .unwrap()
                .relu()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    group.bench_function("add_relu_fused", |b| {
        b.iter(|| {
            bn.forward_add_relu_t(x, z, true)
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    group.bench_function("add_relu_separate", |b| {
        b.iter(|| {
            (bn.forward_t(x, true).unwrap() + z)
                .unwrap()
                .relu()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, training_step, relu_steps);
criterion_main!(benches);
