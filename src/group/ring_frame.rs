//! What the ring's collectives agree on: the element types it sums, the
//! schedule of a ring all-reduce (which chunk each step sends and receives)
//! and the header that starts every step's frame on a link.
//!
//! A ring all-reduce of `n` elements over `W` ranks cuts the tensor into `W`
//! chunks (sizes differing by at most one element) and runs `2 (W-1)` steps:
//! `W-1` reduce-scatter steps, then `W-1` all-gather steps. At step `t`
//! rank `r` sends one chunk to rank `r+1` and receives one from rank `r-1`;
//! what step `t` sends is always what step `t-1` received, so a rank may
//! forward a step's data piece by piece as it arrives (the engines pipeline
//! steps this way). Frame of a step on the wire: a [`StepHeader`], then the
//! chunk's bytes (little-endian values).

use super::wire::dtype_code;
use super::CallTag;
use std::fmt;
use std::ops::Range;

/// The magic of a step frame.
const STEP_MAGIC: [u8; 4] = *b"SBRS";
/// The version of the ring protocol (links and step frames).
pub(crate) const RING_VERSION: u8 = 1;
/// Bytes of a step frame's header.
pub(crate) const STEP_HEADER_LEN: usize = 40;

/// An element type the ring sums: the sum of two values, in the type itself
/// (half types through f32, rounded once per addition).
pub(crate) trait RingElem: candle::WithDType + bytemuck::Pod + Send + Sync {
    fn sum(a: Self, b: Self) -> Self;
}

impl RingElem for f32 {
    fn sum(a: Self, b: Self) -> Self {
        a + b
    }
}

impl RingElem for f64 {
    fn sum(a: Self, b: Self) -> Self {
        a + b
    }
}

impl RingElem for half::bf16 {
    fn sum(a: Self, b: Self) -> Self {
        Self::from_f32(a.to_f32() + b.to_f32())
    }
}

impl RingElem for half::f16 {
    fn sum(a: Self, b: Self) -> Self {
        Self::from_f32(a.to_f32() + b.to_f32())
    }
}

/// `out[i] = local[i] + received[i]`, the one summation order of the ring
/// (the local value first), for every rank and every run.
pub(crate) fn sum_into<T: RingElem>(
    out: &mut [std::mem::MaybeUninit<T>],
    local: &[T],
    received: &[T],
) {
    for ((o, a), b) in out.iter_mut().zip(local).zip(received) {
        o.write(T::sum(*a, *b));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    ReduceScatter = 1,
    AllGather = 2,
}

/// The steps of one ring all-reduce as seen by one rank.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    pub rank: usize,
    pub world: usize,
    /// Elements of the whole tensor.
    pub count: usize,
    pub dtype: u8,
    pub tag: CallTag,
    /// The ring's call number.
    pub call: u64,
}

impl Schedule {
    pub fn new<T: RingElem>(
        rank: usize,
        world: usize,
        count: usize,
        tag: CallTag,
        call: u64,
    ) -> Self {
        Schedule {
            rank,
            world,
            count,
            dtype: dtype_code(T::DTYPE),
            tag,
            call,
        }
    }

    /// Steps of the collective: `2 (W-1)`.
    pub fn steps(&self) -> usize {
        2 * (self.world - 1)
    }

    /// The elements of chunk `c`.
    pub fn chunk(&self, c: usize) -> Range<usize> {
        let (n, w) = (self.count, self.world);
        let (base, rem) = (n / w, n % w);
        let start = c * base + c.min(rem);
        start..start + base + usize::from(c < rem)
    }

    pub fn phase(&self, t: usize) -> Phase {
        if t < self.world - 1 {
            Phase::ReduceScatter
        } else {
            Phase::AllGather
        }
    }

    /// The chunk that step `t` sends. Reduce-scatter step `s` sends chunk
    /// `r-s` (the rank's own values at `s = 0`, partial sums after); rank
    /// `r` then holds the sum of chunk `r+1`, which all-gather step `s`
    /// passes on as chunk `r+1-s`.
    pub fn send_chunk(&self, t: usize) -> usize {
        let (w, r) = (self.world, self.rank);
        let s = t % (w - 1);
        match self.phase(t) {
            Phase::ReduceScatter => (r + w - s) % w,
            Phase::AllGather => (r + 1 + w - s) % w,
        }
    }

    /// The chunk that step `t` receives (and step `t+1` sends on).
    pub fn recv_chunk(&self, t: usize) -> usize {
        let (w, r) = (self.world, self.rank);
        let s = t % (w - 1);
        match self.phase(t) {
            Phase::ReduceScatter => (r + 2 * w - s - 1) % w,
            Phase::AllGather => (r + w - s) % w,
        }
    }

    /// The header of the frame that step `t` sends (`send`) or receives.
    pub fn header(&self, t: usize, send: bool) -> StepHeader {
        let c = if send {
            self.send_chunk(t)
        } else {
            self.recv_chunk(t)
        };
        StepHeader {
            phase: self.phase(t),
            step: (t % (self.world - 1)) as u32,
            dtype: self.dtype,
            tag: self.tag.value(),
            call: self.call,
            count: self.count as u64,
            len: self.chunk(c).len() as u64,
        }
    }
}

/// The header of one step's frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepHeader {
    pub phase: Phase,
    pub step: u32,
    pub dtype: u8,
    pub tag: u32,
    /// The ring's call number.
    pub call: u64,
    /// Elements of the whole tensor.
    pub count: u64,
    /// Elements of this chunk.
    pub len: u64,
}

impl StepHeader {
    pub fn encode(&self) -> [u8; STEP_HEADER_LEN] {
        let mut b = [0u8; STEP_HEADER_LEN];
        b[0..4].copy_from_slice(&STEP_MAGIC);
        b[4] = RING_VERSION;
        b[5] = self.phase as u8;
        b[6] = self.dtype;
        b[8..12].copy_from_slice(&self.step.to_le_bytes());
        b[12..16].copy_from_slice(&self.tag.to_le_bytes());
        b[16..24].copy_from_slice(&self.call.to_le_bytes());
        b[24..32].copy_from_slice(&self.count.to_le_bytes());
        b[32..40].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// `None` when `got` is this header; otherwise what arrived instead, in
    /// words.
    pub fn mismatch(&self, got: &[u8; STEP_HEADER_LEN]) -> Option<String> {
        if *got == self.encode() {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(got[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(got[i..i + 8].try_into().expect("8 bytes"));
        Some(if got[0..4] != STEP_MAGIC || got[4] != RING_VERSION {
            "a frame that is not a ring step of this protocol version".into()
        } else {
            format!(
                "phase {} step {} of ring call #{} (dtype code {}, tag {:#010x}, {} of {} elements)",
                got[5],
                u32_at(8),
                u64_at(16),
                got[6],
                u32_at(12),
                u64_at(32),
                u64_at(24)
            )
        })
    }
}

impl fmt::Display for StepHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phase = match self.phase {
            Phase::ReduceScatter => "reduce-scatter",
            Phase::AllGather => "all-gather",
        };
        write!(
            f,
            "{phase} step {} of ring call #{} ({} of {} elements)",
            self.step, self.call, self.len, self.count
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What each step sends is what the step before received, every chunk
    /// is received once in each phase, and the chunks cover the tensor.
    #[test]
    fn schedule_forwards_what_it_received() {
        for w in 2..=5 {
            for n in [0, 1, w - 1, 7, 1000] {
                for r in 0..w {
                    let s = Schedule::new::<f32>(r, w, n, CallTag::UNTAGGED, 0);
                    let ends: Vec<_> = (0..w).map(|c| s.chunk(c)).collect();
                    assert_eq!(ends[0].start, 0);
                    assert_eq!(ends[w - 1].end, n);
                    assert!(ends.windows(2).all(|p| p[0].end == p[1].start));
                    assert_eq!(s.send_chunk(0), r, "step 0 sends the own chunk");
                    for t in 1..s.steps() {
                        assert_eq!(s.send_chunk(t), s.recv_chunk(t - 1), "w {w} r {r} t {t}");
                    }
                    let rs: Vec<_> = (0..w - 1).map(|t| s.recv_chunk(t)).collect();
                    let ag: Vec<_> = (w - 1..s.steps()).map(|t| s.recv_chunk(t)).collect();
                    assert!(!rs.contains(&r), "the own chunk is never summed into");
                    assert_eq!(ag[0], r, "the all-gather brings the own chunk first");
                    let mut all = ag.clone();
                    all.push((r + 1) % w);
                    all.sort();
                    assert_eq!(all, (0..w).collect::<Vec<_>>());
                    // Rank r+1 receives what rank r sends, with the same header.
                    let next = Schedule::new::<f32>((r + 1) % w, w, n, CallTag::UNTAGGED, 0);
                    for t in 0..s.steps() {
                        assert_eq!(s.header(t, true), next.header(t, false));
                    }
                }
            }
        }
    }

    #[test]
    fn header_mismatch_says_what_arrived() {
        let s = Schedule::new::<f32>(0, 3, 10, CallTag::UNTAGGED, 7);
        let h = s.header(1, false);
        assert_eq!(h.mismatch(&h.encode()), None);
        let other = s.header(2, false).encode();
        let m = h.mismatch(&other).unwrap();
        assert!(m.contains("phase 2 step 0 of ring call #7"), "{m}");
        let m = h.mismatch(&[0xAB; STEP_HEADER_LEN]).unwrap();
        assert!(m.contains("not a ring step"), "{m}");
    }
}
