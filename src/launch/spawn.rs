//! A self-spawning launcher: `program --nproc-per-node N args…` re-runs itself
//! as N rank processes on this machine, like `torchrun --nproc-per-node N`.
//!
//! Each child gets the torchrun environment (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR=127.0.0.1`), a random job
//! token (`SYNCBN_TOKEN`), and `MASTER_PORT=0` with a port file: rank 0 listens
//! on a free port chosen by the OS and publishes it there, so concurrent jobs
//! never collide on a port. Every line a rank prints is prefixed with
//! `[rank r]`. When a rank fails, the launcher stops the others and returns the
//! failing rank's exit code.

use super::env::{PORT_FILE_VAR, TOKEN_VAR};
use candle::Result;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

/// The command-line flag that asks for the launcher.
pub const NPROC_FLAG: &str = "--nproc-per-node";

/// What to launch.
#[derive(Debug, Clone)]
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
        }
    }
}

/// A random job token (32 hex digits from the OS's random source).
pub fn random_token() -> String {
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

fn pipe_lines<R: Read + Send + 'static>(
    from: R,
    prefix: String,
    to_stderr: bool,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
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
    })
}

/// Runs `config.nproc` rank processes and waits for them. Returns 0 when all
/// succeed; otherwise stops the remaining ranks as soon as one fails and
/// returns that rank's exit code (128 + signal for a killed rank).
pub fn launch(config: &LaunchConfig) -> Result<i32> {
    if config.nproc == 0 {
        candle::bail!("launcher: {NPROC_FLAG} must be at least 1")
    }
    let token = random_token();
    // A random name of its own: no part of the token in a path (the port
    // file's path is in the ranks' environment and in error messages).
    let dir = std::env::temp_dir().join(format!(
        "candle-syncbn-{}-{}",
        std::process::id(),
        &random_token()[..8]
    ));
    std::fs::create_dir_all(&dir)?;
    let port_file = dir.join("port");
    let result = run_children(config, &token, &port_file);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_children(config: &LaunchConfig, token: &str, port_file: &std::path::Path) -> Result<i32> {
    let n = config.nproc;
    let mut children: Vec<Child> = Vec::with_capacity(n);
    let mut pipes = Vec::new();
    for rank in 0..n {
        let mut cmd = Command::new(&config.program);
        cmd.args(&config.args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", "0")
            .env(PORT_FILE_VAR, port_file)
            .env(TOKEN_VAR, token)
            .envs(config.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        if config.prefix_output {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        match cmd.spawn() {
            Ok(mut child) => {
                let prefix = format!("[rank {rank}] ");
                if let Some(out) = child.stdout.take() {
                    pipes.push(pipe_lines(out, prefix.clone(), false));
                }
                if let Some(err) = child.stderr.take() {
                    pipes.push(pipe_lines(err, prefix, true));
                }
                children.push(child);
            }
            Err(e) => {
                for c in children.iter_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                candle::bail!(
                    "launcher: could not start rank {rank} ({:?}): {e}",
                    config.program
                )
            }
        }
    }
    let mut status: Vec<Option<ExitStatus>> = vec![None; n];
    let mut first_failure: Option<(usize, i32)> = None;
    while status.iter().any(|s| s.is_none()) {
        for rank in 0..n {
            if status[rank].is_some() {
                continue;
            }
            if let Some(st) = children[rank].try_wait()? {
                status[rank] = Some(st);
                if !st.success() && first_failure.is_none() {
                    first_failure = Some((rank, exit_code(&st)));
                    eprintln!("launcher: rank {rank} failed ({st}); stopping the other ranks");
                    for (r, c) in children.iter_mut().enumerate() {
                        if r != rank && status[r].is_none() {
                            let _ = c.kill();
                        }
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in pipes {
        let _ = p.join();
    }
    Ok(first_failure.map(|(_, code)| code).unwrap_or(0))
}

/// Splits `--nproc-per-node N` (or `--nproc-per-node=N`) off `args` (without
/// the program name). Returns the number and the remaining arguments.
pub fn split_nproc_flag(args: Vec<OsString>) -> Result<(Option<usize>, Vec<OsString>)> {
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
pub fn launch_if_requested(default_nproc: Option<usize>) -> Result<Option<i32>> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let (nproc, rest) = split_nproc_flag(args)?;
    let in_launcher = super::env::Rendezvous::from_env()?.is_some();
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
    launch(&LaunchConfig::new(nproc, program, rest)).map(Some)
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

    #[test]
    fn tokens_are_random_hex() {
        let a = random_token();
        let b = random_token();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
