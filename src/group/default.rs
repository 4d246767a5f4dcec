//! The process-wide (and per-thread) default group, for code that does not pass one.

use super::ProcessGroup;
use std::cell::RefCell;
use std::sync::RwLock;

static PROCESS_DEFAULT: RwLock<Option<ProcessGroup>> = RwLock::new(None);

thread_local! {
    static THREAD_DEFAULT: RefCell<Option<ProcessGroup>> = const { RefCell::new(None) };
}

/// Sets the process-wide default group, returned by [`default_group`] on every
/// thread that has no thread default. Typically called once after the
/// rendezvous, before the model is built.
pub fn set_default_group(group: ProcessGroup) {
    let mut slot = PROCESS_DEFAULT.write().unwrap_or_else(|e| e.into_inner());
    *slot = Some(group);
}

/// Sets (or with `None` clears) the default group of the calling thread only.
/// This is how in-process ranks (one thread each) get their own default group.
pub fn set_thread_default_group(group: Option<ProcessGroup>) {
    THREAD_DEFAULT.with(|slot| *slot.borrow_mut() = group);
}

/// The default group: the calling thread's if set, else the process-wide one,
/// else [`ProcessGroup::single`].
pub fn default_group() -> ProcessGroup {
    if let Some(group) = THREAD_DEFAULT.with(|slot| slot.borrow().clone()) {
        return group;
    }
    let slot = PROCESS_DEFAULT.read().unwrap_or_else(|e| e.into_inner());
    slot.clone().unwrap_or_else(ProcessGroup::single)
}
