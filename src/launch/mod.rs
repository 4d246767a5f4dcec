//! Running one process per rank: the launcher's environment ([`env`](mod@env)),
//! a self-spawning launcher ([`spawn`]), and the GPU a rank opens ([`device`]).

pub mod device;
pub mod env;
#[cfg(target_os = "linux")]
mod signals;
pub mod spawn;

pub use device::local_cuda_ordinal;
pub use env::{EnvSource, Rendezvous};
pub use spawn::{launch, launch_if_requested, random_token, LaunchConfig};
