//! The CUDA kernels, run on the CPU by the emulator ([`crate::cuda::emulator`]),
//! against the CPU path of the ops.
//!
//! Each pipeline below makes the launches the op's `cuda_fwd` makes (same
//! kernels, same plans from [`crate::cuda::plan`], same argument descriptors from
//! [`crate::cuda::args`]) on emulated device buffers. Inputs cover both reduction
//! paths (channel-major with a block or a warp per task, channel-innermost),
//! 128-bit and scalar loads (misaligned bases and offsets), permuted,
//! transposed, narrowed and broadcast views, and f32, f64, f16 and bf16.
//!
//! Tolerances: the element-wise passes and the per-channel kernels compute
//! the CPU path's formulas in the same order with the same roundings, and the
//! emulator does not contract multiply-adds, so they must agree bit for bit
//! (on a GPU nvcc fuses multiply-adds, so there they agree to a few ulps). The
//! reductions add in a different order than the CPU path: sums agree to
//! 2e-6 (f32 accumulation) or 1e-13 (f64) of the sum of magnitudes.

use super::{
    AffineGrads, BatchNormAddOp, BatchNormOp, BatchStats, CounterIncrement, ForwardCoefficients,
    FusedRelu, GradStats, InputGrad, Moments, ReluGrad, RunningStat, RunningStatsUpdate,
};
use crate::cuda::args::{self, Mat2, Vec1};
use crate::cuda::emulator::{DevBuf, Emulator};
use crate::cuda::plan::{self, KView, Reduction, ReductionSplit, Slots};
use crate::layout::ChannelView;
use crate::ProcessGroup;
use candle::backend::BackendStorage;
use candle::{CpuStorage, DType, Device, Layout, Storage, Tensor, WithDType};
use half::{bf16, f16};
use std::ffi::c_void;

/// Multiprocessors the plans are made for (small, so that grids stay small
/// while splits still cut channels into several chunks).
const SMS: usize = 2;

type Major<T> = unsafe extern "C" fn(*const T, KView, i64, i64, i32, *mut f64);
type Inner<T> = unsafe extern "C" fn(*const T, KView, i64, *mut f64);
type GradMajor<T> = unsafe extern "C" fn(
    *const T,
    KView,
    *const T,
    KView,
    *const c_void,
    Mat2,
    i64,
    i64,
    i32,
    *mut f64,
);
type GradInner<T> =
    unsafe extern "C" fn(*const T, KView, *const T, KView, *const c_void, Mat2, i64, *mut f64);
type GradReluMajor<T> = unsafe extern "C" fn(
    *const T,
    KView,
    *const T,
    KView,
    *const c_void,
    Mat2,
    *const c_void,
    i64,
    i64,
    i32,
    *mut f64,
);
type GradReluInner<T> = unsafe extern "C" fn(
    *const T,
    KView,
    *const T,
    KView,
    *const c_void,
    Mat2,
    *const c_void,
    i64,
    *mut f64,
);
type Combine = unsafe extern "C" fn(*const f64, i64, i64, *mut f64);
type CoefNormalize = unsafe extern "C" fn(
    *const c_void,
    Mat2,
    *const c_void,
    Vec1,
    *const c_void,
    Vec1,
    i64,
    *mut c_void,
);
type CoefInputGrad = unsafe extern "C" fn(
    *const c_void,
    Mat2,
    *const c_void,
    Vec1,
    *const c_void,
    Mat2,
    *const c_void,
    Vec1,
    *const c_void,
    Vec1,
    i32,
    i64,
    *mut c_void,
);
type Normalize<T> = unsafe extern "C" fn(*const T, KView, *mut T, KView, *const c_void, i32, i32);
type NormalizeAdd<T> =
    unsafe extern "C" fn(*const T, KView, *const T, KView, *mut T, KView, *const c_void, i32, i32);
type ReluGradK<T> = unsafe extern "C" fn(*const T, KView, *const T, KView, *mut T, KView, i32);
type InputGradK<T> =
    unsafe extern "C" fn(*const T, KView, *const T, KView, *mut T, KView, *const c_void, i32, i32);

/// A deterministic normal generator (xorshift + Box-Muller).
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normals(&mut self, n: usize, mean: f64, std: f64) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let (u, v) = (self.uniform(), self.uniform());
                mean + std * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
            })
            .collect()
    }
}

/// How a case's tensor is laid out.
#[derive(Debug, Clone, Copy)]
enum Form {
    /// Contiguous in its shape.
    Contiguous,
    /// Made contiguous as `(N, d2.., C)`, then permuted to `(N, C, d2..)`.
    ChannelsLast,
    /// Made contiguous as `(C, N)`, then transposed to `(N, C)`.
    Transposed,
    /// Narrowed along `dim` to `start..start + len` of a larger contiguous tensor.
    Narrowed {
        dim: usize,
        start: usize,
        extra: usize,
    },
    /// Broadcast from `(1, C, 1, ..)` (gradients only).
    Broadcast,
}

/// One input configuration: the logical shape (channel axis 1), the layout
/// of x and of dy, and whether x's buffer starts one element past an aligned
/// address.
struct Case {
    name: &'static str,
    shape: &'static [usize],
    x: Form,
    dy: Form,
    misaligned: bool,
}

const fn case(
    name: &'static str,
    shape: &'static [usize],
    x: Form,
    dy: Form,
    misaligned: bool,
) -> Case {
    Case {
        name,
        shape,
        x,
        dy,
        misaligned,
    }
}

use Form::{Broadcast as Bcast, ChannelsLast as Nhwc, Contiguous as Cont, Transposed as Trans};
/// Rows 1..3 of a batch of 5 (offset keeps 128-bit loads).
const NARROW_BATCH: Form = Form::Narrowed {
    dim: 0,
    start: 1,
    extra: 2,
};
/// Columns 1..10 of rows of 11 (odd offset: scalar loads).
const NARROW_ROWS: Form = Form::Narrowed {
    dim: 2,
    start: 1,
    extra: 1,
};

const CASES: &[Case] = &[
    // Channel-major, 128-bit loads, a warp per task; then a misaligned base (scalar loads).
    case("nchw 8x8", &[2, 3, 8, 8], Cont, Cont, false),
    case("nchw misaligned", &[2, 3, 8, 8], Cont, Cont, true),
    // Rows of 12 values: 128-bit loads in f32 and f64, 8-byte loads in f16
    // and bf16 (the *_major_half_* kernels).
    case("nchw 12-value rows", &[3, 5, 2, 6], Cont, Cont, false),
    // 7x7 maps: scalar loads; x and dy in different layouts.
    case("nchw 7x7", &[3, 5, 7, 7], Cont, Nhwc, false),
    // 7x7 maps, every view dense: vectors in memory order across rows, each
    // spanning two channels at row ends (and the last channel to the first).
    case("nchw 7x7 dense", &[4, 6, 7, 7], Cont, Cont, false),
    // Planes of >= 8192 values: a block per task, several chunks per channel.
    case("nchw large planes", &[2, 3, 64, 80], Cont, Cont, false),
    // Many channels with tiny maps; a broadcast gradient.
    case("nchw many channels", &[4, 300, 2, 2], Cont, Bcast, false),
    // Channel-innermost (NHWC storage): 128-bit loads along the channels, then
    // a channel count that is no multiple of the vector width.
    case("nhwc 16 channels", &[2, 16, 4, 5], Nhwc, Nhwc, false),
    case("nhwc 6 channels", &[3, 6, 4, 5], Nhwc, Cont, false),
    // 2-D batches: channel-innermost with many row blocks, wide, transposed.
    case("2d rows", &[2048, 8], Cont, Cont, false),
    // Element-wise grid loops along the channels (more rows than one pass of
    // the grid at SMS = 2), each thread keeping its channels.
    case("2d rows, looping", &[2048, 24], Cont, Cont, false),
    case("2d wide", &[64, 300], Cont, Trans, false),
    case("2d transposed", &[64, 24], Trans, Trans, false),
    case("one channel", &[50, 1], Cont, Cont, false),
    // Narrowed views.
    case("narrowed batch", &[2, 6, 3, 8], NARROW_BATCH, Cont, false),
    case("narrowed rows", &[2, 6, 9], NARROW_ROWS, NARROW_ROWS, false),
    // Video (5-D).
    case("video", &[2, 3, 4, 6, 8], Cont, Cont, false),
];

/// A tensor of `shape` (channel axis 1) in `form`, with `values` in logical
/// order, in `dtype`.
fn make(values: &[f64], shape: &[usize], form: Form, dtype: DType) -> Tensor {
    let cpu = &Device::Cpu;
    let t = |v: Vec<f64>, s: &[usize]| {
        Tensor::from_vec(v, s, cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let logical = t(values.to_vec(), shape);
    match form {
        Form::Contiguous => logical,
        Form::ChannelsLast => {
            let r = shape.len();
            let mut to_last: Vec<usize> = vec![0];
            to_last.extend(2..r);
            to_last.push(1);
            let mut back: Vec<usize> = vec![0, r - 1];
            back.extend(1..r - 1);
            let stored = logical.permute(to_last).unwrap().contiguous().unwrap();
            stored.permute(back).unwrap()
        }
        Form::Transposed => logical.t().unwrap().contiguous().unwrap().t().unwrap(),
        Form::Narrowed { dim, start, extra } => {
            let mut big = shape.to_vec();
            big[dim] += start + extra;
            let window: Vec<_> = shape
                .iter()
                .enumerate()
                .map(|(d, &n)| if d == dim { start..start + n } else { 0..n })
                .collect();
            Tensor::zeros(big, dtype, cpu)
                .unwrap()
                .slice_assign(&window, &logical)
                .unwrap()
                .narrow(dim, start, shape[dim])
                .unwrap()
        }
        Form::Broadcast => {
            let c = shape[1];
            let mut s = vec![1; shape.len()];
            s[1] = c;
            t(values[..c].to_vec(), &s).broadcast_as(shape).unwrap()
        }
    }
}

/// The whole storage of a CPU tensor, and its layout.
fn storage<T: WithDType>(t: &Tensor) -> (Vec<T>, Layout) {
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(c) = &*s else {
        unreachable!("CPU tensors only")
    };
    (c.as_slice::<T>().unwrap().to_vec(), l.clone())
}

/// A CPU tensor's storage as an emulated device buffer, with its layout.
fn upload<T: WithDType>(t: &Tensor, misaligned: bool) -> (DevBuf<T>, Layout) {
    let (v, l) = storage::<T>(t);
    (DevBuf::from_slice(&v, misaligned), l)
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn view(l: &Layout) -> ChannelView {
    ChannelView::new(l, 1).expect("a viewable layout")
}

/// Descriptor of a contiguous `(rows, C)` f64 matrix.
fn f64_mat(rows: usize, c: usize) -> Mat2 {
    args::mat2(&Layout::contiguous((rows, c)), DType::F64, rows, c, "test").unwrap()
}

/// Level 2 of a reduction (`bn_stats_combine` / `bn_grad_combine`).
fn combine(
    emu: &Emulator,
    kernel: &str,
    partial: &DevBuf<f64>,
    c: usize,
    parts: usize,
    rows: usize,
) -> Vec<f64> {
    let out = DevBuf::<f64>::filled(rows * c, f64::NAN);
    // SAFETY: the signature of bn_*_combine.
    let f: Combine = unsafe { emu.kernel(kernel) };
    let (pp, op) = (partial.ptr(), out.ptr_mut());
    let grid = [plan::per_warp_blocks(c), 1, 1];
    emu.launch(grid, [plan::BLOCK, 1, 1], || unsafe {
        f(pp, c as i64, parts as i64, op)
    })
    .unwrap_or_else(|e| panic!("{kernel}: {e}"));
    out.to_vec()
}

/// `BatchStats::cuda_fwd`: the `(3, C)` sums of x, and the plan used.
fn emu_stats<T: WithDType>(
    emu: &Emulator,
    x: &DevBuf<T>,
    v: &ChannelView,
) -> (Vec<f64>, Reduction) {
    let c = v.channels;
    let canon = plan::canonicalize(&[*v]);
    let width = plan::load_width(&canon, plan::vec_width::<T>(), &[x.aligned16()]);
    let name = plan::reduction_kernel("bn_stats", canon.path, width, T::DTYPE);
    let red = Reduction::new(canon, width, Slots::assumed(SMS));
    let parts = red.parts();
    let partial = DevBuf::<f64>::filled(c * parts * 3, f64::NAN);
    let (grid, block) = red.launch_dims();
    let kv = red.canon.views[0];
    let (xp, pp) = (x.ptr(), partial.ptr_mut());
    let res = match red.split {
        ReductionSplit::Major(s) => {
            // SAFETY: the signature of bn_stats_major_*.
            let f: Major<T> = unsafe { emu.kernel(&name) };
            let (len, chunks, group) = (s.chunk_len as i64, s.chunks as i64, s.group as i32);
            emu.launch(grid, block, || unsafe { f(xp, kv, len, chunks, group, pp) })
        }
        ReductionSplit::Inner(s) => {
            // SAFETY: the signature of bn_stats_inner_*.
            let f: Inner<T> = unsafe { emu.kernel(&name) };
            let rows = s.rows_per_block as i64;
            emu.launch(grid, block, || unsafe { f(xp, kv, rows, pp) })
        }
    };
    res.unwrap_or_else(|e| panic!("{name}: {e}"));
    (combine(emu, "bn_stats_combine", &partial, c, parts, 3), red)
}

/// `GradStats::cuda_fwd`: the `(2, C)` sums `[Σdy; Σdy·(x − mean)]`.
fn emu_grad_sums<T: WithDType>(
    emu: &Emulator,
    dy: &DevBuf<T>,
    dv: &ChannelView,
    x: &DevBuf<T>,
    xv: &ChannelView,
    moments: &DevBuf<f64>,
    relu: Option<&DevBuf<u8>>,
) -> (Vec<f64>, Reduction) {
    let c = xv.channels;
    let canon = plan::canonicalize(&[*xv, *dv]);
    let aligned = [x.aligned16(), dy.aligned16()];
    let width = plan::load_width(&canon, plan::vec_width::<T>(), &aligned);
    let prefix = if relu.is_some() {
        "bn_grad_relu"
    } else {
        "bn_grad"
    };
    let name = plan::reduction_kernel(prefix, canon.path, width, T::DTYPE);
    let red = Reduction::new(canon, width, Slots::assumed(SMS));
    let parts = red.parts();
    let partial = DevBuf::<f64>::filled(c * parts * 2, f64::NAN);
    let (grid, block) = red.launch_dims();
    let (xk, dk) = (red.canon.views[0], red.canon.views[1]);
    let m = f64_mat(3, c);
    let (dp, xp, mp, pp) = (
        dy.ptr(),
        x.ptr(),
        moments.ptr() as *const c_void,
        partial.ptr_mut(),
    );
    let res = match (red.split, relu) {
        (ReductionSplit::Major(s), None) => {
            // SAFETY: the signature of bn_grad_major_*.
            let f: GradMajor<T> = unsafe { emu.kernel(&name) };
            let (len, chunks, group) = (s.chunk_len as i64, s.chunks as i64, s.group as i32);
            emu.launch(grid, block, || unsafe {
                f(dp, dk, xp, xk, mp, m, len, chunks, group, pp)
            })
        }
        (ReductionSplit::Major(s), Some(r)) => {
            // SAFETY: the signature of bn_grad_relu_major_*.
            let f: GradReluMajor<T> = unsafe { emu.kernel(&name) };
            let (len, chunks, group) = (s.chunk_len as i64, s.chunks as i64, s.group as i32);
            let rp = r.ptr() as *const c_void;
            emu.launch(grid, block, || unsafe {
                f(dp, dk, xp, xk, mp, m, rp, len, chunks, group, pp)
            })
        }
        (ReductionSplit::Inner(s), None) => {
            // SAFETY: the signature of bn_grad_inner_*.
            let f: GradInner<T> = unsafe { emu.kernel(&name) };
            let rows = s.rows_per_block as i64;
            emu.launch(grid, block, || unsafe {
                f(dp, dk, xp, xk, mp, m, rows, pp)
            })
        }
        (ReductionSplit::Inner(s), Some(r)) => {
            // SAFETY: the signature of bn_grad_relu_inner_*.
            let f: GradReluInner<T> = unsafe { emu.kernel(&name) };
            let rows = s.rows_per_block as i64;
            let rp = r.ptr() as *const c_void;
            emu.launch(grid, block, || unsafe {
                f(dp, dk, xp, xk, mp, m, rp, rows, pp)
            })
        }
    };
    res.unwrap_or_else(|e| panic!("{name}: {e}"));
    (combine(emu, "bn_grad_combine", &partial, c, parts, 2), red)
}

/// A per-channel parameter on the emulated device: its buffer (type-erased)
/// and descriptor.
struct Param {
    buf: DevBuf<u8>,
    desc: Vec1,
}

impl Param {
    fn new(t: &Tensor) -> Self {
        let c = t.elem_count();
        fn raw<T: WithDType>(t: &Tensor) -> Vec<u8> {
            let v = storage::<T>(t).0;
            // SAFETY: plain numbers; the bytes of `v`'s elements.
            unsafe {
                std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(&v[..]))
            }
            .to_vec()
        }
        let bytes = match t.dtype() {
            DType::F32 => raw::<f32>(t),
            DType::F64 => raw::<f64>(t),
            DType::F16 => raw::<f16>(t),
            DType::BF16 => raw::<bf16>(t),
            DType::I64 => raw::<i64>(t),
            DType::U32 => raw::<u32>(t),
            other => panic!("no parameter of dtype {other:?}"),
        };
        Self {
            buf: DevBuf::from_slice(&bytes, false),
            desc: args::vec1(t.layout(), t.dtype(), c, "test").unwrap(),
        }
    }

    fn ptr(&self) -> *const c_void {
        self.buf.ptr() as *const c_void
    }
}

/// Launches a one-thread-per-item kernel over `items` items.
fn per_item(emu: &Emulator, name: &str, items: usize, body: impl Fn()) {
    emu.launch(
        [plan::per_item_blocks(items), 1, 1],
        [plan::BLOCK, 1, 1],
        body,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
}

/// Element-wise launch shared by the forward and the backward.
fn elementwise_dims<T>(canon: &plan::Canon, aligned: &[bool], len: usize) -> (i32, [usize; 3]) {
    let mode = plan::elementwise_mode(canon, plan::vec_width::<T>(), aligned);
    let w = if mode == 0 { 1 } else { plan::vec_width::<T>() };
    (
        mode,
        [
            plan::elementwise_blocks(len, w, Slots::assumed(SMS), mode, canon.sizes().1),
            1,
            1,
        ],
    )
}

/// The entry the ops launch for the pass `base` with these dims.
fn elementwise_name<T: WithDType>(
    base: &str,
    canon: &plan::Canon,
    mode: i32,
    grid: [usize; 3],
) -> String {
    let w = if mode == 0 { 1 } else { plan::vec_width::<T>() };
    plan::elementwise_kernel(base, T::DTYPE.as_str(), mode, grid[0], w, canon.sizes().1)
}

/// `BatchNormOp::forward_cuda`: coefficients, then the normalization.
fn emu_normalize<T: WithDType>(
    emu: &Emulator,
    x: &DevBuf<T>,
    v: &ChannelView,
    moments: &DevBuf<f64>,
    affine: Option<(&Param, &Param)>,
    relu: bool,
) -> Vec<T> {
    emu_normalize_add(emu, x, v, None, moments, affine, relu)
}

/// `bn_coef_normalize_*`: the forward's per-channel coefficients (also those
/// of a fused ReLU's mask in the backward).
fn emu_coef_normalize<T: WithDType>(
    emu: &Emulator,
    c: usize,
    moments: &DevBuf<f64>,
    affine: Option<(&Param, &Param)>,
) -> DevBuf<u8> {
    let coef = DevBuf::<u8>::filled(plan::coef_bytes(T::DTYPE, c), 0xff);
    let name = format!("bn_coef_normalize_{}", plan::acc_suffix(T::DTYPE));
    // SAFETY: the signature of bn_coef_normalize_*.
    let f: CoefNormalize = unsafe { emu.kernel(&name) };
    let (wp, wv, bp, bv) = match affine {
        Some((w, b)) => (w.ptr(), w.desc, b.ptr(), b.desc),
        None => (
            std::ptr::null(),
            Vec1::ABSENT,
            std::ptr::null(),
            Vec1::ABSENT,
        ),
    };
    let (mp, m, cp) = (
        moments.ptr() as *const c_void,
        f64_mat(3, c),
        coef.ptr_mut() as *mut c_void,
    );
    per_item(emu, &name, c, || unsafe {
        f(mp, m, wp, wv, bp, bv, c as i64, cp)
    });
    coef
}

/// `BatchNormOp::forward_cuda` with an optional residual: coefficients, then
/// `bn_normalize_*` or `bn_normalize_add_*`.
fn emu_normalize_add<T: WithDType>(
    emu: &Emulator,
    x: &DevBuf<T>,
    v: &ChannelView,
    residual: Option<(&DevBuf<T>, &ChannelView)>,
    moments: &DevBuf<f64>,
    affine: Option<(&Param, &Param)>,
    relu: bool,
) -> Vec<T> {
    let (c, len) = (v.channels, v.len());
    let coef = emu_coef_normalize::<T>(emu, c, moments, affine);
    let out = DevBuf::<T>::filled(len, T::from_f64(f64::NAN));
    let relu = i32::from(relu);
    if let Some((z, zv)) = residual {
        let canon = plan::canonicalize(&[*v, *zv, plan::contiguous_like(v)]);
        let aligned = [x.aligned16(), z.aligned16(), out.aligned16()];
        let (mode, grid) = elementwise_dims::<T>(&canon, &aligned, len);
        let name = elementwise_name::<T>("bn_normalize_add", &canon, mode, grid);
        // SAFETY: the signature of bn_normalize_add_*.
        let f: NormalizeAdd<T> = unsafe { emu.kernel(&name) };
        let (xk, zk, ok) = (canon.views[0], canon.views[1], canon.views[2]);
        let (xp, zp, op) = (x.ptr(), z.ptr(), out.ptr_mut());
        let cp = coef.ptr() as *const c_void;
        emu.launch(grid, [plan::BLOCK, 1, 1], || unsafe {
            f(zp, zk, xp, xk, op, ok, cp, mode, relu)
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        return out.to_vec();
    }
    let canon = plan::canonicalize(&[*v, plan::contiguous_like(v)]);
    let (mode, grid) = elementwise_dims::<T>(&canon, &[x.aligned16(), out.aligned16()], len);
    let name = elementwise_name::<T>("bn_normalize", &canon, mode, grid);
    // SAFETY: the signature of bn_normalize_*.
    let f: Normalize<T> = unsafe { emu.kernel(&name) };
    let (xk, ok) = (canon.views[0], canon.views[1]);
    let (xp, op, cp) = (x.ptr(), out.ptr_mut(), coef.ptr() as *const c_void);
    emu.launch(grid, [plan::BLOCK, 1, 1], || unsafe {
        f(xp, xk, op, ok, cp, mode, relu)
    })
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    out.to_vec()
}

/// `ReluGrad::cuda_fwd`: the fused ReLU's gradient mask.
fn emu_relu_grad<T: WithDType>(
    emu: &Emulator,
    dy: &DevBuf<T>,
    dv: &ChannelView,
    y: &DevBuf<T>,
    yv: &ChannelView,
) -> Vec<T> {
    let len = yv.len();
    let out = DevBuf::<T>::filled(len, T::from_f64(f64::NAN));
    let canon = plan::canonicalize(&[*yv, *dv, plan::contiguous_like(yv)]);
    let aligned = [y.aligned16(), dy.aligned16(), out.aligned16()];
    let (mode, grid) = elementwise_dims::<T>(&canon, &aligned, len);
    let name = format!("bn_relu_grad_{}", T::DTYPE.as_str());
    // SAFETY: the signature of bn_relu_grad_*.
    let f: ReluGradK<T> = unsafe { emu.kernel(&name) };
    let (yk, dk, ok) = (canon.views[0], canon.views[1], canon.views[2]);
    let (dp, yp, op) = (dy.ptr(), y.ptr(), out.ptr_mut());
    emu.launch(grid, [plan::BLOCK, 1, 1], || unsafe {
        f(dp, dk, yp, yk, op, ok, mode)
    })
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    out.to_vec()
}

/// `InputGrad::cuda_fwd`: coefficients, then the input gradient.
#[allow(clippy::too_many_arguments)]
fn emu_input_grad<T: WithDType>(
    emu: &Emulator,
    dy: &DevBuf<T>,
    dv: &ChannelView,
    x: &DevBuf<T>,
    xv: &ChannelView,
    moments: &DevBuf<f64>,
    weight: Option<&Param>,
    grad_sums: Option<&DevBuf<f64>>,
    relu: Option<(Option<&Param>, Option<&Param>)>,
) -> Vec<T> {
    let (c, len) = (xv.channels, xv.len());
    let coef = DevBuf::<u8>::filled(plan::coef_bytes(T::DTYPE, c), 0xff);
    let name = format!("bn_coef_input_grad_{}", plan::acc_suffix(T::DTYPE));
    // SAFETY: the signature of bn_coef_input_grad_*.
    let f: CoefInputGrad = unsafe { emu.kernel(&name) };
    let (wp, wv) = match weight {
        Some(w) => (w.ptr(), w.desc),
        None => (std::ptr::null(), Vec1::ABSENT),
    };
    let (gp, gm) = match grad_sums {
        Some(g) => (g.ptr() as *const c_void, f64_mat(2, c)),
        None => (std::ptr::null(), Mat2::ABSENT),
    };
    let (mp, m, cp) = (
        moments.ptr() as *const c_void,
        f64_mat(3, c),
        coef.ptr_mut() as *mut c_void,
    );
    let param =
        |p: Option<&Param>| p.map_or((std::ptr::null(), Vec1::ABSENT), |p| (p.ptr(), p.desc));
    let ((rwp, rwv), (rbp, rbv)) = match relu {
        Some((w, b)) => (param(w), param(b)),
        None => (param(None), param(None)),
    };
    let r = i32::from(relu.is_some());
    per_item(emu, &name, c, || unsafe {
        f(mp, m, wp, wv, gp, gm, rwp, rwv, rbp, rbv, r, c as i64, cp)
    });

    let out = DevBuf::<T>::filled(len, T::from_f64(f64::NAN));
    let canon = plan::canonicalize(&[*xv, *dv, plan::contiguous_like(xv)]);
    let aligned = [x.aligned16(), dy.aligned16(), out.aligned16()];
    let (mode, grid) = elementwise_dims::<T>(&canon, &aligned, len);
    let name = elementwise_name::<T>("bn_input_grad", &canon, mode, grid);
    // SAFETY: the signature of bn_input_grad_*.
    let f: InputGradK<T> = unsafe { emu.kernel(&name) };
    let (xk, dk, ok) = (canon.views[0], canon.views[1], canon.views[2]);
    let (dp, xp, op, cp) = (
        dy.ptr(),
        x.ptr(),
        out.ptr_mut(),
        coef.ptr() as *const c_void,
    );
    emu.launch(grid, [plan::BLOCK, 1, 1], || unsafe {
        f(dp, dk, xp, xk, op, ok, cp, mode, r)
    })
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    out.to_vec()
}

/// Asserts `|got − want| ≤ tol` element by element for a `(rows, C)` matrix.
fn assert_within(what: &str, got: &[f64], want: &[f64], tol: &[f64], c: usize) {
    assert_eq!(
        (got.len(), tol.len()),
        (want.len(), want.len()),
        "{what}: lengths"
    );
    for (i, ((g, w), t)) in got.iter().zip(want).zip(tol).enumerate() {
        assert!(
            (g - w).abs() <= *t,
            "{what}: row {}, channel {}: {g} vs {w} (tolerance {t:e})",
            i / c,
            i % c
        );
    }
}

/// Asserts that two tensors' values are the same bits (as f64, NaN never equal).
fn assert_bitwise(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{what}: element {i}: {g:e} vs {w:e}"
        );
    }
}

/// The per-channel sums of |x| and of x² over a logical `(N, C, ...)` array:
/// scales for the reduction tolerances.
fn channel_scales(v: &[f64], shape: &[usize]) -> (Vec<f64>, Vec<f64>) {
    let c = shape[1];
    let inner: usize = shape[2..].iter().product();
    let (mut abs, mut sq) = (vec![0.0; c], vec![0.0; c]);
    for (i, e) in v.iter().enumerate() {
        let ch = (i / inner) % c;
        abs[ch] += e.abs();
        sq[ch] += e * e;
    }
    (abs, sq)
}

fn acc_eps(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-13
    } else {
        2e-6
    }
}

/// Statistics, gradient sums, normalization and input gradient of one case
/// in one dtype, against the CPU ops on the same tensors.
fn check_case<T: WithDType>(emu: &Emulator, case: &Case, rng: &mut Rng) {
    let dtype = T::DTYPE;
    let what = |k: &str| format!("{k} [{} {dtype:?}]", case.name);
    let shape = case.shape;
    let c = shape[1];
    let n: usize = shape.iter().product();
    let x = make(&rng.normals(n, 3.0, 2.0), shape, case.x, dtype);
    let dy = make(&rng.normals(n, 0.5, 1.0), shape, case.dy, dtype);
    let (xb, xl) = upload::<T>(&x, case.misaligned);
    let (dyb, dyl) = upload::<T>(&dy, false);
    let (xv, dv) = (view(&xl), view(&dyl));
    let eps = acc_eps(dtype);

    // Forward statistics.
    let want = values(&x.apply_op1_no_bwd(&BatchStats { axis: 1 }).unwrap());
    let (got, red) = emu_stats(emu, &xb, &xv);
    let (abs, sq) = channel_scales(&values(&x), shape);
    let tol: Vec<f64> = (0..3 * c)
        .map(|i| match i / c {
            0 => 0.0,
            1 => eps * abs[i % c],
            _ => eps * sq[i % c],
        })
        .collect();
    assert_within(
        &what(&format!("stats {:?}", red.split)),
        &got,
        &want,
        &tol,
        c,
    );

    // Moments (CPU) feed the backward kernels.
    let sums = Tensor::from_vec(want, (3, c), &Device::Cpu).unwrap();
    let moments = sums.apply_op1_no_bwd(&Moments { eps: 1e-5 }).unwrap();
    let mb = DevBuf::from_slice(&values(&moments), false);

    // Gradient sums.
    let gs_op = GradStats {
        axis: 1,
        moments: moments.clone(),
        relu: None,
    };
    let want = values(&dy.apply_op2_no_bwd(&x, &gs_op).unwrap());
    let (got, red) = emu_grad_sums(emu, &dyb, &dv, &xb, &xv, &mb, None);
    let xs = values(&x);
    let dys = values(&dy);
    let mean = &values(&moments)[..c];
    let inner: usize = shape[2..].iter().product();
    let mut tol = vec![0.0; 2 * c];
    for (i, (&g, &e)) in dys.iter().zip(&xs).enumerate() {
        let ch = (i / inner) % c;
        tol[ch] += eps * g.abs();
        tol[c + ch] += eps * (g * (e - mean[ch])).abs() * 2.0;
    }
    assert_within(
        &what(&format!("grad sums {:?}", red.split)),
        &got,
        &want,
        &tol,
        c,
    );
    let gsb = DevBuf::from_slice(&got, false);
    let grad_sums = Tensor::from_vec(got, (2, c), &Device::Cpu).unwrap();

    // Normalization, with and without an affine transform. The weight is a
    // strided view (every other element of a (C, 2) tensor).
    let pdtype = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let wb = Tensor::from_vec(rng.normals(2 * c, 1.0, 0.5), (c, 2), &Device::Cpu)
        .unwrap()
        .to_dtype(pdtype)
        .unwrap();
    let weight = wb.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    let bias = Tensor::from_vec(rng.normals(c, 0.0, 0.5), c, &Device::Cpu)
        .unwrap()
        .to_dtype(pdtype)
        .unwrap();
    let (wp, bp) = (Param::new(&weight), Param::new(&bias));
    let op = BatchNormOp {
        axis: 1,
        moments: moments.clone(),
        batch_stats: true,
        group: ProcessGroup::single(),
        relu: false,
        layer: "emulated".into(),
        coefficients: None,
    };
    let want = values(&x.apply_op3_no_bwd(&weight, &bias, &op).unwrap());
    let got: Vec<f64> = emu_normalize(emu, &xb, &xv, &mb, Some((&wp, &bp)), false)
        .iter()
        .map(|v| v.to_f64())
        .collect();
    assert_bitwise(&what("normalize (affine)"), &got, &want);
    let want = values(&x.apply_op1_no_bwd(&op).unwrap());
    let got: Vec<f64> = emu_normalize(emu, &xb, &xv, &mb, None, false)
        .iter()
        .map(|v| v.to_f64())
        .collect();
    assert_bitwise(&what("normalize"), &got, &want);

    // Normalization with the fused ReLU (about half the outputs are zeros),
    // then its gradient mask of the (strided) dy by that output.
    let op = BatchNormOp { relu: true, ..op };
    let y = x.apply_op3_no_bwd(&weight, &bias, &op).unwrap();
    let want = values(&y);
    let y_dev = emu_normalize(emu, &xb, &xv, &mb, Some((&wp, &bp)), true);
    let got: Vec<f64> = y_dev.iter().map(|v| v.to_f64()).collect();
    assert_bitwise(&what("normalize + relu"), &got, &want);
    // Not vacuous: with several channels (random weights and biases) some
    // outputs are clamped and some pass.
    let zeros = want.iter().filter(|&&v| v == 0.0).count();
    assert!(
        c == 1 || (zeros > 0 && zeros < n),
        "{}: {zeros} of {n} outputs are zero",
        what("normalize + relu")
    );
    let want = values(&dy.apply_op2_no_bwd(&y, &ReluGrad { axis: 1 }).unwrap());
    let yb = DevBuf::from_slice(&y_dev, false);
    let yv = plan::contiguous_like(&xv);
    let got: Vec<f64> = emu_relu_grad(emu, &dyb, &dv, &yb, &yv)
        .iter()
        .map(|v| v.to_f64())
        .collect();
    assert_bitwise(&what("relu grad"), &got, &want);

    // The backward of the fused ReLU recomputes the mask from x in both
    // passes. Against the same passes on the masked gradient (laid out like
    // dy, so the reductions take the same path): the same additions with the
    // masked terms exactly zero, so bitwise equal, on the CPU and on the
    // device; and the device's input gradient bitwise equal to the CPU's.
    // (A broadcast dy masked is no broadcast: contiguous then, and the sums
    // are compared within the tolerance of the unmasked ones.)
    let same_path = !matches!(case.dy, Form::Broadcast);
    let dym_form = if same_path { case.dy } else { Form::Contiguous };
    for affine in [true, false] {
        let y = if affine {
            x.apply_op3_no_bwd(&weight, &bias, &op).unwrap()
        } else {
            x.apply_op1_no_bwd(&op).unwrap()
        };
        let masked = values(&dy.apply_op2_no_bwd(&y, &ReluGrad { axis: 1 }).unwrap());
        let dym = make(&masked, shape, dym_form, dtype);
        let (dymb, dyml) = upload::<T>(&dym, false);
        let dmv = view(&dyml);
        let fused = if affine {
            FusedRelu {
                weight: Some(weight.clone()),
                bias: Some(bias.clone()),
                coefficients: None,
            }
        } else {
            FusedRelu::default()
        };
        let params = affine.then_some((&wp, &bp));
        let tag = |k: &str| what(&format!("{k}, fused relu (affine {affine})"));
        let sums_of = |g: &Tensor, relu: Option<FusedRelu>| {
            let op = GradStats {
                axis: 1,
                moments: moments.clone(),
                relu,
            };
            values(&g.apply_op2_no_bwd(&x, &op).unwrap())
        };
        let cpu_fused = sums_of(&dy, Some(fused.clone()));
        let cpu_sep = sums_of(&dym, None);
        let relu_coef = emu_coef_normalize::<T>(emu, c, &mb, params);
        let (got, _) = emu_grad_sums(emu, &dyb, &dv, &xb, &xv, &mb, Some(&relu_coef));
        let (sep, _) = emu_grad_sums(emu, &dymb, &dmv, &xb, &xv, &mb, None);
        if same_path {
            assert_bitwise(&tag("cpu grad sums"), &cpu_fused, &cpu_sep);
            assert_bitwise(&tag("grad sums"), &got, &sep);
        } else {
            assert_within(&tag("cpu grad sums"), &cpu_fused, &cpu_sep, &tol, c);
            assert_within(&tag("grad sums"), &got, &sep, &tol, c);
        }
        assert_within(&tag("grad sums against the cpu"), &got, &cpu_fused, &tol, c);
        let igrad = |g: &Tensor, relu: Option<FusedRelu>| {
            let op = InputGrad {
                axis: 1,
                moments: moments.clone(),
                grad_sums: Some(grad_sums.clone()),
                weight: affine.then(|| weight.clone()),
                relu,
            };
            values(&g.apply_op2_no_bwd(&x, &op).unwrap())
        };
        let want = igrad(&dy, Some(fused));
        assert_bitwise(&tag("cpu input grad"), &want, &igrad(&dym, None));
        let got: Vec<f64> = emu_input_grad(
            emu,
            &dyb,
            &dv,
            &xb,
            &xv,
            &mb,
            affine.then_some(&wp),
            Some(&gsb),
            Some((affine.then_some(&wp), affine.then_some(&bp))),
        )
        .iter()
        .map(|v| v.to_f64())
        .collect();
        assert_bitwise(&tag("input grad"), &got, &want);
    }

    // Normalization plus a residual (dy's buffer, with its own strides), then
    // the ReLU, with and without the affine transform (the op takes weight
    // and bias as one (2, C) stack).
    let add = BatchNormAddOp { norm: op };
    let wb = Tensor::stack(&[&weight, &bias], 0).unwrap();
    let want = values(&x.apply_op3_no_bwd(&dy, &wb, &add).unwrap());
    let got: Vec<f64> = emu_normalize_add(
        emu,
        &xb,
        &xv,
        Some((&dyb, &dv)),
        &mb,
        Some((&wp, &bp)),
        true,
    )
    .iter()
    .map(|v| v.to_f64())
    .collect();
    assert_bitwise(&what("normalize + residual + relu (affine)"), &got, &want);
    let want = values(&x.apply_op2_no_bwd(&dy, &add).unwrap());
    let got: Vec<f64> = emu_normalize_add(emu, &xb, &xv, Some((&dyb, &dv)), &mb, None, true)
        .iter()
        .map(|v| v.to_f64())
        .collect();
    assert_bitwise(&what("normalize + residual + relu"), &got, &want);

    // Input gradient: batch statistics with a weight, fixed statistics without.
    let ig = InputGrad {
        axis: 1,
        moments: moments.clone(),
        grad_sums: Some(grad_sums),
        weight: Some(weight.clone()),
        relu: None,
    };
    let want = values(&dy.apply_op2_no_bwd(&x, &ig).unwrap());
    let got: Vec<f64> = emu_input_grad(emu, &dyb, &dv, &xb, &xv, &mb, Some(&wp), Some(&gsb), None)
        .iter()
        .map(|v| v.to_f64())
        .collect();
    assert_bitwise(&what("input grad (batch stats, affine)"), &got, &want);
    let ig = InputGrad {
        grad_sums: None,
        weight: None,
        ..ig
    };
    let want = values(&dy.apply_op2_no_bwd(&x, &ig).unwrap());
    let got: Vec<f64> = emu_input_grad(emu, &dyb, &dv, &xb, &xv, &mb, None, None, None)
        .iter()
        .map(|v| v.to_f64())
        .collect();
    assert_bitwise(&what("input grad (fixed stats)"), &got, &want);
}

#[test]
fn emulator_runs_barriers_and_reports_deadlocks() {
    let Some(emu) = Emulator::get() else { return };
    // SAFETY: runtime.cpp's test hooks.
    let sync: unsafe extern "C" fn() = unsafe { emu.kernel("syncbn_emu_sync_block") };
    let tid: unsafe extern "C" fn() -> u32 = unsafe { emu.kernel("syncbn_emu_thread_x") };
    // Every thread writes its slot, then (after the barrier) reads its
    // neighbour's: without a working barrier some reads see zeros.
    let slots = std::cell::RefCell::new(vec![0u32; 64]);
    let seen = std::cell::RefCell::new(vec![0u32; 64]);
    emu.launch([3, 1, 1], [64, 1, 1], || {
        let t = unsafe { tid() } as usize;
        slots.borrow_mut()[t] = t as u32 + 1;
        unsafe { sync() };
        let v = slots.borrow()[(t + 1) % 64];
        seen.borrow_mut()[t] = v;
        unsafe { sync() };
        slots.borrow_mut()[t] = 0;
    })
    .unwrap();
    let expect: Vec<u32> = (0..64).map(|t| ((t + 1) % 64) as u32 + 1).collect();
    assert_eq!(*seen.borrow(), expect);
    // A thread that returns before a barrier the others wait at.
    let err = emu
        .launch([1, 1, 1], [64, 1, 1], || {
            if unsafe { tid() } != 5 {
                unsafe { sync() };
            }
        })
        .unwrap_err();
    assert!(
        err.contains("deadlock") && err.contains("63 threads wait at __syncthreads"),
        "{err}"
    );
    assert!(
        emu.launch([1, 1, 1], [2048, 1, 1], || {}).is_err(),
        "2048 threads per block"
    );
}

#[test]
fn emulator_shuffles_pick_the_lanes_cuda_picks() {
    let Some(emu) = Emulator::get() else { return };
    // SAFETY: runtime.cpp's test hooks.
    let tid: unsafe extern "C" fn() -> u32 = unsafe { emu.kernel("syncbn_emu_thread_x") };
    let shfl: unsafe extern "C" fn(u32, u32, u32, u32) -> u32 =
        unsafe { emu.kernel("syncbn_emu_shuffle_u32") };
    // (mode, arg, width) -> the lane that lane `l` reads, from the PTX ISA's
    // definition of shfl.sync with the clamp operand CUDA passes for `width`
    // (c = (32 - width) << 8 | 31): j is the candidate source, and a
    // candidate outside [min_lane, max_lane] leaves the caller its own value.
    let expected = |mode: u32, arg: u32, width: u32, l: u32| -> u32 {
        let segmask = (32 - width) & 31;
        let max_lane = (l & segmask) | (31 & !segmask);
        let min_lane = l & segmask;
        let (j, ok) = match mode {
            0 => (l + arg, l + arg <= max_lane),
            1 => (l.wrapping_sub(arg), l >= arg && l - arg >= min_lane),
            2 => (l ^ arg, (l ^ arg) <= max_lane),
            _ => {
                let j = min_lane | (arg & !segmask);
                (j, j <= max_lane)
            }
        };
        if ok {
            j
        } else {
            l
        }
    };
    for mode in 0..4 {
        for (arg, width) in [
            (1, 32),
            (16, 32),
            (3, 8),
            (5, 8),
            (12, 8),
            (31, 32),
            (2, 4),
            (9, 16),
        ] {
            let got = std::cell::RefCell::new(vec![u32::MAX; 64]);
            emu.launch([1, 1, 1], [64, 1, 1], || {
                let t = unsafe { tid() };
                // Each lane offers 1000 + its thread index.
                let v = unsafe { shfl(mode, 1000 + t, arg, width) };
                got.borrow_mut()[t as usize] = v;
            })
            .unwrap();
            for (t, &v) in got.borrow().iter().enumerate() {
                let (warp, lane) = (t as u32 / 32, t as u32 % 32);
                let src = warp * 32 + expected(mode, arg, width, lane);
                assert_eq!(
                    v,
                    1000 + src,
                    "mode {mode} arg {arg} width {width} thread {t}"
                );
            }
        }
    }
}

/// Every case in one dtype.
fn check_all_cases<T: WithDType>(seed: u64) {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(seed);
    for case in CASES {
        check_case::<T>(emu, case, &mut rng);
    }
}

#[test]
fn kernels_match_the_cpu_path_f32() {
    check_all_cases::<f32>(0x5eed_0001);
}

#[test]
fn kernels_match_the_cpu_path_f64() {
    check_all_cases::<f64>(0x5eed_0002);
}

#[test]
fn kernels_match_the_cpu_path_f16() {
    check_all_cases::<f16>(0x5eed_0003);
}

#[test]
fn kernels_match_the_cpu_path_bf16() {
    check_all_cases::<bf16>(0x5eed_0004);
}

/// The cases cover every path of the plans: both reduction paths, a block
/// and a warp per task, several chunks and row blocks, vector (along the
/// rows, along the channels, across rows) and scalar element-wise modes.
#[test]
fn cases_cover_every_path() {
    let mut seen = std::collections::BTreeSet::new();
    for case in CASES {
        let x = make(
            &vec![0.0; case.shape.iter().product()],
            case.shape,
            case.x,
            DType::F32,
        );
        let (xb, xl) = upload::<f32>(&x, case.misaligned);
        let v = view(&xl);
        let rc = plan::canonicalize(&[v]);
        let red = Reduction::new(rc.clone(), 4, Slots::assumed(SMS));
        match red.split {
            ReductionSplit::Major(s) => {
                seen.insert(format!("major group {}", s.group));
                if s.chunks > 1 {
                    seen.insert("major chunks".into());
                }
            }
            ReductionSplit::Inner(s) => {
                seen.insert("inner".into());
                if s.row_blocks > 1 {
                    seen.insert("inner row blocks".into());
                }
            }
        }
        // The loads of the reductions in f32 (16-byte vectors of 4) and
        // bf16 (of 8, or 8-byte half vectors).
        for vec in [4, 8] {
            let load = match plan::load_width(&rc, vec, &[xb.aligned16()]) {
                1 => "scalar",
                w if w == vec => "vector",
                _ => "half",
            };
            seen.insert(format!("load {load}"));
        }
        let canon = plan::canonicalize(&[v, plan::contiguous_like(&v)]);
        seen.insert(format!(
            "mode {}",
            plan::elementwise_mode(&canon, 4, &[xb.aligned16(), true])
        ));
    }
    let want = [
        "inner",
        "inner row blocks",
        "load half",
        "load scalar",
        "load vector",
        "major chunks",
        "major group 256",
        "major group 32",
        "mode 0",
        "mode 1",
        "mode 2",
        "mode 3",
    ];
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), want);
}

/// Moments, running statistics, the counter and the affine gradients.
#[test]
fn per_channel_kernels_match_the_cpu_path() {
    let Some(emu) = Emulator::get() else { return };
    let mut rng = Rng(0x5eed_0005);
    let c = 300;
    let cpu = &Device::Cpu;
    let xs = rng.normals(c * 40, 2.0, 3.0);
    let x = Tensor::from_vec(xs, (40, c), cpu).unwrap();
    let sums = x.apply_op1_no_bwd(&BatchStats { axis: 1 }).unwrap();
    let sb = DevBuf::from_slice(&values(&sums), false);

    // bn_moments_from_sums, with an empty channel (count 0).
    let mut sv = values(&sums);
    sv[7] = 0.0;
    let sums0 = Tensor::from_vec(sv.clone(), (3, c), cpu).unwrap();
    let sb0 = DevBuf::from_slice(&sv, false);
    let want = values(&sums0.apply_op1_no_bwd(&Moments { eps: 1e-3 }).unwrap());
    let out = DevBuf::<f64>::filled(3 * c, f64::NAN);
    type FromSums = unsafe extern "C" fn(*const c_void, Mat2, i64, f64, *mut f64);
    // SAFETY: the signature of bn_moments_from_sums.
    let f: FromSums = unsafe { emu.kernel("bn_moments_from_sums") };
    let (sp, m, op) = (sb0.ptr() as *const c_void, f64_mat(3, c), out.ptr_mut());
    per_item(emu, "bn_moments_from_sums", c, || unsafe {
        f(sp, m, c as i64, 1e-3, op)
    });
    assert_bitwise("moments from sums", &out.to_vec(), &want);

    // bn_moments_from_running, for running statistics of every float dtype.
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let mean = Tensor::from_vec(rng.normals(c, 0.0, 1.0), c, cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let var = Tensor::from_vec(rng.normals(c, 2.0, 0.3), c, cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let want = values(&mean.apply_op2_no_bwd(&var, &Moments { eps: 1e-5 }).unwrap());
        let (mp, vp) = (Param::new(&mean), Param::new(&var));
        type FromRunning = unsafe extern "C" fn(
            *const c_void,
            Vec1,
            *const c_void,
            Vec1,
            i64,
            f64,
            *mut f64,
            *const c_void,
            Vec1,
            *const c_void,
            Vec1,
            *mut c_void,
            i32,
        );
        // SAFETY: the signature of bn_moments_from_running.
        let f: FromRunning = unsafe { emu.kernel("bn_moments_from_running") };
        let (a, ad, b, bd) = (mp.ptr(), mp.desc, vp.ptr(), vp.desc);
        // Without coefficients (null), then with the forward's coefficients
        // for f32 and f64 inputs, with and without weight and bias: bit for
        // bit those of bn_coef_normalize_* on the moments, and the CPU's.
        let out = DevBuf::<f64>::filled(3 * c, f64::NAN);
        let op = out.ptr_mut();
        let none = (std::ptr::null(), Vec1::ABSENT);
        per_item(emu, "bn_moments_from_running", c, || unsafe {
            f(
                a,
                ad,
                b,
                bd,
                c as i64,
                1e-5,
                op,
                none.0,
                none.1,
                none.0,
                none.1,
                std::ptr::null_mut(),
                0,
            )
        });
        assert_bitwise(
            &format!("moments from running {dtype:?}"),
            &out.to_vec(),
            &want,
        );
        let weight = Tensor::from_vec(rng.normals(c, 1.0, 0.5), c, cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let bias = Tensor::from_vec(rng.normals(c, 0.0, 0.5), c, cpu).unwrap();
        let (wp, bp) = (Param::new(&weight), Param::new(&bias));
        for input in [DType::F32, DType::F64] {
            for affine in [false, true] {
                let request = ForwardCoefficients {
                    input,
                    weight: affine.then(|| weight.clone()),
                    bias: affine.then(|| bias.clone()),
                };
                let cdt = ForwardCoefficients::dtype(input).unwrap();
                let out = DevBuf::<f64>::filled(3 * c, f64::NAN);
                let coef = DevBuf::<u8>::filled(plan::coef_bytes(input, c), 0xff);
                let (op, cp) = (out.ptr_mut(), coef.ptr_mut() as *mut c_void);
                let code = args::dtype_code(cdt, "coefficients").unwrap();
                let (wt, bt) = if affine {
                    ((wp.ptr(), wp.desc), (bp.ptr(), bp.desc))
                } else {
                    (none, none)
                };
                per_item(emu, "bn_moments_from_running", c, || unsafe {
                    f(
                        a, ad, b, bd, c as i64, 1e-5, op, wt.0, wt.1, bt.0, bt.1, cp, code,
                    )
                });
                let what = format!(
                    "coefficients from running {dtype:?}, input {input:?}, affine {affine}"
                );
                assert_bitwise(&format!("{what}: moments"), &out.to_vec(), &want);
                let params = affine.then_some((&wp, &bp));
                let separate = if input == DType::F64 {
                    emu_coef_normalize::<f64>(emu, c, &out, params)
                } else {
                    emu_coef_normalize::<f32>(emu, c, &out, params)
                };
                let got = bytes_values(&coef.to_vec(), cdt);
                assert_bitwise(&what, &got, &bytes_values(&separate.to_vec(), cdt));
                let cpu_coef: Vec<f64> = match request.cpu_values(&want).unwrap() {
                    CpuStorage::F32(v) => v.iter().map(|&e| e as f64).collect(),
                    CpuStorage::F64(v) => v,
                    other => panic!("coefficients of dtype {:?}", other.dtype()),
                };
                assert_bitwise(&format!("{what}: cpu"), &got, &cpu_coef);
            }
        }
    }

    // bn_running_update: every float dtype, mean and variance, with a
    // momentum or the cumulative average read from counters of every dtype.
    type Update = unsafe extern "C" fn(
        *mut c_void,
        Vec1,
        *const c_void,
        Mat2,
        *const c_void,
        Vec1,
        i64,
        i32,
        f64,
        i32,
    );
    // SAFETY: the signature of bn_running_update.
    let update: Update = unsafe { emu.kernel("bn_running_update") };
    let counters = [
        Tensor::new(&[3i64], cpu).unwrap(),
        Tensor::new(&[4u32], cpu).unwrap(),
        Tensor::new(&[5f32], cpu).unwrap(),
        Tensor::new(&[0f64], cpu).unwrap(),
    ];
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for stat in [RunningStat::Mean, RunningStat::Var] {
            for (momentum, counter) in [
                (Some(0.1), &counters[0]),
                (None, &counters[0]),
                (None, &counters[1]),
                (None, &counters[2]),
                (None, &counters[3]),
            ] {
                let dst = Tensor::from_vec(rng.normals(c, 1.0, 0.5), c, cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let dp = Param::new(&dst);
                let kp = Param::new(counter);
                let op = RunningStatsUpdate { momentum, stat };
                dst.inplace_op3(&sums, counter, &op).unwrap();
                let (d, dd, s, sm, k, kd) = (
                    dp.buf.ptr_mut() as *mut c_void,
                    dp.desc,
                    sb.ptr() as *const c_void,
                    f64_mat(3, c),
                    kp.ptr(),
                    kp.desc,
                );
                let (has, mom) = (momentum.is_some() as i32, momentum.unwrap_or(0.0));
                let st = (stat == RunningStat::Var) as i32;
                per_item(emu, "bn_running_update", c, || unsafe {
                    update(d, dd, s, sm, k, kd, c as i64, has, mom, st)
                });
                let got = param_values(&dp, dtype, c);
                assert_bitwise(
                    &format!(
                        "running {stat:?} {dtype:?} momentum {momentum:?} counter {:?}",
                        counter.dtype()
                    ),
                    &got,
                    &values(&dst),
                );
            }
        }
    }

    // bn_counter_increment on every counter dtype.
    type Increment = unsafe extern "C" fn(*mut c_void, Vec1, i64);
    // SAFETY: the signature of bn_counter_increment.
    let inc: Increment = unsafe { emu.kernel("bn_counter_increment") };
    for counter in &counters {
        let kp = Param::new(counter);
        let (k, kd) = (kp.buf.ptr_mut() as *mut c_void, kp.desc);
        per_item(emu, "bn_counter_increment", 1, || unsafe { inc(k, kd, 1) });
        counter.inplace_op1(&CounterIncrement).unwrap();
        assert_bitwise(
            &format!("counter {:?}", counter.dtype()),
            &param_values(&kp, counter.dtype(), 1),
            &values(counter),
        );
    }

    // bn_affine_grads_* for every parameter dtype.
    let moments = sums.apply_op1_no_bwd(&Moments { eps: 1e-5 }).unwrap();
    let mb = DevBuf::from_slice(&values(&moments), false);
    let gsums = Tensor::from_vec(rng.normals(2 * c, 0.0, 10.0), (2, c), cpu).unwrap();
    let gb = DevBuf::from_slice(&values(&gsums), false);
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let want = values(
            &gsums
                .apply_op1_no_bwd(&AffineGrads {
                    moments: moments.clone(),
                    dtype,
                })
                .unwrap(),
        );
        let out = DevBuf::<u8>::filled(2 * c * dtype.size_in_bytes(), 0xff);
        type Affine =
            unsafe extern "C" fn(*const c_void, Mat2, *const c_void, Mat2, i64, *mut c_void);
        let name = format!("bn_affine_grads_{}", dtype.as_str());
        // SAFETY: the signature of bn_affine_grads_* (the output as void*).
        let f: Affine = unsafe { emu.kernel(&name) };
        let (g, gm, m, mm, op) = (
            gb.ptr() as *const c_void,
            f64_mat(2, c),
            mb.ptr() as *const c_void,
            f64_mat(3, c),
            out.ptr_mut() as *mut c_void,
        );
        per_item(emu, &name, c, || unsafe { f(g, gm, m, mm, c as i64, op) });
        let got = bytes_values(&out.to_vec(), dtype);
        assert_bitwise(&format!("affine grads {dtype:?}"), &got, &want);
    }

    // bn_grad_combine_affine: the sums of bn_grad_combine and, from them,
    // the affine gradients of AffineGrads, bit for bit; without partials
    // (an empty batch), zeros and the affine gradients of zero sums.
    type CombineAffine = unsafe extern "C" fn(
        *const f64,
        i64,
        i64,
        *mut f64,
        *const c_void,
        Mat2,
        *mut c_void,
        Mat2,
    );
    // SAFETY: the signature of bn_grad_combine_affine (the output as void*).
    let f: CombineAffine = unsafe { emu.kernel("bn_grad_combine_affine") };
    for parts in [0, 1, 5, 70] {
        let pv = rng.normals(c * parts * 2, 1.0, 10.0);
        let partial = DevBuf::from_slice(&pv, false);
        let want_sums = if parts == 0 {
            vec![0.0; 2 * c]
        } else {
            combine(emu, "bn_grad_combine", &partial, c, parts, 2)
        };
        let sums_t = Tensor::from_vec(want_sums.clone(), (2, c), cpu).unwrap();
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            let want = values(
                &sums_t
                    .apply_op1_no_bwd(&AffineGrads {
                        moments: moments.clone(),
                        dtype,
                    })
                    .unwrap(),
            );
            let sums_out = DevBuf::<f64>::filled(2 * c, f64::NAN);
            let out = DevBuf::<u8>::filled(2 * c * dtype.size_in_bytes(), 0xff);
            let am = args::mat2(&Layout::contiguous((2, c)), dtype, 2, c, "test").unwrap();
            let pp = if parts == 0 {
                std::ptr::null()
            } else {
                partial.ptr()
            };
            let (so, m, mm, op) = (
                sums_out.ptr_mut(),
                mb.ptr() as *const c_void,
                f64_mat(3, c),
                out.ptr_mut() as *mut c_void,
            );
            let grid = [plan::per_warp_blocks(c), 1, 1];
            emu.launch(grid, [plan::BLOCK, 1, 1], || unsafe {
                f(pp, c as i64, parts as i64, so, m, mm, op, am)
            })
            .unwrap_or_else(|e| panic!("bn_grad_combine_affine: {e}"));
            let what = format!("combine with affine grads, {parts} parts, {dtype:?}");
            assert_bitwise(&format!("{what}: sums"), &sums_out.to_vec(), &want_sums);
            let got = bytes_values(&out.to_vec(), dtype);
            assert_bitwise(&format!("{what}: affine grads"), &got, &want);
        }
    }
}

/// The values of a parameter buffer of `len` elements.
fn param_values(p: &Param, dtype: DType, len: usize) -> Vec<f64> {
    let all = bytes_values(&p.buf.to_vec(), dtype);
    let (o, s) = (p.desc.offset as usize, p.desc.stride as usize);
    (0..len).map(|i| all[o + i * s]).collect()
}

/// Bytes of `dtype` elements as f64 values.
fn bytes_values(b: &[u8], dtype: DType) -> Vec<f64> {
    let n = dtype.size_in_bytes();
    b.chunks_exact(n)
        .map(|e| match dtype {
            DType::F32 => f32::from_ne_bytes(e.try_into().unwrap()) as f64,
            DType::F64 => f64::from_ne_bytes(e.try_into().unwrap()),
            DType::F16 => f16::from_ne_bytes(e.try_into().unwrap()).to_f64(),
            DType::BF16 => bf16::from_ne_bytes(e.try_into().unwrap()).to_f64(),
            DType::I64 => i64::from_ne_bytes(e.try_into().unwrap()) as f64,
            DType::U32 => u32::from_ne_bytes(e.try_into().unwrap()) as f64,
            other => panic!("no values of dtype {other:?}"),
        })
        .collect()
}
