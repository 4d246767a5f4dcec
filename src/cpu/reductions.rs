//! Per-channel reductions: batch statistics (forward) and gradient sums (backward).

use super::{channel_row, spatial_row, BLOCK, TASK};
use crate::ops::element::{Accum, Element};
use crate::ops::layout::ChannelView;
use rayon::prelude::*;

const LANES: usize = 8;

/// Count, mean and sum of squared deviations of a set of values (Chan et al.).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Moments {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    fn merge(self, b: Moments) -> Moments {
        if b.n == 0.0 {
            return self;
        }
        if self.n == 0.0 {
            return b;
        }
        let n = self.n + b.n;
        let delta = b.mean - self.mean;
        Moments {
            n,
            mean: self.mean + delta * (b.n / n),
            m2: self.m2 + b.m2 + delta * delta * (self.n * b.n / n),
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

/// Sums of the two components of `f(a, b)` over `a`, `b` in `LANES` accumulators each.
#[inline(always)]
fn lane_sum2<T: Copy, U: Copy, A: Accum>(a: &[T], b: &[U], f: impl Fn(T, U) -> (A, A)) -> (A, A) {
    let mut s = [A::ZERO; LANES];
    let mut q = [A::ZERO; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        let x: &[T; LANES] = x.try_into().expect("chunk of LANES");
        let y: &[U; LANES] = y.try_into().expect("chunk of LANES");
        for l in 0..LANES {
            let (u, v) = f(x[l], y[l]);
            s[l] += u;
            q[l] += v;
        }
    }
    for (l, (&x, &y)) in ra.iter().zip(rb.iter()).enumerate() {
        let (u, v) = f(x, y);
        s[l] += u;
        q[l] += v;
    }
    (fold_lanes(s), fold_lanes(q))
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

/// Moments of a contiguous run, by blocks of `BLOCK` with a corrected two-pass
/// scheme per block (mean, then deviations and their sum as a correction).
fn run_moments<T: Element>(xs: &[T]) -> Moments {
    let mut acc = Moments::default();
    for blk in xs.chunks(BLOCK) {
        let n = blk.len() as f64;
        let sum = lane_sum(blk, |x: T| x.to_acc());
        let shift = T::Acc::from_f64(sum.to_f64() / n);
        let (d, q) = lane_sum2(blk, blk, |x: T, _| {
            let v = x.to_acc() - shift;
            (v, v * v)
        });
        let (d, q) = (d.to_f64(), q.to_f64());
        let m = Moments {
            n,
            mean: shift.to_f64() + d / n,
            m2: (q - d * d / n).max(0.0),
        };
        acc = acc.merge(m);
    }
    acc
}

/// Per-channel `[count; sum; sum of squares]` of `x` as `3 × C` f64, row-major.
///
/// The sums are formed from per-block (count, mean, M2) combined in f64, so
/// `sum of squares = M2 + n·mean²` carries no cancellation from f32 sums.
pub fn batch_stats<T: Element>(x: &[T], v: &ChannelView) -> Vec<f64> {
    let c_n = v.channels;
    let per_channel: Vec<Moments> = if v.is_empty() {
        vec![Moments::default(); c_n]
    } else if v.channel_innermost() {
        stats_channel_innermost(x, v)
    } else {
        stats_channel_major(x, v)
    };
    let mut out = vec![0.0f64; 3 * c_n];
    for (c, m) in per_channel.iter().enumerate() {
        out[c] = m.n;
        out[c_n + c] = m.n * m.mean;
        out[2 * c_n + c] = m.m2 + m.n * m.mean * m.mean;
    }
    out
}

/// Splits `0..outer` into tasks of whole outer indices covering about `TASK` elements.
fn outer_tasks(outer: usize, elems_per_outer: usize) -> Vec<(usize, usize)> {
    let per_task = (TASK / elems_per_outer.max(1)).clamp(1, outer.max(1));
    (0..outer.div_ceil(per_task))
        .map(|t| (t * per_task, ((t + 1) * per_task).min(outer)))
        .collect()
}

fn stats_channel_major<T: Element>(x: &[T], v: &ChannelView) -> Vec<Moments> {
    let tasks = outer_tasks(v.outer, v.inner);
    let items: Vec<(usize, usize, usize)> = (0..v.channels)
        .flat_map(|c| tasks.iter().map(move |&(lo, hi)| (c, lo, hi)))
        .collect();
    let partial: Vec<Moments> = items
        .par_iter()
        .map_init(Vec::new, |buf, &(c, lo, hi)| {
            let mut acc = Moments::default();
            for o in lo..hi {
                acc = acc.merge(run_moments(channel_row(x, v, o, c, buf)));
            }
            acc
        })
        .collect();
    partial
        .chunks(tasks.len())
        .map(|parts| parts.iter().fold(Moments::default(), |a, &b| a.merge(b)))
        .collect()
}

fn stats_channel_innermost<T: Element>(x: &[T], v: &ChannelView) -> Vec<Moments> {
    let c_n = v.channels;
    let rows = (TASK / c_n.max(1)).clamp(16, 1024);
    let n_blocks = v.outer.div_ceil(rows);
    let partial: Vec<Vec<Moments>> = (0..n_blocks)
        .into_par_iter()
        .map_init(Vec::new, |buf, b| {
            let (lo, hi) = (b * rows, ((b + 1) * rows).min(v.outer));
            let n = (hi - lo) as f64;
            let mut sum = vec![T::Acc::ZERO; c_n];
            for o in lo..hi {
                for (s, &xv) in sum.iter_mut().zip(spatial_row(x, v, o, buf)) {
                    *s += xv.to_acc();
                }
            }
            let shift: Vec<T::Acc> = sum
                .iter()
                .map(|s| T::Acc::from_f64(s.to_f64() / n))
                .collect();
            let mut d = vec![T::Acc::ZERO; c_n];
            let mut q = vec![T::Acc::ZERO; c_n];
            for o in lo..hi {
                let row = spatial_row(x, v, o, buf);
                for c in 0..c_n {
                    let e = row[c].to_acc() - shift[c];
                    d[c] += e;
                    q[c] += e * e;
                }
            }
            (0..c_n)
                .map(|c| {
                    let (dc, qc) = (d[c].to_f64(), q[c].to_f64());
                    Moments {
                        n,
                        mean: shift[c].to_f64() + dc / n,
                        m2: (qc - dc * dc / n).max(0.0),
                    }
                })
                .collect()
        })
        .collect();
    let mut acc = vec![Moments::default(); c_n];
    for block in partial {
        for (a, m) in acc.iter_mut().zip(block) {
            *a = a.merge(m);
        }
    }
    acc
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
        let rows = (TASK / c_n.max(1)).clamp(16, 1024);
        let n_blocks = xv.outer.div_ceil(rows);
        let partial: Vec<Vec<(f64, f64)>> = (0..n_blocks)
            .into_par_iter()
            .map_init(
                || (Vec::new(), Vec::new()),
                |(bd, bx), b| {
                    let (r0, r1) = (b * rows, ((b + 1) * rows).min(xv.outer));
                    let mut s = vec![T::Acc::ZERO; c_n];
                    let mut q = vec![T::Acc::ZERO; c_n];
                    for o in r0..r1 {
                        let drow = spatial_row(dy, dv, o, bd);
                        let xrow = spatial_row(x, xv, o, bx);
                        for c in 0..c_n {
                            let g = drow[c].to_acc();
                            s[c] += g;
                            q[c] += g * ((xrow[c].to_acc() - hi[c]) - lo[c]);
                        }
                    }
                    s.iter()
                        .zip(q.iter())
                        .map(|(a, b)| (a.to_f64(), b.to_f64()))
                        .collect()
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
                    let (mh, ml) = (hi[c], lo[c]);
                    let mut acc = (0.0, 0.0);
                    for o in o0..o1 {
                        let drow = channel_row(dy, dv, o, c, bd);
                        let xrow = channel_row(x, xv, o, c, bx);
                        for (db, xb) in drow.chunks(BLOCK).zip(xrow.chunks(BLOCK)) {
                            let (s, q) = lane_sum2(db, xb, |g: T, xe: T| {
                                let g = g.to_acc();
                                (g, g * ((xe.to_acc() - mh) - ml))
                            });
                            acc.0 += s.to_f64();
                            acc.1 += q.to_f64();
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
        // f32 inputs accumulate in f32, in a different order on the two paths.
        for (p, q) in a.iter().zip(b.iter()) {
            assert!((p - q).abs() < 1e-5 * p.abs().max(1.0), "{p} vs {q}");
        }
    }
}
