//! Data-parallel training of a small CNN with `SyncBatchNorm`, one process per rank.
//!
//! ```text
//! cargo run --release --example train                      # CPU, 2 ranks over loopback, synthetic data
//! cargo run --release --example train -- --nproc-per-node 4 --epochs 5
//! cargo run --release --example train -- --nproc-per-node 4 --bn-group-size 2   # BN synced in pairs
//! cargo run --release --example train -- --data ~/mnist   # MNIST-format IDX files
//! cargo run --release --features nccl --example train -- --device cuda --nproc-per-node 2
//! cargo run --release --features metal --example train -- --device metal --nproc-per-node 1
//! torchrun-style: RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. SYNCBN_TOKEN=.. train
//! ```
//!
//! Without `--nproc-per-node` and without a launcher's environment the example
//! launches itself as 2 ranks. Each rank trains on its slice of every global
//! batch; gradients are averaged over the ranks in bucketed all-reduces and
//! the batch statistics of the `SyncBatchNorm` layers are those of the global
//! batch (or, with `--bn-group-size`, of each block of ranks). At the end the
//! test split is evaluated, the running statistics are checked to be identical
//! on every rank of a SyncBatchNorm group, rank 0 saves a safetensors
//! checkpoint (atomically), and reloads it to evaluate again.

use anyhow::{bail, Context, Result};
use candle::{DType, Device, Module, Tensor, D};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use candle_syncbn::data_parallel::{
    broadcast_varmap, save_varmap_atomic, AverageOptions, GradientAverager,
};
use candle_syncbn::launch::{in_launched_rank, launch_if_requested_with, RankDevice};
use candle_syncbn::precise_bn::{Estimator, PreciseBn};
use candle_syncbn::{BatchNormLayer, BatchNormRewriter, Outcome, ProcessGroup, Rank};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Data-parallel CNN training with SyncBatchNorm (candle-syncbn)",
    allow_negative_numbers = true
)]
struct Args {
    /// Launch this many rank processes on this machine (default 2 when no
    /// launcher environment is set).
    #[arg(long, value_parser = at_least(1))]
    nproc_per_node: Option<usize>,
    /// `cpu` (TCP group), `cuda` (NCCL group; GPU LOCAL_RANK, or GPU 0 when
    /// each rank sees only its own) or `metal` (an Apple GPU, TCP group;
    /// build with `--features metal`).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda", "metal"])]
    device: String,
    /// A folder with MNIST-format IDX files (train-images-idx3-ubyte,
    /// train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte);
    /// default: a synthetic dataset generated in code.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Number of epochs.
    #[arg(long, default_value_t = 3, value_parser = at_least(1))]
    epochs: usize,
    /// Samples per rank and step.
    #[arg(long, default_value_t = 32, value_parser = at_least(1))]
    batch_size: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 3e-3, value_parser = positive_finite)]
    lr: f64,
    /// Synthetic data: training samples.
    #[arg(long, default_value_t = 4096, value_parser = at_least(1))]
    train_size: usize,
    /// Synthetic data: test samples.
    #[arg(long, default_value_t = 1024, value_parser = at_least(1))]
    test_size: usize,
    /// Synthetic data: image side (at least 4: the net pools twice by 2).
    #[arg(long, default_value_t = 16, value_parser = at_least(4))]
    image_size: usize,
    /// Stop each epoch after this many steps.
    #[arg(long, value_parser = at_least(1))]
    max_steps: Option<usize>,
    /// Checkpoint path (written by rank 0).
    #[arg(long, default_value = "syncbn-train.safetensors")]
    checkpoint: PathBuf,
    /// Only evaluate the checkpoint (no training).
    #[arg(long)]
    eval_only: bool,
    /// Seed of the initial weights, the data order and the synthetic data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Synchronize the batch statistics within consecutive blocks of this
    /// many ranks (e.g. the GPUs of one node) instead of over all ranks;
    /// gradients are still averaged over all ranks. Must divide the world size.
    #[arg(long, value_parser = at_least(1))]
    bn_group_size: Option<usize>,
    /// Freeze the BatchNorm layers whose variable prefix starts with PREFIX
    /// (`bn1`, `bn2`, or `bn` for both): fixed affine maps from their
    /// statistics and parameters, not trained (detectron2's FrozenBN).
    #[arg(long, value_name = "PREFIX")]
    freeze_bn_prefix: Option<String>,
    /// After training, recompute the running statistics as the average of
    /// the statistics of N global training batches (precise BN, fvcore's
    /// `update_bn_stats`) and evaluate again.
    #[arg(long, value_name = "N")]
    precise_bn: Option<usize>,
    /// How `--precise-bn` combines the batches' statistics: the population
    /// statistics of all their values (fvcore today) or the average of the
    /// batch means and unbiased variances (fvcore's older estimator, pycls).
    #[arg(long, value_enum, default_value_t = PreciseEstimator::Population)]
    precise_bn_estimator: PreciseEstimator,
}

/// `--precise-bn-estimator` (see `precise_bn::Estimator`).
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum PreciseEstimator {
    Population,
    MeanOfBatchVariances,
}

/// A parser of whole numbers from `min` up.
fn at_least(
    min: usize,
) -> impl Fn(&str) -> std::result::Result<usize, String> + Clone + Send + Sync + 'static {
    move |s| match s.trim().parse::<usize>() {
        Ok(v) if v >= min => Ok(v),
        Ok(_) => Err(format!("expected a whole number of at least {min}")),
        Err(e) => Err(format!("expected a whole number of at least {min}: {e}")),
    }
}

/// A parser of finite numbers above 0.
fn positive_finite(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(_) => Err("expected a finite number above 0".into()),
        Err(e) => Err(format!("expected a number: {e}")),
    }
}

const CLASSES: usize = 10;

/// conv–SyncBatchNorm–ReLU–pool ×2, then a linear head.
struct Net {
    c1: candle_nn::Conv2d,
    b1: BatchNormLayer,
    c2: candle_nn::Conv2d,
    b2: BatchNormLayer,
    fc: candle_nn::Linear,
}

impl Net {
    /// The model, its BatchNorm layers synchronized over `group` except those
    /// whose prefix starts with `freeze` (frozen).
    fn new(
        vb: VarBuilder,
        image_size: usize,
        group: &ProcessGroup,
        freeze: Option<&str>,
    ) -> Result<Self> {
        let freeze = freeze.map(str::to_string);
        let rw =
            BatchNormRewriter::new(vb.clone(), group.clone()).rule(move |path| match &freeze {
                Some(p) if path.starts_with(p.as_str()) => Outcome::Frozen,
                _ => Outcome::Sync,
            });
        let conv = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let bn = candle_nn::BatchNormConfig::default();
        let feat = image_size / 4;
        if feat == 0 {
            bail!("images must be at least 4×4, got {image_size}×{image_size}")
        }
        Ok(Self {
            c1: candle_nn::conv2d_no_bias(1, 16, 3, conv, vb.pp("conv1"))?,
            b1: rw.batch_norm(16, bn, vb.pp("bn1"))?,
            c2: candle_nn::conv2d_no_bias(16, 32, 3, conv, vb.pp("conv2"))?,
            b2: rw.batch_norm(32, bn, vb.pp("bn2"))?,
            fc: candle_nn::linear(32 * feat * feat, CLASSES, vb.pp("fc"))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // Batch norm and ReLU in one op (`forward_relu_t`).
        let x = self
            .b1
            .forward_relu_t(&self.c1.forward(x)?, train)?
            .max_pool2d(2)?;
        let x = self
            .b2
            .forward_relu_t(&self.c2.forward(&x)?, train)?
            .max_pool2d(2)?;
        Ok(self.fc.forward(&x.flatten_from(1)?)?)
    }
}

/// A dataset split: images `(n, 1, s, s)` f32 and labels `(n,)` u32, on the CPU.
struct Split {
    images: Tensor,
    labels: Tensor,
}

impl Split {
    fn len(&self) -> usize {
        self.labels.dims1().unwrap_or(0)
    }
}

/// SplitMix64: deterministic pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform().max(1e-7), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

/// A `VarBuilder` backend that creates the model's variables in a `VarMap`
/// with candle-nn's initializations, drawn from a generator seeded by `--seed`
/// and the variable's name (candle cannot seed its CPU random numbers), so a
/// run is reproducible bit for bit: the same seed gives the same initial
/// weights on every device, and the same losses for any number of ranks that
/// split the same global batch.
struct SeededInit {
    varmap: VarMap,
    seed: u64,
}

impl SeededInit {
    fn values(&self, name: &str, shape: &candle::Shape, init: candle_nn::Init) -> Vec<f32> {
        use candle_nn::init::{Init, NormalOrUniform};
        // FNV-1a of the name: each variable gets its own stream.
        let name_hash = name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01B3)
        });
        let mut rng = Rng(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ name_hash);
        let n = shape.elem_count();
        let uniform = |rng: &mut Rng, lo: f64, up: f64| -> Vec<f32> {
            (0..n)
                .map(|_| (lo + (up - lo) * rng.uniform() as f64) as f32)
                .collect()
        };
        let normal = |rng: &mut Rng, mean: f64, std: f64| -> Vec<f32> {
            (0..n)
                .map(|_| (mean + std * rng.normal() as f64) as f32)
                .collect()
        };
        match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
            Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(&mut rng, -bound, bound)
                    }
                    NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
                }
            }
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for SeededInit {
    fn get(
        &self,
        shape: candle::Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle::Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("poisoned VarMap".into()))?;
        if let Some(var) = data.get(name) {
            if var.shape() != &shape {
                candle::bail!("shape mismatch on {name}: {shape:?} <> {:?}", var.shape())
            }
            return Ok(var.as_tensor().clone());
        }
        let values = self.values(name, &shape, init);
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let var = candle::Var::from_tensor(&t)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle::Result<Tensor> {
        candle::bail!("{name}: the seeded initializer creates variables, use `get`")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .is_ok_and(|d| d.contains_key(name))
    }
}

/// Synthetic images: class k is a blob at one of 10 places (5×2 grid), with
/// position jitter, random brightness, and noise.
fn synthetic(n: usize, size: usize, seed: u64) -> Result<Split> {
    let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5DEE_CE66);
    let s = size as f32;
    let sigma = s / 9.0;
    let values = n
        .checked_mul(size)
        .and_then(|v| v.checked_mul(size))
        .filter(|v| v.checked_mul(4).is_some())
        .with_context(|| format!("{n} images of {size}×{size} are too many values"))?;
    let mut images = Vec::new();
    images.try_reserve_exact(values).map_err(|e| {
        anyhow::anyhow!("{n} synthetic images of {size}×{size} do not fit in memory: {e}")
    })?;
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let k = (rng.next() % CLASSES as u64) as usize;
        let cx = ((k % 5) as f32 + 0.5) * s / 5.0 + (rng.uniform() - 0.5) * s / 8.0;
        let cy = ((k / 5) as f32 + 0.5) * s / 2.0 + (rng.uniform() - 0.5) * s / 5.0;
        let amp = 0.6 + 0.8 * rng.uniform();
        for y in 0..size {
            for x in 0..size {
                let d2 = (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2);
                images.push(amp * (-d2 / (2.0 * sigma * sigma)).exp() + 0.35 * rng.normal());
            }
        }
        labels.push(k as u32);
    }
    Ok(Split {
        images: Tensor::from_vec(images, (n, 1, size, size), &Device::Cpu)?,
        labels: Tensor::from_vec(labels, n, &Device::Cpu)?,
    })
}

fn read_u32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Reads an MNIST-format pair of IDX files (square images of any size).
fn read_idx(dir: &Path, prefix: &str) -> Result<Split> {
    let ip = dir.join(format!("{prefix}-images-idx3-ubyte"));
    let lp = dir.join(format!("{prefix}-labels-idx1-ubyte"));
    let ib = std::fs::read(&ip).with_context(|| format!("reading {ip:?}"))?;
    let lb = std::fs::read(&lp).with_context(|| format!("reading {lp:?}"))?;
    if ib.len() < 16 || read_u32(&ib, 0) != 0x0803 {
        bail!("{ip:?}: not an IDX image file (expected magic 0x00000803)")
    }
    if lb.len() < 8 || read_u32(&lb, 0) != 0x0801 {
        bail!("{lp:?}: not an IDX label file (expected magic 0x00000801)")
    }
    let (n, rows, cols) = (
        read_u32(&ib, 4) as usize,
        read_u32(&ib, 8) as usize,
        read_u32(&ib, 12) as usize,
    );
    if rows != cols {
        bail!("{ip:?}: expected square images, got {rows}×{cols}")
    }
    if ib.len() != 16 + n * rows * cols {
        bail!(
            "{ip:?}: expected {} bytes for {n} images of {rows}×{cols}, got {}",
            16 + n * rows * cols,
            ib.len()
        )
    }
    if read_u32(&lb, 4) as usize != n || lb.len() != 8 + n {
        bail!("{lp:?}: expected {n} labels")
    }
    if let Some(bad) = lb[8..].iter().find(|&&l| l as usize >= CLASSES) {
        bail!("{lp:?}: label {bad} is not in 0..{CLASSES}")
    }
    let images: Vec<f32> = ib[16..]
        .iter()
        .map(|&v| (v as f32 / 255.0 - 0.13) / 0.31)
        .collect();
    let labels: Vec<u32> = lb[8..].iter().map(|&l| l as u32).collect();
    Ok(Split {
        images: Tensor::from_vec(images, (n, 1, rows, cols), &Device::Cpu)?,
        labels: Tensor::from_vec(labels, n, &Device::Cpu)?,
    })
}

fn load_data(args: &Args) -> Result<(Split, Split, usize)> {
    match &args.data {
        Some(dir) => {
            let train = read_idx(dir, "train")?;
            let test = read_idx(dir, "t10k")?;
            let size = train.images.dim(2)?;
            if test.images.dim(2)? != size {
                bail!("train and test images have different sizes")
            }
            Ok((train, test, size))
        }
        None => Ok((
            synthetic(args.train_size, args.image_size, args.seed)?,
            synthetic(args.test_size, args.image_size, args.seed ^ 0xABCD_EF01)?,
            args.image_size,
        )),
    }
}

/// The same permutation of `0..n` on every rank.
fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng(seed);
    let mut p: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        p.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    p
}

/// `(correct, count)` of `net` on the samples of `split` with index ≡ rank (mod world).
fn evaluate(
    net: &Net,
    split: &Split,
    device: &Device,
    rank: usize,
    world: usize,
) -> Result<(f64, f64)> {
    let idx: Vec<u32> = (rank..split.len())
        .step_by(world)
        .map(|i| i as u32)
        .collect();
    let mut correct = 0f64;
    for chunk in idx.chunks(256) {
        let i = Tensor::new(chunk, &Device::Cpu)?;
        let x = split.images.index_select(&i, 0)?.to_device(device)?;
        let y = split.labels.index_select(&i, 0)?.to_device(device)?;
        let pred = net.forward_t(&x, false)?.argmax(D::Minus1)?;
        correct += host_scalar(&pred.eq(&y)?.to_dtype(DType::F32)?.sum_all()?)?;
    }
    Ok((correct, idx.len() as f64))
}

/// Sums `values` over the ranks, in f64 on the device the group's
/// collectives take (NCCL: the GPU), else on the host (not every device has
/// f64: Metal).
fn sum_over(group: &ProcessGroup, values: &[f64]) -> Result<Vec<f64>> {
    let t = Tensor::new(values, &collective_device(group))?;
    Ok(group.all_reduce_sum(&t)?.to_vec1::<f64>()?)
}

/// The device of `group`'s collectives, or the host when they take any.
fn collective_device(group: &ProcessGroup) -> Device {
    group.backend().device().unwrap_or(Device::Cpu)
}

/// A scalar tensor's value, converted to f64 on the host.
fn host_scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

/// The running statistics of the model, flattened in name order (f64).
fn running_stats(varmap: &VarMap) -> Result<Tensor> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned VarMap"))?;
    let mut names: Vec<&String> = data
        .keys()
        .filter(|k| {
            k.ends_with("running_mean")
                || k.ends_with("running_var")
                || k.ends_with("num_batches_tracked")
        })
        .collect();
    names.sort();
    let parts: Vec<Tensor> = names
        .iter()
        .map(|k| {
            data[*k]
                .as_tensor()
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F64)?
                .flatten_all()
        })
        .collect::<candle::Result<_>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

fn is_trainable(name: &str) -> bool {
    !(name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    // A rank of torchrun, of this example's own launch, or of `mpirun`
    // (built with `--features mpi`): no self-spawn then.
    let in_launcher = in_launched_rank()?;
    if !in_launcher || args.nproc_per_node.is_some() {
        // CUDA ranks: no more than the visible GPUs (refused before any starts).
        let ranks_on = match args.device.as_str() {
            "cuda" => RankDevice::Cuda,
            _ => RankDevice::Cpu,
        };
        if let Some(code) = launch_if_requested_with(Some(2), ranks_on)? {
            std::process::exit(code);
        }
    }
    if let Err(e) = run(&args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

fn run(args: &Args) -> Result<()> {
    if args.device == "cpu" {
        // candle frees and re-allocates every activation and gradient each
        // step: keep that memory instead of page-faulting it in again
        // (before any thread starts).
        candle_syncbn::keep_freed_memory(&Device::Cpu)?;
    }
    let t0 = Instant::now();
    // This rank's device and group in one call, from the launcher's
    // environment: the CPU, or its own GPU (an error where two ranks of a
    // node would share one).
    let (device, group) = match args.device.as_str() {
        "cpu" | "cuda" => {
            let on = if args.device == "cpu" {
                RankDevice::Cpu
            } else {
                RankDevice::Cuda
            };
            let rank = Rank::from_env(on).with_context(|| format!("--device {}", args.device))?;
            (rank.device, rank.group)
        }
        "metal" => {
            let device = Device::new_metal(0).context("--device metal: opening the GPU")?;
            let group = ProcessGroup::from_env(&device)?;
            (device, group)
        }
        d => bail!("--device: expected cpu, cuda or metal, got {d:?}"),
    };
    // The same on the GPU: the CUDA memory pool keeps freed memory across the
    // synchronizations of each step instead of mapping it in again.
    if device.is_cuda() {
        candle_syncbn::keep_freed_memory(&device)?;
    }
    let (rank, world) = (group.rank(), group.world_size());
    let main = rank == 0;
    let (train, test, size) = load_data(args)?;
    if main {
        println!(
            "{world} rank(s), {} group, device {}, {} train / {} test images of {size}×{size}{}",
            group.backend().name(),
            args.device,
            train.len(),
            test.len(),
            if args.data.is_some() {
                ""
            } else {
                " (synthetic)"
            }
        );
    }
    if args.eval_only {
        if main {
            let (acc, _) = eval_checkpoint(args, &test, size, &device)?;
            println!(
                "checkpoint {:?}: test accuracy {:.2}%",
                args.checkpoint,
                100.0 * acc
            );
        }
        return Ok(());
    }

    let varmap = VarMap::new();
    let init = SeededInit {
        varmap: varmap.clone(),
        seed: args.seed,
    };
    let vb = VarBuilder::from_backend(Box::new(init), DType::F32, device.clone());
    // The SyncBatchNorm layers' group: all ranks, or this rank's block.
    let bn_group = match args.bn_group_size {
        Some(n) => group.subgroups(n)?,
        None => group.clone(),
    };
    if main && bn_group.world_size() < world {
        println!(
            "batch statistics synchronized within {} blocks of {} ranks",
            world / bn_group.world_size(),
            bn_group.world_size()
        );
    }
    let net = Net::new(vb, size, &bn_group, args.freeze_bn_prefix.as_deref())?;
    broadcast_varmap(&varmap, &group, 0)?;
    let trainable: Vec<candle::Var> = {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned VarMap"))?;
        let mut v: Vec<(&String, &candle::Var)> =
            data.iter().filter(|(k, _)| is_trainable(k)).collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v.into_iter().map(|(_, v)| v.clone()).collect()
    };
    let mut opt = candle_nn::AdamW::new(
        trainable,
        candle_nn::ParamsAdamW {
            lr: args.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;

    let b = args.batch_size;
    let global = b.checked_mul(world).with_context(|| {
        format!("--batch-size {b} on {world} ranks: the global batch is too large")
    })?;
    let mut steps = train.len() / global;
    if let Some(m) = args.max_steps {
        steps = steps.min(m);
    }
    if steps == 0 {
        bail!(
            "{} training samples are fewer than one global batch of {global}",
            train.len()
        )
    }
    // Agrees on the variables with gradients at the first step, then
    // averages without a host synchronization.
    let mut averager = GradientAverager::new(&group, AverageOptions::default());
    for epoch in 0..args.epochs {
        let start = Instant::now();
        let perm = permutation(train.len(), args.seed.wrapping_add(epoch as u64 + 1));
        // The loss and accuracy sums stay on the device until the epoch
        // ends: reading them every step would make the host wait for the
        // GPU every step.
        let mut sums = Tensor::zeros(2, DType::F32, &device)?;
        for step in 0..steps {
            let o = step * global + rank * b;
            let idx = Tensor::new(&perm[o..o + b], &Device::Cpu)?;
            let x = train.images.index_select(&idx, 0)?.to_device(&device)?;
            let y = train.labels.index_select(&idx, 0)?.to_device(&device)?;
            let logits = net.forward_t(&x, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let mut grads = loss.backward()?;
            averager.average(&varmap, &mut grads)?;
            opt.step(&grads)?;
            let correct = logits
                .argmax(D::Minus1)?
                .eq(&y)?
                .to_dtype(DType::F32)?
                .sum_all()?;
            let step_sums = Tensor::stack(&[(loss.to_dtype(DType::F32)? * b as f64)?, correct], 0)?;
            sums = (sums + step_sums)?;
        }
        let sums = sums.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        let (loss_sum, correct) = (f64::from(sums[0]), f64::from(sums[1]));
        let s = sum_over(&group, &[loss_sum, correct, (steps * b) as f64])?;
        let secs = start.elapsed().as_secs_f64();
        if main {
            println!(
                "epoch {}/{}: loss {:.4}, train accuracy {:.2}%, {:.0} samples/s ({:.1} s)",
                epoch + 1,
                args.epochs,
                s[0] / s[2],
                100.0 * s[1] / s[2],
                s[2] / secs,
                secs
            );
        }
    }

    let (c, n) = evaluate(&net, &test, &device, rank, world)?;
    let s = sum_over(&group, &[c, n])?;
    let mut test_acc = s[0] / s[1];
    if main {
        println!("test accuracy {:.2}% ({} images)", 100.0 * test_acc, s[1]);
    }
    if let Some(batches) = args.precise_bn {
        test_acc = precise_bn(
            args,
            &net,
            batches,
            (&train, &test),
            &device,
            &group,
            test_acc,
        )?;
    }

    // The running statistics must be bitwise identical on every rank of a
    // SyncBatchNorm group.
    let own = running_stats(&varmap)?.to_device(&collective_device(&bn_group))?;
    let root = bn_group.broadcast(&own, 0)?;
    let differ = host_scalar(&own.ne(&root)?.to_dtype(DType::F32)?.sum_all()?)?;
    let differ = sum_over(&group, &[differ])?[0];
    if main {
        let over = if bn_group.world_size() == world {
            format!("on all {world} ranks")
        } else {
            format!("within each block of {} ranks", bn_group.world_size())
        };
        println!(
            "running statistics identical {over}: {} ({} values, {differ} differing)",
            if differ == 0.0 { "yes" } else { "NO" },
            own.elem_count()
        );
    }
    if differ != 0.0 {
        bail!("the running statistics differ between the ranks of a SyncBatchNorm group")
    }

    if main {
        save_varmap_atomic(&varmap, &args.checkpoint)?;
        println!("saved checkpoint {:?}", args.checkpoint);
        let (acc, _) = eval_checkpoint(args, &test, size, &device)?;
        println!(
            "reloaded checkpoint: test accuracy {:.2}% ({})",
            100.0 * acc,
            if acc == test_acc {
                "same as before saving"
            } else {
                "DIFFERS"
            }
        );
        if acc != test_acc {
            bail!("the reloaded checkpoint evaluates differently")
        }
        println!("done in {:.1} s", t0.elapsed().as_secs_f64());
    }
    group.barrier()?;
    Ok(())
}

/// Loads the checkpoint into a fresh single-process model and evaluates it.
fn eval_checkpoint(args: &Args, test: &Split, size: usize, device: &Device) -> Result<(f64, f64)> {
    let mut varmap = VarMap::new();
    let single = ProcessGroup::single();
    let net = Net::new(
        VarBuilder::from_varmap(&varmap, DType::F32, device),
        size,
        &single,
        args.freeze_bn_prefix.as_deref(),
    )?;
    varmap
        .load(&args.checkpoint)
        .with_context(|| format!("loading {:?}", args.checkpoint))?;
    let (c, n) = evaluate(&net, test, device, 0, 1)?;
    Ok((c / n, n))
}

/// `--precise-bn N`: recomputes the running statistics of the BatchNorm
/// layers from the statistics of `batches` global training batches (with
/// `--precise-bn-estimator`; each rank runs its slice; the synchronized layers
/// all-reduce their statistics as in training; frozen layers stay), then evaluates
/// again. Prints the test accuracy `before` and after; returns it after.
fn precise_bn(
    args: &Args,
    net: &Net,
    batches: usize,
    (train, test): (&Split, &Split),
    device: &Device,
    group: &ProcessGroup,
    before: f64,
) -> Result<f64> {
    let (rank, world) = (group.rank(), group.world_size());
    let b = args.batch_size;
    let global = b * world;
    if batches == 0 || batches * global > train.len() {
        bail!(
            "--precise-bn: expected 1 to {} batches (global batches of {global} in {} training samples), got {batches}",
            train.len() / global,
            train.len()
        )
    }
    let start = Instant::now();
    let perm = permutation(train.len(), args.seed ^ 0x0050_5245_4349_5345);
    let estimator = match args.precise_bn_estimator {
        PreciseEstimator::Population => Estimator::Population,
        PreciseEstimator::MeanOfBatchVariances => Estimator::MeanOfBatchVariances,
    };
    PreciseBn::new(batches)
        .estimator(estimator)
        .run(&[&net.b1, &net.b2], |i| {
            let o = i * global + rank * b;
            let idx = Tensor::new(&perm[o..o + b], &Device::Cpu)?;
            let x = train.images.index_select(&idx, 0)?.to_device(device)?;
            net.forward_t(&x, true)
                .map(|_| ())
                .map_err(|e| candle::Error::Msg(format!("{e:#}")))
        })?;
    let (c, n) = evaluate(net, test, device, rank, world)?;
    let s = sum_over(group, &[c, n])?;
    if rank == 0 {
        println!(
            "precise BN over {batches} global batches ({estimator:?} estimator, {:.1} s): test accuracy {:.2}% before, {:.2}% after",
            start.elapsed().as_secs_f64(),
            100.0 * before,
            100.0 * s[0] / s[1]
        );
    }
    Ok(s[0] / s[1])
}
