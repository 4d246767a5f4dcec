//! The framing of every message the multi-process groups exchange (the
//! rendezvous, the star's collectives and the ring's setup), and rank 0's
//! check that a rank makes the same call as itself.
//!
//! Every message is a fixed 40-byte header followed by a payload whose length
//! is bounded (handshake: 64 bytes; errors: [`MAX_ERROR_BYTES`]; data: the
//! group's `max_message_bytes`). A data header carries the call's sequence
//! number, operation, dtype, element count, root and [`CallTag`] (which layer's
//! call it is), so that ranks which do not make the same call get an error that
//! says so, never wrong numbers or a hang ([`check_peer_header`]). Every read
//! and write has a deadline.

use super::CallTag;
use crate::error::{ErrorKind, Failure};
use candle::DType;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const MAGIC: [u8; 4] = *b"SBN1";
pub(crate) const HEADER_LEN: usize = 40;
/// The protocol version, checked at the rendezvous (2: mutual authentication
/// by HMAC proofs and a call tag in every data header; 1 sent the token
/// itself and had no tag).
pub(crate) const VERSION: u8 = 2;
/// The longest error message a frame may carry.
pub(crate) const MAX_ERROR_BYTES: usize = 64 * 1024;
/// Header flag: the call carries no payload, only its description (debug checks).
pub(crate) const FLAG_META_ONLY: u8 = 1;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Hello = 1,
    Welcome = 2,
    Refuse = 3,
    Data = 4,
    Error = 5,
    /// Rank 0's nonce and proof, answering a hello.
    Challenge = 6,
    /// The joining rank's proof, answering a challenge.
    Proof = 7,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Refuse,
            4 => Kind::Data,
            5 => Kind::Error,
            6 => Kind::Challenge,
            7 => Kind::Proof,
            _ => return None,
        })
    }
}

/// The collective a data frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    AllReduceSum = 1,
    Broadcast = 2,
    Barrier = 3,
}

impl Op {
    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Op::AllReduceSum,
            2 => Op::Broadcast,
            3 => Op::Barrier,
            _ => return None,
        })
    }
}

/// The wire code of a dtype (0 for "no data").
pub(crate) fn dtype_code(dtype: DType) -> u8 {
    match dtype {
        DType::U8 => 1,
        DType::U32 => 2,
        DType::I16 => 3,
        DType::I32 => 4,
        DType::I64 => 5,
        DType::BF16 => 6,
        DType::F16 => 7,
        DType::F32 => 8,
        DType::F64 => 9,
        _ => 255,
    }
}

fn dtype_name(code: u8) -> &'static str {
    match code {
        0 => "none",
        1 => "u8",
        2 => "u32",
        3 => "i16",
        4 => "i32",
        5 => "i64",
        6 => "bf16",
        7 => "f16",
        8 => "f32",
        9 => "f64",
        _ => "unsupported dtype",
    }
}

fn dtype_size(code: u8) -> usize {
    match code {
        1 => 1,
        3 | 6 | 7 => 2,
        2 | 4 | 8 => 4,
        5 | 9 => 8,
        _ => 0,
    }
}

/// What a rank says it is doing in one collective. Every rank of a call must
/// describe the same call (the sequence number is added by the star).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Call {
    pub op: Op,
    /// [`dtype_code`] of the data.
    pub dtype: u8,
    /// Number of elements.
    pub count: u64,
    /// The root rank (broadcast), else 0.
    pub root: u32,
    /// [`FLAG_META_ONLY`] or 0.
    pub flags: u8,
}

impl Call {
    /// The payload length each rank sends for this call.
    pub(crate) fn payload_len(&self, rank: usize) -> u64 {
        if self.flags & FLAG_META_ONLY != 0 {
            return 0;
        }
        let bytes = self.count.saturating_mul(dtype_size(self.dtype) as u64);
        match self.op {
            Op::AllReduceSum => bytes,
            Op::Broadcast if rank == self.root as usize => bytes,
            Op::Broadcast | Op::Barrier => 0,
        }
    }

    /// The payload length of rank 0's reply.
    pub(crate) fn reply_len(&self) -> u64 {
        if self.flags & FLAG_META_ONLY != 0 {
            return 0;
        }
        match self.op {
            Op::AllReduceSum | Op::Broadcast => {
                self.count.saturating_mul(dtype_size(self.dtype) as u64)
            }
            Op::Barrier => 0,
        }
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let check = if self.flags & FLAG_META_ONLY != 0 {
            " (check)"
        } else {
            ""
        };
        match self.op {
            Op::AllReduceSum => write!(
                f,
                "all_reduce_sum of {} {}{check}",
                self.count,
                dtype_name(self.dtype)
            ),
            Op::Broadcast => write!(
                f,
                "broadcast from rank {} of {} {}{check}",
                self.root,
                self.count,
                dtype_name(self.dtype)
            ),
            Op::Barrier => write!(f, "barrier{check}"),
        }
    }
}

/// The fixed 40-byte header of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: Kind,
    pub op: u8,
    pub dtype: u8,
    pub flags: u8,
    pub root: u32,
    /// The [`CallTag`] of a data frame (bytes 12..16).
    pub tag: u32,
    pub seq: u64,
    pub count: u64,
    pub len: u64,
}

impl Header {
    pub fn new(kind: Kind) -> Self {
        Header {
            kind,
            op: 0,
            dtype: 0,
            flags: 0,
            root: 0,
            tag: 0,
            seq: 0,
            count: 0,
            len: 0,
        }
    }

    pub fn data(seq: u64, call: &Call, tag: CallTag, len: u64) -> Self {
        Header {
            kind: Kind::Data,
            op: call.op as u8,
            dtype: call.dtype,
            flags: call.flags,
            root: call.root,
            tag: tag.value(),
            seq,
            count: call.count,
            len,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = self.kind as u8;
        b[5] = self.op;
        b[6] = self.dtype;
        b[7] = self.flags;
        b[8..12].copy_from_slice(&self.root.to_le_bytes());
        b[12..16].copy_from_slice(&self.tag.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.count.to_le_bytes());
        b[32..40].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> std::result::Result<Self, String> {
        if b[0..4] != MAGIC {
            return Err("the peer does not speak the candle-syncbn protocol (bad magic)".into());
        }
        let kind = Kind::from_u8(b[4]).ok_or_else(|| format!("unknown frame kind {}", b[4]))?;
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Ok(Header {
            kind,
            op: b[5],
            dtype: b[6],
            flags: b[7],
            root: u32_at(8),
            tag: u32_at(12),
            seq: u64_at(16),
            count: u64_at(24),
            len: u64_at(32),
        })
    }

    pub fn call(&self) -> Option<Call> {
        Some(Call {
            op: Op::from_u8(self.op)?,
            dtype: self.dtype,
            count: self.count,
            root: self.root,
            flags: self.flags,
        })
    }

    pub fn tag(&self) -> CallTag {
        CallTag::from_value(self.tag)
    }

    pub fn describe(&self) -> String {
        let of = match self.tag() {
            CallTag::UNTAGGED => String::new(),
            tag => format!(" for {tag}"),
        };
        match self.call() {
            Some(c) => format!("collective #{}: {c}{of}", self.seq),
            None => format!(
                "collective #{}: unknown operation {}{of}",
                self.seq, self.op
            ),
        }
    }
}

/// An interrupted, would-block or timed-out read or write, which the loops
/// retry until their own deadline.
pub(crate) fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads exactly `buf.len()` bytes before `deadline`.
pub(crate) fn read_full(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let now = Instant::now();
        if now >= deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(deadline - now))?;
        match s.read(&mut buf[off..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => off += n,
            Err(e) if is_retry(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `buf` before `deadline`.
pub(crate) fn write_full(s: &mut TcpStream, buf: &[u8], deadline: Instant) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let now = Instant::now();
        if now >= deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        s.set_write_timeout(Some(deadline - now))?;
        match s.write(&buf[off..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if is_retry(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes one frame: `h`, then `payload` (`h.len` bytes).
pub(crate) fn write_frame(
    s: &mut TcpStream,
    h: &Header,
    payload: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    debug_assert_eq!(h.len, payload.len() as u64);
    if payload.len() <= 64 * 1024 {
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
        buf.extend_from_slice(&h.encode());
        buf.extend_from_slice(payload);
        write_full(s, &buf, deadline)
    } else {
        write_full(s, &h.encode(), deadline)?;
        write_full(s, payload, deadline)
    }
}

/// Why talking to `rank` failed, in words.
pub(crate) fn io_error(rank: usize, doing: &str, e: &io::Error, timeout: Duration) -> String {
    io_failure(rank, doing, e, timeout).msg
}

/// [`io_error`] with its kind: a timeout, or `rank` failed.
pub(crate) fn io_failure(rank: usize, doing: &str, e: &io::Error, timeout: Duration) -> Failure {
    let msg = match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            return Failure::new(ErrorKind::Timeout, format!(
                "rank {rank} did not answer within {timeout:?} while {doing} (it stopped responding, or is stuck before this collective)"
            ))
        }
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => format!(
            "rank {rank} closed the connection while {doing} (its process died or failed)"
        ),
        _ => format!("I/O error with rank {rank} while {doing}: {e}"),
    };
    Failure::new(ErrorKind::PeerFailed { rank }, msg)
}

/// The kind of a message that [`io_error`] made (the ring reports its
/// failures as text): the first `rank {r} did not answer within` (a
/// timeout) or `rank {r} closed the connection` / `I/O error with rank {r}`
/// (rank `r` failed) in `msg`.
pub(crate) fn io_error_kind(msg: &str) -> Option<ErrorKind> {
    msg.match_indices("rank ").find_map(|(at, m)| {
        let rest = &msg[at + m.len()..];
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let rank: usize = rest[..digits].parse().ok()?;
        let after = &rest[digits..];
        if after.starts_with(" did not answer within ") {
            Some(ErrorKind::Timeout)
        } else if after.starts_with(" closed the connection while ")
            || (msg[..at].ends_with("I/O error with ") && after.starts_with(" while "))
        {
            Some(ErrorKind::PeerFailed { rank })
        } else {
            None
        }
    })
}

/// The code of an error frame's kind (its `op` and `root` fields: rank 0
/// tells the other ranks what kind of failure it reports; 0: unknown).
pub(crate) fn kind_code(kind: Option<ErrorKind>) -> (u8, u32) {
    match kind {
        None => (0, 0),
        Some(ErrorKind::Timeout) => (1, 0),
        Some(ErrorKind::PeerFailed { rank }) => (2, rank as u32),
        Some(ErrorKind::RanksDisagree) => (3, 0),
        Some(ErrorKind::Rendezvous) => (4, 0),
        Some(ErrorKind::BadCheckpoint) => (5, 0),
        Some(ErrorKind::BadInput) => (6, 0),
    }
}

/// The kind of an error frame ([`kind_code`]), as far as this version knows it.
pub(crate) fn kind_from_code(op: u8, root: u32) -> Option<ErrorKind> {
    Some(match op {
        1 => ErrorKind::Timeout,
        2 => ErrorKind::PeerFailed {
            rank: root as usize,
        },
        3 => ErrorKind::RanksDisagree,
        4 => ErrorKind::Rendezvous,
        5 => ErrorKind::BadCheckpoint,
        6 => ErrorKind::BadInput,
        _ => return None,
    })
}

/// Rank 0's check of rank `r`'s data header `h` against its own call `own`
/// (sequence number, operation, dtype, count, root, flags and tag), made
/// before any of the payload is read: an error that names both calls when
/// they differ.
pub(crate) fn check_peer_header(
    own: &Header,
    r: usize,
    h: &Header,
) -> std::result::Result<(), Failure> {
    if h.kind != Kind::Data {
        return Err(Failure::new(
            ErrorKind::PeerFailed { rank: r },
            format!(
                "rank {r} sent an unexpected {:?} frame in collective #{}",
                h.kind, own.seq
            ),
        ));
    }
    if (h.seq, h.call(), h.tag) == (own.seq, own.call(), own.tag) {
        return Ok(());
    }
    Err(Failure::new(ErrorKind::RanksDisagree, format!(
        "ranks disagree on the collective (a different layer, shape or dtype, e.g. a different channel count, or a different order of calls): rank 0: {}; rank {r}: {}",
        own.describe(),
        h.describe()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let call = Call {
            op: Op::Broadcast,
            dtype: dtype_code(DType::F32),
            count: 12,
            root: 3,
            flags: 0,
        };
        let tag = CallTag::from_value(0xdead_be01);
        let h = Header::data(7, &call, tag, 48);
        let bytes = h.encode();
        assert_eq!(bytes[12..16], 0xdead_be01u32.to_le_bytes());
        assert_eq!(Header::decode(&bytes).unwrap(), h);
        assert_eq!(h.tag(), tag);
        assert_eq!(h.call(), Some(call));
        assert_eq!(call.payload_len(3), 48);
        assert_eq!(call.payload_len(1), 0);
        let mut bad = h.encode();
        bad[0] = b'X';
        assert!(Header::decode(&bad).is_err());
    }

    /// The ring reports failures as text: the kind read back from
    /// `io_error`'s words is the kind `io_failure` gives.
    #[test]
    fn io_error_text_tells_its_kind() {
        let t = Duration::from_secs(3);
        for (kind, want) in [
            (io::ErrorKind::TimedOut, Some(ErrorKind::Timeout)),
            (io::ErrorKind::WouldBlock, Some(ErrorKind::Timeout)),
            (
                io::ErrorKind::UnexpectedEof,
                Some(ErrorKind::PeerFailed { rank: 12 }),
            ),
            (
                io::ErrorKind::BrokenPipe,
                Some(ErrorKind::PeerFailed { rank: 12 }),
            ),
            (
                io::ErrorKind::PermissionDenied,
                Some(ErrorKind::PeerFailed { rank: 12 }),
            ),
        ] {
            let e = io::Error::from(kind);
            let f = io_failure(12, "rank 3 sent its chunk", &e, t);
            assert_eq!(f.kind, want, "{kind:?}");
            assert_eq!(io_error(12, "rank 3 sent its chunk", &e, t), f.msg);
            assert_eq!(
                io_error_kind(&format!("tcp group: {}", f.msg)),
                want,
                "{}",
                f.msg
            );
        }
        assert_eq!(
            io_error_kind("rank 2 expected step 1 of x, rank 1 sent step 2"),
            None
        );
        for code in 0..8 {
            assert_eq!(
                kind_code(kind_from_code(code, 5)).0,
                if code < 7 { code } else { 0 }
            );
        }
        assert_eq!(
            kind_from_code(2, 5),
            Some(ErrorKind::PeerFailed { rank: 5 })
        );
    }
}
