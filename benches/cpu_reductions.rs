//! Criterion benchmark of the CPU reduction kernels on one thread with data in
//! cache: the batch statistics of the forward and the gradient sums of the
//! backward (also with a fused ReLU's mask recomputed from x), f32, bf16 and f16, over long rows (112×112 maps) and short ones
//! (14×14 and 7×7), and `(N, C)` inputs. Out of cache these kernels share the memory's bandwidth with
//! everything else on the machine, and the run-to-run swings of that
//! bandwidth hide changes to the kernels; in cache their own speed shows.
//!
//! `cargo bench --bench cpu_reductions` (elements per second per row; with
//! `SYNCBN_BENCH_CPU_TIME=1`, by the process's CPU time, for a shared machine).

#[path = "common/cpu_time.rs"]
mod cpu_time;

use candle::{Layout, Shape};
use candle_syncbn::cpu::{batch_stats, grad_sums, ReluMask};
use candle_syncbn::layout::ChannelView;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};

/// The benchmarked `(N, C, H·W)` inputs: 800k elements each (3.2 MB in f32),
/// in L3. The last two are `BatchNorm1d`'s `(N, C)`: channels innermost,
/// 1024 and 32 of them.
const SHAPES: [(usize, usize, usize); 5] = [
    (1, 64, 112 * 112),
    (32, 128, 14 * 14),
    (32, 512, 7 * 7),
    (784, 1024, 1),
    (25_000, 32, 1),
];

fn reductions(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread pool");
    let mut group = c.benchmark_group("cpu_reductions_1_thread");
    for (n, channels, spatial) in SHAPES {
        let len = n * channels * spatial;
        let layout = Layout::contiguous(Shape::from((n, channels, spatial)));
        let view = ChannelView::new(&layout, 1).expect("a channel view");
        let xf: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 3.0)
            .collect();
        let xb: Vec<bf16> = xf.iter().map(|&x| bf16::from_f32(x)).collect();
        // The gradient sums read dy and x: two buffers, as in a real backward.
        let gf: Vec<f32> = (0..len)
            .map(|i| ((i * 104_729) % 61) as f32 * 0.1 - 3.0)
            .collect();
        let gb: Vec<bf16> = gf.iter().map(|&g| bf16::from_f32(g)).collect();
        let xh: Vec<f16> = xf.iter().map(|&x| f16::from_f32(x)).collect();
        let gh: Vec<f16> = gf.iter().map(|&g| f16::from_f32(g)).collect();
        let mean = vec![1.5f64; channels];
        // About half of the outputs positive.
        let relu = ReluMask::<f32>::new(&vec![0.7; channels], &vec![0.05; channels]);
        let name = format!("{n}x{channels}x{spatial}");
        group.throughput(Throughput::Elements(len as u64));
        group.bench_function(BenchmarkId::new("batch_stats_f32", &name), |b| {
            pool.install(|| cpu_time::time(b, || batch_stats(&xf, &view)))
        });
        group.bench_function(BenchmarkId::new("batch_stats_bf16", &name), |b| {
            pool.install(|| cpu_time::time(b, || batch_stats(&xb, &view)))
        });
        group.bench_function(BenchmarkId::new("batch_stats_f16", &name), |b| {
            pool.install(|| cpu_time::time(b, || batch_stats(&xh, &view)))
        });
        group.bench_function(BenchmarkId::new("grad_sums_f32", &name), |b| {
            pool.install(|| cpu_time::time(b, || grad_sums(&gf, &view, &xf, &view, &mean, None)))
        });
        group.bench_function(BenchmarkId::new("grad_sums_bf16", &name), |b| {
            pool.install(|| cpu_time::time(b, || grad_sums(&gb, &view, &xb, &view, &mean, None)))
        });
        group.bench_function(BenchmarkId::new("grad_sums_f16", &name), |b| {
            pool.install(|| cpu_time::time(b, || grad_sums(&gh, &view, &xh, &view, &mean, None)))
        });
        group.bench_function(BenchmarkId::new("grad_sums_relu_f32", &name), |b| {
            pool.install(|| {
                cpu_time::time(b, || grad_sums(&gf, &view, &xf, &view, &mean, Some(&relu)))
            })
        });
        group.bench_function(BenchmarkId::new("grad_sums_relu_bf16", &name), |b| {
            pool.install(|| {
                cpu_time::time(b, || grad_sums(&gb, &view, &xb, &view, &mean, Some(&relu)))
            })
        });
        group.bench_function(BenchmarkId::new("grad_sums_relu_f16", &name), |b| {
            pool.install(|| {
                cpu_time::time(b, || grad_sums(&gh, &view, &xh, &view, &mean, Some(&relu)))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, reductions);
criterion_main!(benches);
