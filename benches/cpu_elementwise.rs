//! Criterion benchmark of the CPU element-wise passes on one thread with data
//! in cache: the normalization of the forward (also the eval forward, which
//! is the same pass with the running statistics' coefficients) and the input
//! gradient of the backward, f32, bf16 and f16, over long rows (112×112 maps),
//! short ones (14×14 and 7×7) and `(N, C)` inputs (1024 and 32 channels).
//! As in `cpu_reductions`, in cache the kernels' own speed shows, which the
//! memory's run-to-run swings hide in whole-tensor timings.
//!
//! `cargo bench --bench cpu_elementwise` (elements per second per row; with
//! `SYNCBN_BENCH_CPU_TIME=1`, by the process's CPU time, for a shared machine).

#[path = "common/cpu_time.rs"]
mod cpu_time;

use candle::{Layout, Shape};
use candle_syncbn::cpu::{backward_elemt, normalize, ChannelCoefficients};
use candle_syncbn::layout::ChannelView;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};

/// The benchmarked `(N, C, H·W)` inputs: 800k elements each (3.2 MB in f32),
/// in L3. The last two are `BatchNorm1d`'s `(N, C)`: channels innermost, with
/// 1024 and with 32 channels (rows shorter than the compiler's unrolled
/// vector loop, which run 8 at a time as one row of 256).
const SHAPES: [(usize, usize, usize); 5] = [
    (1, 64, 112 * 112),
    (32, 128, 14 * 14),
    (32, 512, 7 * 7),
    (784, 1024, 1),
    (25_000, 32, 1),
];

fn elementwise(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread pool");
    let mut group = c.benchmark_group("cpu_elementwise_1_thread");
    for (n, channels, spatial) in SHAPES {
        let len = n * channels * spatial;
        let layout = if spatial == 1 {
            Layout::contiguous(Shape::from((n, channels)))
        } else {
            Layout::contiguous(Shape::from((n, channels, spatial)))
        };
        let view = ChannelView::new(&layout, 1).expect("a channel view");
        let xf: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 3.0)
            .collect();
        let xb: Vec<bf16> = xf.iter().map(|&x| bf16::from_f32(x)).collect();
        let gf: Vec<f32> = (0..len)
            .map(|i| ((i * 104_729) % 61) as f32 * 0.1 - 3.0)
            .collect();
        let gb: Vec<bf16> = gf.iter().map(|&g| bf16::from_f32(g)).collect();
        let xh: Vec<f16> = xf.iter().map(|&x| f16::from_f32(x)).collect();
        let gh: Vec<f16> = gf.iter().map(|&g| f16::from_f32(g)).collect();
        let per_channel = |f: fn(usize) -> f64| (0..channels).map(f).collect::<Vec<f64>>();
        let mean = per_channel(|c| 1.5 + c as f64 * 1e-3);
        let k = ChannelCoefficients::<f32>::new(
            &mean,
            &per_channel(|c| -0.01 - c as f64 * 1e-5),
            &per_channel(|c| 0.7 + c as f64 * 1e-4),
            &per_channel(|c| 0.05 * c as f64),
        );
        let name = format!("{n}x{channels}x{spatial}");
        group.throughput(Throughput::Elements(len as u64));
        group.bench_function(BenchmarkId::new("normalize_f32", &name), |b| {
            pool.install(|| cpu_time::time(b, || normalize(&xf, &view, &k, None, false)))
        });
        group.bench_function(BenchmarkId::new("normalize_bf16", &name), |b| {
            pool.install(|| cpu_time::time(b, || normalize(&xb, &view, &k, None, false)))
        });
        group.bench_function(BenchmarkId::new("normalize_f16", &name), |b| {
            pool.install(|| cpu_time::time(b, || normalize(&xh, &view, &k, None, false)))
        });
        group.bench_function(BenchmarkId::new("input_grad_f32", &name), |b| {
            pool.install(|| cpu_time::time(b, || backward_elemt(&gf, &view, &xf, &view, &k, None)))
        });
        group.bench_function(BenchmarkId::new("input_grad_bf16", &name), |b| {
            pool.install(|| cpu_time::time(b, || backward_elemt(&gb, &view, &xb, &view, &k, None)))
        });
        group.bench_function(BenchmarkId::new("input_grad_f16", &name), |b| {
            pool.install(|| cpu_time::time(b, || backward_elemt(&gh, &view, &xh, &view, &k, None)))
        });
    }
    group.finish();
}

criterion_group!(benches, elementwise);
criterion_main!(benches);
