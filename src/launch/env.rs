//! Where a rank learns who it is and where the group meets: the environment set
//! by a launcher.
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
//! address; required when the world size is above 1), `SYNCBN_TOKEN` (the job
//! token every joining rank must present) and `SYNCBN_PORT_FILE` (with
//! `MASTER_PORT=0`: rank 0 listens on a free port and writes it there).

use candle::Result;
use std::path::PathBuf;

/// The environment variable holding the per-job token.
pub const TOKEN_VAR: &str = "SYNCBN_TOKEN";
/// The environment variable naming the port file (with `MASTER_PORT=0`).
pub const PORT_FILE_VAR: &str = "SYNCBN_PORT_FILE";

/// Which launcher's variables described the rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvSource {
    /// `RANK`/`WORLD_SIZE` (torchrun, this crate's launcher).
    Torchrun,
    /// `OMPI_COMM_WORLD_*` (Open MPI).
    OpenMpi,
    /// `SLURM_*` (srun).
    Slurm,
    /// Built in code with [`Rendezvous::new`].
    Explicit,
}

/// Everything a rank needs to join its group.
#[derive(Clone, PartialEq, Eq)]
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
        let local_rank = match get(local_v) {
            Some(v) => parse_usize(local_v, &v)?,
            None if world_size == 1 => 0,
            None => rank,
        };
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
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".to_string());
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
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((rv.rank, rv.world_size, rv.local_rank), (5, 8, 1));
        assert_eq!(rv.local_world_size, Some(4));
        assert_eq!(rv.source, EnvSource::Slurm);
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
        let err = |v: &[(&str, &str)]| lookup(v).unwrap_err().to_string();
        assert!(
            err(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")])
                .contains("out of range")
        );
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2")]).contains("MASTER_PORT"));
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK"));
        assert!(err(&[("RANK", "0")]).contains("WORLD_SIZE"));
        assert!(
            err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "99999")])
                .contains("MASTER_PORT")
        );
    }
}
