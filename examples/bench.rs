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
//!
//! Every timed call returns what it made (outputs, the `GradStore`), and its
//! timing ends after that is dropped: a training loop pays for freeing them.
//!
//! With `--serve`, no table: the process answers timing requests on standard
//! input (`examples/bench/serve.rs`), so that `benches/compare_cpu.py` can
//! alternate our calls with PyTorch's, repetition by repetition.

#[path = "bench/serve.rs"]
mod serve;
#[path = "bench/workload.rs"]
mod workload;

use anyhow::{bail, Result};
use candle::{DType, Device, Var};
use clap::Parser;
use std::time::Instant;
use workload::{parse_dtype, parse_shape, timed_calls, Case, Parts, Work};

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
    /// Keep freed memory for reuse, for candle-nn's rows too, with
    /// `candle_syncbn::keep_freed_memory(&device)`: on the CPU glibc keeps
    /// freed memory instead of returning it to the system, on CUDA the
    /// memory pool keeps it across synchronizations (as PyTorch's caching
    /// allocator).
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
    /// Instead of the table, answer timing requests on standard input, one a
    /// line (`benches/compare_cpu.py` drives it, alternating our calls with
    /// PyTorch's; the protocol is in `examples/bench/serve.rs`).
    #[arg(long)]
    serve: bool,
}

const SUITE: &str =
    "32x64x112x112,32x256x56x56,32x512x28x28,32x1024x14x14,32x2048x7x7,4096x1024,2x64x16x56x56";

/// Median seconds of `iters` runs of `work` after one warm-up run.
fn time_work(case: &mut Case, work: Work, iters: usize) -> Result<f64> {
    let dev = case.device().clone();
    let samples = samples(&dev, iters, || case.run(work))?;
    Ok(samples[samples.len() / 2])
}

/// Sorted seconds of `iters` runs of `f` after one warm-up run.
fn samples<T>(dev: &Device, iters: usize, f: impl FnMut() -> Result<T>) -> Result<Vec<f64>> {
    let mut samples = timed_calls(dev, 1, iters, f)?;
    samples.sort_by(f64::total_cmp);
    Ok(samples)
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
    let mut case = Case::new(dev, shape, dtype, Parts::default())?;
    let start = Instant::now();
    while start.elapsed().as_millis() < u128::from(ms) {
        drop(case.run(Work::Step)?);
        dev.synchronize()?;
    }
    Ok(())
}

fn bench_one(dev: &Device, shape: &[usize], dtype: DType, args: &Args) -> Result<Row> {
    let parts = Parts {
        nn: !args.no_candle_nn,
        relu: args.relu,
    };
    let mut case = Case::new(dev, shape, dtype, parts)?;
    let case = &mut case;
    let iters = args.iters;

    let copy = if dev.is_cpu() {
        // The best of 3·iters: a ceiling, so that a noisy run does not
        // flatter the kernels.
        samples(dev, 3 * iters, || case.run(Work::Copy))?[0]
    } else {
        time_work(case, Work::Copy, iters)?
    };
    let fwd = time_work(case, Work::Fwd, iters)?;
    let bwd = time_work(case, Work::Bwd, iters)?;
    let step = time_work(case, Work::Step, iters)?;
    let eval = time_work(case, Work::Eval, iters)?;
    let bookkeeping = time_work(case, Work::Bookkeeping, iters)?;
    let bwd_ops = time_work(case, Work::BwdOps, iters)?;

    // On a GPU, a step must be enqueued without waiting for the device: time
    // the host side of a step (no synchronization) against the whole step.
    let enqueue = if dev.is_cuda() {
        let mut best = f64::MAX;
        for _ in 0..iters {
            dev.synchronize()?;
            let t = Instant::now();
            let grads = case.run(Work::Step)?;
            best = best.min(t.elapsed().as_secs_f64());
            dev.synchronize()?;
            drop(grads);
        }
        Some(best)
    } else {
        None
    };

    // candle-nn's steps take 10 times ours: 3 runs each.
    let nn = |case: &mut Case, work| -> Result<Option<f64>> {
        parts
            .nn
            .then(|| time_work(case, work, iters.min(3)))
            .transpose()
    };
    let nn_step = nn(case, Work::NnStep)?;
    let relu = if parts.relu {
        Some(ReluRow {
            fused: time_work(case, Work::ReluStep, iters)?,
            bwd_ops: time_work(case, Work::ReluBwdOps, iters)?,
            bwd_ops_mask_pass: time_work(case, Work::ReluBwdOpsMaskPass, iters)?,
            two_ops: time_work(case, Work::BnThenReluStep, iters)?,
            nn: nn(case, Work::NnReluStep)?,
            add_fused: time_work(case, Work::AddReluStep, iters)?,
            add_ops: time_work(case, Work::BnAddReluStep, iters)?,
            add_nn: nn(case, Work::NnAddReluStep)?,
        })
    } else {
        None
    };
    let composite = if args.composite {
        Some((
            time_work(case, Work::CompositeStep, iters)?,
            time_work(case, Work::CompositeEval, iters)?,
        ))
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
        bytes: case.bytes() as f64,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Before any other thread starts (rayon's pool starts on first use).
    let on_cpu = args.device == "cpu";
    let kept_on_cpu =
        args.keep_freed_memory && on_cpu && candle_syncbn::keep_freed_memory(&Device::Cpu)?;
    if args.keep_freed_memory && on_cpu && !kept_on_cpu {
        bail!("--keep-freed-memory: not available with this C library (glibc only)")
    }
    let dev = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => bail!("unknown device {other}"),
    };
    let kept = kept_on_cpu
        || (args.keep_freed_memory && dev.is_cuda() && candle_syncbn::keep_freed_memory(&dev)?);
    if args.keep_freed_memory && !kept {
        bail!("--keep-freed-memory: this GPU allocates without a memory pool")
    }
    if args.serve {
        return serve::serve(&dev, kept, candle_accumulates_in_place()?);
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
