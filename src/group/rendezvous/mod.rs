//! The rendezvous of the multi-process groups: where a rank learns who it is
//! ([`Rendezvous`], from the launcher's environment), and how the ranks meet
//! and authenticate each other before the first collective.
//!
//! Rank 0 listens on `MASTER_PORT` (on `MASTER_ADDR` when that is a loopback
//! address, else on every interface); every other rank connects and sends a
//! *hello* frame with its rank, the world size and a nonce. Rank 0 answers with
//! a *challenge* (its nonce and its proof that it knows the job token), the
//! joining rank checks that proof and answers with its own (see
//! [`handshake`]: the token never crosses the wire). Rank 0 ([`serve`])
//! refuses (and closes) connections that do not speak the protocol, fail the
//! proof, name a rank out of range or one that already joined, and keeps
//! waiting for the real ranks until the rendezvous deadline; each handshake
//! runs on a thread of its own, so silent or slow connections hold up no other
//! (under a flood, idle or unproven handshakes make room, a proven one never:
//! see [`pending`]), and what is kept about refused connections is bounded.
//! A joining rank ([`join`]) whose connection closes before the welcome tries
//! again until the deadline; a refusal is final. When all ranks have joined
//! rank 0 welcomes them, and the connections stay open as the group's star
//! (`super::star`). The ring's direct links (`super::ring`) authenticate with
//! the same [`handshake`].
//!
//! Files: `env` (the environment), `handshake` (the proofs and the record of
//! refusals), `pending` (which pending handshakes make room under a flood),
//! `serve` (rank 0), `join` (the other ranks).

mod env;
pub(crate) mod handshake;
mod join;
pub(crate) mod pending;
mod serve;

pub(crate) use env::{host_port, is_loopback, listen_addrs, PORT_FILE_VAR, TOKEN_VAR};
pub use env::{EnvSource, Rendezvous};
pub(crate) use join::join;
pub(crate) use serve::serve;

use super::wire::{write_frame, Header, Kind, MAX_ERROR_BYTES};
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The longest job token (`SYNCBN_TOKEN`) a rank accepts.
pub(crate) const MAX_TOKEN_BYTES: usize = 1024;
/// How long one handshake may take (rank 0 waiting for a connection's hello
/// and proof, a joining rank for rank 0's challenge) before the connection is
/// dropped. Handshakes run concurrently, so a stray connection that sends
/// nothing holds up no other.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes a refusal frame (best effort: the peer may be gone or hostile).
fn send_refuse(s: &mut TcpStream, reason: &str) {
    let reason = &reason.as_bytes()[..reason.len().min(MAX_ERROR_BYTES)];
    let h = Header {
        len: reason.len() as u64,
        ..Header::new(Kind::Refuse)
    };
    let _ = write_frame(s, &h, reason, Instant::now() + Duration::from_secs(1));
}

/// The warning for a group of several ranks without a job token, if `rv` is
/// one (whatever the address: on loopback, every process of the machine can
/// reach rank 0's port).
fn token_warning(rv: &Rendezvous, token: &[u8]) -> Option<String> {
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
pub(crate) fn warn_without_token(rv: &Rendezvous, token: &[u8]) {
    if let Some(w) = token_warning(rv, token) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            let _ = writeln!(std::io::stderr().lock(), "{w}");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rank of a group of several warns without a token, on loopback
    /// too (there any local process could take a rank's
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
