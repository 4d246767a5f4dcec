//! Rank 0's side of the rendezvous: listens, runs each connection's
//! handshake on a thread of its own, and welcomes the ranks once all have
//! joined (see the module docs of [`super`]).

use super::handshake::{self, Prover, Refusal, Refusals, Transcript, NONCE_LEN, PROOF_LEN};
use super::pending::{Pending, Progress, Room, Stage};
use super::{listen_addrs, send_refuse, Rendezvous, HELLO_TIMEOUT, PORT_FILE_VAR};
use crate::error::{bail_kind, error, ErrorKind};
use crate::group::wire::{
    io_error, read_full, write_frame, Header, Kind, HEADER_LEN, MAX_ERROR_BYTES, VERSION,
};
use crate::group::StoreOptions;
use candle::Result;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    bail_kind!(
        ErrorKind::Rendezvous,
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
pub(crate) fn serve(
    rv: &Rendezvous,
    token: &[u8],
    options: &StoreOptions,
) -> Result<Vec<Option<TcpStream>>> {
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
            break Err(error(ErrorKind::Timeout, format!(
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

/// Rank 0's side of one handshake (see [`super::handshake`]): reads the
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
