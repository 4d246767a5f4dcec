//! The one-time warning for a synchronized layer that only ever runs in eval
//! mode: the mark of a model that calls it as `apply_t(&bn, false)` (inside
//! a `Func`, say) and so never trains or synchronizes it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The eval-mode forwards after which a layer that never trained warns.
pub(crate) const EVAL_ONLY_WARN_AFTER: u64 = 100;

/// Counts a layer's eval-mode forwards until its first training forward;
/// shared by the layer's clones.
#[derive(Debug, Clone, Default)]
pub(crate) struct EvalOnlyWatch(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    evals: AtomicU64,
    trained: AtomicBool,
    warned: AtomicBool,
}

impl EvalOnlyWatch {
    /// Notes a forward; returns the warning to print, once, when this is the
    /// [`EVAL_ONLY_WARN_AFTER`]th eval-mode forward of a layer that
    /// synchronizes over `world_size > 1` ranks and has never trained.
    pub(crate) fn note(&self, train: bool, layer: &str, world_size: usize) -> Option<String> {
        let w = &self.0;
        if train {
            w.trained.store(true, Ordering::Relaxed);
            return None;
        }
        if world_size <= 1 || w.trained.load(Ordering::Relaxed) {
            return None;
        }
        let evals = w.evals.fetch_add(1, Ordering::Relaxed) + 1;
        if evals < EVAL_ONLY_WARN_AFTER || w.warned.swap(true, Ordering::Relaxed) {
            return None;
        }
        Some(format!(
            "candle-syncbn: warning: SyncBatchNorm '{layer}' synchronizes over {world_size} ranks but has run {evals} forwards in eval mode and none in training mode, so its statistics are never synchronized (nor trained). If the model calls it as `apply_t(&bn, false)` (e.g. inside a `Func`) or through `Module::forward`, pass `train` through: `FuncT` and `forward_t(x, train)` (docs/converting.md). A model that is only evaluated can use ProcessGroup::single() or FrozenBatchNorm. (Printed once per layer.)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_once_after_the_threshold_on_several_ranks_only() {
        let watch = EvalOnlyWatch::default();
        for _ in 1..EVAL_ONLY_WARN_AFTER {
            assert_eq!(watch.note(false, "bn1", 2), None);
        }
        let w = watch.note(false, "bn1", 2).expect("warns at the threshold");
        assert!(
            w.contains("'bn1'") && w.contains("over 2 ranks") && w.contains("FuncT"),
            "{w}"
        );
        // Once per layer, clones included.
        let clone = watch.clone();
        for _ in 0..3 * EVAL_ONLY_WARN_AFTER {
            assert_eq!(clone.note(false, "bn1", 2), None);
        }
        // A layer that trained once, or that has no one to synchronize with,
        // never warns.
        let trained = EvalOnlyWatch::default();
        trained.note(true, "bn2", 2);
        let single = EvalOnlyWatch::default();
        for _ in 0..2 * EVAL_ONLY_WARN_AFTER {
            assert_eq!(trained.note(false, "bn2", 2), None);
            assert_eq!(single.note(false, "bn3", 1), None);
        }
    }
}
