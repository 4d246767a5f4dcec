//! A self-spawning launcher: `program --nproc-per-node N args…` re-runs itself
//! as N rank processes on this machine, like `torchrun --nproc-per-node N`.
//!
//! Each child gets the torchrun environment (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR=127.0.0.1`), a random job
//! token (`SYNCBN_TOKEN`), and `MASTER_PORT=0` with a port file: rank 0 listens
//! on a free port chosen by the OS and publishes it there, so concurrent jobs
//! never collide on a port. Every line a rank prints is prefixed with
//! `[rank r]`. When a rank fails, the launcher names it and how it ended,
//! stops the others and returns its exit code; on Linux it forwards `SIGTERM`
//! and `SIGINT` to the ranks and kills them only after a grace period (see
//! [`launch`]). The job's files live in a fresh folder only this user can
//! read; the token reaches the ranks through the environment only, never a
//! file name or a command line.
//!
//! The launcher owns its ranks: a rank count the machine cannot run is
//! refused before anything starts (see [`RankDevice`]); a signal during
//! spawning stops it; and on Linux the ranks die with the launcher, even when
//! it is killed with `SIGKILL`, and the job folder goes with the last of them.

use super::limits::{self, RankDevice, NPROC_FLAG};
#[cfg(target_os = "linux")]
use super::{orphans, signals};
use crate::group::rendezvous::{PORT_FILE_VAR, TOKEN_VAR};
use candle::Result;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The environment variable with the grace period, in seconds, between asking
/// the ranks to stop (`SIGTERM`) and killing them (`SIGKILL`), when
/// [`LaunchConfig::kill_grace`] is `None`.
pub(crate) const KILL_GRACE_VAR: &str = "SYNCBN_KILL_GRACE";

/// The grace period when neither [`LaunchConfig::kill_grace`] nor
/// [`KILL_GRACE_VAR`] says otherwise (torchrun's too).
pub(crate) const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(30);

/// The longest grace period [`KILL_GRACE_VAR`] may ask for (one day).
const MAX_KILL_GRACE_SECS: f64 = 86_400.0;

/// What to launch: [`LaunchConfig::new`], then set the fields that differ
/// (non-exhaustive: fields may be added).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LaunchConfig {
    /// The number of rank processes.
    pub nproc: usize,
    /// The program each rank runs.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Extra environment variables for every rank.
    pub envs: Vec<(OsString, OsString)>,
    /// Prefix every output line with `[rank r] ` (else pass output through).
    pub prefix_output: bool,
    /// How long ranks that were told to stop (`SIGTERM`) may take before they
    /// are killed (Linux); `None`: `SYNCBN_KILL_GRACE` (seconds), else 30 s.
    pub kill_grace: Option<Duration>,
    /// What the ranks compute on, which bounds how many ranks this machine
    /// can run (default [`RankDevice::Cpu`]; see [`launch`]).
    pub device: RankDevice,
    /// The most ranks to start, replacing the machine's bound (see
    /// [`launch`]); `None`: `SYNCBN_MAX_NPROC` if set, else the machine's
    /// bound.
    pub max_nproc: Option<usize>,
}

impl LaunchConfig {
    /// `nproc` copies of `program` with `args`, output prefixed.
    pub fn new(nproc: usize, program: impl Into<PathBuf>, args: Vec<OsString>) -> Self {
        Self {
            nproc,
            program: program.into(),
            args,
            envs: Vec::new(),
            prefix_output: true,
            kill_grace: None,
            device: RankDevice::Cpu,
            max_nproc: None,
        }
    }
}

/// A random job token (32 hex digits from the OS's random source).
pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 16];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if from_os.is_err() {
        // Without /dev/urandom, std's randomly keyed hasher is the best source.
        use std::hash::{BuildHasher, Hasher};
        for chunk in bytes.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            h.write_u32(std::process::id());
            chunk.copy_from_slice(&h.finish().to_le_bytes()[..chunk.len()]);
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The launcher's exit code for a rank's status: the exit code, or 128 +
/// the signal for a rank killed by a signal (as shells report it).
fn exit_code(status: &ExitStatus) -> i32 {
    if let Some(c) = status.code() {
        return c;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return 128 + sig;
        }
    }
    1
}

/// `signal 9 (SIGKILL)`, or `signal N` where the name is not known.
#[cfg(unix)]
fn signal_text(sig: i32) -> String {
    #[cfg(target_os = "linux")]
    if let Some(name) = signals::name(sig) {
        return format!("signal {sig} ({name})");
    }
    format!("signal {sig}")
}

/// What became of a rank: `exited with code 3`, `was killed by signal 9 (SIGKILL)`.
fn describe(status: &ExitStatus) -> String {
    if let Some(c) = status.code() {
        return format!("exited with code {c}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let core = if status.core_dumped() {
                " (core dumped)"
            } else {
                ""
            };
            return format!("was killed by {}{core}", signal_text(sig));
        }
    }
    format!("ended ({status})")
}

/// The stack of the launcher's helper threads (one relaying each output of
/// each rank, one waiting for each rank): they hold a line and a few frames.
const HELPER_STACK: usize = 128 * 1024;

/// Copies `from` line by line to the launcher's stdout or stderr, each line
/// prefixed; sends on `done` at the end of the input. An error when the
/// thread that does it cannot be started.
fn pipe_lines<R: Read + Send + 'static>(
    from: R,
    prefix: String,
    to_stderr: bool,
    done: mpsc::Sender<()>,
) -> std::io::Result<()> {
    let name = format!("launcher-relay-{}", prefix.trim());
    let thread = std::thread::Builder::new()
        .name(name)
        .stack_size(HELPER_STACK);
    thread.spawn(move || {
        let mut reader = BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\n', '\r']);
                    if to_stderr {
                        let _ = writeln!(std::io::stderr().lock(), "{prefix}{text}");
                    } else {
                        let _ = writeln!(std::io::stdout().lock(), "{prefix}{text}");
                    }
                }
            }
        }
        let _ = done.send(());
    })?;
    Ok(())
}

/// The grace period from [`KILL_GRACE_VAR`], or [`DEFAULT_KILL_GRACE`].
fn kill_grace_from_env() -> Result<Duration> {
    match std::env::var_os(KILL_GRACE_VAR) {
        Some(v) => parse_kill_grace(&v.to_string_lossy()),
        None => Ok(DEFAULT_KILL_GRACE),
    }
}

/// A [`KILL_GRACE_VAR`] value: seconds, `0` to [`MAX_KILL_GRACE_SECS`].
fn parse_kill_grace(v: &str) -> Result<Duration> {
    match v.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=MAX_KILL_GRACE_SECS).contains(&s) => {
            Ok(Duration::from_secs_f64(s))
        }
        _ => candle::bail!(
            "launcher: {KILL_GRACE_VAR} must be a number of seconds from 0 to {MAX_KILL_GRACE_SECS}, got {v:?}"
        ),
    }
}

/// Creates the folder `path` (not its parents), readable by this user only.
fn create_private_dir(path: &std::path::Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(path)
    }
    #[cfg(not(unix))]
    std::fs::create_dir(path)
}

/// A fresh folder for the job's files, readable by this user only
/// (`0700`), named from its own random number: no part of the job token
/// appears in a name others can list.
fn private_dir() -> Result<PathBuf> {
    for _ in 0..16 {
        let name = format!(
            "candle-syncbn-{}-{}",
            std::process::id(),
            &random_token()[..16]
        );
        let path = std::env::temp_dir().join(name);
        match create_private_dir(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => candle::bail!("launcher: could not create the job folder {path:?}: {e}"),
        }
    }
    candle::bail!(
        "launcher: could not create a fresh job folder in {:?}: 16 random names were all taken",
        std::env::temp_dir()
    )
}

/// Runs `config.nproc` rank processes and waits for them. Returns 0 when all
/// succeed.
///
/// **Before anything starts**, a rank count this machine cannot run is
/// refused with an error: for [`RankDevice::Cuda`], more ranks than CUDA
/// devices the launcher sees; for [`RankDevice::Cpu`], more than 8 ranks per
/// core available to it (`std::thread::available_parallelism`).
/// [`LaunchConfig::max_nproc`], else the environment variable
/// `SYNCBN_MAX_NPROC`, replaces that bound.
///
/// When a rank fails, the launcher reports it (the first rank to fail; one
/// killed by a signal goes before ranks that exited with an error code within
/// 100 ms of it, as those are most likely its consequence), stops the others
/// and returns the failed rank's exit code (128 + signal for a rank killed by
/// a signal). On Linux, ranks are stopped with `SIGTERM` and, those still
/// running after the grace period ([`LaunchConfig::kill_grace`]), with
/// `SIGKILL`; elsewhere they are killed at once.
///
/// On Linux, a `SIGTERM` or `SIGINT` sent to the launcher is forwarded to every
/// rank, the ranks get the grace period to exit (a second such signal ends it
/// early), and `launch` returns 128 + the signal. (The ranks stay in the
/// launcher's process group: Ctrl-C in a terminal reaches them directly too.)
/// Such a signal during spawning stops it: no further rank starts, and those
/// already started are stopped the same way.
///
/// A rank that cannot be started (e.g. `EAGAIN` at the limit on processes
/// per user) is an error naming it and the cause; the ranks already started
/// are killed and reaped first, so none is left behind.
///
/// On Linux the ranks die with the launcher: each is started with
/// `PR_SET_PDEATHSIG = SIGKILL`, so that a launcher killed with `SIGKILL` (or
/// by the OOM killer) takes its ranks with it, and a small process forked
/// beside them removes the job folder once the launcher and every rank have
/// ended. The ranks are started from the calling thread, which stays in
/// `launch` until all of them have been reaped.
pub fn launch(config: &LaunchConfig) -> Result<i32> {
    if config.nproc == 0 {
        candle::bail!("launcher: {NPROC_FLAG} must be at least 1")
    }
    limits::check_nproc(config.nproc, config.device, config.max_nproc)?;
    let grace = match config.kill_grace {
        Some(g) => g,
        None => kill_grace_from_env()?,
    };
    let token = random_token();
    let dir = private_dir()?;
    let port_file = dir.join("port");
    #[cfg(target_os = "linux")]
    let janitor = match orphans::Janitor::start(&dir) {
        Ok(j) => j,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            candle::bail!(
                "launcher: could not start the process that removes the job folder {dir:?} when the launcher is killed: {e}{}",
                os_error_hint(&e)
            )
        }
    };
    let job = Job {
        config,
        token: &token,
        port_file: &port_file,
        #[cfg(target_os = "linux")]
        keep_alive: janitor.keep_alive_fd(),
    };
    let result = run_children(&job, grace);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// What the cause of a failed start may be, for the error (empty when the
/// error says enough).
fn os_error_hint(e: &std::io::Error) -> &'static str {
    #[cfg(unix)]
    match e.raw_os_error() {
        Some(libc::EAGAIN) => {
            return " (this user may not run more processes or threads: see `ulimit -u`, RLIMIT_NPROC, and the system's limits on processes)"
        }
        Some(libc::ENOMEM) => return " (out of memory)",
        _ => {}
    }
    let _ = e;
    ""
}

/// Stops a rank: `sig` on Linux (the caller guarantees it has not reaped it),
/// a kill elsewhere.
fn signal_child(child: &mut Child, sig: Signal) {
    #[cfg(target_os = "linux")]
    signals::send(child.id(), sig.0);
    #[cfg(not(target_os = "linux"))]
    {
        let _ = sig;
        let _ = child.kill();
    }
}

/// A signal number (only Linux sends other signals than a kill).
#[derive(Clone, Copy)]
struct Signal(#[cfg_attr(not(target_os = "linux"), allow(dead_code))] i32);

#[cfg(target_os = "linux")]
const TERM: Signal = Signal(signals::TERM);
#[cfg(target_os = "linux")]
const KILL: Signal = Signal(signals::KILL);
#[cfg(not(target_os = "linux"))]
const TERM: Signal = Signal(15);
#[cfg(not(target_os = "linux"))]
const KILL: Signal = Signal(9);

/// What every rank of a job shares.
struct Job<'a> {
    config: &'a LaunchConfig,
    token: &'a str,
    port_file: &'a std::path::Path,
    /// The janitor's descriptor, which every rank holds (see `orphans`).
    #[cfg(target_os = "linux")]
    keep_alive: std::os::fd::RawFd,
}

/// The command that starts rank `rank` of `job`.
fn rank_command(job: &Job, rank: usize) -> Command {
    let (config, n) = (job.config, job.config.nproc);
    let mut cmd = Command::new(&config.program);
    cmd.args(&config.args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", n.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", n.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "0")
        .env(PORT_FILE_VAR, job.port_file)
        .env(TOKEN_VAR, job.token)
        .envs(config.envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
    if config.prefix_output {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: getpid has no memory effects.
        let launcher = unsafe { libc::getpid() };
        let keep_alive = job.keep_alive;
        // SAFETY: die_with_launcher makes async-signal-safe calls only.
        unsafe {
            cmd.pre_exec(move || orphans::die_with_launcher(launcher, keep_alive));
        }
    }
    cmd
}

/// Kills and reaps the ranks started so far (a job that could not start).
fn kill_started(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.kill();
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}

fn run_children(job: &Job, grace: Duration) -> Result<i32> {
    let (config, n) = (job.config, job.config.nproc);
    // Caught from before the first rank starts: a signal that arrives while
    // ranks start stops the spawning and is forwarded to those started.
    #[cfg(target_os = "linux")]
    let mut caught = signals::TerminationSignals::catch();
    let mut children: Vec<Child> = Vec::with_capacity(n);
    let (pipe_done, pipes_done) = mpsc::channel();
    let mut pipes = 0;
    for rank in 0..n {
        #[cfg(target_os = "linux")]
        if let Some(sig) = caught.pending() {
            eprintln!(
                "launcher: got {} while starting the ranks; started {} of {n}, starting no more",
                signal_text(sig),
                children.len()
            );
            if children.is_empty() {
                caught.take();
                return Ok(128 + sig);
            }
            break;
        }
        let mut child = match rank_command(job, rank).spawn() {
            Ok(child) => child,
            Err(e) => {
                kill_started(&mut children);
                candle::bail!(
                    "launcher: could not start rank {rank} of {n} ({:?}): {e}{}; killed the {} rank(s) already started",
                    config.program,
                    os_error_hint(&e),
                    children.len()
                )
            }
        };
        let prefix = format!("[rank {rank}] ");
        let mut relay = Ok(());
        if let Some(out) = child.stdout.take() {
            relay = pipe_lines(out, prefix.clone(), false, pipe_done.clone());
            pipes += usize::from(relay.is_ok());
        }
        if let Some(err) = child.stderr.take().filter(|_| relay.is_ok()) {
            relay = pipe_lines(err, prefix, true, pipe_done.clone());
            pipes += usize::from(relay.is_ok());
        }
        children.push(child);
        if let Err(e) = relay {
            kill_started(&mut children);
            candle::bail!(
                "launcher: could not start a thread to relay the output of rank {rank} of {n}: {e}{}; killed the {} rank(s) started",
                os_error_hint(&e),
                children.len()
            )
        }
    }
    let code = supervise(
        &mut children,
        grace,
        #[cfg(target_os = "linux")]
        caught,
    );
    // The ranks' output ends with them, unless a process they started still
    // holds it: wait for it a little, not for that process.
    let deadline = Instant::now() + Duration::from_secs(2);
    for _ in 0..pipes {
        let left = deadline.saturating_duration_since(Instant::now());
        if pipes_done.recv_timeout(left).is_err() {
            break;
        }
    }
    Ok(code)
}

/// How often the launcher looks at its ranks and at the signals it caught.
const TICK: Duration = Duration::from_millis(20);
/// Failures this close in time count as simultaneous (see [`launch`]).
const SETTLE: Duration = Duration::from_millis(100);

/// One rank's end: when it was seen, and its status.
struct Exit {
    at: Instant,
    status: ExitStatus,
}

/// Ranks that have exited and are not yet reaped, with the time each exit was
/// seen. On Linux a thread per rank waits for its exit without reaping it
/// (waitid with `WNOWAIT`), so that the times order the exits; elsewhere the
/// ranks are polled.
struct ExitWatcher {
    events: mpsc::Receiver<(usize, Instant)>,
    /// Ranks without a waiting thread: polled every tick.
    polled: Vec<bool>,
}

impl ExitWatcher {
    fn new(children: &[Child]) -> Self {
        let (tx, events) = mpsc::channel();
        #[cfg(target_os = "linux")]
        let polled = children
            .iter()
            .enumerate()
            .map(|(rank, child)| {
                let (pid, tx) = (child.id(), tx.clone());
                std::thread::Builder::new()
                    .name(format!("launcher-wait-{rank}"))
                    .stack_size(HELPER_STACK)
                    .spawn(move || {
                        signals::wait_exited(pid);
                        let _ = tx.send((rank, Instant::now()));
                    })
                    .is_err()
            })
            .collect();
        #[cfg(not(target_os = "linux"))]
        let polled = vec![true; children.len()];
        drop(tx);
        Self { events, polled }
    }

    /// Waits up to `timeout` for exits and reaps them into `exits`.
    fn poll(&mut self, children: &mut [Child], exits: &mut [Option<Exit>], timeout: Duration) {
        let mut seen = Vec::new();
        match self.events.recv_timeout(timeout) {
            Ok(e) => seen.push(e),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(timeout),
        }
        seen.extend(self.events.try_iter());
        let now = Instant::now();
        seen.extend(
            (0..children.len())
                .filter(|&r| self.polled[r])
                .map(|r| (r, now)),
        );
        for (rank, at) in seen {
            if exits[rank].is_some() {
                continue;
            }
            match children[rank].try_wait() {
                Ok(Some(status)) => exits[rank] = Some(Exit { at, status }),
                // The waiting thread returned early (waitid failed): poll.
                _ => self.polled[rank] = true,
            }
        }
    }
}

/// The rank to blame among the failed ones: the first to fail, except that a
/// rank killed by a signal goes before ranks that exited with an error code
/// within [`SETTLE`] of it.
fn culprit(exits: &[Option<Exit>]) -> Option<usize> {
    let failed = |r: &usize| exits[*r].as_ref().is_some_and(|e| !e.status.success());
    let first = (0..exits.len())
        .filter(failed)
        .min_by_key(|&r| exits[r].as_ref().map(|e| e.at))?;
    let t0 = exits[first].as_ref()?.at;
    let signalled = (0..exits.len())
        .filter(failed)
        .filter(|&r| {
            exits[r]
                .as_ref()
                .is_some_and(|e| e.status.code().is_none() && e.at <= t0 + SETTLE)
        })
        .min_by_key(|&r| exits[r].as_ref().map(|e| e.at));
    Some(signalled.unwrap_or(first))
}

/// Ranks (ascending), as `0, 2` or, for runs of three or more, `0-63, 65`.
fn rank_list(ranks: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < ranks.len() {
        let mut j = i;
        while j + 1 < ranks.len() && ranks[j + 1] == ranks[j] + 1 {
            j += 1;
        }
        if j >= i + 2 {
            parts.push(format!("{}-{}", ranks[i], ranks[j]));
        } else {
            parts.extend(ranks[i..=j].iter().map(|r| r.to_string()));
        }
        i = j + 1;
    }
    parts.join(", ")
}

/// Prints which rank failed and how (`then` follows on that line), and how
/// the other failed ranks ended; returns the launcher's exit code.
fn report_failure(exits: &[Option<Exit>], then: &str) -> i32 {
    let Some((rank, exit)) = culprit(exits).and_then(|r| Some((r, exits[r].as_ref()?))) else {
        return 1;
    };
    eprintln!("launcher: rank {rank} {}{then}", describe(&exit.status));
    for (r, e) in exits.iter().enumerate() {
        let Some(e) = e.as_ref().filter(|e| r != rank && !e.status.success()) else {
            continue;
        };
        let (dt, when) = if e.at >= exit.at {
            (e.at - exit.at, "after")
        } else {
            (exit.at - e.at, "before")
        };
        eprintln!(
            "launcher: rank {r} also {}, {:.1} ms {when} rank {rank}",
            describe(&e.status),
            dt.as_secs_f64() * 1e3
        );
    }
    exit_code(&exit.status)
}

/// Waits for every rank, stopping them all when one fails or when the
/// launcher is asked to terminate (see [`launch`]). Returns the exit code.
fn supervise(
    children: &mut [Child],
    grace: Duration,
    #[cfg(target_os = "linux")] mut caught: signals::TerminationSignals,
) -> i32 {
    let n = children.len();
    let mut watcher = ExitWatcher::new(children);
    let mut exits: Vec<Option<Exit>> = (0..n).map(|_| None).collect();
    let mut outcome: Option<i32> = None;
    // When the ranks were told to stop, and whether they have been killed.
    let mut stopping: Option<(Instant, bool)> = None;
    let running = |exits: &[Option<Exit>]| -> Vec<usize> {
        (0..exits.len()).filter(|&r| exits[r].is_none()).collect()
    };
    let stop = |children: &mut [Child], exits: &[Option<Exit>], sig: Signal| {
        for r in running(exits) {
            signal_child(&mut children[r], sig);
        }
    };
    let grace_text = format!("{:.1} s", grace.as_secs_f64());
    while exits.iter().any(|e| e.is_none()) {
        watcher.poll(children, &mut exits, TICK);
        let now = Instant::now();

        #[cfg(target_os = "linux")]
        if let Some(sig) = caught.take() {
            let alive = running(&exits);
            if stopping.is_none() {
                eprintln!(
                    "launcher: got {}; forwarding it to rank(s) {}, SIGKILL after {grace_text}",
                    signal_text(sig),
                    rank_list(&alive)
                );
                stop(children, &exits, Signal(sig));
                stopping = Some((now, false));
                outcome.get_or_insert(128 + sig);
            } else if !alive.is_empty() {
                eprintln!(
                    "launcher: got {} again; killing rank(s) {} now",
                    signal_text(sig),
                    rank_list(&alive)
                );
                stop(children, &exits, KILL);
                stopping = Some((now, true));
            }
        }

        if outcome.is_none() {
            let first_seen = exits
                .iter()
                .flatten()
                .filter(|e| !e.status.success())
                .map(|e| e.at)
                .min();
            let all_done = exits.iter().all(|e| e.is_some());
            if first_seen.is_some_and(|t| all_done || now >= t + SETTLE) {
                let alive = running(&exits);
                let how = if alive.is_empty() {
                    String::new()
                } else if cfg!(target_os = "linux") {
                    format!(
                        "; stopping rank(s) {} (SIGTERM, SIGKILL after {grace_text})",
                        rank_list(&alive)
                    )
                } else {
                    format!("; stopping rank(s) {}", rank_list(&alive))
                };
                outcome = Some(report_failure(&exits, &how));
                if stopping.is_none() && !alive.is_empty() {
                    stop(children, &exits, TERM);
                    stopping = Some((now, false));
                }
            }
        }

        if let Some((since, false)) = stopping {
            if now >= since + grace {
                let alive = running(&exits);
                if !alive.is_empty() {
                    eprintln!(
                        "launcher: rank(s) {} still running {grace_text} after being told to stop; sending SIGKILL",
                        rank_list(&alive)
                    );
                    stop(children, &exits, KILL);
                }
                stopping = Some((since, true));
            }
        }
    }
    outcome.unwrap_or(0)
}

/// Splits `--nproc-per-node N` (or `--nproc-per-node=N`) off `args` (without
/// the program name). Returns the number and the remaining arguments.
pub(crate) fn split_nproc_flag(args: Vec<OsString>) -> Result<(Option<usize>, Vec<OsString>)> {
    let mut rest = Vec::with_capacity(args.len());
    let mut nproc = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().into_owned();
        let value = if s == NPROC_FLAG {
            match it.next() {
                Some(v) => v.to_string_lossy().into_owned(),
                None => candle::bail!("launcher: {NPROC_FLAG} needs a value"),
            }
        } else if let Some(v) = s.strip_prefix(&format!("{NPROC_FLAG}=")) {
            v.to_string()
        } else {
            rest.push(a);
            continue;
        };
        let n: usize = value.parse().map_err(|_| {
            candle::Error::Msg(format!(
                "launcher: {NPROC_FLAG} expects a positive integer, got {value:?}"
            ))
        })?;
        if n == 0 {
            candle::bail!("launcher: {NPROC_FLAG} must be at least 1")
        }
        nproc = Some(n);
    }
    Ok((nproc, rest))
}

/// For a program's `main`: when the command line has `--nproc-per-node N`
/// (or when it has none, no launcher environment is set, and `default_nproc`
/// is given), re-runs this program as N ranks with the remaining arguments
/// and returns `Some(exit code)`; the caller should exit with it. Returns
/// `None` in a rank process (or without the flag and a default): the caller
/// goes on as a rank, configured from the environment.
///
/// The ranks count as CPU ranks for the launcher's bound on their number (see
/// [`launch`]); [`launch_if_requested_with`] says otherwise.
pub fn launch_if_requested(default_nproc: Option<usize>) -> Result<Option<i32>> {
    launch_if_requested_with(default_nproc, RankDevice::Cpu)
}

/// Whether this process is a rank started by a launcher: one that sets the
/// rendezvous variables (torchrun's `RANK`/`WORLD_SIZE`, SLURM's, Open MPI's
/// with `MASTER_PORT`, this crate's [`launch`]), or, where the MPI group is
/// used (the `mpi` feature, `SYNCBN_BACKEND`), an MPI launcher (`mpirun`,
/// `srun --mpi=pmix`). A program that launches itself does so only when
/// this is `false`, as [`launch_if_requested`] does.
pub fn in_launched_rank() -> Result<bool> {
    crate::ProcessGroup::launched()
}

/// [`launch_if_requested`] for ranks that compute on `device`: e.g.
/// [`RankDevice::Cuda`] refuses more ranks than visible GPUs before any
/// starts.
pub fn launch_if_requested_with(
    default_nproc: Option<usize>,
    device: RankDevice,
) -> Result<Option<i32>> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let (nproc, rest) = split_nproc_flag(args)?;
    let in_launcher = in_launched_rank()?;
    let nproc = match (nproc, in_launcher) {
        (Some(_), true) => candle::bail!(
            "launcher: {NPROC_FLAG} given inside a launched rank (RANK/WORLD_SIZE are already set)"
        ),
        (Some(n), false) => n,
        (None, false) => match default_nproc {
            Some(n) => n,
            None => return Ok(None),
        },
        (None, true) => return Ok(None),
    };
    let program = std::env::current_exe()?;
    let mut config = LaunchConfig::new(nproc, program, rest);
    config.device = device;
    launch(&config).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn nproc_flag() {
        let (n, rest) =
            split_nproc_flag(os(&["--epochs", "2", "--nproc-per-node", "3", "-v"])).unwrap();
        assert_eq!(n, Some(3));
        assert_eq!(rest, os(&["--epochs", "2", "-v"]));
        let (n, rest) = split_nproc_flag(os(&["--nproc-per-node=4"])).unwrap();
        assert_eq!((n, rest.len()), (Some(4), 0));
        assert_eq!(split_nproc_flag(os(&["x"])).unwrap().0, None);
        assert!(split_nproc_flag(os(&["--nproc-per-node"])).is_err());
        assert!(split_nproc_flag(os(&["--nproc-per-node", "0"])).is_err());
        assert!(split_nproc_flag(os(&["--nproc-per-node", "two"])).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn culprit_is_the_first_failure_or_a_signal_right_after_it() {
        use std::os::unix::process::ExitStatusExt;
        let t0 = Instant::now();
        let exit = |ms: u64, raw: i32| {
            Some(Exit {
                at: t0 + Duration::from_millis(ms),
                status: ExitStatus::from_raw(raw),
            })
        };
        // Raw wait statuses: code c is c << 8, signal s is s.
        let (ok, code1, code3, sigkill) = (0, 1 << 8, 3 << 8, 9);
        assert_eq!(culprit(&[exit(0, ok), exit(5, ok)]), None);
        assert_eq!(culprit(&[exit(0, code1), None]), Some(0));
        assert_eq!(culprit(&[exit(7, code1), exit(3, code3)]), Some(1));
        // Rank 0 saw its peer vanish and exited 1 ms before the kill was seen.
        assert_eq!(culprit(&[exit(10, code1), exit(11, sigkill)]), Some(1));
        // ... but not a signal long after an error exit.
        assert_eq!(culprit(&[exit(10, code1), exit(500, sigkill)]), Some(0));
        let mut exits = [exit(10, code1), exit(11, sigkill), None];
        assert_eq!(report_failure(&exits, ""), 137);
        exits[1] = None;
        assert_eq!(report_failure(&exits, ""), 1);
    }

    #[test]
    fn rank_lists_fold_runs() {
        assert_eq!(rank_list(&[]), "");
        assert_eq!(rank_list(&[0, 1]), "0, 1");
        assert_eq!(rank_list(&[0, 2]), "0, 2");
        assert_eq!(rank_list(&[0, 1, 2]), "0-2");
        assert_eq!(rank_list(&[0, 1, 2, 3, 5, 7, 8, 9]), "0-3, 5, 7-9");
    }

    #[test]
    fn kill_grace_values() {
        assert_eq!(
            parse_kill_grace("2.5").unwrap(),
            Duration::from_millis(2500)
        );
        assert_eq!(parse_kill_grace(" 0 ").unwrap(), Duration::ZERO);
        for bad in ["-1", "nan", "inf", "1e9", "ten", ""] {
            let e = parse_kill_grace(bad).unwrap_err().to_string();
            assert!(
                e.contains("SYNCBN_KILL_GRACE must be a number of seconds from 0 to 86400")
                    && e.contains(&format!("{bad:?}")),
                "{e}"
            );
        }
    }

    #[test]
    fn tokens_are_random_hex() {
        let a = random_token();
        let b = random_token();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
