//! The tunables of the multi-process groups (timeouts, message size bound,
//! the TCP group's ring threshold), from code or from the environment.

use crate::error::{bail_kind, ErrorKind};
use candle::Result;
use std::time::Duration;

/// All-reduces of at least this many bytes take the TCP group's ring (the
/// default of [`StoreOptions::ring_min_bytes`]); below it, the star's single
/// round trip through rank 0 is faster than the ring's `2 (W-1)` steps.
const DEFAULT_RING_MIN_BYTES: u64 = 256 * 1024;

/// Tunables of the multi-process groups.
///
/// Non-exhaustive, so that a future tunable is not a breaking change: start
/// from [`Default`] or [`StoreOptions::from_env`] and change what differs
/// with the `with_*` setters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
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
    /// With [`timeout`](Self::timeout) set to `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// With [`rendezvous_timeout`](Self::rendezvous_timeout) set to `timeout`.
    pub fn with_rendezvous_timeout(mut self, timeout: Duration) -> Self {
        self.rendezvous_timeout = timeout;
        self
    }

    /// With [`max_message_bytes`](Self::max_message_bytes) set to `bytes`.
    pub fn with_max_message_bytes(mut self, bytes: u64) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// With [`ring_min_bytes`](Self::ring_min_bytes) set to `bytes`.
    pub fn with_ring_min_bytes(mut self, bytes: u64) -> Self {
        self.ring_min_bytes = bytes;
        self
    }

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

    pub(crate) fn validate(&self) -> Result<()> {
        if self.timeout.is_zero() || self.rendezvous_timeout.is_zero() {
            bail_kind!(
                ErrorKind::BadInput,
                "process group: the timeouts must be positive, got {self:?}"
            )
        }
        Ok(())
    }
}
