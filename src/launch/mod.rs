//! Running one process per rank: the launcher's environment ([`env`](mod@env))
//! and a self-spawning launcher ([`spawn`]).

pub mod env;
#[cfg(target_os = "linux")]
mod signals;
pub mod spawn;

pub use env::{EnvSource, Rendezvous};
pub use spawn::{launch, launch_if_requested, random_token, LaunchConfig};
