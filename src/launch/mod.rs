//! Running one process per rank: the launcher's environment
//! ([`Rendezvous::from_env`]), a self-spawning launcher ([`launch`],
//! [`launch_if_requested`]), and the GPU a rank opens ([`local_cuda_ordinal`]).

mod device;
#[cfg(target_os = "linux")]
mod signals;
mod spawn;

pub use crate::rendezvous::{EnvSource, Rendezvous};
pub use device::local_cuda_ordinal;
pub use spawn::{launch, launch_if_requested, LaunchConfig};
