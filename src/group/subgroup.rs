//! Subgroups: batch statistics synchronized within subsets of the ranks.
//!
//! Large jobs often synchronize batch norm over groups of a few GPUs (one node,
//! say) rather than over all of them: PyTorch passes a `process_group` made by
//! `torch.distributed.new_subgroups` to `SyncBatchNorm`. Here
//! [`ProcessGroup::split`] and [`ProcessGroup::subgroups`] make such handles:
//! with a communicator of their own where the backend makes one
//! ([`Backend::new_subgroup`]; NCCL does, with `ncclCommSplit`), and otherwise
//! on top of any [`Backend`], the user's own included, as a
//! [`SubgroupBackend`] (how it works and what it costs is there).

use super::{Backend, CallTag, ProcessGroup};
use candle::{DType, Device, Result, Tensor};
use std::fmt;
use std::sync::Arc;

/// The backend of a handle made by [`ProcessGroup::split`] or
/// [`ProcessGroup::subgroups`] on a backend that does not make subgroups of
/// its own ([`Backend::new_subgroup`]): a subset of the ranks of a root group.
///
/// A subgroup collective is one collective of the root group. Every rank
/// packs its tensor into its subgroup's slot of a `[subgroups × len]` buffer
/// filled with `-0.0`, the root sums the buffers, and every rank reads its
/// subgroup's slot back. `x + (-0.0) == x` for every `x`, so a slot holds
/// exactly the sum the subgroup's members alone would have made: the same
/// values, signed zeros included, in the root's order of summation. A
/// broadcast is the same sum with only the subgroup's root contributing
/// (integers as two exact 32-bit halves in f64).
///
/// The cost: the payload grows with the number of subgroups, which suits batch
/// statistics (`O(C)` values per layer) but not gradients (average those over
/// the whole group, as DDP does), and every subgroup collective involves every
/// rank of the root. So all ranks of the root must issue their subgroups'
/// collectives in the same order with the same shapes and for the same
/// layers ([`CallTag`]s) — as the ranks of a data-parallel job running one
/// model do. A rank that does not gets the
/// root's error (mismatched call, or the timeout), never wrong numbers.
///
/// A split of a split is a split of the same root by the sequence of colors,
/// so every subgroup's collectives keep one shape however deep the nesting.
pub struct SubgroupBackend {
    root: ProcessGroup,
    /// The colors of the splits that led here, outermost first.
    path: Vec<u32>,
    /// The root ranks of this subgroup's members, ascending.
    members: Vec<usize>,
    /// This rank's index in `members`.
    rank: usize,
    /// This subgroup's slot in the packed buffer, and the number of slots.
    slot: usize,
    slots: usize,
    name: String,
}

impl fmt::Debug for SubgroupBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubgroupBackend")
            .field("colors", &self.path)
            .field("rank", &self.rank)
            .field("members", &self.members)
            .field("subgroups", &self.slots)
            .field("root", &self.root)
            .finish()
    }
}

impl SubgroupBackend {
    /// `n` identities of the packed sum: negative zeros (`0` for integers).
    fn neutral(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let zeros = Tensor::zeros(n, dtype, device)?;
        if dtype.is_float() {
            zeros.neg()
        } else {
            Ok(zeros)
        }
    }

    /// One root all-reduce (of the call `tag`) in which this rank contributes
    /// `tensor` to its subgroup's slot when `contribute`, and identities
    /// everywhere else.
    fn masked_sum(&self, tensor: &Tensor, contribute: bool, tag: CallTag) -> Result<Tensor> {
        let (n, dtype, device) = (tensor.elem_count(), tensor.dtype(), tensor.device());
        let own = if contribute {
            tensor.flatten_all()?
        } else {
            Self::neutral(n, dtype, device)?
        };
        let mut parts = Vec::with_capacity(3);
        if self.slot > 0 {
            parts.push(Self::neutral(self.slot * n, dtype, device)?);
        }
        parts.push(own);
        let after = self.slots - self.slot - 1;
        if after > 0 {
            parts.push(Self::neutral(after * n, dtype, device)?);
        }
        let packed = Tensor::cat(&parts, 0)?;
        self.root
            .with_tag(tag)
            .all_reduce_sum(&packed)?
            .narrow(0, self.slot * n, n)?
            .reshape(tensor.shape())
    }
}

impl Backend for SubgroupBackend {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        self.masked_sum(tensor, true, CallTag::UNTAGGED)
    }

    fn all_reduce_sum_tagged(&self, tensor: &Tensor, tag: CallTag) -> Result<Tensor> {
        self.masked_sum(tensor, true, tag)
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        let contribute = self.rank == root;
        let dtype = tensor.dtype();
        if dtype.is_float() {
            return self.masked_sum(tensor, contribute, CallTag::UNTAGGED);
        }
        // Integers (counters): as two 32-bit halves in f64, which every backend
        // sums and which a sum with zeros leaves exact for every i64. Staged
        // through the host; a training step broadcasts nothing. The halves
        // go to the backend's device, else the host (not every device has
        // f64: Metal).
        let ints = tensor
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?;
        let halves: Vec<f64> = ints
            .iter()
            .flat_map(|&v| [(v >> 32) as f64, (v & 0xffff_ffff) as f64])
            .collect();
        let halves = Tensor::new(halves, &self.device().unwrap_or(Device::Cpu))?;
        let got = self
            .masked_sum(&halves, contribute, CallTag::UNTAGGED)?
            .to_vec1::<f64>()?;
        let ints: Vec<i64> = got
            .chunks(2)
            .map(|h| ((h[0] as i64) << 32) | h[1] as i64)
            .collect();
        Tensor::new(ints, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(tensor.device())?
            .reshape(tensor.shape())
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn barrier(&self) -> Result<()> {
        self.root.barrier()
    }

    fn device(&self) -> Option<Device> {
        self.root.backend().device()
    }
}

/// How the ranks of a group fall into subgroups, from every rank's colors.
#[derive(Debug, PartialEq, Eq)]
struct Partition {
    /// The distinct color paths, ascending: subgroup `i` has `paths[i]`.
    paths: Vec<Vec<u32>>,
    /// The ranks of each subgroup, ascending.
    members: Vec<Vec<usize>>,
}

impl Partition {
    fn new(path_of_rank: &[Vec<u32>]) -> Self {
        let mut paths = path_of_rank.to_vec();
        paths.sort_unstable();
        paths.dedup();
        let members = paths
            .iter()
            .map(|p| {
                (0..path_of_rank.len())
                    .filter(|&r| &path_of_rank[r] == p)
                    .collect()
            })
            .collect();
        Self { paths, members }
    }
}

/// What a rank asks of a split: its color, or a refusal (it could not compute
/// one) that makes every rank fail alike instead of leaving them waiting.
pub(super) type Request = std::result::Result<u32, String>;

/// The value a refusing rank sends instead of a color.
const REFUSED: f64 = -1.0;

/// [`ProcessGroup::split`] of `group` (itself a split when `within` is its
/// backend): exchanges the color paths over the root group (one all-reduce,
/// exact in f64 for every `u32`), then builds this rank's handle. Every rank
/// sees the same paths, so every rank takes the same branch: all succeed or
/// all fail with the same message (a refusing rank with its own).
pub(super) fn split(
    group: &ProcessGroup,
    within: Option<&SubgroupBackend>,
    request: Request,
) -> Result<ProcessGroup> {
    let (root, mut path) = match within {
        Some(sub) => (&sub.root, sub.path.clone()),
        None => (group, Vec::new()),
    };
    let (world, rank, depth) = (root.world_size(), root.rank(), path.len() + 1);
    let mut mine = vec![0f64; world * depth];
    for (i, &c) in path.iter().enumerate() {
        mine[rank * depth + i] = f64::from(c);
    }
    mine[rank * depth + depth - 1] = match &request {
        Ok(c) => f64::from(*c),
        Err(_) => REFUSED,
    };
    let all = root
        .all_reduce_sum(&Tensor::new(mine, &root.backend().device().unwrap_or(Device::Cpu))?)
        .map_err(|e| {
            crate::error::keep_kind(&e, format!(
                "ProcessGroup::split: exchanging the colors failed (did every rank call split?): {e}"
            ))
        })?
        .to_vec1::<f64>()?;
    if let Err(why) = request {
        candle::bail!("{why}")
    }
    let mut paths = Vec::with_capacity(world);
    for (r, p) in all.chunks(depth).enumerate() {
        if p[depth - 1] == REFUSED {
            candle::bail!(
                "ProcessGroup::split: rank {r} of the {} group could not take part in the split (its own error says why)",
                root.backend().name()
            )
        }
        if p.iter()
            .any(|&c| c.fract() != 0.0 || !(0.0..=f64::from(u32::MAX)).contains(&c))
        {
            candle::bail!(
                "ProcessGroup::split: rank {r} sent colors {p:?}, not u32s (did every rank of the {} group call split?)",
                root.backend().name()
            )
        }
        paths.push(p.iter().map(|&c| c as u32).collect::<Vec<u32>>());
    }
    let partition = Partition::new(&paths);
    let sizes: Vec<usize> = partition.members.iter().map(Vec::len).collect();
    if sizes.iter().all(|&s| s == 1) {
        // Nobody synchronizes with anybody: no collectives at all.
        return Ok(ProcessGroup::single());
    }
    // `paths[rank]` is this rank's own path, as it sent it.
    let slot = partition.paths.binary_search(&paths[rank]).map_err(|_| {
        candle::Error::Msg(
            "ProcessGroup::split: this rank's colors were lost in the exchange".into(),
        )
    })?;
    if within.is_none() {
        // A backend of its own for the subgroup, where the backend makes one.
        if let Some(native) = root.backend().new_subgroup(slot, &partition.members[slot]) {
            let native = native.map_err(|e| {
                crate::error::keep_kind(
                    &e,
                    format!(
                        "ProcessGroup::split: making the subgroup's {} communicator failed: {e}",
                        root.backend().name()
                    ),
                )
            })?;
            return Ok(ProcessGroup::from_arc(native));
        }
    }
    if let Some(alone) = partition.members.iter().find(|m| m.len() == 1) {
        let r = alone[0];
        // Name the rank as the caller numbers it: in the group being split.
        let (shown, of) = match within {
            Some(sub) if sub.members.contains(&r) => (
                sub.members.iter().position(|&m| m == r).unwrap_or(r),
                "the group being split",
            ),
            Some(_) => (r, "the root group"),
            None => (r, "the group being split"),
        };
        candle::bail!(
            "ProcessGroup::split: rank {shown} (of {of}) would be alone in its subgroup (colors {:?}) while other subgroups have several ranks (sizes {sizes:?}); a subgroup of one would still have to take part in the others' collectives, so give it a partner or give every rank its own color",
            paths[r]
        )
    }
    path.push(paths[rank][depth - 1]);
    let members = partition.members[slot].clone();
    let sub_rank = members.iter().position(|&r| r == rank).unwrap_or(0);
    let name = format!("{}/split", root.backend().name());
    let backend = Arc::new(SubgroupBackend {
        root: root.clone(),
        path,
        members,
        rank: sub_rank,
        slot,
        slots: partition.paths.len(),
        name,
    });
    Ok(ProcessGroup::from_subgroup(backend, root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_orders_colors_and_members() {
        let paths = |cs: &[u32]| cs.iter().map(|&c| vec![c]).collect::<Vec<_>>();
        let p = Partition::new(&paths(&[7, 2, 7, 7, 2]));
        assert_eq!(p.paths, vec![vec![2], vec![7]]);
        assert_eq!(p.members, vec![vec![1, 4], vec![0, 2, 3]]);
        let p = Partition::new(&paths(&[0, 0, 1, 1, 2, 2]));
        assert_eq!(p.members, vec![vec![0, 1], vec![2, 3], vec![4, 5]]);
        // Nested: the outer color first.
        let p = Partition::new(&[vec![1, 0], vec![0, 5], vec![1, 0], vec![0, 5], vec![1, 1]]);
        assert_eq!(p.paths, vec![vec![0, 5], vec![1, 0], vec![1, 1]]);
        assert_eq!(p.members, vec![vec![1, 3], vec![0, 2], vec![4]]);
    }
}
