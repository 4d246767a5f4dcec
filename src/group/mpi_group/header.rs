//! The header of every collective of the MPI group: what each rank says it
//! is doing (sequence number, operation, dtype, element count, root, the
//! layer's [`CallTag`]), all-gathered before any payload and compared on
//! every rank.
//!
//! MPI itself checks nothing: ranks that pass different counts to one
//! all-reduce corrupt memory (Open MPI: `malloc(): invalid size`, then a
//! hang). The header is four `u64` on every rank, whatever the call, so the
//! all-gather that carries it always matches; every rank receives every
//! header and reaches the same verdict, so either all ranks go on to the
//! payload or all return the same error.

use crate::group::wire::{Call, Op};
use crate::group::CallTag;

/// The number of `u64` words of a header.
pub(crate) const WORDS: usize = 4;

/// One rank's description of one collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// The collective's index among this group's collectives.
    pub seq: u64,
    pub call: Call,
    pub tag: CallTag,
}

impl Header {
    /// The header as it travels.
    pub(crate) fn encode(&self) -> [u64; WORDS] {
        let c = &self.call;
        let kind = (c.op as u64)
            | (u64::from(c.dtype) << 8)
            | (u64::from(c.flags) << 16)
            | (u64::from(c.root) << 32);
        [self.seq, kind, c.count, u64::from(self.tag.value())]
    }

    /// A received header (`None`: not one this version writes).
    fn decode(words: &[u64]) -> Option<Self> {
        let [seq, kind, count, tag] = <[u64; WORDS]>::try_from(words).ok()?;
        Some(Header {
            seq,
            call: Call {
                op: Op::from_u8(kind as u8)?,
                dtype: (kind >> 8) as u8,
                flags: (kind >> 16) as u8,
                root: (kind >> 32) as u32,
                count,
            },
            tag: CallTag::from_value(u32::try_from(tag).ok()?),
        })
    }
}

impl std::fmt::Display for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "call #{}: {}", self.seq, self.call)?;
        if self.tag != CallTag::UNTAGGED {
            write!(f, " for {}", self.tag)?;
        }
        Ok(())
    }
}

/// Compares this rank's header with every rank's (`all`: the all-gathered
/// headers, rank by rank): `Err` names this rank's call and the first rank
/// whose call differs, with that call.
pub(crate) fn check(
    ours: &Header,
    all: &[u64],
    rank: usize,
    world_size: usize,
) -> Result<(), String> {
    let mine = ours.encode();
    let Some((other, words)) = all
        .chunks_exact(WORDS)
        .enumerate()
        .find(|(_, words)| *words != mine)
    else {
        return Ok(());
    };
    let theirs = match Header::decode(words) {
        Some(h) => h.to_string(),
        None => format!("an unknown call {words:?}"),
    };
    Err(format!(
        "mpi group: rank {rank} of {world_size}: the ranks made different calls, nothing was exchanged: this rank: {ours}; rank {other}: {theirs}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::wire::dtype_code;
    use candle::DType;

    fn header(seq: u64, op: Op, count: u64, root: u32, tag: u32) -> Header {
        Header {
            seq,
            call: Call {
                op,
                dtype: dtype_code(DType::F32),
                count,
                root,
                flags: 0,
            },
            tag: CallTag::from_value(tag),
        }
    }

    fn gathered(headers: &[Header]) -> Vec<u64> {
        headers.iter().flat_map(|h| h.encode()).collect()
    }

    #[test]
    fn headers_round_trip() {
        for h in [
            header(0, Op::AllReduceSum, 12, 0, 0),
            header(u64::MAX, Op::Broadcast, u64::MAX, u32::MAX, u32::MAX),
            header(7, Op::Barrier, 0, 0, 1),
        ] {
            assert_eq!(Header::decode(&h.encode()), Some(h));
        }
        assert_eq!(Header::decode(&[0, 99, 0, 0]), None);
        assert_eq!(Header::decode(&[0, 1, 0, 1 << 40]), None);
        assert_eq!(Header::decode(&[0, 1, 0]), None);
    }

    #[test]
    fn agreeing_ranks_pass() {
        let h = header(3, Op::AllReduceSum, 64, 0, 0x0012_3400);
        assert_eq!(check(&h, &gathered(&[h, h, h]), 1, 3), Ok(()));
    }

    /// Any field that differs is an error naming both calls, on every rank.
    #[test]
    fn disagreements_name_both_calls() {
        let ours = header(3, Op::AllReduceSum, 64, 0, 0);
        for theirs in [
            header(4, Op::AllReduceSum, 64, 0, 0),
            header(3, Op::AllReduceSum, 65, 0, 0),
            header(3, Op::Broadcast, 64, 0, 0),
            header(3, Op::AllReduceSum, 64, 0, 0x0000_0100),
            Header {
                call: Call {
                    dtype: dtype_code(DType::F64),
                    ..ours.call
                },
                ..ours
            },
        ] {
            let all = gathered(&[ours, theirs, ours]);
            let e = check(&ours, &all, 0, 3).unwrap_err();
            assert!(e.contains(&format!("this rank: {ours}")), "{e}");
            assert!(e.contains(&format!("rank 1: {theirs}")), "{e}");
            // Rank 1 sees rank 0's call as the first that differs.
            let e = check(&theirs, &all, 1, 3).unwrap_err();
            assert!(e.contains(&format!("rank 0: {ours}")), "{e}");
        }
        let e = check(&ours, &[ours.encode(), [1, 200, 2, 3]].concat(), 0, 2).unwrap_err();
        assert!(e.contains("rank 1: an unknown call"), "{e}");
    }

    #[test]
    fn headers_describe_the_call_and_the_layer() {
        let h = header(5, Op::AllReduceSum, 64, 0, 0);
        assert_eq!(h.to_string(), "call #5: all_reduce_sum of 64 f32");
        let mean = Header {
            tag: CallTag::MEAN,
            ..h
        };
        assert!(mean.to_string().contains("all_reduce_mean"), "{mean}");
    }
}
