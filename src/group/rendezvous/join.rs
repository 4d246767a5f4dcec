//! A joining rank's side of the rendezvous: finds rank 0's port, connects,
//! checks rank 0's proof and proves its own, and waits for the welcome (see
//! the module docs of [`super`]).

use super::handshake::{self, printable, Prover, Transcript, NONCE_LEN, PROOF_LEN};
use super::{host_port, send_refuse, Rendezvous, HELLO_TIMEOUT, PORT_FILE_VAR};
use crate::error::{bail_kind, ErrorKind};
use crate::group::wire::{
    read_full, write_frame, Header, Kind, HEADER_LEN, MAX_ERROR_BYTES, VERSION,
};
use crate::group::StoreOptions;
use candle::Result;
use std::io;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

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
pub(crate) fn join(rv: &Rendezvous, token: &[u8], options: &StoreOptions) -> Result<TcpStream> {
    let start = Instant::now();
    let deadline = start + options.rendezvous_timeout;
    let source = match (rv.master_port, &rv.port_file) {
        (0, Some(_)) => PortSource::File,
        (0, None) => bail_kind!(
            ErrorKind::BadInput,
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
            // A listener that failed to prove it is rank 0 is the news.
            let kind = match not_rank0 {
                Some(_) => ErrorKind::Rendezvous,
                None => ErrorKind::Timeout,
            };
            let why = match &not_rank0 {
                Some(m) if *m != last => format!("{m} (last attempt: {last})"),
                _ => last,
            };
            bail_kind!(
                kind,
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
                bail_kind!(
                    ErrorKind::Rendezvous,
                    "rendezvous: rank {} at {addr}: {m}",
                    rv.rank
                )
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
