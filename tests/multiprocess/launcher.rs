//! The self-spawning launcher with real processes (Linux): which rank it
//! blames when one dies, how it passes SIGTERM on to the ranks, where it
//! keeps the job's files, and that it owns its ranks (they die with it, a
//! signal stops spawning, a count the machine cannot run is refused, a failed
//! spawn leaves nothing behind).
//!
//! The test executable plays every part: a test starts it as the launcher
//! (`ROLE=launcher`, which calls `launch`), and the launcher starts it again
//! as the ranks (`ROLE=rank`), each doing what `SCENARIO` says and leaving
//! files (its pid, markers) in the test's scratch folder.
#![cfg(target_os = "linux")]

use crate::common;

use candle::Device;
use candle_syncbn::launch::{launch, LaunchConfig};
use candle_syncbn::ProcessGroup;
use common::{capped, scratch_dir};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const ROLE: &str = "SYNCBN_TEST_ROLE";
const SCENARIO: &str = "SYNCBN_TEST_SCENARIO";
const DIR: &str = "SYNCBN_TEST_DIR";
const NPROC: &str = "SYNCBN_TEST_NPROC";
/// A shell script the launcher runs as the ranks instead of this executable.
const RANK_SCRIPT: &str = "SYNCBN_TEST_RANK_SCRIPT";
/// How long a rank waits for the test to act before it gives up on its own.
const RANK_LIFETIME: Duration = Duration::from_secs(60);

/// The arguments that make this executable run [`worker`] and no other test.
fn worker_args() -> Vec<OsString> {
    common::worker_args(module_path!())
}

/// Writes `text` to `dir/name` atomically (the test polls for the file).
fn publish(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

static TERM_RECEIVED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM_RECEIVED.store(true, Ordering::SeqCst);
}

/// One rank of a scenario.
fn rank_main(scenario: &str, dir: &Path) -> i32 {
    let rank: usize = std::env::var("RANK").unwrap().parse().unwrap();
    let start = Instant::now();
    match scenario {
        // A TCP group in a loop of barriers: when a rank dies, the others
        // fail with an error within moments (as in a training loop).
        "barriers" => {
            let group = match ProcessGroup::from_env(&Device::Cpu) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("group: {e}");
                    return 1;
                }
            };
            publish(dir, &format!("pid{rank}"), &std::process::id().to_string());
            while start.elapsed() < RANK_LIFETIME {
                if let Err(e) = group.barrier() {
                    eprintln!("barrier: {e}");
                    return 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            0
        }
        // Traps SIGTERM: writes a marker (the "checkpoint") and exits 0.
        "trap-term" => {
            // SAFETY: the handler only stores to an atomic.
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_term as extern "C" fn(libc::c_int) as libc::sighandler_t;
                libc::sigemptyset(&mut act.sa_mask);
                assert_eq!(
                    libc::sigaction(libc::SIGTERM, &act, std::ptr::null_mut()),
                    0
                );
            }
            publish(dir, &format!("pid{rank}"), &std::process::id().to_string());
            while start.elapsed() < RANK_LIFETIME {
                if TERM_RECEIVED.load(Ordering::SeqCst) {
                    publish(dir, &format!("saved{rank}"), "checkpoint written");
                    return 0;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            0
        }
        // Ignores SIGTERM: only SIGKILL stops it.
        "ignore-term" => {
            // SAFETY: setting a disposition to SIG_IGN.
            unsafe {
                libc::signal(libc::SIGTERM, libc::SIG_IGN);
            }
            publish(dir, &format!("pid{rank}"), &std::process::id().to_string());
            while start.elapsed() < RANK_LIFETIME {
                std::thread::sleep(Duration::from_millis(10));
            }
            0
        }
        // Publishes the job folder, ignores SIGTERM and sleeps: only SIGKILL
        // (or the end of its lifetime) stops it.
        "sleep" => {
            let port_file = PathBuf::from(std::env::var("SYNCBN_PORT_FILE").unwrap());
            let job_dir = port_file.parent().unwrap().to_string_lossy().into_owned();
            publish(dir, &format!("jobdir{rank}"), &job_dir);
            // SAFETY: setting a disposition to SIG_IGN.
            unsafe {
                libc::signal(libc::SIGTERM, libc::SIG_IGN);
            }
            publish(dir, &format!("pid{rank}"), &std::process::id().to_string());
            while start.elapsed() < RANK_LIFETIME {
                std::thread::sleep(Duration::from_millis(10));
            }
            0
        }
        // Reports what it sees of the job's token and folder.
        "show-env" => {
            let token = std::env::var("SYNCBN_TOKEN").unwrap();
            let port_file = PathBuf::from(std::env::var("SYNCBN_PORT_FILE").unwrap());
            let job_dir = port_file.parent().unwrap();
            let mode = {
                use std::os::unix::fs::PermissionsExt;
                std::fs::metadata(job_dir).unwrap().permissions().mode() & 0o7777
            };
            let cmdline = std::fs::read("/proc/self/cmdline").unwrap();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            publish(
                dir,
                &format!("info{rank}"),
                &format!(
                    "{token}\n{}\n{mode:o}\n{cmdline}\n",
                    job_dir.to_string_lossy()
                ),
            );
            0
        }
        s => panic!("unknown scenario {s}"),
    }
}

/// Plays the launcher or a rank when started so; a no-op in a normal run.
#[test]
fn worker() {
    let (Ok(role), Ok(scenario), Ok(dir)) = (
        std::env::var(ROLE),
        std::env::var(SCENARIO),
        std::env::var(DIR),
    ) else {
        return;
    };
    let code = if role == "launcher" {
        let nproc = std::env::var(NPROC).unwrap().parse().unwrap();
        let mut cfg = match std::env::var(RANK_SCRIPT) {
            Ok(script) => LaunchConfig::new(nproc, "/bin/sh", vec!["-c".into(), script.into()]),
            Err(_) => LaunchConfig::new(nproc, std::env::current_exe().unwrap(), worker_args()),
        };
        cfg.envs = vec![(ROLE.into(), "rank".into())];
        match launch(&cfg) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("launch: {e}");
                99
            }
        }
    } else {
        rank_main(&scenario, Path::new(&dir))
    };
    std::process::exit(code)
}

/// A launcher process running a scenario; killed, with its ranks, when dropped.
struct Job {
    launcher: Child,
    dir: common::ScratchDir,
    nproc: usize,
    started: Instant,
}

impl Job {
    fn start(scenario: &str, nproc: usize, env: &[(&str, &str)]) -> Job {
        let dir = scratch_dir("launcher");
        let exe = std::env::current_exe().unwrap();
        Job::start_in(dir, &exe, scenario, nproc, env, |_| {})
    }

    /// [`start`](Self::start) with the scratch folder `dir`, the executable
    /// `exe` (this one, or a copy) and a last say on the launcher's command.
    fn start_in(
        dir: common::ScratchDir,
        exe: &Path,
        scenario: &str,
        nproc: usize,
        env: &[(&str, &str)],
        adjust: impl FnOnce(&mut Command),
    ) -> Job {
        let out = std::fs::File::create(dir.join("launcher.out")).unwrap();
        let mut cmd = Command::new(exe);
        cmd.args(worker_args())
            .env(ROLE, "launcher")
            .env(SCENARIO, scenario)
            .env(DIR, &*dir)
            .env(NPROC, nproc.to_string())
            .env("SYNCBN_TIMEOUT", "20")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out));
        for (k, v) in env {
            cmd.env(k, v);
        }
        adjust(&mut cmd);
        Job {
            launcher: cmd.spawn().unwrap(),
            dir,
            nproc,
            started: Instant::now(),
        }
    }

    /// The ranks' pids, once every rank has published its own.
    fn rank_pids(&self) -> Vec<u32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pids: Vec<Option<u32>> = (0..self.nproc)
                .map(|r| {
                    std::fs::read_to_string(self.dir.join(format!("pid{r}")))
                        .ok()
                        .and_then(|s| s.parse().ok())
                })
                .collect();
            if pids.iter().all(|p| p.is_some()) {
                return pids.into_iter().flatten().collect();
            }
            assert!(
                Instant::now() < deadline,
                "the ranks did not start within 30 s:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits at most `limit` for the launcher; its exit code and when it
    /// exited (from `since`).
    fn wait(&mut self, limit: Duration, since: Instant) -> (Option<i32>, Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.launcher.try_wait().unwrap() {
                return (st.code(), since.elapsed());
            }
            assert!(
                Instant::now() < deadline,
                "the launcher did not exit within {limit:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `sig` to `pid`, then waits at most `limit` for the launcher: its
    /// exit code, how long after the signal it exited, and its output.
    fn signal_and_wait(
        &mut self,
        pid: u32,
        sig: libc::c_int,
        limit: Duration,
    ) -> (Option<i32>, Duration, String) {
        let sent = Instant::now();
        // SAFETY: kill(2) has no memory effects.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0);
        let (code, elapsed) = self.wait(limit, sent);
        (code, elapsed, self.output())
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.dir.join("launcher.out")).unwrap_or_default()
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
        // Every process of this job (ranks, and whatever a regression left),
        // known by the scratch folder in its environment.
        for pid in live_job_processes(&self.dir) {
            // SAFETY: kill(2) has no memory effects.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

/// Whether process `pid` is gone (reaped).
fn is_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// The processes alive (not zombies) that belong to the job of scratch
/// folder `dir`: the launcher, its ranks and anything they started, which
/// all inherit `SYNCBN_TEST_DIR=<dir>`.
fn live_job_processes(dir: &Path) -> Vec<u32> {
    let mut needle = format!("{DIR}=").into_bytes();
    needle.extend(dir.as_os_str().as_encoded_bytes());
    needle.push(0);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            env.windows(needle.len()).any(|w| w == needle)
                && !matches!(state, None | Some(Some('Z' | 'X')))
        })
        .collect()
}

/// Waits at most `limit` until no process of the job of `dir` is alive;
/// returns how long it took, or the survivors.
fn wait_job_gone(dir: &Path, limit: Duration) -> std::result::Result<Duration, Vec<u32>> {
    let start = Instant::now();
    loop {
        let alive = live_job_processes(dir);
        if alive.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= limit {
            return Err(alive);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `kill -9` of rank 1: rank 0 fails right after it (its peer vanished), but
/// the launcher blames rank 1, names the signal, and exits with 128 + 9.
#[test]
fn launcher_blames_the_rank_that_was_killed() {
    let mut job = Job::start("barriers", 2, &[]);
    let pids = job.rank_pids();
    let (code, elapsed, out) = job.signal_and_wait(pids[1], libc::SIGKILL, Duration::from_secs(30));
    assert_eq!(code, Some(137), "{out}");
    assert!(
        out.contains("launcher: rank 1 was killed by signal 9 (SIGKILL)"),
        "{out}"
    );
    assert!(!out.contains("launcher: rank 0 exited"), "{out}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}\n{out}");
}

/// SIGTERM to the launcher reaches every rank; ranks that save and exit let
/// the launcher exit well before the grace period, with 128 + 15.
#[test]
fn launcher_forwards_sigterm_to_the_ranks() {
    let mut job = Job::start("trap-term", 2, &[("SYNCBN_KILL_GRACE", "30")]);
    job.rank_pids();
    let launcher = job.launcher.id();
    let (code, elapsed, out) =
        job.signal_and_wait(launcher, libc::SIGTERM, Duration::from_secs(20));
    assert_eq!(code, Some(143), "{out}");
    assert!(
        out.contains("launcher: got signal 15 (SIGTERM); forwarding it to rank(s) 0, 1, SIGKILL after 30.0 s"),
        "{out}"
    );
    for r in 0..2 {
        let saved = std::fs::read_to_string(job.dir.join(format!("saved{r}")));
        assert_eq!(saved.ok().as_deref(), Some("checkpoint written"), "{out}");
    }
    assert!(!out.contains("sending SIGKILL"), "{out}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}\n{out}");
}

/// A rank that ignores SIGTERM is killed once the grace period is over.
#[test]
fn launcher_kills_ranks_that_ignore_sigterm_after_the_grace_period() {
    let mut job = Job::start("ignore-term", 2, &[("SYNCBN_KILL_GRACE", "1")]);
    let pids = job.rank_pids();
    let launcher = job.launcher.id();
    let (code, elapsed, out) =
        job.signal_and_wait(launcher, libc::SIGTERM, Duration::from_secs(20));
    assert_eq!(code, Some(143), "{out}");
    assert!(
        out.contains(
            "launcher: rank(s) 0, 1 still running 1.0 s after being told to stop; sending SIGKILL"
        ),
        "{out}"
    );
    assert!(elapsed >= Duration::from_millis(950), "{elapsed:?}\n{out}");
    assert!(elapsed < Duration::from_secs(8), "{elapsed:?}\n{out}");
    for pid in pids {
        assert!(is_gone(pid), "rank pid {pid} still exists\n{out}");
    }
}

/// The job's folder is private (0700) and its name shares nothing with the
/// token; the token is on no command line and in no output.
#[test]
fn launcher_keeps_the_token_out_of_names_and_command_lines() {
    let mut job = Job::start("show-env", 2, &[]);
    let (code, _) = job.wait(Duration::from_secs(30), job.started);
    let out = job.output();
    assert_eq!(code, Some(0), "{out}");
    let mut job_dirs = Vec::new();
    for r in 0..2 {
        let info = std::fs::read_to_string(job.dir.join(format!("info{r}"))).unwrap();
        let lines: Vec<&str> = info.lines().collect();
        let (token, job_dir, mode, cmdline) = (lines[0], lines[1], lines[2], lines[3]);
        assert_eq!(token.len(), 32, "{token}");
        let name = Path::new(job_dir).file_name().unwrap().to_string_lossy();
        for w in 0..=token.len() - 8 {
            let part = &token[w..w + 8];
            assert!(
                !name.contains(part),
                "the job folder {name:?} contains {part:?}, a part of the token"
            );
        }
        assert_eq!(mode, "700", "mode of {job_dir}");
        assert!(cmdline.contains("worker"), "{cmdline}");
        assert!(!cmdline.contains(token), "{cmdline}");
        assert!(!out.contains(token), "{out}");
        job_dirs.push(job_dir.to_string());
    }
    assert_eq!(job_dirs[0], job_dirs[1]);
    assert!(
        !Path::new(&job_dirs[0]).exists(),
        "the launcher left {} behind",
        job_dirs[0]
    );
}

/// `kill -9` of the launcher: its ranks (which ignore SIGTERM) die with it
/// within moments instead of running on re-parented, and the job folder is
/// removed once the last of them is gone.
#[test]
fn ranks_die_with_a_launcher_killed_by_sigkill() {
    let mut job = Job::start("sleep", 2, &[]);
    let pids = job.rank_pids();
    let job_dir = std::fs::read_to_string(job.dir.join("jobdir0")).unwrap();
    assert!(Path::new(&job_dir).is_dir(), "{job_dir}");
    let launcher = job.launcher.id();
    let (code, _, out) = job.signal_and_wait(launcher, libc::SIGKILL, Duration::from_secs(10));
    assert_eq!(code, None, "{out}");
    let gone = wait_job_gone(&job.dir, Duration::from_secs(5));
    assert!(
        gone.is_ok(),
        "rank(s) {gone:?} still alive 5 s after the launcher was killed (ranks {pids:?})\n{out}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&job_dir).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !Path::new(&job_dir).exists(),
        "the job folder {job_dir} is still there 5 s after the ranks ended"
    );
    println!(
        "ranks gone {:?} after the launcher's SIGKILL",
        gone.unwrap()
    );
}

/// More ranks than the machine runs are refused before anything starts: no
/// folder, no process (the program does not even exist, so a spawn would
/// fail with another error).
#[test]
fn launcher_refuses_more_ranks_than_the_machine_runs() {
    let cores = std::thread::available_parallelism().unwrap().get();
    let program = "/nonexistent/syncbn-rank";
    let cfg = LaunchConfig::new(8 * cores + 1, program, Vec::new());
    let e = launch(&cfg).unwrap_err().to_string();
    let expected = format!(
        "launcher: {} ranks requested (--nproc-per-node), but this process may run on {cores} CPU core(s), which allows at most {} CPU rank(s) (8 per core); start at most {}, or set SYNCBN_MAX_NPROC=<n>",
        8 * cores + 1,
        8 * cores,
        8 * cores
    );
    assert!(e.contains(&expected), "{e}");
    // An explicit bound replaces the machine's, in both directions.
    let mut cfg = LaunchConfig::new(3, program, Vec::new());
    cfg.max_nproc = Some(2);
    let e = launch(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("3 ranks requested (--nproc-per-node), above the 2"),
        "{e}"
    );
    let mut cfg = LaunchConfig::new(8 * cores + 1, program, Vec::new());
    cfg.max_nproc = Some(8 * cores + 1);
    let e = launch(&cfg).unwrap_err().to_string();
    assert!(e.contains("could not start rank 0 of"), "{e}");
}

/// SIGTERM while the ranks are being started (rank 0 sends it to the
/// launcher as soon as it runs, while many more are to come): the launcher
/// starts no more ranks, forwards the signal to those it started, and exits
/// with 143, leaving no process.
#[test]
fn sigterm_during_spawning_stops_it() {
    const N: usize = 100;
    let script = r#"if [ "$RANK" = 0 ]; then kill -TERM "$PPID"; fi; exec sleep 30"#;
    let n = N.to_string();
    let env = [
        (RANK_SCRIPT, script),
        ("SYNCBN_MAX_NPROC", n.as_str()),
        ("SYNCBN_KILL_GRACE", "5"),
    ];
    let mut job = Job::start("script", N, &env);
    let start = job.started;
    let (code, elapsed) = job.wait(Duration::from_secs(30), start);
    let out = job.output();
    assert_eq!(code, Some(143), "{out}");
    let line = out
        .lines()
        .find(|l| {
            l.contains("launcher: got signal 15 (SIGTERM) while starting the ranks; started ")
        })
        .unwrap_or_else(|| panic!("the signal did not stop the spawning:\n{out}"));
    let started: usize = line
        .split("; started ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!((1..N).contains(&started), "{line}");
    let forwarded = format!(
        "forwarding it to rank(s) {}",
        if started == 1 {
            "0".to_string()
        } else if started == 2 {
            "0, 1".to_string()
        } else {
            format!("0-{}", started - 1)
        }
    );
    assert!(out.contains(&forwarded), "{out}");
    if let Err(alive) = wait_job_gone(&job.dir, Duration::from_secs(5)) {
        panic!("processes {alive:?} of the job survived the launcher\n{out}");
    }
    println!("started {started} of {N} ranks; launcher exited {elapsed:?} after it started");
}

/// Runs the launcher of 8 `sleep` ranks under `uid` with at most `cap`
/// processes and threads for that uid; returns its exit code and output once
/// it has exited (within 30 s), after checking that no process of the job is
/// left.
fn launch_under_process_cap(uid: u32, cap: u64) -> (Option<i32>, String) {
    let dir = scratch_dir("launcher-cap");
    let exe = capped::reachable_copy(&std::env::current_exe().unwrap(), &dir, uid);
    let tmp = dir.to_path_buf();
    let mut job = Job::start_in(dir, &exe, "sleep", 8, &[], |cmd| {
        capped::run_capped(cmd, uid, cap, &tmp)
    });
    let start = job.started;
    let (code, _) = job.wait(Duration::from_secs(30), start);
    let out = job.output();
    if let Err(alive) = wait_job_gone(&job.dir, Duration::from_secs(2)) {
        panic!("cap {cap}: processes {alive:?} of the job survived the failed launch\n{out}");
    }
    (code, out)
}

/// Spawning fails part way (EAGAIN under caps of 2 to 9 processes and
/// threads for the launcher's user, so that each of the launcher's starts
/// fails in turn: the janitor, a rank, a thread relaying a rank's output):
/// the launcher names what it could not start and the cause, kills the
/// ranks it started and exits, leaving no process behind.
#[test]
fn failed_spawn_is_reported_and_leaves_no_process() {
    if !capped::can_switch_user("failed_spawn_is_reported_and_leaves_no_process") {
        return;
    }
    for cap in 2..=9 {
        let (code, out) = launch_under_process_cap(capped::unused_uid(cap as u32), cap);
        assert_eq!(code, Some(99), "cap {cap}:\n{out}");
        let error = out
            .lines()
            .find_map(|l| {
                l.split_once("launch: launcher: could not start ")
                    .map(|(_, e)| e)
            })
            .unwrap_or_else(|| panic!("cap {cap}: no error naming what failed:\n{out}"));
        assert!(
            error.contains("this user may not run more processes or threads: see `ulimit -u`"),
            "cap {cap}: {error}"
        );
        if error.starts_with("rank") || error.starts_with("a thread") {
            assert!(error.contains("rank(s)"), "cap {cap}: {error}");
        }
        assert!(!out.contains("panicked"), "cap {cap}:\n{out}");
        println!("cap {cap}: could not start {error}");
    }
}
