//! What [`crate::precise_bn`] needs of a [`SyncBatchNorm`] (and of a
//! [`LocalBatchNorm`](crate::LocalBatchNorm)): a switch that makes each
//! training forward store its batch's statistics as the running statistics
//! (momentum 1) and note the batch's count, and the running-statistics
//! variables.

use super::SyncBatchNorm;
use candle::{Result, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The number of values per channel a training forward normalized over.
#[derive(Debug, Clone)]
pub(crate) enum BatchCount {
    /// A synchronized layer's global count, as its all-reduce left it on the
    /// device: a `(C)` or `(1)` float tensor (no copy to the host).
    Global(Tensor),
    /// A local layer's own count (`numel / C`), known on the host.
    Local(usize),
}

/// The training forwards a layer ran since the last [`PreciseSwitch::take`].
#[derive(Debug, Default)]
pub(crate) struct BatchRecord {
    /// How many training forwards ran.
    pub(crate) forwards: usize,
    /// The count of the last of them.
    pub(crate) count: Option<BatchCount>,
}

#[derive(Debug, Default)]
struct State {
    on: AtomicBool,
    batch: Mutex<BatchRecord>,
}

/// While on, training forwards replace the running statistics by the
/// (global) batch statistics, whatever the configured momentum, and note
/// their count. Clones of a layer share it, as they share the running
/// statistics it governs.
#[derive(Debug, Clone, Default)]
pub(crate) struct PreciseSwitch(Arc<State>);

impl PreciseSwitch {
    /// Turns the switch on if it is off (forgetting what was noted);
    /// `false` when it was on already (another recomputation holds it).
    pub(crate) fn claim(&self) -> bool {
        let claimed = self
            .0
            .on
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if claimed {
            self.take();
        }
        claimed
    }

    /// Turns the switch off (forgetting what was noted).
    pub(crate) fn release(&self) {
        self.0.on.store(false, Ordering::SeqCst);
        self.take();
    }

    /// Whether `other` is this switch (of a clone of the same layer).
    pub(crate) fn same(&self, other: &PreciseSwitch) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Whether the switch is on.
    pub(crate) fn is_on(&self) -> bool {
        self.0.on.load(Ordering::SeqCst)
    }

    /// Notes a training forward over `count` values per channel (while on).
    pub(crate) fn record(&self, count: BatchCount) {
        let mut batch = self.batch();
        batch.forwards += 1;
        batch.count = Some(count);
    }

    /// What was noted since the last call, and starts afresh.
    pub(crate) fn take(&self) -> BatchRecord {
        std::mem::take(&mut *self.batch())
    }

    /// The record (a panic elsewhere while holding it leaves plain data).
    fn batch(&self) -> MutexGuard<'_, BatchRecord> {
        self.0.batch.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SyncBatchNorm {
    /// The momentum training forwards use: the configured one, or `Some(1)`
    /// while [`Self::precise_switch`] is on.
    pub(super) fn update_momentum(&self) -> Option<f64> {
        if self.precise.is_on() {
            Some(1.0)
        } else {
            self.config.momentum
        }
    }

    /// While [`Self::precise_switch`] is on, notes a training forward that
    /// updated the running statistics over `global_count()` values per
    /// channel (not evaluated while off).
    pub(super) fn note_precise_batch(
        &self,
        global_count: impl FnOnce() -> Result<Tensor>,
    ) -> Result<()> {
        if self.running.is_some() && self.precise.is_on() {
            let count = global_count()?.detach();
            self.precise.record(BatchCount::Global(count));
        }
        Ok(())
    }

    /// The switch that makes training forwards store each batch's statistics.
    pub(crate) fn precise_switch(&self) -> &PreciseSwitch {
        &self.precise
    }

    /// The running-statistics variables `(running_mean, running_var,
    /// num_batches_tracked)` themselves (not copies), when tracked.
    pub(crate) fn running_variables(&self) -> Option<(&Tensor, &Tensor, &Tensor)> {
        self.running
            .as_ref()
            .map(|r| (&r.mean, &r.var, &r.num_batches_tracked))
    }
}
