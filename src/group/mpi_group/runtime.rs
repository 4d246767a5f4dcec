//! The MPI library's process-wide state: initialized once, finalized once,
//! never after an abort; the thread level it granted; the end of a job.
//!
//! - Initialization asks for `MPI_THREAD_MULTIPLE` (Open MPI and MPICH grant
//!   it) and accepts `MPI_THREAD_SERIALIZED`, under which every MPI call of
//!   this crate is made under one process-wide lock ([`Runtime::call`]); a
//!   lower level is an error. MPI initialized by the program itself (its own
//!   `mpi::initialize`) is used as it is and left for the program to finalize.
//! - `MPI_Finalize` runs once: when the last MPI group of the process is
//!   dropped (every group holds the [`Runtime`]), or at exit (an `atexit`
//!   hook, for groups kept until then, e.g. a default group). MPI cannot be
//!   initialized again afterwards: a later [`Runtime::get`] is an error.
//! - [`Runtime::abort`] prints its message and ends the whole job with
//!   `MPI_Abort`: the only way out of a collective that a peer never joins.

use mpi::environment::{Threading, Universe};
use mpi::topology::{Communicator, SimpleCommunicator};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, Weak};

/// The exit status `MPI_Abort` asks the launcher for when a collective
/// times out (as `timeout(1)`).
pub(crate) const ABORT_CODE: i32 = 124;

/// The runtime of the MPI groups alive in this process.
static CURRENT: Mutex<Weak<Runtime>> = Mutex::new(Weak::new());
/// Set once this crate finalized MPI (it cannot be initialized again).
static FINALIZED: AtomicBool = AtomicBool::new(false);
/// Serializes the crate's MPI calls when the library granted only
/// `MPI_THREAD_SERIALIZED`.
static CALLS: Mutex<()> = Mutex::new(());
static AT_EXIT: Once = Once::new();

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// MPI, initialized, for as long as a group holds it.
pub(crate) struct Runtime {
    /// `Some` while MPI is initialized by this crate: dropping it finalizes.
    universe: Mutex<Option<Universe>>,
    /// Whether calls must be serialized (`MPI_THREAD_SERIALIZED` granted).
    serialize: bool,
}

impl Runtime {
    /// The runtime of this process, initializing MPI on first use.
    pub(crate) fn get() -> candle::Result<Arc<Runtime>> {
        let mut current = lock(&CURRENT);
        if let Some(rt) = current.upgrade() {
            return Ok(rt);
        }
        if FINALIZED.load(Ordering::SeqCst) || mpi::environment::is_finalized() {
            candle::bail!(
                "mpi group: MPI was already finalized in this process (every MPI group was dropped, or the program finalized it); MPI cannot be initialized twice: keep a group alive for as long as the process uses MPI"
            )
        }
        let (universe, granted) = match mpi::initialize_with_threading(Threading::Multiple) {
            Some((universe, granted)) => (Some(universe), granted),
            // The program initialized MPI itself.
            None => (None, mpi::environment::threading_support()),
        };
        let serialize = match granted {
            Threading::Multiple => false,
            Threading::Serialized => true,
            other => {
                if universe.is_some() {
                    FINALIZED.store(true, Ordering::SeqCst);
                    drop(universe);
                }
                candle::bail!(
                    "mpi group: the MPI library granted the thread level {other:?}; the group needs MPI_THREAD_MULTIPLE or MPI_THREAD_SERIALIZED (initialize MPI with one of them, or use an MPI build that supports them)"
                )
            }
        };
        let owned = universe.is_some();
        let rt = Arc::new(Runtime {
            universe: Mutex::new(universe),
            serialize,
        });
        if owned {
            AT_EXIT.call_once(|| {
                // SAFETY: registers a plain `extern "C"` function without
                // arguments, as `atexit` requires. A failure to register
                // only loses the finalization at exit.
                unsafe {
                    libc::atexit(finalize_at_exit);
                }
            });
        }
        *current = Arc::downgrade(&rt);
        Ok(rt)
    }

    /// Runs `f` (one MPI call, never one that waits for other ranks without
    /// a deadline except as documented at its use) under the process-wide
    /// lock when MPI requires calls to be serialized.
    pub(crate) fn call<R>(&self, f: impl FnOnce() -> R) -> R {
        let _guard = self.serialize.then(|| lock(&CALLS));
        f()
    }

    /// Finalizes MPI if this runtime initialized it and it was not
    /// finalized yet.
    fn finalize(&self) {
        let universe = lock(&self.universe).take();
        if let Some(universe) = universe {
            let _guard = lock(&CALLS);
            FINALIZED.store(true, Ordering::SeqCst);
            // rsmpi's `Universe` calls `MPI_Finalize` when dropped.
            drop(universe);
        }
    }

    /// Prints `msg` and ends every rank of the job: `MPI_Abort` on the
    /// world communicator (the launcher then kills the other ranks and
    /// exits with a non-zero status). MPI offers no other way to leave a
    /// collective that a peer never joins.
    pub(crate) fn abort(&self, msg: &str) -> ! {
        eprintln!("{msg}");
        eprintln!("mpi group: ending the job with MPI_Abort (exit status {ABORT_CODE})");
        // Not under the call lock: another thread may hold it, and the
        // process ends here whatever that thread does.
        SimpleCommunicator::world().abort(ABORT_CODE)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.finalize();
    }
}

/// Whether MPI was finalized by this crate (communicators must not be
/// freed afterwards).
pub(crate) fn finalized() -> bool {
    FINALIZED.load(Ordering::SeqCst)
}

/// The `atexit` hook: finalizes MPI when groups are still alive at exit
/// (a group kept in a static, a default group), since a rank that exits
/// without `MPI_Finalize` fails the whole job under `mpirun`.
extern "C" fn finalize_at_exit() {
    // `try_lock`: never wait at exit (another thread may be stopped while
    // holding the lock); then MPI is not finalized, as without the hook.
    let rt = match CURRENT.try_lock() {
        Ok(current) => current.upgrade(),
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().upgrade(),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    if let Some(rt) = rt {
        rt.finalize();
    }
}

/// The world communicator's size and this process's rank in it.
pub(crate) fn world_rank_and_size(rt: &Runtime) -> (usize, usize) {
    rt.call(|| {
        let world = SimpleCommunicator::world();
        (world.rank() as usize, world.size() as usize)
    })
}
