//! Which GPU a rank opens: the CUDA ordinal for a local rank, given what the
//! process can see.
//!
//! torchrun-style launchers start one process per GPU with every GPU of the
//! node visible, and the rank opens GPU `LOCAL_RANK`. SLURM (`srun
//! --gpus-per-task 1`), container runtimes and many clusters instead show each
//! task only its own GPU (`CUDA_VISIBLE_DEVICES` lists one device, or the
//! device cgroup leaves one): there GPU `LOCAL_RANK` does not exist and the
//! rank must open GPU 0. Two ranks of a node opening the same GPU is always a
//! mistake (NCCL refuses it with `ncclInvalidUsage`), so where that is the
//! only possible outcome the choice is an error that says what to change.

use candle::Result;

/// The environment variable that restricts the GPUs a CUDA process sees.
pub(crate) const CUDA_VISIBLE_DEVICES_VAR: &str = "CUDA_VISIBLE_DEVICES";

/// The number of devices a `CUDA_VISIBLE_DEVICES` value lists (`None` when
/// the variable is unset: every device of the machine is visible).
fn listed_devices(cuda_visible_devices: Option<&str>) -> Option<usize> {
    cuda_visible_devices.map(|v| v.split(',').filter(|d| !d.trim().is_empty()).count())
}

/// The CUDA ordinal a rank should open.
///
/// - `local_rank`, `local_world_size`: the rank on this node and the number
///   of ranks on it (`LOCAL_RANK`, `LOCAL_WORLD_SIZE`, or their Open MPI and
///   SLURM counterparts; see [`Rendezvous`](super::Rendezvous)).
/// - `device_count`: the number of CUDA devices this process sees (the
///   driver's count, which `CUDA_VISIBLE_DEVICES` and device cgroups already
///   restrict).
/// - `cuda_visible_devices`: the value of `CUDA_VISIBLE_DEVICES`, if set.
///
/// Returns 0 when this process was given exactly one GPU of its own
/// (`CUDA_VISIBLE_DEVICES` lists one device), or when one GPU is visible and
/// this is the node's only or first rank; otherwise `local_rank`, when that
/// device exists and every local rank has a GPU of its own. An error names
/// the numbers when no device is visible, or when two ranks of this node
/// would have to share a GPU (`local_rank` or `local_world_size` beyond the
/// visible devices).
pub fn local_cuda_ordinal(
    local_rank: usize,
    local_world_size: Option<usize>,
    device_count: usize,
    cuda_visible_devices: Option<&str>,
) -> Result<usize> {
    let visible = describe_visible(cuda_visible_devices);
    if device_count == 0 {
        candle::bail!("no CUDA device is visible to this process ({visible})")
    }
    // The launcher gave this process a GPU of its own: it is device 0.
    if device_count == 1 && listed_devices(cuda_visible_devices) == Some(1) {
        return Ok(0);
    }
    let ranks_here = local_world_size
        .unwrap_or(local_rank + 1)
        .max(local_rank + 1);
    if ranks_here > device_count {
        candle::bail!(
            "local rank {local_rank} of {ranks_here} rank(s) on this node, but this process sees {device_count} CUDA device(s) ({visible}): two ranks would share a GPU, which NCCL refuses; start at most {device_count} rank(s) per node, or give each rank its own GPU (e.g. CUDA_VISIBLE_DEVICES=<one id> per rank, or srun --gpus-per-task 1)"
        )
    }
    Ok(local_rank)
}

/// `CUDA_VISIBLE_DEVICES="…"`, or `CUDA_VISIBLE_DEVICES unset`, for messages.
fn describe_visible(cuda_visible_devices: Option<&str>) -> String {
    match cuda_visible_devices {
        Some(v) => format!("{CUDA_VISIBLE_DEVICES_VAR}={v:?}"),
        None => format!("{CUDA_VISIBLE_DEVICES_VAR} unset"),
    }
}

/// The number of CUDA devices this process sees (for the launcher's bound on
/// the rank count), with what `CUDA_VISIBLE_DEVICES` says, for messages.
/// An error when the driver cannot count them, or in a build without the
/// `cuda` feature.
pub(crate) fn visible_cuda_devices() -> Result<(usize, String)> {
    let visible = describe_visible(std::env::var(CUDA_VISIBLE_DEVICES_VAR).ok().as_deref());
    #[cfg(feature = "cuda")]
    {
        let count = cudarc::driver::CudaContext::device_count().map_err(|e| {
            candle::Error::Msg(format!(
                "launcher: could not count the CUDA devices for the ranks ({visible}): {e}"
            ))
        })?;
        Ok((usize::try_from(count).unwrap_or(0), visible))
    }
    #[cfg(not(feature = "cuda"))]
    candle::bail!(
        "launcher: CUDA ranks need a build with the `cuda` feature to count the GPUs ({visible}); or set SYNCBN_MAX_NPROC (LaunchConfig::max_nproc) to the number of ranks to allow"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_gpu_per_task_is_device_0() {
        // srun --gpus-per-task 1: every task sees only its own GPU.
        for local_rank in 0..4 {
            assert_eq!(
                local_cuda_ordinal(local_rank, Some(4), 1, Some("3")).unwrap(),
                0
            );
        }
        // A GPU UUID instead of a number, and stray spaces/commas.
        let uuid = "GPU-8f6c1d2e-0000-4a4a-9f9f-123456789abc";
        assert_eq!(local_cuda_ordinal(2, None, 1, Some(uuid)).unwrap(), 0);
        assert_eq!(local_cuda_ordinal(1, Some(2), 1, Some(" 5 ,")).unwrap(), 0);
        // A single rank on a one-GPU machine.
        assert_eq!(local_cuda_ordinal(0, Some(1), 1, None).unwrap(), 0);
        assert_eq!(local_cuda_ordinal(0, None, 1, None).unwrap(), 0);
    }

    #[test]
    fn all_gpus_visible_is_local_rank() {
        for local_rank in 0..8 {
            assert_eq!(
                local_cuda_ordinal(local_rank, Some(8), 8, None).unwrap(),
                local_rank
            );
        }
        assert_eq!(local_cuda_ordinal(1, Some(2), 2, Some("4,6")).unwrap(), 1);
        // More GPUs than ranks is fine.
        assert_eq!(local_cuda_ordinal(1, Some(2), 4, None).unwrap(), 1);
        assert_eq!(local_cuda_ordinal(3, None, 4, None).unwrap(), 3);
    }

    #[test]
    fn sharing_a_gpu_is_an_error() {
        // torchrun --nproc-per-node 2 on a one-GPU machine: both ranks fail.
        for local_rank in 0..2 {
            let e = local_cuda_ordinal(local_rank, Some(2), 1, None)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("local rank {local_rank} of 2 rank(s)"))
                    && e.contains("sees 1 CUDA device(s) (CUDA_VISIBLE_DEVICES unset)")
                    && e.contains("two ranks would share a GPU"),
                "{e}"
            );
        }
        // LOCAL_RANK beyond the visible devices, local world size unknown.
        let e = local_cuda_ordinal(2, None, 2, Some("0,1"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("local rank 2 of 3 rank(s)")
                && e.contains("sees 2 CUDA device(s) (CUDA_VISIBLE_DEVICES=\"0,1\")"),
            "{e}"
        );
        let e = local_cuda_ordinal(1, None, 1, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("local rank 1 of 2 rank(s)"), "{e}");
        // Four ranks on a node with two GPUs: rank 0 fails too, not only 2, 3.
        assert!(local_cuda_ordinal(0, Some(4), 2, None).is_err());
    }

    #[test]
    fn no_gpu_is_an_error() {
        let e = local_cuda_ordinal(0, Some(1), 0, Some(""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no CUDA device is visible") && e.contains("CUDA_VISIBLE_DEVICES=\"\""),
            "{e}"
        );
    }
}
