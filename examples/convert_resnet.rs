//! Converting a small ResNet-style model written with `candle_nn::batch_norm`
//! to synchronized BatchNorm with the `BatchNormRewriter`.
//!
//! 1. Build the model as it was (every BatchNorm is `candle_nn::batch_norm`),
//!    train it a little on one process and save a checkpoint.
//! 2. Build it again through a rewriter that synchronizes every BatchNorm but
//!    the head's, load the same checkpoint, and compare eval outputs.
//! 3. Train a few synchronized steps on 2 in-process ranks (one thread each,
//!    half the batch each, gradients averaged), and check them against one
//!    process training on the whole batch.
//!
//! Run with `cargo run --release --example convert_resnet`.

use anyhow::{ensure, Result};
use candle::{DType, Device, Module, ModuleT, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder, VarMap};
use candle_syncbn::convert::checkpoint::{load_checkpoint, save_checkpoint, LoadOptions};
use candle_syncbn::data_parallel::average_gradients;
use candle_syncbn::{BatchNormLayer, BatchNormRewriter, ProcessGroup};

// --- The model -------------------------------------------------------------
//
// Written like any candle-nn model. The conversion changed three things:
// the constructors take `bn: &BatchNormRewriter`, `candle_nn::batch_norm(..)`
// became `bn.batch_norm(..)` (same arguments), and the BatchNorm fields have
// the type `BatchNormLayer` instead of `candle_nn::BatchNorm`. Optionally (a
// fourth change, made here), `bn(..)` followed by `relu` or by `+ shortcut`
// and `relu` became `forward_relu_t` / `forward_add_relu_t`: one op each on
// the synchronized layers, the same ops as before on those kept local.

struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNormLayer,
    conv2: Conv2d,
    bn2: BatchNormLayer,
    downsample: Option<(Conv2d, BatchNormLayer)>,
}

fn conv3x3(c_in: usize, c_out: usize, stride: usize, vb: VarBuilder) -> candle::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    candle_nn::conv2d_no_bias(c_in, c_out, 3, cfg, vb)
}

impl BasicBlock {
    fn new(
        c_in: usize,
        c_out: usize,
        stride: usize,
        vb: VarBuilder,
        bn: &BatchNormRewriter,
    ) -> candle::Result<Self> {
        let downsample = if stride != 1 || c_in != c_out {
            let cfg = Conv2dConfig {
                stride,
                ..Default::default()
            };
            let conv = candle_nn::conv2d_no_bias(c_in, c_out, 1, cfg, vb.pp("downsample.0"))?;
            // was: candle_nn::batch_norm(c_out, 1e-5, vb.pp("downsample.1"))?
            Some((conv, bn.batch_norm(c_out, 1e-5, vb.pp("downsample.1"))?))
        } else {
            None
        };
        Ok(Self {
            conv1: conv3x3(c_in, c_out, stride, vb.pp("conv1"))?,
            bn1: bn.batch_norm(c_out, 1e-5, vb.pp("bn1"))?,
            conv2: conv3x3(c_out, c_out, 1, vb.pp("conv2"))?,
            bn2: bn.batch_norm(c_out, 1e-5, vb.pp("bn2"))?,
            downsample,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle::Result<Tensor> {
        // was: self.bn1.forward_t(..)?.relu()?
        let y = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward_t(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        // was: (self.bn2.forward_t(..)? + shortcut)?.relu()
        self.bn2
            .forward_add_relu_t(&self.conv2.forward(&y)?, &shortcut, train)
    }
}

struct ResNet {
    stem: Conv2d,
    stem_bn: BatchNormLayer,
    blocks: Vec<BasicBlock>,
    head_bn: BatchNormLayer,
    fc: Linear,
}

impl ResNet {
    fn new(vb: VarBuilder, bn: &BatchNormRewriter) -> candle::Result<Self> {
        Ok(Self {
            stem: conv3x3(3, 8, 1, vb.pp("conv1"))?,
            stem_bn: bn.batch_norm(8, 1e-5, vb.pp("bn1"))?,
            blocks: vec![
                BasicBlock::new(8, 8, 1, vb.pp("layer1.0"), bn)?,
                BasicBlock::new(8, 16, 2, vb.pp("layer2.0"), bn)?,
            ],
            head_bn: bn.batch_norm(16, 1e-5, vb.pp("head.bn"))?,
            fc: candle_nn::linear(16, 4, vb.pp("head.fc"))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle::Result<Tensor> {
        let mut x = self.stem_bn.forward_relu_t(&self.stem.forward(x)?, train)?;
        for block in &self.blocks {
            x = block.forward_t(&x, train)?;
        }
        let pooled = x.mean(D::Minus1)?.mean(D::Minus1)?; // (N, 16)
        self.fc.forward(&self.head_bn.forward_t(&pooled, train)?)
    }
}

// --- Data and training ------------------------------------------------------

/// A deterministic toy batch: images whose class is the quadrant holding a bright blob.
fn batch(step: usize, n: usize) -> candle::Result<(Tensor, Tensor)> {
    let dev = Device::Cpu;
    let mut xs = vec![0f32; n * 3 * 16 * 16];
    let mut ys = vec![0u32; n];
    let mut s = (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut rand = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    for (i, y) in ys.iter_mut().enumerate() {
        let class = (i + step) % 4;
        *y = class as u32;
        let (r0, c0) = (8 * (class / 2), 8 * (class % 2));
        for c in 0..3 {
            for r in 0..16 {
                for col in 0..16 {
                    let blob = (r0..r0 + 8).contains(&r) && (c0..c0 + 8).contains(&col);
                    let v = rand() - 0.5 + if blob { 1.5 } else { 0.0 };
                    xs[((i * 3 + c) * 16 + r) * 16 + col] = v;
                }
            }
        }
    }
    Ok((
        Tensor::from_vec(xs, (n, 3, 16, 16), &dev)?,
        Tensor::from_vec(ys, n, &dev)?,
    ))
}

/// One data-parallel SGD step: local loss, gradients averaged over the group
/// (bucketed all-reduces in name order), update.
/// Returns the local loss.
fn sgd_step(
    model: &ResNet,
    varmap: &VarMap,
    group: &ProcessGroup,
    x: &Tensor,
    y: &Tensor,
    lr: f64,
) -> candle::Result<f32> {
    let loss = candle_nn::loss::cross_entropy(&model.forward_t(x, true)?, y)?;
    let mut grads = loss.backward()?;
    average_gradients(varmap, &mut grads, group)?;
    for var in varmap.all_vars() {
        if let Some(g) = grads.get(&var) {
            var.set(&(var.as_tensor() - (g * lr)?)?)?;
        }
    }
    loss.to_scalar::<f32>()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle::Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("candle-syncbn-convert-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ckpt = dir.join("resnet.safetensors");

    // 1. The original model: plain candle-nn BatchNorm everywhere.
    let original_map = VarMap::new();
    let original_rw =
        BatchNormRewriter::local(VarBuilder::from_varmap(&original_map, DType::F32, &dev));
    let original = ResNet::new(original_rw.vb(), &original_rw)?;
    println!(
        "original model: {} BatchNorm layers, all candle_nn::BatchNorm",
        original_rw.kept_local().len()
    );
    for step in 0..3 {
        let (x, y) = batch(100 + step, 8)?;
        let loss = sgd_step(
            &original,
            &original_map,
            &ProcessGroup::single(),
            &x,
            &y,
            0.1,
        )?;
        println!("  local pre-training step {step}: loss {loss:.4}");
    }
    save_checkpoint(&original_map, &ckpt)?;

    // 2. Converted by the rewriter (head kept local), same checkpoint.
    let converted_map = VarMap::new();
    let rw = BatchNormRewriter::new(
        VarBuilder::from_varmap(&converted_map, DType::F32, &dev),
        ProcessGroup::single(),
    )
    .filter(|path| !path.starts_with("head"));
    let converted = ResNet::new(rw.vb(), &rw)?;
    println!("converted {} BatchNorm layers:", rw.report().len());
    for site in rw.report() {
        println!(
            "  {:<22} channels {:>2}  affine {}  tracked {}",
            site.path, site.num_features, site.affine, site.track_running_stats
        );
    }
    println!("kept local: {:?}", rw.kept_local());
    let report = load_checkpoint(&converted_map, &ckpt, &LoadOptions::default())?;
    println!(
        "loaded {} tensors from {}",
        report.loaded.len(),
        ckpt.display()
    );
    let (x, _) = batch(7, 8)?;
    let diff = max_abs_diff(
        &original.forward_t(&x, false)?,
        &converted.forward_t(&x, false)?,
    )?;
    println!("eval output, original vs converted: max abs diff {diff:.3e}");
    ensure!(diff < 1e-5, "eval outputs differ by {diff}");

    // 3. Synchronized training on 2 ranks (every BatchNorm converted, so the
    //    result must equal one process on the whole batch).
    let (steps, lr) = (4, 0.1);
    let ranks = ProcessGroup::threads(2)?;
    let handles: Vec<_> = ranks
        .into_iter()
        .map(|group| {
            let ckpt = ckpt.clone();
            std::thread::spawn(move || -> candle::Result<(Vec<f32>, Tensor, Tensor)> {
                let map = VarMap::new();
                let rw = BatchNormRewriter::new(
                    VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
                    group.clone(),
                );
                let model = ResNet::new(rw.vb(), &rw)?;
                load_checkpoint(&map, &ckpt, &LoadOptions::default())?;
                let rank = group.rank();
                let mut losses = Vec::new();
                for step in 0..steps {
                    let (x, y) = batch(step, 8)?;
                    let (x, y) = (x.narrow(0, 4 * rank, 4)?, y.narrow(0, 4 * rank, 4)?);
                    losses.push(sgd_step(&model, &map, &group, &x, &y, lr)?);
                }
                let stats = model.blocks[1]
                    .bn2
                    .running_mean()
                    .expect("tracked")
                    .copy()?;
                let (x, _) = batch(7, 8)?;
                Ok((losses, stats, model.forward_t(&x, false)?))
            })
        })
        .collect();
    let results = handles
        .into_iter()
        .map(|h| h.join().expect("rank thread panicked"))
        .collect::<candle::Result<Vec<_>>>()?;

    let ref_map = VarMap::new();
    let ref_rw = BatchNormRewriter::new(
        VarBuilder::from_varmap(&ref_map, DType::F32, &dev),
        ProcessGroup::single(),
    );
    let reference = ResNet::new(ref_rw.vb(), &ref_rw)?;
    load_checkpoint(&ref_map, &ckpt, &LoadOptions::default())?;
    println!("synchronized training, 2 ranks x 4 samples vs 1 rank x 8 samples:");
    for step in 0..steps {
        let (x, y) = batch(step, 8)?;
        let full = sgd_step(&reference, &ref_map, &ProcessGroup::single(), &x, &y, lr)?;
        let (l0, l1) = (results[0].0[step], results[1].0[step]);
        println!(
            "  step {step}: rank losses {l0:.4} {l1:.4}, mean {:.4}; 1-rank loss {full:.4}",
            (l0 + l1) / 2.0
        );
    }
    let (x, _) = batch(7, 8)?;
    let ref_out = reference.forward_t(&x, false)?;
    let ref_stats = reference.blocks[1].bn2.running_mean().expect("tracked");
    for (rank, (_, stats, out)) in results.iter().enumerate() {
        let d_stats = max_abs_diff(stats, ref_stats)?;
        let d_out = max_abs_diff(out, &ref_out)?;
        println!(
            "  rank {rank}: running_mean of layer2.0.bn2 vs 1 rank {d_stats:.3e}, eval output {d_out:.3e}"
        );
        ensure!(d_stats < 1e-4 && d_out < 1e-4, "rank {rank} diverged");
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
