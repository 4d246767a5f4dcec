//! The mutual authentication of the rendezvous, and the bounded record of the
//! connections it refused.
//!
//! A joining rank and rank 0 each send a fresh 32-byte nonce; each proves that
//! it knows the job token with an HMAC-SHA-256, keyed by the token, over the
//! transcript: a label, the direction (rank 0's proof or the joining rank's),
//! the protocol version, the world size and rank the joining rank claims, and
//! both nonces. The token itself never crosses the wire. A proof cannot be
//! replayed (the other side's nonce is fresh), reflected (the direction is part
//! of it) or moved to another rank or world size (both are part of it).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Bytes of a nonce.
pub(crate) const NONCE_LEN: usize = 32;
/// Bytes of a proof (an HMAC-SHA-256).
pub(crate) const PROOF_LEN: usize = 32;

/// Who proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prover {
    /// Rank 0, answering a hello.
    Root = 1,
    /// The joining rank, answering rank 0's challenge.
    Joiner = 2,
}

/// What both sides' proofs cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transcript {
    pub version: u8,
    pub world: u64,
    pub rank: u32,
    pub joiner_nonce: [u8; NONCE_LEN],
    pub root_nonce: [u8; NONCE_LEN],
}

impl Transcript {
    fn mac(&self, token: &[u8], prover: Prover) -> Hmac<Sha256> {
        // HMAC takes keys of any length (an empty token included).
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(token).expect("HMAC takes any key");
        m.update(b"candle-syncbn rendezvous proof\0");
        m.update(&[prover as u8, self.version]);
        m.update(&self.world.to_le_bytes());
        m.update(&self.rank.to_le_bytes());
        m.update(&self.joiner_nonce);
        m.update(&self.root_nonce);
        m
    }

    /// `prover`'s proof that it knows `token`.
    pub fn prove(&self, token: &[u8], prover: Prover) -> [u8; PROOF_LEN] {
        self.mac(token, prover).finalize().into_bytes().into()
    }

    /// Whether `proof` is `prover`'s proof for `token` (in constant time).
    pub fn verify(&self, token: &[u8], prover: Prover, proof: &[u8]) -> bool {
        self.mac(token, prover).verify_slice(proof).is_ok()
    }
}

/// A fresh nonce from the operating system's CSPRNG.
pub(crate) fn nonce() -> Result<[u8; NONCE_LEN], String> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n)
        .map_err(|e| format!("could not get random bytes from the operating system: {e}"))?;
    Ok(n)
}

/// Why rank 0 refused a connection: a fixed category (counted) and details
/// (kept for the first few only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub kind: &'static str,
    pub detail: String,
}

impl Refusal {
    pub fn new(kind: &'static str, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
}

/// How many examples [`Refusals`] keeps.
const EXAMPLES: usize = 5;
/// The longest detail [`Refusals`] keeps of one example (a peer's own words
/// may be part of it).
const MAX_DETAIL_CHARS: usize = 200;

/// Text from the network made printable on one line and cut to `max` chars.
pub(crate) fn printable(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// The refused connections of one rendezvous, in bounded memory: a count per
/// category and the first few in detail.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    total: u64,
    by_kind: BTreeMap<&'static str, u64>,
    examples: Vec<String>,
}

impl Refusals {
    pub fn record(&mut self, from: &str, r: Refusal) {
        self.total += 1;
        *self.by_kind.entry(r.kind).or_default() += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(format!(
                "{from}: {}: {}",
                r.kind,
                printable(&r.detail, MAX_DETAIL_CHARS)
            ));
        }
    }

    /// `""`, or `"; refused N connection(s) (k× kind, …); first ones: …"`.
    pub fn summary(&self) -> String {
        if self.total == 0 {
            return String::new();
        }
        let mut s = format!("; refused {} connection(s) (", self.total);
        for (i, (kind, n)) in self.by_kind.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let _ = write!(s, "{sep}{n}× {kind}");
        }
        let first = if self.total as usize > self.examples.len() {
            "; the first ones: "
        } else {
            ": "
        };
        s.push(')');
        s.push_str(first);
        s.push_str(&self.examples.join("; "));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript() -> Transcript {
        Transcript {
            version: 2,
            world: 4,
            rank: 3,
            joiner_nonce: [7; NONCE_LEN],
            root_nonce: [9; NONCE_LEN],
        }
    }

    /// RFC 4231, test case 2: the HMAC-SHA-256 underneath is the standard one.
    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        let hex: String = m
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn proofs_bind_token_direction_and_transcript() {
        let t = transcript();
        let p = t.prove(b"secret", Prover::Root);
        assert!(t.verify(b"secret", Prover::Root, &p));
        assert!(!t.verify(b"secret!", Prover::Root, &p), "other token");
        assert!(!t.verify(b"", Prover::Root, &p), "no token");
        assert!(!t.verify(b"secret", Prover::Joiner, &p), "reflected");
        assert!(!t.verify(b"secret", Prover::Root, &p[..31]), "truncated");
        let changes: [fn(&mut Transcript); 5] = [
            |t| t.version += 1,
            |t| t.world += 1,
            |t| t.rank -= 1,
            |t| t.joiner_nonce[31] ^= 1,
            |t| t.root_nonce[0] ^= 1,
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut u = t;
            change(&mut u);
            assert!(!u.verify(b"secret", Prover::Root, &p), "change {i}");
        }
        // An empty token (no SYNCBN_TOKEN) still gives a well-defined proof.
        let e = t.prove(b"", Prover::Joiner);
        assert!(t.verify(b"", Prover::Joiner, &e));
    }

    #[test]
    fn nonces_differ() {
        let (a, b) = (nonce().unwrap(), nonce().unwrap());
        assert_ne!(a, b);
        assert_ne!(a, [0; NONCE_LEN]);
    }

    #[test]
    fn refusals_stay_bounded() {
        let mut r = Refusals::default();
        assert_eq!(r.summary(), "");
        r.record("1.2.3.4:5", Refusal::new("wrong job token", "x\ny"));
        assert_eq!(
            r.summary(),
            "; refused 1 connection(s) (1× wrong job token): 1.2.3.4:5: wrong job token: x y"
        );
        let long = "z".repeat(100_000);
        for i in 0..100_000 {
            let kind = if i % 2 == 0 { "no hello" } else { "bad magic" };
            r.record("127.0.0.1:9", Refusal::new(kind, long.as_str()));
        }
        let s = r.summary();
        assert_eq!(r.total, 100_001);
        assert!(s.len() < 2_000, "{} bytes", s.len());
        assert!(
            s.starts_with(
                "; refused 100001 connection(s) (50000× bad magic, 50000× no hello, 1× wrong job token); the first ones: "
            ),
            "{s}"
        );
        assert_eq!(r.examples.len(), EXAMPLES);
    }
}
