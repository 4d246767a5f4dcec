//! The handshakes rank 0 has under way, and which of them may be closed to
//! make room for a new connection.
//!
//! Rank 0 runs at most a fixed number of handshakes at once. When a new
//! connection comes and that many are pending, one is closed: the oldest that
//! has not sent a hello yet (an idle connection), else the oldest that has
//! not proved the token yet (it got rank 0's challenge and has not answered).
//! A handshake whose proof has arrived (being verified, or verified and not
//! yet collected by the accept loop) is never closed: that is a rank of this
//! job, and closing it would make a valid rank start over. If every pending
//! handshake is past its proof, the new connection is refused instead.
//!
//! The handshake thread and the accept loop race on each connection's
//! [`Stage`]; both move it with a compare-and-swap, so a connection is either
//! closed before its proof counts, or its proof counts and it is never closed.

use std::collections::BTreeMap;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// How far one handshake got (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Stage {
    /// Accepted; no valid hello yet.
    Connected = 0,
    /// A valid hello came and rank 0 sent its challenge; no proof yet.
    Challenged = 1,
    /// The peer's proof came: it is being verified, or was and awaits the
    /// accept loop. Never closed to make room.
    Proven = 2,
    /// Closed by the accept loop to make room; the handshake thread stops.
    Evicted = 3,
}

/// A handshake's [`Stage`], shared by its thread and the accept loop.
#[derive(Debug)]
pub(crate) struct Progress(AtomicU8);

impl Progress {
    /// A handshake that was just accepted.
    pub fn new() -> Arc<Self> {
        Arc::new(Progress(AtomicU8::new(Stage::Connected as u8)))
    }

    /// Moves from `from` to `to`; false if the handshake is no longer at
    /// `from` (the accept loop closed it to make room).
    pub fn advance(&self, from: Stage, to: Stage) -> bool {
        self.0
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn evict_if(&self, stage: Stage) -> bool {
        self.advance(stage, Stage::Evicted)
    }
}

struct Entry {
    from: SocketAddr,
    /// A clone of the handshake's connection, to close it.
    stream: TcpStream,
    progress: Arc<Progress>,
}

/// The pending handshakes by id (ids grow with each accepted connection, so
/// the first is the oldest).
pub(crate) struct Pending {
    entries: BTreeMap<u64, Entry>,
    max: usize,
}

/// What [`Pending::make_room`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Room {
    /// There was room.
    Free,
    /// It closed this connection (its address, and how far it had got).
    Evicted(SocketAddr, Stage),
    /// Every pending handshake is past its proof: refuse the new connection.
    Full,
}

impl Pending {
    /// At most `max` handshakes at once.
    pub fn new(max: usize) -> Self {
        Pending {
            entries: BTreeMap::new(),
            max,
        }
    }

    /// The most handshakes kept at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Makes room for one more handshake if none is left (see the module
    /// docs for which one goes).
    pub fn make_room(&mut self) -> Room {
        if self.entries.len() < self.max {
            return Room::Free;
        }
        for stage in [Stage::Connected, Stage::Challenged] {
            let victim = self
                .entries
                .iter()
                .find(|(_, e)| e.progress.evict_if(stage))
                .map(|(&id, _)| id);
            if let Some(id) = victim {
                let e = self.entries.remove(&id).expect("listed");
                let _ = e.stream.shutdown(Shutdown::Both);
                return Room::Evicted(e.from, stage);
            }
        }
        Room::Full
    }

    /// Records handshake `id` (`stream`: a clone of its connection).
    pub fn insert(
        &mut self,
        id: u64,
        from: SocketAddr,
        stream: TcpStream,
        progress: Arc<Progress>,
    ) {
        self.entries.insert(
            id,
            Entry {
                from,
                stream,
                progress,
            },
        );
    }

    /// Forgets handshake `id` once its thread reported; false if it was
    /// closed to make room (and already counted as refused).
    pub fn remove(&mut self, id: u64) -> bool {
        self.entries.remove(&id).is_some()
    }

    /// Closes every handshake still running (their threads see the closed
    /// socket and end).
    pub fn close_all(&mut self) {
        for e in std::mem::take(&mut self.entries).into_values() {
            let _ = e.stream.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// `n` connected pairs on loopback: (our side, rank 0's side).
    fn pairs(n: usize) -> Vec<(TcpStream, TcpStream, SocketAddr)> {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        (0..n)
            .map(|_| {
                let c = TcpStream::connect(addr).unwrap();
                let (s, from) = l.accept().unwrap();
                (c, s, from)
            })
            .collect()
    }

    fn closed(c: &mut TcpStream) -> bool {
        use std::io::Read;
        c.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        matches!(c.read(&mut [0u8; 1]), Ok(0))
    }

    /// Idle connections go first, then unproven ones; proven ones never;
    /// with only proven ones pending, the new connection is refused.
    #[test]
    fn eviction_order_spares_proven_handshakes() {
        let mut conns = pairs(4);
        let mut p = Pending::new(3);
        let progress: Vec<_> = (0..3).map(|_| Progress::new()).collect();
        for (i, (_, s, from)) in conns.iter().take(3).enumerate() {
            p.insert(i as u64, *from, s.try_clone().unwrap(), progress[i].clone());
        }
        // 0: proven, 1: challenged, 2: idle.
        assert!(progress[0].advance(Stage::Connected, Stage::Challenged));
        assert!(progress[0].advance(Stage::Challenged, Stage::Proven));
        assert!(progress[1].advance(Stage::Connected, Stage::Challenged));
        assert_eq!(p.make_room(), Room::Evicted(conns[2].2, Stage::Connected));
        assert!(closed(&mut conns[2].0));
        // The evicted handshake's thread can no longer advance it.
        assert!(!progress[2].advance(Stage::Connected, Stage::Challenged));
        p.insert(
            3,
            conns[3].2,
            conns[3].1.try_clone().unwrap(),
            Progress::new(),
        );
        // Now the idle newcomer goes before the older challenged one.
        assert_eq!(p.make_room(), Room::Evicted(conns[3].2, Stage::Connected));
        assert_eq!(p.make_room(), Room::Free);
        p.insert(4, conns[3].2, conns[3].1.try_clone().unwrap(), {
            let q = Progress::new();
            assert!(q.advance(Stage::Connected, Stage::Challenged));
            assert!(q.advance(Stage::Challenged, Stage::Proven));
            q
        });
        assert_eq!(p.make_room(), Room::Evicted(conns[1].2, Stage::Challenged));
        assert!(!progress[1].advance(Stage::Challenged, Stage::Proven));
        p.insert(5, conns[1].2, conns[1].1.try_clone().unwrap(), {
            let q = Progress::new();
            assert!(q.advance(Stage::Connected, Stage::Challenged));
            assert!(q.advance(Stage::Challenged, Stage::Proven));
            q
        });
        // Three proven: nothing may go.
        assert_eq!(p.make_room(), Room::Full);
        assert!(p.remove(5));
        assert!(!p.remove(2), "evicted ones are gone");
        assert_eq!(p.make_room(), Room::Free);
        p.close_all();
        assert!(closed(&mut conns[0].0));
    }
}
