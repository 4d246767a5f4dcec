//! The MPI group (feature `mpi`): one process per rank, started by an MPI
//! launcher (`mpirun`, `srun --mpi=pmix`), communicating through the MPI
//! library the cluster already has (shared memory within a node, its
//! interconnect across nodes). No `MASTER_ADDR`, port or token: MPI knows
//! the job.
//!
//! MPI's own collectives check nothing and cannot fail gracefully, so the
//! group adds the contract of the crate's other groups:
//!
//! - Before each payload, the ranks all-gather a fixed-size header (sequence
//!   number, operation, dtype, element count, root, [`CallTag`]; see the
//!   `header` module) and every rank compares them: ranks that make
//!   different calls (another layer, count, dtype or order) all get an
//!   [`ErrorKind::RanksDisagree`] error naming both calls, and no payload is
//!   exchanged (MPI would corrupt memory). The group is unusable afterwards.
//! - Every collective (header and payload) is non-blocking and polled
//!   against the timeout ([`StoreOptions::timeout`], `SYNCBN_TIMEOUT`). Past
//!   it, a peer is stalled, dead or elsewhere: the rank prints which call of
//!   which layer timed out and ends the job with `MPI_Abort` (MPI offers no
//!   way to cancel a collective and carry on). A rank that dies makes the
//!   launcher end the job.
//! - All-reduces smaller than [`StoreOptions::ring_min_bytes`] (the layers'
//!   statistics) all-gather every rank's values and sum them in f64 in rank
//!   order, rounded once: bit for bit the TCP group's result. Larger ones
//!   (gradients) are `MPI_Iallreduce` sums in the tensor's dtype (f32 for
//!   bf16 and f16, which MPI lacks). Rank 0's threshold holds for every rank.
//! - [`ProcessGroup::split`](super::ProcessGroup::split) gives each subgroup
//!   a communicator of its own (`MPI_Comm_split`).
//! - Tensors on any device work; they are staged through host memory.
//!
//! MPI is initialized by the first group and finalized when the last is
//! dropped or at exit (see the `runtime` module).

mod header;
mod runtime;

use super::rendezvous::Rendezvous;
use super::tcp::{sum_in_rank_order, tensor_from_bytes, tensor_to_bytes};
use super::wire::{dtype_code, Call, Op};
use super::{Backend, CallTag, StoreOptions};
use crate::error::{bail_kind, ErrorKind};
use candle::{DType, Device, Result, Storage, Tensor};
use header::Header;
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::datatype::Equivalence;
use mpi::request::{LocalScope, Request};
use mpi::topology::{Color, Communicator, SimpleCommunicator};
use runtime::Runtime;
use std::fmt;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The options of the MPI group: the collectives' timeout and the size from
/// which all-reduces run as MPI all-reduces ([`StoreOptions::ring_min_bytes`]);
/// the other fields are the TCP group's.
pub type MpiOptions = StoreOptions;

/// The most elements one MPI call moves (MPI counts are C `int`s): larger
/// payloads go in several calls.
const MAX_CHUNK: usize = 1 << 30;

/// How long a rank polls a collective without sleeping (a collective of
/// ranks that are in step completes within it), and the longest sleep
/// between polls afterwards.
const SPIN: Duration = Duration::from_millis(20);
const MAX_POLL_SLEEP: Duration = Duration::from_millis(2);

/// A communicator, usable from any thread.
struct Comm {
    raw: ManuallyDrop<SimpleCommunicator>,
    /// Keeps MPI initialized while the communicator lives.
    runtime: Arc<Runtime>,
}

// SAFETY: a `SimpleCommunicator` is a handle (an `MPI_Comm`) into the MPI
// library's tables, which rsmpi leaves `!Send + !Sync` because it cannot know
// the thread level MPI was initialized with. `Runtime::get` made sure it is
// `MPI_THREAD_MULTIPLE` (any thread may call MPI at any time) or
// `MPI_THREAD_SERIALIZED`, under which every MPI call of this module runs
// under `Runtime::call`'s process-wide lock, so no two calls overlap. The
// order of the collectives on one communicator is kept by `MpiBackend::state`,
// held for a whole collective.
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

impl Drop for Comm {
    fn drop(&mut self) {
        // A communicator split off the world is freed (`MPI_Comm_free`),
        // unless MPI was finalized already (an exit hook that ran first):
        // then it is only forgotten.
        if !runtime::finalized() {
            // SAFETY: dropped once, here; never used again.
            let raw = unsafe { ManuallyDrop::take(&mut self.raw) };
            self.runtime.call(|| drop(raw));
        }
    }
}

/// The backend of [`ProcessGroup::mpi`](super::ProcessGroup::mpi).
pub struct MpiBackend {
    rank: usize,
    world_size: usize,
    options: MpiOptions,
    /// Held for a whole collective: this group's calls never interleave.
    state: Mutex<State>,
    comm: Comm,
}

struct State {
    /// The next collective's sequence number.
    seq: u64,
    /// The first failure (a disagreement): every later call fails with it.
    failure: Option<String>,
}

impl fmt::Debug for MpiBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MpiBackend")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

/// A float type MPI sums natively.
trait Summable: Equivalence + Copy + Default + candle::WithDType {}
impl Summable for f32 {}
impl Summable for f64 {}

impl MpiBackend {
    /// Joins the group of all ranks of the MPI job (`MPI_COMM_WORLD`),
    /// initializing MPI on first use. Every rank calls it; it returns once
    /// all have (within `options.rendezvous_timeout`, else the job ends).
    pub fn world(options: MpiOptions) -> Result<Self> {
        options.validate()?;
        let runtime = Runtime::get()?;
        let (rank, world_size) = runtime::world_rank_and_size(&runtime);
        let backend = Self {
            rank,
            world_size,
            options,
            state: Mutex::new(State {
                seq: 0,
                failure: None,
            }),
            comm: Comm {
                raw: ManuallyDrop::new(SimpleCommunicator::world()),
                runtime,
            },
        };
        backend.agree_on_threshold(options.rendezvous_timeout)
    }

    /// Takes rank 0's [`StoreOptions::ring_min_bytes`] on every rank (so
    /// that all pick the same algorithm for an all-reduce); the first
    /// collective, so that it also waits for every rank to start.
    fn agree_on_threshold(mut self, timeout: Duration) -> Result<Self> {
        let mine = [self.options.ring_min_bytes];
        let mut all = vec![0u64; self.world_size];
        let what = "mpi group: the group's setup (every rank joins it)";
        let deadline = Instant::now() + timeout;
        mpi::request::scope(|scope| {
            let req = self.comm.runtime.call(|| {
                self.comm
                    .raw
                    .immediate_all_gather_into(scope, &mine[..], &mut all[..])
            });
            self.wait(req, deadline, timeout, what);
        });
        self.options.ring_min_bytes = all[0];
        Ok(self)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Polls `req` until it completes; past `deadline`, prints what timed
    /// out and ends the job ([`Runtime::abort`]).
    fn wait<'a, D: ?Sized>(
        &self,
        mut req: Request<'a, D, &LocalScope<'a>>,
        deadline: Instant,
        timeout: Duration,
        what: &str,
    ) {
        let start = Instant::now();
        let mut sleep = Duration::from_micros(20);
        loop {
            match self.comm.runtime.call(|| req.test()) {
                Ok(_) => return,
                Err(r) => req = r,
            }
            let now = Instant::now();
            if now >= deadline {
                self.comm.runtime.abort(&format!(
                    "{what} did not complete within {timeout:?} on rank {} of {}: another rank is stalled, died, or never made this call",
                    self.rank, self.world_size
                ));
            }
            if now - start < SPIN {
                std::thread::yield_now();
            } else {
                std::thread::sleep(sleep.min(deadline - now));
                sleep = (sleep * 2).min(MAX_POLL_SLEEP);
            }
        }
    }

    /// The header check of `header` (see the `header` module); a
    /// disagreement poisons the group on every rank alike.
    fn check(&self, state: &mut State, header: &Header, what: &str) -> Result<()> {
        let mine = header.encode();
        let mut all = vec![0u64; header::WORDS * self.world_size];
        let deadline = Instant::now() + self.options.timeout;
        mpi::request::scope(|scope| {
            let req = self.comm.runtime.call(|| {
                self.comm
                    .raw
                    .immediate_all_gather_into(scope, &mine[..], &mut all[..])
            });
            self.wait(
                req,
                deadline,
                self.options.timeout,
                &format!("{what} (the agreement check before it)"),
            );
        });
        header::check(header, &all, self.rank, self.world_size).or_else(|msg| {
            state.failure = Some(msg.clone());
            bail_kind!(ErrorKind::RanksDisagree, "{msg}")
        })
    }

    /// The description of the collective `op` of `tensor` (with `root`).
    fn call(op: Op, tensor: &Tensor, root: usize) -> Call {
        Call {
            op,
            dtype: dtype_code(tensor.dtype()),
            count: tensor.elem_count() as u64,
            root: root as u32,
            flags: 0,
        }
    }

    /// Starts a collective: the group is usable, the call gets its sequence
    /// number and its description for messages.
    fn begin(&self, state: &mut State, call: Call, tag: CallTag) -> Result<(Header, String)> {
        if let Some(f) = &state.failure {
            candle::bail!("mpi group is unusable after an earlier failure: {f}")
        }
        let header = Header {
            seq: state.seq,
            call,
            tag,
        };
        state.seq += 1;
        let what = format!("mpi group: {header}");
        Ok((header, what))
    }

    /// The sum of `values` over the ranks (`MPI_Iallreduce`, in chunks).
    fn all_reduce<T: Summable>(&self, values: &[T], what: &str) -> Vec<T> {
        let mut out = vec![T::default(); values.len()];
        let deadline = Instant::now() + self.options.timeout;
        for (send, recv) in values.chunks(MAX_CHUNK).zip(out.chunks_mut(MAX_CHUNK)) {
            mpi::request::scope(|scope| {
                let req = self.comm.runtime.call(|| {
                    self.comm.raw.immediate_all_reduce_into(
                        scope,
                        send,
                        recv,
                        SystemOperation::sum(),
                    )
                });
                self.wait(req, deadline, self.options.timeout, what);
            });
        }
        out
    }

    /// The sum over the ranks of `values`, a contiguous CPU tensor of `T`,
    /// read in place.
    fn all_reduce_tensor<T: Summable>(&self, values: &Tensor, what: &str) -> Result<Vec<T>> {
        let (storage, layout) = values.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(cpu), Some((start, end))) => {
                Ok(self.all_reduce(&cpu.as_slice::<T>()?[start..end], what))
            }
            _ => candle::bail!(
                "mpi group: rank {}: internal error: the values of {what} are not in contiguous host memory",
                self.rank
            ),
        }
    }

    /// Every rank's `bytes` (all of one length), rank by rank.
    fn all_gather(&self, bytes: &[u8], what: &str) -> Vec<Vec<u8>> {
        let mut all = vec![0u8; bytes.len() * self.world_size];
        let deadline = Instant::now() + self.options.timeout;
        // One chunk of every rank per call: each call's receive buffer
        // holds `world_size` chunks, rank by rank.
        let chunk = (MAX_CHUNK / self.world_size).max(1);
        let mut parts: Vec<Vec<u8>> = vec![Vec::with_capacity(bytes.len()); self.world_size];
        for send in bytes.chunks(chunk) {
            let recv = &mut all[..send.len() * self.world_size];
            mpi::request::scope(|scope| {
                let req = self.comm.runtime.call(|| {
                    self.comm
                        .raw
                        .immediate_all_gather_into(scope, send, &mut recv[..])
                });
                self.wait(req, deadline, self.options.timeout, what);
            });
            for (part, got) in parts.iter_mut().zip(recv.chunks_exact(send.len())) {
                part.extend_from_slice(got);
            }
        }
        parts
    }

    /// `root`'s `bytes` on every rank (`MPI_Ibcast`, in chunks); `bytes`
    /// has the payload's length on every rank.
    fn broadcast_bytes(&self, bytes: &mut [u8], root: usize, what: &str) {
        let deadline = Instant::now() + self.options.timeout;
        let root = self.comm.raw.process_at_rank(root as i32);
        for chunk in bytes.chunks_mut(MAX_CHUNK) {
            mpi::request::scope(|scope| {
                let req = self
                    .comm
                    .runtime
                    .call(|| root.immediate_broadcast_into(scope, chunk));
                self.wait(req, deadline, self.options.timeout, what);
            });
        }
    }

    /// The all-reduce sum (or, with `mean`, the sum of an
    /// [`Backend::all_reduce_mean`], told apart by [`CallTag::MEAN`]).
    fn sum(&self, tensor: &Tensor, tag: CallTag, mean: bool) -> Result<Tensor> {
        let dtype = tensor.dtype();
        if !dtype.is_float() || dtype_code(dtype) == 255 {
            bail_kind!(
                ErrorKind::BadInput,
                "mpi group: rank {}: all_reduce_sum expects an f32, f64, bf16 or f16 tensor, got {dtype:?}",
                self.rank
            )
        }
        let call = Self::call(Op::AllReduceSum, tensor, 0);
        let tag = if mean { CallTag::MEAN } else { tag };
        let nbytes = (tensor.elem_count() * dtype.size_in_bytes()) as u64;
        let small = nbytes < self.options.ring_min_bytes;
        // The values are read before the check: a local failure here must
        // not leave the other ranks waiting for this rank's payload.
        let bytes = if small {
            tensor_to_bytes(tensor)?
        } else {
            Vec::new()
        };
        // Large sums read the values where a contiguous CPU tensor of f32
        // or f64 keeps them; others are copied (to f32 for bf16 and f16).
        let large = if small {
            None
        } else {
            let wide = if dtype == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
            Some(
                tensor
                    .to_device(&Device::Cpu)?
                    .to_dtype(wide)?
                    .contiguous()?,
            )
        };
        let mut state = self.state();
        let (header, what) = self.begin(&mut state, call, tag)?;
        self.check(&mut state, &header, &what)?;
        if tensor.elem_count() == 0 {
            return Ok(tensor.clone());
        }
        let summed = match large {
            None => {
                let parts = self.all_gather(&bytes, &what);
                let sum = sum_in_rank_order(&parts, dtype).map_err(candle::Error::Msg)?;
                return tensor_from_bytes(&sum, dtype, tensor.shape(), tensor.device());
            }
            Some(values) if values.dtype() == DType::F64 => Tensor::from_vec(
                self.all_reduce_tensor::<f64>(&values, &what)?,
                tensor.shape(),
                &Device::Cpu,
            )?,
            Some(values) => Tensor::from_vec(
                self.all_reduce_tensor::<f32>(&values, &what)?,
                tensor.shape(),
                &Device::Cpu,
            )?,
        };
        summed.to_dtype(dtype)?.to_device(tensor.device())
    }

    /// The group of this rank's subgroup (`slot`, with the group ranks
    /// `members`): `MPI_Comm_split`, which every rank of this group calls.
    ///
    /// `MPI_Comm_split` blocks: it runs right after the exchange of the
    /// colors (a collective of this group, polled against the timeout), so
    /// every rank has reached it; a rank that dies in between ends the job.
    fn split(&self, slot: usize, members: &[usize]) -> Result<MpiBackend> {
        let key = members
            .iter()
            .position(|&r| r == self.rank)
            .ok_or_else(|| {
                candle::Error::Msg(format!(
                    "mpi group: rank {} is not among the members {members:?} of its subgroup",
                    self.rank
                ))
            })?;
        let color = i32::try_from(slot).map_err(|_| {
            candle::Error::Msg(format!("mpi group: subgroup {slot} is out of MPI's range"))
        })?;
        let state = self.state();
        if let Some(f) = &state.failure {
            candle::bail!("mpi group is unusable after an earlier failure: {f}")
        }
        let raw = self.comm.runtime.call(|| {
            self.comm
                .raw
                .split_by_color_with_key(Color::with_value(color), key as i32)
        });
        drop(state);
        let Some(raw) = raw else {
            candle::bail!(
                "mpi group: MPI_Comm_split gave rank {} no communicator for subgroup {slot}",
                self.rank
            )
        };
        let comm = Comm {
            raw: ManuallyDrop::new(raw),
            runtime: self.comm.runtime.clone(),
        };
        let (rank, size) = self
            .comm
            .runtime
            .call(|| (comm.raw.rank() as usize, comm.raw.size() as usize));
        if (rank, size) != (key, members.len()) {
            candle::bail!(
                "mpi group: MPI_Comm_split made rank {} rank {rank} of {size} in subgroup {slot}, expected rank {key} of {}",
                self.rank,
                members.len()
            )
        }
        Ok(MpiBackend {
            rank,
            world_size: size,
            options: self.options,
            state: Mutex::new(State {
                seq: 0,
                failure: None,
            }),
            comm,
        })
    }
}

impl Backend for MpiBackend {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        self.sum(tensor, CallTag::UNTAGGED, false)
    }

    fn all_reduce_sum_tagged(&self, tensor: &Tensor, tag: CallTag) -> Result<Tensor> {
        self.sum(tensor, tag, false)
    }

    fn all_reduce_mean(&self, tensor: &Tensor) -> Result<Tensor> {
        super::mean_dtype_check(tensor, self.rank)?;
        self.sum(tensor, CallTag::UNTAGGED, true)?
            .affine(1.0 / self.world_size as f64, 0.0)
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        let dtype = tensor.dtype();
        if dtype_code(dtype) == 255 {
            bail_kind!(
                ErrorKind::BadInput,
                "mpi group: rank {}: tensors of dtype {dtype:?} cannot be communicated",
                self.rank
            )
        }
        if root >= self.world_size {
            bail_kind!(
                ErrorKind::BadInput,
                "mpi group: broadcast: root rank {root} is out of range for a group of world size {}",
                self.world_size
            )
        }
        let call = Self::call(Op::Broadcast, tensor, root);
        let mut bytes = if self.rank == root {
            tensor_to_bytes(tensor)?
        } else {
            vec![0u8; tensor.elem_count() * dtype.size_in_bytes()]
        };
        let mut state = self.state();
        let (header, what) = self.begin(&mut state, call, CallTag::UNTAGGED)?;
        self.check(&mut state, &header, &what)?;
        if !bytes.is_empty() {
            self.broadcast_bytes(&mut bytes, root, &what);
        }
        tensor_from_bytes(&bytes, dtype, tensor.shape(), tensor.device())
    }

    /// The header check alone: its all-gather completes on a rank only once
    /// every rank has joined it.
    fn barrier(&self) -> Result<()> {
        let call = Call {
            op: Op::Barrier,
            dtype: 0,
            count: 0,
            root: 0,
            flags: 0,
        };
        let mut state = self.state();
        let (header, what) = self.begin(&mut state, call, CallTag::UNTAGGED)?;
        self.check(&mut state, &header, &what)
    }

    /// `MPI_Comm_split`: this rank's subgroup gets a communicator of its own.
    fn new_subgroup(&self, slot: usize, members: &[usize]) -> Option<Result<Arc<dyn Backend>>> {
        Some(
            self.split(slot, members)
                .map(|b| Arc::new(b) as Arc<dyn Backend>),
        )
    }

    fn name(&self) -> &str {
        "mpi"
    }
}

/// This rank's [`Rendezvous`] as MPI describes it (rank, world size, and
/// the rank and rank count on this node, from `MPI_Comm_split_type`), for
/// [`Rank::from_env`](crate::Rank::from_env): no address, port or token.
///
/// A collective of the world group, right after its setup: every rank
/// calls it.
pub(crate) fn rendezvous(world: &MpiBackend) -> Result<Rendezvous> {
    let node = world
        .comm
        .runtime
        .call(|| world.comm.raw.split_shared(world.rank as i32));
    let (local_rank, local_size) = world
        .comm
        .runtime
        .call(|| (node.rank() as usize, node.size() as usize));
    world.comm.runtime.call(|| drop(node));
    Ok(Rendezvous::from_mpi(
        world.rank,
        world.world_size,
        local_rank,
        local_size,
    ))
}
