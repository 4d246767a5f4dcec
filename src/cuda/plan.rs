//! Host-side planning of the CUDA kernels: canonical views and work splits.
//!
//! Pure Rust (no CUDA calls), so it is unit-tested in every build. The kernels
//! in `cuda-kernels/` rely on the invariants documented here.

use crate::layout::ChannelView;
use candle::DType;

/// Threads per block of every kernel (`BLOCK` in `cuda-kernels/tile.cuh`).
pub const BLOCK: usize = 256;
/// Threads of a warp.
pub const WARP: usize = 32;
/// Most values one work item (a partial) covers, so that counts stay exact in
/// f32 (< 2^24) and partials stay balanced.
pub const MAX_TASK: usize = 1 << 22;
/// Chunks of the channel-major reductions are multiples of this many values, so
/// 128-bit vectors (at most 8 elements) never straddle two chunks.
pub const CHUNK_ALIGN: usize = 16;
/// Resident blocks per SM that the unit tests plan for (the most
/// [`BLOCK`]-thread blocks an SM of compute capability 8.0–12.x holds); on a
/// device, each kernel's own figure ([`Slots`]).
#[cfg(test)]
pub const BLOCKS_PER_SM: usize = 8;
/// Largest `gridDim.y`.
pub const MAX_GRID_Y: usize = 65_535;
/// Largest `gridDim.x`.
pub const MAX_GRID_X: usize = (1 << 31) - 1;

/// A view as the kernels see it (`struct View` in `cuda-kernels/view.cuh`).
/// Strides of dims of size 1 are 0.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KView {
    /// Size of the merged dims before the channel.
    pub outer: i64,
    /// Number of channels.
    pub channels: i64,
    /// Size of the merged dims after the channel.
    pub inner: i64,
    /// Stride of `outer` (elements).
    pub outer_stride: i64,
    /// Stride of the channel (elements).
    pub channel_stride: i64,
    /// Stride of `inner` (elements).
    pub inner_stride: i64,
    /// Storage offset of element (0, 0, 0).
    pub offset: i64,
}

impl KView {
    /// The kernel view of a [`ChannelView`].
    pub fn new(v: &ChannelView) -> Self {
        let stride = |size: usize, stride: usize| if size == 1 { 0 } else { stride as i64 };
        Self {
            outer: v.outer as i64,
            channels: v.channels as i64,
            inner: v.inner as i64,
            outer_stride: stride(v.outer, v.outer_stride),
            channel_stride: stride(v.channels, v.channel_stride),
            inner_stride: stride(v.inner, v.inner_stride),
            offset: v.offset as i64,
        }
    }
}

/// A contiguous row-major view of the same `(outer, channels, inner)` sizes as
/// `v`: where the element-wise kernels write their outputs.
pub fn contiguous_like(v: &ChannelView) -> ChannelView {
    ChannelView {
        outer_stride: v.channels * v.inner,
        channel_stride: v.inner,
        inner_stride: 1,
        offset: 0,
        ..*v
    }
}

/// How a kernel walks its views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Channel-major: each channel's values are `outer` rows of `inner` values.
    Major,
    /// Channel-innermost: `inner == 1` and the primary view has
    /// `channel_stride == 1`; every row `o` holds one value of each channel.
    Innermost,
}

/// Views of one kernel launch, brought into the form its path expects. All
/// views share `outer`, `channels` and `inner`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canon {
    /// The path the kernels take.
    pub path: Path,
    /// The views, in the order given to [`canonicalize`].
    pub views: Vec<KView>,
}

impl Canon {
    /// The shared sizes (of the first view).
    pub fn sizes(&self) -> (usize, usize, usize) {
        let v = &self.views[0];
        (v.outer as usize, v.channels as usize, v.inner as usize)
    }
}

/// Merges `outer` and `inner` of every view into one run of rows (`inner` 1),
/// when that is possible for all of them.
fn merge_rows(views: &[KView]) -> Option<Vec<KView>> {
    let v0 = views[0];
    if v0.inner == 1 {
        return Some(views.to_vec());
    }
    if v0.outer == 1 {
        return Some(
            views
                .iter()
                .map(|v| KView {
                    outer: v.inner,
                    inner: 1,
                    outer_stride: v.inner_stride,
                    inner_stride: 0,
                    ..*v
                })
                .collect(),
        );
    }
    let mergeable = views
        .iter()
        .all(|v| v.outer_stride == v.inner * v.inner_stride);
    mergeable.then(|| {
        views
            .iter()
            .map(|v| KView {
                outer: v.outer * v.inner,
                inner: 1,
                outer_stride: v.inner_stride,
                inner_stride: 0,
                ..*v
            })
            .collect()
    })
}

/// Brings views of equal sizes into the form of a kernel path. The first view
/// is the primary input (x): when its channel stride is 1 (and C > 1) and every
/// view's rows merge, the channel-innermost path reads it coalesced along the
/// channels (a permuted NHWC tensor, a 2-D batch); otherwise the channel-major
/// path runs along `inner` (after turning an `inner == 1` view into a single
/// row per channel, e.g. a transposed 2-D batch).
pub fn canonicalize(views: &[ChannelView]) -> Canon {
    let kv: Vec<KView> = views.iter().map(KView::new).collect();
    let x = kv[0];
    if x.channels > 1 && x.channel_stride == 1 {
        if let Some(rows) = merge_rows(&kv) {
            return Canon {
                path: Path::Innermost,
                views: rows,
            };
        }
    }
    let views = if x.inner == 1 && x.outer > 1 {
        kv.iter()
            .map(|v| KView {
                outer: 1,
                inner: v.outer,
                outer_stride: 0,
                inner_stride: v.outer_stride,
                ..*v
            })
            .collect()
    } else {
        kv
    };
    Canon {
        path: Path::Major,
        views,
    }
}

/// Whether `vec`-element (16-byte) loads are valid for every view along the
/// contiguous dim of the path: stride 1 there, sizes and other strides and the
/// offsets multiples of `vec`, and 16-byte aligned base pointers
/// (`base_aligned`, one per view).
pub fn vectorizable(canon: &Canon, vec: usize, base_aligned: &[bool]) -> bool {
    let vec = vec as i64;
    if vec <= 1 || base_aligned.len() != canon.views.len() || !base_aligned.iter().all(|&a| a) {
        return false;
    }
    let (_, c, i) = canon.sizes();
    canon.views.iter().all(|v| {
        let common = v.outer_stride % vec == 0 && v.offset % vec == 0;
        match canon.path {
            Path::Major => {
                common && i as i64 % vec == 0 && v.inner_stride == 1 && v.channel_stride % vec == 0
            }
            Path::Innermost => {
                common && c as i64 % vec == 0 && v.channel_stride == 1 && v.inner == 1
            }
        }
    })
}

/// Work split of the channel-major reductions (`bn_stats_major_*`,
/// `bn_grad_major_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MajorSplit {
    /// Values per chunk (a multiple of [`CHUNK_ALIGN`]).
    pub chunk_len: usize,
    /// Chunks per channel (partials per channel); every chunk is non-empty.
    pub chunks: usize,
    /// Threads per task: [`BLOCK`] (one task per block) or [`WARP`].
    pub group: usize,
    /// Blocks of the grid.
    pub blocks: usize,
}

/// How many blocks of one kernel the GPU runs at once: its multiprocessors
/// times the [`BLOCK`]-thread blocks of that kernel one of them holds (set by
/// the kernel's registers; the driver's occupancy figure). A grid of more
/// blocks runs in waves, and a last wave that fills few of these slots leaves
/// bandwidth unused: on an H200, 1056 blocks of `bn_normalize_f32` (5 per SM)
/// ran as 1.6 waves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    /// Multiprocessors.
    pub sms: usize,
    /// Resident blocks per multiprocessor.
    pub per_sm: usize,
}

impl Slots {
    /// `per_sm` blocks on each of `sms` multiprocessors (both at least 1).
    pub fn new(sms: usize, per_sm: usize) -> Self {
        Self {
            sms: sms.max(1),
            per_sm: per_sm.max(1),
        }
    }

    /// [`BLOCKS_PER_SM`] blocks on each of `sms` multiprocessors.
    #[cfg(test)]
    pub fn assumed(sms: usize) -> Self {
        Self::new(sms, BLOCKS_PER_SM)
    }

    /// Resident blocks on the whole GPU.
    pub fn blocks(&self) -> usize {
        self.sms * self.per_sm
    }
}

/// Waves beyond which a split stops looking for a fuller last wave (a last
/// wave then costs at most 1/9 of the time).
const MAX_WAVES: usize = 8;

/// The share of the slots a split's waves keep busy that is good enough, as
/// the fraction (numerator, denominator): 95%.
const GOOD_FILL: (usize, usize) = (95, 100);

/// The fraction of `slots` that `blocks` blocks keep busy over their waves,
/// as the fraction `(busy, offered)`.
fn wave_fill(blocks: usize, slots: usize) -> (usize, usize) {
    let slots = slots.max(1);
    (blocks, blocks.div_ceil(slots).max(1) * slots)
}

/// Splits `channels` channels of `plane` (> 0) values each for a kernel with
/// `slots`: a whole block per (channel, chunk) task when channels are large, a
/// warp when they are small. Among the chunk counts that give every thread at
/// least 16 values (unless the channel is smaller) and every task at most
/// [`MAX_TASK`] values, the fewest whose waves keep [`GOOD_FILL`] of the slots
/// busy (else the fullest within [`MAX_WAVES`] waves): e.g. 256 channels on
/// 528 slots take 2 chunks (512 blocks, one wave) rather than 5 (1280
/// blocks, 2.4 waves). Fewer, longer blocks beat a fuller last wave: on an
/// H200, 4352 blocks of `bn_stats_major_bf16` (11 waves, 99.9% full) took
/// 44 µs where 1280 took 37.
pub fn major_split(channels: usize, plane: usize, slots: Slots) -> MajorSplit {
    let plane = plane.max(1);
    let channels = channels.max(1);
    let group = if plane >= 8192 { BLOCK } else { WARP };
    let tasks_per_block = BLOCK / group;
    let min_chunks = plane.div_ceil(MAX_TASK);
    let max_chunks = plane.div_ceil(group * 16).max(min_chunks);
    let slots = slots.blocks();
    let split = |chunks: usize| {
        let chunk_len = plane.div_ceil(chunks).next_multiple_of(CHUNK_ALIGN);
        let chunks = plane.div_ceil(chunk_len);
        MajorSplit {
            chunk_len,
            chunks,
            group,
            blocks: (channels * chunks).div_ceil(tasks_per_block),
        }
    };
    let good = |(busy, offered): (usize, usize)| busy * GOOD_FILL.1 >= offered * GOOD_FILL.0;
    let mut best = split(min_chunks);
    let mut best_fill = wave_fill(best.blocks, slots);
    for chunks in min_chunks + 1..=max_chunks {
        if good(best_fill) || best.blocks > MAX_WAVES * slots {
            break;
        }
        let s = split(chunks);
        let fill = wave_fill(s.blocks, slots);
        if fill.0 * best_fill.1 > best_fill.0 * fill.1 {
            (best, best_fill) = (s, fill);
        }
    }
    best
}

/// Work split of the channel-innermost reductions (`bn_stats_inner_*`,
/// `bn_grad_inner_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InnerSplit {
    /// Threads along channels (`blockDim.x`, a power of two ≤ 32).
    pub bx: usize,
    /// Threads along rows (`blockDim.y = BLOCK / bx`).
    pub by: usize,
    /// Channel groups (`gridDim.x`): `bx * cv` channels each.
    pub grid_x: usize,
    /// Row blocks (`gridDim.y`), also the partials per channel; all non-empty.
    pub row_blocks: usize,
    /// Rows per row block.
    pub rows_per_block: usize,
}

/// Fewest rows per thread of the channel-innermost reductions, unless the
/// batch has fewer.
pub const MIN_INNER_ROWS: usize = 8;

/// Splits `rows` (> 0) rows of `channels` channels, `cv` channels per thread,
/// for a kernel of which `slots` blocks are resident at once.
pub fn inner_split(channels: usize, rows: usize, cv: usize, slots: usize) -> InnerSplit {
    let rows = rows.max(1);
    let groups = channels.div_ceil(cv.max(1)).max(1);
    let bx = groups.next_power_of_two().min(WARP);
    let by = BLOCK / bx;
    let grid_x = groups.div_ceil(bx);
    let target = slots.max(1);
    // At least MIN_INNER_ROWS rows per thread: each row block costs a
    // shared-memory merge tree and a partial per channel (with 2 rows per
    // thread, bn_stats_inner_bf16 on (4096, 1024) wrote 6.3 MB of partials for
    // 8.4 MB of input and ran at 4% of the H200's DRAM bandwidth).
    let row_blocks = target
        .div_ceil(grid_x)
        .clamp(1, rows.div_ceil(by * MIN_INNER_ROWS))
        .max(rows.div_ceil(MAX_TASK))
        .min(MAX_GRID_Y);
    let rows_per_block = rows.div_ceil(row_blocks);
    InnerSplit {
        bx,
        by,
        grid_x,
        row_blocks: rows.div_ceil(rows_per_block),
        rows_per_block,
    }
}

/// The element-wise `mode` of vectors along the channels (channels innermost).
pub const MODE_ALONG_CHANNELS: i32 = 2;

/// Blocks of a grid-stride element-wise kernel with `slots` in `mode` over
/// `len` (> 0) elements of `channels` channels, `w` per thread and step: the
/// GPU's resident blocks (one wave), no more than needed. Along the channels
/// ([`MODE_ALONG_CHANNELS`], the `(N, C)` layout), when the grid loops, its
/// count is rounded down to one whose stride is a multiple of `channels`:
/// every thread then keeps the same `w` channels on every step and the
/// kernel loads their coefficients once instead of once per element.
pub fn elementwise_blocks(len: usize, w: usize, slots: Slots, mode: i32, channels: usize) -> usize {
    let w = w.max(1);
    let needed = len.div_ceil(BLOCK * w);
    let target = slots.blocks();
    if mode == MODE_ALONG_CHANNELS && needed > target && channels > 0 && channels.is_multiple_of(w)
    {
        // A stride of blocks·BLOCK·w elements is a multiple of channels when
        // blocks·BLOCK is a multiple of the vectors per row.
        let vectors = channels / w;
        let period = vectors / gcd(BLOCK, vectors);
        if period <= target {
            return target / period * period;
        }
    }
    needed.clamp(1, target)
}

/// The entry of the element-wise pass `base` (`bn_normalize`,
/// `bn_normalize_add` or `bn_input_grad`) for inputs of `dtype` (its suffix)
/// launched in `mode` on `blocks` blocks of `w` elements per thread over
/// `channels` channels: `{base}_rows_{dtype}` along the channels when the
/// grid's stride is a multiple of `channels` (each thread keeps its channels
/// and loads their coefficients once; see [`elementwise_blocks`]), else
/// `{base}_{dtype}`.
pub fn elementwise_kernel(
    base: &str,
    dtype: &str,
    mode: i32,
    blocks: usize,
    w: usize,
    channels: usize,
) -> String {
    if mode == MODE_ALONG_CHANNELS && channels > 0 && (blocks * BLOCK * w).is_multiple_of(channels)
    {
        format!("{base}_rows_{dtype}")
    } else {
        format!("{base}_{dtype}")
    }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Blocks of a one-thread-per-item kernel.
pub fn per_item_blocks(items: usize) -> usize {
    items.div_ceil(BLOCK).max(1)
}

/// Blocks of a one-warp-per-channel combine kernel.
pub fn per_warp_blocks(channels: usize) -> usize {
    channels.div_ceil(BLOCK / WARP).max(1)
}

/// The 128-bit vector width of element type `T` (in elements).
pub fn vec_width<T>() -> usize {
    (16 / std::mem::size_of::<T>()).max(1)
}

/// Values per load of the level-1 reduction kernels over `canon`, for
/// elements of `vec_width` per 128 bits: `vec_width` where 16-byte vectors are
/// [`vectorizable`]; for 16-bit types on the channel-major path, half of it
/// (8-byte vectors) where those are, e.g. rows of 14×14 = 196 values; else 1.
pub fn load_width(canon: &Canon, vec_width: usize, base_aligned: &[bool]) -> usize {
    if vectorizable(canon, vec_width, base_aligned) {
        vec_width
    } else if vec_width == 8
        && canon.path == Path::Major
        && vectorizable(canon, vec_width / 2, base_aligned)
    {
        vec_width / 2
    } else {
        1
    }
}

/// The level-1 kernel of a reduction for `prefix` (`bn_stats`, `bn_grad`,
/// `bn_grad_relu`) over a `path` with `width` values per load, for inputs of
/// `dtype`: `{prefix}_major_{dtype}` or `{prefix}_inner_{dtype}` with 128-bit
/// loads, `{prefix}_major_half_{dtype}` with 8-byte loads, and
/// `{prefix}_major_scalar_{dtype}` or `{prefix}_inner_scalar_{dtype}` with
/// single elements (entry points of their own, so that each path keeps its
/// registers).
pub fn reduction_kernel(prefix: &str, path: Path, width: usize, dtype: DType) -> String {
    let path = match path {
        Path::Major => "major",
        Path::Innermost => "inner",
    };
    let full = 16 / dtype.size_in_bytes().max(1);
    let load = match width {
        1 => "_scalar",
        w if w == full => "",
        _ => "_half",
    };
    format!("{prefix}_{path}{load}_{}", dtype.as_str())
}

/// Level 1 of a two-level per-channel reduction: the path and the work split
/// (its kernel: [`reduction_kernel`]).
#[derive(Debug, Clone)]
pub struct Reduction {
    /// The canonical views (primary input first).
    pub canon: Canon,
    /// The work split of the path.
    pub split: ReductionSplit,
}

/// The work split of a [`Reduction`].
#[derive(Debug, Clone, Copy)]
pub enum ReductionSplit {
    /// Channel-major kernels (`*_major_*`).
    Major(MajorSplit),
    /// Channel-innermost kernels (`*_inner_*`).
    Inner(InnerSplit),
}

impl Reduction {
    /// Plans the reduction of non-empty views loaded `width` values at a
    /// time ([`load_width`]) by a kernel of which `slots` blocks are resident
    /// on the whole GPU at once ([`Slots`]).
    pub fn new(canon: Canon, width: usize, slots: Slots) -> Self {
        let (outer, channels, inner) = canon.sizes();
        let split = match canon.path {
            Path::Major => ReductionSplit::Major(major_split(channels, outer * inner, slots)),
            Path::Innermost => {
                ReductionSplit::Inner(inner_split(channels, outer, width, slots.blocks()))
            }
        };
        Self { canon, split }
    }

    /// Partials per channel (written by level 1, read by level 2).
    pub fn parts(&self) -> usize {
        match self.split {
            ReductionSplit::Major(s) => s.chunks,
            ReductionSplit::Inner(s) => s.row_blocks,
        }
    }

    /// Level 1's `(grid, block)` dimensions: `BLOCK`-thread 1-D blocks for
    /// the channel-major path, `(bx, by)` blocks over `(channel groups, row
    /// blocks)` for the channel-innermost path.
    pub fn launch_dims(&self) -> ([usize; 3], [usize; 3]) {
        match self.split {
            ReductionSplit::Major(s) => ([s.blocks, 1, 1], [BLOCK, 1, 1]),
            ReductionSplit::Inner(s) => ([s.grid_x, s.row_blocks, 1], [s.bx, s.by, 1]),
        }
    }
}

/// Whether the element-wise kernels can take `vec`-element (16-byte) vectors
/// in memory order across row boundaries (mode 3): every view of a
/// channel-major launch contiguous in `(outer, channels, inner)` order (the
/// rows back to back), offsets multiples of `vec`, base pointers 16-byte
/// aligned, the element count a multiple of `vec`, and rows of at least `vec`
/// elements, so that a vector spans at most two channels. This is how rows
/// whose length is no multiple of the vector width (7×7 maps in f32, 7×7 and
/// 14×14 maps in f16/bf16) still get 128-bit loads.
pub fn flat_vectorizable(canon: &Canon, vec: usize, base_aligned: &[bool]) -> bool {
    if vec <= 1 || base_aligned.len() != canon.views.len() || !base_aligned.iter().all(|&a| a) {
        return false;
    }
    let (o, c, i) = canon.sizes();
    let vec = vec as i64;
    let (o, c, i) = (o as i64, c as i64, i as i64);
    canon.path == Path::Major
        && i >= vec
        && (o * c * i) % vec == 0
        && canon.views.iter().all(|v| {
            // Strides of dims of size 1 are 0 (KView::new).
            let dense = |size: i64, stride: i64, want: i64| size == 1 || stride == want;
            v.offset % vec == 0
                && dense(i, v.inner_stride, 1)
                && dense(c, v.channel_stride, i)
                && dense(o, v.outer_stride, c * i)
        })
}

/// The element-wise `mode` argument (see cuda-kernels/elementwise.cu): 0
/// scalar, 1 vectors along `inner`, 2 vectors along the channels, 3 vectors
/// in memory order across rows ([`flat_vectorizable`]).
pub fn elementwise_mode(canon: &Canon, vec_width: usize, aligned: &[bool]) -> i32 {
    match (vectorizable(canon, vec_width, aligned), canon.path) {
        (true, Path::Major) => 1,
        (true, Path::Innermost) => 2,
        (false, _) if flat_vectorizable(canon, vec_width, aligned) => 3,
        (false, _) => 0,
    }
}

/// Bytes of the per-channel coefficients of the element-wise kernels (8
/// accumulator values per channel; f64 for f64 inputs, else f32).
pub fn coef_bytes(dtype: DType, channels: usize) -> usize {
    let acc = if dtype == DType::F64 { 8 } else { 4 };
    channels * 8 * acc
}

/// The accumulator suffix of the coefficient kernels for an input dtype.
pub fn acc_suffix(dtype: DType) -> &'static str {
    if dtype == DType::F64 {
        "f64"
    } else {
        "f32"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Layout;

    fn view(l: &Layout, axis: usize) -> ChannelView {
        ChannelView::new(l, axis).unwrap()
    }

    /// Storage indices of every (o, c, i) of a canonical view, in (c, o, i) order.
    fn indices(v: &KView) -> Vec<i64> {
        let mut out = Vec::new();
        for c in 0..v.channels {
            for o in 0..v.outer {
                for i in 0..v.inner {
                    out.push(
                        v.offset + o * v.outer_stride + c * v.channel_stride + i * v.inner_stride,
                    );
                }
            }
        }
        out
    }

    /// Canonicalization keeps, for each channel, the set of storage indices of
    /// every view, and the element-to-element pairing between views.
    fn check_same_elements(orig: &[ChannelView], canon: &Canon) {
        let before: Vec<KView> = orig.iter().map(KView::new).collect();
        let pairs = |views: &[KView]| {
            let mut rows: Vec<Vec<i64>> = Vec::new();
            let per: Vec<Vec<i64>> = views.iter().map(indices).collect();
            for e in 0..per[0].len() {
                rows.push(per.iter().map(|p| p[e]).collect());
            }
            let c = views[0].channels as usize;
            let n = rows.len() / c.max(1);
            let mut chunks: Vec<Vec<Vec<i64>>> =
                rows.chunks(n.max(1)).map(|r| r.to_vec()).collect();
            for ch in chunks.iter_mut() {
                ch.sort();
            }
            chunks
        };
        assert_eq!(pairs(&before), pairs(&canon.views));
    }

    #[test]
    fn contiguous_nchw_is_channel_major_and_vectorizable() {
        let l = Layout::contiguous((2, 3, 8, 8));
        let c = canonicalize(&[view(&l, 1)]);
        assert_eq!(c.path, Path::Major);
        assert!(vectorizable(&c, 4, &[true]));
        assert!(!vectorizable(&c, 4, &[false]));
        let l = Layout::contiguous((2, 3, 7, 7));
        let c = canonicalize(&[view(&l, 1)]);
        assert!(!vectorizable(&c, 4, &[true]));
    }

    #[test]
    fn rows_of_any_length_take_vectors_in_memory_order_when_dense() {
        let mode = |views: &[ChannelView], vec: usize, aligned: bool| {
            let c = canonicalize(views);
            elementwise_mode(&c, vec, &vec![aligned; views.len()])
        };
        // 7x7 maps: no vectors along the rows, but the tensor is dense.
        let l = Layout::contiguous((2, 4, 7, 7));
        let x = view(&l, 1);
        let out = contiguous_like(&x);
        assert_eq!(mode(&[x, out], 4, true), 3);
        assert_eq!(mode(&[x, out], 8, true), 3, "392 elements, rows of 49 >= 8");
        assert_eq!(mode(&[x, out], 4, false), 0, "misaligned base");
        // 8x8 maps keep the vectors along the rows.
        let l8 = Layout::contiguous((2, 4, 8, 8));
        let x8 = view(&l8, 1);
        assert_eq!(mode(&[x8, contiguous_like(&x8)], 8, true), 1);
        // Rows shorter than a vector (2x2 maps in bf16), an element count
        // that is no multiple of the vector, a gap between rows, a
        // broadcast view: scalar.
        let l = Layout::contiguous((4, 6, 2, 2));
        let v = view(&l, 1);
        assert_eq!(mode(&[v, contiguous_like(&v)], 8, true), 0);
        assert_eq!(mode(&[v, contiguous_like(&v)], 4, true), 1);
        let l = Layout::contiguous((1, 3, 7, 7));
        let v = view(&l, 1);
        assert_eq!(mode(&[v, contiguous_like(&v)], 4, true), 0, "147 elements");
        let n = Layout::contiguous((2, 4, 50)).narrow(2, 0, 48).unwrap();
        let v = view(&n, 1);
        assert_eq!(mode(&[v, contiguous_like(&v)], 4, true), 0);
        let b = Layout::new((2, 4, 7, 7).into(), vec![0, 1, 0, 0], 0);
        assert_eq!(mode(&[x, view(&b, 1), out], 4, true), 0);
        // A batch narrowed at a multiple of the vector stays dense.
        let n = Layout::contiguous((5, 4, 7, 7)).narrow(0, 2, 2).unwrap();
        let v = view(&n, 1);
        assert_eq!(mode(&[v, contiguous_like(&v)], 4, true), 3);
        // A transposed 2-D batch: one row per channel, back to back.
        let t = Layout::contiguous((3, 50)).transpose(0, 1).unwrap();
        let v = view(&t, 1);
        assert_eq!(mode(&[v, contiguous_like(&v)], 4, true), 0, "150 elements");
        let t = Layout::contiguous((4, 50)).transpose(0, 1).unwrap();
        let v = view(&t, 1);
        let c = canonicalize(&[v]);
        assert_eq!(c.sizes(), (1, 4, 50));
        assert_eq!(mode(&[v, v], 4, true), 3);
    }

    /// What the benchmark suite's dense inputs take on the GPU, per dtype:
    /// the element-wise mode and the reductions' level-1 kernel.
    #[test]
    fn suite_shapes_take_vectors_where_their_rows_allow() {
        let plan = |shape: &[usize], dtype: DType| {
            let vec = 16 / dtype.size_in_bytes();
            let l = Layout::contiguous(shape);
            let x = view(&l, 1);
            let canon = canonicalize(&[x, contiguous_like(&x)]);
            let rc = canonicalize(&[x]);
            let width = load_width(&rc, vec, &[true]);
            (
                elementwise_mode(&canon, vec, &[true, true]),
                reduction_kernel("bn_stats", rc.path, width, dtype),
            )
        };
        // (shape, (mode, kernel) for f32, then for bf16)
        type Plan = (i32, &'static str);
        let want: [(&[usize], Plan, Plan); 8] = [
            (
                &[32, 64, 112, 112],
                (1, "bn_stats_major_f32"),
                (1, "bn_stats_major_bf16"),
            ),
            (
                &[32, 256, 56, 56],
                (1, "bn_stats_major_f32"),
                (1, "bn_stats_major_bf16"),
            ),
            (
                &[32, 512, 28, 28],
                (1, "bn_stats_major_f32"),
                (1, "bn_stats_major_bf16"),
            ),
            // Rows of 196: 8-byte loads of bf16.
            (
                &[32, 1024, 14, 14],
                (1, "bn_stats_major_f32"),
                (3, "bn_stats_major_half_bf16"),
            ),
            (
                &[32, 2048, 7, 7],
                (3, "bn_stats_major_scalar_f32"),
                (3, "bn_stats_major_scalar_bf16"),
            ),
            (
                &[4096, 1024],
                (2, "bn_stats_inner_f32"),
                (2, "bn_stats_inner_bf16"),
            ),
            (
                &[2, 64, 16, 56, 56],
                (1, "bn_stats_major_f32"),
                (1, "bn_stats_major_bf16"),
            ),
            // DeepLab's 513-pixel crops at output stride 8.
            (
                &[8, 256, 65, 65],
                (3, "bn_stats_major_scalar_f32"),
                (3, "bn_stats_major_scalar_bf16"),
            ),
        ];
        for (shape, f32_plan, bf16_plan) in want {
            let got = plan(shape, DType::F32);
            assert_eq!((got.0, got.1.as_str()), f32_plan, "{shape:?} f32");
            let got = plan(shape, DType::BF16);
            assert_eq!((got.0, got.1.as_str()), bf16_plan, "{shape:?} bf16");
        }
        // f16 takes the half path too; f32 and f64 have no such entries.
        let rc = canonicalize(&[view(&Layout::contiguous((2, 3, 14, 14)), 1)]);
        assert_eq!(load_width(&rc, 8, &[true]), 4);
        assert_eq!(load_width(&rc, 8, &[false]), 1, "misaligned base");
        let rc = canonicalize(&[view(&Layout::contiguous((2, 3, 1, 6)), 1)]);
        assert_eq!(load_width(&rc, 4, &[true]), 1);
        assert_eq!(load_width(&rc, 2, &[true]), 2);
        assert_eq!(
            reduction_kernel("bn_grad_relu", Path::Major, 4, DType::F16),
            "bn_grad_relu_major_half_f16"
        );
    }

    #[test]
    fn channels_last_is_innermost_with_any_axis() {
        // The layer's form: (N, H, W, C) contiguous, axis 3.
        let l = Layout::contiguous((2, 4, 5, 8));
        let c = canonicalize(&[view(&l, 3)]);
        assert_eq!(c.path, Path::Innermost);
        assert_eq!(c.sizes(), (40, 8, 1));
        assert!(vectorizable(&c, 4, &[true]));
        // The same storage seen as (N, C, H, W), axis 1: rows merge.
        let p = l.permute(&[0, 3, 1, 2]).unwrap();
        let orig = [view(&p, 1)];
        let c = canonicalize(&orig);
        assert_eq!(c.path, Path::Innermost);
        assert_eq!(c.sizes(), (40, 8, 1));
        assert_eq!(c.views[0].outer_stride, 8);
        check_same_elements(&orig, &c);
        // With a contiguous NCHW output as second view the rows do not merge.
        let out = Layout::contiguous((2, 8, 4, 5));
        let orig = [view(&p, 1), view(&out, 1)];
        let c = canonicalize(&orig);
        assert_eq!(c.path, Path::Major);
        check_same_elements(&orig, &c);
        assert!(!vectorizable(&c, 4, &[true, true]));
    }

    #[test]
    fn two_d_batches() {
        let l = Layout::contiguous((64, 16));
        let orig = [view(&l, 1), view(&l, 1)];
        let c = canonicalize(&orig);
        assert_eq!(c.path, Path::Innermost);
        assert!(vectorizable(&c, 8, &[true, true]));
        check_same_elements(&orig, &c);
        // Transposed storage: one contiguous row per channel.
        let t = Layout::contiguous((16, 64)).transpose(0, 1).unwrap();
        let orig = [view(&t, 1)];
        let c = canonicalize(&orig);
        assert_eq!(c.path, Path::Major);
        assert_eq!(c.sizes(), (1, 16, 64));
        assert_eq!(c.views[0].inner_stride, 1);
        assert!(vectorizable(&c, 4, &[true]));
        check_same_elements(&orig, &c);
        // One channel.
        let l = Layout::contiguous((64, 1));
        let c = canonicalize(&[view(&l, 1)]);
        assert_eq!((c.path, c.sizes()), (Path::Major, (1, 1, 64)));
    }

    #[test]
    fn broadcast_and_narrowed_views() {
        let x = Layout::contiguous((4, 6, 3, 5));
        let dy = Layout::new((4, 6, 3, 5).into(), vec![0, 0, 0, 0], 0);
        let orig = [view(&x, 1), view(&dy, 1)];
        let c = canonicalize(&orig);
        assert_eq!(c.path, Path::Major);
        assert!(!vectorizable(&c, 4, &[true, true]));
        check_same_elements(&orig, &c);
        let n = Layout::new((4, 6, 8).into(), vec![48, 8, 1], 2);
        let c = canonicalize(&[view(&n, 1)]);
        assert!(!vectorizable(&c, 4, &[true]), "offset 2 is not aligned");
        let n = Layout::contiguous((4, 6, 3, 8)).narrow(2, 1, 2).unwrap();
        let c = canonicalize(&[view(&n, 1)]);
        assert_eq!(c.views[0].offset, 8);
        assert!(vectorizable(&c, 4, &[true]));
        let n = Layout::contiguous((4, 6, 3, 8)).narrow(0, 1, 2).unwrap();
        let c = canonicalize(&[view(&n, 1)]);
        assert!(vectorizable(&c, 4, &[true]));
        assert!(!vectorizable(&c, 16, &[true]));
    }

    #[test]
    fn major_splits_cover_every_value_once() {
        for &(c, plane) in &[
            (32usize, 8 * 512 * 512usize),
            (2048, 32 * 49),
            (1, 1),
            (3, 17),
            (1, 100_000_000),
            (1000, 8192),
            (7, 8191),
        ] {
            let s = major_split(c, plane, Slots::assumed(132));
            assert!(s.chunk_len.is_multiple_of(CHUNK_ALIGN));
            assert!(s.chunks >= 1 && (s.chunks - 1) * s.chunk_len < plane);
            assert!(s.chunks * s.chunk_len >= plane);
            assert!(s.chunk_len <= MAX_TASK + CHUNK_ALIGN);
            assert!(s.group == BLOCK || s.group == WARP);
            assert_eq!(s.blocks, (c * s.chunks).div_ceil(BLOCK / s.group));
            assert!(s.blocks <= MAX_GRID_X);
        }
        // Few large channels: many chunks per channel fill the GPU.
        let s = major_split(32, 8 * 512 * 512, Slots::assumed(132));
        assert_eq!(s.group, BLOCK);
        assert!(s.blocks >= 132 * 4, "{s:?}");
        // Many tiny channels: a warp per task, several tasks per block.
        let s = major_split(2048, 49 * 32, Slots::assumed(132));
        assert_eq!(s.group, WARP);
        assert!(s.blocks >= 132 * 4, "{s:?}");
    }

    /// The last wave of a channel-major split is nearly full, with as few
    /// chunks as that takes.
    #[test]
    fn major_splits_fill_their_last_wave() {
        let fill = |s: &MajorSplit, slots: Slots| {
            let (busy, offered) = wave_fill(s.blocks, slots.blocks());
            busy as f64 / offered as f64
        };
        // (32, 256, 56, 56) with 4 blocks per SM on 132 SMs: 2 chunks, one
        // wave of 512 of the 528 slots (5 chunks gave 2.4 waves).
        let slots = Slots::new(132, 4);
        let s = major_split(256, 32 * 56 * 56, slots);
        assert_eq!((s.chunks, s.blocks), (2, 512), "{s:?}");
        // With 3 blocks per SM: 3 chunks (768 of 792 slots), not the 17
        // (4352 blocks, 11 waves) that a fuller last wave would take.
        let s = major_split(256, 32 * 56 * 56, Slots::new(132, 3));
        assert_eq!((s.chunks, s.blocks), (3, 768), "{s:?}");
        // (32, 1024, 14, 14): warp tasks, 8 per block.
        let s = major_split(1024, 32 * 196, Slots::new(132, 3));
        assert_eq!(s.group, WARP);
        assert!(fill(&s, Slots::new(132, 3)) >= 0.95, "{s:?}");
        for (c, plane, per_sm) in [
            (64usize, 32 * 112 * 112usize, 4usize),
            (512, 32 * 28 * 28, 5),
            (2048, 32 * 49, 6),
            (64, 2 * 16 * 56 * 56, 3),
            (3, 1 << 22, 8),
        ] {
            let slots = Slots::new(132, per_sm);
            let s = major_split(c, plane, slots);
            assert!(fill(&s, slots) >= 0.9, "{c} x {plane}: {s:?}");
            assert!(s.blocks <= (MAX_WAVES + 1) * slots.blocks(), "{s:?}");
        }
        // A channel too small to split stays one task.
        assert_eq!(major_split(4, 100, Slots::new(132, 8)).chunks, 1);
    }

    #[test]
    fn inner_splits_cover_every_row_once() {
        for &(c, rows, cv) in &[
            (1024usize, 4096usize, 4usize),
            (32, 8 * 512 * 512, 4),
            (3, 10, 1),
            (2048, 32 * 49, 8),
            (2, 1, 1),
            (5, 1 << 30, 1),
        ] {
            let s = inner_split(c, rows, cv, 132 * BLOCKS_PER_SM);
            assert!(s.bx.is_power_of_two() && s.bx * s.by == BLOCK);
            assert!(s.grid_x * s.bx * cv >= c);
            assert!((s.grid_x - 1) * s.bx * cv < c);
            assert!(s.row_blocks >= 1 && s.row_blocks <= MAX_GRID_Y);
            assert!(s.row_blocks * s.rows_per_block >= rows);
            assert!((s.row_blocks - 1) * s.rows_per_block < rows);
            assert!(s.rows_per_block <= MAX_TASK);
        }
        // (4096, 1024) f32: 8 rows per thread still gives 4 blocks per SM.
        let s = inner_split(1024, 4096, 4, 132 * BLOCKS_PER_SM);
        assert_eq!(s.rows_per_block, s.by * MIN_INNER_ROWS, "{s:?}");
        assert!(s.grid_x * s.row_blocks >= 132 * 3, "{s:?}");
    }

    #[test]
    fn elementwise_grids() {
        let slots = Slots::assumed(132);
        assert_eq!(elementwise_blocks(1, 1, slots, 1, 64), 1);
        assert_eq!(
            elementwise_blocks(1 << 30, 4, slots, 1, 64),
            132 * BLOCKS_PER_SM
        );
        // One wave of the kernel's own resident blocks.
        assert_eq!(
            elementwise_blocks(1 << 30, 4, Slots::new(132, 5), 1, 64),
            660
        );
        // Along the channels, a looping grid strides by whole rows.
        for (channels, w) in [
            (1024, 4),
            (1024, 8),
            (2048, 4),
            (96, 4),
            (1000, 4),
            (4, 4),
            (8192, 8),
        ] {
            let blocks = elementwise_blocks(1 << 26, w, slots, MODE_ALONG_CHANNELS, channels);
            assert!(
                (1..=132 * BLOCKS_PER_SM).contains(&blocks),
                "{channels} {w}: {blocks}"
            );
            assert_eq!(blocks * BLOCK * w % channels, 0, "{channels} {w}: {blocks}");
        }
        // A grid that does not loop is left as it is.
        assert_eq!(
            elementwise_blocks(4096, 4, slots, MODE_ALONG_CHANNELS, 1000),
            4
        );
        assert_eq!(per_item_blocks(0), 1);
        assert_eq!(per_warp_blocks(9), 2);
    }
}
