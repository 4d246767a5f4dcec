//! In-process group: one thread per rank, collectives through shared memory.
//!
//! Each rank's n-th collective meets the other ranks' n-th collective in a
//! "round". The last rank to arrive checks that every rank made the same call
//! (kind, shape, dtype, [`CallTag`]), computes the result in f64 in rank order (so results
//! are bitwise reproducible), and wakes the others. A rank that waits longer
//! than the timeout, or whose peer handle was dropped (its thread ended or
//! failed), poisons the group: every pending and later collective fails on every
//! rank with the same message instead of hanging.

use super::{Backend, CallTag};
use crate::error::{bail_kind, Error, ErrorKind};
use candle::{DType, Device, Result, Shape, Tensor};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    AllReduceSum,
    Broadcast { root: usize },
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::AllReduceSum => write!(f, "all_reduce_sum"),
            Kind::Broadcast { root } => write!(f, "broadcast(root {root})"),
        }
    }
}

struct Contribution {
    kind: Kind,
    tag: CallTag,
    dtype: DType,
    shape: Shape,
    data: Vec<f64>,
}

#[derive(Default)]
struct Round {
    contributions: Vec<Option<Contribution>>,
    arrived: usize,
    result: Option<std::result::Result<Arc<Vec<f64>>, Error>>,
    taken: usize,
}

struct State {
    rounds: HashMap<u64, Round>,
    departed: Vec<bool>,
    failure: Option<Error>,
}

struct Shared {
    world_size: usize,
    timeout: Duration,
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The backend of [`ProcessGroup::threads`](super::ProcessGroup::threads): one
/// handle per rank, all in one process.
pub struct ThreadsBackend {
    rank: usize,
    shared: Arc<Shared>,
    next_seq: AtomicU64,
}

impl fmt::Debug for ThreadsBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadsBackend")
            .field("rank", &self.rank)
            .field("world_size", &self.shared.world_size)
            .field("timeout", &self.shared.timeout)
            .finish()
    }
}

impl ThreadsBackend {
    /// Creates the `world_size` rank handles of one new in-process group.
    pub fn new_group(world_size: usize, timeout: Duration) -> Result<Vec<ThreadsBackend>> {
        if world_size == 0 {
            bail_kind!(
                ErrorKind::BadInput,
                "ProcessGroup::threads: world size must be at least 1, got 0"
            )
        }
        if timeout.is_zero() {
            bail_kind!(
                ErrorKind::BadInput,
                "ProcessGroup::threads: the timeout must be positive"
            )
        }
        let shared = Arc::new(Shared {
            world_size,
            timeout,
            state: Mutex::new(State {
                rounds: HashMap::new(),
                departed: vec![false; world_size],
                failure: None,
            }),
            cond: Condvar::new(),
        });
        Ok((0..world_size)
            .map(|rank| ThreadsBackend {
                rank,
                shared: shared.clone(),
                next_seq: AtomicU64::new(0),
            })
            .collect())
    }

    fn collective(&self, kind: Kind, tag: CallTag, tensor: &Tensor) -> Result<Tensor> {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        let dtype = tensor.dtype();
        let shape = tensor.shape().clone();
        // Converted on the host: not every device has f64 (Metal).
        let data = tensor
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let world = self.shared.world_size;
        let deadline = Instant::now() + self.shared.timeout;
        let mut state = self.shared.lock();
        if let Some(failure) = &state.failure {
            return Err(candle::Error::from(failure.clone()).bt());
        }
        {
            let round = state.rounds.entry(seq).or_default();
            if round.contributions.is_empty() {
                round.contributions = (0..world).map(|_| None).collect();
            }
            round.contributions[self.rank] = Some(Contribution {
                kind,
                tag,
                dtype,
                shape: shape.clone(),
                data,
            });
            round.arrived += 1;
            if round.arrived == world {
                round.result = Some(complete(&round.contributions));
                for c in round.contributions.iter_mut() {
                    *c = None;
                }
                self.shared.cond.notify_all();
            }
        }
        loop {
            if let Some(result) = state.rounds.get(&seq).and_then(|r| r.result.clone()) {
                let round = state.rounds.get_mut(&seq).expect("round present");
                round.taken += 1;
                if round.taken == world {
                    state.rounds.remove(&seq);
                }
                drop(state);
                return match result {
                    Ok(values) => Tensor::from_slice(values.as_slice(), shape, &Device::Cpu)?
                        .to_dtype(dtype)?
                        .to_device(tensor.device()),
                    Err(e) => Err(e.into()),
                };
            }
            if let Some(failure) = &state.failure {
                return Err(candle::Error::from(failure.clone()).bt());
            }
            let missing = missing_ranks(&state, seq, world);
            let departed: Vec<usize> = missing
                .iter()
                .copied()
                .filter(|&r| state.departed[r])
                .collect();
            if !departed.is_empty() {
                let msg = Error::new(ErrorKind::PeerFailed { rank: departed[0] }, format!(
                    "in-process group: collective #{seq} ({kind}) cannot complete: rank(s) {departed:?} left the group (their thread ended or failed)"
                ));
                state.failure = Some(msg.clone());
                self.shared.cond.notify_all();
                return Err(candle::Error::from(msg).bt());
            }
            let now = Instant::now();
            if now >= deadline {
                let msg = Error::new(ErrorKind::Timeout, format!(
                    "in-process group: rank {} timed out after {:?} in collective #{seq} ({kind}) waiting for rank(s) {missing:?}",
                    self.rank, self.shared.timeout
                ));
                state.failure = Some(msg.clone());
                self.shared.cond.notify_all();
                return Err(candle::Error::from(msg).bt());
            }
            state = self
                .shared
                .cond
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn missing_ranks(state: &State, seq: u64, world: usize) -> Vec<usize> {
    match state.rounds.get(&seq) {
        Some(round) if round.result.is_none() => (0..world)
            .filter(|&r| round.contributions[r].is_none())
            .collect(),
        _ => Vec::new(),
    }
}

/// Checks that all ranks made the same call and computes its result.
fn complete(contributions: &[Option<Contribution>]) -> std::result::Result<Arc<Vec<f64>>, Error> {
    let all: Vec<&Contribution> = contributions
        .iter()
        .map(|c| c.as_ref().expect("all arrived"))
        .collect();
    let first = all[0];
    let agree = all.iter().all(|c| {
        c.kind == first.kind
            && c.tag == first.tag
            && c.dtype == first.dtype
            && c.shape == first.shape
    });
    if !agree {
        let calls: Vec<String> = all
            .iter()
            .enumerate()
            .map(|(r, c)| {
                let of = match c.tag {
                    CallTag::UNTAGGED => String::new(),
                    tag => format!(" for {tag}"),
                };
                format!(
                    "rank {r}: {} of {:?} {:?}{of}",
                    c.kind,
                    c.dtype,
                    c.shape.dims()
                )
            })
            .collect();
        return Err(Error::new(ErrorKind::RanksDisagree, format!(
            "in-process group: ranks disagree on the collective (different call, layer, shape or dtype — e.g. a different channel count, or layers called in a different order): {}",
            calls.join("; ")
        )));
    }
    match first.kind {
        Kind::AllReduceSum => {
            let mut sum = first.data.clone();
            for c in &all[1..] {
                for (s, v) in sum.iter_mut().zip(c.data.iter()) {
                    *s += v;
                }
            }
            Ok(Arc::new(sum))
        }
        Kind::Broadcast { root } => Ok(Arc::new(all[root].data.clone())),
    }
}

impl Drop for ThreadsBackend {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.departed[self.rank] = true;
        self.shared.cond.notify_all();
    }
}

impl Backend for ThreadsBackend {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        self.collective(Kind::AllReduceSum, CallTag::UNTAGGED, tensor)
    }

    fn all_reduce_sum_tagged(&self, tensor: &Tensor, tag: CallTag) -> Result<Tensor> {
        self.collective(Kind::AllReduceSum, tag, tensor)
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        self.collective(Kind::Broadcast { root }, CallTag::UNTAGGED, tensor)
    }

    fn name(&self) -> &str {
        "threads"
    }
}
