//! How many ranks the launcher agrees to start on this machine.
//!
//! A rank count the machine cannot run is refused before anything starts
//! (no folder, no process): `train --nproc-per-node 100000` used to fork
//! thousands of processes before the first signal could be handled. The
//! bound depends on what the ranks compute on ([`RankDevice`]):
//!
//! - CUDA ranks: one GPU per rank, so at most the number of CUDA devices the
//!   launcher sees (which `CUDA_VISIBLE_DEVICES` already restricts);
//! - CPU ranks: at most [`CPU_RANKS_PER_CORE`] ranks per core available to
//!   the launcher (`std::thread::available_parallelism`, which honours CPU
//!   affinity and cgroup quotas).
//!
//! `SYNCBN_MAX_NPROC=<n>` (or [`LaunchConfig::max_nproc`](super::LaunchConfig::max_nproc))
//! replaces that bound by `n`, for either device.

use candle::Result;

/// The command-line flag that asks for the launcher, with the rank count.
pub(crate) const NPROC_FLAG: &str = "--nproc-per-node";

/// The environment variable that replaces the launcher's bound on the rank
/// count, when [`LaunchConfig::max_nproc`](super::LaunchConfig::max_nproc) is
/// `None`.
pub(crate) const MAX_NPROC_VAR: &str = "SYNCBN_MAX_NPROC";

/// The most CPU ranks the launcher starts per available core, unless
/// overridden (`SYNCBN_MAX_NPROC`). Generous on purpose: tests and debugging
/// often run a few ranks per core; thousands per core only thrash.
pub(crate) const CPU_RANKS_PER_CORE: usize = 8;

/// What the ranks compute on, which bounds how many of them the launcher
/// starts on this machine (see [`launch`](super::launch)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RankDevice {
    /// CPU ranks (and any device the launcher cannot count): at most 8 ranks
    /// per core available to the launcher.
    #[default]
    Cpu,
    /// One CUDA GPU per rank: at most as many ranks as CUDA devices the
    /// launcher sees. Counting them needs a build with the `cuda` feature.
    Cuda,
}

/// The rank count `SYNCBN_MAX_NPROC` allows, if set.
fn max_from_env() -> Result<Option<usize>> {
    match std::env::var_os(MAX_NPROC_VAR) {
        Some(v) => parse_max_nproc(&v.to_string_lossy()).map(Some),
        None => Ok(None),
    }
}

/// A `SYNCBN_MAX_NPROC` value: a whole number of at least 1.
fn parse_max_nproc(v: &str) -> Result<usize> {
    match v.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => candle::bail!(
            "launcher: {MAX_NPROC_VAR} must be a whole number of at least 1, got {v:?}"
        ),
    }
}

/// The bound for the machine, and a description of it for the error.
struct Capacity {
    max: usize,
    what: String,
}

fn cpu_capacity(cores: usize) -> Capacity {
    Capacity {
        max: cores.saturating_mul(CPU_RANKS_PER_CORE),
        what: format!(
            "this process may run on {cores} CPU core(s), which allows at most {} CPU rank(s) ({CPU_RANKS_PER_CORE} per core)",
            cores.saturating_mul(CPU_RANKS_PER_CORE)
        ),
    }
}

fn cuda_capacity(devices: usize, visible: &str) -> Capacity {
    Capacity {
        max: devices,
        what: format!(
            "this process sees {devices} CUDA device(s) ({visible}), and each rank needs a GPU of its own"
        ),
    }
}

/// The error for `nproc` ranks beyond `cap`, if they are.
fn refusal(nproc: usize, cap: &Capacity) -> Option<String> {
    (nproc > cap.max).then(|| {
        format!(
            "launcher: {nproc} ranks requested ({NPROC_FLAG}), but {}; start at most {}, or set {MAX_NPROC_VAR}=<n> (LaunchConfig::max_nproc) to allow up to n",
            cap.what, cap.max
        )
    })
}

/// Refuses `nproc` ranks on `device` when this machine cannot run them (see
/// the module documentation); `max_nproc`, else `SYNCBN_MAX_NPROC`, replaces
/// the bound.
pub(crate) fn check_nproc(
    nproc: usize,
    device: RankDevice,
    max_nproc: Option<usize>,
) -> Result<()> {
    let max = match max_nproc {
        Some(0) => candle::bail!("launcher: LaunchConfig::max_nproc must be at least 1"),
        Some(m) => Some(m),
        None => max_from_env()?,
    };
    if let Some(max) = max {
        if nproc > max {
            candle::bail!(
                "launcher: {nproc} ranks requested ({NPROC_FLAG}), above the {max} that {MAX_NPROC_VAR} (or LaunchConfig::max_nproc) allows"
            )
        }
        return Ok(());
    }
    let cap = match device {
        RankDevice::Cpu => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            cpu_capacity(cores)
        }
        RankDevice::Cuda => {
            let (devices, visible) = super::device::visible_cuda_devices()?;
            cuda_capacity(devices, &visible)
        }
    };
    match refusal(nproc, &cap) {
        Some(e) => Err(candle::Error::Msg(e)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_bound_is_a_multiple_of_the_cores() {
        let cap = cpu_capacity(2);
        assert_eq!(cap.max, 16);
        assert_eq!(refusal(16, &cap), None);
        let e = refusal(100_000, &cap).unwrap();
        assert_eq!(
            e,
            "launcher: 100000 ranks requested (--nproc-per-node), but this process may run on 2 CPU core(s), which allows at most 16 CPU rank(s) (8 per core); start at most 16, or set SYNCBN_MAX_NPROC=<n> (LaunchConfig::max_nproc) to allow up to n"
        );
        assert_eq!(cpu_capacity(usize::MAX).max, usize::MAX);
    }

    #[test]
    fn cuda_bound_is_the_visible_devices() {
        let cap = cuda_capacity(1, "CUDA_VISIBLE_DEVICES unset");
        assert_eq!(refusal(1, &cap), None);
        let e = refusal(2, &cap).unwrap();
        assert!(
            e.contains("2 ranks requested")
                && e.contains("sees 1 CUDA device(s) (CUDA_VISIBLE_DEVICES unset)")
                && e.contains("start at most 1"),
            "{e}"
        );
        assert!(refusal(1, &cuda_capacity(0, "")).is_some());
    }

    #[test]
    fn an_explicit_bound_replaces_the_machine_s() {
        // Far above any core count, allowed by the caller's bound.
        check_nproc(1 << 20, RankDevice::Cpu, Some(1 << 20)).unwrap();
        // And never counts GPUs (no CUDA needed).
        check_nproc(3, RankDevice::Cuda, Some(4)).unwrap();
        let e = check_nproc(5, RankDevice::Cuda, Some(4))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("5 ranks requested") && e.contains("above the 4 that SYNCBN_MAX_NPROC"),
            "{e}"
        );
        assert!(check_nproc(1, RankDevice::Cpu, Some(0)).is_err());
    }

    #[test]
    fn max_nproc_values() {
        assert_eq!(parse_max_nproc(" 64 ").unwrap(), 64);
        for bad in ["0", "-1", "1.5", "many", ""] {
            let e = parse_max_nproc(bad).unwrap_err().to_string();
            assert!(
                e.contains("SYNCBN_MAX_NPROC must be a whole number of at least 1")
                    && e.contains(&format!("{bad:?}")),
                "{e}"
            );
        }
    }
}
