//! What [`crate::precise_bn`] needs of a [`SyncBatchNorm`]: a switch that
//! makes each training forward store its batch's statistics as the running
//! statistics (momentum 1), and the running-statistics variables.

use super::SyncBatchNorm;
use candle::Tensor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// While on, training forwards replace the running statistics by the
/// (global) batch statistics, whatever the configured momentum. Clones of a
/// layer share it, as they share the running statistics it governs.
#[derive(Debug, Clone, Default)]
pub(crate) struct PreciseSwitch(Arc<AtomicBool>);

impl PreciseSwitch {
    /// Turns the switch on or off.
    pub(crate) fn set(&self, on: bool) {
        self.0.store(on, Ordering::SeqCst)
    }

    /// Whether `other` is this switch (of a clone of the same layer).
    pub(crate) fn same(&self, other: &PreciseSwitch) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Whether the switch is on.
    pub(crate) fn is_on(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl SyncBatchNorm {
    /// The momentum training forwards use: the configured one, or `Some(1)`
    /// while [`Self::precise_switch`] is on.
    pub(super) fn momentum(&self) -> Option<f64> {
        if self.precise.is_on() {
            Some(1.0)
        } else {
            self.config.momentum
        }
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
