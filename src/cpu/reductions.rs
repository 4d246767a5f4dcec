//! Per-channel reductions: batch statistics (forward) and gradient sums (backward).

use super::{channel_row, multiversion, spatial_row, BLOCK, TASK};
use crate::ops::element::{Accum, Element};
use crate::ops::layout::ChannelView;
use rayon::prelude::*;

const LANES: usize = 8;

/// Count, sum and sum of squares of a set of values, in f64. Blocks are summed
/// into it after a two-pass computation of their own (mean, M2), so the sum of
/// squares `M2 + n·mean²` carries no cancellation from f32 accumulation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Sums {
    n: f64,
    s1: f64,
    s2: f64,
}

impl Sums {
    /// The sums of a block with `n` values, mean `mean` and squared deviations `m2`.
    fn from_moments(n: f64, mean: f64, m2: f64) -> Sums {
        Sums {
            n,
            s1: n * mean,
            s2: m2 + n * mean * mean,
        }
    }

    fn add(self, b: Sums) -> Sums {
        Sums {
            n: self.n + b.n,
            s1: self.s1 + b.s1,
            s2: self.s2 + b.s2,
        }
    }
}

/// Sum of `f(x)` over `xs` in `LANES` independent accumulators.
#[inline(always)]
fn lane_sum<T: Copy, A: Accum>(xs: &[T], f: impl Fn(T) -> A) -> A {
    let mut acc = [A::ZERO; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rem = chunks.remainder();
    for ch in chunks {
        let ch: &[T; LANES] = ch.try_into().expect("chunk of LANES");
        for l in 0..LANES {
            acc[l] += f(ch[l]);
        }
    }
    for (l, &x) in rem.iter().enumerate() {
        acc[l] += f(x);
    }
    fold_lanes(acc)
}

#[inline(always)]
fn fold_lanes<A: Accum>(acc: [A; LANES]) -> A {
    let a = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (a[0] + a[2]) + (a[1] + a[3])
}

multiversion! {
    /// Sums of a block with the corrected two-pass scheme: the mean, then the
    /// deviations from it and their sum as a correction.
    fn block_sums<T: Element>(blk: &[T]) -> Sums {
        let n = blk.len() as f64;
        let sum = lane_sum(blk, |x: T| x.to_acc());
        let shift = T::Acc::from_f64(sum.to_f64() / n);
        let mut d = [T::Acc::ZERO; LANES];
        let mut q = [T::Acc::ZERO; LANES];
        let chunks = blk.chunks_exact(LANES);
        let rem = chunks.remainder();
        for ch in chunks {
            let ch: &[T; LANES] = ch.try_into().expect("chunk of LANES");
            for l in 0..LANES {
                let v = ch[l].to_acc() - shift;
                d[l] += v;
                q[l] += v * v;
            }
        }
        for (l, &x) in rem.iter().enumerate() {
            let v = x.to_acc() - shift;
            d[l] += v;
            q[l] += v * v;
        }
        let (d, q) = (fold_lanes(d).to_f64(), fold_lanes(q).to_f64());
        Sums::from_moments(n, shift.to_f64() + d / n, (q - d * d / n).max(0.0))
    }
}

multiversion! {
    /// `Σdy` and `Σdy·((x − hi) − lo)` over two runs of equal length.
    fn centered_dot<T: Element>(dy: &[T], x: &[T], hi: T::Acc, lo: T::Acc) -> (f64, f64) {
        let mut s = [T::Acc::ZERO; LANES];
        let mut q = [T::Acc::ZERO; LANES];
        let n = dy.len().min(x.len());
        let full = n - n % LANES;
        for k in (0..full).step_by(LANES) {
            let g: &[T; LANES] = dy[k..k + LANES].try_into().expect("chunk of LANES");
            let xs: &[T; LANES] = x[k..k + LANES].try_into().expect("chunk of LANES");
            for l in 0..LANES {
                let gv = g[l].to_acc();
                s[l] += gv;
                q[l] += gv * ((xs[l].to_acc() - hi) - lo);
            }
        }
        for k in full..n {
            let gv = dy[k].to_acc();
            s[k - full] += gv;
            q[k - full] += gv * ((x[k].to_acc() - hi) - lo);
        }
        (fold_lanes(s).to_f64(), fold_lanes(q).to_f64())
    }
}

multiversion! {
    /// Per-channel sums over rows `r0..r1` of a channel-innermost view, with the
    /// corrected two-pass scheme per channel (vectorized across channels).
    fn innermost_block_sums<T: Element>(x: &[T], v: &ChannelView, r0: usize, r1: usize, buf: &mut Vec<T>) -> Vec<Sums> {
        let c_n = v.channels;
        let n = (r1 - r0) as f64;
        let mut sum = vec![T::Acc::ZERO; c_n];
        for o in r0..r1 {
            for (s, &e) in sum.iter_mut().zip(spatial_row(x, v, o, buf)) {
                *s += e.to_acc();
            }
        }
        let shift: Vec<T::Acc> = sum.iter().map(|s| T::Acc::from_f64(s.to_f64() / n)).collect();
        let mut d = vec![T::Acc::ZERO; c_n];
        let mut q = vec![T::Acc::ZERO; c_n];
        for o in r0..r1 {
            let row = spatial_row(x, v, o, buf);
            for (((dc, qc), &sh), &e) in d.iter_mut().zip(q.iter_mut()).zip(&shift).zip(row) {
                let dev = e.to_acc() - sh;
                *dc += dev;
                *qc += dev * dev;
            }
        }
        (0..c_n)
            .map(|c| {
                let (dc, qc) = (d[c].to_f64(), q[c].to_f64());
                Sums::from_moments(n, shift[c].to_f64() + dc / n, (qc - dc * dc / n).max(0.0))
            })
            .collect()
    }
}

multiversion! {
    /// Per-channel `(Σdy, Σdy·(x − mean))` over rows `r0..r1` of channel-innermost views.
    fn innermost_block_grads<T: Element>(
        dy: &[T],
        dv: &ChannelView,
        x: &[T],
        xv: &ChannelView,
        hi: &[T::Acc],
        lo: &[T::Acc],
        r0: usize,
        r1: usize,
        bufs: &mut (Vec<T>, Vec<T>),
    ) -> Vec<(f64, f64)> {
        let c_n = xv.channels;
        let mut s = vec![T::Acc::ZERO; c_n];
        let mut q = vec![T::Acc::ZERO; c_n];
        for o in r0..r1 {
            let drow = spatial_row(dy, dv, o, &mut bufs.0);
            let xrow = spatial_row(x, xv, o, &mut bufs.1);
            let it = s.iter_mut().zip(q.iter_mut()).zip(drow).zip(xrow).zip(hi).zip(lo);
            for (((((sc, qc), &g), &e), &h), &l) in it {
                let gv = g.to_acc();
                *sc += gv;
                *qc += gv * ((e.to_acc() - h) - l);
            }
        }
        s.iter().zip(q.iter()).map(|(a, b)| (a.to_f64(), b.to_f64())).collect()
    }
}

/// Sums of a contiguous run, block by block.
fn run_sums<T: Element>(xs: &[T]) -> Sums {
    xs.chunks(BLOCK)
        .fold(Sums::default(), |acc, blk| acc.add(block_sums(blk)))
}

/// Per-channel `[count; sum; sum of squares]` of `x` as `3 × C` f64, row-major.
///
/// The sums are added in f64 from per-block two-pass statistics, in an order
/// fixed by the shape (not by the number of threads).
pub fn batch_stats<T: Element>(x: &[T], v: &ChannelView) -> Vec<f64> {
    let c_n = v.channels;
    let per_channel: Vec<Sums> = if v.is_empty() {
        vec![Sums::default(); c_n]
    } else if v.channel_innermost() {
        let rows = innermost_rows(c_n);
        let partial: Vec<Vec<Sums>> = (0..v.outer.div_ceil(rows))
            .into_par_iter()
            .map_init(Vec::new, |buf, b| {
                innermost_block_sums(x, v, b * rows, ((b + 1) * rows).min(v.outer), buf)
            })
            .collect();
        let mut acc = vec![Sums::default(); c_n];
        for block in partial {
            for (a, m) in acc.iter_mut().zip(block) {
                *a = a.add(m);
            }
        }
        acc
    } else {
        let tasks = outer_tasks(v.outer, v.inner);
        let items: Vec<(usize, usize, usize)> = (0..c_n)
            .flat_map(|c| tasks.iter().map(move |&(lo, hi)| (c, lo, hi)))
            .collect();
        let partial: Vec<Sums> = items
            .par_iter()
            .map_init(Vec::new, |buf, &(c, lo, hi)| {
                (lo..hi).fold(Sums::default(), |acc, o| {
                    acc.add(run_sums(channel_row(x, v, o, c, buf)))
                })
            })
            .collect();
        partial
            .chunks(tasks.len())
            .map(|parts| parts.iter().fold(Sums::default(), |a, &b| a.add(b)))
            .collect()
    };
    let mut out = vec![0.0f64; 3 * c_n];
    for (c, m) in per_channel.iter().enumerate() {
        out[c] = m.n;
        out[c_n + c] = m.s1;
        out[2 * c_n + c] = m.s2;
    }
    out
}

/// Rows per task for channel-innermost views: about `4·TASK` elements, so the
/// per-channel work of combining tasks stays small against the data.
fn innermost_rows(channels: usize) -> usize {
    (4 * TASK / channels.max(1)).clamp(16, 4096)
}

/// Splits `0..outer` into tasks of whole outer indices covering about `TASK` elements.
fn outer_tasks(outer: usize, elems_per_outer: usize) -> Vec<(usize, usize)> {
    let per_task = (TASK / elems_per_outer.max(1)).clamp(1, outer.max(1));
    (0..outer.div_ceil(per_task))
        .map(|t| (t * per_task, ((t + 1) * per_task).min(outer)))
        .collect()
}

/// Per-channel `[Σ dy; Σ dy·(x − mean)]` as `2 × C` f64, row-major. `mean` is
/// given per channel as an f64 split into a high and a low part of the
/// accumulator type, so `x − mean` keeps its precision for large means.
pub fn grad_sums<T: Element>(
    dy: &[T],
    dv: &ChannelView,
    x: &[T],
    xv: &ChannelView,
    mean: &[f64],
) -> Vec<f64> {
    let c_n = xv.channels;
    let (hi, lo) = split_means::<T::Acc>(mean);
    let sums: Vec<(f64, f64)> = if xv.is_empty() {
        vec![(0.0, 0.0); c_n]
    } else if xv.channel_innermost() {
        let rows = innermost_rows(c_n);
        let partial: Vec<Vec<(f64, f64)>> = (0..xv.outer.div_ceil(rows))
            .into_par_iter()
            .map_init(
                || (Vec::new(), Vec::new()),
                |bufs, b| {
                    innermost_block_grads(
                        dy,
                        dv,
                        x,
                        xv,
                        &hi,
                        &lo,
                        b * rows,
                        ((b + 1) * rows).min(xv.outer),
                        bufs,
                    )
                },
            )
            .collect();
        let mut acc = vec![(0.0, 0.0); c_n];
        for block in partial {
            for (a, (s, q)) in acc.iter_mut().zip(block) {
                a.0 += s;
                a.1 += q;
            }
        }
        acc
    } else {
        let tasks = outer_tasks(xv.outer, xv.inner);
        let items: Vec<(usize, usize, usize)> = (0..c_n)
            .flat_map(|c| tasks.iter().map(move |&(a, b)| (c, a, b)))
            .collect();
        let partial: Vec<(f64, f64)> = items
            .par_iter()
            .map_init(
                || (Vec::new(), Vec::new()),
                |(bd, bx), &(c, o0, o1)| {
                    let mut acc = (0.0, 0.0);
                    for o in o0..o1 {
                        let drow = channel_row(dy, dv, o, c, bd);
                        let xrow = channel_row(x, xv, o, c, bx);
                        for (db, xb) in drow.chunks(BLOCK).zip(xrow.chunks(BLOCK)) {
                            let (s, q) = centered_dot(db, xb, hi[c], lo[c]);
                            acc.0 += s;
                            acc.1 += q;
                        }
                    }
                    acc
                },
            )
            .collect();
        partial
            .chunks(tasks.len())
            .map(|p| p.iter().fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1)))
            .collect()
    };
    let mut out = vec![0.0f64; 2 * c_n];
    for (c, (s, q)) in sums.into_iter().enumerate() {
        out[c] = s;
        out[c_n + c] = q;
    }
    out
}

/// Splits f64 values into `hi + lo` of the accumulator type (`lo` is zero for f64).
pub(crate) fn split_means<A: Accum>(mean: &[f64]) -> (Vec<A>, Vec<A>) {
    let hi: Vec<A> = mean.iter().map(|&m| A::from_f64(m)).collect();
    let lo: Vec<A> = mean
        .iter()
        .zip(hi.iter())
        .map(|(&m, &h)| A::from_f64(m - h.to_f64()))
        .collect();
    (hi, lo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Layout;

    #[test]
    fn stats_match_naive_sums_on_all_paths() {
        let (n, c, s) = (3usize, 5usize, 37usize);
        let x: Vec<f64> = (0..n * c * s)
            .map(|i| ((i * 7919) % 113) as f64 * 0.25 - 3.0)
            .collect();
        let nchw = ChannelView::new(&Layout::contiguous((n, c, s)), 1).unwrap();
        let got = batch_stats(&x, &nchw);
        for ch in 0..c {
            let vals: Vec<f64> = (0..n)
                .flat_map(|o| (0..s).map(move |i| (o, i)))
                .map(|(o, i)| x[nchw.index(o, ch, i)])
                .collect();
            let sum: f64 = vals.iter().sum();
            let sq: f64 = vals.iter().map(|v| v * v).sum();
            assert_eq!(got[ch], (n * s) as f64);
            assert!((got[c + ch] - sum).abs() < 1e-9 * sq.max(1.0));
            assert!((got[2 * c + ch] - sq).abs() < 1e-9 * sq.max(1.0));
        }
        // One storage read as channel-innermost (contiguous) and as channel-major (gathered rows).
        let (o_n, c_n) = (4usize, 6usize);
        let y: Vec<f32> = (0..o_n * s * c_n)
            .map(|i| ((i * 31) % 17) as f32 - 8.0)
            .collect();
        let inner = ChannelView::new(&Layout::contiguous((o_n, s, c_n)), 2).unwrap();
        assert!(inner.channel_innermost() && inner.channel_stride == 1);
        let perm = Layout::contiguous((o_n, s, c_n))
            .permute(&[0, 2, 1])
            .unwrap();
        let major = ChannelView::new(&perm, 1).unwrap();
        assert_eq!(major.inner_stride, c_n);
        let a = batch_stats(&y, &inner);
        let b = batch_stats(&y, &major);
        // f32 accumulation: agreement relative to the data's scale (the Σx² row).
        let scale = a[2 * c_n..].iter().fold(0.0f64, |m, &v| m.max(v));
        for (p, q) in a.iter().zip(b.iter()) {
            assert!((p - q).abs() < 1e-6 * scale, "{p} vs {q}");
        }
    }
}
