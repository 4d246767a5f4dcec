//! The NCCL group (feature `nccl`): one process per GPU, collectives enqueued
//! on candle's own stream of the rank's device, on device memory, without any
//! host synchronization.
//!
//! - The NCCL unique id is made by rank 0 and shared through the authenticated
//!   TCP rendezvous (the `store` module), whose connections stay open.
//! - A watchdog thread records a CUDA event after each collective and polls it;
//!   a collective that has not finished within [`NcclOptions::timeout`]
//!   (default 10 minutes, as PyTorch), or an asynchronous NCCL error, aborts
//!   the communicator (`ncclCommAbort`): the stuck kernels are released and the
//!   next call returns the error instead of hanging forever.
//! - With `SYNCBN_NCCL_DEBUG=1` (see [`DEBUG_VAR`]) every collective is first
//!   checked over the TCP connections: all ranks must make the same call
//!   (sequence number, operation, element count, dtype, [`CallTag`]), else every rank gets
//!   an error naming each rank's call. This costs a round trip per collective.
//! - [`ProcessGroup::split`](super::ProcessGroup::split) and `subgroups` give
//!   each subgroup a communicator of its own (`ncclCommSplit`) with its own
//!   watchdog, so a subgroup's collectives involve its members only. The debug
//!   checks need the rendezvous connections and stay with the root group.
//!
//! Not yet run on real GPUs. In CI, tests/nccl.rs runs it on the emulated GPU
//! (four devices, an emulated NCCL whose collectives stay pending on their
//! streams until every rank has enqueued its part): exact collective
//! results, the layer on k ranks against one, and a rank that leaves or
//! stalls becoming an error on every rank within the timeout. The
//! rendezvous, id exchange and debug agreement check are the TCP store's,
//! tested on the CPU.

use super::store::{dtype_code, Call, Op, Star, StoreOptions, FLAG_META_ONLY};
use super::{Backend, CallTag};
use crate::launch::env::Rendezvous;
use candle::backend::{BackendDevice, BackendStorage};
use candle::cuda_backend::cudarc::driver::{
    CudaEvent, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
};
use candle::cuda_backend::cudarc::nccl::{result, sys};
use candle::cuda_backend::{CudaDType, CudaStorage};
use candle::{CpuStorage, DType, Device, Layout, Result, Shape, Tensor};
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Set this environment variable to `1` to check, before each NCCL collective,
/// that all ranks agree on the call.
pub const DEBUG_VAR: &str = "SYNCBN_NCCL_DEBUG";

/// How often the watchdog looks at the pending collectives.
const WATCHDOG_POLL: Duration = Duration::from_millis(50);

/// Options of the NCCL group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NcclOptions {
    /// A collective not finished on the GPU after this long aborts the
    /// communicator (default 10 minutes).
    pub timeout: Duration,
    /// The rendezvous (and debug-check) connections' options.
    pub store: StoreOptions,
    /// Check before each collective that all ranks agree on it.
    pub debug_checks: bool,
}

impl Default for NcclOptions {
    fn default() -> Self {
        Self {
            timeout: crate::group::DEFAULT_TIMEOUT,
            store: StoreOptions::default(),
            debug_checks: false,
        }
    }
}

impl NcclOptions {
    /// The defaults, with `SYNCBN_TIMEOUT` (seconds) and [`DEBUG_VAR`] applied.
    pub fn from_env() -> Result<Self> {
        let store = StoreOptions::from_env()?;
        let debug_checks = matches!(
            std::env::var(DEBUG_VAR).as_deref().map(str::trim),
            Ok("1") | Ok("true") | Ok("yes") | Ok("on")
        );
        Ok(Self {
            timeout: store.timeout,
            store,
            debug_checks,
        })
    }
}

fn nccl_err(what: &str, e: result::NcclError) -> candle::Error {
    candle::Error::Msg(format!("nccl group: {what} failed: {:?}", e.0))
}

/// The raw communicator, shared with the watchdog.
struct Comm {
    comm: sys::ncclComm_t,
    aborted: AtomicBool,
    failure: Mutex<Option<String>>,
    /// Held while a call is being enqueued, so the watchdog does not abort
    /// under it (it waits for it for at most a second).
    enqueue: Mutex<()>,
}

// SAFETY: an NCCL communicator may be used from any thread; every use here is
// serialized by `enqueue`, except an abort after a stuck enqueue, which is what
// `ncclCommAbort` is for.
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

impl Comm {
    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records `msg` (the first failure wins) and aborts the communicator once.
    fn abort(&self, msg: String) {
        {
            let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
            if f.is_none() {
                *f = Some(msg);
            }
        }
        let guard = {
            let start = Instant::now();
            loop {
                if let Ok(g) = self.enqueue.try_lock() {
                    break Some(g);
                }
                if start.elapsed() > Duration::from_secs(1) {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: `comm` is a live communicator, aborted exactly once.
            let _ = unsafe { result::comm_abort(self.comm) };
        }
        drop(guard);
    }

    /// Enqueues one NCCL call unless the communicator failed.
    fn enqueue(
        &self,
        what: &str,
        f: impl FnOnce(sys::ncclComm_t) -> std::result::Result<result::NcclStatus, result::NcclError>,
    ) -> Result<()> {
        let _g: MutexGuard<'_, ()> = self.enqueue.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = self.failure() {
            candle::bail!("nccl group is unusable after an earlier failure: {f}")
        }
        if self.aborted.load(Ordering::SeqCst) {
            candle::bail!("nccl group: the communicator was aborted")
        }
        f(self.comm).map_err(|e| {
            let err = nccl_err(what, e.clone());
            drop(_g);
            self.abort(err.to_string());
            err
        })?;
        Ok(())
    }
}

struct Pending {
    event: CudaEvent,
    what: String,
    enqueued: Instant,
}

/// The watchdog thread: polls the event of every pending collective.
struct Watchdog {
    tx: Option<Sender<Pending>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(comm: Arc<Comm>, stream: Arc<CudaStream>, rank: usize, timeout: Duration) -> Self {
        let (tx, rx) = channel::<Pending>();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("syncbn-nccl-watchdog-{rank}"))
            .spawn(move || {
                let _ = stream.context().bind_to_thread();
                let mut pending: VecDeque<Pending> = VecDeque::new();
                while !stop2.load(Ordering::SeqCst) {
                    match rx.recv_timeout(WATCHDOG_POLL) {
                        Ok(p) => pending.push_back(p),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    while let Ok(p) = rx.try_recv() {
                        pending.push_back(p);
                    }
                    if comm.aborted.load(Ordering::SeqCst) {
                        pending.clear();
                        continue;
                    }
                    let mut async_err = sys::ncclResult_t::ncclSuccess;
                    // SAFETY: the communicator is live (not aborted, checked above).
                    let _ = unsafe { sys::ncclCommGetAsyncError(comm.comm, &mut async_err) };
                    if !matches!(
                        async_err,
                        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
                    ) {
                        comm.abort(format!(
                            "nccl group: rank {rank}: asynchronous NCCL error {async_err:?} (a peer failed?); the communicator was aborted"
                        ));
                        continue;
                    }
                    while let Some(p) = pending.front() {
                        match p.event.try_is_complete() {
                            Ok(true) => {
                                pending.pop_front();
                            }
                            Ok(false) if p.enqueued.elapsed() > timeout => {
                                comm.abort(format!(
                                    "nccl group: rank {rank}: {} did not finish within {timeout:?} (a rank died, hangs, or made a different call); the communicator was aborted",
                                    p.what
                                ));
                                pending.clear();
                            }
                            Ok(false) => break,
                            Err(e) => {
                                comm.abort(format!(
                                    "nccl group: rank {rank}: CUDA error while waiting for {}: {e:?}",
                                    p.what
                                ));
                                pending.clear();
                            }
                        }
                    }
                }
            })
            .ok();
        Self {
            tx: Some(tx),
            stop,
            thread,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The backend of [`ProcessGroup::nccl`](super::ProcessGroup::nccl).
pub struct NcclBackend {
    rank: usize,
    world_size: usize,
    device: candle::CudaDevice,
    stream: Arc<CudaStream>,
    comm: Arc<Comm>,
    /// The TCP connections of the rendezvous, for the debug checks and the
    /// barrier; `None` for a communicator split off another.
    star: Option<Mutex<Star>>,
    seq: AtomicU64,
    options: NcclOptions,
    watchdog: Watchdog,
}

impl fmt::Debug for NcclBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclBackend")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device", &self.device)
            .field("options", &self.options)
            .finish()
    }
}

fn nccl_dtype(dtype: DType) -> Result<sys::ncclDataType_t> {
    use sys::ncclDataType_t as T;
    Ok(match dtype {
        DType::U8 => T::ncclUint8,
        DType::U32 => T::ncclUint32,
        DType::I32 => T::ncclInt32,
        DType::I64 => T::ncclInt64,
        DType::F16 => T::ncclFloat16,
        DType::BF16 => T::ncclBfloat16,
        DType::F32 => T::ncclFloat32,
        DType::F64 => T::ncclFloat64,
        d => candle::bail!("nccl group: tensors of dtype {d:?} cannot be communicated"),
    })
}

impl NcclBackend {
    /// Joins the NCCL group described by `rv` on the CUDA device `device`:
    /// the TCP rendezvous, the unique id from rank 0, then `ncclCommInitRank`.
    pub fn connect(rv: &Rendezvous, device: &Device, options: NcclOptions) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            candle::bail!(
                "nccl group: expected a CUDA device, got {:?}",
                device.location()
            )
        };
        if options.timeout.is_zero() {
            candle::bail!("nccl group: the timeout must be positive")
        }
        let mut star = Star::connect(rv, options.store)?;
        let id = if rv.rank == 0 {
            Some(result::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?)
        } else {
            None
        };
        let bytes: Vec<u8> = id
            .map(|id| id.internal.iter().map(|&c| c as u8).collect())
            .unwrap_or_default();
        let call = Call {
            op: Op::Broadcast,
            dtype: dtype_code(DType::U8),
            count: 128,
            root: 0,
            flags: 0,
        };
        let bytes = star.exchange(call, &bytes, &|p| Ok(p[0].clone()))?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(bytes) {
            *d = s as std::ffi::c_char;
        }
        let id = sys::ncclUniqueId { internal };
        let stream = cuda.cuda_stream();
        stream.context().bind_to_thread().map_err(|e| {
            candle::Error::Msg(format!("nccl group: binding the CUDA context: {e:?}"))
        })?;
        let mut raw = std::mem::MaybeUninit::<sys::ncclComm_t>::uninit();
        // SAFETY: `raw` is written by ncclCommInitRank on success.
        let raw = unsafe {
            result::comm_init_rank(
                raw.as_mut_ptr(),
                rv.world_size as std::ffi::c_int,
                id,
                rv.rank as std::ffi::c_int,
            )
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
            raw.assume_init()
        };
        let comm = Arc::new(Comm {
            comm: raw,
            aborted: AtomicBool::new(false),
            failure: Mutex::new(None),
            enqueue: Mutex::new(()),
        });
        let watchdog = Watchdog::start(comm.clone(), stream.clone(), rv.rank, options.timeout);
        Ok(Self {
            rank: rv.rank,
            world_size: rv.world_size,
            device: cuda.clone(),
            stream,
            comm,
            star: Some(Mutex::new(star)),
            seq: AtomicU64::new(0),
            options,
            watchdog,
        })
    }

    /// The communicator of this rank's subgroup (`slot`, with the group ranks
    /// `members`), split off this one with `ncclCommSplit`, which every rank
    /// of this group calls. It has its own watchdog and timeout; the debug
    /// checks, which need the rendezvous connections, stay with this group.
    fn split(&self, slot: usize, members: &[usize]) -> Result<NcclBackend> {
        let key = members
            .iter()
            .position(|&r| r == self.rank)
            .ok_or_else(|| {
                candle::Error::Msg(format!(
                    "nccl group: rank {} is not among the members {members:?} of its subgroup",
                    self.rank
                ))
            })?;
        let color = std::ffi::c_int::try_from(slot).map_err(|_| {
            candle::Error::Msg(format!(
                "nccl group: subgroup {slot} is out of NCCL's range"
            ))
        })?;
        self.stream.context().bind_to_thread().map_err(|e| {
            candle::Error::Msg(format!("nccl group: binding the CUDA context: {e:?}"))
        })?;
        let mut raw = std::mem::MaybeUninit::<sys::ncclComm_t>::uninit();
        self.comm.enqueue("ncclCommSplit", |comm| {
            // SAFETY: `comm` is live; `raw` is written on success; a null
            // config asks for the parent's.
            unsafe {
                sys::ncclCommSplit(
                    comm,
                    color,
                    key as std::ffi::c_int,
                    raw.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
                .result()
            }
        })?;
        // SAFETY: ncclCommSplit succeeded, so it wrote the communicator.
        let raw = unsafe { raw.assume_init() };
        let comm = Arc::new(Comm {
            comm: raw,
            aborted: AtomicBool::new(false),
            failure: Mutex::new(None),
            enqueue: Mutex::new(()),
        });
        let watchdog = Watchdog::start(
            comm.clone(),
            self.stream.clone(),
            self.rank,
            self.options.timeout,
        );
        Ok(Self {
            rank: key,
            world_size: members.len(),
            device: self.device.clone(),
            stream: self.stream.clone(),
            comm,
            star: None,
            seq: AtomicU64::new(0),
            options: self.options,
            watchdog,
        })
    }

    /// The debug check: all ranks agree on the call (through the TCP store).
    fn check(&self, call: Call, tag: CallTag) -> Result<()> {
        let Some(star) = &self.star else {
            return Ok(());
        };
        if !self.options.debug_checks || self.world_size == 1 {
            return Ok(());
        }
        let call = Call {
            flags: FLAG_META_ONLY,
            ..call
        };
        star.lock()
            .unwrap_or_else(|e| e.into_inner())
            .exchange_tagged(call, tag, &[], &|_| Ok(Vec::new()))
            .map(|_| ())
            .map_err(|e| {
                let msg = format!("nccl group (debug check): {e}");
                self.comm.abort(msg.clone());
                candle::Error::Msg(msg)
            })
    }

    fn collective(&self, op: Op, tensor: &Tensor, root: usize, tag: CallTag) -> Result<Tensor> {
        if let Some(f) = self.comm.failure() {
            candle::bail!("nccl group is unusable after an earlier failure: {f}")
        }
        match tensor.device() {
            Device::Cuda(d) if d.same_device(&self.device) => {}
            other => candle::bail!(
                "nccl group: expected a tensor on {:?}, got one on {:?}",
                Device::Cuda(self.device.clone()).location(),
                other.location()
            ),
        }
        let ty = nccl_dtype(tensor.dtype())?;
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        self.check(
            Call {
                op,
                dtype: dtype_code(tensor.dtype()),
                count: tensor.elem_count() as u64,
                root: root as u32,
                flags: 0,
            },
            tag,
        )?;
        if tensor.elem_count() == 0 {
            return Ok(tensor.clone());
        }
        let what = match op {
            Op::AllReduceSum => format!(
                "collective #{seq} (all_reduce_sum of {} {:?})",
                tensor.elem_count(),
                tensor.dtype()
            ),
            _ => format!(
                "collective #{seq} (broadcast from rank {root} of {} {:?})",
                tensor.elem_count(),
                tensor.dtype()
            ),
        };
        let t = tensor.contiguous()?;
        let out = t.apply_op1_no_bwd(&NcclOp {
            backend: self,
            op,
            root,
            ty,
            what: what.clone(),
        })?;
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| candle::Error::Msg(format!("nccl group: recording an event: {e:?}")))?;
        if let Some(tx) = &self.watchdog.tx {
            let _ = tx.send(Pending {
                event,
                what,
                enqueued: Instant::now(),
            });
        }
        Ok(out)
    }
}

/// The collective as a candle op, to reach the device memory of the tensor.
struct NcclOp<'a> {
    backend: &'a NcclBackend,
    op: Op,
    root: usize,
    ty: sys::ncclDataType_t,
    what: String,
}

impl NcclOp<'_> {
    fn run<T: CudaDType + DeviceRepr>(&self, s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        let b = self.backend;
        let n = l.shape().elem_count();
        let start = l.start_offset();
        let src = s.as_cuda_slice::<T>()?;
        let src = src.slice(start..start + n);
        // SAFETY: fully written by the collective before any use (same stream).
        let mut dst = unsafe { s.device.alloc::<T>(n)? };
        {
            let (sp, _rs) = src.device_ptr(&b.stream);
            let (dp, _rd) = dst.device_ptr_mut(&b.stream);
            let stream = b.stream.cu_stream() as sys::cudaStream_t;
            let (op, root, ty) = (self.op, self.root, self.ty);
            b.comm.enqueue(&self.what, |comm| unsafe {
                // SAFETY: both buffers hold `n` elements of `ty` on this stream's device.
                match op {
                    Op::AllReduceSum => result::all_reduce(
                        sp as *const std::ffi::c_void,
                        dp as *mut std::ffi::c_void,
                        n,
                        ty,
                        sys::ncclRedOp_t::ncclSum,
                        comm,
                        stream,
                    ),
                    _ => result::broadcast(
                        sp as *const std::ffi::c_void,
                        dp as *mut std::ffi::c_void,
                        n,
                        ty,
                        root as std::ffi::c_int,
                        comm,
                        stream,
                    ),
                }
            })?;
        }
        Ok(CudaStorage::wrap_cuda_slice(dst, s.device.clone()))
    }
}

impl candle::CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        "nccl-collective"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle::bail!("nccl group: the tensor must be on a CUDA device")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        if !l.is_contiguous() {
            candle::bail!("nccl group: internal error: non-contiguous input")
        }
        let out = match s.dtype() {
            DType::U8 => self.run::<u8>(s, l)?,
            DType::U32 => self.run::<u32>(s, l)?,
            DType::I32 => self.run::<i32>(s, l)?,
            DType::I64 => self.run::<i64>(s, l)?,
            DType::F16 => self.run::<half::f16>(s, l)?,
            DType::BF16 => self.run::<half::bf16>(s, l)?,
            DType::F32 => self.run::<f32>(s, l)?,
            DType::F64 => self.run::<f64>(s, l)?,
            d => candle::bail!("nccl group: tensors of dtype {d:?} cannot be communicated"),
        };
        Ok((out, l.shape().clone()))
    }
}

impl Backend for NcclBackend {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        self.collective(Op::AllReduceSum, tensor, 0, CallTag::UNTAGGED)
    }

    fn all_reduce_sum_tagged(&self, tensor: &Tensor, tag: CallTag) -> Result<Tensor> {
        self.collective(Op::AllReduceSum, tensor, 0, tag)
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        self.collective(Op::Broadcast, tensor, root, CallTag::UNTAGGED)
    }

    fn barrier(&self) -> Result<()> {
        let Some(star) = &self.star else {
            // A split communicator: an all-reduce, and the host waits for it.
            let one = Tensor::zeros(1, DType::F32, &Device::Cuda(self.device.clone()))?;
            self.all_reduce_sum(&one)?.to_vec1::<f32>()?;
            return Ok(());
        };
        let call = Call {
            op: Op::Barrier,
            dtype: 0,
            count: 0,
            root: 0,
            flags: 0,
        };
        star.lock()
            .unwrap_or_else(|e| e.into_inner())
            .exchange(call, &[], &|_| Ok(Vec::new()))?;
        Ok(())
    }

    /// `ncclCommSplit`: this rank's subgroup gets a communicator of its own,
    /// so its collectives involve its members only.
    fn new_subgroup(&self, slot: usize, members: &[usize]) -> Option<Result<Arc<dyn Backend>>> {
        Some(
            self.split(slot, members)
                .map(|b| Arc::new(b) as Arc<dyn Backend>),
        )
    }

    fn name(&self) -> &str {
        "nccl"
    }

    fn device(&self) -> Option<Device> {
        Some(Device::Cuda(self.device.clone()))
    }
}

impl Drop for NcclBackend {
    fn drop(&mut self) {
        // Stop the watchdog first (it holds the communicator), then abort: it
        // never blocks, unlike ncclCommDestroy with work stuck in flight.
        self.watchdog.stop.store(true, Ordering::SeqCst);
        self.watchdog.tx.take();
        if let Some(t) = self.watchdog.thread.take() {
            let _ = t.join();
        }
        if !self.comm.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: the communicator is live and no other thread uses it now.
            let _ = unsafe { result::comm_abort(self.comm.comm) };
        }
    }
}
