//! What becomes of a job when its launcher dies without cleaning up (Linux),
//! e.g. `kill -9` of the launcher or the OOM killer.
//!
//! - **The ranks die with it.** Each rank is started with
//!   `PR_SET_PDEATHSIG = SIGKILL` ([`die_with_launcher`], run in the child
//!   between fork and exec), then checks that its parent is still the
//!   launcher: a launcher that died before the `prctl` took effect would
//!   otherwise leave the rank re-parented and never signalled. `SIGKILL`
//!   rather than `SIGTERM`: with the launcher gone nobody is left to enforce
//!   a grace period, so a rank that traps or ignores `SIGTERM` (one that saves
//!   a checkpoint on it, say) would run on for good, its peers gone and its
//!   output pipe broken; checkpoints are written atomically, so a killed save
//!   leaves the previous one intact.
//!
//!   The death signal fires when the *thread* that forked the rank ends, not
//!   only the process: [`launch`](super::launch) starts every rank from the
//!   thread that called it, and that thread stays in `launch` until every
//!   rank has been reaped, so it outlives its ranks (and should it unwind
//!   early, the ranks are killed, as they should be).
//! - **The job folder goes when the last of them ends.** A [`Janitor`],
//!   forked by the launcher before the ranks, holds the read end of a pipe;
//!   the launcher and every rank hold the write end, so the janitor reads
//!   end-of-file exactly when the last of them has ended, however it ended.
//!   It then removes the folder's files and the folder, and exits. When the
//!   launcher ends normally it removes the folder itself and ends the janitor.
//!
//! A rank's own children inherit the write end too (it is not close-on-exec
//! in the rank): a process a rank leaves running keeps the folder until it
//! ends. The janitor removes files and empty folders only, which is all the
//! rendezvous writes there.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// For a rank's `pre_exec` (between fork and exec, so async-signal-safe
/// calls only): the rank gets `SIGKILL` when the launcher's thread ends,
/// refuses to start when the launcher (`launcher`, its pid taken before the
/// fork) has already ended, and keeps the janitor's `keep_alive` descriptor
/// across exec.
pub(crate) fn die_with_launcher(launcher: libc::pid_t, keep_alive: RawFd) -> io::Result<()> {
    // SAFETY: prctl, getppid and fcntl are system calls without memory effects
    // on this process (async-signal-safe).
    unsafe {
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        // The launcher ended between fork and prctl: this rank was re-parented
        // and will never get the death signal.
        if libc::getppid() != launcher {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        if libc::fcntl(keep_alive, libc::F_SETFD, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The process that removes the job folder once the launcher and every rank
/// have ended (see the module documentation). Dropping it ends it (the
/// launcher has removed the folder itself by then).
pub(crate) struct Janitor {
    pid: libc::pid_t,
    keep_alive: OwnedFd,
}

impl Janitor {
    /// Forks the janitor of folder `dir`.
    pub(crate) fn start(dir: &Path) -> io::Result<Janitor> {
        let path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills two descriptors, which are then owned here.
        let (read, write) = unsafe {
            if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                return Err(io::Error::last_os_error());
            }
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        // Keep the write end off 0-2, which a rank's stdio redirection would
        // overwrite.
        // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor, owned here.
        let keep_alive = unsafe {
            let fd = libc::fcntl(write.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(fd)
        };
        drop(write);
        // SAFETY: the child makes system calls only (no allocation, no lock)
        // until it exits, as a fork of a process with other threads must.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: in the forked child, which never returns from `serve`.
            unsafe { serve(read.as_raw_fd(), &path) }
        }
        Ok(Janitor { pid, keep_alive })
    }

    /// The descriptor every rank must hold (see [`die_with_launcher`]).
    pub(crate) fn keep_alive_fd(&self) -> RawFd {
        self.keep_alive.as_raw_fd()
    }
}

impl Drop for Janitor {
    fn drop(&mut self) {
        // SAFETY: `pid` is this process's child, not reaped before this point
        // (so the number cannot belong to another process); waitpid reaps it.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            let mut status = 0;
            while libc::waitpid(self.pid, &mut status, 0) < 0
                && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
            {}
        }
    }
}

/// The janitor's life: no stdio, no other descriptor, deaf to the signals a
/// terminal sends its process group; waits for end-of-file on `keep_alive`,
/// removes `dir`, exits.
///
/// # Safety
/// Only in a freshly forked child; never returns.
unsafe fn serve(keep_alive: RawFd, dir: &CStr) -> ! {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = libc::SIG_IGN;
        libc::sigaction(sig, &act, std::ptr::null_mut());
    }
    close_all_but(keep_alive);
    let mut buf = [0u8; 64];
    loop {
        let r = libc::read(keep_alive, buf.as_mut_ptr().cast(), buf.len());
        if r > 0 || (r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)) {
            continue;
        }
        break;
    }
    remove_dir(dir);
    libc::_exit(0)
}

/// Closes every descriptor except `keep`.
///
/// # Safety
/// Only where no other code uses descriptors (the forked janitor).
unsafe fn close_all_but(keep: RawFd) {
    let keep = keep as libc::c_uint;
    let below = keep == 0 || libc::syscall(libc::SYS_close_range, 0, keep - 1, 0) == 0;
    let above = libc::syscall(libc::SYS_close_range, keep + 1, libc::c_uint::MAX, 0) == 0;
    if below && above {
        return;
    }
    // Kernels before 5.9: close them one by one.
    let mut lim: libc::rlimit = std::mem::zeroed();
    let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
        lim.rlim_cur.min(1 << 20) as libc::c_uint
    } else {
        1024
    };
    for fd in (0..max).filter(|&fd| fd != keep) {
        libc::close(fd as libc::c_int);
    }
}

/// Removes the files and empty folders in `dir`, then `dir` (a few passes,
/// in case a rank killed at that moment had just created a file).
///
/// # Safety
/// System calls only: callable in the forked janitor.
unsafe fn remove_dir(dir: &CStr) {
    let fd = libc::open(
        dir.as_ptr(),
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
    );
    if fd < 0 {
        return;
    }
    for _ in 0..4 {
        let mut buf = [0u64; 512];
        libc::lseek(fd, 0, libc::SEEK_SET);
        loop {
            let n = libc::syscall(
                libc::SYS_getdents64,
                fd,
                buf.as_mut_ptr(),
                std::mem::size_of_val(&buf),
            );
            if n <= 0 {
                break;
            }
            let bytes = buf.as_ptr().cast::<u8>();
            let mut at = 0usize;
            while at + 19 < n as usize {
                // struct linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name.
                let reclen = std::ptr::read_unaligned(bytes.add(at + 16).cast::<u16>()) as usize;
                if reclen == 0 {
                    break;
                }
                let name = bytes.add(at + 19).cast::<libc::c_char>();
                let dot = *name == b'.' as libc::c_char;
                let is_self = dot && *name.add(1) == 0;
                let is_parent = dot && *name.add(1) == b'.' as libc::c_char && *name.add(2) == 0;
                if !is_self
                    && !is_parent
                    && libc::unlinkat(fd, name, 0) != 0
                    && io::Error::last_os_error().raw_os_error() == Some(libc::EISDIR)
                {
                    libc::unlinkat(fd, name, libc::AT_REMOVEDIR);
                }
                at += reclen;
            }
        }
        if libc::rmdir(dir.as_ptr()) == 0 {
            break;
        }
    }
    libc::close(fd);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The janitor removes the folder (files included) once every holder of
    /// the write end is gone, not before.
    #[test]
    fn janitor_removes_the_folder_after_the_last_holder() {
        let dir = std::env::temp_dir().join(format!("syncbn-janitor-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("port"), "1234").unwrap();
        std::fs::write(dir.join(".port.tmp"), "").unwrap();
        std::fs::create_dir(dir.join("empty")).unwrap();
        let janitor = Janitor::start(&dir).unwrap();
        // A second holder, as a rank holds it.
        // SAFETY: dup returns a new descriptor, owned here.
        let holder = unsafe {
            OwnedFd::from_raw_fd(libc::fcntl(
                janitor.keep_alive_fd(),
                libc::F_DUPFD_CLOEXEC,
                3,
            ))
        };
        // Only the launcher's copy closes: the janitor must wait for the other.
        let janitor = std::mem::ManuallyDrop::new(janitor);
        let pid = janitor.pid;
        // SAFETY: read once; the original is never dropped.
        drop(unsafe { std::ptr::read(&janitor.keep_alive) });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(dir.join("port").exists(), "removed while a holder lives");
        drop(holder);
        let mut status = 0;
        // SAFETY: `pid` is this test's child; waitpid reaps it.
        let reaped = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(reaped, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert!(!dir.exists(), "{dir:?} left behind");
    }
}
