//! Running a probe of the launcher's limits under a cap on its user's
//! processes (Linux, as root): the probe runs as a uid no account uses, with
//! `RLIMIT_NPROC` set, so that a regression of the limit under test fails
//! the test instead of flooding the machine (root ignores `RLIMIT_NPROC`,
//! and a shared uid such as `nobody` may already run other processes).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A uid no account uses, distinct per test process and `salt`
/// (`RLIMIT_NPROC` counts every process and thread of the real uid).
pub fn unused_uid(salt: u32) -> u32 {
    2_000_000_000 + (std::process::id() % 10_000_000) * 16 + salt % 16
}

/// Whether this process may switch to another uid (it is root); when not,
/// prints that `probe` is skipped and why.
pub fn can_switch_user(probe: &str) -> bool {
    // SAFETY: geteuid has no memory effects.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        println!(
            "skipped {probe}: running it as an unprivileged uid with a process cap needs root"
        );
        return false;
    }
    // The CUDA build's executables load libcuda and the CUDA libraries from
    // folders of the user who built them (the pinned toolchain under
    // `$HOME/.cache`, the emulated GPU under `target/`), which another uid
    // may not read; the CPU build runs the same probe.
    if cfg!(feature = "cuda") {
        println!(
            "skipped {probe} in the CUDA build: its executables load the CUDA libraries from folders another uid may not read (the CPU build runs it)"
        );
        return false;
    }
    true
}

/// `exe` hard-linked (or copied) into `dir` with mode 0755, and `dir` given
/// to `uid`: what a process of `uid` needs to run it and to write there
/// (`target/` may be private to its owner).
pub fn reachable_copy(exe: &Path, dir: &Path, uid: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let copy = dir.join(exe.file_name().expect("an executable's name"));
    if std::fs::hard_link(exe, &copy).is_err() {
        std::fs::copy(exe, &copy).unwrap();
    }
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(dir, Some(uid), Some(uid)).unwrap();
    copy
}

/// Makes `cmd` run as `uid` (group `uid`, no supplementary groups) with at
/// most `cap` processes and threads for that uid, its temporary files in
/// `tmp`.
pub fn run_capped(cmd: &mut Command, uid: u32, cap: u64, tmp: &Path) {
    use std::os::unix::process::CommandExt;
    cmd.uid(uid).gid(uid).env("TMPDIR", tmp);
    // SAFETY: setrlimit is async-signal-safe. It runs after the switch to
    // `uid`, which may lower its own limit.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: cap as libc::rlim_t,
                rlim_max: cap as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NPROC, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
