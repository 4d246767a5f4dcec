//! The launcher's termination signals (Linux): `SIGTERM` and `SIGINT` are
//! caught while ranks run, so that the launcher can forward them and give the
//! ranks a grace period (a checkpoint in flight gets written) before it kills
//! them.
//!
//! The handler only stores the signal number and bumps a counter (atomics are
//! async-signal-safe); the launcher's poll loop reads them. Handlers are
//! installed by the first [`TerminationSignals`] alive and the previous
//! dispositions restored when the last is dropped, so concurrent launches in
//! one process share them. A signal that was ignored when the launcher started
//! (`nohup`, a background job of a non-interactive shell) stays ignored.

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The signals the launcher forwards.
const CAUGHT: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// Number of caught signals so far, and the latest one.
static COUNT: AtomicUsize = AtomicUsize::new(0);
static LAST: AtomicI32 = AtomicI32::new(0);

extern "C" fn record(sig: libc::c_int) {
    LAST.store(sig, Ordering::SeqCst);
    COUNT.fetch_add(1, Ordering::SeqCst);
}

struct Installed {
    users: usize,
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

static INSTALLED: Mutex<Installed> = Mutex::new(Installed {
    users: 0,
    previous: Vec::new(),
});

/// While alive, `SIGTERM` and `SIGINT` are recorded instead of ending the
/// process; [`take`](Self::take) returns each new one.
pub(crate) struct TerminationSignals {
    seen: usize,
}

impl TerminationSignals {
    /// Starts catching (see the module documentation).
    pub(crate) fn catch() -> Self {
        let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
        if installed.users == 0 {
            installed.previous.clear();
            for sig in CAUGHT {
                // SAFETY: `record` only touches atomics, which is
                // async-signal-safe; the structs are plain data, zeroed and
                // then filled as sigaction(2) documents.
                unsafe {
                    let mut act: libc::sigaction = std::mem::zeroed();
                    act.sa_sigaction = record as extern "C" fn(libc::c_int) as libc::sighandler_t;
                    act.sa_flags = libc::SA_RESTART;
                    libc::sigemptyset(&mut act.sa_mask);
                    let mut old: libc::sigaction = std::mem::zeroed();
                    if libc::sigaction(sig, &act, &mut old) != 0 {
                        continue;
                    }
                    if old.sa_sigaction == libc::SIG_IGN {
                        libc::sigaction(sig, &old, std::ptr::null_mut());
                        continue;
                    }
                    installed.previous.push((sig, old));
                }
            }
        }
        installed.users += 1;
        Self {
            seen: COUNT.load(Ordering::SeqCst),
        }
    }

    /// The latest signal caught since the previous [`take`](Self::take), if
    /// any, leaving it for `take`.
    pub(crate) fn pending(&self) -> Option<i32> {
        (COUNT.load(Ordering::SeqCst) != self.seen).then(|| LAST.load(Ordering::SeqCst))
    }

    /// The latest signal caught since the previous call, if any.
    pub(crate) fn take(&mut self) -> Option<i32> {
        let count = COUNT.load(Ordering::SeqCst);
        if count == self.seen {
            return None;
        }
        self.seen = count;
        Some(LAST.load(Ordering::SeqCst))
    }
}

impl Drop for TerminationSignals {
    fn drop(&mut self) {
        let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
        installed.users -= 1;
        if installed.users == 0 {
            for (sig, old) in installed.previous.drain(..) {
                // SAFETY: restores a disposition sigaction(2) returned.
                unsafe {
                    libc::sigaction(sig, &old, std::ptr::null_mut());
                }
            }
        }
    }
}

/// Sends `sig` to process `pid`. The caller guarantees that `pid` is a child
/// it has not reaped yet (so the number cannot belong to another process).
pub(crate) fn send(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory effects.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Blocks until child `pid` has exited, without reaping it (its status stays
/// for `Child::try_wait`, and its pid stays reserved until then).
pub(crate) fn wait_exited(pid: u32) {
    loop {
        // SAFETY: `info` is a plain struct that waitid(2) fills.
        let r = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// The conventional name of a signal, e.g. `SIGKILL` for 9.
pub(crate) fn name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return None,
    })
}

/// SIGKILL.
pub(crate) const KILL: i32 = libc::SIGKILL;
/// SIGTERM.
pub(crate) const TERM: i32 = libc::SIGTERM;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(name(9), Some("SIGKILL"));
        assert_eq!(name(15), Some("SIGTERM"));
        assert_eq!(name(2), Some("SIGINT"));
        assert_eq!(name(1000), None);
    }
}
