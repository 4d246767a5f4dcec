//! The candle side of `benches/precise_bn_vs_fvcore.py`: a torchvision-shaped
//! ResNet-18 whose BatchNorm layers are all synchronized, loaded from the
//! `.pth` the script saved, gets precise statistics
//! (`precise_bn::update_bn_stats`) over the batches of a safetensors file, on
//! 1 rank and on 2 in-process ranks each holding half of every batch; the
//! running statistics of every layer are written to one safetensors file per
//! rank count, for the script to compare with fvcore's `update_bn_stats`.
//!
//! ```text
//! cargo run --release --example precise_bn_vs_fvcore -- \
//!     --weights resnet18.pth --batches batches.safetensors --out-dir DIR
//! ```

use anyhow::{ensure, Context, Result};
use candle::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder, VarMap};
use candle_syncbn::convert::checkpoint::{load_checkpoint, LoadOptions};
use candle_syncbn::precise_bn::{Estimator, PreciseBn};
use candle_syncbn::{BatchNormLayer, BatchNormRewriter, ProcessGroup};
use clap::Parser;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Parser, Debug)]
struct Args {
    /// torchvision ResNet-18 state dict (`torch.save(model.state_dict())`).
    #[arg(long)]
    weights: PathBuf,
    /// Safetensors file with `batches`, a `(K, N, 3, H, W)` f32 tensor.
    #[arg(long)]
    batches: PathBuf,
    /// Folder for `candle_ranks{k}.safetensors` (every layer's
    /// `running_mean` and `running_var` after the precise pass on k ranks).
    #[arg(long)]
    out_dir: PathBuf,
    /// The rank counts to run (each rank holds 1/k of every batch).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    ranks: Vec<usize>,
    /// The estimator: `population` (default) or `mean-of-batch-variances`.
    #[arg(long, default_value = "population")]
    estimator: String,
}

fn conv(c_in: usize, c_out: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: k / 2,
        stride,
        ..Default::default()
    };
    Ok(candle_nn::conv2d_no_bias(c_in, c_out, k, cfg, vb)?)
}

/// torchvision's `BasicBlock`, with its variable names.
struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNormLayer,
    conv2: Conv2d,
    bn2: BatchNormLayer,
    downsample: Option<(Conv2d, BatchNormLayer)>,
}

impl BasicBlock {
    fn new(
        c_in: usize,
        c_out: usize,
        stride: usize,
        vb: VarBuilder,
        bn: &BatchNormRewriter,
    ) -> Result<Self> {
        let downsample = if stride != 1 || c_in != c_out {
            Some((
                conv(c_in, c_out, 1, stride, vb.pp("downsample.0"))?,
                bn.batch_norm(c_out, 1e-5, vb.pp("downsample.1"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            conv1: conv(c_in, c_out, 3, stride, vb.pp("conv1"))?,
            bn1: bn.batch_norm(c_out, 1e-5, vb.pp("bn1"))?,
            conv2: conv(c_out, c_out, 3, 1, vb.pp("conv2"))?,
            bn2: bn.batch_norm(c_out, 1e-5, vb.pp("bn2"))?,
            downsample,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle::Result<Tensor> {
        let y = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward_t(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        self.bn2
            .forward_add_relu_t(&self.conv2.forward(&y)?, &shortcut, train)
    }

    fn layers(&self) -> Vec<&BatchNormLayer> {
        let mut v = vec![&self.bn1, &self.bn2];
        v.extend(self.downsample.as_ref().map(|(_, bn)| bn));
        v
    }
}

/// torchvision's `resnet18`.
struct ResNet18 {
    conv1: Conv2d,
    bn1: BatchNormLayer,
    blocks: Vec<BasicBlock>,
    fc: Linear,
}

impl ResNet18 {
    fn new(vb: VarBuilder, bn: &BatchNormRewriter) -> Result<Self> {
        let mut blocks = Vec::new();
        let mut c_in = 64;
        for (stage, c_out) in [64, 128, 256, 512].into_iter().enumerate() {
            for b in 0..2 {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let vb = vb.pp(format!("layer{}.{b}", stage + 1));
                blocks.push(BasicBlock::new(c_in, c_out, stride, vb, bn)?);
                c_in = c_out;
            }
        }
        Ok(Self {
            conv1: conv(3, 64, 7, 2, vb.pp("conv1"))?,
            bn1: bn.batch_norm(64, 1e-5, vb.pp("bn1"))?,
            blocks,
            fc: candle_nn::linear(512, 1000, vb.pp("fc"))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle::Result<Tensor> {
        let x = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        // MaxPool2d(3, 2, padding 1): after the ReLU, zero padding is -inf padding.
        let mut x = x
            .pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?
            .max_pool2d_with_stride(3, 2)?;
        for block in &self.blocks {
            x = block.forward_t(&x, train)?;
        }
        self.fc.forward(&x.mean((2, 3))?)
    }

    fn layers(&self) -> Vec<&BatchNormLayer> {
        let mut v = vec![&self.bn1];
        v.extend(self.blocks.iter().flat_map(BasicBlock::layers));
        v
    }
}

/// One rank: loads the weights, runs the precise pass on its slice of every
/// batch, returns every running statistic by name.
fn run_rank(
    args: &Args,
    group: ProcessGroup,
    batches: &Tensor,
    estimator: Estimator,
) -> Result<HashMap<String, Tensor>> {
    let (rank, world) = (group.rank(), group.world_size());
    let varmap = VarMap::new();
    let rw = BatchNormRewriter::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        group,
    );
    let model = ResNet18::new(rw.vb(), &rw)?;
    load_checkpoint(&varmap, &args.weights, &LoadOptions::default())
        .with_context(|| format!("loading {:?}", args.weights))?;
    let (k, n) = (batches.dim(0)?, batches.dim(1)?);
    ensure!(
        n % world == 0,
        "{n} samples per batch do not split over {world} ranks"
    );
    let share = n / world;
    PreciseBn::new(k)
        .estimator(estimator)
        .run(&model.layers(), |i| {
            let x = batches.get(i)?.narrow(0, rank * share, share)?;
            model.forward_t(&x, true).map(|_| ())
        })?;
    let data = varmap.data().lock().unwrap();
    Ok(data
        .iter()
        .filter(|(name, _)| name.ends_with(".running_mean") || name.ends_with(".running_var"))
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let estimator = match args.estimator.as_str() {
        "population" => Estimator::Population,
        "mean-of-batch-variances" => Estimator::MeanOfBatchVariances,
        other => anyhow::bail!(
            "--estimator: expected population or mean-of-batch-variances, got {other:?}"
        ),
    };
    let batches = candle::safetensors::load(&args.batches, &Device::Cpu)
        .with_context(|| format!("reading {:?}", args.batches))?
        .remove("batches")
        .context("no tensor `batches` in the batches file")?;
    std::fs::create_dir_all(&args.out_dir)?;
    for &world in &args.ranks {
        let start = std::time::Instant::now();
        let results: Vec<HashMap<String, Tensor>> = std::thread::scope(|s| {
            let handles: Vec<_> = ProcessGroup::threads(world)?
                .into_iter()
                .map(|g| {
                    let (args, batches) = (&args, &batches);
                    s.spawn(move || run_rank(args, g, batches, estimator))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))?)
                .collect::<Result<Vec<_>>>()
        })?;
        for (rank, r) in results.iter().enumerate().skip(1) {
            for (name, t) in r {
                let bits = |t: &Tensor| -> candle::Result<Vec<u32>> {
                    Ok(t.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
                };
                ensure!(
                    bits(t)? == bits(&results[0][name])?,
                    "rank {rank}: {name} differs from rank 0's"
                );
            }
        }
        let path = args
            .out_dir
            .join(format!("candle_ranks{world}.safetensors"));
        candle::safetensors::save(&results[0], &path)?;
        println!(
            "{world} rank(s): {} statistics, bitwise equal on every rank, written to {path:?} ({:.1} s)",
            results[0].len(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
