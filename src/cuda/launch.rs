//! Launch helpers shared by the ops' `cuda_fwd`.
//!
//! Every kernel is enqueued on the stream candle uses for the device
//! (`CudaDevice::cuda_stream`), so it is ordered with candle's own kernels;
//! nothing here copies to the host or synchronizes the stream.

pub use super::args::{mat2, vec1, Mat2, Vec1};
use super::plan::{self, KView};
pub use super::plan::{
    acc_suffix, coef_bytes, elementwise_mode, vec_width, Reduction, ReductionSplit,
};
use crate::layout::ChannelView;
use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use candle::cuda_backend::DeviceId;
use candle::cuda_backend::{CudaStorageSlice, WrapErr};
use candle::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor, WithDType};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// The PTX that `build.rs` compiled from `cuda-kernels/*.cu`.
mod ptx {
    include!(concat!(env!("OUT_DIR"), "/cuda_kernels.rs"));
}

// SAFETY: `KView` is `#[repr(C)]`, made of `i64`s only, and matches
// `struct View` of cuda-kernels/view.cuh field by field.
unsafe impl DeviceRepr for KView {}
// SAFETY: `#[repr(C)]`, two i64 then two i32 (no padding), as `struct Vec1`.
unsafe impl DeviceRepr for Vec1 {}
// SAFETY: `#[repr(C)]`, three i64 then two i32 (no padding), as `struct Mat2`.
unsafe impl DeviceRepr for Mat2 {}

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

    /// Its source file in `cuda-kernels/`.
    fn file(self) -> &'static str {
        match self {
            Module::Stats => "stats.cu",
            Module::Grad => "grad.cu",
            Module::Elementwise => "elementwise.cu",
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
    // Every kernel the ops load is in the table the tests check against the
    // sources (`super::kernels`), in this module.
    debug_assert_eq!(
        super::kernels::find(name).map(|(k, _)| k.file),
        Some(module.file()),
        "kernel {name}"
    );
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

/// Figures of a device that never change, queried once per device and kernel
/// (a driver call per launch would add to the host's time per step).
#[derive(Default)]
struct DeviceFigures {
    /// Multiprocessors per device.
    sms: HashMap<DeviceId, usize>,
    /// Resident blocks per multiprocessor, per device and kernel name.
    per_sm: HashMap<(DeviceId, String), usize>,
}

fn figures() -> MutexGuard<'static, DeviceFigures> {
    static FIGURES: OnceLock<Mutex<DeviceFigures>> = OnceLock::new();
    // The maps hold plain numbers: a panic elsewhere cannot leave them half-written.
    FIGURES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Multiprocessors of the device (sizes the grids).
pub fn sm_count(dev: &CudaDevice) -> Result<usize> {
    if let Some(&n) = figures().sms.get(&dev.id()) {
        return Ok(n);
    }
    let n = dev
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    let n = n.max(1) as usize;
    figures().sms.insert(dev.id(), n);
    Ok(n)
}

/// The resident blocks of kernel `name` (loaded as `f`) on `dev`: the
/// driver's occupancy for [`plan::BLOCK`]-thread blocks, which the kernel's
/// registers set, on every multiprocessor.
pub fn slots(dev: &CudaDevice, f: &CudaFunction, name: &str) -> Result<plan::Slots> {
    let sms = sm_count(dev)?;
    let key = (dev.id(), name.to_string());
    if let Some(&per_sm) = figures().per_sm.get(&key) {
        return Ok(plan::Slots::new(sms, per_sm));
    }
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(plan::BLOCK as u32, 0, None)
        .w()? as usize;
    if per_sm == 0 {
        candle::bail!(
            "sync-batch-norm: CUDA kernel {name} cannot run blocks of {} threads on this device",
            plan::BLOCK
        )
    }
    figures().per_sm.insert(key, per_sm);
    Ok(plan::Slots::new(sms, per_sm))
}

/// Level 1 of a reduction over `views` (primary input first) whose base
/// allocations are 16-byte aligned as given, for elements of type `T`: the
/// plan, sized for the resident blocks of its kernel `{prefix}_…` of `module`,
/// and that kernel.
pub fn reduction<T: WithDType>(
    dev: &CudaDevice,
    module: Module,
    prefix: &str,
    views: &[ChannelView],
    aligned: &[bool],
) -> Result<(Reduction, CudaFunction)> {
    let canon = plan::canonicalize(views);
    let width = plan::load_width(&canon, vec_width::<T>(), aligned);
    let name = plan::reduction_kernel(prefix, canon.path, width, T::DTYPE);
    let f = function(dev, module, &name)?;
    let slots = slots(dev, &f, &name)?;
    Ok((Reduction::new(canon, width, slots), f))
}

/// A grid-stride element-wise pass `base` (`bn_normalize`,
/// `bn_normalize_add`, `bn_input_grad`, `bn_relu_grad`) over `len` elements
/// in `mode`, `w` per thread and step, of `channels` channels: its kernel and
/// blocks, one wave of the kernel's resident blocks
/// ([`plan::elementwise_blocks`]). With `rows` (the passes that have
/// `{base}_rows_*` entries), a grid along the channels whose stride is whole
/// rows takes that entry ([`plan::elementwise_kernel`]).
#[allow(clippy::too_many_arguments)]
pub fn elementwise_pass(
    dev: &CudaDevice,
    base: &str,
    dtype: DType,
    rows: bool,
    mode: i32,
    w: usize,
    len: usize,
    channels: usize,
) -> Result<(CudaFunction, usize)> {
    let plain = format!("{base}_{}", dtype.as_str());
    if rows && mode == plan::MODE_ALONG_CHANNELS {
        let name = format!("{base}_rows_{}", dtype.as_str());
        let f = function(dev, Module::Elementwise, &name)?;
        let blocks = plan::elementwise_blocks(len, w, slots(dev, &f, &name)?, mode, channels);
        if plan::elementwise_kernel(base, dtype.as_str(), mode, blocks, w, channels) == name {
            return Ok((f, blocks));
        }
    }
    let f = function(dev, Module::Elementwise, &plain)?;
    let blocks = plan::elementwise_blocks(len, w, slots(dev, &f, &plain)?, mode, channels);
    Ok((f, blocks))
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

impl Reduction {
    /// The launch configuration of level 1 (see [`Reduction::launch_dims`]).
    pub fn config(&self) -> Result<LaunchConfig> {
        let ([gx, gy, _], [bx, by, _]) = self.launch_dims();
        Ok(LaunchConfig {
            grid_dim: (
                grid_dim(gx, plan::MAX_GRID_X)?,
                grid_dim(gy, plan::MAX_GRID_Y)?,
                1,
            ),
            block_dim: (bx as u32, by as u32, 1),
            shared_mem_bytes: 0,
        })
    }
}
