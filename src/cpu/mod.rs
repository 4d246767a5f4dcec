//! CPU kernels: parallel over channels and chunks (rayon), vectorizable inner
//! loops with several accumulators, statistics combined in f64 in a fixed order
//! (results do not depend on the number of threads); and
//! [`keep_freed_memory`], the allocator policy that CPU training with candle wants.

mod allocator;
mod elementwise;
mod reductions;

pub use allocator::keep_freed_memory;
pub use elementwise::{backward_elemt, normalize, relu_grad, ChannelCoefficients, ReluMask};
pub use reductions::{batch_stats, grad_sums};

use crate::ops::layout::ChannelView;

/// Defines `$name`, which runs `$body` compiled for AVX2 when the CPU has it
/// (checked at run time) and for the baseline target otherwise; with `wide fn`,
/// first for AVX-512 where the CPU has it (element-wise loops, which the
/// compiler widens to 16 lanes; the explicit 8-lane reductions gain nothing
/// there and lose on some CPUs). The arithmetic is the same on every path
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
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
                #[allow(clippy::too_many_arguments)]
                fn avx512<T: Element>($($arg: $ty),*) -> $ret {
                    generic::<T>($($arg),*)
                }
                if $wide
                    && std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU supports these features, checked just above.
                    return unsafe { avx512::<T>($($arg),*) };
                }
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                fn avx2<T: Element>($($arg: $ty),*) -> $ret {
                    generic::<T>($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, checked just above.
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

/// Elements per two-pass block: small enough to stay in L1 for the second pass.
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
    use candle::Layout;

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
