//! The allocator policy that CPU training with candle wants (behind
//! [`crate::keep_freed_memory`]); and the CPU kernels (public only with the unstable `internals`
//! feature, for benchmarks): parallel over channels and chunks (rayon),
//! vectorizable inner loops with several accumulators, statistics combined in
//! f64 in a fixed order (results do not depend on the number of threads).

mod allocator;
mod elementwise;
mod reductions;

pub(crate) use allocator::keep_freed_host_memory;
#[cfg(feature = "internals")]
pub use kernels::*;
#[cfg(not(feature = "internals"))]
pub(crate) use kernels::*;

/// The kernels, re-exported with the visibility the `internals` feature gives.
mod kernels {
    pub use super::elementwise::{
        backward_elemt, normalize, relu_grad, ChannelCoefficients, ReluMask,
    };
    pub use super::reductions::{batch_stats, grad_sums};
}

use crate::element::{Accum, Element, LaneCpu, CONVERT_LANES};
use crate::layout::ChannelView;

/// Defines `$name`, which runs `$body` compiled for AVX2 when the CPU has it
/// (checked at run time) and for the baseline target otherwise; with `wide fn`,
/// first for AVX-512 where the CPU has it (element-wise loops, which the
/// compiler widens to 16 lanes; the explicit 8-lane reductions gain nothing
/// there and lose on some CPUs). Both tiers enable F16C (every CPU with
/// AVX2 has it), so the f16 conversions of [`Element::to_acc_lanes`] and
/// [`Element::from_acc_lanes`] inline as single instructions there. The
/// arithmetic is the same on every path
/// (explicit lanes, no FMA contraction), so results do not depend on the path
/// taken.
macro_rules! multiversion {
    (@tiers $wide:literal $(#[$meta:meta])* fn $name:ident<T: Element>($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        fn $name<T: Element>($($arg: $ty),*) -> $ret {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn generic<T: Element>($($arg: $ty),*) -> $ret $body
            #[cfg(test)]
            if crate::cpu::BASELINE_ONLY.with(|b| b.get()) {
                return generic::<T>($($arg),*);
            }
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
                #[allow(clippy::too_many_arguments)]
                fn avx512<T: Element>($($arg: $ty),*) -> $ret {
                    generic::<T>($($arg),*)
                }
                if $wide
                    && std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("f16c")
                {
                    // SAFETY: the CPU supports these features, checked just above.
                    return unsafe { avx512::<T>($($arg),*) };
                }
                #[target_feature(enable = "avx2,f16c")]
                #[allow(clippy::too_many_arguments)]
                fn avx2<T: Element>($($arg: $ty),*) -> $ret {
                    generic::<T>($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
                    // SAFETY: the CPU supports AVX2 and F16C, checked just above.
                    return unsafe { avx2::<T>($($arg),*) };
                }
            }
            generic::<T>($($arg),*)
        }
    };
    ($(#[$meta:meta])* wide fn $($rest:tt)*) => {
        multiversion!(@tiers true $(#[$meta])* fn $($rest)*);
    };
    ($(#[$meta:meta])* fn $($rest:tt)*) => {
        multiversion!(@tiers false $(#[$meta])* fn $($rest)*);
    };
}
pub(crate) use multiversion;

#[cfg(test)]
thread_local! {
    /// Test hook: on this thread, every [`multiversion!`] kernel runs its
    /// baseline body (what AArch64 and CPUs without AVX2 run), whatever the
    /// CPU has.
    static BASELINE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// [`Element::to_acc`] of a run of `N` values (a multiple of
/// [`CONVERT_LANES`]), converted [`CONVERT_LANES`] at a time.
#[inline(always)]
fn to_acc_run<T: Element, const N: usize>(xs: &[T; N], cpu: LaneCpu) -> [T::Acc; N] {
    let mut out = [<T::Acc as Accum>::ZERO; N];
    for (o, x) in out
        .chunks_exact_mut(CONVERT_LANES)
        .zip(xs.chunks_exact(CONVERT_LANES))
    {
        o.copy_from_slice(&T::to_acc_lanes(x.try_into().expect("a run of lanes"), cpu));
    }
    out
}

/// Elements per statistics block: small enough to stay in L1 for the second
/// pass that a block whose pivot lies far from its mean takes.
const BLOCK: usize = 4096;
/// Elements a parallel task should cover at least, so scheduling stays cheap.
const TASK: usize = 1 << 15;

/// Row `(o, c)` of `x` (the `inner` elements of channel `c` at outer index `o`),
/// borrowed when contiguous, else gathered into `buf`.
#[inline]
fn channel_row<'a, T: Copy>(
    x: &'a [T],
    v: &ChannelView,
    o: usize,
    c: usize,
    buf: &'a mut Vec<T>,
) -> &'a [T] {
    let start = v.index(o, c, 0);
    if v.inner_stride == 1 || v.inner <= 1 {
        &x[start..start + v.inner]
    } else {
        buf.clear();
        buf.extend((0..v.inner).map(|i| x[start + i * v.inner_stride]));
        buf
    }
}

/// Row `o` of a channel-innermost `x` (its `channels` elements), borrowed when
/// contiguous, else gathered into `buf`.
#[inline]
fn spatial_row<'a, T: Copy>(x: &'a [T], v: &ChannelView, o: usize, buf: &'a mut Vec<T>) -> &'a [T] {
    let start = v.index(o, 0, 0);
    if v.channel_stride == 1 || v.channels <= 1 {
        &x[start..start + v.channels]
    } else {
        buf.clear();
        buf.extend((0..v.channels).map(|c| x[start + c * v.channel_stride]));
        buf
    }
}

/// Whether the rows of a channel-innermost `v` follow each other without a
/// gap, so that consecutive rows form one contiguous slice.
#[inline(always)]
fn dense_rows(v: &ChannelView) -> bool {
    (v.channel_stride == 1 || v.channels <= 1) && (v.outer_stride == v.channels || v.outer <= 1)
}

/// Rows `o..o + count` of a channel-innermost `x`, one after the other
/// (`count · channels` elements), borrowed when the rows are dense, else
/// gathered into `buf`.
#[inline(always)]
fn spatial_rows<'a, T: Copy>(
    x: &'a [T],
    v: &ChannelView,
    o: usize,
    count: usize,
    buf: &'a mut Vec<T>,
) -> &'a [T] {
    if count == 1 {
        return spatial_row(x, v, o, buf);
    }
    let start = v.index(o, 0, 0);
    if dense_rows(v) {
        &x[start..start + count * v.channels]
    } else {
        buf.clear();
        for r in o..o + count {
            let start = v.index(r, 0, 0);
            buf.extend((0..v.channels).map(|c| x[start + c * v.channel_stride]));
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::element::{Accum, Element};
    use candle::Layout;
    use half::{bf16, f16};

    /// Every kernel gives the same bits on the widest path the CPU has
    /// (AVX-512 or AVX2, detected at run time) as on the baseline path that
    /// AArch64 and x86-64 CPUs without AVX2 run: the lanes are explicit and
    /// nothing is contracted into FMAs, so the compiler's choice of vectors
    /// changes no result. Statistics and gradient sums (with and without the
    /// fused ReLU's mask), normalization (with ReLU, with a residual), input
    /// gradient (with and without the mask) and the ReLU mask pass; short,
    /// long, gathered and channel-innermost rows (register tiles, grouped
    /// short rows); f32, f64, f16 and bf16.
    #[test]
    fn widest_and_baseline_paths_give_the_same_bits() {
        fn outputs<T: Element>(x: &[T], g: &[T], v: &ChannelView) -> Vec<Vec<u64>> {
            let bits = |out: &[T]| -> Vec<u64> {
                out.iter().map(|e| e.to_acc().to_f64().to_bits()).collect()
            };
            let c = v.channels;
            let per = |a: f64, b: f64| -> Vec<f64> {
                (0..c).map(|ch| a + b * ((ch * 37) % 11) as f64).collect()
            };
            let stats = batch_stats(x, v);
            let mean: Vec<f64> = (0..c).map(|ch| stats[c + ch] / stats[ch]).collect();
            let mask = ReluMask::<T::Acc>::new(&per(0.7, -0.13), &per(-0.2, 0.05));
            let k = ChannelCoefficients::<T::Acc>::new(
                &mean,
                &per(-0.01, 0.003),
                &per(1.1, -0.07),
                &per(0.3, -0.06),
            );
            let mut out = vec![
                stats.iter().map(|s| s.to_bits()).collect(),
                grad_sums(g, v, x, v, &mean, None)
                    .iter()
                    .map(|s| s.to_bits())
                    .collect(),
                grad_sums(g, v, x, v, &mean, Some(&mask))
                    .iter()
                    .map(|s| s.to_bits())
                    .collect(),
            ];
            for relu in [false, true] {
                out.push(bits(&normalize(x, v, &k, None, relu)));
            }
            out.push(bits(&normalize(x, v, &k, Some((g, v)), true)));
            out.push(bits(&backward_elemt(g, v, x, v, &k, None)));
            out.push(bits(&backward_elemt(g, v, x, v, &k, Some(&mask))));
            out.push(bits(&relu_grad(g, v, x, v)));
            out
        }
        fn check<T: Element>(to: impl Fn(f32) -> T, pool: &rayon::ThreadPool) {
            let mut layouts: Vec<Layout> = [1usize, 7, 49, 196, 300, 1000, 4099]
                .iter()
                .map(|&s| Layout::contiguous((3, 5, s)))
                .collect();
            for &(rows, c) in &[
                (301usize, 16usize),
                (301, 32),
                (150, 48),
                (301, 64),
                (97, 100),
                (37, 1024),
            ] {
                layouts.push(Layout::contiguous((rows, c)));
            }
            // Channels-last storage read through the channel axis (gathered rows).
            layouts.push(Layout::contiguous((3, 49, 24)).permute(&[0, 2, 1]).unwrap());
            for layout in &layouts {
                let v = ChannelView::new(layout, 1).unwrap();
                let len = layout.shape().elem_count();
                let x: Vec<T> = (0..len)
                    .map(|i| to(((i * 7919) % 1013) as f32 * 0.011 - 4.0))
                    .collect();
                let g: Vec<T> = (0..len)
                    .map(|i| to(((i * 104_729) % 61) as f32 * 0.1 - 3.0))
                    .collect();
                // One thread, so that the thread-local switch covers every task.
                let run = |baseline: bool| {
                    pool.install(|| {
                        BASELINE_ONLY.with(|b| b.set(baseline));
                        let out = outputs(&x, &g, &v);
                        BASELINE_ONLY.with(|b| b.set(false));
                        out
                    })
                };
                let (widest, baseline) = (run(false), run(true));
                for (i, (w, b)) in widest.iter().zip(&baseline).enumerate() {
                    assert!(
                        w == b,
                        "{:?} {:?}: output {i} differs between the widest and the baseline path",
                        T::DTYPE,
                        layout.shape()
                    );
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("this CPU has no AVX2: both runs take the baseline path");
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        check::<f32>(|v| v, &pool);
        check::<f64>(f64::from, &pool);
        check::<f16>(f16::from_f32, &pool);
        check::<bf16>(bf16::from_f32, &pool);
    }

    /// Runs of consecutive channel-innermost rows: borrowed from dense rows,
    /// gathered from rows with gaps (and from a channel stride other than 1),
    /// the same elements either way.
    #[test]
    fn spatial_rows_borrow_dense_rows_and_gather_the_others() {
        let x: Vec<u32> = (0..200).collect();
        let dense = Layout::contiguous((10, 4));
        let gapped = Layout::contiguous((10, 7)).narrow(1, 2, 4).unwrap();
        let strided = Layout::contiguous((4, 10)).transpose(0, 1).unwrap();
        for (layout, is_dense) in [(&dense, true), (&gapped, false), (&strided, false)] {
            let v = ChannelView::new(layout, 1).unwrap();
            assert_eq!(dense_rows(&v), is_dense);
            let mut buf = Vec::new();
            let got = spatial_rows(&x, &v, 3, 5, &mut buf).to_vec();
            let want: Vec<u32> = (3..8)
                .flat_map(|o| (0..4).map(move |c| (o, c)))
                .map(|(o, c)| x[v.index(o, c, 0)])
                .collect();
            assert_eq!(got, want, "{layout:?}");
            assert_eq!(buf.is_empty(), is_dense);
        }
    }
}
