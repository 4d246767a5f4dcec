//! The MPI group (feature `mpi`) under a real `mpirun`: the test executable
//! re-runs itself as the ranks (`worker` plays one rank when
//! `SYNCBN_MPI_TEST_SCENARIO` is set, and does nothing otherwise).
//!
//! Every job runs in a process group of its own and is killed at a
//! deadline, so no test waits forever. Without `mpirun` on `PATH` the tests
//! report that they were skipped, unless `SYNCBN_REQUIRE_MPI=1` (CI:
//! scripts/mpi-tests.sh), which makes them fail.

#[path = "common/mod.rs"]
mod common;

use candle::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::{error_kind, ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use common::scratch_dir;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SCENARIO: &str = "SYNCBN_MPI_TEST_SCENARIO";
const BATCHES: &str = "SYNCBN_MPI_TEST_BATCHES";
/// Where the `layer` scenario writes each rank's results.
const OUT_DIR: &str = "SYNCBN_MPI_TEST_OUT";
const REQUIRE_MPI: &str = "SYNCBN_REQUIRE_MPI";
/// Exit code of a worker that got the error its scenario expects.
const EXPECTED_ERROR: i32 = 42;
const C: usize = 4;

// ---------------------------------------------------------------- the ranks

/// SplitMix64 normals (the same data on every rank).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normals(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u1, u2) = (self.next().max(1e-300), self.next());
                (mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    }
}

/// Two training steps of one layer: forward and backward of `Σ y·gout`,
/// then a forward on `2x + 1`: `[y1, dx, dweight, dbias, y2, running_mean,
/// running_var]` (the local gradients).
fn two_steps(x: &Tensor, gout: &Tensor, group: ProcessGroup) -> candle::Result<Vec<Tensor>> {
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bn = SyncBatchNorm::new(C, SyncBatchNormConfig::default(), vb.pp("bn"), group)?;
    let w: Vec<f32> = (0..C).map(|i| 0.5 + i as f32 * 0.75).collect();
    let b: Vec<f32> = (0..C).map(|i| 0.1 - i as f32 * 0.3).collect();
    varmap.set_one("bn.weight", Tensor::new(w, &Device::Cpu)?)?;
    varmap.set_one("bn.bias", Tensor::new(b, &Device::Cpu)?)?;
    let xv = Var::from_tensor(x)?;
    let y1 = bn.forward_t(xv.as_tensor(), true)?;
    let grads = (&y1 * gout)?.sum_all()?.backward()?;
    let (wt, bt) = bn.weight_and_bias().expect("affine");
    let zeros = || Tensor::zeros(C, DType::F32, &Device::Cpu);
    let dx = match grads.get(xv.as_tensor()) {
        Some(g) => g.clone(),
        None => x.zeros_like()?,
    };
    let dw = grads.get(wt).cloned().map_or_else(zeros, Ok)?;
    let db = grads.get(bt).cloned().map_or_else(zeros, Ok)?;
    let y2 = bn.forward_t(&x.affine(2.0, 1.0)?, true)?;
    let rm = bn.running_mean().expect("tracked").copy()?;
    let rv = bn.running_var().expect("tracked").copy()?;
    Ok(vec![y1, dx, dw, db, y2, rm, rv])
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, rtol: f64, atol: f64) {
    let (g, w) = (f32s(got), f32s(want));
    assert_eq!(g.len(), w.len(), "{what}: lengths differ");
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let tol = atol + rtol * f64::from(*b).abs();
        assert!(
            f64::from(a - b).abs() <= tol,
            "{what}[{i}]: got {a}, want {b} (tol {tol:e})"
        );
    }
}

/// One rank of the k-ranks-vs-1 comparison (batch sizes per rank in
/// `BATCHES`), within the tolerances of tests/multiprocess; writes its
/// results to `OUT_DIR` for the comparison with the TCP group.
fn layer(group: &ProcessGroup) -> candle::Result<()> {
    let sizes: Vec<usize> = std::env::var(BATCHES)
        .expect("batches")
        .split(',')
        .map(|s| s.parse().expect("batch size"))
        .collect();
    let (rank, world) = (group.rank(), group.world_size());
    assert_eq!(sizes.len(), world);
    let n: usize = sizes.iter().sum();
    let mut rng = Rng(7);
    let shape = (n, C, 3, 2);
    let x = Tensor::from_vec(rng.normals(n * C * 6, 0.5, 2.0), shape, &Device::Cpu)?;
    let gout = Tensor::from_vec(rng.normals(n * C * 6, 0.0, 1.0), shape, &Device::Cpu)?;
    let full = two_steps(&x, &gout, ProcessGroup::single())?;
    let (off, nr) = (sizes[..rank].iter().sum::<usize>(), sizes[rank]);
    let mine = two_steps(
        &x.narrow(0, off, nr)?,
        &gout.narrow(0, off, nr)?,
        group.clone(),
    )?;
    for (i, what) in ["y", "dx"].iter().enumerate() {
        let want = full[i].narrow(0, off, nr)?;
        assert_close(what, &mine[i], &want, 1e-5, 1e-5);
    }
    assert_close("y2", &mine[4], &full[4].narrow(0, off, nr)?, 1e-5, 1e-5);
    for (i, what) in [(2, "dweight"), (3, "dbias")] {
        let summed = group.all_reduce_sum(&mine[i])?;
        assert_close(what, &summed, &full[i], 1e-5, 1e-4);
    }
    assert_close("running_mean", &mine[5], &full[5], 1e-5, 1e-6);
    assert_close("running_var", &mine[6], &full[6], 1e-5, 1e-6);
    let bytes: Vec<u8> = mine
        .iter()
        .flat_map(|t| f32s(t).into_iter().flat_map(f32::to_le_bytes))
        .collect();
    let dir = PathBuf::from(std::env::var(OUT_DIR).expect("output folder"));
    std::fs::write(dir.join(format!("rank{rank}.bin")), bytes)?;
    println!(
        "rank {rank} ({}): {nr} samples match the single-process result",
        group.backend().name()
    );
    Ok(())
}

/// The collectives themselves, with exact expectations: small and large
/// all-reduces (the all-gather path and `MPI_Iallreduce`) of every float
/// dtype, a mean, broadcasts, a barrier, an empty tensor, and on the MPI
/// group subgroups with communicators of their own.
fn collectives(group: &ProcessGroup) -> candle::Result<()> {
    let (rank, world) = (group.rank(), group.world_size());
    let cpu = &Device::Cpu;
    // Small integers: every sum is exact in every dtype.
    let values = |n: usize, r: usize| -> Vec<f32> { (0..n).map(|i| (r + i % 5) as f32).collect() };
    let want = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (0..world).map(|r| (r + i % 5) as f32).sum())
            .collect()
    };
    // 300 000 f32 and bf16 are above the 256 KiB threshold, 12 are below it.
    for n in [12usize, 300_000] {
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            let t = Tensor::from_vec(values(n, rank), n, cpu)?.to_dtype(dtype)?;
            let sum = group.all_reduce_sum(&t)?;
            assert_eq!(sum.dtype(), dtype);
            let got = f32s(&sum.to_dtype(DType::F32)?);
            assert!(got == want(n), "all_reduce_sum of {n} {dtype:?}");
        }
    }
    let t = Tensor::from_vec(values(12, rank), (3, 4), cpu)?;
    let mean = f32s(&group.all_reduce_mean(&t)?);
    let want_mean: Vec<f32> = want(12).iter().map(|v| v / world as f32).collect();
    assert_close(
        "mean",
        &Tensor::new(mean, cpu)?,
        &Tensor::new(want_mean, cpu)?,
        1e-6,
        0.0,
    );
    let root = world - 1;
    let mine = Tensor::new(&[rank as u32 * 10, 7, 9], cpu)?;
    let got: Vec<u32> = group.broadcast(&mine, root)?.to_vec1()?;
    assert_eq!(got, [root as u32 * 10, 7, 9]);
    let big = Tensor::from_vec(values(300_000, rank), 300_000, cpu)?;
    assert_eq!(f32s(&group.broadcast(&big, 0)?), values(300_000, 0));
    group.barrier()?;
    let empty = Tensor::zeros((0, 3), DType::F32, cpu)?;
    assert_eq!(group.all_reduce_sum(&empty)?.dims(), [0, 3]);
    if group.backend().name() == "mpi" {
        // Ranks by parity: on 3 ranks, {0, 2} and {1} alone.
        let sub = group.split((rank % 2) as u32)?;
        let members: Vec<usize> = (0..world).filter(|r| r % 2 == rank % 2).collect();
        assert_eq!(sub.world_size(), members.len());
        assert_eq!(sub.rank(), members.iter().position(|&r| r == rank).unwrap());
        let got = f32s(&sub.all_reduce_sum(&Tensor::new(&[rank as f32, 1.0], cpu)?)?);
        let want = [members.iter().sum::<usize>() as f32, members.len() as f32];
        assert_eq!(got, want, "subgroup sum");
        if sub.world_size() > 1 {
            assert_eq!(sub.backend().name(), "mpi");
        }
        // The parent group still works after the split.
        group.barrier()?;
    }
    println!("rank {rank}: collectives exact");
    Ok(())
}

fn expected(e: candle::Error) -> ! {
    println!("EXPECTED-ERROR ({:?}): {e}", error_kind(&e));
    std::process::exit(EXPECTED_ERROR)
}

/// A layer's training step with a fault on rank 1: killed or stalled
/// between the forward and the backward, or a layer of another width.
fn failing_step(group: &ProcessGroup, scenario: &str) {
    let c = if scenario == "mismatch-count" && group.rank() == 1 {
        C + 1
    } else {
        C
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg = SyncBatchNormConfig::default();
    let bn = SyncBatchNorm::new(c, cfg, vb.pp("stem.bn"), group.clone()).unwrap();
    let x = Var::from_tensor(&Tensor::ones((4, c, 2), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let y = bn
        .forward_t(x.as_tensor(), true)
        .unwrap_or_else(|e| expected(e));
    println!("rank {}: forward finished", group.rank());
    if group.rank() == 1 {
        match scenario {
            "kill" => std::process::abort(),
            "hang" => std::thread::sleep(Duration::from_secs(60)),
            _ => {}
        }
    }
    let loss = y.sqr().unwrap().sum_all().unwrap();
    match loss.backward() {
        Ok(_) => println!("backward finished"),
        Err(e) => expected(e),
    }
}

/// Two layers of one width; rank 1 calls them in the other order.
fn swapped_layers(group: &ProcessGroup) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg = SyncBatchNormConfig::default();
    let a = SyncBatchNorm::new(C, cfg, vb.pp("layer_a"), group.clone()).unwrap();
    let b = SyncBatchNorm::new(C, cfg, vb.pp("layer_b"), group.clone()).unwrap();
    let x = Tensor::ones((4, C, 2), DType::F32, &Device::Cpu).unwrap();
    let first = if group.rank() == 1 { &b } else { &a };
    match first.forward_t(&x, true) {
        Ok(_) => println!("rank {}: no error", group.rank()),
        Err(e) => expected(e),
    }
}

/// Plays one rank of a scenario when run as a worker; a no-op otherwise.
#[test]
fn worker() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    let group = if scenario == "init-rank" {
        match candle_syncbn::Rank::from_env(candle_syncbn::launch::RankDevice::Cpu) {
            Ok(rank) => {
                let rv = rank.rendezvous.as_ref().expect("a launcher");
                println!(
                    "init_rank: rank {} of {} ({:?}, local rank {} of {:?})",
                    rank.group.rank(),
                    rank.group.world_size(),
                    rv.source,
                    rv.local_rank,
                    rv.local_world_size
                );
                rank.group
            }
            Err(e) => expected(e),
        }
    } else {
        ProcessGroup::from_env(&Device::Cpu).unwrap_or_else(|e| expected(e))
    };
    match scenario.as_str() {
        "layer" => {
            layer(&group).unwrap();
            collectives(&group).unwrap();
        }
        "init-rank" => collectives(&group).unwrap(),
        "kill" | "hang" | "mismatch-count" => failing_step(&group, &scenario),
        "swapped-layers" => swapped_layers(&group),
        s => panic!("unknown scenario {s}"),
    }
}

// ---------------------------------------------------------------- the driver

/// `mpirun` on `PATH`; `None` (and the test is reported skipped) when there
/// is none, or a failure when `SYNCBN_REQUIRE_MPI=1`.
fn mpirun(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("mpirun"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var(REQUIRE_MPI).as_deref() != Ok("1"),
            "{test}: mpirun is not on PATH and {REQUIRE_MPI}=1"
        );
        common::report_skip(&format!(
            "{test}: skipped: no mpirun on PATH (install Open MPI, or see scripts/mpi-tests.sh)"
        ));
    }
    found
}

/// The arguments that make this executable run [`worker`] and no other test.
fn worker_args() -> Vec<OsString> {
    let mut args = vec![OsString::from(common::test_path(module_path!(), "worker"))];
    args.extend(["--exact", "--nocapture", "--test-threads=1"].map(OsString::from));
    args
}

struct Outcome {
    code: Option<i32>,
    output: String,
    elapsed: Duration,
}

/// Runs `program args` (with `env`) in a process group of its own, its
/// output in `dir`; past `limit`, kills the whole group.
fn run_bounded(mut cmd: Command, env: &[(&str, String)], dir: &Path, limit: Duration) -> Outcome {
    use std::os::unix::process::CommandExt;
    let log = dir.join(format!("log{}", std::process::id()));
    let out = std::fs::File::create(&log).unwrap();
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > limit {
            // The launcher and every rank it started.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    Outcome {
        code,
        output,
        elapsed,
    }
}

/// `mpirun -np <np>` of this executable as [`worker`] in `scenario`.
fn run_mpi(
    mpirun: &Path,
    np: usize,
    scenario: &str,
    env: &[(&str, String)],
    dir: &Path,
    limit: Duration,
) -> Outcome {
    let mut cmd = Command::new(mpirun);
    cmd.args(["--oversubscribe", "-np", &np.to_string()])
        .arg(std::env::current_exe().unwrap())
        .args(worker_args())
        .env(SCENARIO, scenario)
        .env("SYNCBN_TIMEOUT", "20");
    run_bounded(cmd, env, dir, limit)
}

/// `np` ranks of this executable as [`worker`] in `scenario` over the TCP
/// group (on 127.0.0.1, without mpirun).
fn run_tcp(np: usize, scenario: &str, env: &[(&str, String)], dir: &Path) -> Vec<Outcome> {
    let mut children: Vec<_> = (0..np)
        .map(|r| {
            let mut cmd = Command::new(std::env::current_exe().unwrap());
            cmd.args(worker_args())
                .env(SCENARIO, scenario)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", np.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", "0")
                .env("SYNCBN_PORT_FILE", dir.join("port"))
                .env("SYNCBN_TOKEN", "test-token")
                .env("SYNCBN_TIMEOUT", "20");
            let dir = dir.join(format!("tcp{r}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::thread::spawn({
                let env: Vec<(String, String)> = env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect();
                move || {
                    let env: Vec<(&str, String)> =
                        env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                    run_bounded(cmd, &env, &dir, Duration::from_secs(120))
                }
            })
        })
        .collect();
    children.drain(..).map(|h| h.join().unwrap()).collect()
}

/// The layer's results on `np` MPI ranks (batches `batches`) match one
/// process, and are bit for bit those of the TCP group on the same ranks;
/// the collectives give exact results.
fn layer_matches_one_process_and_tcp(np: usize, batches: &str) {
    let Some(mpirun) = mpirun("layer_matches_one_process_and_tcp") else {
        return;
    };
    let dir = scratch_dir("mpi-layer");
    let (mpi_dir, tcp_dir) = (dir.join("mpi"), dir.join("tcp"));
    for d in [&mpi_dir, &tcp_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    let env = |out: &Path| {
        vec![
            (BATCHES, batches.to_string()),
            (OUT_DIR, out.display().to_string()),
        ]
    };
    let o = run_mpi(
        &mpirun,
        np,
        "layer",
        &env(&mpi_dir),
        &dir,
        Duration::from_secs(120),
    );
    assert_eq!(o.code, Some(0), "{}", o.output);
    for r in 0..np {
        for needle in [
            format!("rank {r} (mpi): "),
            format!("rank {r}: collectives exact"),
        ] {
            assert!(
                o.output.contains(&needle),
                "{needle:?} missing:\n{}",
                o.output
            );
        }
    }
    for (r, o) in run_tcp(np, "layer", &env(&tcp_dir), &dir)
        .iter()
        .enumerate()
    {
        assert_eq!(o.code, Some(0), "tcp rank {r}:\n{}", o.output);
        assert!(
            o.output.contains(&format!("rank {r} (tcp): ")),
            "{}",
            o.output
        );
    }
    for r in 0..np {
        let file = format!("rank{r}.bin");
        let mpi = std::fs::read(mpi_dir.join(&file)).unwrap();
        let tcp = std::fs::read(tcp_dir.join(&file)).unwrap();
        assert!(
            !mpi.is_empty() && mpi == tcp,
            "rank {r}: MPI and TCP results differ"
        );
    }
}

#[test]
fn two_ranks_match_one_process_and_the_tcp_group() {
    layer_matches_one_process_and_tcp(2, "5,3");
}

#[test]
fn three_ranks_uneven_and_empty_match_one_process_and_the_tcp_group() {
    layer_matches_one_process_and_tcp(3, "7,0,2");
}

/// `init_rank`'s `Rank::from_env` under mpirun: the MPI group, and a
/// rendezvous from MPI (local ranks from the node's communicator).
#[test]
fn init_rank_joins_the_mpi_group() {
    let Some(mpirun) = mpirun("init_rank_joins_the_mpi_group") else {
        return;
    };
    let dir = scratch_dir("mpi-init");
    let o = run_mpi(&mpirun, 2, "init-rank", &[], &dir, Duration::from_secs(60));
    assert_eq!(o.code, Some(0), "{}", o.output);
    for r in 0..2 {
        let needle = format!("init_rank: rank {r} of 2 (Mpi, local rank {r} of Some(2))");
        assert!(
            o.output.contains(&needle),
            "{needle:?} missing:\n{}",
            o.output
        );
    }
}

#[test]
fn a_killed_rank_ends_the_job_within_10_s() {
    let Some(mpirun) = mpirun("a_killed_rank_ends_the_job_within_10_s") else {
        return;
    };
    let dir = scratch_dir("mpi-kill");
    let o = run_mpi(&mpirun, 3, "kill", &[], &dir, Duration::from_secs(60));
    assert!(
        o.output.contains("rank 1: forward finished"),
        "{}",
        o.output
    );
    assert!(
        matches!(o.code, Some(c) if c != 0),
        "{:?}:\n{}",
        o.code,
        o.output
    );
    // The time includes starting 3 ranks on a loaded machine.
    assert!(
        o.elapsed < Duration::from_secs(10),
        "{:?}:\n{}",
        o.elapsed,
        o.output
    );
}

/// Rank 1 sleeps 60 s between the forward and the backward; with
/// `SYNCBN_TIMEOUT=2` the others end the job, naming the call they waited for.
#[test]
fn a_stalled_rank_ends_the_job_within_the_timeout() {
    let Some(mpirun) = mpirun("a_stalled_rank_ends_the_job_within_the_timeout") else {
        return;
    };
    let dir = scratch_dir("mpi-hang");
    let env = [("SYNCBN_TIMEOUT", "2".to_string())];
    let o = run_mpi(&mpirun, 3, "hang", &env, &dir, Duration::from_secs(60));
    assert!(
        matches!(o.code, Some(c) if c != 0),
        "{:?}:\n{}",
        o.code,
        o.output
    );
    for needle in [
        "SyncBatchNorm 'stem.bn': backward gradient sums",
        "did not complete within 2s",
        "MPI_Abort",
    ] {
        assert!(
            o.output.contains(needle),
            "{needle:?} missing:\n{}",
            o.output
        );
    }
    assert!(!o.output.contains("backward finished"), "{}", o.output);
    // 2 s of timeout after the forward, plus starting 3 ranks.
    assert!(
        o.elapsed < Duration::from_secs(12),
        "{:?}:\n{}",
        o.elapsed,
        o.output
    );
}

/// Checks a job whose ranks made different calls: every rank got an error
/// of kind `RanksDisagree` naming its call and another rank's, exited, and
/// no payload was exchanged (no memory corruption, no hang).
fn every_rank_disagrees(o: &Outcome, np: usize, ours: &str, theirs: &str) {
    assert_eq!(o.code, Some(EXPECTED_ERROR), "{}", o.output);
    // Each rank's line (libtest may print "test worker ... " before it).
    let errors: Vec<&str> = o
        .output
        .lines()
        .filter_map(|l| l.find("EXPECTED-ERROR").map(|i| &l[i..]))
        .collect();
    assert!(
        errors
            .iter()
            .all(|e| e.starts_with("EXPECTED-ERROR (Some(RanksDisagree))")),
        "{}",
        o.output
    );
    assert_eq!(errors.len(), np, "{}", o.output);
    for e in errors {
        assert!(e.contains("the ranks made different calls"), "{e}");
        assert!(e.contains(ours) && e.contains(theirs), "{e}");
    }
    for bad in ["malloc", "corrupt", "backward finished", "no error"] {
        assert!(!o.output.contains(bad), "{bad:?} in:\n{}", o.output);
    }
}

#[test]
fn ranks_with_different_counts_get_an_error_naming_both_calls() {
    let Some(mpirun) = mpirun("ranks_with_different_counts_get_an_error_naming_both_calls") else {
        return;
    };
    let dir = scratch_dir("mpi-count");
    let o = run_mpi(
        &mpirun,
        3,
        "mismatch-count",
        &[],
        &dir,
        Duration::from_secs(60),
    );
    // Widths 4 and 5: statistics of 3·4 and 3·5 values.
    every_rank_disagrees(
        &o,
        3,
        "all_reduce_sum of 12 f64",
        "all_reduce_sum of 15 f64",
    );
}

#[test]
fn ranks_calling_different_layers_get_an_error_naming_both() {
    let Some(mpirun) = mpirun("ranks_calling_different_layers_get_an_error_naming_both") else {
        return;
    };
    let dir = scratch_dir("mpi-layers");
    let o = run_mpi(
        &mpirun,
        2,
        "swapped-layers",
        &[],
        &dir,
        Duration::from_secs(60),
    );
    every_rank_disagrees(
        &o,
        2,
        "SyncBatchNorm 'layer_a': forward statistics",
        "SyncBatchNorm 'layer_b': forward statistics",
    );
}

/// `target/<profile>/examples/train`: scripts/mpi-tests.sh builds it with
/// the `mpi` feature before the tests.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap();
    profile_dir.join("examples").join("train")
}

/// The training example under `mpirun -np 2` (no self-spawn) trains as with
/// the TCP group: the same loss and a checkpoint identical byte for byte.
#[test]
fn the_training_example_runs_under_mpirun_as_with_tcp() {
    let Some(mpirun) = mpirun("the_training_example_runs_under_mpirun_as_with_tcp") else {
        return;
    };
    let bin = example_binary();
    if !bin.is_file() {
        assert!(
            std::env::var(REQUIRE_MPI).as_deref() != Ok("1"),
            "{bin:?} is missing: build it with `cargo build --features mpi --example train`"
        );
        common::report_skip(&format!(
            "the_training_example_runs_under_mpirun_as_with_tcp: skipped: {bin:?} is missing (cargo build --features mpi --example train)"
        ));
        return;
    }
    let dir = scratch_dir("mpi-train");
    let args = |ckpt: &Path| -> Vec<OsString> {
        let mut a: Vec<OsString> = [
            "--epochs",
            "1",
            "--max-steps",
            "4",
            "--train-size",
            "256",
            "--test-size",
            "64",
            "--batch-size",
            "16",
            "--checkpoint",
        ]
        .map(OsString::from)
        .to_vec();
        a.push(ckpt.into());
        a
    };
    let (mpi_ckpt, tcp_ckpt) = (dir.join("mpi.safetensors"), dir.join("tcp.safetensors"));
    let mut cmd = Command::new(&mpirun);
    cmd.args(["--oversubscribe", "-np", "2"])
        .arg(&bin)
        .args(args(&mpi_ckpt));
    let mpi = run_bounded(cmd, &[], &dir, Duration::from_secs(240));
    assert_eq!(mpi.code, Some(0), "{}", mpi.output);
    let mut cmd = Command::new(&bin);
    cmd.args(["--nproc-per-node", "2"]).args(args(&tcp_ckpt));
    let tcp = run_bounded(cmd, &[], &dir, Duration::from_secs(240));
    assert_eq!(tcp.code, Some(0), "{}", tcp.output);
    assert!(
        mpi.output.contains("2 rank(s), mpi group"),
        "{}",
        mpi.output
    );
    assert!(
        tcp.output.contains("2 rank(s), tcp group"),
        "{}",
        tcp.output
    );
    let losses = |text: &str| -> Vec<String> {
        text.lines()
            // "epoch 1/1: loss …, train accuracy …%" (the speed differs).
            .filter_map(|l| l.find("epoch 1/1: loss").map(|i| &l[i..]))
            .map(|l| l.split(", ").take(2).collect::<Vec<_>>().join(", "))
            .collect()
    };
    let (a, b) = (losses(&mpi.output), losses(&tcp.output));
    assert!(
        !a.is_empty() && a == b,
        "losses differ:\nmpi: {a:?}\ntcp: {b:?}"
    );
    let (a, b) = (
        std::fs::read(&mpi_ckpt).unwrap(),
        std::fs::read(&tcp_ckpt).unwrap(),
    );
    assert!(!a.is_empty() && a == b, "the checkpoints differ");
}
