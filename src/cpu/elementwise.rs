//! Per-channel affine element-wise passes: normalization (forward, optionally
//! plus a residual and followed by a fused ReLU) and the input gradient (backward), and the
//! gradient mask of the fused ReLU. Outputs are contiguous in the shape of the
//! input view.

use super::{channel_row, multiversion, spatial_row, TASK};
use crate::ops::element::{Accum, Element};
use crate::ops::layout::ChannelView;
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
        let (mean_hi, mean_lo) = super::reductions::split_means(mean);
        let cast = |v: &[f64]| v.iter().map(|&e| A::from_f64(e)).collect::<Vec<A>>();
        Self {
            mean_hi,
            mean_lo,
            dy_scale: cast(dy_scale),
            x_scale: cast(x_scale),
            shift: cast(shift),
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
    if y.to_acc() <= <T::Acc as Accum>::ZERO {
        T::from_acc(<T::Acc as Accum>::ZERO)
    } else {
        dy
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
            for (d, &e) in row.iter_mut().zip(channel_row(x, v, o, c, buf)) {
                d.write(T::from_acc(activate(((e.to_acc() - mh) - ml) * b + s, relu)));
            }
        }
    }
}

multiversion! {
    /// Channel-innermost rows `first..` of the normalization (every channel once
    /// per row), filling `dst`.
    wide fn normalize_spatial<T: Element>(dst: &mut [MaybeUninit<T>], x: &[T], v: &ChannelView, first: usize, k: &ChannelCoefficients<T::Acc>, relu: bool, buf: &mut Vec<T>) -> () {
        for (o, row) in (first..).zip(dst.chunks_mut(v.channels)) {
            let it = row.iter_mut().zip(spatial_row(x, v, o, buf)).zip(&k.mean_hi).zip(&k.mean_lo).zip(&k.x_scale).zip(&k.shift);
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
            let it = row.iter_mut().zip(g).zip(src);
            match relu {
                Some(m) => {
                    let (ms, mb) = (m.scale[c], m.shift[c]);
                    for ((d, &ge), &e) in it {
                        let xc = (e.to_acc() - mh) - ml;
                        let gv = relu_masked::<T>(ge.to_acc(), xc * ms + mb);
                        d.write(T::from_acc(gv * a + xc * b + s));
                    }
                }
                None => {
                    for ((d, &ge), &e) in it {
                        d.write(T::from_acc(ge.to_acc() * a + ((e.to_acc() - mh) - ml) * b + s));
                    }
                }
            }
        }
    }
}

multiversion! {
    /// Channel-innermost rows `first..` of the input gradient, filling `dst`.
    wide fn backward_spatial<T: Element>(
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
        for (o, row) in (first..).zip(dst.chunks_mut(xv.channels)) {
            let g = spatial_row(dy, dv, o, &mut bufs.0);
            let src = spatial_row(x, xv, o, &mut bufs.1);
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
            for ((d, &e), &q) in row.iter_mut().zip(src).zip(res) {
                d.write(T::from_acc(activate((((e.to_acc() - mh) - ml) * b + s) + q.to_acc(), relu)));
            }
        }
    }
}

multiversion! {
    /// Channel-innermost rows `first..` of the normalization plus a residual `z`.
    wide fn normalize_add_spatial<T: Element>(
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
        for (o, row) in (first..).zip(dst.chunks_mut(v.channels)) {
            let src = spatial_row(x, v, o, &mut bufs.0);
            let res = spatial_row(z, zv, o, &mut bufs.1);
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
    match residual {
        None => elementwise(v, Vec::new, |buf, rows, dst| match rows {
            Rows::Channel { first } => normalize_rows(dst, x, v, first, k, relu, buf),
            Rows::Spatial { first } => normalize_spatial(dst, x, v, first, k, relu, buf),
        }),
        Some((z, zv)) => elementwise(
            v,
            || (Vec::new(), Vec::new()),
            |bufs, rows, dst| match rows {
                Rows::Channel { first } => {
                    normalize_add_rows(dst, x, v, z, zv, first, k, relu, bufs)
                }
                Rows::Spatial { first } => {
                    normalize_add_spatial(dst, x, v, z, zv, first, k, relu, bufs)
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
    elementwise(
        xv,
        || (Vec::new(), Vec::new()),
        |bufs, rows, dst| match rows {
            Rows::Channel { first } => backward_rows(dst, dy, dv, x, xv, first, k, relu, bufs),
            Rows::Spatial { first } => backward_spatial(dst, dy, dv, x, xv, first, k, relu, bufs),
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
    /// Channel-innermost rows `first..` of the fused ReLU's gradient mask.
    wide fn relu_grad_spatial<T: Element>(
        dst: &mut [MaybeUninit<T>],
        dy: &[T],
        dv: &ChannelView,
        y: &[T],
        yv: &ChannelView,
        first: usize,
        bufs: &mut (Vec<T>, Vec<T>),
    ) -> () {
        for (o, row) in (first..).zip(dst.chunks_mut(yv.channels)) {
            let g = spatial_row(dy, dv, o, &mut bufs.0);
            let out = spatial_row(y, yv, o, &mut bufs.1);
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
            Rows::Spatial { first } => relu_grad_spatial(dst, dy, dv, y, yv, first, bufs),
        },
    )
}
