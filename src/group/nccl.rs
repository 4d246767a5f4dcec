//! The NCCL group (feature `nccl`): one process per GPU, collectives enqueued
//! on candle's own stream of the rank's device, on device memory, without any
//! host synchronization.
//!
//! - The NCCL unique id is made by rank 0 and shared through the authenticated
//!   TCP rendezvous (the `rendezvous` and `star` modules), whose connections stay open.
//! - Every wait is bounded by [`NcclOptions::timeout`] (default 10 minutes, as
//!   PyTorch). The communicators are non-blocking (`ncclConfig_t.blocking =
//!   0`): initialization (`ncclCommInitRankConfig`), `ncclCommSplit`, the
//!   connection to the peers that NCCL makes lazily inside the first
//!   collective of each algorithm, and `ncclCommFinalize` return
//!   `ncclInProgress` and are polled against the timeout, then aborted. A
//!   watchdog thread records a CUDA event after each collective and polls it;
//!   a collective not finished within the timeout, or an asynchronous NCCL
//!   error, aborts the communicator (`ncclCommAbort`): the stuck kernels are
//!   released and the next call returns the error instead of hanging.
//! - `ncclCommAbort` frees the communicator: the handle sits behind a
//!   read–write lock (every call holds it for reading, abort and destroy take
//!   it for writing), so nothing touches it afterwards.
//! - [`Backend::barrier`] is an all-reduce whose result the host waits for, so
//!   it also orders this rank's earlier device work; dropping the group waits
//!   (within the timeout) for the work in flight, then finalizes and destroys
//!   the communicator; it aborts only after a failure or a timeout.
//! - With `SYNCBN_NCCL_DEBUG=1` (see [`DEBUG_VAR`]) every collective is first
//!   checked over the TCP connections: all ranks must make the same call
//!   (sequence number, operation, element count, dtype, [`CallTag`]), else every rank gets
//!   an error naming each rank's call. This costs a round trip per collective.
//! - [`ProcessGroup::split`](super::ProcessGroup::split) and `subgroups` give
//!   each subgroup a communicator of its own (`ncclCommSplit`) with its own
//!   watchdog, so a subgroup's collectives involve its members only. Their
//!   debug check runs on the split communicator itself (a hash of the call,
//!   all-reduced with its square: see `check_on_device`), as the rendezvous
//!   connections are the root group's.
//!
//! Real GPUs have run it with world size 1 only (docs/testing.md). In CI,
//! tests/nccl.rs runs it on the emulated GPU (four devices, an emulated NCCL
//! at least as strict as the real one: lazy connection, asynchronous
//! collectives, silence from aborted peers, use after free detected): exact
//! collective results, the layer on k ranks against one, and a rank that is
//! late at init or at a first collective, stalls, leaves, or drops its group
//! becoming an error on every other rank within the timeout (or, for a
//! drop, delivering its part). The rendezvous, id exchange and debug
//! agreement check are the TCP store's, tested on the CPU.

use super::rendezvous::Rendezvous;
use super::star::Star;
use super::wire::{dtype_code, Call, Op, FLAG_META_ONLY};
use super::StoreOptions;
use super::{Backend, CallTag};
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
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Set this environment variable to `1` to check, before each NCCL collective,
/// that all ranks agree on the call.
pub(crate) const DEBUG_VAR: &str = "SYNCBN_NCCL_DEBUG";

/// How often the watchdog looks at the pending collectives.
const WATCHDOG_POLL: Duration = Duration::from_millis(50);

/// Options of the NCCL group: [`Default`] or [`NcclOptions::from_env`], then
/// the `with_*` setters (non-exhaustive: options may be added).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
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
    /// The options with the collectives' [`timeout`](Self::timeout).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The options with the rendezvous connections' options.
    pub fn with_store(mut self, store: StoreOptions) -> Self {
        self.store = store;
        self
    }

    /// The options with the agreement checks before each collective on or off.
    pub fn with_debug_checks(mut self, debug_checks: bool) -> Self {
        self.debug_checks = debug_checks;
        self
    }

    /// The defaults, with `SYNCBN_TIMEOUT` (seconds) and `SYNCBN_NCCL_DEBUG` applied.
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

/// A communicator handle; `Send` and `Sync` because [`Comm`] serializes what
/// NCCL requires to be serialized.
struct Handle(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread; `Comm` keeps
// every use under its read lock and frees it under its write lock.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

/// The `ncclConfig_t` of every communicator here: non-blocking, so that no
/// NCCL call (initialization, split, the lazy connection inside a first
/// collective, finalization) waits on the host without a deadline; each
/// returns `ncclInProgress` and is polled against the timeout instead. The
/// other fields are `NCCL_CONFIG_UNDEF_*`, as `NCCL_CONFIG_INITIALIZER` sets
/// them.
fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF: std::ffi::c_int = std::ffi::c_int::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        // NCCL_VERSION(2, 30, 0): the header version cudarc's bindings follow.
        version: 23000,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// How long a poll of a non-blocking NCCL call sleeps at most.
const MAX_POLL_SLEEP: Duration = Duration::from_millis(2);

/// The raw communicator, shared with the watchdog.
///
/// `ncclCommAbort` and `ncclCommDestroy` free the communicator, so the
/// handle sits behind a read–write lock: every NCCL call with it (enqueues,
/// state queries, polls) holds the read lock, and freeing it takes the write
/// lock and leaves `None`. Since the communicator is non-blocking, no call
/// holds the read lock for long (nor across a poll), and an abort gets the
/// write lock promptly.
struct Comm {
    handle: RwLock<Option<Handle>>,
    failure: Mutex<Option<String>>,
    /// The communicators of this one's non-blocking `ncclCommSplit`s still
    /// in progress: they read this one, so an abort aborts them first
    /// (NCCL's way to abandon a split) before it frees this one. A split
    /// registers its child under the read lock of `handle`, so once an abort
    /// has taken the handle, the list is complete.
    splits: Mutex<Vec<Arc<Comm>>>,
    /// Serializes this rank's operations on the communicator (a call and the
    /// polls until it completes): NCCL calls on one communicator must not
    /// overlap, and a non-blocking one must be complete before the next.
    op: Mutex<()>,
    rank: usize,
}

impl Comm {
    fn new(raw: sys::ncclComm_t, rank: usize) -> Self {
        Self {
            handle: RwLock::new(Some(Handle(raw))),
            failure: Mutex::new(None),
            splits: Mutex::new(Vec::new()),
            op: Mutex::new(()),
            rank,
        }
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn usable(&self) -> Result<()> {
        match self.failure() {
            Some(f) => candle::bail!("nccl group is unusable after an earlier failure: {f}"),
            None => Ok(()),
        }
    }

    /// Takes the communicator out of its lock, once every call in flight
    /// with it has returned (the write lock); `None` once it was taken.
    fn take_handle(&self) -> Option<Handle> {
        self.handle
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Records `msg` (the first failure wins) and aborts (frees) the
    /// communicator once, after every call in flight with it has returned
    /// and every split from it still in progress was aborted.
    fn abort(&self, msg: String) {
        {
            let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
            if f.is_none() {
                *f = Some(msg.clone());
            }
        }
        if let Some(h) = self.take_handle() {
            let splits =
                std::mem::take(&mut *self.splits.lock().unwrap_or_else(|e| e.into_inner()));
            for child in splits {
                child.abort(format!(
                    "nccl group: rank {}: ncclCommSplit was abandoned: the communicator it splits was aborted ({msg})",
                    self.rank
                ));
            }
            // SAFETY: `h` is live, taken out of the lock, and no split reads
            // it any more: nothing uses it after this.
            let _ = unsafe { result::comm_abort(h.0) };
        }
    }

    /// Runs `f` with the communicator under the read lock; an error once it
    /// was freed.
    fn with<R>(&self, f: impl FnOnce(sys::ncclComm_t) -> R) -> Result<R> {
        let guard = self.handle.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(h) => Ok(f(h.0)),
            None => match self.failure() {
                Some(f) => candle::bail!("nccl group is unusable after an earlier failure: {f}"),
                None => candle::bail!("nccl group: the communicator was closed"),
            },
        }
    }

    /// The communicator's state (`ncclCommGetAsyncError`): `None` once it
    /// was freed.
    fn state(&self) -> Option<sys::ncclResult_t> {
        self.with(|comm| {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is live (read lock held); `state` is written.
            let r = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
            if r == sys::ncclResult_t::ncclSuccess {
                state
            } else {
                r
            }
        })
        .ok()
    }

    /// Polls the communicator until its non-blocking call `what` completes;
    /// past `deadline`, or on an error, aborts it and fails.
    fn wait_ready(&self, what: &str, deadline: Instant, timeout: Duration) -> Result<()> {
        let mut sleep = Duration::from_micros(20);
        loop {
            match self.state() {
                None => return self.usable().and_then(|()| self.with(|_| ())),
                Some(sys::ncclResult_t::ncclSuccess) => return Ok(()),
                Some(sys::ncclResult_t::ncclInProgress) => {}
                Some(e) => {
                    let msg = format!(
                        "nccl group: rank {}: {what} failed: {e:?}; the communicator was aborted",
                        self.rank
                    );
                    self.abort(msg.clone());
                    candle::bail!("{msg}")
                }
            }
            if Instant::now() >= deadline {
                let msg = format!(
                    "nccl group: rank {}: {what} did not complete within {timeout:?} (a rank is late, died, or made a different call); the communicator was aborted",
                    self.rank
                );
                self.abort(msg.clone());
                candle::bail!("{msg}")
            }
            std::thread::sleep(sleep);
            sleep = (sleep * 2).min(MAX_POLL_SLEEP);
        }
    }

    /// Makes one NCCL call with the communicator, then polls it to completion
    /// within `timeout` (a first collective connects to the peers here).
    fn call(
        &self,
        what: &str,
        timeout: Duration,
        f: impl FnOnce(sys::ncclComm_t) -> std::result::Result<result::NcclStatus, result::NcclError>,
    ) -> Result<()> {
        let _op = self.op.lock().unwrap_or_else(|e| e.into_inner());
        self.usable()?;
        let deadline = Instant::now() + timeout;
        match self.with(f)? {
            Ok(result::NcclStatus::Success) => Ok(()),
            Ok(_) => self.wait_ready(what, deadline, timeout),
            Err(e) => {
                let err = nccl_err(what, e);
                self.abort(err.to_string());
                Err(err)
            }
        }
    }

    /// Closes the communicator: `ncclCommFinalize` polled until `deadline`,
    /// then `ncclCommDestroy`; an abort instead after a failure, or when the
    /// finalization does not complete in time.
    fn close(&self, deadline: Instant, timeout: Duration) {
        if self.failure().is_some() {
            self.abort(String::from("nccl group: closed after a failure"));
            return;
        }
        {
            let _op = self.op.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: the communicator is live (read lock held).
            let r = self.with(|comm| unsafe { result::comm_finalize(comm) });
            let finalized = match r {
                Ok(Ok(result::NcclStatus::Success)) => true,
                Ok(Ok(_)) => self
                    .wait_ready("ncclCommFinalize", deadline, timeout)
                    .is_ok(),
                _ => false,
            };
            if !finalized {
                drop(_op);
                self.abort(String::from(
                    "nccl group: ncclCommFinalize failed or did not complete in time",
                ));
                return;
            }
        }
        if let Some(h) = self.take_handle() {
            // SAFETY: `h` is live, finalized, and taken out of the lock.
            let _ = unsafe { result::comm_destroy(h.0) };
        }
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
                    let state = match comm.state() {
                        // Freed (aborted or closed): nothing to watch.
                        None => {
                            pending.clear();
                            continue;
                        }
                        Some(state) => state,
                    };
                    if !matches!(
                        state,
                        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
                    ) {
                        comm.abort(format!(
                            "nccl group: rank {rank}: asynchronous NCCL error {state:?} (a peer failed?); the communicator was aborted"
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
    /// The TCP connections of the rendezvous, for the debug checks; `None`
    /// for a communicator split off another.
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
    /// the TCP rendezvous, the unique id from rank 0, then a non-blocking
    /// `ncclCommInitRankConfig`, polled until every rank has joined: past
    /// [`NcclOptions::timeout`] (a rank late or dead at init) it is an error.
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
        // Non-blocking, so that a late or dead peer is an error within the
        // timeout here, not a hang.
        let mut config = nonblocking_config();
        let mut raw: sys::ncclComm_t = std::ptr::null_mut();
        let what = "ncclCommInitRankConfig";
        // SAFETY: `raw` and `config` outlive the call; `raw` is written.
        let status = unsafe {
            sys::ncclCommInitRankConfig(
                &mut raw,
                rv.world_size as std::ffi::c_int,
                id,
                rv.rank as std::ffi::c_int,
                &mut config,
            )
        }
        .result();
        if let Err(e) = status {
            if !raw.is_null() {
                // SAFETY: a communicator NCCL made, used by nothing else.
                let _ = unsafe { result::comm_abort(raw) };
            }
            return Err(nccl_err(what, e));
        }
        let comm = Arc::new(Comm::new(raw, rv.rank));
        comm.wait_ready(what, Instant::now() + options.timeout, options.timeout)?;
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
    /// of this group calls. It has its own watchdog and timeout; its debug
    /// checks run on the new communicator (`check_on_device`).
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
        let timeout = self.options.timeout;
        let what = "ncclCommSplit";
        let split = || -> Result<Arc<Comm>> {
            // No other call on the parent until the split is complete (the
            // watchdog's abort does not wait for this).
            let _op = self.comm.op.lock().unwrap_or_else(|e| e.into_inner());
            self.comm.usable()?;
            let deadline = Instant::now() + timeout;
            let child = {
                // The parent is locked for reading only for the call: a
                // non-blocking split goes on reading it, so the child is
                // registered with it before the lock goes, and an abort of
                // the parent (the watchdog's, at any time) aborts the child
                // first instead of waiting for the poll below.
                let parent = self.comm.handle.read().unwrap_or_else(|e| e.into_inner());
                let Some(parent) = parent.as_ref() else {
                    return self
                        .comm
                        .usable()
                        .and_then(|()| candle::bail!("nccl group: the communicator was closed"));
                };
                let mut config = nonblocking_config();
                let mut raw: sys::ncclComm_t = std::ptr::null_mut();
                // SAFETY: the parent is live (read lock held); `raw` and
                // `config` outlive the call.
                let status = unsafe {
                    sys::ncclCommSplit(
                        parent.0,
                        color,
                        key as std::ffi::c_int,
                        &mut raw,
                        &mut config,
                    )
                }
                .result();
                let child = match status {
                    Ok(_) if !raw.is_null() => Arc::new(Comm::new(raw, self.rank)),
                    Ok(_) => {
                        candle::bail!("nccl group: {what} gave rank {} no communicator", self.rank)
                    }
                    Err(e) => return Err(nccl_err(what, e)),
                };
                self.comm
                    .splits
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(child.clone());
                child
            };
            // No lock of the parent's held while polling. The child aborts
            // itself when it fails here.
            let ready = child.wait_ready(what, deadline, timeout);
            self.comm
                .splits
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|c| !Arc::ptr_eq(c, &child));
            // An abort of the parent just after the split completed aborted
            // the child too.
            ready.and_then(|()| child.usable()).map(|()| child)
        };
        let comm = split().inspect_err(|e| {
            // The parent's ranks are out of step now: it fails too.
            self.comm.abort(format!("nccl group: {e}"));
        })?;
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
        if !self.options.debug_checks || self.world_size == 1 {
            return Ok(());
        }
        let Some(star) = &self.star else {
            return self.check_on_device(call, tag);
        };
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
                crate::error::keep_kind(&e, msg)
            })
    }

    /// One collective: `op`, and for an all-reduce with `mean`, NCCL's
    /// `ncclAvg` instead of `ncclSum` (the division folded into the
    /// reduction; the debug check tells it apart by [`CallTag::MEAN`]).
    fn collective(
        &self,
        op: Op,
        mean: bool,
        tensor: &Tensor,
        root: usize,
        tag: CallTag,
    ) -> Result<Tensor> {
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
        nccl_dtype(tensor.dtype())?;
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        self.check(
            Call {
                op,
                dtype: dtype_code(tensor.dtype()),
                count: tensor.elem_count() as u64,
                root: root as u32,
                flags: 0,
            },
            if mean { CallTag::MEAN } else { tag },
        )?;
        if tensor.elem_count() == 0 {
            return Ok(tensor.clone());
        }
        let what = match op {
            Op::AllReduceSum => format!(
                "collective #{seq} (all_reduce_{} of {} {:?})",
                if mean { "mean" } else { "sum" },
                tensor.elem_count(),
                tensor.dtype()
            ),
            _ => format!(
                "collective #{seq} (broadcast from rank {root} of {} {:?})",
                tensor.elem_count(),
                tensor.dtype()
            ),
        };
        self.run_collective(op, mean, tensor, root, what)
    }

    /// The debug check of a split communicator, which has no rendezvous
    /// connections of its own: every rank all-reduces, on the communicator
    /// itself, three 20-bit chunks `h` of a hash of its call (sequence
    /// number, operation, dtype, count, root) and their squares. The calls
    /// agree iff `n·Σh² = (Σh)²` for every chunk (equality in Cauchy–Schwarz),
    /// up to hash collisions; the sums are exact in i64. Ranks that differ
    /// in whether they make a call at all leave the check's own all-reduce
    /// unmatched, which the watchdog turns into an error within the timeout.
    /// It costs a host wait per collective (debug mode only).
    fn check_on_device(&self, call: Call, tag: CallTag) -> Result<()> {
        let seq = self.seq.load(Ordering::SeqCst).wrapping_sub(1);
        let text = format!("{seq} {call:?} {}", tag.value());
        // FNV-1a, 64 bits.
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let chunks: Vec<i64> = (0..3)
            .map(|i| ((hash >> (20 * i)) & 0xf_ffff) as i64)
            .collect();
        let squares = chunks.iter().map(|c| c * c);
        let values: Vec<i64> = chunks.iter().copied().chain(squares).collect();
        let t = Tensor::from_vec(values, 6, &Device::Cuda(self.device.clone()))?;
        let sums = self
            .run_collective(
                Op::AllReduceSum,
                false,
                &t,
                0,
                format!("the debug check of collective #{seq}"),
            )?
            .to_vec1::<i64>()?;
        // An abort releases the wait with undefined values.
        self.comm.usable()?;
        let n = self.world_size as i64;
        if (0..3).all(|i| n * sums[3 + i] == sums[i] * sums[i]) {
            return Ok(());
        }
        let msg = format!(
            "nccl group (debug check): rank {} of a subgroup of {}: the ranks' calls #{seq} differ (this rank: {call} for {tag}); the communicator was aborted",
            self.rank, self.world_size
        );
        self.comm.abort(msg.clone());
        crate::error::bail_kind!(crate::error::ErrorKind::RanksDisagree, "{msg}")
    }

    /// Enqueues one collective (no checks) and hands its event to the watchdog.
    fn run_collective(
        &self,
        op: Op,
        mean: bool,
        tensor: &Tensor,
        root: usize,
        what: String,
    ) -> Result<Tensor> {
        let ty = nccl_dtype(tensor.dtype())?;
        let t = tensor.contiguous()?;
        let out = t.apply_op1_no_bwd(&NcclOp {
            backend: self,
            op,
            mean,
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
    /// An all-reduce with `ncclAvg` (else `ncclSum`).
    mean: bool,
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
            let red = if self.mean {
                sys::ncclRedOp_t::ncclAvg
            } else {
                sys::ncclRedOp_t::ncclSum
            };
            b.comm.call(&self.what, b.options.timeout, |comm| unsafe {
                // SAFETY: both buffers hold `n` elements of `ty` on this stream's device.
                match op {
                    Op::AllReduceSum => result::all_reduce(
                        sp as *const std::ffi::c_void,
                        dp as *mut std::ffi::c_void,
                        n,
                        ty,
                        red,
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
        self.collective(Op::AllReduceSum, false, tensor, 0, CallTag::UNTAGGED)
    }

    /// `ncclAvg`: the division by the world size is part of the reduction
    /// (NCCL ≥ 2.10), no pass of its own.
    fn all_reduce_mean(&self, tensor: &Tensor) -> Result<Tensor> {
        super::mean_dtype_check(tensor, self.rank)?;
        self.collective(Op::AllReduceSum, true, tensor, 0, CallTag::UNTAGGED)
    }

    fn all_reduce_sum_tagged(&self, tensor: &Tensor, tag: CallTag) -> Result<Tensor> {
        self.collective(Op::AllReduceSum, false, tensor, 0, tag)
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        self.collective(Op::Broadcast, false, tensor, root, CallTag::UNTAGGED)
    }

    /// An all-reduce of one value on the communicator, and the host waits
    /// for it: it returns when every rank has called it *and* the device
    /// work this rank enqueued before it (its earlier collectives included)
    /// is done, so that "collective; barrier; drop" loses nothing.
    fn barrier(&self) -> Result<()> {
        let one = Tensor::ones(1, DType::F32, &Device::Cuda(self.device.clone()))?;
        let sum = self.all_reduce_sum(&one)?.to_vec1::<f32>()?;
        // An abort releases the wait with an undefined result.
        self.comm.usable()?;
        if sum.first() != Some(&(self.world_size as f32)) {
            candle::bail!(
                "nccl group: barrier: rank {} expected {} ranks, the all-reduce gave {sum:?}",
                self.rank,
                self.world_size
            )
        }
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

impl NcclBackend {
    /// Waits until the work enqueued so far on the stream (the last
    /// collective included) is done, or `deadline`, or a failure; whether
    /// it is done.
    fn drain(&self, deadline: Instant) -> bool {
        if self.stream.context().bind_to_thread().is_err() {
            return false;
        }
        let Ok(event) = self.stream.record_event(None) else {
            return false;
        };
        let mut sleep = Duration::from_micros(20);
        loop {
            match event.try_is_complete() {
                Ok(true) => return true,
                Ok(false) if Instant::now() < deadline && self.comm.failure().is_none() => {
                    std::thread::sleep(sleep);
                    sleep = (sleep * 2).min(MAX_POLL_SLEEP);
                }
                _ => return false,
            }
        }
    }
}

impl Drop for NcclBackend {
    /// Lets this rank's part of the collectives in flight finish (within the
    /// timeout; the watchdog still runs), then finalizes and destroys the
    /// communicator; aborts it only after a failure or when the work or the
    /// finalization does not finish in time.
    fn drop(&mut self) {
        let timeout = self.options.timeout;
        let deadline = Instant::now() + timeout;
        let drained = self.comm.failure().is_none() && self.drain(deadline);
        self.watchdog.stop.store(true, Ordering::SeqCst);
        self.watchdog.tx.take();
        if let Some(t) = self.watchdog.thread.take() {
            let _ = t.join();
        }
        if drained {
            self.comm.close(deadline, timeout);
        } else {
            self.comm.abort(format!(
                "nccl group: rank {}: dropped with work not finished within {timeout:?}",
                self.rank
            ));
        }
    }
}
