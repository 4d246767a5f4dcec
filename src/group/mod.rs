//! Process groups: who takes part in the collectives of a [`crate::SyncBatchNorm`].
//!
//! A [`ProcessGroup`] is a cheap-to-clone handle over a [`Backend`]. The crate ships
//! the [`single`](ProcessGroup::single) group (world size 1, no communication), the
//! in-process [`threads`](ProcessGroup::threads) group (one thread per rank), the
//! [`tcp`](ProcessGroup::tcp) group (one process per rank, any device) and, with the
//! `nccl` feature, the NCCL group (`ProcessGroup::nccl`, one process per GPU),
//! with the `mpi` feature, the MPI group (`ProcessGroup::mpi`, under `mpirun`).
//! [`ProcessGroup::from_env`] picks one from the launcher's environment. Users can
//! plug in their own collective library (gloo, …) by implementing [`Backend`].
//!
//! [`ProcessGroup::subgroups`] and [`ProcessGroup::split`] synchronize batch
//! statistics within subsets of the ranks (one node's GPUs, say), like a
//! `SyncBatchNorm` given a `process_group` from PyTorch's `new_subgroups`:
//! NCCL and MPI split their communicator, the other backends run masked collectives
//! (what that costs is described at [`ProcessGroup::subgroups`]).

mod default;
mod mpi_env;
#[cfg(feature = "mpi")]
mod mpi_group;
#[cfg(feature = "nccl")]
mod nccl;
mod options;
pub(crate) mod rendezvous;
mod ring;
mod ring_frame;
mod ring_output;
mod ring_pipeline;
mod single;
mod star;
mod subgroup;
mod tag;
mod tcp;
mod threads;
mod wire;

pub use default::{default_group, set_default_group, set_thread_default_group};
#[cfg(feature = "mpi")]
pub(crate) use mpi_group::MpiBackend;
#[cfg(feature = "mpi")]
pub use mpi_group::MpiOptions;
#[cfg(feature = "nccl")]
pub(crate) use nccl::NcclBackend;
#[cfg(feature = "nccl")]
pub use nccl::NcclOptions;
pub use options::StoreOptions;
pub(crate) use single::SingleBackend;
pub(crate) use subgroup::SubgroupBackend;
pub use tag::CallTag;
pub(crate) use tag::{LayerId, LayerNames, Part};
pub(crate) use tcp::TcpBackend;
pub use tcp::TcpOptions;
pub(crate) use threads::ThreadsBackend;

use candle::{DType, Device, Result, Tensor};
use rendezvous::Rendezvous;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The default time a collective waits for the other ranks before it fails
/// (10 minutes, as PyTorch's default process-group timeout).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// A collective communication library as seen by `SyncBatchNorm`.
///
/// Implementations must be usable from the thread that runs the model (they are
/// `Send + Sync`), must preserve the tensor's shape, dtype and device, and must
/// fail — never hang forever — when another rank fails or disagrees on the call
/// (different shape or dtype, or a different [`CallTag`]): every rank should
/// get an error within the backend's timeout.
///
/// All ranks must issue the same collectives in the same order.
pub trait Backend: Send + Sync + fmt::Debug {
    /// The rank of this process (or thread) in the group, `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Element-wise sum of `tensor` over all ranks.
    ///
    /// Every rank passes a tensor of the same shape and dtype (f32 or f64;
    /// the crate's backends take bf16 and f16 too, which
    /// [`crate::data_parallel::AverageOptions::half_in_own_dtype`] needs) and
    /// receives the sum, on the device of its own input.
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor>;

    /// [`Backend::all_reduce_sum`] of the collective `tag` (which layer, and
    /// which of its calls, it belongs to): the `SyncBatchNorm` layers call
    /// this. A backend that checks that all ranks make the same call should
    /// compare the tags too, so that ranks calling two layers of the same
    /// shape in a different order fail instead of mixing their statistics
    /// (the crate's TCP and in-process groups do on every call, NCCL with
    /// its debug checks). The default ignores the tag.
    fn all_reduce_sum_tagged(&self, tensor: &Tensor, tag: CallTag) -> Result<Tensor> {
        let _ = tag;
        self.all_reduce_sum(tensor)
    }

    /// Element-wise mean of `tensor` over all ranks: what gradient averaging
    /// ([`crate::data_parallel::GradientAverager`]) uses off the CPU.
    ///
    /// Every rank passes a floating-point tensor of the same shape and dtype.
    /// The default is [`Backend::all_reduce_sum`] followed by a division by
    /// the world size on the device (a second pass over the tensor); a
    /// backend that can fold the division into the reduction overrides it
    /// (NCCL: `ncclAvg`, one pass).
    fn all_reduce_mean(&self, tensor: &Tensor) -> Result<Tensor> {
        mean_dtype_check(tensor, self.rank())?;
        self.all_reduce_sum(tensor)?
            .affine(1.0 / self.world_size() as f64, 0.0)
    }

    /// Returns `root`'s `tensor` on every rank (each rank passes a tensor of the
    /// same shape and dtype; the result lives on the device of the rank's input).
    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor>;

    /// A short name of the backend for messages ("single", "threads", "tcp", "nccl", …).
    fn name(&self) -> &str;

    /// The device whose tensors this backend's collectives take, when they
    /// take one device only (NCCL: the rank's GPU); `None` (the default) when
    /// they take tensors on any device. Collectives the crate issues itself,
    /// outside a layer (e.g. [`ProcessGroup::split`]), use it.
    fn device(&self) -> Option<Device> {
        None
    }

    /// A backend of this rank's subgroup after a [`ProcessGroup::split`] of a
    /// group on this backend, for backends that can make a communicator of
    /// their own (NCCL: `ncclCommSplit`), whose collectives then involve the
    /// subgroup's members only. `slot` numbers the subgroups from 0 (the same
    /// on all members of one), `members` lists the group ranks of this rank's
    /// subgroup, ascending; the returned backend's rank is this rank's index
    /// in `members`. Called on every rank of the group, once the colors are
    /// exchanged and checked, including ranks alone in their subgroup.
    ///
    /// The default, `None`, runs the subgroup's collectives as masked
    /// collectives of this group (see [`ProcessGroup::split`]), which work on
    /// any backend.
    fn new_subgroup(&self, slot: usize, members: &[usize]) -> Option<Result<Arc<dyn Backend>>> {
        let _ = (slot, members);
        None
    }

    /// Returns when every rank has called it. The default implementation is an
    /// all-reduce of one value.
    fn barrier(&self) -> Result<()> {
        let device = self.device().unwrap_or(Device::Cpu);
        self.all_reduce_sum(&Tensor::zeros(1, DType::F32, &device)?)?;
        Ok(())
    }
}

/// An all-reduce mean takes floating-point tensors only (an integer mean
/// would truncate): an error, the same on every rank, before any collective.
pub(crate) fn mean_dtype_check(tensor: &Tensor, rank: usize) -> Result<()> {
    if tensor.dtype().is_float() {
        Ok(())
    } else {
        candle::bail!(
            "all_reduce_mean: rank {rank}: expected a floating-point tensor, got {:?}",
            tensor.dtype()
        )
    }
}

/// A handle on a group of ranks that synchronize batch statistics.
///
/// Cloning is cheap (an `Arc`). Create one per rank with [`ProcessGroup::single`],
/// [`ProcessGroup::threads`], or [`ProcessGroup::from_backend`] for a custom
/// [`Backend`].
#[derive(Clone)]
pub struct ProcessGroup {
    backend: Arc<dyn Backend>,
    /// The same backend when it is a subgroup, so that splitting it again
    /// splits its root.
    subgroup: Option<Arc<SubgroupBackend>>,
    /// The tag of this handle's all-reduces (see [`ProcessGroup::with_tag`]).
    tag: CallTag,
    /// The layers built on this handle and its clones, for their identities
    /// in call tags.
    layers: Arc<LayerNames>,
}

impl ProcessGroup {
    /// A group of world size 1: collectives return their input, nothing is communicated.
    pub fn single() -> Self {
        Self::from_backend(SingleBackend)
    }

    /// `world_size` in-process ranks, one per thread, with the default timeout
    /// ([`DEFAULT_TIMEOUT`]). Element `r` of the returned vector is rank `r`; move
    /// each into the thread that runs that rank's model.
    pub fn threads(world_size: usize) -> Result<Vec<ProcessGroup>> {
        Self::threads_with_timeout(world_size, DEFAULT_TIMEOUT)
    }

    /// Like [`ProcessGroup::threads`], with the time a collective waits for the
    /// other ranks before it fails.
    pub fn threads_with_timeout(world_size: usize, timeout: Duration) -> Result<Vec<ProcessGroup>> {
        Ok(ThreadsBackend::new_group(world_size, timeout)?
            .into_iter()
            .map(Self::from_backend)
            .collect())
    }

    /// Joins the TCP group described by `rv`: one process per rank, on one or
    /// several machines. Rank 0 serves the rendezvous on
    /// `rv.master_addr:rv.master_port`; the call returns on every rank once all
    /// have joined. Tensors on any device can be reduced (staged through host
    /// memory). See [`TcpOptions`] for the timeouts.
    pub fn tcp(rv: &Rendezvous, options: TcpOptions) -> Result<ProcessGroup> {
        Ok(Self::from_backend(TcpBackend::connect(rv, options)?))
    }

    /// Joins the NCCL group described by `rv` for the CUDA device `device` (one
    /// process per GPU); the NCCL unique id is shared through the TCP rendezvous.
    #[cfg(feature = "nccl")]
    pub fn nccl(rv: &Rendezvous, device: &Device, options: NcclOptions) -> Result<ProcessGroup> {
        Ok(Self::from_backend(NcclBackend::connect(
            rv, device, options,
        )?))
    }

    /// Joins the group of all ranks of the MPI job this process belongs to
    /// (`MPI_COMM_WORLD`; feature `mpi`), initializing MPI on first use: one
    /// process per rank, started by `mpirun` or `srun --mpi=pmix`. Every
    /// rank calls it. Each collective checks first that all ranks make the
    /// same call, and one that does not complete within `options.timeout`
    /// ends the job with `MPI_Abort` (see docs/mpi.md). MPI is finalized when
    /// the last MPI group is dropped, or at exit.
    #[cfg(feature = "mpi")]
    pub fn mpi(options: MpiOptions) -> Result<ProcessGroup> {
        Ok(Self::from_backend(MpiBackend::world(options)?))
    }

    /// The group described by the launcher's environment: with the `mpi`
    /// feature, under an MPI launcher (`OMPI_COMM_WORLD_*`, `PMI_RANK`,
    /// `PMIX_RANK`) or with `SYNCBN_BACKEND=mpi`, the MPI group
    /// (`ProcessGroup::mpi`, any device, staged through host memory);
    /// otherwise (see [`Rendezvous::from_env`]) [`ProcessGroup::single`] when
    /// no launcher variables are set or the world size is 1, NCCL when
    /// `device` is a CUDA device and the `nccl` feature is on, TCP otherwise
    /// (`SYNCBN_BACKEND=tcp` picks these under an MPI launcher too).
    /// Timeouts come from `SYNCBN_TIMEOUT` (seconds) when set.
    pub fn from_env(device: &Device) -> Result<ProcessGroup> {
        #[cfg(feature = "mpi")]
        if mpi_env::use_mpi(&|k| std::env::var(k).ok())? {
            return Self::mpi(MpiOptions::from_env()?);
        }
        #[cfg(not(feature = "mpi"))]
        mpi_env::use_mpi(&|k| std::env::var(k).ok())?;
        Self::from_rendezvous(Rendezvous::from_env()?.as_ref(), device)
    }

    /// The MPI group and its rank's rendezvous when the environment calls
    /// for MPI (see [`ProcessGroup::from_env`]), else `None`.
    #[cfg(feature = "mpi")]
    pub(crate) fn mpi_from_env() -> Result<Option<(ProcessGroup, Rendezvous)>> {
        if !mpi_env::use_mpi(&|k| std::env::var(k).ok())? {
            return Ok(None);
        }
        let world = MpiBackend::world(MpiOptions::from_env()?)?;
        let rv = mpi_group::rendezvous(&world)?;
        Ok(Some((Self::from_backend(world), rv)))
    }

    /// Without the `mpi` feature: `None`, or the error of a
    /// `SYNCBN_BACKEND=mpi`.
    #[cfg(not(feature = "mpi"))]
    pub(crate) fn mpi_from_env() -> Result<Option<(ProcessGroup, Rendezvous)>> {
        mpi_env::use_mpi(&|k| std::env::var(k).ok())?;
        Ok(None)
    }

    /// Whether this process is a rank started by a launcher: an MPI
    /// launcher's (when the MPI group is used) or one setting the
    /// rendezvous variables (see [`Rendezvous::from_env`]).
    pub(crate) fn launched() -> Result<bool> {
        Ok(mpi_env::use_mpi(&|k| std::env::var(k).ok())? || Rendezvous::from_env()?.is_some())
    }

    /// The group for `rv` as [`ProcessGroup::from_env`] picks it (`None`:
    /// no launcher, [`ProcessGroup::single`]).
    pub(crate) fn from_rendezvous(
        rv: Option<&Rendezvous>,
        device: &Device,
    ) -> Result<ProcessGroup> {
        let Some(rv) = rv else {
            return Ok(Self::single());
        };
        if rv.world_size == 1 {
            return Ok(Self::single());
        }
        #[cfg(feature = "nccl")]
        if device.is_cuda() {
            return Self::nccl(rv, device, NcclOptions::from_env()?);
        }
        let _ = device;
        Self::tcp(rv, TcpOptions::from_env()?)
    }

    /// Wraps a user-provided backend.
    pub fn from_backend<B: Backend + 'static>(backend: B) -> Self {
        Self::from_arc(Arc::new(backend))
    }

    /// Wraps a shared user-provided backend.
    pub fn from_arc(backend: Arc<dyn Backend>) -> Self {
        Self {
            backend,
            subgroup: None,
            tag: CallTag::UNTAGGED,
            layers: Default::default(),
        }
    }

    /// A handle on a masked subgroup of `root`: its layers are counted with
    /// the root's, since their collectives are the root's.
    fn from_subgroup(subgroup: Arc<SubgroupBackend>, root: &ProcessGroup) -> Self {
        Self {
            backend: subgroup.clone(),
            subgroup: Some(subgroup),
            tag: CallTag::UNTAGGED,
            layers: root.layers.clone(),
        }
    }

    /// This handle, for the all-reduces of the call `tag` (a layer's).
    pub(crate) fn with_tag(&self, tag: CallTag) -> Self {
        Self {
            tag,
            ..self.clone()
        }
    }

    /// The identity in call tags of a new layer named `name` built on this
    /// handle: the name and how many layers of that name were built on this
    /// handle and its clones before (see [`CallTag`]).
    pub(crate) fn register_layer(&self, name: &str) -> LayerId {
        self.layers.register(name)
    }

    /// The tag of this handle's all-reduces ([`CallTag::UNTAGGED`] unless
    /// the handle was made for a layer's call).
    pub(crate) fn tag(&self) -> CallTag {
        self.tag
    }

    /// The rank of this handle in its group.
    pub fn rank(&self) -> usize {
        self.backend.rank()
    }

    /// The number of ranks in the group.
    pub fn world_size(&self) -> usize {
        self.backend.world_size()
    }

    /// The backend behind this handle.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// Element-wise sum of `tensor` over all ranks (see [`Backend::all_reduce_sum`]).
    /// With world size 1 the input is returned as is.
    pub fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        if self.world_size() == 1 {
            return Ok(tensor.clone());
        }
        if self.tag == CallTag::UNTAGGED {
            self.backend.all_reduce_sum(tensor)
        } else {
            self.backend.all_reduce_sum_tagged(tensor, self.tag)
        }
    }

    /// Element-wise mean of a floating-point `tensor` over all ranks (see
    /// [`Backend::all_reduce_mean`]). With world size 1 the input is
    /// returned as is.
    pub fn all_reduce_mean(&self, tensor: &Tensor) -> Result<Tensor> {
        if self.world_size() == 1 {
            mean_dtype_check(tensor, self.rank())?;
            return Ok(tensor.clone());
        }
        self.backend.all_reduce_mean(tensor)
    }

    /// `root`'s `tensor` on every rank (see [`Backend::broadcast`]).
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world_size() {
            candle::bail!(
                "broadcast: root rank {root} is out of range for a group of world size {}",
                self.world_size()
            )
        }
        if self.world_size() == 1 {
            return Ok(tensor.clone());
        }
        self.backend.broadcast(tensor, root)
    }
}

impl ProcessGroup {
    /// Splits the group: the ranks that pass the same `color` form a new group,
    /// ranked in the order of their ranks here (`torch.distributed`'s
    /// `split_group`, `ncclCommSplit`). Give the handle to the `SyncBatchNorm`
    /// layers to synchronize their statistics within the subgroup only.
    ///
    /// A collective of this group: every rank must call it. How a subgroup
    /// communicates depends on the backend:
    ///
    /// - NCCL and MPI split their communicator (`ncclCommSplit`,
    ///   `MPI_Comm_split`): each subgroup gets
    ///   one of its own, whose collectives involve its members only (within a
    ///   node, say) and need nothing from the other subgroups.
    /// - Every other backend, users' own included unless they implement
    ///   [`Backend::new_subgroup`], runs a subgroup's collectives as masked
    ///   collectives of this group: each rank packs its tensor into its
    ///   subgroup's slot of a `[subgroups × len]` buffer of `-0.0` (exact:
    ///   `x + (-0.0) == x`), one all-reduce of the group sums the buffers, and
    ///   each rank reads its subgroup's slot back. The payload grows with the
    ///   number of subgroups, which suits batch statistics (`O(C)` values per
    ///   layer), not gradients; and every rank takes part in every subgroup's
    ///   collectives, so all ranks must issue them in the same order, as ranks
    ///   running one model do. There, a subgroup of one
    ///   rank beside larger ones is refused on every rank alike (give every
    ///   rank its own color instead, which returns [`ProcessGroup::single`]
    ///   handles).
    ///
    /// Either way, keep using this group for the gradients.
    pub fn split(&self, color: u32) -> Result<ProcessGroup> {
        self.split_request(Ok(color))
    }

    fn split_request(&self, request: subgroup::Request) -> Result<ProcessGroup> {
        match &self.subgroup {
            Some(sub) => subgroup::split(self, Some(sub), request),
            None if self.world_size() == 1 => {
                request.map(|_| self.clone()).map_err(candle::Error::Msg)
            }
            None => subgroup::split(self, None, request),
        }
    }

    /// Consecutive blocks of `group_size` ranks: ranks `0..group_size` form the
    /// first subgroup, and so on (PyTorch's `new_subgroups(group_size)`; with
    /// one process per GPU and ranks numbered node by node, `group_size` = GPUs
    /// per node synchronizes within each node). Returns this rank's subgroup;
    /// see [`ProcessGroup::split`]. `group_size` must divide the world size;
    /// when it does not, every rank gets an error.
    pub fn subgroups(&self, group_size: usize) -> Result<ProcessGroup> {
        let world = self.world_size();
        let request = if group_size == 0 || !world.is_multiple_of(group_size) {
            Err(format!(
                "ProcessGroup::subgroups: group size {group_size} does not divide the world size {world}"
            ))
        } else if u32::try_from(world / group_size - 1).is_err() {
            Err(format!(
                "ProcessGroup::subgroups: more than 2^32 subgroups of size {group_size}"
            ))
        } else {
            Ok((self.rank() / group_size) as u32)
        };
        match (&self.subgroup, request) {
            // Every rank of this group sees the same world size: all fail
            // alike without a collective.
            (None, Err(why)) => Err(candle::Error::Msg(why)),
            (None, Ok(_)) if group_size == world => Ok(self.clone()),
            // The subgroups of a split may differ in size: they decide together.
            (_, request) => self.split_request(request),
        }
    }

    /// Returns when every rank of the group has called it.
    pub fn barrier(&self) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        self.backend.barrier()
    }
}

impl fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ProcessGroup({}, rank {} of {})",
            self.backend.name(),
            self.rank(),
            self.world_size()
        )
    }
}

impl Default for ProcessGroup {
    /// The default group of the calling thread (see [`default_group`]).
    fn default() -> Self {
        default_group()
    }
}
