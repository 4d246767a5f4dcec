//! Running one process per rank: the launcher's environment
//! ([`Rendezvous::from_env`]), a self-spawning launcher ([`launch`],
//! [`launch_if_requested`]), the GPU a rank opens ([`local_cuda_ordinal`]),
//! and both in one call: [`init_rank`] returns this rank's device and group.
//!
//! The launcher owns its ranks: it refuses a rank count the machine cannot
//! run before anything starts (more CUDA ranks than visible GPUs, more CPU
//! ranks than 8 per core, unless `SYNCBN_MAX_NPROC` allows them), `SIGTERM`
//! and `SIGINT` stop the ranks at any time (during spawning too), and on
//! Linux the ranks die with the launcher even when it is killed with
//! `SIGKILL`. See [`launch`] and docs/launching.md.

mod device;
mod limits;
#[cfg(target_os = "linux")]
mod orphans;
mod rank;
#[cfg(target_os = "linux")]
mod signals;
mod spawn;

pub use crate::group::rendezvous::{EnvSource, Rendezvous};
pub use device::local_cuda_ordinal;
pub use limits::RankDevice;
pub use rank::{init_rank, Rank};
pub use spawn::{
    in_launched_rank, launch, launch_if_requested, launch_if_requested_with, LaunchConfig,
};
