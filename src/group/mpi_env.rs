//! Whether this process joins the MPI group: under an MPI launcher in a
//! build with the `mpi` feature, or when `SYNCBN_BACKEND` says so.
//!
//! Read in every build, so that `SYNCBN_BACKEND=mpi` in a build without the
//! feature is an error that says how to get one, not a silent TCP group.

use candle::Result;

/// The environment variable that picks the backend of
/// [`ProcessGroup::from_env`](super::ProcessGroup::from_env): `mpi`, `tcp`
/// (the rendezvous groups: TCP, or NCCL for CUDA devices) or `auto` (the
/// default: MPI under an MPI launcher when built with the `mpi` feature).
pub(crate) const BACKEND_VAR: &str = "SYNCBN_BACKEND";

/// Variables that MPI launchers set in every rank: Open MPI's `mpirun`,
/// MPICH's Hydra (PMI), and PMIx launchers (Open MPI, `srun --mpi=pmix`).
pub(crate) const MPI_LAUNCHER_VARS: [&str; 5] = [
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
    "PMI_SIZE",
    "PMIX_RANK",
];

/// Whether [`ProcessGroup::from_env`](super::ProcessGroup::from_env) makes
/// the MPI group, given the variables `get` returns: an error for a
/// `SYNCBN_BACKEND` it does not know, and for `mpi` in a build without the
/// `mpi` feature.
pub(crate) fn use_mpi(get: &impl Fn(&str) -> Option<String>) -> Result<bool> {
    let under_mpi = MPI_LAUNCHER_VARS.iter().any(|v| get(v).is_some());
    match get(BACKEND_VAR).as_deref().map(str::trim) {
        None | Some("") | Some("auto") => Ok(cfg!(feature = "mpi") && under_mpi),
        Some("mpi") if cfg!(feature = "mpi") => Ok(true),
        Some("mpi") => candle::bail!(
            "environment: {BACKEND_VAR}=mpi, but this build of candle-syncbn has no MPI group (build it with `--features mpi`)"
        ),
        Some("tcp") => Ok(false),
        Some(other) => candle::bail!(
            "environment: {BACKEND_VAR} must be `mpi`, `tcp` or `auto`, got {other:?}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Result<bool> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        use_mpi(&|k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn mpi_launchers_pick_mpi_only_in_builds_with_the_feature() {
        let mpi = cfg!(feature = "mpi");
        assert!(!with(&[]).unwrap());
        assert!(!with(&[("RANK", "0"), ("WORLD_SIZE", "2")]).unwrap());
        for var in MPI_LAUNCHER_VARS {
            assert_eq!(with(&[(var, "1")]).unwrap(), mpi, "{var}");
            assert_eq!(with(&[(var, "1"), (BACKEND_VAR, "auto")]).unwrap(), mpi);
            // Opting out: the rendezvous groups, as without the feature.
            assert!(!with(&[(var, "1"), (BACKEND_VAR, "tcp")]).unwrap());
        }
    }

    #[test]
    fn the_backend_variable_is_checked() {
        let forced = with(&[(BACKEND_VAR, " mpi ")]);
        if cfg!(feature = "mpi") {
            assert!(forced.unwrap());
        } else {
            let e = forced.unwrap_err().to_string();
            assert!(e.contains("--features mpi"), "{e}");
        }
        let e = with(&[(BACKEND_VAR, "gloo")]).unwrap_err().to_string();
        assert!(e.contains("SYNCBN_BACKEND") && e.contains("gloo"), "{e}");
    }
}
