//! The star of authenticated connections left by the rendezvous (every rank
//! linked to rank 0), and the byte-level collectives over it: those of the
//! TCP group, and the unique-id exchange and debug checks of the NCCL group.
//!
//! In each collective every rank sends its header and payload to rank 0.
//! Rank 0 compares each rank's header with its own call before it reads a
//! byte of that rank's payload ([`check_peer_header`]): a rank that declares
//! another call (a 2 GiB payload against a barrier) is reported at once, and
//! its payload is never read. Rank 0 then computes the reply and sends it to
//! every rank. Every read and write has a deadline. After any failure the star
//! is poisoned: rank 0 tells every rank it can still reach what went wrong,
//! and later calls fail at once with the same message.

use super::rendezvous::{join, serve, warn_without_token, Rendezvous, MAX_TOKEN_BYTES};
use super::wire::{
    check_peer_header, io_failure, kind_code, kind_from_code, read_full, write_frame, Call, Header,
    Kind, HEADER_LEN, MAX_ERROR_BYTES,
};
use super::{CallTag, StoreOptions};
use crate::error::{bail_kind, ErrorKind, Failure};
use candle::Result;
use std::fmt;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How rank 0 computes a collective's reply from every rank's payload (in rank
/// order); an `Err` is reported to every rank.
pub(crate) type Reduce<'a> = dyn Fn(&[Vec<u8>]) -> std::result::Result<Vec<u8>, String> + 'a;

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
    failure: Option<Failure>,
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
            bail_kind!(
                ErrorKind::BadInput,
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
        self.fail_with(msg.into())
    }

    /// [`Star::fail`] with the failure's kind, which rank 0 passes on to the
    /// other ranks in its error frame.
    pub fn fail_with(&mut self, failure: Failure) -> candle::Error {
        if self.failure.is_none() {
            self.failure = Some(failure.clone());
            let msg = &failure.msg;
            let deadline = Instant::now() + Duration::from_secs(1).min(self.options.timeout);
            match &mut self.links {
                Links::Root(peers) => {
                    let (op, root) = kind_code(failure.kind);
                    let h = Header {
                        len: msg.len().min(MAX_ERROR_BYTES) as u64,
                        op,
                        root,
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
        failure.into_error()
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
            return Err(f
                .clone()
                .map_msg(|f| format!("process group is unusable after an earlier failure: {f}"))
                .into_error()
                .bt());
        }
        let seq = self.seq;
        self.seq += 1;
        if payload.len() as u64 != call.payload_len(self.rank) {
            return Err(self.fail_with(Failure::new(
                ErrorKind::BadInput,
                format!(
                    "rank {}: internal error: payload of {} bytes for {call}",
                    self.rank,
                    payload.len()
                ),
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
                None => Err(Failure::new(
                    ErrorKind::PeerFailed { rank: 0 },
                    "the connection to rank 0 is closed",
                )),
            },
        };
        result.map_err(|f| self.fail_with(f))
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

fn root_exchange(
    peers: &mut [Option<TcpStream>],
    options: &StoreOptions,
    (seq, call, tag): (u64, Call, CallTag),
    payload: &[u8],
    reduce: &Reduce,
) -> std::result::Result<Vec<u8>, Failure> {
    let deadline = Instant::now() + options.timeout;
    let own = Header::data(seq, &call, tag, payload.len() as u64);
    let mut payloads = vec![payload.to_vec()];
    for (i, slot) in peers.iter_mut().enumerate() {
        let r = i + 1;
        let s = slot.as_mut().ok_or_else(|| {
            Failure::new(
                ErrorKind::PeerFailed { rank: r },
                format!("rank {r} is no longer connected"),
            )
        })?;
        let doing = format!("rank 0 waited for its part of collective #{seq} ({call})");
        let mut hb = [0u8; HEADER_LEN];
        read_full(s, &mut hb, deadline).map_err(|e| io_failure(r, &doing, &e, options.timeout))?;
        let h = Header::decode(&hb).map_err(|e| {
            Failure::new(ErrorKind::PeerFailed { rank: r }, format!("rank {r}: {e}"))
        })?;
        // Before reading a byte of the payload: a rank that makes another
        // call (a 2 GiB all-reduce against a barrier, say) is reported at
        // once, and its payload is never read.
        check_peer_header(&own, r, &h)?;
        if h.len != call.payload_len(r) {
            return Err(Failure::new(ErrorKind::PeerFailed { rank: r }, format!(
                "rank {r} sent a malformed frame in collective #{seq}: {} with a payload of {} bytes",
                h.describe(),
                h.len
            )));
        }
        if h.len > options.max_message_bytes {
            return Err(Failure::new(ErrorKind::BadInput, format!(
                "rank {r} sent {} bytes in collective #{seq}, more than the limit of {} (StoreOptions::max_message_bytes)",
                h.len, options.max_message_bytes
            )));
        }
        let mut p = vec![0u8; h.len as usize];
        read_full(s, &mut p, deadline).map_err(|e| io_failure(r, &doing, &e, options.timeout))?;
        payloads.push(p);
    }
    let reply = reduce(&payloads)?;
    if reply.len() as u64 != call.reply_len() {
        return Err(format!("internal error: reply of {} bytes for {call}", reply.len()).into());
    }
    let h = Header::data(seq, &call, tag, reply.len() as u64);
    let deadline = Instant::now() + options.timeout;
    for (i, slot) in peers.iter_mut().enumerate() {
        let r = i + 1;
        if let Some(s) = slot.as_mut() {
            write_frame(s, &h, &reply, deadline).map_err(|e| {
                io_failure(
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
) -> std::result::Result<Vec<u8>, Failure> {
    let start = Instant::now();
    let h = Header::data(seq, &call, tag, payload.len() as u64);
    write_frame(s, &h, payload, start + options.timeout).map_err(|e| {
        io_failure(
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
        .map_err(|e| io_failure(0, &doing, &e, options.timeout + grace))?;
    let r = Header::decode(&hb)
        .map_err(|e| Failure::new(ErrorKind::PeerFailed { rank: 0 }, format!("rank 0: {e}")))?;
    match r.kind {
        Kind::Error => {
            if r.len > MAX_ERROR_BYTES as u64 {
                return Err(Failure::new(
                    ErrorKind::PeerFailed { rank: 0 },
                    format!(
                        "rank 0 reported an error of {} bytes (too long to read)",
                        r.len
                    ),
                ));
            }
            let mut m = vec![0u8; r.len as usize];
            read_full(s, &mut m, deadline)
                .map_err(|e| io_failure(0, &doing, &e, options.timeout))?;
            Err(Failure {
                kind: kind_from_code(r.op, r.root),
                msg: String::from_utf8_lossy(&m).into_owned(),
            })
        }
        Kind::Data => {
            if r.seq != seq || r.call() != Some(call) || r.tag() != tag || r.len != call.reply_len()
            {
                return Err(Failure::new(ErrorKind::RanksDisagree, format!(
                    "rank {rank} expected the result of collective #{seq} ({call}), rank 0 answered with {} ({} bytes)",
                    r.describe(),
                    r.len
                )));
            }
            let mut p = vec![0u8; r.len as usize];
            read_full(s, &mut p, deadline)
                .map_err(|e| io_failure(0, &doing, &e, options.timeout))?;
            Ok(p)
        }
        k => Err(Failure::new(
            ErrorKind::PeerFailed { rank: 0 },
            format!("rank 0 sent an unexpected {k:?} frame in collective #{seq}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::wire::{dtype_code, Op, FLAG_META_ONLY};
    use candle::DType;

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
