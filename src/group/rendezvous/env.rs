//! Where a rank learns who it is and where the group meets ([`Rendezvous`]):
//! the environment set by a launcher (this crate's or another), read by the
//! process groups.
//!
//! Read, in this order of precedence:
//! - torchrun (and this crate's launcher): `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//!   `LOCAL_WORLD_SIZE`;
//! - Open MPI (`mpirun`): `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`,
//!   `OMPI_COMM_WORLD_LOCAL_RANK`, `OMPI_COMM_WORLD_LOCAL_SIZE`;
//! - SLURM (`srun`): `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`,
//!   `SLURM_NTASKS_PER_NODE`.
//!
//! and in every case `MASTER_ADDR`, `MASTER_PORT` (rank 0's rendezvous
//! address; the port is required when the world size is above 1),
//! `SYNCBN_TOKEN` (the job token: rank 0 and every joining rank prove to each
//! other that they know it, without sending it; without one, every rank of a
//! group of several warns, since any process that reaches the port can then
//! join) and `SYNCBN_PORT_FILE` (with
//! `MASTER_PORT=0`: rank 0 listens on a free port and writes it there).
//!
//! Several machines: the job spans nodes when the world size is above the
//! local world size, or, where the launcher gives no local world size, when
//! its node count (`GROUP_WORLD_SIZE`, `SLURM_NNODES`, `SLURM_JOB_NUM_NODES`)
//! is above 1. Such a job must set `MASTER_ADDR` (an unset one is an error,
//! not `127.0.0.1`) and the local rank (an unset one is an error, not the
//! global rank). The local rank defaults to the rank only where every rank is
//! known to run on rank 0's machine: the local world size equals the world
//! size, the node count is 1, or `MASTER_ADDR` is a loopback address (unset,
//! it is `127.0.0.1` where the job is not known to span nodes). `MASTER_ADDR`
//! may be a host name or an IPv4 or IPv6 address (`::1` or `[::1]`).

use candle::Result;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

/// The environment variable holding the per-job token.
pub(crate) const TOKEN_VAR: &str = "SYNCBN_TOKEN";
/// The environment variable naming the port file (with `MASTER_PORT=0`).
pub(crate) const PORT_FILE_VAR: &str = "SYNCBN_PORT_FILE";

/// Which launcher's variables described the rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnvSource {
    /// `RANK`/`WORLD_SIZE` (torchrun, this crate's launcher).
    Torchrun,
    /// `OMPI_COMM_WORLD_*` (Open MPI).
    OpenMpi,
    /// `SLURM_*` (srun).
    Slurm,
    /// Built in code with [`Rendezvous::new`].
    Explicit,
    /// The MPI library (the `mpi` feature, under an MPI launcher): no
    /// address, port or token, MPI connects the ranks.
    Mpi,
}

/// Everything a rank needs to join its group: from the environment
/// ([`Rendezvous::from_env`]) or built with [`Rendezvous::new`] and the
/// `with_*` setters (non-exhaustive: fields may be added).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rendezvous {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// The number of ranks.
    pub world_size: usize,
    /// The rank on this machine (selects the GPU), `0..local_world_size`.
    pub local_rank: usize,
    /// The number of ranks on this machine, when the launcher says.
    pub local_world_size: Option<usize>,
    /// Host name or IP address where rank 0 listens.
    pub master_addr: String,
    /// Port where rank 0 listens (0: a free port published through `port_file`).
    pub master_port: u16,
    /// The job token that authenticates joining ranks (`None`: no token).
    pub token: Option<String>,
    /// With `master_port == 0`, the file where rank 0 writes its port.
    pub port_file: Option<PathBuf>,
    /// Where the values came from.
    pub source: EnvSource,
}

impl std::fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("Rendezvous")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("local_rank", &self.local_rank)
            .field("local_world_size", &self.local_world_size)
            .field("master_addr", &self.master_addr)
            .field("master_port", &self.master_port)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("port_file", &self.port_file)
            .field("source", &self.source)
            .finish()
    }
}

fn parse_usize(name: &str, v: &str) -> Result<usize> {
    v.trim().parse().map_err(|_| {
        candle::Error::Msg(format!(
            "environment: {name} must be a non-negative integer, got {v:?}"
        ))
    })
}

/// What the launcher says about the machines of a job.
struct Nodes {
    /// `Some(true)`: several machines; `Some(false)`: one; `None`: unknown.
    several: Option<bool>,
    /// The variables that said so, in words (empty when unknown).
    why: String,
}

impl Nodes {
    fn of(
        world_size: usize,
        local_world_size: Option<usize>,
        get: &impl Fn(&str) -> Option<String>,
    ) -> std::result::Result<Self, (&'static str, String)> {
        // The local world size settles it when the launcher gives one: every
        // machine runs that many ranks.
        if let Some(l) = local_world_size {
            return Ok(Self {
                several: Some(l < world_size),
                why: if l < world_size {
                    format!("world size {world_size} > local world size {l}")
                } else {
                    format!("local world size {l} = world size")
                },
            });
        }
        for name in ["GROUP_WORLD_SIZE", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"] {
            if let Some(v) = get(name) {
                let n: usize = v.trim().parse().map_err(|_| (name, v.clone()))?;
                return Ok(Self {
                    several: Some(n > 1),
                    why: format!("{name}={n}"),
                });
            }
        }
        Ok(Self {
            several: None,
            why: String::new(),
        })
    }

    fn several(&self) -> bool {
        self.several == Some(true)
    }

    fn single(&self) -> bool {
        self.several == Some(false)
    }
}

/// The host part of `addr` without IPv6 brackets (`[::1]` -> `::1`).
fn bare_host(addr: &str) -> &str {
    let h = addr.trim();
    h.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(h)
}

/// True when `addr` names this machine's loopback interface (`localhost`,
/// `127.x.x.x`, `::1`, `[::1]`). A host name that merely resolves to a
/// loopback address (Debian maps the machine's own name to 127.0.1.1) is not:
/// it names the machine to the other machines.
pub(crate) fn is_loopback(addr: &str) -> bool {
    let host = bare_host(addr);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// `host:port`, with brackets around an IPv6 address (`[::1]:29500`).
pub(crate) fn host_port(host: &str, port: u16) -> String {
    let h = bare_host(host);
    if h.contains(':') {
        format!("[{h}]:{port}")
    } else {
        format!("{h}:{port}")
    }
}

/// The addresses rank 0 tries to listen on, in order: `MASTER_ADDR` itself
/// when it is a loopback address (a single-machine job opens no public port);
/// otherwise every interface, as PyTorch's TCPStore does (`MASTER_ADDR` may
/// name the machine through a virtual IP or a name that resolves to
/// 127.0.1.1, which other machines cannot reach or this one cannot bind):
/// `0.0.0.0` when `MASTER_ADDR` is IPv4 (or a name that resolves to IPv4
/// only), else `[::]` (dual-stack on Linux) and then `0.0.0.0`.
pub(crate) fn listen_addrs(master_addr: &str, port: u16) -> Vec<String> {
    if is_loopback(master_addr) {
        return vec![host_port(master_addr, port)];
    }
    let any4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).to_string();
    let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).to_string();
    let ipv4_only = match bare_host(master_addr).parse::<IpAddr>() {
        Ok(ip) => ip.is_ipv4(),
        Err(_) => host_port(master_addr, port)
            .to_socket_addrs()
            .map(|a| {
                let a: Vec<SocketAddr> = a.collect();
                !a.is_empty() && a.iter().all(|a| a.is_ipv4())
            })
            .unwrap_or(false),
    };
    if ipv4_only {
        vec![any4]
    } else {
        vec![any6, any4]
    }
}

impl Rendezvous {
    /// A rendezvous built in code (local rank = rank, no token).
    pub fn new(
        rank: usize,
        world_size: usize,
        master_addr: impl Into<String>,
        master_port: u16,
    ) -> Result<Self> {
        let rv = Self {
            rank,
            world_size,
            local_rank: rank,
            local_world_size: None,
            master_addr: master_addr.into(),
            master_port,
            token: None,
            port_file: None,
            source: EnvSource::Explicit,
        };
        if world_size == 0 || rank >= world_size {
            candle::bail!("rendezvous: rank {rank} is out of range for world size {world_size}")
        }
        Ok(rv)
    }

    /// The rendezvous of a rank of an MPI job (not validated: it has no
    /// address nor port, which MPI does not need).
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn from_mpi(
        rank: usize,
        world_size: usize,
        local_rank: usize,
        local_world_size: usize,
    ) -> Self {
        Self {
            rank,
            world_size,
            local_rank,
            local_world_size: Some(local_world_size),
            master_addr: String::new(),
            master_port: 0,
            token: None,
            port_file: None,
            source: EnvSource::Mpi,
        }
    }

    /// Sets the job token.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets the port file (used with `master_port == 0`).
    pub fn with_port_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.port_file = Some(path.into());
        self
    }

    /// Reads the process environment; `Ok(None)` when no launcher variables are
    /// set (a plain single-process run).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Like [`Rendezvous::from_env`] with the variables given by `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let schemes: [(EnvSource, [&str; 4]); 3] = [
            (
                EnvSource::Torchrun,
                ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"],
            ),
            (
                EnvSource::OpenMpi,
                [
                    "OMPI_COMM_WORLD_RANK",
                    "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_RANK",
                    "OMPI_COMM_WORLD_LOCAL_SIZE",
                ],
            ),
            (
                EnvSource::Slurm,
                [
                    "SLURM_PROCID",
                    "SLURM_NTASKS",
                    "SLURM_LOCALID",
                    "SLURM_NTASKS_PER_NODE",
                ],
            ),
        ];
        let Some((source, [rank_v, size_v, local_v, local_size_v])) = schemes
            .into_iter()
            .find(|(_, [r, s, _, _])| get(r).is_some() || get(s).is_some())
        else {
            return Ok(None);
        };
        let need = |name: &str| {
            get(name).ok_or_else(|| {
                candle::Error::Msg(format!(
                    "environment: {name} is not set (the launcher set only part of {rank_v}, {size_v})"
                ))
            })
        };
        let rank = parse_usize(rank_v, &need(rank_v)?)?;
        let world_size = parse_usize(size_v, &need(size_v)?)?;
        // SLURM_NTASKS_PER_NODE may be "4(x2)"; use the leading number.
        let local_world_size = match get(local_size_v) {
            Some(v) => {
                let lead: String = v
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                Some(parse_usize(local_size_v, &lead)?)
            }
            None => None,
        };
        if world_size == 0 || rank >= world_size {
            candle::bail!("environment: {rank_v}={rank} is out of range for {size_v}={world_size}")
        }
        let nodes = Nodes::of(world_size, local_world_size, &get).map_err(|(name, v)| {
            candle::Error::Msg(format!(
                "environment: {name} must be a non-negative integer, got {v:?}"
            ))
        })?;
        let master_addr = match get("MASTER_ADDR") {
            Some(a) => a,
            None if nodes.several() => candle::bail!(
                "environment: MASTER_ADDR is not set, and the job spans several machines ({}); set MASTER_ADDR to rank 0's host name or IP address on every rank",
                nodes.why
            ),
            None => "127.0.0.1".to_string(),
        };
        let local_rank = match get(local_v) {
            Some(v) => parse_usize(local_v, &v)?,
            None if world_size == 1 => 0,
            None if nodes.single() || is_loopback(&master_addr) => rank,
            None => candle::bail!(
                "environment: {local_v} is not set, and the job may span several machines ({}); the global rank {rank_v}={rank} is not a local rank there: set {local_v} on every rank",
                if nodes.why.is_empty() {
                    format!("MASTER_ADDR={master_addr} is not a loopback address")
                } else {
                    nodes.why.clone()
                }
            ),
        };
        let master_port = match get("MASTER_PORT") {
            Some(v) => v.trim().parse::<u16>().map_err(|_| {
                candle::Error::Msg(format!(
                    "environment: MASTER_PORT must be a port number (0-65535), got {v:?}"
                ))
            })?,
            None if world_size <= 1 => 0,
            None => candle::bail!(
                "environment: MASTER_PORT is not set; with WORLD_SIZE={world_size} rank 0 needs a port to listen on (and MASTER_ADDR its address)"
            ),
        };
        let rv = Self {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
            token: get(TOKEN_VAR),
            port_file: get(PORT_FILE_VAR).map(PathBuf::from),
            source,
        };
        rv.validate()?;
        Ok(Some(rv))
    }

    /// Checks that the values are consistent.
    pub fn validate(&self) -> Result<()> {
        if self.world_size == 0 {
            candle::bail!("rendezvous: the world size must be at least 1, got 0")
        }
        if self.rank >= self.world_size {
            candle::bail!(
                "rendezvous: rank {} is out of range for world size {}",
                self.rank,
                self.world_size
            )
        }
        if let Some(l) = self.local_world_size {
            if self.local_rank >= l {
                candle::bail!(
                    "rendezvous: local rank {} is out of range for local world size {l}",
                    self.local_rank
                )
            }
        }
        if self.world_size > 1 && self.master_addr.trim().is_empty() {
            candle::bail!("rendezvous: MASTER_ADDR is empty")
        }
        if self.world_size > 1 && self.master_port == 0 && self.port_file.is_none() {
            candle::bail!(
                "rendezvous: MASTER_PORT is 0 and no port file ({PORT_FILE_VAR}) is given"
            )
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> Result<Option<Rendezvous>> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Rendezvous::from_lookup(|k| m.get(k).cloned())
    }

    /// The message without the backtrace candle appends under `RUST_BACKTRACE`.
    fn first_line(e: candle::Error) -> String {
        e.to_string().lines().next().unwrap_or_default().to_string()
    }

    #[test]
    fn torchrun() {
        let rv = lookup(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
            ("SYNCBN_TOKEN", "secret"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((rv.rank, rv.world_size, rv.local_rank), (3, 4, 1));
        assert_eq!(rv.local_world_size, Some(2));
        assert_eq!((rv.master_addr.as_str(), rv.master_port), ("node0", 29500));
        assert_eq!(rv.token.as_deref(), Some("secret"));
        assert_eq!(rv.source, EnvSource::Torchrun);
        assert!(!format!("{rv:?}").contains("secret"));
    }

    #[test]
    fn slurm_and_mpi() {
        let rv = lookup(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "4(x2)"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((rv.rank, rv.world_size, rv.local_rank), (5, 8, 1));
        assert_eq!(rv.local_world_size, Some(4));
        assert_eq!(rv.source, EnvSource::Slurm);
        assert_eq!(rv.master_addr, "node0");
        // One node: MASTER_ADDR defaults to the loopback address.
        let rv = lookup(&[
            ("SLURM_PROCID", "2"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "2"),
            ("SLURM_NNODES", "1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(rv.master_addr, "127.0.0.1");
        let rv = lookup(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((rv.rank, rv.world_size, rv.local_rank), (1, 2, 0));
        assert_eq!(rv.source, EnvSource::OpenMpi);
    }

    #[test]
    fn absent_and_invalid() {
        assert!(lookup(&[]).unwrap().is_none());
        assert!(lookup(&[("RANK", "0"), ("WORLD_SIZE", "1")])
            .unwrap()
            .is_some());
        let err = |v: &[(&str, &str)]| first_line(lookup(v).unwrap_err());
        assert_eq!(
            err(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]),
            "environment: RANK=2 is out of range for WORLD_SIZE=2"
        );
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2")]).contains("MASTER_PORT"));
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK"));
        assert!(err(&[("RANK", "0")]).contains("WORLD_SIZE"));
        assert!(
            err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "99999")])
                .contains("MASTER_PORT")
        );
    }

    /// A job over several machines must say where rank 0 is and which GPU is
    /// whose: no silent 127.0.0.1, no global rank taken for a local one.
    #[test]
    fn several_machines_need_master_addr_and_local_rank() {
        let err = |v: &[(&str, &str)]| first_line(lookup(v).unwrap_err());
        let e = err(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_PORT", "29500"),
        ]);
        assert_eq!(
            e,
            "environment: MASTER_ADDR is not set, and the job spans several machines (world size 8 > local world size 4); set MASTER_ADDR to rank 0's host name or IP address on every rank"
        );
        let e = err(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NNODES", "2"),
            ("MASTER_PORT", "29500"),
        ]);
        assert!(
            e.contains("MASTER_ADDR is not set") && e.contains("SLURM_NNODES=2"),
            "{e}"
        );
        let e = err(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("GROUP_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ]);
        assert_eq!(
            e,
            "environment: LOCAL_RANK is not set, and the job may span several machines (GROUP_WORLD_SIZE=2); the global rank RANK=5 is not a local rank there: set LOCAL_RANK on every rank"
        );
        // Nothing says how many machines, and MASTER_ADDR names another one.
        let e = err(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]);
        assert!(
            e.contains("OMPI_COMM_WORLD_LOCAL_RANK is not set")
                && e.contains("MASTER_ADDR=10.0.0.1 is not a loopback address"),
            "{e}"
        );
        let e = err(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("SLURM_NNODES", "two"),
            ("MASTER_PORT", "29500"),
        ]);
        assert!(
            e.contains("SLURM_NNODES must be a non-negative integer"),
            "{e}"
        );
        // Known to be one machine: the local rank is the rank.
        for extra in [
            ("LOCAL_WORLD_SIZE", "4"),
            ("GROUP_WORLD_SIZE", "1"),
            ("MASTER_ADDR", "::1"),
        ] {
            let rv = lookup(&[
                ("RANK", "3"),
                ("WORLD_SIZE", "4"),
                ("MASTER_PORT", "29500"),
                extra,
            ])
            .unwrap()
            .unwrap();
            assert_eq!(rv.local_rank, 3, "{extra:?}");
        }
        // Unknown, MASTER_ADDR unset: a loopback rendezvous, one machine.
        let rv = lookup(&[("RANK", "3"), ("WORLD_SIZE", "4"), ("MASTER_PORT", "1")])
            .unwrap()
            .unwrap();
        assert_eq!((rv.master_addr.as_str(), rv.local_rank), ("127.0.0.1", 3));
    }

    #[test]
    fn addresses() {
        for a in [
            "127.0.0.1",
            "127.3.2.1",
            "localhost",
            "LOCALHOST",
            "::1",
            "[::1]",
        ] {
            assert!(is_loopback(a), "{a}");
        }
        for a in [
            "10.0.0.1",
            "192.168.1.2",
            "node07",
            "0.0.0.0",
            "::",
            "",
            "[10.0.0.1",
        ] {
            assert!(!is_loopback(a), "{a}");
        }
        assert_eq!(host_port("::1", 80), "[::1]:80");
        assert_eq!(host_port("[::1]", 80), "[::1]:80");
        assert_eq!(host_port(" fe80::1 ", 1), "[fe80::1]:1");
        assert_eq!(host_port("127.0.0.1", 29500), "127.0.0.1:29500");
        assert_eq!(host_port("node0", 29500), "node0:29500");
        // Loopback: only there. Else every interface.
        assert_eq!(listen_addrs("127.0.0.1", 5), ["127.0.0.1:5"]);
        assert_eq!(listen_addrs("localhost", 5), ["localhost:5"]);
        assert_eq!(listen_addrs("[::1]", 5), ["[::1]:5"]);
        assert_eq!(listen_addrs("::1", 0), ["[::1]:0"]);
        assert_eq!(listen_addrs("10.1.2.3", 5), ["0.0.0.0:5"]);
        assert_eq!(listen_addrs("fd00::7", 5), ["[::]:5", "0.0.0.0:5"]);
        // A name that does not resolve here (a virtual name, say): dual-stack.
        assert_eq!(
            listen_addrs("no-such-host.invalid", 5),
            ["[::]:5", "0.0.0.0:5"]
        );
    }
}
