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

use candle::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use common::{
    check_ranks_against_whole, expected, run_rank, scratch_dir, split_batch, tolerance, values,
    Outcome, RankRun, Rng, EXPECTED_ERROR,
};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SCENARIO: &str = "SYNCBN_MPI_TEST_SCENARIO";
const BATCHES: &str = "SYNCBN_MPI_TEST_BATCHES";
/// Where the `layer` scenario writes each rank's results.
const OUT_DIR: &str = "SYNCBN_MPI_TEST_OUT";
const REQUIRE_MPI: &str = "SYNCBN_REQUIRE_MPI";
const C: usize = 4;

// ---------------------------------------------------------------- the ranks

/// The training batches of the `layer` scenario (two steps of `total`
/// samples of shape `(total, C, 3, 2)`), their upstream gradients and an
/// eval batch: the same on every rank and in the driver.
type Data = (
    Vec<usize>,
    Vec<Vec<f64>>,
    Vec<Vec<f64>>,
    (Vec<usize>, Vec<f64>),
);

fn data(total: usize) -> Data {
    let shape = vec![total, C, 3, 2];
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(7);
    let xs = (0..2)
        .map(|s| rng.normals(n, 0.5 + s as f64, 2.0))
        .collect();
    let gs = (0..2).map(|_| rng.normals(n, 0.0, 1.0)).collect();
    let eval_shape = vec![3, C, 3, 2];
    let eval = rng.normals(eval_shape.iter().product(), -0.5, 1.5);
    (shape, xs, gs, (eval_shape, eval))
}

/// A [`RankRun`] as text, every value by its bits, one vector a line.
fn encode(run: &RankRun) -> String {
    let mut lines = Vec::new();
    let mut push = |name: &str, v: &[f64]| {
        let bits: Vec<String> = v.iter().map(|x| format!("{:016x}", x.to_bits())).collect();
        lines.push(format!("{name} {}", bits.join(" ")));
    };
    for (name, steps) in [
        ("outputs", &run.outputs),
        ("input_grads", &run.input_grads),
        ("weight_grads", &run.weight_grads),
        ("bias_grads", &run.bias_grads),
    ] {
        for step in steps {
            push(name, step);
        }
    }
    push("running_mean", &run.running_mean);
    push("running_var", &run.running_var);
    push("eval", &run.eval);
    lines.push(format!("batches {}", run.batches));
    lines.join("\n")
}

/// The inverse of [`encode`].
fn decode(text: &str) -> RankRun {
    let mut run = RankRun::default();
    for line in text.lines() {
        let (name, rest) = line.split_once(' ').expect("a named line");
        let v: Vec<f64> = rest
            .split_whitespace()
            .map(|b| f64::from_bits(u64::from_str_radix(b, 16).expect("hex bits")))
            .collect();
        match name {
            "outputs" => run.outputs.push(v),
            "input_grads" => run.input_grads.push(v),
            "weight_grads" => run.weight_grads.push(v),
            "bias_grads" => run.bias_grads.push(v),
            "running_mean" => run.running_mean = v,
            "running_var" => run.running_var = v,
            "eval" => run.eval = v,
            "batches" => run.batches = rest.parse().expect("a count"),
            other => panic!("unknown line {other}"),
        }
    }
    run
}

/// One rank of the k-ranks-vs-1 comparison (batch sizes per rank in
/// `BATCHES`): two training steps and an eval forward of its slice
/// (`common::run_rank`), written to `OUT_DIR` for the driver.
fn layer(group: &ProcessGroup) -> candle::Result<()> {
    let sizes: Vec<usize> = std::env::var(BATCHES)
        .expect("batches")
        .split(',')
        .map(|s| s.parse().expect("batch size"))
        .collect();
    let rank = group.rank();
    assert_eq!(sizes.len(), group.world_size());
    let (shape, xs, gs, eval) = data(sizes.iter().sum());
    let part = |b: &Vec<f64>| split_batch(b, &shape, &sizes)[rank].clone();
    let shapes = xs.iter().map(|x| part(x).0).collect();
    let batches = xs.iter().map(|x| part(x).1).collect();
    let grads = gs.iter().map(|g| part(g).1).collect();
    let cfg = SyncBatchNormConfig::default();
    let run = run_rank(group.clone(), cfg, DType::F32, shapes, batches, grads, eval)?;
    let dir = PathBuf::from(std::env::var(OUT_DIR).expect("output folder"));
    std::fs::write(dir.join(format!("rank{rank}.txt")), encode(&run))?;
    println!(
        "rank {rank} ({}): trained on {} samples",
        group.backend().name(),
        sizes[rank]
    );
    Ok(())
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The collectives themselves, with exact expectations: small and large
/// all-reduces (the all-gather path and `MPI_Iallreduce`) of every float
/// dtype, a mean, broadcasts, a barrier, an empty tensor, and on the MPI
/// group subgroups with communicators of their own.
fn collectives(group: &ProcessGroup) -> candle::Result<()> {
    let (rank, world) = (group.rank(), group.world_size());
    let cpu = &Device::Cpu;
    // Small integers: every sum is exact in every dtype.
    let ints = |n: usize, r: usize| -> Vec<f32> { (0..n).map(|i| (r + i % 5) as f32).collect() };
    let want = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (0..world).map(|r| (r + i % 5) as f32).sum())
            .collect()
    };
    // 300 000 f32 and bf16 are above the 256 KiB threshold, 12 are below it.
    for n in [12usize, 300_000] {
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            let t = Tensor::from_vec(ints(n, rank), n, cpu)?.to_dtype(dtype)?;
            let sum = group.all_reduce_sum(&t)?;
            assert_eq!(sum.dtype(), dtype);
            let got = f32s(&sum.to_dtype(DType::F32)?);
            assert!(got == want(n), "all_reduce_sum of {n} {dtype:?}");
        }
    }
    let t = Tensor::from_vec(ints(12, rank), (3, 4), cpu)?;
    let mean = values(&group.all_reduce_mean(&t)?);
    let want_mean: Vec<f64> = want(12)
        .iter()
        .map(|&v| f64::from(v) / world as f64)
        .collect();
    common::assert_close("mean", &mean, &want_mean, 0.0, 1e-6);
    let root = world - 1;
    let mine = Tensor::new(&[rank as u32 * 10, 7, 9], cpu)?;
    let got: Vec<u32> = group.broadcast(&mine, root)?.to_vec1()?;
    assert_eq!(got, [root as u32 * 10, 7, 9]);
    let big = Tensor::from_vec(ints(300_000, rank), 300_000, cpu)?;
    assert_eq!(f32s(&group.broadcast(&big, 0)?), ints(300_000, 0));
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
        "kill" | "hang" | "mismatch-count" => {
            // Rank 1 builds a wider layer in the mismatch.
            let wider = scenario == "mismatch-count" && group.rank() == 1;
            common::faulty_step(&group, if wider { C + 1 } else { C }, "stem.bn", &scenario)
        }
        "swapped-layers" => swapped_layers(&group),
        "kept-group" => {
            // A group kept until exit (as a default group in a static is):
            // MPI is finalized at exit all the same.
            group.barrier().unwrap();
            std::mem::forget(group);
            println!("group kept until exit");
        }
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
    common::worker_args(module_path!())
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
/// process within the tolerances of the in-process tests
/// (`common::check_ranks_against_whole`), and are bit for bit those of the
/// TCP group on the same ranks; the collectives give exact results.
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
            format!("rank {r} (mpi): trained"),
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
            o.output.contains(&format!("rank {r} (tcp): trained")),
            "{}",
            o.output
        );
    }
    let mut ranks = Vec::new();
    for r in 0..np {
        let file = format!("rank{r}.txt");
        let mpi = std::fs::read_to_string(mpi_dir.join(&file)).unwrap();
        let tcp = std::fs::read_to_string(tcp_dir.join(&file)).unwrap();
        assert!(
            !mpi.is_empty() && mpi == tcp,
            "rank {r}: MPI and TCP results differ"
        );
        ranks.push(decode(&mpi));
    }
    let total: usize = batches
        .split(',')
        .map(|s| s.parse::<usize>().unwrap())
        .sum();
    let (shape, xs, gs, eval) = data(total);
    let cfg = SyncBatchNormConfig::default();
    let single = ProcessGroup::single();
    let whole = run_rank(single, cfg, DType::F32, vec![shape; 2], xs, gs, eval).unwrap();
    let label = format!("mpi, {np} ranks, batches {batches}");
    check_ranks_against_whole(&label, &ranks, &whole, tolerance(DType::F32), total);
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

/// A group still alive at exit: the exit hook finalizes MPI, and the job
/// ends cleanly (a rank that exits without `MPI_Finalize` fails the job).
#[test]
fn mpi_is_finalized_at_exit_when_a_group_is_kept() {
    let Some(mpirun) = mpirun("mpi_is_finalized_at_exit_when_a_group_is_kept") else {
        return;
    };
    let dir = scratch_dir("mpi-kept");
    let o = run_mpi(&mpirun, 2, "kept-group", &[], &dir, Duration::from_secs(60));
    assert_eq!(
        o.output.matches("group kept until exit").count(),
        2,
        "{}",
        o.output
    );
    assert_eq!(o.code, Some(0), "{}", o.output);
    assert!(
        !o.output.to_lowercase().contains("finalize"),
        "{}",
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
