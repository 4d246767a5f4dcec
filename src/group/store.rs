//! The authenticated rendezvous ("store") of the multi-process groups, and the
//! framing of every message they exchange.
//!
//! Rank 0 listens on `MASTER_PORT` (on `MASTER_ADDR` when that is a loopback
//! address, else on every interface); every other rank connects and sends a
//! *hello* frame with its rank, the world size and a nonce. Rank 0 answers with
//! a *challenge* (its nonce and its proof that it knows the job token), the
//! joining rank checks that proof and answers with its own (see
//! [`super::handshake`]: the token never crosses the wire). Rank 0 refuses (and
//! closes) connections that do not speak the protocol, fail the proof, name
//! a rank out of range or one that already joined, and keeps waiting for the
//! real ranks until the rendezvous deadline; each handshake runs on a thread of
//! its own, so silent or slow connections hold up no other (under a flood,
//! idle or unproven handshakes make room, a proven one never: see
//! [`super::pending`]), and what is kept about refused connections is
//! bounded. A joining rank whose connection closes before the welcome tries
//! again until the deadline; a refusal is final. When all ranks have joined it
//! welcomes them, and the connections stay open as a star (every rank linked
//! to rank 0) over which the collectives of the TCP group, and the unique-id
//! exchange and debug checks of the NCCL group, run.
//!
//! Every message is a fixed 40-byte header followed by a payload whose length
//! is bounded (handshake: 64 bytes; errors: [`MAX_ERROR_BYTES`]; data: the
//! group's `max_message_bytes`). A data header carries the call's sequence
//! number, operation, dtype, element count, root and [`CallTag`] (which layer's
//! call it is), so that ranks which do not make the same call get an error that
//! says so, never wrong numbers or a hang. Rank 0 compares each rank's header
//! with its own call before it reads a byte of that rank's payload: a rank
//! that declares another call (a 2 GiB payload against a barrier) is reported
//! at once, and its payload is never read.
//! Every read and write has a deadline. After any failure the star is poisoned:
//! rank 0 tells every rank it can still reach what went wrong, and later calls
//! fail at once with the same message.

use super::handshake::{
    self, printable, Prover, Refusal, Refusals, Transcript, NONCE_LEN, PROOF_LEN,
};
use super::pending::{Pending, Progress, Room, Stage};
use super::CallTag;
use crate::rendezvous::{host_port, is_loopback, listen_addrs, Rendezvous, PORT_FILE_VAR};
use candle::{DType, Result};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MAGIC: [u8; 4] = *b"SBN1";
const HEADER_LEN: usize = 40;
/// The protocol version, checked at the rendezvous (2: mutual authentication
/// by HMAC proofs and a call tag in every data header; 1 sent the token
/// itself and had no tag).
const VERSION: u8 = 2;
/// The longest job token (`SYNCBN_TOKEN`) a rank accepts.
pub(crate) const MAX_TOKEN_BYTES: usize = 1024;
/// The longest error message a frame may carry.
pub(crate) const MAX_ERROR_BYTES: usize = 64 * 1024;
/// How long one handshake may take (rank 0 waiting for a connection's hello
/// and proof, a joining rank for rank 0's challenge) before the connection is
/// dropped. Handshakes run concurrently, so a stray connection that sends
/// nothing holds up no other.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Header flag: the call carries no payload, only its description (debug checks).
pub(crate) const FLAG_META_ONLY: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
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
    fn from_u8(v: u8) -> Option<Self> {
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
    fn payload_len(&self, rank: usize) -> u64 {
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
    fn reply_len(&self) -> u64 {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    kind: Kind,
    op: u8,
    dtype: u8,
    flags: u8,
    root: u32,
    /// The [`CallTag`] of a data frame (bytes 12..16).
    tag: u32,
    seq: u64,
    count: u64,
    len: u64,
}

impl Header {
    fn new(kind: Kind) -> Self {
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

    fn data(seq: u64, call: &Call, tag: CallTag, len: u64) -> Self {
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

    fn encode(&self) -> [u8; HEADER_LEN] {
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

    fn decode(b: &[u8; HEADER_LEN]) -> std::result::Result<Self, String> {
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

    fn call(&self) -> Option<Call> {
        Some(Call {
            op: Op::from_u8(self.op)?,
            dtype: self.dtype,
            count: self.count,
            root: self.root,
            flags: self.flags,
        })
    }

    fn tag(&self) -> CallTag {
        CallTag::from_value(self.tag)
    }

    fn describe(&self) -> String {
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
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
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
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_frame(s: &mut TcpStream, h: &Header, payload: &[u8], deadline: Instant) -> io::Result<()> {
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
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => format!(
            "rank {rank} did not answer within {timeout:?} while {doing} (it stopped responding, or is stuck before this collective)"
        ),
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => format!(
            "rank {rank} closed the connection while {doing} (its process died or failed)"
        ),
        _ => format!("I/O error with rank {rank} while {doing}: {e}"),
    }
}

/// How rank 0 computes a collective's reply from every rank's payload (in rank
/// order); an `Err` is reported to every rank.
pub(crate) type Reduce<'a> = dyn Fn(&[Vec<u8>]) -> std::result::Result<Vec<u8>, String> + 'a;

/// All-reduces of at least this many bytes take the TCP group's ring (the
/// default of [`StoreOptions::ring_min_bytes`]); below it, the star's single
/// round trip through rank 0 is faster than the ring's `2 (W-1)` steps.
const DEFAULT_RING_MIN_BYTES: u64 = 256 * 1024;

/// Tunables of the multi-process groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// How long a collective waits for the other ranks (and a rank for its
    /// socket) before it fails.
    pub timeout: Duration,
    /// How long the rendezvous waits for all ranks to join.
    pub rendezvous_timeout: Duration,
    /// The largest payload a rank accepts in one frame.
    pub max_message_bytes: u64,
    /// TCP group: all-reduces of at least this many bytes run over a ring of
    /// direct rank-to-rank connections (reduce-scatter + all-gather, summed
    /// in the tensor's dtype), smaller ones through rank 0 (summed in f64).
    /// Rank 0's value holds for every rank; `u64::MAX` on any rank opens no
    /// ring links (every all-reduce goes through rank 0). The NCCL group
    /// ignores it.
    pub ring_min_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            timeout: crate::group::DEFAULT_TIMEOUT,
            rendezvous_timeout: crate::group::DEFAULT_TIMEOUT,
            max_message_bytes: 1 << 31,
            ring_min_bytes: DEFAULT_RING_MIN_BYTES,
        }
    }
}

impl StoreOptions {
    /// The defaults, with the timeouts from `SYNCBN_TIMEOUT` (seconds, for both
    /// the collectives and the rendezvous) and
    /// [`ring_min_bytes`](Self::ring_min_bytes) from `SYNCBN_RING_MIN_BYTES`
    /// (`off`: no ring) when set.
    pub fn from_env() -> Result<Self> {
        let mut o = Self::default();
        if let Ok(v) = std::env::var("SYNCBN_RING_MIN_BYTES") {
            o.ring_min_bytes = match v.trim() {
                "off" => u64::MAX,
                t => t.parse().map_err(|_| {
                    candle::Error::Msg(format!(
                        "SYNCBN_RING_MIN_BYTES: expected a number of bytes or `off`, got {v:?}"
                    ))
                })?,
            };
        }
        if let Ok(v) = std::env::var("SYNCBN_TIMEOUT") {
            let secs: f64 = v
                .trim()
                .parse()
                .ok()
                .filter(|s: &f64| *s > 0.0 && s.is_finite())
                .ok_or_else(|| {
                    candle::Error::Msg(format!(
                        "SYNCBN_TIMEOUT: expected a positive number of seconds, got {v:?}"
                    ))
                })?;
            o.timeout = Duration::from_secs_f64(secs);
            o.rendezvous_timeout = o.timeout;
        }
        Ok(o)
    }

    fn validate(&self) -> Result<()> {
        if self.timeout.is_zero() || self.rendezvous_timeout.is_zero() {
            candle::bail!("process group: the timeouts must be positive, got {self:?}")
        }
        Ok(())
    }
}

/// The warning for a group of several ranks without a job token, if `rv` is
/// one (whatever the address: on loopback, every process of the machine can
/// reach rank 0's port).
fn token_warning(rv: &Rendezvous, token: &[u8]) -> Option<String> {
    use crate::rendezvous::TOKEN_VAR;
    (token.is_empty() && rv.world_size > 1).then(|| {
        let who = if is_loopback(&rv.master_addr) {
            "any process on this machine (any user's)"
        } else {
            "any process that reaches rank 0's port"
        };
        format!(
            "candle-syncbn warning: no job token ({TOKEN_VAR}) is set, so {who} can join this group through MASTER_ADDR={} and take a rank's place (a rank of another job on that port included), and can pose as rank 0; set {TOKEN_VAR} to the same secret on every rank (this crate's launcher sets one for the ranks it starts)",
            rv.master_addr,
        )
    })
}

/// Prints [`token_warning`] to stderr, once per process.
fn warn_without_token(rv: &Rendezvous, token: &[u8]) {
    if let Some(w) = token_warning(rv, token) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            let _ = writeln!(std::io::stderr().lock(), "{w}");
        });
    }
}

enum Links {
    /// Rank 0: the connection of rank `r` at index `r - 1` (`None` once it failed).
    Root(Vec<Option<TcpStream>>),
    /// Other ranks: the connection to rank 0.
    Leaf(Option<TcpStream>),
}

/// The star of authenticated connections left by the rendezvous, and the
/// byte-level collectives over it (see the module docs).
pub(crate) struct Star {
    rank: usize,
    world_size: usize,
    options: StoreOptions,
    links: Links,
    seq: u64,
    failure: Option<String>,
}

impl fmt::Debug for Star {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Star")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("seq", &self.seq)
            .field("failed", &self.failure.is_some())
            .finish()
    }
}

impl Star {
    /// Joins the group described by `rv` (rank 0 serves the rendezvous, the
    /// others connect to it). Returns when every rank has joined.
    pub fn connect(rv: &Rendezvous, options: StoreOptions) -> Result<Self> {
        options.validate()?;
        rv.validate()?;
        let token = rv.token.clone().unwrap_or_default().into_bytes();
        if token.len() > MAX_TOKEN_BYTES {
            candle::bail!(
                "rendezvous: the token is {} bytes long, at most {MAX_TOKEN_BYTES} are allowed",
                token.len()
            )
        }
        warn_without_token(rv, &token);
        let links = if rv.world_size == 1 {
            Links::Root(Vec::new())
        } else if rv.rank == 0 {
            Links::Root(serve(rv, &token, &options)?)
        } else {
            Links::Leaf(Some(join(rv, &token, &options)?))
        };
        Ok(Star {
            rank: rv.rank,
            world_size: rv.world_size,
            options,
            links,
            seq: 0,
            failure: None,
        })
    }

    /// The local address of this rank's connection to rank 0 (rank 0: of
    /// its connection to rank 1): an address the other ranks can reach.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.links {
            Links::Root(peers) => peers.iter().flatten().next()?.local_addr().ok(),
            Links::Leaf(link) => link.as_ref()?.local_addr().ok(),
        }
    }

    /// Numbers the next collective #0 again (every rank calls it at the same
    /// point): the group's setup exchanges do not count in what users see.
    pub fn restart_numbering(&mut self) {
        self.seq = 0;
    }

    /// The options the star was made with.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Marks the star failed (if it is not already), tells the other ranks
    /// (rank 0) or closes the link (others), and returns the error.
    pub fn fail(&mut self, msg: String) -> candle::Error {
        if self.failure.is_none() {
            self.failure = Some(msg.clone());
            let deadline = Instant::now() + Duration::from_secs(1).min(self.options.timeout);
            match &mut self.links {
                Links::Root(peers) => {
                    let h = Header {
                        len: msg.len().min(MAX_ERROR_BYTES) as u64,
                        ..Header::new(Kind::Error)
                    };
                    for s in peers.iter_mut().flatten() {
                        let _ = write_frame(s, &h, &msg.as_bytes()[..h.len as usize], deadline);
                        let _ = s.shutdown(Shutdown::Write);
                    }
                }
                Links::Leaf(link) => {
                    if let Some(s) = link.take() {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                }
            }
        }
        candle::Error::Msg(msg)
    }

    /// One collective: every rank sends `payload` described by `call`; rank 0
    /// checks that all ranks made the same call, computes the reply with
    /// `reduce` (given every rank's payload, in rank order) and sends it to all.
    /// Returns the reply.
    pub fn exchange(&mut self, call: Call, payload: &[u8], reduce: &Reduce) -> Result<Vec<u8>> {
        self.exchange_tagged(call, CallTag::UNTAGGED, payload, reduce)
    }

    /// [`Star::exchange`] of the call `tag`: every rank must pass the same tag.
    pub fn exchange_tagged(
        &mut self,
        call: Call,
        tag: CallTag,
        payload: &[u8],
        reduce: &Reduce,
    ) -> Result<Vec<u8>> {
        if let Some(f) = &self.failure {
            candle::bail!("process group is unusable after an earlier failure: {f}")
        }
        let seq = self.seq;
        self.seq += 1;
        if payload.len() as u64 != call.payload_len(self.rank) {
            return Err(self.fail(format!(
                "rank {}: internal error: payload of {} bytes for {call}",
                self.rank,
                payload.len()
            )));
        }
        if self.world_size == 1 {
            return reduce(&[payload.to_vec()]).map_err(|m| self.fail(m));
        }
        let result = match &mut self.links {
            Links::Root(peers) => {
                root_exchange(peers, &self.options, (seq, call, tag), payload, reduce)
            }
            Links::Leaf(link) => match link {
                Some(s) => leaf_exchange(s, self.rank, &self.options, (seq, call, tag), payload),
                None => Err("the connection to rank 0 is closed".to_string()),
            },
        };
        result.map_err(|m| self.fail(m))
    }
}

impl Drop for Star {
    fn drop(&mut self) {
        // Close the links explicitly so peers see EOF right away.
        match &mut self.links {
            Links::Root(peers) => {
                for s in peers.iter_mut().flatten() {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
            Links::Leaf(Some(s)) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Links::Leaf(None) => {}
        }
    }
}

/// Rank 0's check of rank `r`'s data header `h` against its own call `own`
/// (sequence number, operation, dtype, count, root, flags and tag), made
/// before any of the payload is read: an error that names both calls when
/// they differ.
fn check_peer_header(own: &Header, r: usize, h: &Header) -> std::result::Result<(), String> {
    if h.kind != Kind::Data {
        return Err(format!(
            "rank {r} sent an unexpected {:?} frame in collective #{}",
            h.kind, own.seq
        ));
    }
    if (h.seq, h.call(), h.tag) == (own.seq, own.call(), own.tag) {
        return Ok(());
    }
    Err(format!(
        "ranks disagree on the collective (a different layer, shape or dtype, e.g. a different channel count, or a different order of calls): rank 0: {}; rank {r}: {}",
        own.describe(),
        h.describe()
    ))
}

fn root_exchange(
    peers: &mut [Option<TcpStream>],
    options: &StoreOptions,
    (seq, call, tag): (u64, Call, CallTag),
    payload: &[u8],
    reduce: &Reduce,
) -> std::result::Result<Vec<u8>, String> {
    let deadline = Instant::now() + options.timeout;
    let own = Header::data(seq, &call, tag, payload.len() as u64);
    let mut payloads = vec![payload.to_vec()];
    for (i, slot) in peers.iter_mut().enumerate() {
        let r = i + 1;
        let s = slot
            .as_mut()
            .ok_or_else(|| format!("rank {r} is no longer connected"))?;
        let doing = format!("rank 0 waited for its part of collective #{seq} ({call})");
        let mut hb = [0u8; HEADER_LEN];
        read_full(s, &mut hb, deadline).map_err(|e| io_error(r, &doing, &e, options.timeout))?;
        let h = Header::decode(&hb).map_err(|e| format!("rank {r}: {e}"))?;
        // Before reading a byte of the payload: a rank that makes another
        // call (a 2 GiB all-reduce against a barrier, say) is reported at
        // once, and its payload is never read.
        check_peer_header(&own, r, &h)?;
        if h.len != call.payload_len(r) {
            return Err(format!(
                "rank {r} sent a malformed frame in collective #{seq}: {} with a payload of {} bytes",
                h.describe(),
                h.len
            ));
        }
        if h.len > options.max_message_bytes {
            return Err(format!(
                "rank {r} sent {} bytes in collective #{seq}, more than the limit of {} (StoreOptions::max_message_bytes)",
                h.len, options.max_message_bytes
            ));
        }
        let mut p = vec![0u8; h.len as usize];
        read_full(s, &mut p, deadline).map_err(|e| io_error(r, &doing, &e, options.timeout))?;
        payloads.push(p);
    }
    let reply = reduce(&payloads)?;
    if reply.len() as u64 != call.reply_len() {
        return Err(format!(
            "internal error: reply of {} bytes for {call}",
            reply.len()
        ));
    }
    let h = Header::data(seq, &call, tag, reply.len() as u64);
    let deadline = Instant::now() + options.timeout;
    for (i, slot) in peers.iter_mut().enumerate() {
        let r = i + 1;
        if let Some(s) = slot.as_mut() {
            write_frame(s, &h, &reply, deadline).map_err(|e| {
                io_error(
                    r,
                    &format!("rank 0 sent the result of collective #{seq} ({call})"),
                    &e,
                    options.timeout,
                )
            })?;
        }
    }
    Ok(reply)
}

fn leaf_exchange(
    s: &mut TcpStream,
    rank: usize,
    options: &StoreOptions,
    (seq, call, tag): (u64, Call, CallTag),
    payload: &[u8],
) -> std::result::Result<Vec<u8>, String> {
    let start = Instant::now();
    let h = Header::data(seq, &call, tag, payload.len() as u64);
    write_frame(s, &h, payload, start + options.timeout).map_err(|e| {
        io_error(
            0,
            &format!("rank {rank} sent its part of collective #{seq} ({call})"),
            &e,
            options.timeout,
        )
    })?;
    // Rank 0 is the one that waits on every rank and reports which one failed;
    // give it a little longer than its own timeout to say so.
    let grace = (options.timeout / 4).min(Duration::from_secs(5));
    let deadline = start + options.timeout + grace;
    let doing = format!("rank {rank} waited for the result of collective #{seq} ({call})");
    let mut hb = [0u8; HEADER_LEN];
    read_full(s, &mut hb, deadline)
        .map_err(|e| io_error(0, &doing, &e, options.timeout + grace))?;
    let r = Header::decode(&hb).map_err(|e| format!("rank 0: {e}"))?;
    match r.kind {
        Kind::Error => {
            if r.len > MAX_ERROR_BYTES as u64 {
                return Err(format!(
                    "rank 0 reported an error of {} bytes (too long to read)",
                    r.len
                ));
            }
            let mut m = vec![0u8; r.len as usize];
            read_full(s, &mut m, deadline).map_err(|e| io_error(0, &doing, &e, options.timeout))?;
            Err(String::from_utf8_lossy(&m).into_owned())
        }
        Kind::Data => {
            if r.seq != seq || r.call() != Some(call) || r.tag() != tag || r.len != call.reply_len()
            {
                return Err(format!(
                    "rank {rank} expected the result of collective #{seq} ({call}), rank 0 answered with {} ({} bytes)",
                    r.describe(),
                    r.len
                ));
            }
            let mut p = vec![0u8; r.len as usize];
            read_full(s, &mut p, deadline).map_err(|e| io_error(0, &doing, &e, options.timeout))?;
            Ok(p)
        }
        k => Err(format!(
            "rank 0 sent an unexpected {k:?} frame in collective #{seq}"
        )),
    }
}

/// How many handshakes rank 0 runs at once (at least the world size); past
/// that, an idle or unproven pending connection is closed to make room (see
/// [`super::pending`]: one that proved the token never is).
const MAX_PENDING_HANDSHAKES: usize = 128;

/// What a handshake thread hands back to rank 0's accept loop: its id, the
/// peer's address, and the authenticated rank with its connection, or why it
/// was refused.
type HandshakeDone = (
    u64,
    SocketAddr,
    std::result::Result<(usize, TcpStream), Refusal>,
);

/// Writes a refusal frame (best effort: the peer may be gone or hostile).
fn send_refuse(s: &mut TcpStream, reason: &str) {
    let reason = &reason.as_bytes()[..reason.len().min(MAX_ERROR_BYTES)];
    let h = Header {
        len: reason.len() as u64,
        ..Header::new(Kind::Refuse)
    };
    let _ = write_frame(s, &h, reason, Instant::now() + Duration::from_secs(1));
}

/// How many connections the kernel queues for rank 0's accept loop (std
/// listens with 128). When the queue is full the kernel drops new SYNs, and
/// a valid rank that connects during a flood waits a second or more for
/// the kernel to send its SYN again; a deeper queue gives the accept loop
/// time to take it, and the loop closes idle connections, not valid ranks.
const LISTEN_BACKLOG: i32 = 4096;

/// Deepens `l`'s accept queue to [`LISTEN_BACKLOG`] (Linux takes a second
/// `listen` on a listening socket as a new backlog, capped by
/// `net.core.somaxconn`); best effort.
fn deepen_backlog(l: &TcpListener) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: `listen` on a socket this function borrows; it reads no
        // memory of ours.
        let _ = unsafe { libc::listen(l.as_raw_fd(), LISTEN_BACKLOG) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (l, LISTEN_BACKLOG);
}

/// Listens where [`listen_addrs`] says (the first address that binds).
fn listen(rv: &Rendezvous) -> Result<TcpListener> {
    let addrs = listen_addrs(&rv.master_addr, rv.master_port);
    let mut errors = Vec::new();
    for a in &addrs {
        match TcpListener::bind(a.as_str()) {
            Ok(l) => {
                deepen_backlog(&l);
                return Ok(l);
            }
            Err(e) => errors.push(format!("{a}: {e}")),
        }
    }
    candle::bail!(
        "rendezvous: rank 0 could not listen for MASTER_ADDR={} MASTER_PORT={} ({})",
        rv.master_addr,
        rv.master_port,
        errors.join("; ")
    )
}

/// Rank 0: accepts connections until every rank has joined (or the deadline).
/// Each connection's handshake runs on a thread of its own with a deadline of
/// [`HELLO_TIMEOUT`], so idle, slow or hostile connections cannot hold up a
/// valid rank; at most [`MAX_PENDING_HANDSHAKES`] run at once.
fn serve(rv: &Rendezvous, token: &[u8], options: &StoreOptions) -> Result<Vec<Option<TcpStream>>> {
    let deadline = Instant::now() + options.rendezvous_timeout;
    // A port file left by an earlier job must not send the ranks there while
    // rank 0 starts: remove it first, publish the new port once listening.
    if let Some(path) = &rv.port_file {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => candle::bail!(
                "rendezvous: could not remove the old port file {path:?} ({PORT_FILE_VAR}): {e}"
            ),
        }
    }
    let listener = listen(rv)?;
    let local = listener.local_addr()?;
    if let Some(path) = &rv.port_file {
        crate::atomic_file::write_atomic(path, local.port().to_string().as_bytes()).map_err(
            |e| {
                candle::Error::Msg(format!(
                    "rendezvous: could not write the port file {path:?}: {e}"
                ))
            },
        )?;
    }
    listener.set_nonblocking(true)?;
    let world = rv.world_size;
    let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
    let mut joined = 0;
    let mut refused = Refusals::default();
    let (tx, rx) = std::sync::mpsc::channel::<HandshakeDone>();
    let mut pending = Pending::new(MAX_PENDING_HANDSHAKES.max(world));
    let mut next_id = 0u64;
    let token: Arc<[u8]> = token.into();
    let result = loop {
        // Accept what is waiting, one handshake thread per connection (at
        // most a few hundred per round, so that a flood still lets this loop
        // collect the results and see the deadline).
        let mut busy = true;
        for _ in 0..256 {
            let (s, from) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    busy = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Out of file descriptors and the like: the connection is
                // lost, the rendezvous goes on.
                Err(e) => {
                    refused.record(
                        &local.to_string(),
                        Refusal::new("accept failed", e.to_string()),
                    );
                    busy = false;
                    break;
                }
            };
            match pending.make_room() {
                Room::Free => {}
                Room::Evicted(addr, stage) => refused.record(
                    &addr.to_string(),
                    Refusal::new(
                        "closed to make room (too many pending handshakes)",
                        format!(
                            "{} handshakes were pending; this one had {}",
                            pending.max(),
                            match stage {
                                Stage::Connected => "sent no hello",
                                _ => "not proved the token",
                            }
                        ),
                    ),
                ),
                Room::Full => {
                    // Closed before a challenge: a joining rank tries again.
                    let _ = s.shutdown(Shutdown::Both);
                    refused.record(
                        &from.to_string(),
                        Refusal::new(
                            "refused (too many pending handshakes)",
                            format!(
                                "all {} pending handshakes had proved the token",
                                pending.max()
                            ),
                        ),
                    );
                    continue;
                }
            }
            let id = next_id;
            next_id += 1;
            let clone = match s.try_clone() {
                Ok(c) => c,
                Err(e) => {
                    refused.record(
                        &from.to_string(),
                        Refusal::new("could not start a handshake", e.to_string()),
                    );
                    continue;
                }
            };
            let hs_deadline = (Instant::now() + HELLO_TIMEOUT).min(deadline);
            let progress = Progress::new();
            let spawned = spawn_handshake(
                (id, s, from),
                (hs_deadline, progress.clone()),
                token.clone(),
                world,
                tx.clone(),
            );
            match spawned {
                Ok(_) => pending.insert(id, from, clone, progress),
                Err(e) => {
                    let _ = clone.shutdown(Shutdown::Both);
                    refused.record(
                        &from.to_string(),
                        Refusal::new("could not start a handshake", e.to_string()),
                    );
                }
            }
        }
        // Collect finished handshakes (waiting a little for one, unless more
        // connections are waiting: a full backlog drops the next ones' SYNs,
        // which costs a valid rank a second until the kernel sends it again).
        let mut next = if busy {
            rx.try_recv().ok()
        } else {
            rx.recv_timeout(Duration::from_millis(5)).ok()
        };
        while let Some((id, from, r)) = next {
            // A connection closed to make room was already counted.
            if pending.remove(id) {
                match r {
                    Ok((rank, mut s)) if peers[rank - 1].is_some() => {
                        let why = format!("rank {rank} has already joined (duplicate RANK)");
                        send_refuse(&mut s, &why);
                        let _ = s.shutdown(Shutdown::Both);
                        refused.record(&from.to_string(), Refusal::new("duplicate rank", why));
                    }
                    Ok((rank, s)) => {
                        peers[rank - 1] = Some(s);
                        joined += 1;
                    }
                    Err(refusal) => refused.record(&from.to_string(), refusal),
                }
            }
            next = rx.try_recv().ok();
        }
        if joined == world - 1 {
            break Ok(());
        }
        if Instant::now() >= deadline {
            let missing: Vec<usize> = (1..world).filter(|r| peers[r - 1].is_none()).collect();
            break Err(candle::Error::Msg(format!(
                "rendezvous: rank 0 waited {:?} on {local} but rank(s) {missing:?} of {world} did not join{}",
                options.rendezvous_timeout,
                refused.summary()
            )));
        }
    };
    // Handshakes still running end now (their threads see the closed socket).
    pending.close_all();
    if let Err(e) = result {
        // The ranks that joined learn why, and stop trying (a connection
        // closed without a word makes a joining rank try again).
        let msg = e.to_string();
        let h = Header {
            len: msg.len().min(MAX_ERROR_BYTES) as u64,
            ..Header::new(Kind::Error)
        };
        let until = Instant::now() + Duration::from_secs(1);
        for s in peers.iter_mut().flatten() {
            let _ = write_frame(s, &h, &msg.as_bytes()[..h.len as usize], until);
            let _ = s.shutdown(Shutdown::Both);
        }
        return Err(e);
    }
    let welcome = Header {
        count: world as u64,
        ..Header::new(Kind::Welcome)
    };
    for (i, s) in peers.iter_mut().enumerate() {
        if let Some(s) = s {
            write_frame(
                s,
                &welcome,
                &[],
                deadline.max(Instant::now() + Duration::from_secs(1)),
            )
            .map_err(|e| {
                candle::Error::Msg(format!(
                    "rendezvous: {}",
                    io_error(i + 1, "rank 0 welcomed it", &e, options.timeout)
                ))
            })?;
        }
    }
    Ok(peers)
}

/// Runs rank 0's side of the handshake of connection `id` on a thread of its
/// own, which refuses the peer if it fails and hands the result to `done`.
fn spawn_handshake(
    (id, mut s, from): (u64, TcpStream, SocketAddr),
    (deadline, progress): (Instant, Arc<Progress>),
    token: Arc<[u8]>,
    world: usize,
    done: std::sync::mpsc::Sender<HandshakeDone>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("syncbn-handshake".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let r = handshake(&mut s, deadline, &token, world, &progress);
            if let Err(refusal) = &r {
                send_refuse(&mut s, &format!("{}: {}", refusal.kind, refusal.detail));
                let _ = s.shutdown(Shutdown::Both);
            }
            let _ = done.send((id, from, r.map(|rank| (rank, s))));
        })
        .map(|_| ())
}

/// Reads one frame header, or says why not (`what`: the frame awaited).
fn read_header(
    s: &mut TcpStream,
    deadline: Instant,
    what: &str,
) -> std::result::Result<Header, Refusal> {
    let mut hb = [0u8; HEADER_LEN];
    read_full(s, &mut hb, deadline).map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            Refusal::new("timed out", format!("no {what} within {HELLO_TIMEOUT:?}"))
        }
        _ => Refusal::new("closed", format!("no {what} ({e})")),
    })?;
    Header::decode(&hb).map_err(|e| Refusal::new("malformed frame", e))
}

/// Rank 0's side of one handshake (see [`crate::group::handshake`]): reads the
/// hello, proves that it knows the token, checks the joining rank's proof, its
/// world size and rank. Returns the rank, or why it is refused. Marks its
/// `progress` as it goes, and stops if the accept loop closed it to make room.
fn handshake(
    s: &mut TcpStream,
    deadline: Instant,
    token: &[u8],
    world: usize,
    progress: &Progress,
) -> std::result::Result<usize, Refusal> {
    let evicted = || Refusal::new("closed to make room", "(already counted)");
    s.set_nonblocking(false)
        .map_err(|e| Refusal::new("closed", e.to_string()))?;
    let _ = s.set_nodelay(true);
    let h = read_header(s, deadline, "hello")?;
    if h.kind != Kind::Hello {
        return Err(Refusal::new(
            "not a hello",
            format!("expected a hello frame, got {:?}", h.kind),
        ));
    }
    if h.flags != VERSION {
        return Err(Refusal::new(
            "protocol version mismatch",
            format!(
                "rank 0 speaks version {VERSION}, the peer version {}",
                h.flags
            ),
        ));
    }
    if h.len != NONCE_LEN as u64 {
        return Err(Refusal::new(
            "malformed hello",
            format!("a hello carries {NONCE_LEN} bytes, this one {}", h.len),
        ));
    }
    let mut t = Transcript {
        version: VERSION,
        world: h.count,
        rank: h.root,
        joiner_nonce: [0; NONCE_LEN],
        root_nonce: handshake::nonce().map_err(|e| Refusal::new("internal error", e))?,
    };
    read_full(s, &mut t.joiner_nonce, deadline)
        .map_err(|e| Refusal::new("closed", format!("truncated hello ({e})")))?;
    if !progress.advance(Stage::Connected, Stage::Challenged) {
        return Err(evicted());
    }
    let mut challenge = [0u8; NONCE_LEN + PROOF_LEN];
    challenge[..NONCE_LEN].copy_from_slice(&t.root_nonce);
    challenge[NONCE_LEN..].copy_from_slice(&t.prove(token, Prover::Root));
    let ch = Header {
        flags: VERSION,
        len: challenge.len() as u64,
        ..Header::new(Kind::Challenge)
    };
    write_frame(s, &ch, &challenge, deadline)
        .map_err(|e| Refusal::new("closed", format!("could not send the challenge ({e})")))?;
    let p = read_header(s, deadline, "proof")?;
    match p.kind {
        Kind::Proof if p.len == PROOF_LEN as u64 => {}
        Kind::Refuse => {
            let mut m = vec![0u8; (p.len as usize).min(1024)];
            let _ = read_full(s, &mut m, deadline);
            return Err(Refusal::new(
                "the joining process refused rank 0's proof",
                String::from_utf8_lossy(&m).into_owned(),
            ));
        }
        k => {
            return Err(Refusal::new(
                "malformed proof",
                format!(
                    "expected a proof of {PROOF_LEN} bytes, got {k:?} of {}",
                    p.len
                ),
            ))
        }
    }
    let mut proof = [0u8; PROOF_LEN];
    read_full(s, &mut proof, deadline)
        .map_err(|e| Refusal::new("closed", format!("truncated proof ({e})")))?;
    // From here on this connection is never closed to make room.
    if !progress.advance(Stage::Challenged, Stage::Proven) {
        return Err(evicted());
    }
    if !t.verify(token, Prover::Joiner, &proof) {
        return Err(Refusal::new(
            "authentication failed",
            "wrong job token (SYNCBN_TOKEN): the peer's proof does not match rank 0's token",
        ));
    }
    if h.count != world as u64 {
        return Err(Refusal::new(
            "world size mismatch",
            format!(
                "rank 0 expects WORLD_SIZE={world}, the peer says {}",
                h.count
            ),
        ));
    }
    let r = h.root as usize;
    if r == 0 || r >= world {
        return Err(Refusal::new(
            "rank out of range",
            format!("rank {r} is out of range 1..{world} for a joining rank"),
        ));
    }
    Ok(r)
}

/// Where a joining rank finds rank 0's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortSource {
    /// `MASTER_PORT`.
    Fixed(u16),
    /// The port file (`MASTER_PORT=0`), read again before every attempt: the
    /// file may be left over from an earlier job until rank 0 replaces it.
    File,
}

fn read_port(path: &Path) -> Option<u16> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&p| p != 0)
}

/// Why one attempt to join failed.
enum JoinFailure {
    /// Nothing final was learned (the connection closed before rank 0
    /// answered or welcomed: a full rank 0 makes room, or a process that is
    /// not rank 0): try again until the deadline.
    Retry(String),
    /// The listener did not prove that it is rank 0 of this job: try again
    /// when the port came from the port file (which may still be stale),
    /// fail at once with a fixed `MASTER_PORT` (our rank 0 cannot listen on a
    /// port that another process holds, so waiting cannot help).
    NotRank0(String),
    /// Rank 0 (authenticated) refused this rank, or the rank itself failed.
    Final(String),
}

/// Other ranks: connects to rank 0 (retrying until it listens), proves the
/// token and checks rank 0's proof, then waits for the welcome.
fn join(rv: &Rendezvous, token: &[u8], options: &StoreOptions) -> Result<TcpStream> {
    let start = Instant::now();
    let deadline = start + options.rendezvous_timeout;
    let source = match (rv.master_port, &rv.port_file) {
        (0, Some(_)) => PortSource::File,
        (0, None) => candle::bail!(
            "rendezvous: MASTER_PORT is 0 but no port file ({PORT_FILE_VAR}) tells where rank 0 listens"
        ),
        (p, _) => PortSource::Fixed(p),
    };
    let mut last = String::from("no attempt");
    // The last listener that failed to prove it is rank 0: what the error
    // names first, since later attempts may only find the port closed.
    let mut not_rank0: Option<String> = None;
    let mut pause = Duration::from_millis(20);
    loop {
        if Instant::now() >= deadline {
            let why = match &not_rank0 {
                Some(m) if *m != last => format!("{m} (last attempt: {last})"),
                _ => last,
            };
            candle::bail!(
                "rendezvous: rank {} could not join rank 0 within {:?}: {why}",
                rv.rank,
                options.rendezvous_timeout
            )
        }
        std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        pause = Duration::from_millis(50);
        let port = match source {
            PortSource::Fixed(p) => p,
            PortSource::File => {
                let path = rv.port_file.as_deref().expect("port file");
                match read_port(path) {
                    Some(p) => p,
                    None => {
                        last = format!("rank 0 did not publish its port in {path:?}");
                        continue;
                    }
                }
            }
        };
        let addr = host_port(&rv.master_addr, port);
        let s = match connect(&addr, deadline) {
            Ok(s) => s,
            Err(e) => {
                last = format!("could not connect to rank 0 at {addr}: {e}");
                continue;
            }
        };
        match join_once(s, rv, token, deadline) {
            Ok(s) => return Ok(s),
            Err(JoinFailure::Retry(m)) => last = format!("{addr}: {m}"),
            Err(JoinFailure::NotRank0(m)) if source == PortSource::File => {
                last = format!("{addr}: {m}");
                not_rank0 = Some(last.clone());
                pause = Duration::from_millis(200);
            }
            Err(JoinFailure::NotRank0(m) | JoinFailure::Final(m)) => {
                candle::bail!("rendezvous: rank {} at {addr}: {m}", rv.rank)
            }
        }
    }
}

/// Connects to `addr` (any of its addresses), giving up at `deadline`.
fn connect(addr: &str, deadline: Instant) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
    for a in addr.to_socket_addrs()? {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(
            &a,
            left.clamp(Duration::from_millis(10), Duration::from_secs(5)),
        ) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// One handshake with whatever listens at the other end of `s`.
fn join_once(
    mut s: TcpStream,
    rv: &Rendezvous,
    token: &[u8],
    deadline: Instant,
) -> std::result::Result<TcpStream, JoinFailure> {
    let _ = s.set_nodelay(true);
    let mut t = Transcript {
        version: VERSION,
        world: rv.world_size as u64,
        rank: rv.rank as u32,
        joiner_nonce: handshake::nonce().map_err(JoinFailure::Final)?,
        root_nonce: [0; NONCE_LEN],
    };
    let hello = Header {
        flags: VERSION,
        root: t.rank,
        count: t.world,
        len: NONCE_LEN as u64,
        ..Header::new(Kind::Hello)
    };
    let lost = |doing: &str, e: io::Error| {
        JoinFailure::Retry(format!("the connection closed while {doing} ({e})"))
    };
    write_frame(&mut s, &hello, &t.joiner_nonce, deadline).map_err(|e| lost("saying hello", e))?;
    // Rank 0 answers a hello at once; whoever does not is not rank 0.
    let hs_deadline = (Instant::now() + HELLO_TIMEOUT).min(deadline);
    let mut hb = [0u8; HEADER_LEN];
    read_full(&mut s, &mut hb, hs_deadline).map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => JoinFailure::NotRank0(format!(
            "the listener did not answer the hello in time (rank 0 answers within {HELLO_TIMEOUT:?})"
        )),
        _ => lost("waiting for rank 0's challenge", e),
    })?;
    let unproven = |what: String| {
        JoinFailure::NotRank0(format!(
            "authentication failed: the listener answered the hello with {what} instead of proving that it knows the job token (not rank 0 of this job, or a rank 0 of another protocol version)"
        ))
    };
    let h = Header::decode(&hb).map_err(unproven)?;
    match h.kind {
        Kind::Challenge if h.len == (NONCE_LEN + PROOF_LEN) as u64 => {}
        Kind::Refuse => {
            return Err(JoinFailure::NotRank0(format!(
                "refused before authentication: {}",
                read_text(&mut s, h.len)
            )))
        }
        k => return Err(unproven(format!("a {k:?} frame of {} bytes", h.len))),
    }
    let mut challenge = [0u8; NONCE_LEN + PROOF_LEN];
    read_full(&mut s, &mut challenge, hs_deadline).map_err(|e| lost("reading the challenge", e))?;
    t.root_nonce.copy_from_slice(&challenge[..NONCE_LEN]);
    if !t.verify(token, Prover::Root, &challenge[NONCE_LEN..]) {
        send_refuse(
            &mut s,
            &format!(
                "rank {} could not verify rank 0's proof: wrong job token (SYNCBN_TOKEN) on one side",
                rv.rank
            ),
        );
        let _ = s.shutdown(Shutdown::Both);
        return Err(JoinFailure::NotRank0(
            "authentication failed: the listener did not prove that it knows the job token (a wrong job token SYNCBN_TOKEN on one side, or a process that is not rank 0 of this job); this rank sent nothing that reveals its token".into(),
        ));
    }
    let proof = Header {
        flags: VERSION,
        len: PROOF_LEN as u64,
        ..Header::new(Kind::Proof)
    };
    write_frame(&mut s, &proof, &t.prove(token, Prover::Joiner), deadline)
        .map_err(|e| lost("sending the proof", e))?;
    // Rank 0 welcomes every rank once all have joined. A connection that
    // closes without a word before that was dropped (rank 0 closes unproven
    // handshakes to make room under a flood, and may have closed this one
    // just before the proof arrived): try again. Refusals and rank 0's own
    // failure come as frames, and are final.
    read_full(&mut s, &mut hb, deadline + Duration::from_secs(1)).map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => JoinFailure::Final(format!(
            "no welcome from rank 0 ({e}); not all ranks joined in time?"
        )),
        _ => lost("waiting for the welcome", e),
    })?;
    let h = Header::decode(&hb).map_err(JoinFailure::Final)?;
    match h.kind {
        Kind::Welcome => Ok(s),
        Kind::Refuse => Err(JoinFailure::Final(format!(
            "rank 0 refused rank {}: {}",
            rv.rank,
            read_text(&mut s, h.len)
        ))),
        Kind::Error => Err(JoinFailure::Final(format!(
            "rank 0 failed the rendezvous: {}",
            read_text(&mut s, h.len)
        ))),
        k => Err(JoinFailure::Final(format!(
            "unexpected {k:?} frame from rank 0"
        ))),
    }
}

/// Reads a refusal's text (at most [`MAX_ERROR_BYTES`], one line).
fn read_text(s: &mut TcpStream, len: u64) -> String {
    let mut m = vec![0u8; (len as usize).min(MAX_ERROR_BYTES)];
    let _ = read_full(s, &mut m, Instant::now() + Duration::from_secs(1));
    printable(&String::from_utf8_lossy(&m), 1000)
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

    /// Every rank of a group of several warns without a token, on loopback
    /// too (issue 29 item 8: there any local process could take a rank's
    /// place unannounced); never with a token, nor alone.
    #[test]
    fn warns_of_a_group_without_token() {
        let rv = |rank, world, addr: &str| Rendezvous::new(rank, world, addr, 29500).unwrap();
        let w = token_warning(&rv(0, 2, "node0"), b"").unwrap();
        assert!(
            w.starts_with("candle-syncbn warning: no job token (SYNCBN_TOKEN) is set, so any process that reaches rank 0's port can join this group through MASTER_ADDR=node0")
                && w.ends_with("set SYNCBN_TOKEN to the same secret on every rank (this crate's launcher sets one for the ranks it starts)"),
            "{w}"
        );
        for a in ["127.0.0.1", "localhost", "::1", "[::1]"] {
            for rank in [0, 1, 3] {
                let w = token_warning(&rv(rank, 4, a), b"").unwrap();
                assert!(
                    w.contains("so any process on this machine (any user's) can join this group"),
                    "{a}: {w}"
                );
            }
            assert_eq!(token_warning(&rv(1, 2, a), b"s3cret"), None, "{a}");
            assert_eq!(token_warning(&rv(0, 1, a), b""), None, "{a}");
        }
        assert_eq!(token_warning(&rv(1, 2, "node0"), b"s3cret"), None);
    }
}

#[cfg(test)]
mod star_tests {
    use super::*;

    /// Runs `f(star)` on `world` ranks (threads) joined through a port file.
    fn run<T: Send + 'static>(
        world: usize,
        f: impl Fn(Star) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let dir = std::env::temp_dir().join(format!(
            "syncbn-star-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let pf = dir.join("port");
        let _ = std::fs::remove_file(&pf);
        let opts = StoreOptions {
            timeout: Duration::from_secs(5),
            rendezvous_timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let hs: Vec<_> = (0..world)
            .map(|r| {
                let (f, pf) = (f.clone(), pf.clone());
                std::thread::spawn(move || {
                    let rv = Rendezvous::new(r, world, "127.0.0.1", 0)
                        .unwrap()
                        .with_port_file(pf)
                        .with_token("t");
                    f(Star::connect(&rv, opts).unwrap())
                })
            })
            .collect();
        let out = hs.into_iter().map(|h| h.join().unwrap()).collect();
        let _ = std::fs::remove_dir_all(&dir);
        out
    }

    /// The NCCL debug mode's agreement check: a metadata-only exchange.
    #[test]
    fn meta_only_check_agrees_and_disagrees() {
        let out = run(3, |mut star| {
            let call = |count| Call {
                op: Op::AllReduceSum,
                dtype: dtype_code(DType::F32),
                count,
                root: 0,
                flags: FLAG_META_ONLY,
            };
            let first = star.exchange(call(12), &[], &|_| Ok(Vec::new()));
            let count = if star.rank == 2 { 15 } else { 12 };
            let second = star.exchange(call(count), &[], &|_| Ok(Vec::new()));
            (first.map(|v| v.len()), second.map_err(|e| e.to_string()))
        });
        for (first, second) in out {
            assert_eq!(first.unwrap(), 0);
            let e = second.unwrap_err();
            assert!(
                e.contains("rank 2: collective #1: all_reduce_sum of 15 f32 (check)"),
                "{e}"
            );
        }
    }

    /// The same check with call tags (the NCCL debug mode passes the layers'
    /// tags): equal tags pass, a different tag on one rank fails on all.
    #[test]
    fn meta_only_check_compares_tags() {
        let layer = crate::group::LayerNames::default().register("star-test.bn");
        let tag = move |index| CallTag::forward(layer, crate::group::Part::Statistics, index);
        let out = run(3, move |mut star| {
            let call = Call {
                op: Op::AllReduceSum,
                dtype: dtype_code(DType::F64),
                count: 6,
                root: 0,
                flags: FLAG_META_ONLY,
            };
            let check = |star: &mut Star, t| {
                star.exchange_tagged(call, t, &[], &|_| Ok(Vec::new()))
                    .map(|v| v.len())
            };
            let first = check(&mut star, tag(0));
            let index = if star.rank == 1 { 2 } else { 1 };
            let second = check(&mut star, tag(index)).map_err(|e| e.to_string());
            (first, second)
        });
        for (first, second) in out {
            assert_eq!(first.unwrap(), 0);
            let e = second.unwrap_err();
            assert!(e.contains("disagree"), "{e}");
            assert!(
                e.contains("rank 0: collective #1: all_reduce_sum of 6 f64 (check) for SyncBatchNorm 'star-test.bn': forward statistics, call 1 mod 32"),
                "{e}"
            );
            assert!(
                e.contains("rank 1: collective #1: all_reduce_sum of 6 f64"),
                "{e}"
            );
            assert!(
                e.contains("'star-test.bn': forward statistics, call 2 mod 32"),
                "{e}"
            );
        }
    }
}
