//! Per-channel affine element-wise passes: normalization (forward, optionally
//! plus a residual and followed by a fused ReLU) and the input gradient (backward), and the
//! gradient mask of the fused ReLU. Outputs are contiguous in the shape of the
//! input view.

use super::{channel_row, dense_rows, multiversion, spatial_rows, TASK};
use crate::element::{Accum, Element, LaneCpu, CONVERT_LANES};
use crate::layout::ChannelView;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Per-channel coefficients of `out = dy·dy_scale + (x − mean)·x_scale + shift`,
/// with `mean = mean_hi + mean_lo` split so `x − mean` stays exact in f32.
#[derive(Debug, Clone)]
pub struct ChannelCoefficients<A> {
    /// High part of the mean.
    pub mean_hi: Vec<A>,
    /// Low part of the mean (`mean − mean_hi`).
    pub mean_lo: Vec<A>,
    /// Factor of the incoming gradient (backward only).
    pub dy_scale: Vec<A>,
    /// Factor of the centered input.
    pub x_scale: Vec<A>,
    /// Constant term.
    pub shift: Vec<A>,
}

impl<A: Accum> ChannelCoefficients<A> {
    /// Rounds f64 coefficients to the accumulator type; `mean` is split into high
    /// and low parts.
    pub fn new(mean: &[f64], dy_scale: &[f64], x_scale: &[f64], shift: &[f64]) -> Self {
        let (mean_hi, mean_lo) = crate::element::split_means(mean);
        let cast = |v: &[f64]| v.iter().map(|&e| A::from_f64(e)).collect::<Vec<A>>();
        Self {
            mean_hi,
            mean_lo,
            dy_scale: cast(dy_scale),
            x_scale: cast(x_scale),
            shift: cast(shift),
        }
    }

    /// The coefficients of `times` consecutive channel-innermost rows taken as
    /// one row: every vector repeated `times` times.
    fn repeated(&self, times: usize) -> Self {
        Self {
            mean_hi: self.mean_hi.repeat(times),
            mean_lo: self.mean_lo.repeat(times),
            dy_scale: self.dy_scale.repeat(times),
            x_scale: self.x_scale.repeat(times),
            shift: self.shift.repeat(times),
        }
    }
}

/// The forward's per-channel affine `(x − mean)·scale + shift` of a fused
/// ReLU, from which the backward passes recompute the ReLU's gradient mask
/// (`dy` where the output is > 0, or NaN) instead of reading the output.
/// Built from the same f64 values as the forward's [`ChannelCoefficients`]
/// (and the same mean), it repeats the forward's arithmetic bit for bit.
#[derive(Debug, Clone)]
pub struct ReluMask<A> {
    /// Factor of the centered input (`invstd·weight`).
    pub scale: Vec<A>,
    /// Constant term (the bias).
    pub shift: Vec<A>,
}

impl<A: Accum> ReluMask<A> {
    /// Rounds the f64 coefficients to the accumulator type.
    pub fn new(scale: &[f64], shift: &[f64]) -> Self {
        let cast = |v: &[f64]| v.iter().map(|&e| A::from_f64(e)).collect::<Vec<A>>();
        Self {
            scale: cast(scale),
            shift: cast(shift),
        }
    }

    /// The mask of `times` consecutive channel-innermost rows taken as one
    /// row: both vectors repeated `times` times.
    fn repeated(&self, times: usize) -> Self {
        Self {
            scale: self.scale.repeat(times),
            shift: self.shift.repeat(times),
        }
    }
}

/// The gradient through the fused ReLU at the unrounded output `v` (the
/// forward's `centered·scale + shift`): `g` where `v` rounds to a positive
/// `T` or is NaN, else 0 — the mask [`relu_pass`] reads from the output.
#[inline(always)]
pub(super) fn relu_masked<T: Element>(g: T::Acc, v: T::Acc) -> T::Acc {
    if v <= T::RELU_BOUND {
        <T::Acc as Accum>::ZERO
    } else {
        g
    }
}

/// The fused activation: `max(v, 0)` with `relu` (NaN stays NaN, as in
/// PyTorch's `relu`), else `v`. `relu` is loop-invariant wherever this is
/// called, so the compiler hoists the test out of the vectorized loops.
#[inline(always)]
fn activate<A: Accum>(v: A, relu: bool) -> A {
    if relu && v < A::ZERO {
        A::ZERO
    } else {
        v
    }
}

/// The gradient of the fused ReLU at output `y`: `dy` where `y > 0`, else 0
/// (PyTorch's `threshold_backward(dy, y, 0)`: NaN outputs pass `dy`).
#[inline(always)]
fn relu_pass<T: Element>(dy: T, y: T) -> T {
    if y.not_positive() {
        T::zero()
    } else {
        dy
    }
}

/// Elements that the channel-innermost passes take as one row when rows are
/// short. The rows of `BatchNorm1d`'s `(N, C)` inputs are `C` elements: with
/// few channels (32, say) a row is shorter than the vector loop the compiler
/// unrolls, and the per-row loop setup costs as much as the arithmetic. When
/// the rows are dense, [`rows_per_group`] consecutive rows (about `GROUP`
/// elements) run as one row against coefficients repeated as many times.
const GROUP: usize = 256;

/// Output size up to which f32/f64 passes group rows. Those passes are
/// bound by memory once their data leaves the cache, and there the grouped
/// rows measured slower: on the 2-core EPYC of this project's CI (32 MiB
/// L3), the eval pass of (262144, 32) f32 (33.5 MB) took 1.29–1.31 ms
/// grouped against 1.11–1.18 row by row, and of (131072, 32) 0.53–0.55
/// against 0.47, while (65536, 32) and smaller ran faster grouped. Half
/// types round every output, cost more arithmetic than memory, and group at
/// any size.
const GROUP_MAX_BYTES: usize = 8 << 20;

/// How many consecutive rows of a channel-innermost pass over `views` (the
/// output's view first) of `T` run as one row: enough for about [`GROUP`]
/// elements when the rows are at most `GROUP / 2` channels and dense in
/// every view (and, for f32/f64, the output at most [`GROUP_MAX_BYTES`]),
/// else 1.
fn rows_per_group<T: Element>(views: &[&ChannelView]) -> usize {
    let c = views[0].channels;
    let bytes = views[0].len() * std::mem::size_of::<T>();
    if views[0].channel_innermost()
        && c > 0
        && 2 * c <= GROUP
        && (rounds_each_element::<T>() || bytes <= GROUP_MAX_BYTES)
        && views.iter().all(|v| dense_rows(v))
    {
        GROUP.div_ceil(c)
    } else {
        1
    }
}

/// How many rows of `channels` elements the part `out` of a group of `rows`
/// rows holds (the last group of a task can be shorter); without a division
/// when rows are not grouped, where it would cost more than a short row.
#[inline(always)]
fn rows_in<U>(out: &[U], rows: usize, channels: usize) -> usize {
    if rows == 1 {
        1
    } else {
        out.len() / channels
    }
}

/// Consecutive rows of the output, starting at row `first`: channel-major rows
/// `(o, c)` of `inner` elements (row `r` is `o = r / C`, `c = r % C`), or, for
/// channel-innermost views, rows `o` of one element of every channel.
#[derive(Clone, Copy)]
enum Rows {
    Channel { first: usize },
    Spatial { first: usize },
}

/// Asks the kernel to back a large, not yet touched output buffer with
/// transparent huge pages where the system allows it (`madvise` mode), so
/// that filling it takes one page fault per 2 MiB instead of one per 4 KiB.
/// Fresh activations are page-faulted on every step with glibc's default
/// allocator, and those faults cost more than the arithmetic of this pass.
/// Only advice: nothing changes when huge pages are disabled.
fn advise_huge_pages<T>(buf: &mut Vec<T>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = buf.capacity() * std::mem::size_of::<T>();
        if bytes < 4 * HUGE {
            return;
        }
        let start = buf.as_mut_ptr() as usize;
        let (lo, hi) = (start.next_multiple_of(HUGE), (start + bytes) / HUGE * HUGE);
        if hi > lo {
            // SAFETY: `lo..hi` lies inside the buffer's own allocation, and
            // MADV_HUGEPAGE only changes how its pages are backed, not their contents.
            unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Lanes of the element-wise row loops: a row is processed in runs of `LANES`
/// elements, and its tail (fewer than `LANES`) as one more run padded with
/// copies of its first element, whose results are dropped. Rows of short maps
/// (7×7 = 49 elements, 14×14 = 196) are shorter than the unrolled vector
/// loops the compiler makes of a plain loop, so their elements would
/// otherwise run one by one (the f32 → bf16 rounding at scalar speed).
const LANES: usize = 16;

/// The run of [`LANES`] elements at `i`: `dst[i + k] = f(a[i + k], b[i + k])`,
/// on arrays of a fixed length, so the compiler unrolls and vectorizes it
/// whole. A function, not a closure, so that it inlines into the caller's
/// instruction-set tier.
#[inline(always)]
fn run_lanes<T: Element>(
    dst: &mut [MaybeUninit<T>],
    a: &[T],
    b: &[T],
    i: usize,
    f: &impl Fn(T::Acc, T::Acc) -> T::Acc,
) {
    // Loaded whole before anything is stored: the compiler cannot tell that
    // `dst` does not alias the inputs, and would otherwise keep every load
    // behind the store before it, one element at a time.
    let a: [T; LANES] = a[i..i + LANES].try_into().expect("a run");
    let b: [T; LANES] = b[i..i + LANES].try_into().expect("a run");
    let mut out = [const { MaybeUninit::<T>::uninit() }; LANES];
    for k in 0..LANES {
        out[k].write(T::from_acc(f(a[k].to_acc(), b[k].to_acc())));
    }
    dst[i..i + LANES].copy_from_slice(&out);
}

/// Writes `T::from_acc(f(a[i].to_acc(), b[i].to_acc(), [c[i] for c in
/// coef]))` to `dst[i]` for every `i` (`b` read only with `TWO`: else `f`
/// gets `a[i]` twice; `coef`: per-element coefficients, at least as long as
/// `dst`), converting [`CONVERT_LANES`] values at a time with
/// [`Element::to_acc_lanes`] and [`Element::from_acc_lanes`]: runs of
/// [`CONVERT_LANES`], the last ending at the row's end and overlapping the
/// one before it (whose elements it writes again with the same values);
/// rows shorter than a run element by element. For the types that convert
/// in lanes ([`Element::CONVERTS_IN_LANES`]: f16, whose per-element
/// conversions are calls the compiler cannot vectorize).
#[inline(always)]
fn convert_map<T: Element, const TWO: bool, const K: usize>(
    dst: &mut [MaybeUninit<T>],
    a: &[T],
    b: &[T],
    coef: [&[T::Acc]; K],
    f: impl Fn(T::Acc, T::Acc, [T::Acc; K]) -> T::Acc,
) {
    let cpu = LaneCpu::for_type::<T>();
    const L: usize = CONVERT_LANES;
    let n = dst.len();
    let a = &a[..n];
    let b = if TWO { &b[..n] } else { a };
    let coef = coef.map(|c| &c[..n]);
    if n < L {
        for (i, d) in dst.iter_mut().enumerate() {
            let e = a[i].to_acc();
            let g = if TWO { b[i].to_acc() } else { e };
            d.write(T::from_acc(f(e, g, coef.map(|c| c[i]))));
        }
        return;
    }
    let mut i = 0;
    while i + L <= n {
        convert_run::<T, TWO, K>(dst, a, b, coef, (i, cpu), &f);
        i += L;
    }
    if i < n {
        convert_run::<T, TWO, K>(dst, a, b, coef, (n - L, cpu), &f);
    }
}

/// The run of [`CONVERT_LANES`] elements at `i` of [`convert_map`]. A
/// function, not a closure, so that it inlines into the caller's
/// instruction-set tier, and the F16C conversions with it (a closure stayed
/// a call, compiled for the baseline, with the conversions calls too); the
/// coefficients are loaded as whole runs, so that the lanes vectorize.
#[inline(always)]
fn convert_run<T: Element, const TWO: bool, const K: usize>(
    dst: &mut [MaybeUninit<T>],
    a: &[T],
    b: &[T],
    coef: [&[T::Acc]; K],
    (i, cpu): (usize, LaneCpu),
    f: &impl Fn(T::Acc, T::Acc, [T::Acc; K]) -> T::Acc,
) {
    const L: usize = CONVERT_LANES;
    let av = T::to_acc_lanes(a[i..i + L].try_into().expect("a run"), cpu);
    let bv = if TWO {
        T::to_acc_lanes(b[i..i + L].try_into().expect("a run"), cpu)
    } else {
        av
    };
    let cs: [[T::Acc; L]; K] = coef.map(|c| c[i..i + L].try_into().expect("a run"));
    let mut r = [<T::Acc as Accum>::ZERO; L];
    for l in 0..L {
        r[l] = f(av[l], bv[l], std::array::from_fn(|k| cs[k][l]));
    }
    for (d, y) in dst[i..i + L].iter_mut().zip(T::from_acc_lanes(r, cpu)) {
        d.write(y);
    }
}

/// Writes `T::from_acc(f(a[i].to_acc(), b[i].to_acc()))` to `dst[i]` for
/// every `i` (`a` and `b` at least as long as `dst`). Types that convert in
/// lanes go through [`convert_map`]. For the others, with `runs`, rows of
/// [`LANES`] to `4·LANES` elements (the
/// short rows of 7×7 and smaller maps) run in runs of [`LANES`], the last one
/// ending at the row's end and overlapping the one before it, whose elements
/// it writes again with the same values. Other rows run as one plain loop,
/// which the compiler vectorizes with unrolled runs of `4·LANES` and a scalar
/// remainder: cheap for f32, but for half types (`runs`, see
/// [`rounds_each_element`]) the remainder of a short row costs more than
/// its vector part.
#[inline(always)]
fn map2_lanes<T: Element>(
    dst: &mut [MaybeUninit<T>],
    a: &[T],
    b: &[T],
    runs: bool,
    f: impl Fn(T::Acc, T::Acc) -> T::Acc,
) {
    if T::CONVERTS_IN_LANES {
        return convert_map::<T, true, 0>(dst, a, b, [], |e, g, _| f(e, g));
    }
    let n = dst.len();
    let (a, b) = (&a[..n], &b[..n]);
    if !runs || !(LANES..4 * LANES).contains(&n) {
        for ((d, &e), &g) in dst.iter_mut().zip(a).zip(b) {
            d.write(T::from_acc(f(e.to_acc(), g.to_acc())));
        }
        return;
    }
    // At most three whole runs and the tail, written out: as a loop over runs,
    // the compiler vectorizes across runs, with gathers.
    run_lanes(dst, a, b, 0, &f);
    if n >= 2 * LANES {
        run_lanes(dst, a, b, LANES, &f);
    }
    if n >= 3 * LANES {
        run_lanes(dst, a, b, 2 * LANES, &f);
    }
    if !n.is_multiple_of(LANES) {
        run_lanes(dst, a, b, n - LANES, &f);
    }
}

/// Writes `T::from_acc(f(a[i].to_acc()))` to `dst[i]` for every `i` (`a` at
/// least as long as `dst`), as [`map2_lanes`].
#[inline(always)]
fn map_lanes<T: Element>(
    dst: &mut [MaybeUninit<T>],
    a: &[T],
    runs: bool,
    f: impl Fn(T::Acc) -> T::Acc,
) {
    if T::CONVERTS_IN_LANES {
        return convert_map::<T, false, 0>(dst, a, a, [], |e, _, _| f(e));
    }
    map2_lanes(dst, a, a, runs, |e, _| f(e))
}

/// Whether `T` is stored narrower than its accumulator (f16, bf16), so that
/// every output element is rounded (a dozen integer operations, at scalar
/// speed in a loop's remainder).
#[inline(always)]
fn rounds_each_element<T: Element>() -> bool {
    std::mem::size_of::<T>() < std::mem::size_of::<T::Acc>()
}

/// Allocates the output of `v`'s shape and fills it in parallel, a run of
/// whole rows per task (`fill` gets the run and its part of the output).
fn elementwise<T, S, I, F>(v: &ChannelView, init: I, fill: F) -> Vec<T>
where
    T: Copy + Send + Sync,
    I: Fn() -> S + Sync + Send,
    F: Fn(&mut S, Rows, &mut [MaybeUninit<T>]) + Sync + Send,
{
    let len = v.len();
    let mut out: Vec<T> = Vec::with_capacity(len);
    advise_huge_pages(&mut out);
    if len > 0 {
        let row_len = if v.channel_innermost() {
            v.channels
        } else {
            v.inner
        };
        let rows_per_task = (TASK / row_len).max(1);
        let innermost = v.channel_innermost();
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(rows_per_task * row_len)
            .enumerate()
            .for_each_init(init, |state, (t, chunk)| {
                let first = t * rows_per_task;
                let rows = if innermost {
                    Rows::Spatial { first }
                } else {
                    Rows::Channel { first }
                };
                fill(state, rows, chunk);
            });
        // SAFETY: every one of the `len` elements was written by exactly one task
        // above (the chunks tile `0..len`, and each task writes all the rows of its chunk).
        unsafe { out.set_len(len) };
    }
    out
}

multiversion! {
    /// Channel-major rows `first..` of the normalization, filling `dst`.
    wide fn normalize_rows<T: Element>(dst: &mut [MaybeUninit<T>], x: &[T], v: &ChannelView, first: usize, k: &ChannelCoefficients<T::Acc>, relu: bool, buf: &mut Vec<T>) -> () {
        for (r, row) in (first..).zip(dst.chunks_mut(v.inner)) {
            let (o, c) = (r / v.channels, r % v.channels);
            let (mh, ml, b, s) = (k.mean_hi[c], k.mean_lo[c], k.x_scale[c], k.shift[c]);
            let src = channel_row(x, v, o, c, buf);
            if relu {
                map_lanes(row, src, rounds_each_element::<T>(), |e| activate(((e - mh) - ml) * b + s, true));
            } else {
                map_lanes(row, src, rounds_each_element::<T>(), |e| ((e - mh) - ml) * b + s);
            }
        }
    }
}

multiversion! {
    /// Channel-innermost rows `first..` of the normalization (every channel once
    /// per row), filling `dst`; `rows` consecutive rows at a time, `k` repeated
    /// as many times.
    wide fn normalize_spatial<T: Element>(dst: &mut [MaybeUninit<T>], x: &[T], v: &ChannelView, first: usize, rows: usize, k: &ChannelCoefficients<T::Acc>, relu: bool, buf: &mut Vec<T>) -> () {
        for (o, row) in (first..).step_by(rows).zip(dst.chunks_mut(rows * v.channels)) {
            let src = spatial_rows(x, v, o, rows_in(row, rows, v.channels), buf);
            if T::CONVERTS_IN_LANES {
                let coef = [&k.mean_hi[..], &k.mean_lo, &k.x_scale, &k.shift];
                convert_map::<T, false, 4>(row, src, src, coef, |e, _, [mh, ml, b, s]| activate(((e - mh) - ml) * b + s, relu));
                continue;
            }
            let it = row.iter_mut().zip(src).zip(&k.mean_hi).zip(&k.mean_lo).zip(&k.x_scale).zip(&k.shift);
            for (((((d, &e), &mh), &ml), &b), &s) in it {
                d.write(T::from_acc(activate(((e.to_acc() - mh) - ml) * b + s, relu)));
            }
        }
    }
}

multiversion! {
    /// Channel-major rows `first..` of the input gradient, filling `dst`.
    wide fn backward_rows<T: Element>(
        dst: &mut [MaybeUninit<T>],
        dy: &[T],
        dv: &ChannelView,
        x: &[T],
        xv: &ChannelView,
        first: usize,
        k: &ChannelCoefficients<T::Acc>,
        relu: Option<&ReluMask<T::Acc>>,
        bufs: &mut (Vec<T>, Vec<T>),
    ) -> () {
        for (r, row) in (first..).zip(dst.chunks_mut(xv.inner)) {
            let (o, c) = (r / xv.channels, r % xv.channels);
            let (mh, ml) = (k.mean_hi[c], k.mean_lo[c]);
            let (a, b, s) = (k.dy_scale[c], k.x_scale[c], k.shift[c]);
            let g = channel_row(dy, dv, o, c, &mut bufs.0);
            let src = channel_row(x, xv, o, c, &mut bufs.1);
            match relu {
                Some(m) => {
                    let (ms, mb) = (m.scale[c], m.shift[c]);
                    map2_lanes(row, g, src, rounds_each_element::<T>(), |ge, e| {
                        let xc = (e - mh) - ml;
                        let gv = relu_masked::<T>(ge, xc * ms + mb);
                        gv * a + xc * b + s
                    });
                }
                None => map2_lanes(row, g, src, rounds_each_element::<T>(), |ge, e| {
                    ge * a + ((e - mh) - ml) * b + s
                }),
            }
        }
    }
}

multiversion! {
    /// Channel-innermost rows `first..` of the input gradient, filling `dst`;
    /// `rows` consecutive rows at a time, `k` and `relu` repeated as many times.
    wide fn backward_spatial<T: Element>(
        dst: &mut [MaybeUninit<T>],
        dy: &[T],
        dv: &ChannelView,
        x: &[T],
        xv: &ChannelView,
        first: usize,
        rows: usize,
        k: &ChannelCoefficients<T::Acc>,
        relu: Option<&ReluMask<T::Acc>>,
        bufs: &mut (Vec<T>, Vec<T>),
    ) -> () {
        for (o, row) in (first..).step_by(rows).zip(dst.chunks_mut(rows * xv.channels)) {
            let count = rows_in(row, rows, xv.channels);
            let g = spatial_rows(dy, dv, o, count, &mut bufs.0);
            let src = spatial_rows(x, xv, o, count, &mut bufs.1);
            if T::CONVERTS_IN_LANES {
                let coef = [&k.mean_hi[..], &k.mean_lo, &k.dy_scale, &k.x_scale, &k.shift];
                match relu {
                    Some(m) => {
                        let [mh, ml, a, b, s] = coef;
                        let coef = [mh, ml, a, b, s, &m.scale, &m.shift];
                        convert_map::<T, true, 7>(row, g, src, coef, |ge, e, [mh, ml, a, b, s, ms, mb]| {
                            let xc = (e - mh) - ml;
                            let gv = relu_masked::<T>(ge, xc * ms + mb);
                            gv * a + xc * b + s
                        });
                    }
                    None => convert_map::<T, true, 5>(row, g, src, coef, |ge, e, [mh, ml, a, b, s]| {
                        ge * a + ((e - mh) - ml) * b + s
                    }),
                }
                continue;
            }
            let coef = k.mean_hi.iter().zip(&k.mean_lo).zip(&k.dy_scale).zip(&k.x_scale).zip(&k.shift);
            let it = row.iter_mut().zip(g).zip(src).zip(coef);
            match relu {
                Some(m) => {
                    for ((((d, &ge), &e), ((((&mh, &ml), &a), &b), &s)), (&ms, &mb)) in it.zip(m.scale.iter().zip(&m.shift)) {
                        let xc = (e.to_acc() - mh) - ml;
                        let gv = relu_masked::<T>(ge.to_acc(), xc * ms + mb);
                        d.write(T::from_acc(gv * a + xc * b + s));
                    }
                }
                None => {
                    for (((d, &ge), &e), ((((&mh, &ml), &a), &b), &s)) in it {
                        d.write(T::from_acc(ge.to_acc() * a + ((e.to_acc() - mh) - ml) * b + s));
                    }
                }
            }
        }
    }
}

multiversion! {
    /// Channel-major rows `first..` of the normalization plus a residual `z`.
    wide fn normalize_add_rows<T: Element>(
        dst: &mut [MaybeUninit<T>],
        x: &[T],
        v: &ChannelView,
        z: &[T],
        zv: &ChannelView,
        first: usize,
        k: &ChannelCoefficients<T::Acc>,
        relu: bool,
        bufs: &mut (Vec<T>, Vec<T>),
    ) -> () {
        for (r, row) in (first..).zip(dst.chunks_mut(v.inner)) {
            let (o, c) = (r / v.channels, r % v.channels);
            let (mh, ml, b, s) = (k.mean_hi[c], k.mean_lo[c], k.x_scale[c], k.shift[c]);
            let src = channel_row(x, v, o, c, &mut bufs.0);
            let res = channel_row(z, zv, o, c, &mut bufs.1);
            map2_lanes(row, src, res, rounds_each_element::<T>(), |e, q| {
                activate((((e - mh) - ml) * b + s) + q, relu)
            });
        }
    }
}

multiversion! {
    /// Channel-innermost rows `first..` of the normalization plus a residual
    /// `z`; `rows` consecutive rows at a time, `k` repeated as many times.
    wide fn normalize_add_spatial<T: Element>(
        dst: &mut [MaybeUninit<T>],
        x: &[T],
        v: &ChannelView,
        z: &[T],
        zv: &ChannelView,
        first: usize,
        rows: usize,
        k: &ChannelCoefficients<T::Acc>,
        relu: bool,
        bufs: &mut (Vec<T>, Vec<T>),
    ) -> () {
        for (o, row) in (first..).step_by(rows).zip(dst.chunks_mut(rows * v.channels)) {
            let count = rows_in(row, rows, v.channels);
            let src = spatial_rows(x, v, o, count, &mut bufs.0);
            let res = spatial_rows(z, zv, o, count, &mut bufs.1);
            if T::CONVERTS_IN_LANES {
                let coef = [&k.mean_hi[..], &k.mean_lo, &k.x_scale, &k.shift];
                convert_map::<T, true, 4>(row, src, res, coef, |e, q, [mh, ml, b, s]| activate((((e - mh) - ml) * b + s) + q, relu));
                continue;
            }
            let coef = k.mean_hi.iter().zip(&k.mean_lo).zip(&k.x_scale).zip(&k.shift);
            for (((d, &e), &q), (((&mh, &ml), &b), &s)) in row.iter_mut().zip(src).zip(res).zip(coef) {
                d.write(T::from_acc(activate((((e.to_acc() - mh) - ml) * b + s) + q.to_acc(), relu)));
            }
        }
    }
}

/// `y = (x − mean)·x_scale + shift` per channel, plus `residual` (a tensor of
/// `x`'s shape with its own strides) when given, then `max(y, 0)` with `relu`;
/// all in the accumulator type, rounded to `T` once.
pub fn normalize<T: Element>(
    x: &[T],
    v: &ChannelView,
    k: &ChannelCoefficients<T::Acc>,
    residual: Option<(&[T], &ChannelView)>,
    relu: bool,
) -> Vec<T> {
    let group = match residual {
        None => rows_per_group::<T>(&[v]),
        Some((_, zv)) => rows_per_group::<T>(&[v, zv]),
    };
    let repeated;
    let kg = if group > 1 {
        repeated = k.repeated(group);
        &repeated
    } else {
        k
    };
    match residual {
        None => elementwise(v, Vec::new, |buf, rows, dst| match rows {
            Rows::Channel { first } => normalize_rows(dst, x, v, first, k, relu, buf),
            Rows::Spatial { first } => normalize_spatial(dst, x, v, first, group, kg, relu, buf),
        }),
        Some((z, zv)) => elementwise(
            v,
            || (Vec::new(), Vec::new()),
            |bufs, rows, dst| match rows {
                Rows::Channel { first } => {
                    normalize_add_rows(dst, x, v, z, zv, first, k, relu, bufs)
                }
                Rows::Spatial { first } => {
                    normalize_add_spatial(dst, x, v, z, zv, first, group, kg, relu, bufs)
                }
            },
        ),
    }
}

/// `dx = dy·dy_scale + (x − mean)·x_scale + shift` per channel; `dy` and `x`
/// have the same shape, possibly different strides. With `relu`, `dy` is the
/// gradient of a fused ReLU's output and is first masked where the forward's
/// output (recomputed from `x`) was not positive.
pub fn backward_elemt<T: Element>(
    dy: &[T],
    dv: &ChannelView,
    x: &[T],
    xv: &ChannelView,
    k: &ChannelCoefficients<T::Acc>,
    relu: Option<&ReluMask<T::Acc>>,
) -> Vec<T> {
    let group = rows_per_group::<T>(&[xv, dv]);
    let repeated;
    let (kg, mg) = if group > 1 {
        repeated = (k.repeated(group), relu.map(|m| m.repeated(group)));
        (&repeated.0, repeated.1.as_ref())
    } else {
        (k, relu)
    };
    elementwise(
        xv,
        || (Vec::new(), Vec::new()),
        |bufs, rows, dst| match rows {
            Rows::Channel { first } => backward_rows(dst, dy, dv, x, xv, first, k, relu, bufs),
            Rows::Spatial { first } => {
                backward_spatial(dst, dy, dv, x, xv, first, group, kg, mg, bufs)
            }
        },
    )
}

multiversion! {
    /// Channel-major rows `first..` of the fused ReLU's gradient mask.
    wide fn relu_grad_rows<T: Element>(
        dst: &mut [MaybeUninit<T>],
        dy: &[T],
        dv: &ChannelView,
        y: &[T],
        yv: &ChannelView,
        first: usize,
        bufs: &mut (Vec<T>, Vec<T>),
    ) -> () {
        for (r, row) in (first..).zip(dst.chunks_mut(yv.inner)) {
            let (o, c) = (r / yv.channels, r % yv.channels);
            let g = channel_row(dy, dv, o, c, &mut bufs.0);
            let out = channel_row(y, yv, o, c, &mut bufs.1);
            for ((d, &ge), &e) in row.iter_mut().zip(g).zip(out) {
                d.write(relu_pass(ge, e));
            }
        }
    }
}

multiversion! {
    /// Channel-innermost rows `first..` of the fused ReLU's gradient mask,
    /// `rows` consecutive rows at a time.
    wide fn relu_grad_spatial<T: Element>(
        dst: &mut [MaybeUninit<T>],
        dy: &[T],
        dv: &ChannelView,
        y: &[T],
        yv: &ChannelView,
        first: usize,
        rows: usize,
        bufs: &mut (Vec<T>, Vec<T>),
    ) -> () {
        for (o, row) in (first..).step_by(rows).zip(dst.chunks_mut(rows * yv.channels)) {
            let count = rows_in(row, rows, yv.channels);
            let g = spatial_rows(dy, dv, o, count, &mut bufs.0);
            let out = spatial_rows(y, yv, o, count, &mut bufs.1);
            for ((d, &ge), &e) in row.iter_mut().zip(g).zip(out) {
                d.write(relu_pass(ge, e));
            }
        }
    }
}

/// The gradient through a fused ReLU: `dy` where the output `y > 0`, else 0;
/// `dy` and `y` have the same shape, possibly different strides; the result
/// is contiguous in `y`'s shape.
pub fn relu_grad<T: Element>(dy: &[T], dv: &ChannelView, y: &[T], yv: &ChannelView) -> Vec<T> {
    elementwise(
        yv,
        || (Vec::new(), Vec::new()),
        |bufs, rows, dst| match rows {
            Rows::Channel { first } => relu_grad_rows(dst, dy, dv, y, yv, first, bufs),
            Rows::Spatial { first } => relu_grad_spatial(
                dst,
                dy,
                dv,
                y,
                yv,
                first,
                rows_per_group::<T>(&[yv, dv]),
                bufs,
            ),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Layout;
    use half::{bf16, f16};

    /// `got` has `len` elements, each `want(i)` bit for bit (compared in f64,
    /// where both are exact; NaN never occurs here; the sign bit separates -0
    /// from +0).
    fn assert_same_bits<T: Element>(got: &[T], len: usize, want: &dyn Fn(usize) -> T, what: &str) {
        assert_eq!(got.len(), len, "{what}");
        for (i, &e) in got.iter().enumerate() {
            let (e, w) = (e.to_acc().to_f64(), want(i).to_acc().to_f64());
            assert!(
                e.to_bits() == w.to_bits(),
                "{what}, element {i}: {e} vs {w}"
            );
        }
    }

    /// The runs of short rows (overlapping last run, rows under [`LANES`],
    /// rows past `4·LANES`) write every element once with the value of the
    /// per-element formula, bit for bit: row lengths 1 to 70, a batch of 3,
    /// f32, bf16 and f16 (converted in runs of lanes, the last one
    /// overlapping, rows under a run element by element), the normalization (with and without ReLU, with a
    /// residual), the input gradient (with and without the fused mask) and the
    /// ReLU mask pass.
    #[test]
    fn row_runs_give_the_per_element_formula_bit_for_bit() {
        fn check<T: Element>(to: impl Fn(f32) -> T) {
            let (n, c) = (3usize, 3usize);
            for inner in 1..=70usize {
                let len = n * c * inner;
                let v = ChannelView::new(&Layout::contiguous((n, c, inner)), 1).unwrap();
                let x: Vec<T> = (0..len)
                    .map(|i| to(((i * 7919) % 1000) as f32 * 0.013 - 5.0))
                    .collect();
                let g: Vec<T> = (0..len)
                    .map(|i| to(((i * 104_729) % 61) as f32 * 0.1 - 3.0))
                    .collect();
                let f = |ch: &[f64]| ch.to_vec();
                let mean = f(&[0.4, -1.25, 2.0]);
                let k = ChannelCoefficients::<T::Acc>::new(
                    &mean,
                    &f(&[-0.01, 0.02, -0.03]),
                    &f(&[0.7, 1.3, -0.9]),
                    &f(&[0.05, -0.4, 0.3]),
                );
                let m = ReluMask::<T::Acc>::new(&f(&[0.6, -1.1, 0.8]), &f(&[0.1, 0.2, -0.3]));
                let at = |i: usize| ((i / inner) % c, i);
                let xc = |i: usize| {
                    let (ch, i) = at(i);
                    (x[i].to_acc() - k.mean_hi[ch]) - k.mean_lo[ch]
                };
                let same = |got: &[T], want: &dyn Fn(usize) -> T, what: &str| {
                    assert_same_bits(got, len, want, &format!("{what}, rows of {inner}"))
                };
                for relu in [false, true] {
                    let y = normalize(&x, &v, &k, None, relu);
                    let want = |i: usize| {
                        let ch = at(i).0;
                        T::from_acc(activate(xc(i) * k.x_scale[ch] + k.shift[ch], relu))
                    };
                    same(&y, &want, "normalize");
                    let y = normalize(&x, &v, &k, Some((&g, &v)), relu);
                    let want = |i: usize| {
                        let ch = at(i).0;
                        let r = xc(i) * k.x_scale[ch] + k.shift[ch] + g[i].to_acc();
                        T::from_acc(activate(r, relu))
                    };
                    same(&y, &want, "normalize + residual");
                }
                let dx = backward_elemt(&g, &v, &x, &v, &k, None);
                let want = |i: usize| {
                    let ch = at(i).0;
                    T::from_acc(
                        g[i].to_acc() * k.dy_scale[ch] + xc(i) * k.x_scale[ch] + k.shift[ch],
                    )
                };
                same(&dx, &want, "input gradient");
                let dx = backward_elemt(&g, &v, &x, &v, &k, Some(&m));
                let want = |i: usize| {
                    let ch = at(i).0;
                    let gv = relu_masked::<T>(g[i].to_acc(), xc(i) * m.scale[ch] + m.shift[ch]);
                    T::from_acc(gv * k.dy_scale[ch] + xc(i) * k.x_scale[ch] + k.shift[ch])
                };
                same(&dx, &want, "input gradient after the fused ReLU");
                let dz = relu_grad(&g, &v, &x, &v);
                same(&dz, &|i| relu_pass(g[i], x[i]), "ReLU mask");
            }
        }
        check::<f32>(|v| v);
        check::<bf16>(bf16::from_f32);
        check::<f16>(f16::from_f32);
    }

    /// Channel-innermost `(N, C)` inputs, whose short dense rows run in groups
    /// of consecutive rows against repeated coefficients: every pass gives the
    /// per-element formula bit for bit, for channel counts around the group
    /// sizes (1 to 129), row counts that end groups and parallel tasks part-way
    /// (one whole task and 7 rows of a second), f32, bf16 and f16, with dense
    /// views; and for channel counts on either side of the row loops' cuts
    /// (under one run, a run plus an overlapping one, `4·LANES`, past the
    /// grouping), with a residual and a gradient whose rows have gaps (no
    /// grouping), and with all of them gapped. (Rows of every length through
    /// the same row loops: [`row_runs_give_the_per_element_formula_bit_for_bit`].)
    #[test]
    fn grouped_short_rows_give_the_per_element_formula_bit_for_bit() {
        fn check<T: Element>(to: impl Fn(f32) -> T) {
            for c in [1usize, 2, 3, 5, 31, 32, 33, 64, 100, 128, 129] {
                let n = TASK / c + 7;
                let dense = Layout::contiguous((n, c));
                let gapped = Layout::contiguous((n, c + 3)).narrow(1, 2, c).unwrap();
                let storage = n * (c + 3);
                let x: Vec<T> = (0..storage)
                    .map(|i| to(((i * 7919) % 1000) as f32 * 0.013 - 5.0))
                    .collect();
                let g: Vec<T> = (0..storage)
                    .map(|i| to(((i * 104_729) % 61) as f32 * 0.1 - 3.0))
                    .collect();
                let per_channel = |f: &dyn Fn(usize) -> f64| (0..c).map(f).collect::<Vec<f64>>();
                let k = ChannelCoefficients::<T::Acc>::new(
                    &per_channel(&|ch| 0.4 - 0.3 * ch as f64),
                    &per_channel(&|ch| -0.01 + 0.002 * ch as f64),
                    &per_channel(&|ch| 0.7 + 0.05 * ch as f64),
                    &per_channel(&|ch| 0.05 - 0.01 * ch as f64),
                );
                let m = ReluMask::<T::Acc>::new(
                    &per_channel(&|ch| 0.6 - 0.04 * ch as f64),
                    &per_channel(&|ch| 0.1 - 0.02 * ch as f64),
                );
                let view = |l: &Layout| ChannelView::new(l, 1).unwrap();
                let combos: &[(&Layout, &Layout)] = if [3, 33, 64, 129].contains(&c) {
                    &[(&dense, &dense), (&dense, &gapped), (&gapped, &gapped)]
                } else {
                    &[(&dense, &dense)]
                };
                for &(xl, gl) in combos {
                    let (xv, gv) = (view(xl), view(gl));
                    assert!(xv.channel_innermost());
                    let xe = |i: usize| x[xv.index(i / c, i % c, 0)].to_acc();
                    let ge = |i: usize| g[gv.index(i / c, i % c, 0)].to_acc();
                    let xc = |i: usize| (xe(i) - k.mean_hi[i % c]) - k.mean_lo[i % c];
                    let same = |got: &[T], want: &dyn Fn(usize) -> T, what: &str| {
                        assert_same_bits(got, n * c, want, &format!("{what}, ({n}, {c})"))
                    };
                    for relu in [false, true] {
                        let y = normalize(&x, &xv, &k, None, relu);
                        let want = |i: usize| {
                            let ch = i % c;
                            T::from_acc(activate(xc(i) * k.x_scale[ch] + k.shift[ch], relu))
                        };
                        same(&y, &want, "normalize");
                        let y = normalize(&x, &xv, &k, Some((&g, &gv)), relu);
                        let want = |i: usize| {
                            let ch = i % c;
                            let r = xc(i) * k.x_scale[ch] + k.shift[ch] + ge(i);
                            T::from_acc(activate(r, relu))
                        };
                        same(&y, &want, "normalize + residual");
                    }
                    let dx = backward_elemt(&g, &gv, &x, &xv, &k, None);
                    let want = |i: usize| {
                        let ch = i % c;
                        T::from_acc(ge(i) * k.dy_scale[ch] + xc(i) * k.x_scale[ch] + k.shift[ch])
                    };
                    same(&dx, &want, "input gradient");
                    let dx = backward_elemt(&g, &gv, &x, &xv, &k, Some(&m));
                    let want = |i: usize| {
                        let ch = i % c;
                        let masked = relu_masked::<T>(ge(i), xc(i) * m.scale[ch] + m.shift[ch]);
                        T::from_acc(masked * k.dy_scale[ch] + xc(i) * k.x_scale[ch] + k.shift[ch])
                    };
                    same(&dx, &want, "input gradient after the fused ReLU");
                    let dz = relu_grad(&g, &gv, &x, &xv);
                    let want = |i: usize| {
                        relu_pass(g[gv.index(i / c, i % c, 0)], x[xv.index(i / c, i % c, 0)])
                    };
                    same(&dz, &want, "ReLU mask");
                }
            }
        }
        check::<f32>(|v| v);
        check::<bf16>(bf16::from_f32);
        check::<f16>(f16::from_f32);
    }
}
