//! Data-parallel training of a small conv net with SyncBatchNorm on 2
//! in-process CPU ranks (one thread each), checked against one rank training on
//! the whole batch: with synchronized statistics and averaged gradients the two
//! runs are the same computation, so losses, weights and running statistics agree.
//!
//! ```text
//! cargo run --release --example in_process
//! ```

use anyhow::Result;
use candle::{DType, Device, Module, ModuleT, Tensor, D};
use candle_nn::{conv2d, linear, Conv2d, Conv2dConfig, Linear, Optimizer, VarBuilder, VarMap, SGD};
use candle_syncbn::data_parallel::{broadcast_varmap, AverageOptions, GradientAverager};
use candle_syncbn::{ProcessGroup, SyncBatchNorm};

const CLASSES: usize = 4;
const BATCH: usize = 16;
const STEPS: usize = 12;

/// conv–SyncBN–ReLU ×2, global average pooling, linear head.
struct Net {
    conv1: Conv2d,
    bn1: SyncBatchNorm,
    conv2: Conv2d,
    bn2: SyncBatchNorm,
    head: Linear,
}

impl Net {
    fn new(vb: VarBuilder, group: ProcessGroup) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            conv1: conv2d(1, 8, 3, cfg, vb.pp("conv1"))?,
            bn1: SyncBatchNorm::new(8, 1e-5, vb.pp("bn1"), group.clone())?,
            conv2: conv2d(8, 16, 3, cfg, vb.pp("conv2"))?,
            bn2: SyncBatchNorm::new(16, 1e-5, vb.pp("bn2"), group)?,
            head: linear(16, CLASSES, vb.pp("head"))?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.bn1.forward_t(&self.conv1.forward(x)?, train)?.relu()?;
        let x = self
            .bn2
            .forward_t(&self.conv2.forward(&x)?, train)?
            .relu()?;
        Ok(self.head.forward(&x.mean(D::Minus1)?.mean(D::Minus1)?)?)
    }
}

/// A deterministic synthetic dataset: 12×12 images whose class is the
/// quadrant holding a bright blob, plus noise.
fn batch(step: usize) -> Result<(Tensor, Tensor)> {
    let mut images = vec![0f32; BATCH * 144];
    let mut labels = vec![0u32; BATCH];
    let mut seed = 0x2545_F491_4F6C_DD1Du64 ^ (step as u64 * 0x9E37_79B9);
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f32 / (1u64 << 53) as f32
    };
    for (i, label) in labels.iter_mut().enumerate() {
        let class = (next() * CLASSES as f32) as usize % CLASSES;
        *label = class as u32;
        let (cy, cx) = (3 + 6 * (class / 2), 3 + 6 * (class % 2));
        for y in 0..12 {
            for x in 0..12 {
                let d2 = (y as f32 - cy as f32).powi(2) + (x as f32 - cx as f32).powi(2);
                images[i * 144 + y * 12 + x] = (-d2 / 4.0).exp() + 0.3 * (next() - 0.5);
            }
        }
    }
    Ok((
        Tensor::from_vec(images, (BATCH, 1, 12, 12), &Device::Cpu)?,
        Tensor::from_vec(labels, BATCH, &Device::Cpu)?,
    ))
}

/// Global losses per step and the final variables by name.
type Run = (Vec<f32>, Vec<(String, Vec<f32>)>);

/// Trains on rank `rank` of `world` (rank r takes samples r, r+world, …) and
/// returns the global losses and the final variables.
fn train(group: ProcessGroup) -> Result<Run> {
    let (rank, world) = (group.rank(), group.world_size());
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = Net::new(vb, group.clone())?;
    // The same initial weights in both runs: seeded from the variable names
    // (candle's initializers draw from a thread-local RNG).
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if name.starts_with("conv") || name.starts_with("head") {
            let fan_in = match var.dims() {
                [out, ..] if var.rank() > 1 => (var.elem_count() / out) as f32,
                _ => 16.0,
            };
            let mut h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
            let values: Vec<f32> = (0..var.elem_count())
                .map(|_| {
                    h ^= h << 13;
                    h ^= h >> 7;
                    h ^= h << 17;
                    ((h >> 11) as f32 / (1u64 << 53) as f32 - 0.5) * 2.0 * (3.0 / fan_in).sqrt()
                })
                .collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
        }
    }
    // What a real job does: every rank starts from rank 0's variables.
    broadcast_varmap(&varmap, &group, 0)?;
    let mut sgd = SGD::new(varmap.all_vars(), 0.2)?;
    let mut averager = GradientAverager::new(&group, AverageOptions::default());
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let (x, y) = batch(step)?;
        let idx = Tensor::arange_step(rank as u32, BATCH as u32, world as u32, &Device::Cpu)?;
        let (x, y) = (x.index_select(&idx, 0)?, y.index_select(&idx, 0)?);
        let logits = net.forward(&x, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let mut grads = loss.backward()?;
        // Average gradients over ranks (equal local batch sizes).
        averager.average(&varmap, &mut grads)?;
        sgd.step(&grads)?;
        let global_loss = group.all_reduce_sum(&loss.to_dtype(DType::F64)?.reshape(1)?)?;
        losses.push((global_loss.to_vec1::<f64>()?[0] / world as f64) as f32);
    }
    let mut vars: Vec<(String, Vec<f32>)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            Ok((
                k.clone(),
                v.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            ))
        })
        .collect::<Result<_>>()?;
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((losses, vars))
}

fn main() -> Result<()> {
    let (single_losses, single_vars) = train(ProcessGroup::single())?;
    let handles: Vec<_> = ProcessGroup::threads(2)?
        .into_iter()
        .map(|g| std::thread::spawn(move || train(g)))
        .collect();
    let ranks: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("rank thread panicked"))
        .collect::<Result<_>>()?;

    println!(
        "step  loss (1 rank, batch {BATCH})  loss (2 ranks x {})",
        BATCH / 2
    );
    for (s, (a, b)) in single_losses.iter().zip(&ranks[0].0).enumerate() {
        println!("{s:>4}  {a:>22.6}  {b:>18.6}");
    }
    let mut worst = (String::new(), 0f32);
    for (r, (_, vars)) in ranks.iter().enumerate() {
        for ((name, a), (_, b)) in single_vars.iter().zip(vars) {
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            if d > worst.1 {
                worst = (format!("rank {r} {name}"), d);
            }
        }
    }
    let same_stats = ranks[0].1 == ranks[1].1;
    println!(
        "variables (weights, running stats, counters) of both ranks bitwise equal: {same_stats}"
    );
    println!(
        "largest difference to single-rank training after {STEPS} steps: {:.3e} ({})",
        worst.1, worst.0
    );
    anyhow::ensure!(same_stats, "the two ranks diverged");
    anyhow::ensure!(
        worst.1 < 1e-4,
        "2-rank training differs from 1-rank training by {}",
        worst.1
    );
    println!("OK: 2-rank SyncBatchNorm training equals 1-rank training on the whole batch");
    Ok(())
}
