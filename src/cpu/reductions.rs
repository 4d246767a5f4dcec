//! Per-channel reductions: batch statistics (forward) and gradient sums (backward).

use super::elementwise::{relu_masked, ReluMask};
use super::{channel_row, multiversion, spatial_row, to_acc_run, BLOCK, TASK};
use crate::element::{split_means, Accum, Element, LaneCpu, CONVERT_LANES};
use crate::layout::ChannelView;
use rayon::prelude::*;

/// Lanes of the accumulators: one AVX2 vector of f32, and the run of values
/// that one conversion widens ([`CONVERT_LANES`]).
const LANES: usize = CONVERT_LANES;

/// Count, sum and sum of squares of a set of values, in f64. Blocks are summed
/// into it from their own mean and M2, computed from f32 sums of deviations
/// around a pivot ([`pivoted_sums`]), so the sum of squares `M2 + n·mean²`
/// carries no cancellation from f32 accumulation.
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

/// `acc[l] += run[l]` for every lane. The lane functions below accumulate a
/// run into fresh lanes and only then into the caller's: carrying the caller's
/// lanes through the loop makes LLVM shuffle them instead of keeping one
/// vector register per array (f32 deviations over 14×14 rows: 2.3 ms against 0.8).
#[inline(always)]
fn add_lanes<A: Accum>(acc: &mut [A; LANES], run: [A; LANES]) {
    for l in 0..LANES {
        acc[l] += run[l];
    }
}

/// Adds the deviations `x − shift` of `xs` into `d` and their squares into `q`.
#[inline(always)]
fn lanes_add_deviations<T: Element>(
    d: &mut [T::Acc; LANES],
    q: &mut [T::Acc; LANES],
    xs: &[T],
    shift: T::Acc,
) {
    let cpu = LaneCpu::for_type::<T>();
    let chunks = xs.chunks_exact(LANES);
    let rem = chunks.remainder();
    let (mut dl, mut ql) = ([T::Acc::ZERO; LANES], [T::Acc::ZERO; LANES]);
    for ch in chunks {
        let ch = T::to_acc_lanes(ch.try_into().expect("chunk of LANES"), cpu);
        for l in 0..LANES {
            let v = ch[l] - shift;
            dl[l] += v;
            ql[l] += v * v;
        }
    }
    let (mut dl, mut ql) = lane_barrier((dl, ql));
    for (l, &x) in rem.iter().enumerate() {
        let v = x.to_acc() - shift;
        dl[l] += v;
        ql[l] += v * v;
    }
    add_lanes(d, dl);
    add_lanes(q, ql);
}

/// Splits a short row into its whole chunks of [`LANES`] and the rest.
#[inline(always)]
fn whole_chunks<T>(xs: &[T]) -> (&[T], &[T]) {
    xs.split_at(xs.len() - xs.len() % LANES)
}

/// As [`lanes_add_deviations`] for the whole chunks of a row, and the rest
/// (fewer than [`LANES`] elements) into the scalars `rest`: for rows of short
/// maps taken one after another, whose rests (one element of each 7×7 row)
/// would otherwise cost a scalar loop on the lanes and a [`lane_barrier`] per
/// row.
#[inline(always)]
fn lanes_add_deviations_row<T: Element>(
    d: &mut [T::Acc; LANES],
    q: &mut [T::Acc; LANES],
    rest: &mut (T::Acc, T::Acc),
    xs: &[T],
    shift: T::Acc,
) {
    let cpu = LaneCpu::for_type::<T>();
    let (body, tail) = whole_chunks(xs);
    let (mut dl, mut ql) = ([T::Acc::ZERO; LANES], [T::Acc::ZERO; LANES]);
    for ch in body.chunks_exact(LANES) {
        let ch = T::to_acc_lanes(ch.try_into().expect("chunk of LANES"), cpu);
        for l in 0..LANES {
            let v = ch[l] - shift;
            dl[l] += v;
            ql[l] += v * v;
        }
    }
    add_lanes(d, dl);
    add_lanes(q, ql);
    for &e in tail {
        let v = e.to_acc() - shift;
        rest.0 += v;
        rest.1 += v * v;
    }
}

/// Sets of lanes in [`lanes_add_deviations_wide`], taking turns at the
/// chunks, so the additions form that many dependency chains per sum instead
/// of one: on long runs a single chain is bound by the latency of the vector
/// add. With 2, the statistics of long rows ran 1.5× (f32) and 1.2× (bf16)
/// faster on one core than with 1 (`cargo bench --bench cpu_reductions`);
/// with 4, LLVM stopped vectorizing the bf16 loops (2 Gelem/s against 8.5).
/// Used for blocks of long rows; short rows (7×7, 14×14 maps) gain nothing
/// from it.
const SETS: usize = 2;

/// As [`lanes_add_deviations`], with [`SETS`] sets of lanes.
#[inline(always)]
fn lanes_add_deviations_wide<T: Element>(
    d: &mut [T::Acc; LANES],
    q: &mut [T::Acc; LANES],
    xs: &[T],
    shift: T::Acc,
) {
    let cpu = LaneCpu::for_type::<T>();
    let groups = xs.chunks_exact(SETS * LANES);
    let rem = groups.remainder();
    let mut dl = [[T::Acc::ZERO; LANES]; SETS];
    let mut ql = [[T::Acc::ZERO; LANES]; SETS];
    for ch in groups {
        let ch: [T::Acc; SETS * LANES] =
            to_acc_run(ch.try_into().expect("chunk of SETS·LANES"), cpu);
        for k in 0..SETS {
            for l in 0..LANES {
                let v = ch[k * LANES + l] - shift;
                dl[k][l] += v;
                ql[k][l] += v * v;
            }
        }
    }
    let (dl, ql) = lane_barrier((dl, ql));
    for k in 0..SETS {
        add_lanes(d, dl[k]);
        add_lanes(q, ql[k]);
    }
    lanes_add_deviations(d, q, rem, shift);
}

/// One channel's mean split as `(hi, lo)` and, for a fused ReLU, the
/// forward's `(scale, shift)` from which the gradient mask is recomputed.
#[derive(Clone, Copy)]
struct GradChannel<A> {
    hi: A,
    lo: A,
    relu: Option<(A, A)>,
}

/// `(dy, x − mean)` of one element (`g`, `x` widened to the accumulator
/// type), `dy` masked by the fused ReLU when `RELU` (`scale`, `shift`: the
/// forward's affine).
#[inline(always)]
fn grad_terms<T: Element, const RELU: bool>(
    gv: T::Acc,
    x: T::Acc,
    hi: T::Acc,
    lo: T::Acc,
    scale: T::Acc,
    shift: T::Acc,
) -> (T::Acc, T::Acc) {
    let xc = (x - hi) - lo;
    if RELU {
        (relu_masked::<T>(gv, xc * scale + shift), xc)
    } else {
        (gv, xc)
    }
}

/// Adds `dy` into `s` and `dy·((x − hi) − lo)` into `q` over two runs of
/// equal length (`dy` masked by the fused ReLU when `RELU`).
#[inline(always)]
fn lanes_add_centered_dot<T: Element, const RELU: bool>(
    s: &mut [T::Acc; LANES],
    q: &mut [T::Acc; LANES],
    dy: &[T],
    x: &[T],
    ch: GradChannel<T::Acc>,
) {
    let cpu = LaneCpu::for_type::<T>();
    let (hi, lo) = (ch.hi, ch.lo);
    let (ms, mb) = ch.relu.unwrap_or((T::Acc::ZERO, T::Acc::ZERO));
    let gs = dy.chunks_exact(LANES);
    let xs = x.chunks_exact(LANES);
    let (g_rem, x_rem) = (gs.remainder(), xs.remainder());
    let (mut sl, mut ql) = ([T::Acc::ZERO; LANES], [T::Acc::ZERO; LANES]);
    for (g, xv) in gs.zip(xs) {
        let g = T::to_acc_lanes(g.try_into().expect("chunk of LANES"), cpu);
        let xv = T::to_acc_lanes(xv.try_into().expect("chunk of LANES"), cpu);
        for l in 0..LANES {
            let (gv, xc) = grad_terms::<T, RELU>(g[l], xv[l], hi, lo, ms, mb);
            sl[l] += gv;
            ql[l] += gv * xc;
        }
    }
    let (mut sl, mut ql) = lane_barrier((sl, ql));
    for (l, (&g, &xv)) in g_rem.iter().zip(x_rem).enumerate() {
        let (gv, xc) = grad_terms::<T, RELU>(g.to_acc(), xv.to_acc(), hi, lo, ms, mb);
        sl[l] += gv;
        ql[l] += gv * xc;
    }
    add_lanes(s, sl);
    add_lanes(q, ql);
}

/// As [`lanes_add_centered_dot`] for the whole chunks of two rows of equal
/// length, and their rests into the scalars `rest` (see
/// [`lanes_add_deviations_row`]).
#[inline(always)]
fn lanes_add_centered_dot_row<T: Element, const RELU: bool>(
    s: &mut [T::Acc; LANES],
    q: &mut [T::Acc; LANES],
    rest: &mut (T::Acc, T::Acc),
    dy: &[T],
    x: &[T],
    ch: GradChannel<T::Acc>,
) {
    let cpu = LaneCpu::for_type::<T>();
    let (hi, lo) = (ch.hi, ch.lo);
    let (ms, mb) = ch.relu.unwrap_or((T::Acc::ZERO, T::Acc::ZERO));
    let ((gb, gt), (xb, xt)) = (whole_chunks(dy), whole_chunks(x));
    let (mut sl, mut ql) = ([T::Acc::ZERO; LANES], [T::Acc::ZERO; LANES]);
    for (g, xv) in gb.chunks_exact(LANES).zip(xb.chunks_exact(LANES)) {
        let g = T::to_acc_lanes(g.try_into().expect("chunk of LANES"), cpu);
        let xv = T::to_acc_lanes(xv.try_into().expect("chunk of LANES"), cpu);
        for l in 0..LANES {
            let (gv, xc) = grad_terms::<T, RELU>(g[l], xv[l], hi, lo, ms, mb);
            sl[l] += gv;
            ql[l] += gv * xc;
        }
    }
    add_lanes(s, sl);
    add_lanes(q, ql);
    for (&g, &xv) in gt.iter().zip(xt) {
        let (gv, xc) = grad_terms::<T, RELU>(g.to_acc(), xv.to_acc(), hi, lo, ms, mb);
        rest.0 += gv;
        rest.1 += gv * xc;
    }
}

/// The sums of a block of `n` values from its shift and the lane sums of the
/// deviations from it (`d`) and of their squares (`q`).
#[inline(always)]
fn shifted_sums<A: Accum>(n: f64, shift: A, d: [A; LANES], q: [A; LANES]) -> Sums {
    let (d, q) = (fold_lanes(d).to_f64(), fold_lanes(q).to_f64());
    Sums::from_moments(n, shift.to_f64() + d / n, (q - d * d / n).max(0.0))
}

/// How far a pivot may lie from its block's mean: the one-pass sums are kept
/// where the sum of squared deviations from the pivot, `q = M2 + n·(mean −
/// pivot)²`, is at most this many times `M2`, i.e. where the pivot lies
/// within `√(PIVOT_SPREAD − 1)` ≈ 1.7 standard deviations of the mean.
/// The f32 rounding error of `q` is relative to `q`, so it grows by at most
/// this factor in `M2` against a sum around the mean itself (with 8, a
/// block whose pivot lay 2.1 standard deviations out lost 2e-5 of its
/// variance). For independent values the mean of [`PIVOT_HEAD`] of them
/// lies that far out about once in a million blocks; for a pivot of
/// correlated neighbours (a row of an image), about one block in 12 takes
/// the second pass.
const PIVOT_SPREAD: f64 = 4.0;

/// Values of a block (of a channel's block, for channels innermost) whose
/// mean is its pivot ([`pivot_of`]): the mean of a few values lies nearer
/// the block's mean than one value does, and the rounding error of the
/// one-pass `M2` grows with that distance ([`PIVOT_SPREAD`]). On the
/// kernel tests' normal data (mean 1.5 std), the block's first value as the
/// pivot left `Σx²` of (2048, 24) bf16 off by 3e-6 of itself.
const PIVOT_HEAD: usize = 8;

/// The pivot of a block whose first values are `head` (the first
/// [`PIVOT_HEAD`] are taken): their mean, added in order in the accumulator
/// type and divided in f64, the same bits on every path.
#[inline(always)]
fn pivot_of<T: Element>(head: impl Iterator<Item = T>) -> T::Acc {
    let (mut sum, mut n) = (T::Acc::ZERO, 0usize);
    for e in head.take(PIVOT_HEAD) {
        sum += e.to_acc();
        n += 1;
    }
    T::Acc::from_f64(sum.to_f64() / n.max(1) as f64)
}

/// The sums of a block of `n` values from the f32 sums of their deviations
/// from `pivot` (the mean of its first values, [`pivot_of`]: `d`) and of the
/// squares of those (`q`), computed in one pass: `mean = pivot + d/n`, `M2 =
/// q − d²/n`. Deviations from a pivot among the block's values are as small
/// as the block's spread, however large its mean (`|mean|/std` of 1e4 loses
/// no more than a spread of 1), but a pivot far out in the tail makes `M2`
/// the difference of two large numbers: then, and for sums that are not
/// finite, `Err(mean)`, and the caller sums the block again around that mean
/// (the former two-pass scheme, with the results of before for NaN and
/// infinite values).
#[inline(always)]
fn pivoted_sums(n: f64, pivot: f64, d: f64, q: f64) -> Result<Sums, f64> {
    let m2 = q - d * d / n;
    if q.is_finite() && PIVOT_SPREAD * m2 >= q {
        Ok(Sums::from_moments(n, pivot + d / n, m2))
    } else {
        Err(pivot + d / n)
    }
}

/// Hides lane accumulators from LLVM between a lane loop and its scalar tail
/// or fold. Without it, the tail's indexed updates (`acc[l] += …`) or the fold's
/// pairs make LLVM vectorize the loop as 2- or 4-wide pieces, or not at all,
/// and the loop runs at about scalar speed (`centered_dot` f32: 2.7 ms against
/// 1.1 ms on the reference shape; `block_sums` bf16 likewise). Costs one store
/// and load of the lanes per call.
#[inline(always)]
fn lane_barrier<X>(x: X) -> X {
    std::hint::black_box(x)
}

/// Folds the lanes in a fixed tree (behind a [`lane_barrier`]).
#[inline(always)]
fn fold_lanes<A: Accum>(acc: [A; LANES]) -> A {
    let acc = lane_barrier(acc);
    let a = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (a[0] + a[2]) + (a[1] + a[3])
}

multiversion! {
    /// Sums of a (non-empty) block in one pass around the mean of its first
    /// values ([`pivoted_sums`]), or, where that pivot lies far from the
    /// block's mean, in a second pass around the mean.
    fn block_sums<T: Element>(blk: &[T]) -> Sums {
        let n = blk.len() as f64;
        let pivot = pivot_of(blk.iter().copied());
        let (mut d, mut q) = ([T::Acc::ZERO; LANES], [T::Acc::ZERO; LANES]);
        lanes_add_deviations_wide(&mut d, &mut q, blk, pivot);
        let (ds, qs) = (fold_lanes(d).to_f64(), fold_lanes(q).to_f64());
        pivoted_sums(n, pivot.to_f64(), ds, qs).unwrap_or_else(|mean| {
            let shift = T::Acc::from_f64(mean);
            let (mut d, mut q) = ([T::Acc::ZERO; LANES], [T::Acc::ZERO; LANES]);
            lanes_add_deviations_wide(&mut d, &mut q, blk, shift);
            shifted_sums(n, shift, d, q)
        })
    }
}

/// The lane sums of the deviations from `shift` (and of their squares) of
/// the short rows `o0..o1` of channel `c`, the lanes carried from row to row
/// and the rows' rests added into lane 0 (any fixed lane: the fold adds them
/// all). A function, not a closure, so that it inlines into the caller's
/// instruction-set tier.
#[inline(always)]
fn row_block_deviations<T: Element>(
    x: &[T],
    v: &ChannelView,
    c: usize,
    (o0, o1): (usize, usize),
    buf: &mut Vec<T>,
    shift: T::Acc,
) -> ([T::Acc; LANES], [T::Acc; LANES]) {
    let (mut d, mut q) = ([T::Acc::ZERO; LANES], [T::Acc::ZERO; LANES]);
    let mut rest = (T::Acc::ZERO, T::Acc::ZERO);
    for o in o0..o1 {
        let row = channel_row(x, v, o, c, buf);
        lanes_add_deviations_row(&mut d, &mut q, &mut rest, row, shift);
    }
    d[0] += rest.0;
    q[0] += rest.1;
    (d, q)
}

multiversion! {
    /// Sums of the short rows `o0..o1` of channel `c` taken as one block, with
    /// the scheme of [`block_sums`] (around the mean of the first row's first
    /// values) and
    /// the lanes carried from row to row, so a row costs no fold and no f64
    /// work of its own (7×7 or 14×14 maps); the rows' rests (past their whole
    /// chunks) are summed apart.
    fn row_block_sums<T: Element>(x: &[T], v: &ChannelView, c: usize, o0: usize, o1: usize, buf: &mut Vec<T>) -> Sums {
        let n = ((o1 - o0) * v.inner) as f64;
        let pivot = pivot_of(channel_row(x, v, o0, c, buf).iter().copied());
        let (d, q) = row_block_deviations(x, v, c, (o0, o1), buf, pivot);
        let (ds, qs) = (fold_lanes(d).to_f64(), fold_lanes(q).to_f64());
        pivoted_sums(n, pivot.to_f64(), ds, qs).unwrap_or_else(|mean| {
            let shift = T::Acc::from_f64(mean);
            let (d, q) = row_block_deviations(x, v, c, (o0, o1), buf, shift);
            shifted_sums(n, shift, d, q)
        })
    }
}

multiversion! {
    /// `Σdy` and `Σdy·((x − hi) − lo)` over two runs of equal length.
    fn centered_dot<T: Element>(dy: &[T], x: &[T], ch: GradChannel<T::Acc>) -> (f64, f64) {
        let (mut s, mut q) = ([T::Acc::ZERO; LANES], [T::Acc::ZERO; LANES]);
        if ch.relu.is_some() {
            lanes_add_centered_dot::<T, true>(&mut s, &mut q, dy, x, ch);
        } else {
            lanes_add_centered_dot::<T, false>(&mut s, &mut q, dy, x, ch);
        }
        (fold_lanes(s).to_f64(), fold_lanes(q).to_f64())
    }
}

multiversion! {
    /// [`centered_dot`] over the short rows `o0..o1` of channel `c`, with the
    /// lanes carried from row to row and the rows' rests summed apart.
    fn row_block_dot<T: Element>(
        dy: &[T],
        dv: &ChannelView,
        x: &[T],
        xv: &ChannelView,
        c: usize,
        o0: usize,
        o1: usize,
        ch: GradChannel<T::Acc>,
        bufs: &mut (Vec<T>, Vec<T>),
    ) -> (f64, f64) {
        let (mut s, mut q) = ([T::Acc::ZERO; LANES], [T::Acc::ZERO; LANES]);
        let mut rest = (T::Acc::ZERO, T::Acc::ZERO);
        for o in o0..o1 {
            let drow = channel_row(dy, dv, o, c, &mut bufs.0);
            let xrow = channel_row(x, xv, o, c, &mut bufs.1);
            if ch.relu.is_some() {
                lanes_add_centered_dot_row::<T, true>(&mut s, &mut q, &mut rest, drow, xrow, ch);
            } else {
                lanes_add_centered_dot_row::<T, false>(&mut s, &mut q, &mut rest, drow, xrow, ch);
            }
        }
        s[0] += rest.0;
        q[0] += rest.1;
        (fold_lanes(s).to_f64(), fold_lanes(q).to_f64())
    }
}

/// Channels per register tile in the channel-innermost statistics: 4 AVX2
/// vectors of f32 per array, so a tile's accumulators (and shifts) stay in
/// the 16 vector registers while it takes a group of rows.
const TILE: usize = 4 * LANES;
/// Rows per group: each group takes every tile in turn, so the group's rows
/// are read as that many sequential streams. One tile through all the rows
/// jumps a whole row (4 KiB for 1024 f32 channels) at every load: the f32
/// statistics of (784, 1024) ran at 6.5 Gelem/s on one core that way, and at
/// 7.8 with groups of 8 (16: 7.2, 32: 6.3).
const ROW_GROUP: usize = 8;

/// Rows that a channel-innermost channel's f32 sums take before they are
/// added into f64 (a multiple of [`ROW_GROUP`]): each channel's sums are one
/// chain of additions, and over the 4096 rows of a block of few channels its
/// rounding error was 20 times that of 256 (the variance of (4096, 5) f32
/// with mean 1e4 and std 0.6 was off by 5.7e-5 as one chain).
const CHAIN_ROWS: usize = 256;

/// Elements per input that a group of rows of the gradient sums covers.
const GRAD_GROUP: usize = 1024;

/// Rows per group of the gradient sums' register tiles over `channels`
/// channels, or `None` to add the rows one by one through memory. Tiles pay
/// for short rows: a row of 32 channels is shorter than the vector loop, and
/// (25000, 32) f32 ran at 4.6 Gelem/s on one core row by row, 12.1 in tiles
/// over groups of 32 rows. The rows of a group of at most 64 channels lie
/// in one run of [`GRAD_GROUP`] elements per input, which the tiles read in
/// sequence. Groups of longer rows interleave that many streams per input
/// and are slower on tensors larger than the cache: (4096, 1024) f32
/// took 1.5–1.7 ms for its backward row by row, and 2.1–2.4 ms with tiles over
/// groups of 2 to 8 rows (though faster in cache); with groups of 1024
/// elements for rows of up to 512 channels, the backward of (131072, 128)
/// f32 took 9.2–10.2 ms against 7.6–8.8, and of (65536, 256) bf16 5.9–7.0
/// against 3.4–3.6.
fn grad_rows_per_group(channels: usize) -> Option<usize> {
    (TILE..=2 * TILE)
        .contains(&channels)
        .then(|| GRAD_GROUP / channels)
}

/// Per-channel sums over rows `r0..r1` of a channel-innermost view, in one
/// pass around each channel's pivot (the mean of its first rows, [`pivoted_sums`]): register
/// tiles of [`TILE`] channels where the channels are contiguous, the rest
/// vectorized across channels through memory. Both add the same values in the
/// same order per channel, and a channel whose pivot lies far from its mean is
/// summed again alone ([`channel_sums_around`]), so the results do not depend
/// on the split.
fn innermost_block_sums<T: Element>(
    x: &[T],
    v: &ChannelView,
    r0: usize,
    r1: usize,
    buf: &mut Vec<T>,
) -> Vec<Sums> {
    let tiled = if v.channel_stride == 1 {
        v.channels / TILE * TILE
    } else {
        0
    };
    let mut out = Vec::with_capacity(v.channels);
    if tiled > 0 {
        let pivot = channel_pivots(x, v, (r0, r1), (0, tiled), buf);
        let mut sums = vec![(0.0, 0.0); tiled];
        let (mut d, mut q) = (vec![T::Acc::ZERO; tiled], vec![T::Acc::ZERO; tiled]);
        for s0 in (r0..r1).step_by(CHAIN_ROWS) {
            let s1 = (s0 + CHAIN_ROWS).min(r1);
            d.fill(T::Acc::ZERO);
            q.fill(T::Acc::ZERO);
            for g0 in (s0..s1).step_by(ROW_GROUP) {
                tiles_add_deviations(x, v, g0, (g0 + ROW_GROUP).min(s1), &pivot, &mut d, &mut q);
            }
            add_chains(&mut sums, &d, &q);
        }
        out.extend((0..tiled).map(|c| channel_sums(x, v, (r0, r1), c, pivot[c], sums[c])));
    }
    if tiled < v.channels {
        out.extend(innermost_channel_sums(x, v, r0, r1, tiled, buf));
    }
    out
}

multiversion! {
    /// The pivots of the channels `c0..c1` over rows `r0..r1` of a
    /// channel-innermost view: the mean of each channel's values in the first
    /// rows, the same bits as [`pivot_of`] (added in row order), all channels
    /// of a row at once.
    fn channel_pivots<T: Element>(x: &[T], v: &ChannelView, rows: (usize, usize), chans: (usize, usize), buf: &mut Vec<T>) -> Vec<T::Acc> {
        let (r0, r1) = rows;
        let (c0, c1) = chans;
        let head = (r1 - r0).min(PIVOT_HEAD);
        let mut sum = vec![T::Acc::ZERO; c1 - c0];
        let zero = vec![T::Acc::ZERO; c1 - c0];
        let mut unused = vec![T::Acc::ZERO; c1 - c0];
        for o in r0..r0 + head {
            // `e − 0` is `e`: the deviations from zero are the values.
            add_row_deviations::<T>((&mut sum, &mut unused), &spatial_row(x, v, o, buf)[c0..c1], &zero);
        }
        sum.iter().map(|s| T::Acc::from_f64(s.to_f64() / head.max(1) as f64)).collect()
    }
}

/// Adds the f32 sums of a run of [`CHAIN_ROWS`] rows into the f64 sums, channel by channel.
#[inline(always)]
fn add_chains<A: Accum>(sums: &mut [(f64, f64)], d: &[A], q: &[A]) {
    for ((s, dc), qc) in sums.iter_mut().zip(d).zip(q) {
        s.0 += dc.to_f64();
        s.1 += qc.to_f64();
    }
}

/// The sums of channel `c` over rows `r0..r1` of a channel-innermost view
/// from the sums `(d, q)` of its deviations from `pivot` ([`channel_pivots`]) and of their squares, added row by row in f32 over each run of
/// [`CHAIN_ROWS`] rows and the runs in f64; or, where [`pivoted_sums`]
/// refuses them, summed again around the mean ([`channel_sums_around`]).
fn channel_sums<T: Element>(
    x: &[T],
    v: &ChannelView,
    rows: (usize, usize),
    c: usize,
    pivot: T::Acc,
    (d, q): (f64, f64),
) -> Sums {
    let n = (rows.1 - rows.0) as f64;
    pivoted_sums(n, pivot.to_f64(), d, q)
        .unwrap_or_else(|mean| channel_sums_around(x, v, rows, c, T::Acc::from_f64(mean)))
}

/// The sums of channel `c` over rows `r0..r1` of a channel-innermost view
/// around `shift`, the deviations and their squares added row by row (the
/// order of the tiles and of [`innermost_channel_sums`]), element by element:
/// for the few channels whose pivot lies far from their mean.
fn channel_sums_around<T: Element>(
    x: &[T],
    v: &ChannelView,
    (r0, r1): (usize, usize),
    c: usize,
    shift: T::Acc,
) -> Sums {
    let mut sums = [(0.0, 0.0)];
    for s0 in (r0..r1).step_by(CHAIN_ROWS) {
        let (mut d, mut q) = (T::Acc::ZERO, T::Acc::ZERO);
        for o in s0..(s0 + CHAIN_ROWS).min(r1) {
            let dev = x[v.index(o, c, 0)].to_acc() - shift;
            d += dev;
            q += dev * dev;
        }
        add_chains(&mut sums, &[d], &[q]);
    }
    let (n, [(d, q)]) = ((r1 - r0) as f64, sums);
    Sums::from_moments(n, shift.to_f64() + d / n, (q - d * d / n).max(0.0))
}

multiversion! {
    /// Adds the deviations `x − shift` of rows `o0..o1` of the channels
    /// `0..d.len()` (whole tiles, contiguous channels) into `d` and their
    /// squares into `q`, tile by tile, each tile in registers.
    fn tiles_add_deviations<T: Element>(x: &[T], v: &ChannelView, o0: usize, o1: usize, shift: &[T::Acc], d: &mut [T::Acc], q: &mut [T::Acc]) -> () {
        let cpu = LaneCpu::for_type::<T>();
        let tiles = d.chunks_exact_mut(TILE).zip(q.chunks_exact_mut(TILE));
        for (t, (dt, qt)) in tiles.enumerate() {
            let sh: &[T::Acc; TILE] = shift[t * TILE..(t + 1) * TILE].try_into().expect("a tile");
            let mut da: [T::Acc; TILE] = (&*dt).try_into().expect("a tile");
            let mut qa: [T::Acc; TILE] = (&*qt).try_into().expect("a tile");
            for o in o0..o1 {
                let start = v.index(o, t * TILE, 0);
                let row: [T::Acc; TILE] = to_acc_run(x[start..start + TILE].try_into().expect("a tile"), cpu);
                for l in 0..TILE {
                    let dev = row[l] - sh[l];
                    da[l] += dev;
                    qa[l] += dev * dev;
                }
            }
            dt.copy_from_slice(&da);
            qt.copy_from_slice(&qa);
        }
    }
}

multiversion! {
    /// Per-channel sums over rows `r0..r1` of the channels `c_from..` of a
    /// channel-innermost view, vectorized across channels (any strides), in
    /// one pass around each channel's pivot (see
    /// [`innermost_block_sums`]).
    fn innermost_channel_sums<T: Element>(x: &[T], v: &ChannelView, r0: usize, r1: usize, c_from: usize, buf: &mut Vec<T>) -> Vec<Sums> {
        let c_n = v.channels - c_from;
        let pivot = channel_pivots(x, v, (r0, r1), (c_from, v.channels), buf);
        let mut sums = vec![(0.0, 0.0); c_n];
        let mut d = vec![T::Acc::ZERO; c_n];
        let mut q = vec![T::Acc::ZERO; c_n];
        for s0 in (r0..r1).step_by(CHAIN_ROWS) {
            d.fill(T::Acc::ZERO);
            q.fill(T::Acc::ZERO);
            for o in s0..(s0 + CHAIN_ROWS).min(r1) {
                let row = &spatial_row(x, v, o, buf)[c_from..];
                add_row_deviations::<T>((&mut d, &mut q), row, &pivot);
            }
            add_chains(&mut sums, &d, &q);
        }
        (0..c_n)
            .map(|c| channel_sums(x, v, (r0, r1), c_from + c, pivot[c], sums[c]))
            .collect()
    }
}

/// Adds the deviations of one channel-innermost row from `shift` into `d`
/// and their squares into `q`, channel by channel; the types that convert in
/// lanes (f16, whose per-element conversions are calls) widen
/// [`CONVERT_LANES`] channels at a time (the same values in the same order).
#[inline(always)]
fn add_row_deviations<T: Element>(
    (d, q): (&mut [T::Acc], &mut [T::Acc]),
    row: &[T],
    shift: &[T::Acc],
) {
    let cpu = LaneCpu::for_type::<T>();
    const L: usize = CONVERT_LANES;
    let n = d.len();
    let whole = if T::CONVERTS_IN_LANES { n - n % L } else { 0 };
    for c in (0..whole).step_by(L) {
        let e = T::to_acc_lanes(row[c..c + L].try_into().expect("a run"), cpu);
        let sh: &[T::Acc; L] = shift[c..c + L].try_into().expect("a run");
        let dl: &mut [T::Acc; L] = (&mut d[c..c + L]).try_into().expect("a run");
        let ql: &mut [T::Acc; L] = (&mut q[c..c + L]).try_into().expect("a run");
        for k in 0..L {
            let dev = e[k] - sh[k];
            dl[k] += dev;
            ql[k] += dev * dev;
        }
    }
    let it = d[whole..].iter_mut().zip(&mut q[whole..]);
    for (((dc, qc), &sh), &e) in it.zip(&shift[whole..]).zip(&row[whole..n]) {
        let dev = e.to_acc() - sh;
        *dc += dev;
        *qc += dev * dev;
    }
}

/// Per-channel `(Σdy, Σdy·(x − mean))` over rows `r0..r1` of channel-innermost
/// views: for short rows whose channels are contiguous in both views,
/// register tiles of [`TILE`] channels over groups of rows
/// ([`grad_rows_per_group`]); the rest vectorized across channels through
/// memory. Both add the same values in the same order per channel.
fn innermost_block_grads<T: Element>(
    g: GradInputs<'_, T>,
    r0: usize,
    r1: usize,
    bufs: &mut (Vec<T>, Vec<T>),
) -> Vec<(f64, f64)> {
    let (c_n, dense) = (
        g.xv.channels,
        g.xv.channel_stride == 1 && g.dv.channel_stride == 1,
    );
    let (tiled, group) = match grad_rows_per_group(c_n) {
        Some(rows) if dense => (c_n / TILE * TILE, rows),
        _ => (0, 1),
    };
    let mut out = Vec::with_capacity(c_n);
    if tiled > 0 {
        let (mut s, mut q) = (vec![T::Acc::ZERO; tiled], vec![T::Acc::ZERO; tiled]);
        for g0 in (r0..r1).step_by(group) {
            tiles_add_grads(g, (g0, (g0 + group).min(r1)), &mut s, &mut q);
        }
        out.extend(s.iter().zip(&q).map(|(a, b)| (a.to_f64(), b.to_f64())));
    }
    if tiled < c_n {
        out.extend(innermost_channel_grads(g, r0, r1, tiled, bufs));
    }
    out
}

/// The inputs of the channel-innermost gradient sums: `dy` and `x` with their
/// views, the means split as `hi + lo`, and the fused ReLU's mask.
struct GradInputs<'a, T: Element> {
    dy: &'a [T],
    dv: &'a ChannelView,
    x: &'a [T],
    xv: &'a ChannelView,
    hi: &'a [T::Acc],
    lo: &'a [T::Acc],
    relu: Option<&'a ReluMask<T::Acc>>,
}

impl<T: Element> Clone for GradInputs<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T: Element> Copy for GradInputs<'_, T> {}

/// Adds one tile's `dy` (masked when `RELU`) into `s` and `dy·(x − mean)`
/// into `q` over rows `o0..o1`; `c0` is the tile's first channel, and `hi`,
/// `lo`, `ms`, `mb` its means and mask coefficients.
#[inline(always)]
fn tile_add_grads<T: Element, const RELU: bool>(
    inputs: GradInputs<'_, T>,
    (o0, o1): (usize, usize),
    c0: usize,
    [hi, lo, ms, mb]: [&[T::Acc; TILE]; 4],
    s: &mut [T::Acc; TILE],
    q: &mut [T::Acc; TILE],
) {
    let cpu = LaneCpu::for_type::<T>();
    let GradInputs { dy, dv, x, xv, .. } = inputs;
    let (mut sa, mut qa) = (*s, *q);
    for o in o0..o1 {
        let (ds, xs) = (dv.index(o, c0, 0), xv.index(o, c0, 0));
        let g: [T::Acc; TILE] = to_acc_run(dy[ds..ds + TILE].try_into().expect("a tile"), cpu);
        let e: [T::Acc; TILE] = to_acc_run(x[xs..xs + TILE].try_into().expect("a tile"), cpu);
        for l in 0..TILE {
            let (gv, xc) = grad_terms::<T, RELU>(g[l], e[l], hi[l], lo[l], ms[l], mb[l]);
            sa[l] += gv;
            qa[l] += gv * xc;
        }
    }
    (*s, *q) = (sa, qa);
}

multiversion! {
    /// Adds the gradient sums of rows `o0..o1` of the channels `0..s.len()`
    /// (whole tiles, contiguous channels in both views) into `s` and `q`, tile
    /// by tile, each tile in registers.
    fn tiles_add_grads<T: Element>(inputs: GradInputs<'_, T>, rows: (usize, usize), s: &mut [T::Acc], q: &mut [T::Acc]) -> () {
        let tile = |v: &[T::Acc], t: usize| -> [T::Acc; TILE] {
            v[t * TILE..(t + 1) * TILE].try_into().expect("a tile")
        };
        let zeros = [T::Acc::ZERO; TILE];
        let tiles = s.chunks_exact_mut(TILE).zip(q.chunks_exact_mut(TILE));
        for (t, (st, qt)) in tiles.enumerate() {
            let st: &mut [T::Acc; TILE] = st.try_into().expect("a tile");
            let qt: &mut [T::Acc; TILE] = qt.try_into().expect("a tile");
            let (h, l) = (tile(inputs.hi, t), tile(inputs.lo, t));
            match inputs.relu {
                Some(m) => {
                    let (ms, mb) = (tile(&m.scale, t), tile(&m.shift, t));
                    tile_add_grads::<T, true>(inputs, rows, t * TILE, [&h, &l, &ms, &mb], st, qt);
                }
                None => {
                    tile_add_grads::<T, false>(inputs, rows, t * TILE, [&h, &l, &zeros, &zeros], st, qt);
                }
            }
        }
    }
}

multiversion! {
    /// Per-channel `(Σdy, Σdy·(x − mean))` over rows `r0..r1` of the channels
    /// `c_from..` of channel-innermost views, vectorized across channels (any
    /// strides).
    fn innermost_channel_grads<T: Element>(inputs: GradInputs<'_, T>, r0: usize, r1: usize, c_from: usize, bufs: &mut (Vec<T>, Vec<T>)) -> Vec<(f64, f64)> {
        let GradInputs { dy, dv, x, xv, hi, lo, relu } = inputs;
        let c_n = xv.channels - c_from;
        let mut s = vec![T::Acc::ZERO; c_n];
        let mut q = vec![T::Acc::ZERO; c_n];
        let (hi, lo) = (&hi[c_from..], &lo[c_from..]);
        let relu = relu.map(|m| (&m.scale[c_from..], &m.shift[c_from..]));
        for o in r0..r1 {
            let drow = &spatial_row(dy, dv, o, &mut bufs.0)[c_from..];
            let xrow = &spatial_row(x, xv, o, &mut bufs.1)[c_from..];
            if T::CONVERTS_IN_LANES {
                add_row_grads_in_lanes::<T>((&mut s, &mut q), drow, xrow, (hi, lo), relu);
                continue;
            }
            let it = s.iter_mut().zip(q.iter_mut()).zip(drow).zip(xrow).zip(hi).zip(lo);
            match relu {
                Some((scale, shift)) => {
                    for ((((((sc, qc), &g), &e), &h), &l), (&ms, &mb)) in it.zip(scale.iter().zip(shift)) {
                        let (gv, xc) = grad_terms::<T, true>(g.to_acc(), e.to_acc(), h, l, ms, mb);
                        *sc += gv;
                        *qc += gv * xc;
                    }
                }
                None => {
                    for (((((sc, qc), &g), &e), &h), &l) in it {
                        let (gv, xc) = grad_terms::<T, false>(g.to_acc(), e.to_acc(), h, l, T::Acc::ZERO, T::Acc::ZERO);
                        *sc += gv;
                        *qc += gv * xc;
                    }
                }
            }
        }
        s.iter().zip(q.iter()).map(|(a, b)| (a.to_f64(), b.to_f64())).collect()
    }
}

/// Two per-channel slices: the means' high and low parts, or a fused ReLU's
/// scale and shift.
type SlicePair<'a, A> = (&'a [A], &'a [A]);

/// Adds one channel-innermost row's `dy` (masked by the fused ReLU with
/// `relu`) into `s` and `dy·(x − mean)` into `q`, channel by channel as
/// [`innermost_channel_grads`] does (the same values in the same order), with
/// the inputs widened [`CONVERT_LANES`] channels at a time: for the types that
/// convert in lanes (f16), whose per-element conversions are calls.
#[inline(always)]
fn add_row_grads_in_lanes<T: Element>(
    (s, q): (&mut [T::Acc], &mut [T::Acc]),
    dy: &[T],
    x: &[T],
    (hi, lo): SlicePair<'_, T::Acc>,
    relu: Option<SlicePair<'_, T::Acc>>,
) {
    let cpu = LaneCpu::for_type::<T>();
    const L: usize = CONVERT_LANES;
    let n = s.len();
    let whole = n - n % L;
    let zeros = [T::Acc::ZERO; L];
    let run = |v: &[T::Acc], c: usize| -> [T::Acc; L] { v[c..c + L].try_into().expect("a run") };
    for c in (0..whole).step_by(L) {
        let g = T::to_acc_lanes(dy[c..c + L].try_into().expect("a run"), cpu);
        let e = T::to_acc_lanes(x[c..c + L].try_into().expect("a run"), cpu);
        let (h, l) = (run(hi, c), run(lo, c));
        let (mut sl, mut ql) = (run(s, c), run(q, c));
        match relu {
            Some((scale, shift)) => {
                let (ms, mb) = (run(scale, c), run(shift, c));
                for k in 0..L {
                    let (gv, xc) = grad_terms::<T, true>(g[k], e[k], h[k], l[k], ms[k], mb[k]);
                    sl[k] += gv;
                    ql[k] += gv * xc;
                }
            }
            None => {
                for k in 0..L {
                    let (gv, xc) =
                        grad_terms::<T, false>(g[k], e[k], h[k], l[k], zeros[k], zeros[k]);
                    sl[k] += gv;
                    ql[k] += gv * xc;
                }
            }
        }
        s[c..c + L].copy_from_slice(&sl);
        q[c..c + L].copy_from_slice(&ql);
    }
    for c in whole..n {
        let (ms, mb) = relu.map_or((T::Acc::ZERO, T::Acc::ZERO), |(a, b)| (a[c], b[c]));
        let (gv, xc) = if relu.is_some() {
            grad_terms::<T, true>(dy[c].to_acc(), x[c].to_acc(), hi[c], lo[c], ms, mb)
        } else {
            grad_terms::<T, false>(dy[c].to_acc(), x[c].to_acc(), hi[c], lo[c], ms, mb)
        };
        s[c] += gv;
        q[c] += gv * xc;
    }
}

/// Sums of a contiguous run, block by block.
fn run_sums<T: Element>(xs: &[T]) -> Sums {
    xs.chunks(BLOCK)
        .fold(Sums::default(), |acc, blk| acc.add(block_sums(blk)))
}

/// Per-channel `[count; sum; sum of squares]` of `x` as `3 × C` f64, row-major.
///
/// The sums are added in f64 from per-block one-pass statistics around a
/// pivot (two passes where the pivot lies far from the block's mean), in an
/// order fixed by the shape (not by the number of threads).
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
                match rows_per_block(v.inner) {
                    1 => (lo..hi).fold(Sums::default(), |acc, o| {
                        acc.add(run_sums(channel_row(x, v, o, c, buf)))
                    }),
                    rows => row_blocks(lo, hi, rows).fold(Sums::default(), |acc, (o0, o1)| {
                        acc.add(row_block_sums(x, v, c, o0, o1, buf))
                    }),
                }
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

/// Rows of `inner` elements that form one statistics block: 1 for rows of at
/// least half a [`BLOCK`] (they are cut into blocks of their own), else as
/// many whole rows as fit in a block.
fn rows_per_block(inner: usize) -> usize {
    if inner >= BLOCK / 2 {
        1
    } else {
        BLOCK / inner.max(1)
    }
}

/// `lo..hi` cut into consecutive ranges of `rows` (the last one may be shorter).
fn row_blocks(lo: usize, hi: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (lo..hi).step_by(rows).map(move |o| (o, (o + rows).min(hi)))
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
/// With `relu`, `dy` is the gradient of a fused ReLU's output and is masked
/// where the forward's output (recomputed from `x`) was not positive.
pub fn grad_sums<T: Element>(
    dy: &[T],
    dv: &ChannelView,
    x: &[T],
    xv: &ChannelView,
    mean: &[f64],
    relu: Option<&ReluMask<T::Acc>>,
) -> Vec<f64> {
    let c_n = xv.channels;
    let (hi, lo) = split_means::<T::Acc>(mean);
    let sums: Vec<(f64, f64)> = if xv.is_empty() {
        vec![(0.0, 0.0); c_n]
    } else if xv.channel_innermost() {
        let rows = innermost_rows(c_n);
        let (hi, lo) = (hi.as_slice(), lo.as_slice());
        let inputs = GradInputs {
            dy,
            dv,
            x,
            xv,
            hi,
            lo,
            relu,
        };
        let partial: Vec<Vec<(f64, f64)>> = (0..xv.outer.div_ceil(rows))
            .into_par_iter()
            .map_init(
                || (Vec::new(), Vec::new()),
                |bufs, b| {
                    let (r0, r1) = (b * rows, ((b + 1) * rows).min(xv.outer));
                    innermost_block_grads(inputs, r0, r1, bufs)
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
                |bufs, &(c, o0, o1)| {
                    let ch = GradChannel {
                        hi: hi[c],
                        lo: lo[c],
                        relu: relu.map(|m| (m.scale[c], m.shift[c])),
                    };
                    let mut acc = (0.0, 0.0);
                    let mut add = |(s, q): (f64, f64)| {
                        acc.0 += s;
                        acc.1 += q;
                    };
                    match rows_per_block(xv.inner) {
                        1 => {
                            for o in o0..o1 {
                                let drow = channel_row(dy, dv, o, c, &mut bufs.0);
                                let xrow = channel_row(x, xv, o, c, &mut bufs.1);
                                for (db, xb) in drow.chunks(BLOCK).zip(xrow.chunks(BLOCK)) {
                                    add(centered_dot(db, xb, ch));
                                }
                            }
                        }
                        rows => {
                            for (r0, r1) in row_blocks(o0, o1, rows) {
                                add(row_block_dot(dy, dv, x, xv, c, r0, r1, ch, bufs));
                            }
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

    /// The register tiles of channel-innermost statistics and gradient sums
    /// (with and without the fused ReLU's mask) add the same values in the
    /// same order as the paths through memory: identical results, for channel
    /// counts with and without a partial tile and of exactly one tile, f32,
    /// bf16 and f16 (the tiles widen in lanes, the rest element by element).
    #[test]
    fn channel_tiles_give_the_untiled_results_bit_for_bit() {
        fn check<T: Element>(to: impl Fn(f32) -> T) {
            for &(rows, c) in &[
                (37usize, 75usize),
                (300, 64),
                (5, 16),
                (9, 31),
                (101, 32),
                (50, 45),
            ] {
                let x: Vec<T> = (0..rows * c)
                    .map(|i| to(50.0 + ((i * 7919) % 1013) as f32 * 0.013))
                    .collect();
                let v = ChannelView::new(&Layout::contiguous((rows, c)), 1).unwrap();
                assert!(v.channel_innermost() && v.channel_stride == 1);
                let mut buf = Vec::new();
                let tiled = innermost_block_sums(&x, &v, 0, rows, &mut buf);
                let plain = innermost_channel_sums(&x, &v, 0, rows, 0, &mut buf);
                assert_eq!(tiled, plain, "statistics, {rows}x{c}");
                // The gradient sums, without and with the fused ReLU's mask
                // (about half of it clamped), over a part of the rows.
                let dy: Vec<T> = (0..rows * c)
                    .map(|i| to(((i * 104_729) % 61) as f32 * 0.1 - 3.0))
                    .collect();
                let mean: Vec<f64> = (0..c).map(|ch| 56.5 + 0.01 * ch as f64).collect();
                let (hi, lo) = split_means::<T::Acc>(&mean);
                let scale: Vec<f64> = (0..c).map(|ch| 0.3 + 0.01 * ch as f64).collect();
                let mask = ReluMask::<T::Acc>::new(&scale, &vec![0.05; c]);
                let mut bufs = (Vec::new(), Vec::new());
                let (r0, r1) = (1, rows - 1);
                for relu in [None, Some(&mask)] {
                    let (dv, xv) = (&v, &v);
                    let (hi, lo) = (hi.as_slice(), lo.as_slice());
                    let inputs = GradInputs {
                        dy: &dy,
                        dv,
                        x: &x,
                        xv,
                        hi,
                        lo,
                        relu,
                    };
                    let tiled = innermost_block_grads(inputs, r0, r1, &mut bufs);
                    let plain = innermost_channel_grads(inputs, r0, r1, 0, &mut bufs);
                    assert_eq!(
                        tiled,
                        plain,
                        "gradient sums, {rows}x{c}, ReLU: {}",
                        relu.is_some()
                    );
                }
            }
        }
        check(|v: f32| v);
        check(half::bf16::from_f32);
        check(half::f16::from_f32);
    }

    /// Naive f64 `[n; Σx; Σx²]` and `[Σdy; Σdy·(x − mean)]` of channel `c`.
    fn naive(x: &[f32], dy: &[f32], v: &ChannelView, c: usize, mean: f64) -> [f64; 5] {
        let mut r = [0.0; 5];
        for o in 0..v.outer {
            for i in 0..v.inner {
                let (e, g) = (x[v.index(o, c, i)] as f64, dy[v.index(o, c, i)] as f64);
                r[0] += 1.0;
                r[1] += e;
                r[2] += e * e;
                r[3] += g;
                r[4] += g * (e - mean);
            }
        }
        r
    }

    #[test]
    fn short_rows_long_rows_and_gathered_rows_match_naive_sums() {
        // Inner sizes on both sides of the row-block cut (BLOCK / 2), outer sizes
        // that span several row blocks with a short last one, and a transposed
        // (gathered) view of the same data.
        for &(n, c, s) in &[
            (1200usize, 3usize, 7usize),
            (90, 2, 49),
            (5, 2, 2047),
            (3, 2, 9000),
        ] {
            let len = n * c * s;
            let x: Vec<f32> = (0..len)
                .map(|i| 100.0 + ((i * 7919) % 1013) as f32 * 0.01)
                .collect();
            let dy: Vec<f32> = (0..len)
                .map(|i| ((i * 104_729) % 61) as f32 * 0.1 - 3.0)
                .collect();
            let contiguous = Layout::contiguous((n, c, s));
            let transposed = Layout::contiguous((s, c, n)).permute(&[2, 1, 0]).unwrap();
            for layout in [&contiguous, &transposed] {
                let v = ChannelView::new(layout, 1).unwrap();
                let stats = batch_stats(&x, &v);
                let means: Vec<f64> = (0..c).map(|ch| stats[c + ch] / stats[ch]).collect();
                let grads = grad_sums(&dy, &v, &x, &v, &means, None);
                for ch in 0..c {
                    let want = naive(&x, &dy, &v, ch, means[ch]);
                    let got = [
                        stats[ch],
                        stats[c + ch],
                        stats[2 * c + ch],
                        grads[ch],
                        grads[c + ch],
                    ];
                    assert_eq!(got[0], want[0], "count, shape {:?}", (n, c, s));
                    // f32 accumulation over blocks of ≤ 4096 values, combined in f64.
                    let scale = [
                        want[0],
                        want[1].abs(),
                        want[2],
                        want[3].abs() + want[0],
                        want[0] * 30.0,
                    ];
                    for k in 1..5 {
                        let tol = 2e-6 * scale[k].max(1.0);
                        assert!(
                            (got[k] - want[k]).abs() <= tol,
                            "shape {:?} strides {:?} channel {ch} sum {k}: {} vs {} (tol {tol:e})",
                            (n, c, s),
                            layout.stride(),
                            got[k],
                            want[k]
                        );
                    }
                }
            }
        }
    }

    /// The fused ReLU's mask recomputed from x in the backward passes gives
    /// bit for bit what the same passes give on the gradient masked first by
    /// the forward's output (`relu_grad`): masked terms add exact zeros, in
    /// the same order. Long rows, short rows, channels innermost; f32, bf16
    /// and f16; about half of the outputs clamped, some exactly 0.
    #[test]
    fn fused_relu_mask_equals_masking_the_gradient_first() {
        use crate::cpu::{backward_elemt, normalize, relu_grad, ChannelCoefficients, ReluMask};
        fn check<T: Element>(to: impl Fn(f32) -> T) {
            for &(n, c, s, channels_last) in &[
                (3usize, 4usize, 5000usize, false),
                (40, 3, 49, false),
                (50, 24, 1, false),
                (6, 8, 9, true),
            ] {
                let len = n * c * s;
                let layout = if channels_last {
                    Layout::contiguous((n, s, c)).permute(&[0, 2, 1]).unwrap()
                } else {
                    Layout::contiguous((n, c, s))
                };
                let v = ChannelView::new(&layout, 1).unwrap();
                // Every 7th x is its channel's mean, so channels with a zero
                // shift have outputs of exactly 0 (no gradient passes there).
                let mean: Vec<f64> = (0..c).map(|k| 0.25 * k as f64 - 0.5).collect();
                let channel = |i: usize| if channels_last { i % c } else { (i / s) % c };
                let x: Vec<T> = (0..len)
                    .map(|i| match i % 7 {
                        0 => to(mean[channel(i)] as f32),
                        _ => to(((i * 7919) % 1013) as f32 * 0.004 - 2.0),
                    })
                    .collect();
                let dy: Vec<T> = (0..len)
                    .map(|i| to(((i * 104_729) % 61) as f32 * 0.1 - 3.0))
                    .collect();
                let scale: Vec<f64> = (0..c).map(|k| 1.3 - 0.2 * k as f64).collect();
                let shift: Vec<f64> = (0..c).map(|k| 0.3 * (k % 3) as f64 - 0.3).collect();
                let zeros = vec![0.0; c];
                let fwd = ChannelCoefficients::<T::Acc>::new(&mean, &zeros, &scale, &shift);
                let y = normalize(&x, &v, &fwd, None, true);
                let yv = ChannelView::new(&Layout::contiguous((n, c, s)), 1).unwrap();
                let masked = relu_grad(&dy, &v, &y, &yv);
                let mask = ReluMask::<T::Acc>::new(&scale, &shift);
                let clamped = y.iter().filter(|e| e.to_acc() <= T::Acc::ZERO).count();
                assert!(
                    clamped > len / 5 && clamped < len * 4 / 5,
                    "{clamped} of {len}"
                );
                let label = format!(
                    "{} {:?} last {channels_last}",
                    std::any::type_name::<T>(),
                    (n, c, s)
                );
                // `masked` is contiguous and dy is read through `v`: the path and
                // the order of the additions follow x's view either way.
                let want = grad_sums(&masked, &yv, &x, &v, &mean, None);
                let got = grad_sums(&dy, &v, &x, &v, &mean, Some(&mask));
                assert_eq!(got, want, "{label}: grad sums");
                let ones = vec![1.0; c];
                let bwd = ChannelCoefficients::<T::Acc>::new(&mean, &scale, &ones, &shift);
                let want = backward_elemt(&masked, &yv, &x, &v, &bwd, None);
                let got = backward_elemt(&dy, &v, &x, &v, &bwd, Some(&mask));
                let bits = |t: &[T]| {
                    t.iter()
                        .map(|e| e.to_acc().to_f64().to_bits())
                        .collect::<Vec<_>>()
                };
                assert_eq!(bits(&got), bits(&want), "{label}: input grad");
            }
        }
        check(|v| v);
        check(half::bf16::from_f32);
        check(half::f16::from_f32);
    }

    /// The f64 mean and variance (biased) of channel `ch` of `x`.
    fn exact_moments<T: Element>(x: &[T], v: &ChannelView, ch: usize) -> (f64, f64) {
        let vals: Vec<f64> = (0..v.outer)
            .flat_map(|o| (0..v.inner).map(move |i| (o, i)))
            .map(|(o, i)| x[v.index(o, ch, i)].to_acc().to_f64())
            .collect();
        let n = vals.len() as f64;
        let mean = vals.iter().sum::<f64>() / n;
        (
            mean,
            vals.iter().map(|e| (e - mean) * (e - mean)).sum::<f64>() / n,
        )
    }

    /// The layouts of every statistics path: long rows cut into blocks (one
    /// of 4096 and a rest), short rows taken as blocks of whole rows,
    /// channels innermost in register tiles (64 channels) and through memory
    /// (5 channels: 4096 rows, one whole block), and rows gathered through a
    /// transposed view.
    fn every_stats_path() -> Vec<Layout> {
        vec![
            Layout::contiguous((2, 3, 5000)),
            Layout::contiguous((90, 2, 49)),
            Layout::contiguous((300, 64)),
            Layout::contiguous((4096, 5)),
            Layout::contiguous((49, 3, 40)).permute(&[2, 1, 0]).unwrap(),
        ]
    }

    /// Checks the mean and biased variance of every channel from
    /// `batch_stats` against the f64 moments of the same values: the mean
    /// within `1e-5` standard deviations, the variance within `rtol`.
    fn check_moments<T: Element>(x: &[T], v: &ChannelView, rtol: f64, what: &str) {
        let stats = batch_stats(x, v);
        let c_n = v.channels;
        for ch in 0..c_n {
            let (n, s1, s2) = (stats[ch], stats[c_n + ch], stats[2 * c_n + ch]);
            let (mean, var) = (s1 / n, s2 / n - (s1 / n) * (s1 / n));
            let (want_mean, want_var) = exact_moments(x, v, ch);
            let std = want_var.sqrt();
            assert!(
                (mean - want_mean).abs() <= 1e-5 * std,
                "{what} {:?} channel {ch}: mean {mean} vs {want_mean} (std {std:e})",
                T::DTYPE
            );
            assert!(
                (var - want_var).abs() <= rtol * want_var,
                "{what} {:?} channel {ch}: variance {var:e} vs {want_var:e}, relative error {:e}",
                T::DTYPE,
                (var - want_var).abs() / want_var
            );
        }
    }

    /// Statistics of data whose mean is large against its spread keep the
    /// spread's precision on every path: f32 with |mean|/std of 1.7e4 and
    /// 4.3e4 (mean of either sign; beyond, the f64 `Σx²` of the result
    /// itself loses the variance's digits), and f16 and bf16 with the largest ratios the
    /// formats hold for such data (a value and its neighbour one step up,
    /// one in 64 values there: |mean|/std about 60 times the format's
    /// values per octave, 8e3 in f16, 1e3 in bf16). The one-pass sums around
    /// a value of the block subtract exactly there.
    #[test]
    fn statistics_keep_the_precision_of_the_spread_for_large_means() {
        fn check<T: Element>(to: impl Fn(f32) -> T, values: &dyn Fn(usize) -> f32, rtol: f64) {
            for layout in every_stats_path() {
                let v = ChannelView::new(&layout, 1).unwrap();
                let x: Vec<T> = (0..layout.shape().elem_count())
                    .map(|i| to(values(i)))
                    .collect();
                check_moments(&x, &v, rtol, &format!("{:?}", layout.shape()));
            }
        }
        // Pseudo-random, evenly spread in [-1, 1).
        let noise = |i: usize| ((i * 7919 + 13) % 2048) as f32 / 1024.0 - 1.0;
        for mean in [1e4f32, -2.5e4] {
            check::<f32>(|v| v, &|i| mean + noise(i), 2e-5);
        }
        let one_in_64 = |i: usize| (i * 7919 + 13).is_multiple_of(64) as u32 as f32;
        check::<half::f16>(half::f16::from_f32, &|i| 1024.0 + one_in_64(i), 2e-5);
        check::<half::bf16>(half::bf16::from_f32, &|i| -256.0 - 2.0 * one_in_64(i), 2e-5);
    }

    /// A block whose first values (whose mean is the one-pass pivot) lie far
    /// out in the tail, here 10⁴ standard deviations of the rest above it,
    /// is summed again around its mean: without that, its M2 is the
    /// difference of two sums hundreds of times larger, and the variance
    /// loses most of its digits. Every path, the outliers at the first
    /// values of every block.
    #[test]
    fn statistics_stay_accurate_when_the_pivot_is_an_outlier() {
        for layout in every_stats_path() {
            let v = ChannelView::new(&layout, 1).unwrap();
            let len = layout.shape().elem_count();
            let mut x: Vec<f32> = (0..len)
                .map(|i| 3.0 + ((i * 7919 + 13) % 2048) as f32 / 1024.0)
                .collect();
            // The first values of every block of every channel: long rows
            // start blocks at 0 and 4096, short rows at every row of a
            // block's first outer index (all of them, to cover each block),
            // channels innermost at row 0.
            let head = 0..PIVOT_HEAD;
            for ch in 0..v.channels {
                for o in 0..v.outer {
                    if v.channel_innermost() {
                        if head.contains(&o) {
                            x[v.index(o, ch, 0)] = 1e4;
                        }
                        continue;
                    }
                    for i in head.clone().chain(BLOCK..BLOCK + PIVOT_HEAD) {
                        if i < v.inner {
                            x[v.index(o, ch, i)] = 1e4;
                        }
                    }
                }
            }
            check_moments(&x, &v, 2e-5, &format!("{:?}", layout.shape()));
        }
    }

    /// The statistics and gradient sums give the same bits whatever the
    /// number of threads: the blocks and the order of the f64 additions
    /// follow the shape alone. Every statistics path, 1, 2 and 3 threads.
    #[test]
    fn statistics_and_gradient_sums_do_not_depend_on_the_thread_count() {
        let mut layouts = every_stats_path();
        layouts.push(Layout::contiguous((2000, 40)));
        for layout in layouts {
            let v = ChannelView::new(&layout, 1).unwrap();
            let len = layout.shape().elem_count();
            let x: Vec<f32> = (0..len)
                .map(|i| 7.0 + ((i * 7919) % 1013) as f32 * 0.013)
                .collect();
            let dy: Vec<f32> = (0..len)
                .map(|i| ((i * 104_729) % 61) as f32 * 0.1 - 3.0)
                .collect();
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let stats = batch_stats(&x, &v);
                    let c = v.channels;
                    let mean: Vec<f64> = (0..c).map(|ch| stats[c + ch] / stats[ch]).collect();
                    let grads = grad_sums(&dy, &v, &x, &v, &mean, None);
                    let bits = |s: &[f64]| s.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
                    (bits(&stats), bits(&grads))
                })
            };
            let one = run(1);
            for threads in [2, 3] {
                assert!(
                    run(threads) == one,
                    "{:?}: {threads} threads differ from one",
                    layout.shape()
                );
            }
        }
    }
}
