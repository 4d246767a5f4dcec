//! The ring all-reduce's data movement: the steps overlap, as a pipeline
//! run by two threads per rank (the caller's, receiving, and one that sends).
//!
//! What step `t` sends is what step `t-1` receives (see the `ring_frame`
//! module), so the sending side forwards each piece as soon as the
//! receiving side has summed it, instead of waiting for the whole chunk:
//! with `W` ranks the `2 (W-1)` steps run as one pipeline. The
//! reduce-scatter receives into a small scratch buffer (it stays in the
//! cache) and writes `local + received` straight into the result; the
//! all-gather receives straight into the result. So the input is read once
//! and the result written once (plus once more where the all-gather
//! overwrites a partial sum): few passes over the data, which is what counts
//! when ranks share few cores.
//!
//! The two sides share two counters, in bytes over all steps in order: what
//! the receiving side has finished (the sending side sends no further), and
//! what the sending side has sent (the receiving side overwrites no partial
//! sum before it went out). Each side waits for the other only there.
//!
//! Deadlines: the receiving side fails when a step's frame has not arrived
//! within the timeout of the moment it began waiting for it; the sending
//! side fails when data it could send has not gone out within the timeout
//! (time spent waiting for the receiving side does not count: that side has
//! its own deadline). Headers are checked before their step's data. A side
//! that fails stops the other (shutting its link down), and the error that
//! comes first is returned.

use super::ring_frame::{Phase, RingElem, Schedule, STEP_HEADER_LEN};
use super::ring_output::Output;
use super::wire::{io_error, is_retry};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The reduce-scatter receives into a scratch buffer of this many bytes and
/// sums from it: small enough to stay in a core's L2 cache.
pub(crate) const SCRATCH_BYTES: usize = 256 * 1024;

/// The links and limits of one collective.
pub(crate) struct Links<'a> {
    pub next: &'a TcpStream,
    pub prev: &'a TcpStream,
    pub timeout: Duration,
    /// Names the collective in messages.
    pub what: &'a (dyn fmt::Display + Sync),
}

/// What the two sides share.
struct Shared<'a, T> {
    s: &'a Schedule,
    input: &'a [T],
    out: Output<T>,
    links: &'a Links<'a>,
    /// Bytes of data the receiving side has finished, over all steps.
    received: AtomicUsize,
    /// Bytes of data the sending side has sent, over all steps.
    sent: AtomicUsize,
    /// Set by a side that fails.
    failed: AtomicBool,
    /// Per step: bytes of data received (`recv_at`) and sent (`send_at`)
    /// by all earlier steps.
    recv_at: Vec<usize>,
    send_at: Vec<usize>,
}

impl<T: RingElem> Shared<'_, T> {
    fn data_len(&self, c: usize) -> usize {
        self.s.chunk(c).len() * std::mem::size_of::<T>()
    }

    /// Chunk `c`'s first byte in the result.
    fn chunk_at(&self, c: usize) -> usize {
        self.s.chunk(c).start * std::mem::size_of::<T>()
    }

    fn ranks(&self) -> (usize, usize, usize) {
        let (r, w) = (self.s.rank, self.s.world);
        (r, (r + 1) % w, (r + w - 1) % w)
    }

    fn send_error(&self, t: usize, e: &io::Error) -> String {
        let (rank, next, _) = self.ranks();
        let doing = format!(
            "rank {rank} sent its chunk in {} of {}",
            self.s.header(t, true),
            self.links.what
        );
        io_error(next, &doing, e, self.links.timeout)
    }

    fn recv_error(&self, t: usize, e: &io::Error) -> String {
        let (rank, _, prev) = self.ranks();
        let doing = format!(
            "rank {rank} waited for its chunk in {} of {}",
            self.s.header(t, false),
            self.links.what
        );
        io_error(prev, &doing, e, self.links.timeout)
    }

    fn internal(&self, t: usize) -> String {
        format!(
            "rank {}: internal error in {} of {}: the ring's buffers are out of step",
            self.s.rank,
            self.s.header(t, false),
            self.links.what
        )
    }
}

/// Why a side stopped: its own error, or the other side's failure.
enum Stop {
    Failed(String),
    Stopped,
}

/// Sums `input` over the ranks of `schedule` (see the module docs).
/// `scratch` is reused from call to call.
pub(crate) fn all_reduce<T: RingElem>(
    schedule: &Schedule,
    input: &[T],
    links: &Links,
    scratch: &mut Vec<u64>,
) -> Result<Vec<T>, String> {
    let steps = schedule.steps();
    let es = std::mem::size_of::<T>();
    let mut recv_at = vec![0; steps + 1];
    let mut send_at = vec![0; steps + 1];
    for t in 0..steps {
        recv_at[t + 1] = recv_at[t] + schedule.chunk(schedule.recv_chunk(t)).len() * es;
        send_at[t + 1] = send_at[t] + schedule.chunk(schedule.send_chunk(t)).len() * es;
    }
    let shared = Shared {
        s: schedule,
        input,
        out: Output::new(input.len()),
        links,
        received: AtomicUsize::new(0),
        sent: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        recv_at,
        send_at,
    };
    let (received, sent) = std::thread::scope(|scope| {
        let sender = std::thread::Builder::new()
            .name("syncbn-ring-send".into())
            .spawn_scoped(scope, || {
                let r = send_side(&shared);
                if r.is_err() {
                    shared.failed.store(true, Ordering::Release);
                    // Wake the receiving side.
                    let _ = links.prev.shutdown(Shutdown::Both);
                }
                r
            });
        let sender = match sender {
            Ok(h) => h,
            Err(e) => {
                let m = format!("rank {}: could not start a thread: {e}", schedule.rank);
                return (Err(Stop::Failed(m)), Err(Stop::Stopped));
            }
        };
        let received = recv_side(&shared, sender.thread(), scratch);
        if received.is_err() {
            shared.failed.store(true, Ordering::Release);
            sender.thread().unpark();
            // Wake the sending side.
            let _ = links.next.shutdown(Shutdown::Both);
        }
        let sent = sender.join().unwrap_or_else(|_| {
            Err(Stop::Failed(format!(
                "rank {}: the ring's sending thread panicked",
                schedule.rank
            )))
        });
        (received, sent)
    });
    match (received, sent) {
        // SAFETY: the receiving side wrote every chunk (reduce-scatter: all
        // but the rank's own, which the all-gather's first step brings), and
        // the sending side is done.
        (Ok(()), Ok(())) => Ok(unsafe { shared.out.finish() }),
        (Err(Stop::Failed(m)), _) | (_, Err(Stop::Failed(m))) => Err(m),
        _ => Err(shared.internal(steps - 1)),
    }
}

/// Writes all of `buf` to `next` before `deadline`.
fn write_before(next: &TcpStream, buf: &[u8], deadline: Instant) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        at += write_once(next, &buf[at..], deadline)?;
    }
    Ok(())
}

/// One write to `next`, waiting until `deadline` at most.
fn write_once(mut next: &TcpStream, buf: &[u8], deadline: Instant) -> io::Result<usize> {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        next.set_write_timeout(Some(deadline - now))?;
        match next.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => return Ok(n),
            Err(e) if is_retry(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

/// One read, waiting until `deadline` at most: `read` is called with the
/// time left set as the socket's timeout.
fn read_once(
    prev: &TcpStream,
    deadline: Instant,
    mut read: impl FnMut() -> io::Result<usize>,
) -> io::Result<usize> {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        prev.set_read_timeout(Some(deadline - now))?;
        match read() {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => return Ok(n),
            Err(e) if is_retry(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

/// The sending side: every step's header, then its chunk as fast as the
/// receiving side provides it.
fn send_side<T: RingElem>(sh: &Shared<T>) -> Result<(), Stop> {
    let timeout = sh.links.timeout;
    for t in 0..sh.s.steps() {
        let c = sh.s.send_chunk(t);
        let len = sh.data_len(c);
        let mut deadline = Instant::now() + timeout;
        write_before(sh.links.next, &sh.s.header(t, true).encode(), deadline)
            .map_err(|e| stopped_or(sh, sh.send_error(t, &e)))?;
        let mut pos = 0;
        while pos < len {
            // Step 0 sends the input; later steps what the step before
            // received, as far as the receiving side has finished it.
            let ready = if t == 0 {
                len
            } else {
                let done = sh.received.load(Ordering::Acquire);
                done.saturating_sub(sh.recv_at[t - 1]).min(len)
            };
            if ready == pos {
                if sh.failed.load(Ordering::Acquire) {
                    return Err(Stop::Stopped);
                }
                std::thread::park_timeout(Duration::from_millis(50));
                // Waiting for the own side does not count against the peer.
                deadline = Instant::now() + timeout;
                continue;
            }
            let bytes = if t == 0 {
                Some(&bytemuck::cast_slice::<T, u8>(&sh.input[sh.s.chunk(c)])[pos..ready])
            } else {
                let at = sh.chunk_at(c);
                // SAFETY: bytes up to `ready` of this chunk were finished by
                // the receiving side (the `received` counter, Acquire), which
                // writes no byte of them again before `sent` passes them.
                unsafe { sh.out.bytes(at + pos..at + ready) }
            };
            let Some(bytes) = bytes else {
                return Err(Stop::Failed(sh.internal(t)));
            };
            let n = write_once(sh.links.next, bytes, deadline)
                .map_err(|e| stopped_or(sh, sh.send_error(t, &e)))?;
            pos += n;
            sh.sent.store(sh.send_at[t] + pos, Ordering::Release);
        }
    }
    Ok(())
}

/// `Stopped` when the other side failed first (its error is the one to
/// report), else `Failed(m)`.
fn stopped_or<T>(sh: &Shared<T>, m: String) -> Stop {
    if sh.failed.load(Ordering::Acquire) {
        Stop::Stopped
    } else {
        Stop::Failed(m)
    }
}

/// The receiving side: every step's header (checked), then its chunk,
/// summed into the result (reduce-scatter) or received into it
/// (all-gather); each piece finished is handed to the sending side.
fn recv_side<T: RingElem>(
    sh: &Shared<T>,
    sender: &std::thread::Thread,
    scratch: &mut Vec<u64>,
) -> Result<(), Stop> {
    let es = std::mem::size_of::<T>();
    let (w, prev) = (sh.s.world, sh.links.prev);
    scratch.resize(SCRATCH_BYTES / 8, 0);
    let scratch_bytes = (SCRATCH_BYTES / es) * es;
    for t in 0..sh.s.steps() {
        let deadline = Instant::now() + sh.links.timeout;
        let fail = |e: io::Error| stopped_or(sh, sh.recv_error(t, &e));
        let mut header = [0u8; STEP_HEADER_LEN];
        let mut got = 0;
        while got < STEP_HEADER_LEN {
            let mut p = prev;
            got += read_once(prev, deadline, || p.read(&mut header[got..])).map_err(fail)?;
        }
        let expect = sh.s.header(t, false);
        if let Some(got) = expect.mismatch(&header) {
            let (rank, _, prev_rank) = sh.ranks();
            return Err(Stop::Failed(format!(
                "rank {rank} expected {expect} of {}, rank {prev_rank} sent {got}",
                sh.links.what
            )));
        }
        let c = sh.s.recv_chunk(t);
        let (len, at) = (sh.data_len(c), sh.chunk_at(c));
        let mut done = 0;
        match sh.s.phase(t) {
            Phase::ReduceScatter => {
                let first = sh.s.chunk(c).start;
                while done < len {
                    // Fill the scratch buffer, summing each whole element
                    // that arrived.
                    let (base, mut fill) = (done, 0);
                    let room = scratch_bytes.min(len - base);
                    while fill < room {
                        let buf = &mut bytemuck::cast_slice_mut::<u64, u8>(scratch)[fill..room];
                        let mut p = prev;
                        fill += read_once(prev, deadline, || p.read(buf)).map_err(fail)?;
                        let end = (base + fill) / es * es;
                        if end > done {
                            let bytes =
                                &bytemuck::cast_slice::<u64, u8>(scratch)[done - base..end - base];
                            let received: &[T] = bytemuck::cast_slice(bytes);
                            let e0 = first + done / es;
                            let local = &sh.input[e0..e0 + received.len()];
                            // SAFETY: these elements of chunk c were never
                            // written or sent before (the reduce-scatter
                            // receives each chunk once, never the rank's
                            // own), and the sending side reads none of them
                            // before `received` passes them.
                            unsafe { sh.out.sum(e0, local, received) }
                                .ok_or_else(|| Stop::Failed(sh.internal(t)))?;
                            done = end;
                            sh.received.store(sh.recv_at[t] + done, Ordering::Release);
                            sender.unpark();
                        }
                    }
                }
            }
            Phase::AllGather => {
                // All-gather step s overwrites chunk r-s, whose partial sum
                // reduce-scatter step s sent (from the result when s > 0):
                // only the bytes already sent may be overwritten.
                let s = t - (w - 1);
                while done < len {
                    let safe = if s == 0 {
                        len
                    } else {
                        let sent = sh.sent.load(Ordering::Acquire);
                        sent.saturating_sub(sh.send_at[s]).min(len)
                    };
                    if safe <= done {
                        // Rare: the peer's data overtook the sending side's
                        // bookkeeping.
                        if sh.failed.load(Ordering::Acquire) {
                            return Err(Stop::Stopped);
                        }
                        if Instant::now() >= deadline {
                            return Err(fail(io::ErrorKind::TimedOut.into()));
                        }
                        std::thread::sleep(Duration::from_micros(20));
                        continue;
                    }
                    // SAFETY: bytes [done, safe) of chunk c are sent (by
                    // the counter above) and not yet handed to the sending
                    // side for this step (`received` is below them): no
                    // other thread touches them.
                    let n = read_once(prev, deadline, || unsafe {
                        sh.out.recv(prev, at + done, safe - done)
                    })
                    .map_err(fail)?;
                    done += n;
                    sh.received.store(sh.recv_at[t] + done, Ordering::Release);
                    sender.unpark();
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::CallTag;
    use std::net::TcpListener;

    /// A connected pair of sockets on 127.0.0.1: (writing end, reading end).
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    /// Copies `from` to `to` in pieces of 7, 4093 and 65537 bytes in turn
    /// (so headers and elements arrive split at odd places), until `from`
    /// ends.
    fn relay(mut from: TcpStream, mut to: TcpStream) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_537];
            for piece in [7, 4093, 65_537].into_iter().cycle() {
                match from.read(&mut buf[..piece]) {
                    Ok(n) if n > 0 && to.write_all(&buf[..n]).is_ok() => {}
                    _ => break,
                }
            }
        })
    }

    /// `world` ranks on threads, linked rank to rank; the link into rank 0
    /// passes through a relay that splits what it carries into odd pieces.
    fn run<T: RingElem>(world: usize, inputs: Vec<Vec<T>>) -> Vec<Result<Vec<T>, String>> {
        let mut nexts = Vec::new();
        let mut prevs: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let mut relays = Vec::new();
        for r in 0..world {
            let (a, b) = pair();
            let to = (r + 1) % world;
            if to == 0 {
                let (c, d) = pair();
                relays.push(relay(b, c));
                prevs[to] = Some(d);
            } else {
                prevs[to] = Some(b);
            }
            nexts.push(a);
        }
        let hs: Vec<_> = nexts
            .into_iter()
            .zip(prevs)
            .zip(inputs)
            .enumerate()
            .map(|(r, ((next, prev), input))| {
                std::thread::spawn(move || {
                    let prev = prev.unwrap();
                    let s = Schedule::new::<T>(r, world, input.len(), CallTag::UNTAGGED, 0);
                    let links = Links {
                        next: &next,
                        prev: &prev,
                        timeout: Duration::from_secs(20),
                        what: &"test",
                    };
                    all_reduce(&s, &input, &links, &mut Vec::new())
                })
            })
            .collect();
        let out = hs.into_iter().map(|h| h.join().unwrap()).collect();
        for h in relays {
            h.join().unwrap();
        }
        out
    }

    /// The pipelined steps give, on every rank, each chunk summed in the
    /// ring's order (`x_c + x_{c+1} + …`, rounded at each addition), for
    /// world sizes 2 to 4, counts the world size does not divide (fewer
    /// elements than ranks too), chunks longer than the scratch buffer,
    /// and bytes arriving in pieces that split headers and elements.
    #[test]
    fn pipelined_ring_sums_in_ring_order_with_split_arrivals() {
        let value = |r: usize, i: usize| ((i * 7919 + r * 104_729) % 1000) as f32 * 1e-3 + r as f32;
        for world in 2..=4 {
            for n in [1, 5, SCRATCH_BYTES / 4 * world + 3] {
                let inputs: Vec<Vec<f32>> = (0..world)
                    .map(|r| (0..n).map(|i| value(r, i)).collect())
                    .collect();
                let s = Schedule::new::<f32>(0, world, n, CallTag::UNTAGGED, 0);
                let want: Vec<f32> = (0..n)
                    .map(|i| {
                        let c = (0..world).find(|&c| s.chunk(c).contains(&i)).unwrap();
                        let mut acc = value(c, i);
                        for k in 1..world {
                            acc += value((c + k) % world, i);
                        }
                        acc
                    })
                    .collect();
                for (r, got) in run(world, inputs).into_iter().enumerate() {
                    let got = got.unwrap();
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same && got.len() == n, "world {world}, n {n}, rank {r}");
                }
            }
        }
        // Two-byte elements (bf16), split across pieces as well.
        let inputs: Vec<Vec<half::bf16>> = (0..3)
            .map(|r| {
                (0..70_001)
                    .map(|i| half::bf16::from_f32((i % 17 + r) as f32))
                    .collect()
            })
            .collect();
        for got in run(3, inputs) {
            let got = got.unwrap();
            assert!(got
                .iter()
                .enumerate()
                .all(|(i, v)| v.to_f32() == (3 * (i % 17) + 3) as f32));
        }
    }

    /// A previous rank that sends a frame of another step is refused before
    /// its data is used, naming what arrived.
    #[test]
    fn pipelined_ring_checks_each_header() {
        let (next, _peer_in) = pair();
        let (mut peer_out, prev) = pair();
        let s = Schedule::new::<f32>(1, 2, 10, CallTag::UNTAGGED, 0);
        let wrong = Schedule::new::<f32>(0, 2, 10, CallTag::UNTAGGED, 3);
        peer_out.write_all(&wrong.header(0, true).encode()).unwrap();
        let links = Links {
            next: &next,
            prev: &prev,
            timeout: Duration::from_secs(5),
            what: &"test",
        };
        let e = all_reduce(&s, &[1f32; 10], &links, &mut Vec::new()).unwrap_err();
        assert!(
            e.contains("rank 1 expected reduce-scatter step 0 of ring call #0")
                && e.contains("rank 0 sent phase 1 step 0 of ring call #3"),
            "{e}"
        );
    }
}
