//! Benchmark table: SyncBatchNorm against a memory copy and candle-nn's
//! BatchNorm on the same shapes, on the CPU or a CUDA device.
//!
//! ```text
//! cargo run --release --example bench                       # CPU, ResNet-50 suite, f32 and bf16
//! cargo run --release --example bench -- --shapes 32x64x56x56 --dtypes f32
//! cargo run --release --example bench -- --keep-freed-memory   # glibc keeps freed memory
//! cargo run --release --example bench -- --relu    # also batch norm + ReLU steps
//! cargo run --release --features cuda --example bench -- --device cuda
//! ```
//!
//! Each row gives medians of: a training forward; our backward kernels alone
//! ("bwd ops": gradient sums, collective, input gradient); an eval forward; the
//! training step (forward, then `backward()` through candle's autograd); the
//! part of that step that is candle's own gradient bookkeeping (the `ones_like`
//! seed and the `zeros_like` + `add` with which candle accumulates every op
//! input's gradient, timed alone on tensors of the same shape); and candle-nn's
//! BatchNorm step. The header says whether the candle-core of this build
//! accumulates gradients by zeros + add (as released) or in place (the copy of
//! `benches/candle_inplace_grads.py`, via `scripts/with-patched-candle.sh`).
//! Bandwidth is given against a memory copy measured in the
//! same run: on the CPU a parallel copy between two buffers that are already
//! mapped (the memory's bandwidth, without page faults), on CUDA a device copy.
//! Bytes moved: the forward reads x twice and writes y; the backward reads dy
//! and x twice and writes dx; eval reads x and writes y.
//!
//! With `--relu`, a second table times the training step of batch norm
//! followed by a ReLU three ways: `forward_relu_t` (the ReLU fused into our
//! normalization), `forward_t` then candle's `relu`, and candle-nn's BatchNorm
//! then `relu`; and likewise `relu(bn(x) + z)`, the end of a ResNet block
//! (`forward_add_relu_t`, and the same as three ops). It also times our
//! backward kernels alone after the fused ReLU two ways: with the mask
//! recomputed from `x` inside both passes (what `forward_relu_t` does), and
//! with a mask pass first (`ReluGrad`, what `forward_add_relu_t` does).
//!
//! With `--composite`, a third table times the layer composed of candle ops
//! (`forward_composite_t`, what runs on devices without kernels of this
//! crate, such as Metal): its training step and eval against the kernels'.

use anyhow::{bail, Result};
use candle::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::ops::{
    BatchMoments, BatchStats, ForwardCoefficients, FusedRelu, GradStats, InputGrad, Moments,
    ReluGrad,
};
use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use clap::Parser;
use rayon::prelude::*;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "SyncBatchNorm benchmark table")]
struct Args {
    /// `cpu` or `cuda` (device 0).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Comma-separated shapes like `32x64x56x56`; default: the ResNet-50 suite,
    /// 2-D (4096, 1024) and 3-D video (2, 64, 16, 56, 56).
    #[arg(long)]
    shapes: Option<String>,
    /// Comma-separated dtypes among f32, f64, f16, bf16.
    #[arg(long, default_value = "f32,bf16")]
    dtypes: String,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 15)]
    iters: usize,
    /// Skip candle-nn's BatchNorm.
    #[arg(long)]
    no_candle_nn: bool,
    /// Keep freed memory for reuse, for candle-nn's rows too: on the CPU
    /// `candle_syncbn::cpu::keep_freed_memory()` (glibc keeps freed memory
    /// instead of returning it to the system), on CUDA
    /// `candle_syncbn::cuda_memory::keep_freed_memory(&device)` (the memory
    /// pool keeps it across synchronizations, as PyTorch's caching allocator).
    #[arg(long)]
    keep_freed_memory: bool,
    /// Also time batch norm + ReLU steps (fused, and as two ops).
    #[arg(long)]
    relu: bool,
    /// Also time the layer composed of candle ops (`forward_composite_t`,
    /// what runs on devices without kernels of this crate, such as Metal):
    /// its training step and eval against the kernels'.
    #[arg(long)]
    composite: bool,
    /// Also write the rows as JSON to this file (read by benches/pytorch_bench.py).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Milliseconds of training steps of the first shape and dtype before the
    /// table, so that its first row meets a device already at work; default
    /// 500 on CUDA (on an H200 the first row's forward measured 0.16-0.21 ms
    /// against 0.15 ms when the same shape was timed again at the end of a
    /// run), 0 on the CPU.
    #[arg(long)]
    warmup_ms: Option<u64>,
}

const SUITE: &str =
    "32x64x112x112,32x256x56x56,32x512x28x28,32x1024x14x14,32x2048x7x7,4096x1024,2x64x16x56x56";

fn parse_shape(s: &str) -> Result<Vec<usize>> {
    let dims: Vec<usize> = s
        .split('x')
        .map(|d| d.trim().parse())
        .collect::<Result<_, _>>()?;
    if !(2..=5).contains(&dims.len()) {
        bail!("shape {s}: expected 2 to 5 dims")
    }
    Ok(dims)
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s.trim() {
        "f32" => DType::F32,
        "f64" => DType::F64,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("unknown dtype {other}"),
    })
}

/// Median seconds of `iters` runs of `f` after one warm-up run.
fn time<T>(dev: &Device, iters: usize, f: impl FnMut() -> Result<T>) -> Result<f64> {
    let samples = samples(dev, iters, f)?;
    Ok(samples[samples.len() / 2])
}

/// Sorted seconds of `iters` runs of `f` after one warm-up run.
fn samples<T>(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<T>) -> Result<Vec<f64>> {
    drop(f()?);
    dev.synchronize()?;
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let out = f()?;
        dev.synchronize()?;
        drop(out);
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

/// Seconds to copy `bytes` bytes between two buffers that are already mapped,
/// in parallel over rayon's pool: the CPU memory bandwidth baseline, the best
/// of `3·iters` runs (a ceiling, so that a noisy run does not flatter the kernels).
fn cpu_copy_time(bytes: usize, iters: usize) -> Result<f64> {
    const PIECE: usize = 1 << 20;
    let src = vec![1u8; bytes];
    let mut dst = vec![2u8; bytes];
    let runs = samples(&Device::Cpu, 3 * iters, || {
        dst.par_chunks_mut(PIECE)
            .zip(src.par_chunks(PIECE))
            .for_each(|(d, s)| d.copy_from_slice(s));
        Ok(())
    })?;
    Ok(runs[0])
}

struct Row {
    label: String,
    shape: Vec<usize>,
    dtype: DType,
    copy: f64,
    bookkeeping: f64,
    fwd: f64,
    bwd: f64,
    bwd_ops: f64,
    step: f64,
    eval: f64,
    nn_step: Option<f64>,
    enqueue: Option<f64>,
    relu: Option<ReluRow>,
    /// `--composite`: the composed layer's training step and eval.
    composite: Option<(f64, f64)>,
    bytes: f64,
}

/// Training steps of batch norm followed by a ReLU, and of batch norm plus a
/// residual followed by a ReLU (`--relu`).
struct ReluRow {
    /// `forward_relu_t` + `backward()`.
    fused: f64,
    /// Our backward kernels alone after the fused ReLU, as `forward_relu_t`
    /// runs them: the mask recomputed inside the gradient sums and the input
    /// gradient.
    bwd_ops: f64,
    /// The same with the mask as a pass of its own first (`ReluGrad`, reading
    /// the output), as `forward_add_relu_t` runs them.
    bwd_ops_mask_pass: f64,
    /// `forward_t`, candle's `relu`, `backward()`.
    two_ops: f64,
    /// candle-nn's BatchNorm, `relu`, `backward()`.
    nn: Option<f64>,
    /// `forward_add_relu_t(x, z)` + `backward()` (z a variable too).
    add_fused: f64,
    /// `forward_t`, `+ z`, `relu`, `backward()`.
    add_ops: f64,
    /// candle-nn's BatchNorm, `+ z`, `relu`, `backward()`.
    add_nn: Option<f64>,
}

/// Training steps (forward, `backward()`) of a layer over `shape` in `dtype`
/// on `dev`, each synchronized, for `ms` milliseconds.
fn warm_up(dev: &Device, shape: &[usize], dtype: DType, ms: u64) -> Result<()> {
    let x = Var::from_tensor(
        &Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?,
    )?;
    let param_dtype = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, param_dtype, dev);
    let bn = SyncBatchNorm::new(
        shape[1],
        SyncBatchNormConfig::default(),
        vb,
        ProcessGroup::single(),
    )?;
    let start = Instant::now();
    while start.elapsed().as_millis() < u128::from(ms) {
        drop(bn.forward_t(x.as_tensor(), true)?.backward()?);
        dev.synchronize()?;
    }
    Ok(())
}

fn bench_one(dev: &Device, shape: &[usize], dtype: DType, args: &Args) -> Result<Row> {
    let c = shape[1];
    // Drawn on the host (no cuRAND needed, so the emulated GPU runs it too).
    let x = Var::from_tensor(
        &Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?,
    )?;
    let xt = x.as_tensor();
    let param_dtype = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, param_dtype, dev);
    let bn = SyncBatchNorm::new(
        c,
        SyncBatchNormConfig::default(),
        vb,
        ProcessGroup::single(),
    )?;
    let iters = args.iters;

    let bytes = xt.elem_count() * dtype.size_in_bytes();
    let copy = if dev.is_cpu() {
        cpu_copy_time(bytes, iters)?
    } else {
        time(dev, iters, || Ok(xt.copy()?))?
    };
    let fwd = time(dev, iters, || Ok(bn.forward_t(xt, true)?))?;
    let y = bn.forward_t(xt, true)?;
    let bwd = time(dev, iters, || Ok(y.backward()?))?;
    let step = time(dev, iters, || Ok(bn.forward_t(xt, true)?.backward()?))?;
    let eval = time(dev, iters, || Ok(bn.forward_t(xt, false)?))?;

    // candle's bookkeeping in that step, as `Tensor::backward` does it: the
    // seed, and `zeros_like` + `add` to accumulate the input's gradient.
    let dx_stand_in = xt.ones_like()?;
    let bookkeeping = time(dev, iters, || {
        let seed = xt.ones_like()?.contiguous()?;
        let accumulated = xt.zeros_like()?.add(&dx_stand_in)?;
        Ok((seed, accumulated))
    })?;
    drop(dx_stand_in);

    // Our backward alone: gradient sums, (world-size-1) collective, input gradient.
    let axis = 1;
    let dy = xt.ones_like()?;
    let sums = xt.apply_op1_no_bwd(&BatchStats { axis })?;
    // On a GPU the layer computes the forward's coefficients with the
    // moments, and a fused ReLU's backward reads them (below).
    let (moments, coefficients) = if dev.is_cuda() {
        let request = ForwardCoefficients {
            input: dtype,
            weight: None,
            bias: None,
        };
        let (m, c) = BatchMoments::apply_with_coefficients(&sums, 1e-5, None, &request)?;
        (m, Some(c))
    } else {
        (sums.apply_op1_no_bwd(&Moments { eps: 1e-5 })?, None)
    };
    let group = ProcessGroup::single();
    let bwd_ops = time(dev, iters, || {
        let local = dy.apply_op2_no_bwd(
            xt,
            &GradStats {
                axis,
                moments: moments.clone(),
                relu: None,
            },
        )?;
        let global = group.all_reduce_sum(&local)?;
        let op = InputGrad {
            axis,
            moments: moments.clone(),
            grad_sums: Some(global),
            weight: None,
            relu: None,
        };
        Ok(dy.apply_op2_no_bwd(xt, &op)?)
    })?;

    // On a GPU, a step must be enqueued without waiting for the device: time
    // the host side of a step (no synchronization) against the whole step.
    let enqueue = if dev.is_cuda() {
        let mut best = f64::MAX;
        for _ in 0..iters {
            dev.synchronize()?;
            let t = Instant::now();
            let grads = bn.forward_t(xt, true)?.backward()?;
            best = best.min(t.elapsed().as_secs_f64());
            dev.synchronize()?;
            drop(grads);
        }
        Some(best)
    } else {
        None
    };

    let nn_map = VarMap::new();
    let nn_bn = candle_nn::batch_norm(c, 1e-5, VarBuilder::from_varmap(&nn_map, param_dtype, dev))?;
    let nn_x = if param_dtype == dtype {
        xt.clone()
    } else {
        xt.to_dtype(param_dtype)?
    };
    let nn_iters = iters.min(3);
    let nn_step = if args.no_candle_nn {
        None
    } else {
        Some(time(dev, nn_iters, || {
            Ok(nn_bn.forward_t(&nn_x, true)?.backward()?)
        })?)
    };
    let relu = if args.relu {
        let fused = time(dev, iters, || {
            Ok(bn.forward_relu_t(xt, true)?.backward()?)
        })?;
        // The backward kernels alone, as for "bwd ops": the mask recomputed
        // in both passes, or read from the output by a pass of its own.
        let relu_bwd = |relu: Option<FusedRelu>, dy: &Tensor| -> Result<Tensor> {
            let op = GradStats {
                axis,
                moments: moments.clone(),
                relu: relu.clone(),
            };
            let global = group.all_reduce_sum(&dy.apply_op2_no_bwd(xt, &op)?)?;
            let op = InputGrad {
                axis,
                moments: moments.clone(),
                grad_sums: Some(global),
                weight: None,
                relu,
            };
            Ok(dy.apply_op2_no_bwd(xt, &op)?)
        };
        let fused_relu = FusedRelu {
            coefficients: coefficients.clone(),
            ..FusedRelu::default()
        };
        let relu_bwd_ops = time(dev, iters, || relu_bwd(Some(fused_relu.clone()), &dy))?;
        let y_relu = bn.forward_relu_t(xt, true)?.detach();
        let bwd_ops_mask_pass = time(dev, iters, || {
            let masked = dy.apply_op2_no_bwd(&y_relu, &ReluGrad { axis })?;
            relu_bwd(None, &masked)
        })?;
        drop(y_relu);
        let two_ops = time(dev, iters, || {
            Ok(bn.forward_t(xt, true)?.relu()?.backward()?)
        })?;
        let nn = if args.no_candle_nn {
            None
        } else {
            Some(time(dev, nn_iters, || {
                Ok(nn_bn.forward_t(&nn_x, true)?.relu()?.backward()?)
            })?)
        };
        // The residual: another activation of the same shape, trained too.
        let z = Var::from_tensor(
            &Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(dev)?,
        )?;
        let zt = z.as_tensor();
        let add_fused = time(dev, iters, || {
            Ok(bn.forward_add_relu_t(xt, zt, true)?.backward()?)
        })?;
        let add_ops = time(dev, iters, || {
            Ok((bn.forward_t(xt, true)? + zt)?.relu()?.backward()?)
        })?;
        let add_nn = if args.no_candle_nn {
            None
        } else {
            let nn_z = zt.to_dtype(param_dtype)?;
            Some(time(dev, nn_iters, || {
                Ok((nn_bn.forward_t(&nn_x, true)? + &nn_z)?
                    .relu()?
                    .backward()?)
            })?)
        };
        Some(ReluRow {
            fused,
            bwd_ops: relu_bwd_ops,
            bwd_ops_mask_pass,
            two_ops,
            nn,
            add_fused,
            add_ops,
            add_nn,
        })
    } else {
        None
    };
    let composite = if args.composite {
        let step = time(dev, iters, || {
            Ok(bn.forward_composite_t(xt, None, false, true)?.backward()?)
        })?;
        let eval = time(dev, iters, || {
            Ok(bn.forward_composite_t(xt, None, false, false)?)
        })?;
        Some((step, eval))
    } else {
        None
    };
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    Ok(Row {
        label: format!("{} {:?}", dims.join("x"), dtype).to_lowercase(),
        shape: shape.to_vec(),
        dtype,
        copy,
        bookkeeping,
        fwd,
        bwd,
        bwd_ops,
        step,
        eval,
        nn_step,
        enqueue,
        relu,
        composite,
        bytes: bytes as f64,
    })
}

/// `cuda_memory::keep_freed_memory` where the crate has its CUDA kernels.
fn keep_gpu_memory(dev: &Device) -> Result<bool> {
    #[cfg(feature = "cuda")]
    {
        Ok(candle_syncbn::cuda_memory::keep_freed_memory(dev)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dev;
        Ok(false)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Before any other thread starts (rayon's pool starts on first use).
    let on_cpu = args.device == "cpu";
    let kept_on_cpu = args.keep_freed_memory && on_cpu && candle_syncbn::cpu::keep_freed_memory();
    if args.keep_freed_memory && on_cpu && !kept_on_cpu {
        bail!("--keep-freed-memory: not available with this C library (glibc only)")
    }
    let dev = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => bail!("unknown device {other}"),
    };
    let kept = kept_on_cpu || (args.keep_freed_memory && dev.is_cuda() && keep_gpu_memory(&dev)?);
    if args.keep_freed_memory && !kept {
        bail!("--keep-freed-memory: this GPU allocates without a memory pool")
    }
    let shapes: Vec<Vec<usize>> = args
        .shapes
        .as_deref()
        .unwrap_or(SUITE)
        .split(',')
        .map(parse_shape)
        .collect::<Result<_>>()?;
    let dtypes: Vec<DType> = args
        .dtypes
        .split(',')
        .map(parse_dtype)
        .collect::<Result<_>>()?;
    let in_place = candle_accumulates_in_place()?;
    let warmup_ms = args
        .warmup_ms
        .unwrap_or(if dev.is_cuda() { 500 } else { 0 });
    if let (true, Some(shape), Some(&dtype)) = (warmup_ms > 0, shapes.first(), dtypes.first()) {
        warm_up(&dev, shape, dtype, warmup_ms)?;
    }
    println!(
        "device: {:?}, {} threads, median of {} runs, allocator: {}, candle's gradient accumulation: {}",
        dev.location(),
        rayon::current_num_threads(),
        args.iters,
        if kept { "keep_freed_memory" } else { "default" },
        if in_place {
            "in place (patched candle-core, scripts/with-patched-candle.sh)"
        } else {
            "zeros + add (candle-core as released)"
        }
    );
    println!(
        "{:<26} {:>7} | {:>7} {:>4} | {:>7} {:>4} | {:>7} {:>4} | {:>7} {:>7} | {:>7} {:>7} | {:>8} {:>7}",
        "shape dtype",
        "copy",
        "fwd",
        "%cp",
        "bwd ops",
        "%cp",
        "eval",
        "%cp",
        "step",
        "bwd",
        "kernels",
        "bookkp",
        "nn step",
        "speedup"
    );
    println!(
        "{:<26} {:>7} | {:>12} | {:>12} | {:>12} | {:>15} | {:>15} | {:>16}",
        "", "GB/s", "ms", "ms", "ms", "ms (autograd)", "ms", "ms"
    );
    let mut json_rows = Vec::new();
    let mut relu_rows = Vec::new();
    let mut composite_rows = Vec::new();
    for shape in &shapes {
        for &dtype in &dtypes {
            let r = bench_one(&dev, shape, dtype, &args)?;
            json_rows.push(json_row(&r, &args.device));
            if let Some(relu) = &r.relu {
                relu_rows.push(relu_line(&r.label, relu));
            }
            if let Some((step, eval)) = r.composite {
                composite_rows.push(format!(
                    "{:<26} {:>9.3} {:>9.3} {:>6.1}x | {:>9.3} {:>9.3} {:>6.1}x",
                    r.label,
                    step * 1e3,
                    r.step * 1e3,
                    step / r.step,
                    eval * 1e3,
                    r.eval * 1e3,
                    eval / r.eval
                ));
            }
            let gbs = |bytes: f64, t: f64| bytes / t / 1e9;
            let copy_bw = gbs(2.0 * r.bytes, r.copy);
            let pct = |passes: f64, t: f64| 100.0 * gbs(passes * r.bytes, t) / copy_bw;
            let nn = r
                .nn_step
                .map(|t| format!("{:.2}", t * 1e3))
                .unwrap_or_else(|| "-".into());
            let speedup = r
                .nn_step
                .map(|t| format!("{:.1}x", t / r.step))
                .unwrap_or_else(|| "-".into());
            println!(
                "{:<26} {:>7.1} | {:>7.3} {:>3.0}% | {:>7.3} {:>3.0}% | {:>7.3} {:>3.0}% | {:>7.3} {:>7.3} | {:>7.3} {:>7.3} | {:>8} {:>7}",
                r.label,
                copy_bw,
                r.fwd * 1e3,
                pct(3.0, r.fwd),
                r.bwd_ops * 1e3,
                pct(5.0, r.bwd_ops),
                r.eval * 1e3,
                pct(2.0, r.eval),
                r.step * 1e3,
                r.bwd * 1e3,
                (r.fwd + r.bwd_ops) * 1e3,
                r.bookkeeping * 1e3,
                nn,
                speedup
            );
            if let Some(e) = r.enqueue {
                println!(
                    "{:<26} host time to enqueue a training step: {:.3} ms of {:.3} ms",
                    "",
                    e * 1e3,
                    r.step * 1e3
                );
            }
        }
    }
    if in_place {
        println!(
            "kernels = fwd + bwd ops (our ops alone); bookkp = the autograd bookkeeping of candle-core \
             as released for one op of this shape (ones_like seed, zeros_like + add); this build \
             accumulates gradients in place, so step and nn step pay only the seed."
        );
    } else {
        println!(
            "kernels = fwd + bwd ops (our ops alone); bookkp = candle's autograd bookkeeping \
             for one op of this shape (ones_like seed, zeros_like + add), part of step and of nn step."
        );
    }
    if !relu_rows.is_empty() {
        println!();
        println!(
            "training steps (forward, then backward() through autograd), ms; ratios: that step / ours fused"
        );
        println!(
            "bwd ops: our backward kernels after the fused ReLU, the mask recomputed in both passes; mask 1st: the same after a mask pass (ReluGrad)"
        );
        println!(
            "{:<26} {:>9} {:>8} {:>8} | {:>14} {:>6} | {:>14} {:>6} || {:>9} | {:>14} {:>6} | {:>14} {:>6}",
            "shape dtype",
            "relu(bn)",
            "bwd ops",
            "mask 1st",
            "bn, relu",
            "ratio",
            "nn bn, relu",
            "ratio",
            "+z fused",
            "bn, +z, relu",
            "ratio",
            "nn, +z, relu",
            "ratio"
        );
        for line in relu_rows {
            println!("{line}");
        }
    }
    if !composite_rows.is_empty() {
        println!();
        println!(
            "the layer composed of candle ops (forward_composite_t) against the kernels, ms; ratio: composed / kernels"
        );
        println!(
            "{:<26} {:>9} {:>9} {:>7} | {:>9} {:>9} {:>7}",
            "shape dtype", "comp step", "step", "ratio", "comp eval", "eval", "ratio"
        );
        for line in composite_rows {
            println!("{line}");
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, format!("[\n{}\n]\n", json_rows.join(",\n")))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Whether the candle-core of this build stores an op's first gradient
/// contribution as is (the copy written by `benches/candle_inplace_grads.py`)
/// rather than adding it to zeros (candle-core as released). After `a + b`,
/// both leaves then hold the one gradient buffer that `add`'s backward passes on.
fn candle_accumulates_in_place() -> Result<bool> {
    let a = Var::zeros(4, DType::F32, &Device::Cpu)?;
    let b = Var::zeros(4, DType::F32, &Device::Cpu)?;
    let grads = (a.as_tensor() + b.as_tensor())?.backward()?;
    let buffer = |v: &Var| -> Result<usize> {
        let g = grads
            .get(v.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("no gradient for a leaf of `a + b`"))?;
        let (storage, _) = g.storage_and_layout();
        Ok(&*storage as *const candle::Storage as usize)
    };
    Ok(buffer(&a)? == buffer(&b)?)
}

/// One line of the batch norm + ReLU table.
fn relu_line(label: &str, r: &ReluRow) -> String {
    let other = |t: Option<f64>, fused: f64| match t {
        Some(t) => format!("{:>14.3} {:>5.2}x", t * 1e3, t / fused),
        None => format!("{:>14} {:>6}", "-", "-"),
    };
    format!(
        "{label:<26} {:>9.3} {:>8.3} {:>8.3} | {} | {} || {:>9.3} | {} | {}",
        r.fused * 1e3,
        r.bwd_ops * 1e3,
        r.bwd_ops_mask_pass * 1e3,
        other(Some(r.two_ops), r.fused),
        other(r.nn, r.fused),
        r.add_fused * 1e3,
        other(Some(r.add_ops), r.add_fused),
        other(r.add_nn, r.add_fused),
    )
}

/// One row as a JSON object (times in milliseconds).
fn json_row(r: &Row, device: &str) -> String {
    let shape: Vec<String> = r.shape.iter().map(|d| d.to_string()).collect();
    let ms = |t: f64| format!("{:.6}", t * 1e3);
    format!(
        "  {{\"device\": \"{device}\", \"shape\": [{}], \"dtype\": \"{}\", \"copy_ms\": {}, \"bookkeeping_ms\": {}, \"fwd_ms\": {}, \"bwd_ms\": {}, \"bwd_ops_ms\": {}, \"step_ms\": {}, \"eval_ms\": {}, \"candle_nn_step_ms\": {}{}}}",
        shape.join(", "),
        format!("{:?}", r.dtype).to_lowercase(),
        ms(r.copy),
        ms(r.bookkeeping),
        ms(r.fwd),
        ms(r.bwd),
        ms(r.bwd_ops),
        ms(r.step),
        ms(r.eval),
        r.nn_step.map(ms).unwrap_or_else(|| "null".into()),
        relu_json(r.relu.as_ref())
    )
}

/// The `--relu` fields of a JSON row (empty without `--relu`).
fn relu_json(r: Option<&ReluRow>) -> String {
    let Some(r) = r else {
        return String::new();
    };
    let ms = |t: f64| format!("{:.6}", t * 1e3);
    format!(
        ", \"relu_step_ms\": {}, \"relu_bwd_ops_ms\": {}, \"relu_bwd_ops_mask_pass_ms\": {}, \"bn_then_relu_step_ms\": {}, \"candle_nn_relu_step_ms\": {}, \"add_relu_step_ms\": {}, \"bn_add_relu_ops_step_ms\": {}, \"candle_nn_add_relu_step_ms\": {}",
        ms(r.fused),
        ms(r.bwd_ops),
        ms(r.bwd_ops_mask_pass),
        ms(r.two_ops),
        r.nn.map(ms).unwrap_or_else(|| "null".into()),
        ms(r.add_fused),
        ms(r.add_ops),
        r.add_nn.map(ms).unwrap_or_else(|| "null".into())
    )
}
