//! Launch helpers shared by the ops' `cuda_fwd`.
//!
//! Every kernel is enqueued on the stream candle uses for the device
//! (`CudaDevice::cuda_stream`), so it is ordered with candle's own kernels;
//! nothing here copies to the host or synchronizes the stream.

use super::plan::{self, Canon, InnerSplit, KView, MajorSplit, Path};
use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use candle::cuda_backend::{CudaStorageSlice, WrapErr};
use candle::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};

/// The PTX that `build.rs` compiled from `cuda-kernels/*.cu`.
mod ptx {
    include!(concat!(env!("OUT_DIR"), "/cuda_kernels.rs"));
}

// SAFETY: `KView` is `#[repr(C)]`, made of `i64`s only, and matches
// `struct View` of cuda-kernels/view.cuh field by field.
unsafe impl DeviceRepr for KView {}

/// A PTX module of `cuda-kernels/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Module {
    /// `stats.cu`: batch statistics, moments, running statistics, counter.
    Stats,
    /// `grad.cu`: gradient sums and weight/bias gradients.
    Grad,
    /// `elementwise.cu`: normalization and input gradient.
    Elementwise,
}

impl Module {
    fn name(self) -> &'static str {
        match self {
            Module::Stats => "candle-syncbn/stats",
            Module::Grad => "candle-syncbn/grad",
            Module::Elementwise => "candle-syncbn/elementwise",
        }
    }

    fn ptx(self) -> &'static str {
        match self {
            Module::Stats => ptx::STATS,
            Module::Grad => ptx::GRAD,
            Module::Elementwise => ptx::ELEMENTWISE,
        }
    }
}

/// Kernel `name` of `module`, loaded once per device.
pub fn function(dev: &CudaDevice, module: Module, name: &str) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, module.name(), module.ptx())?
        .into_cuda_function())
}

/// Enqueues a kernel on the device's stream.
///
/// # Safety
/// The arguments pushed into `args` must match the kernel's parameters, and
/// every buffer must be large enough for the indices the kernel computes from
/// them.
pub unsafe fn launch(mut args: LaunchArgs<'_>, cfg: LaunchConfig) -> Result<()> {
    args.launch(cfg).w()?;
    Ok(())
}

/// A 1-D launch of `blocks` blocks of [`plan::BLOCK`] threads.
pub fn grid(blocks: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid_dim(blocks, plan::MAX_GRID_X)?, 1, 1),
        block_dim: (plan::BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn grid_dim(blocks: usize, max: usize) -> Result<u32> {
    if blocks == 0 || blocks > max {
        candle::bail!("sync-batch-norm: CUDA grid of {blocks} blocks is out of range (1..={max})")
    }
    Ok(blocks as u32)
}

/// Multiprocessors of the device (sizes the grids).
pub fn sm_count(dev: &CudaDevice) -> Result<usize> {
    let n = dev
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    Ok(n.max(1) as usize)
}

/// Whether the allocation behind `s` starts on a 16-byte boundary.
pub fn aligned16<T>(dev: &CudaDevice, s: &CudaSlice<T>) -> bool {
    let stream = dev.cuda_stream();
    let (ptr, _record) = s.device_ptr(&stream);
    ptr % 16 == 0
}

/// An uninitialized buffer of at least one element (CUDA rejects empty allocations).
///
/// # Safety
/// The caller must write every element it (or a later reader) reads.
pub unsafe fn alloc<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    dev.alloc::<T>(len.max(1))
}

/// A zeroed buffer of at least one element.
pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    len: usize,
) -> Result<CudaSlice<T>> {
    dev.alloc_zeros::<T>(len.max(1))
}

/// The 128-bit vector width of element type `T` (in elements).
pub fn vec_width<T>() -> usize {
    (16 / std::mem::size_of::<T>()).max(1)
}

/// The run-time dtype code of a small tensor (`DtypeCode` in cuda-kernels/dtype.cuh).
pub fn dtype_code(dtype: DType, what: &str) -> Result<i32> {
    Ok(match dtype {
        DType::F32 => 0,
        DType::F64 => 1,
        DType::F16 => 2,
        DType::BF16 => 3,
        DType::I64 => 4,
        DType::U32 => 5,
        other => candle::bail!("sync-batch-norm: unsupported {what} dtype {other:?} on CUDA"),
    })
}

/// A per-channel vector (`struct Vec1` in cuda-kernels/view.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vec1 {
    /// Storage offset of element 0.
    pub offset: i64,
    /// Stride between elements.
    pub stride: i64,
    /// Run-time dtype code.
    pub dtype: i32,
    /// 0 when absent (null pointer).
    pub present: i32,
}

// SAFETY: `#[repr(C)]`, two i64 then two i32 (no padding), as `struct Vec1`.
unsafe impl DeviceRepr for Vec1 {}

impl Vec1 {
    /// No tensor.
    pub const ABSENT: Vec1 = Vec1 {
        offset: 0,
        stride: 0,
        dtype: 0,
        present: 0,
    };
}

/// A small `(rows, C)` matrix (`struct Mat2` in cuda-kernels/view.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mat2 {
    /// Storage offset of element (0, 0).
    pub offset: i64,
    /// Stride between rows.
    pub row_stride: i64,
    /// Stride between columns.
    pub col_stride: i64,
    /// Run-time dtype code.
    pub dtype: i32,
    /// 0 when absent (null pointer).
    pub present: i32,
}

// SAFETY: `#[repr(C)]`, three i64 then two i32 (no padding), as `struct Mat2`.
unsafe impl DeviceRepr for Mat2 {}

impl Mat2 {
    /// No tensor.
    pub const ABSENT: Mat2 = Mat2 {
        offset: 0,
        row_stride: 0,
        col_stride: 0,
        dtype: 0,
        present: 0,
    };
}

/// The per-channel vector of `len` elements of `layout` (any shape whose
/// non-unit dims form one strided run).
pub fn vec1(layout: &Layout, dtype: DType, len: usize, what: &str) -> Result<Vec1> {
    if layout.shape().elem_count() != len {
        candle::bail!(
            "sync-batch-norm: expected {what} of {len} elements, got shape {:?}",
            layout.dims()
        )
    }
    let kept: Vec<(usize, usize)> = layout
        .dims()
        .iter()
        .copied()
        .zip(layout.stride().iter().copied())
        .filter(|&(d, _)| d != 1)
        .collect();
    let stride = match kept.last() {
        None => 0,
        Some(&(_, s)) => {
            if !kept.windows(2).all(|w| w[0].1 == w[1].1 * w[1].0) {
                candle::bail!(
                    "sync-batch-norm: {what} with strides {:?} for shape {:?} is not one strided run; make it contiguous",
                    layout.stride(),
                    layout.dims()
                )
            }
            s
        }
    };
    Ok(Vec1 {
        offset: layout.start_offset() as i64,
        stride: stride as i64,
        dtype: dtype_code(dtype, what)?,
        present: 1,
    })
}

/// The `(rows, channels)` matrix of `layout`.
pub fn mat2(
    layout: &Layout,
    dtype: DType,
    rows: usize,
    channels: usize,
    what: &str,
) -> Result<Mat2> {
    if layout.dims() != [rows, channels] {
        candle::bail!(
            "sync-batch-norm: expected {what} of shape [{rows}, {channels}], got {:?}",
            layout.dims()
        )
    }
    let s = layout.stride();
    Ok(Mat2 {
        offset: layout.start_offset() as i64,
        row_stride: s[0] as i64,
        col_stride: s[1] as i64,
        dtype: dtype_code(dtype, what)?,
        present: 1,
    })
}

/// Pushes the allocation of `s` (any dtype) as a kernel pointer argument.
pub fn push_storage<'a>(args: &mut LaunchArgs<'a>, s: &'a CudaStorage) -> Result<()> {
    let dtype = s.dtype();
    match &s.slice {
        CudaStorageSlice::F32(v) => args.arg(v),
        CudaStorageSlice::F64(v) => args.arg(v),
        CudaStorageSlice::F16(v) => args.arg(v),
        CudaStorageSlice::BF16(v) => args.arg(v),
        CudaStorageSlice::I64(v) => args.arg(v),
        CudaStorageSlice::U32(v) => args.arg(v),
        _ => candle::bail!("sync-batch-norm: unsupported small-tensor dtype {dtype:?} on CUDA"),
    };
    Ok(())
}

/// Pushes the allocation of `s` (a float tensor written in place) as a kernel
/// pointer argument.
pub fn push_storage_mut<'a>(args: &mut LaunchArgs<'a>, s: &'a mut CudaStorage) -> Result<()> {
    let dtype = s.dtype();
    match &mut s.slice {
        CudaStorageSlice::F32(v) => args.arg(v),
        CudaStorageSlice::F64(v) => args.arg(v),
        CudaStorageSlice::F16(v) => args.arg(v),
        CudaStorageSlice::BF16(v) => args.arg(v),
        CudaStorageSlice::I64(v) => args.arg(v),
        CudaStorageSlice::U32(v) => args.arg(v),
        _ => candle::bail!("sync-batch-norm: unsupported in-place dtype {dtype:?} on CUDA"),
    };
    Ok(())
}

/// The null pointer, for absent optional tensors.
pub static NULL: u64 = 0;

/// The CUDA storage of a small tensor held by an op (moments, weight, sums),
/// read-locked while kernels that read it are enqueued.
pub struct Small<'a> {
    guard: candle::StorageRef<'a>,
    layout: &'a Layout,
    dtype: DType,
}

impl<'a> Small<'a> {
    /// Locks `t`'s storage; it must live on `dev`.
    pub fn new(t: &'a Tensor, dev: &CudaDevice, what: &str) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        match &*guard {
            Storage::Cuda(s) if s.device.id() == dev.id() => {}
            _ => candle::bail!(
                "sync-batch-norm: {what} is on {:?}, not on the input's CUDA device",
                t.device().location()
            ),
        }
        Ok(Self {
            guard,
            layout,
            dtype: t.dtype(),
        })
    }

    /// The CUDA storage.
    pub fn storage(&self) -> &CudaStorage {
        match &*self.guard {
            Storage::Cuda(s) => s,
            _ => unreachable!("checked in Small::new"),
        }
    }

    /// As a per-channel vector of `len` elements.
    pub fn vec1(&self, len: usize, what: &str) -> Result<Vec1> {
        vec1(self.layout, self.dtype, len, what)
    }

    /// As a `(rows, channels)` matrix.
    pub fn mat2(&self, rows: usize, channels: usize, what: &str) -> Result<Mat2> {
        mat2(self.layout, self.dtype, rows, channels, what)
    }
}

/// Level 1 of a two-level per-channel reduction: the path, the split and
/// whether loads are 128-bit.
#[derive(Debug, Clone)]
pub struct Reduction {
    /// The canonical views (primary input first).
    pub canon: Canon,
    /// 128-bit loads.
    pub vec: bool,
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
    /// Plans the reduction of non-empty views whose base allocations are
    /// 16-byte aligned as given, for elements of `vec_width` per 128 bits.
    pub fn new(canon: Canon, vec_width: usize, aligned: &[bool], sms: usize) -> Self {
        let vec = plan::vectorizable(&canon, vec_width, aligned);
        let (outer, channels, inner) = canon.sizes();
        let split = match canon.path {
            Path::Major => ReductionSplit::Major(plan::major_split(channels, outer * inner, sms)),
            Path::Innermost => {
                let cv = if vec { vec_width } else { 1 };
                ReductionSplit::Inner(plan::inner_split(channels, outer, cv, sms))
            }
        };
        Self { canon, vec, split }
    }

    /// Partials per channel (written by level 1, read by level 2).
    pub fn parts(&self) -> usize {
        match self.split {
            ReductionSplit::Major(s) => s.chunks,
            ReductionSplit::Inner(s) => s.row_blocks,
        }
    }

    /// The launch configuration of level 1.
    pub fn config(&self) -> Result<LaunchConfig> {
        match self.split {
            ReductionSplit::Major(s) => grid(s.blocks),
            ReductionSplit::Inner(s) => Ok(LaunchConfig {
                grid_dim: (
                    grid_dim(s.grid_x, plan::MAX_GRID_X)?,
                    grid_dim(s.row_blocks, plan::MAX_GRID_Y)?,
                    1,
                ),
                block_dim: (s.bx as u32, s.by as u32, 1),
                shared_mem_bytes: 0,
            }),
        }
    }

    /// The kernel name for `prefix` (`bn_stats`, `bn_grad`) and dtype.
    pub fn kernel(&self, prefix: &str, dtype: DType) -> String {
        let path = match self.split {
            ReductionSplit::Major(_) => "major",
            ReductionSplit::Inner(_) => "inner",
        };
        format!("{prefix}_{path}_{}", dtype.as_str())
    }

    /// The `vec` kernel argument.
    pub fn vec_arg(&self) -> i32 {
        self.vec as i32
    }
}

/// Allocates and launches level 2 (`bn_stats_combine` or `bn_grad_combine`):
/// one warp per channel folds the partials into a `(rows, C)` f64 output.
pub fn combine(
    dev: &CudaDevice,
    module: Module,
    kernel: &str,
    partial: &CudaSlice<f64>,
    channels: usize,
    parts: usize,
    rows: usize,
) -> Result<CudaSlice<f64>> {
    // SAFETY: the kernel writes all `rows * channels` values.
    let out = unsafe { alloc::<f64>(dev, rows * channels)? };
    let f = function(dev, module, kernel)?;
    let stream = dev.cuda_stream();
    let mut args = stream.launch_builder(&f);
    let (c, p) = (channels as i64, parts as i64);
    args.arg(partial).arg(&c).arg(&p).arg(&out);
    // SAFETY: matches `bn_*_combine(const double*, long long, long long,
    // double*)`; `partial` holds `channels * parts * rows` values.
    unsafe { launch(args, grid(plan::per_warp_blocks(channels))?)? };
    Ok(out)
}

/// The element-wise `mode` argument (see cuda-kernels/elementwise.cu): 0
/// scalar, 1 vectors along `inner`, 2 vectors along the channels.
pub fn elementwise_mode(canon: &Canon, vec_width: usize, aligned: &[bool]) -> i32 {
    match (plan::vectorizable(canon, vec_width, aligned), canon.path) {
        (false, _) => 0,
        (true, Path::Major) => 1,
        (true, Path::Innermost) => 2,
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
