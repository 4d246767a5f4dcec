//! One call to set up a rank: its device and its process group, from the
//! launcher's environment.

use super::device::{local_cuda_ordinal, CUDA_VISIBLE_DEVICES_VAR};
use super::RankDevice;
use crate::group::rendezvous::Rendezvous;
use crate::ProcessGroup;
use candle::{Device, Result};

/// What a rank computes on and whom it synchronizes with: the result of
/// [`init_rank`] and [`Rank::from_env`].
#[derive(Clone)]
#[non_exhaustive]
pub struct Rank {
    /// This rank's device: the CPU, or the GPU of its own (see
    /// [`local_cuda_ordinal`]).
    pub device: Device,
    /// This rank's handle on the group of all ranks (TCP, or NCCL for CUDA
    /// ranks with the `nccl` feature, or MPI under an MPI launcher with the
    /// `mpi` feature; [`ProcessGroup::single`] outside a launcher).
    pub group: ProcessGroup,
    /// What the launcher said (`None`: no launcher, a single process).
    pub rendezvous: Option<Rendezvous>,
}

impl std::fmt::Debug for Rank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rank")
            .field("device", &self.device.location())
            .field("rank", &self.group.rank())
            .field("world_size", &self.group.world_size())
            .field("rendezvous", &self.rendezvous)
            .finish()
    }
}

/// Sets up this process as one rank of a data-parallel job, in one call:
/// reads the launcher's environment (torchrun's `RANK`/`WORLD_SIZE`/
/// `LOCAL_RANK`/…, SLURM's `SLURM_*`, Open MPI's `OMPI_COMM_WORLD_*`, or
/// this crate's [`launch`](super::launch)), opens this rank's device and
/// joins the group.
///
/// With the `cuda` feature the device is this rank's GPU
/// ([`Rank::from_env`] with [`RankDevice::Cuda`]): GPU 0 where the launcher
/// shows each rank only its own GPU (`CUDA_VISIBLE_DEVICES` with one entry,
/// `srun --gpus-per-task 1`), GPU `LOCAL_RANK` where every GPU of the node
/// is visible, and an error, before any group is joined, where two ranks of
/// the node would share a GPU. Without it the device is the CPU
/// ([`RankDevice::Cpu`]). Outside a launcher it is a single rank
/// ([`ProcessGroup::single`]).
///
/// ```no_run
/// let rank = candle_syncbn::init_rank()?;
/// let (device, group) = (rank.device, rank.group);
/// println!("rank {} of {} on {:?}", group.rank(), group.world_size(), device.location());
/// # Ok::<(), candle::Error>(())
/// ```
pub fn init_rank() -> Result<Rank> {
    let on = if cfg!(feature = "cuda") {
        RankDevice::Cuda
    } else {
        RankDevice::Cpu
    };
    Rank::from_env(on)
}

impl Rank {
    /// Like [`init_rank`], with the device kind chosen: [`RankDevice::Cpu`]
    /// (CPU ranks in any build) or [`RankDevice::Cuda`] (an error in a
    /// build without the `cuda` feature).
    pub fn from_env(on: RankDevice) -> Result<Rank> {
        // Under an MPI launcher (feature `mpi`), MPI says who the rank is.
        let (mpi_group, rendezvous) = match ProcessGroup::mpi_from_env()? {
            Some((group, rv)) => (Some(group), Some(rv)),
            None => (None, Rendezvous::from_env()?),
        };
        let device = open_device(rank_device(
            rendezvous.as_ref(),
            on,
            cuda_device_count,
            std::env::var(CUDA_VISIBLE_DEVICES_VAR).ok().as_deref(),
        )?)?;
        let group = match mpi_group {
            Some(group) => group,
            None => ProcessGroup::from_rendezvous(rendezvous.as_ref(), &device)?,
        };
        Ok(Rank {
            device,
            group,
            rendezvous,
        })
    }
}

/// The device a rank opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    Cpu,
    Cuda(usize),
}

/// The device for the rank `rv` describes (`None`: a single process):
/// `device_count` is asked only for CUDA ranks.
fn rank_device(
    rv: Option<&Rendezvous>,
    on: RankDevice,
    device_count: impl FnOnce() -> Result<usize>,
    cuda_visible_devices: Option<&str>,
) -> Result<Choice> {
    match on {
        RankDevice::Cpu => Ok(Choice::Cpu),
        RankDevice::Cuda => {
            let (local_rank, local_world_size) =
                rv.map_or((0, Some(1)), |r| (r.local_rank, r.local_world_size));
            let who = match rv {
                Some(r) => format!("rank {} of {}", r.rank, r.world_size),
                None => "a single process".to_string(),
            };
            let ordinal = local_cuda_ordinal(
                local_rank,
                local_world_size,
                device_count()?,
                cuda_visible_devices,
            )
            .map_err(|e| candle::Error::Msg(format!("init_rank: {who}: {e}")))?;
            Ok(Choice::Cuda(ordinal))
        }
    }
}

/// The number of CUDA devices this process sees (the driver's count, which
/// `CUDA_VISIBLE_DEVICES` already restricts).
fn cuda_device_count() -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        let count = cudarc::driver::CudaContext::device_count().map_err(|e| {
            candle::Error::Msg(format!("init_rank: could not count the CUDA devices: {e}"))
        })?;
        Ok(usize::try_from(count).unwrap_or(0))
    }
    #[cfg(not(feature = "cuda"))]
    candle::bail!(
        "init_rank: CUDA ranks need a build with the `cuda` feature (or Rank::from_env(RankDevice::Cpu) for CPU ranks)"
    )
}

fn open_device(choice: Choice) -> Result<Device> {
    match choice {
        Choice::Cpu => Ok(Device::Cpu),
        Choice::Cuda(ordinal) => Device::new_cuda(ordinal).map_err(|e| {
            candle::Error::Msg(format!("init_rank: opening CUDA device {ordinal}: {e}"))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn rendezvous(vars: &[(&str, &str)]) -> Option<Rendezvous> {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Rendezvous::from_lookup(|k| env.get(k).cloned()).unwrap()
    }

    fn no_count() -> Result<usize> {
        panic!("CPU ranks count no GPUs")
    }

    #[test]
    fn cpu_ranks_open_the_cpu_under_every_launcher() {
        let launchers: [&[(&str, &str)]; 4] = [
            &[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "29500")],
            &[
                ("SLURM_PROCID", "3"),
                ("SLURM_NTASKS", "4"),
                ("SLURM_LOCALID", "1"),
                ("SLURM_NTASKS_PER_NODE", "2(x2)"),
                ("MASTER_ADDR", "node0"),
                ("MASTER_PORT", "29500"),
            ],
            &[
                ("OMPI_COMM_WORLD_RANK", "0"),
                ("OMPI_COMM_WORLD_SIZE", "2"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
                ("MASTER_PORT", "29500"),
            ],
            &[],
        ];
        for vars in launchers {
            let rv = rendezvous(vars);
            assert_eq!(
                rank_device(rv.as_ref(), RankDevice::Cpu, no_count, None).unwrap(),
                Choice::Cpu
            );
        }
    }

    #[test]
    fn cuda_ranks_open_their_local_gpu() {
        // torchrun on a 4-GPU node: LOCAL_RANK picks the GPU.
        let rv = rendezvous(&[
            ("RANK", "6"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "2"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ]);
        let got = rank_device(rv.as_ref(), RankDevice::Cuda, || Ok(4), None).unwrap();
        assert_eq!(got, Choice::Cuda(2));
        // srun --gpus-per-task 1: each task sees its own GPU as device 0.
        let rv = rendezvous(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "4(x2)"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ]);
        let got = rank_device(rv.as_ref(), RankDevice::Cuda, || Ok(1), Some("5")).unwrap();
        assert_eq!(got, Choice::Cuda(0));
        // Open MPI, two ranks on a two-GPU machine.
        let rv = rendezvous(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("MASTER_PORT", "29500"),
        ]);
        let got = rank_device(rv.as_ref(), RankDevice::Cuda, || Ok(2), None).unwrap();
        assert_eq!(got, Choice::Cuda(1));
        // No launcher: GPU 0.
        assert_eq!(
            rank_device(None, RankDevice::Cuda, || Ok(8), None).unwrap(),
            Choice::Cuda(0)
        );
    }

    #[test]
    fn two_ranks_on_one_gpu_is_an_error_naming_the_rank() {
        // torchrun --nproc-per-node 2 on a machine with one visible GPU.
        for r in 0..2 {
            let rank = r.to_string();
            let rv = rendezvous(&[
                ("RANK", &rank),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", &rank),
                ("LOCAL_WORLD_SIZE", "2"),
                ("MASTER_PORT", "29500"),
            ]);
            let e = rank_device(rv.as_ref(), RankDevice::Cuda, || Ok(1), None)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("init_rank: rank {r} of 2: "))
                    && e.contains("two ranks would share a GPU"),
                "{e}"
            );
        }
        // A failed count is passed on as it is.
        let e = rank_device(None, RankDevice::Cuda, || candle::bail!("no driver"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no driver"), "{e}");
    }
}
