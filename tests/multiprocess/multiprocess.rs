//! Real processes, one per rank, over the TCP group on 127.0.0.1.
//!
//! The test executable re-runs itself as the ranks: `worker` below does
//! nothing in a normal run, and plays one rank of a scenario when
//! `SYNCBN_TEST_SCENARIO` is set. Rank 0 listens on a port chosen by the OS
//! and publishes it in a per-test port file, so parallel tests never collide.

use crate::common;

use candle::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use candle_syncbn::launch::{launch, LaunchConfig};
use candle_syncbn::{ProcessGroup, SyncBatchNorm, SyncBatchNormConfig};
use common::{expected, scratch_dir, Outcome, EXPECTED_ERROR};
use std::ffi::OsString;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SCENARIO: &str = "SYNCBN_TEST_SCENARIO";
const BATCHES: &str = "SYNCBN_TEST_BATCHES";
const C: usize = 4;

/// SplitMix64 normals.
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

struct StepResult {
    y1: Tensor,
    dx: Tensor,
    dw: Tensor,
    db: Tensor,
    y2: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

/// Two training steps of one layer: forward + backward of `Σ y·gout` on `x`,
/// then a forward on `2x + 1` (running stats after two updates).
fn two_steps(
    x: &Tensor,
    gout: &Tensor,
    c: usize,
    group: ProcessGroup,
) -> candle::Result<StepResult> {
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bn = SyncBatchNorm::new(c, SyncBatchNormConfig::default(), vb, group)?;
    let w: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.75).collect();
    let b: Vec<f32> = (0..c).map(|i| 0.1 - i as f32 * 0.3).collect();
    varmap.set_one("weight", Tensor::new(w, &Device::Cpu)?)?;
    varmap.set_one("bias", Tensor::new(b, &Device::Cpu)?)?;
    let xv = Var::from_tensor(x)?;
    let y1 = bn.forward_t(xv.as_tensor(), true)?;
    let grads = (&y1 * gout)?.sum_all()?.backward()?;
    let (wt, bt) = bn.weight_and_bias().expect("affine");
    let zeros = || Tensor::zeros(c, DType::F32, &Device::Cpu);
    let dx = match grads.get(xv.as_tensor()) {
        Some(g) => g.clone(),
        None => x.zeros_like()?,
    };
    let dw = grads.get(wt).cloned().map_or_else(zeros, Ok)?;
    let db = grads.get(bt).cloned().map_or_else(zeros, Ok)?;
    let y2 = bn.forward_t(&x.affine(2.0, 1.0)?, true)?;
    Ok(StepResult {
        y1,
        dx,
        dw,
        db,
        y2,
        running_mean: bn.running_mean().expect("tracked").copy()?,
        running_var: bn.running_var().expect("tracked").copy()?,
    })
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, rtol: f64, atol: f64) {
    let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(g.len(), w.len(), "{what}: lengths differ");
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let tol = atol + rtol * (*b as f64).abs();
        assert!(
            ((a - b) as f64).abs() <= tol,
            "{what}[{i}]: got {a}, want {b} (tol {tol:e})"
        );
    }
}

/// One rank of the k-ranks-vs-1 comparison (batch sizes per rank in `BATCHES`).
fn equivalence(group: &ProcessGroup) -> candle::Result<()> {
    let sizes: Vec<usize> = std::env::var(BATCHES)
        .expect("batches")
        .split(',')
        .map(|s| s.parse().expect("batch size"))
        .collect();
    let (rank, world) = (group.rank(), group.world_size());
    assert_eq!(sizes.len(), world);
    let n: usize = sizes.iter().sum();
    let inner = [3usize, 2];
    let per = C * inner.iter().product::<usize>();
    let mut rng = Rng(7);
    let x = Tensor::from_vec(rng.normals(n * per, 0.5, 2.0), (n, C, 3, 2), &Device::Cpu)?;
    let gout = Tensor::from_vec(rng.normals(n * per, 0.0, 1.0), (n, C, 3, 2), &Device::Cpu)?;
    let full = two_steps(&x, &gout, C, ProcessGroup::single())?;
    let off: usize = sizes[..rank].iter().sum();
    let nr = sizes[rank];
    let mine = two_steps(
        &x.narrow(0, off, nr)?,
        &gout.narrow(0, off, nr)?,
        C,
        group.clone(),
    )?;
    // f32 tolerances: outputs and input gradients ~1e-5 relative; the summed
    // weight/bias gradients add O(n) terms in a different order.
    assert_close("y", &mine.y1, &full.y1.narrow(0, off, nr)?, 1e-5, 1e-5);
    assert_close("y2", &mine.y2, &full.y2.narrow(0, off, nr)?, 1e-5, 1e-5);
    assert_close("dx", &mine.dx, &full.dx.narrow(0, off, nr)?, 1e-5, 1e-5);
    assert_close(
        "dweight",
        &group.all_reduce_sum(&mine.dw)?,
        &full.dw,
        1e-5,
        1e-4,
    );
    assert_close(
        "dbias",
        &group.all_reduce_sum(&mine.db)?,
        &full.db,
        1e-5,
        1e-4,
    );
    assert_close(
        "running_mean",
        &mine.running_mean,
        &full.running_mean,
        1e-5,
        1e-6,
    );
    assert_close(
        "running_var",
        &mine.running_var,
        &full.running_var,
        1e-5,
        1e-6,
    );
    println!("rank {rank}: {nr} samples match the single-process result");
    Ok(())
}

/// Two layers on every rank: one only ever run in eval mode (as a model
/// calling `apply_t(&bn, false)` runs it), one trained once first; 150 eval
/// forwards each.
fn eval_only(group: &ProcessGroup) -> candle::Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg = SyncBatchNormConfig::default();
    let never = SyncBatchNorm::new(C, cfg, vb.pp("never_trained"), group.clone())?;
    let trained = SyncBatchNorm::new(C, cfg, vb.pp("trained_once"), group.clone())?;
    let x = Tensor::arange(0f32, (3 * C * 5) as f32, &Device::Cpu)?.reshape((3, C, 5))?;
    trained.forward_t(&x, true)?;
    for _ in 0..150 {
        never.forward_t(&x, false)?;
        trained.forward_t(&x, false)?;
    }
    println!("eval-only: done");
    Ok(())
}

/// Plays one rank of a scenario when run as a worker; a no-op otherwise.
#[test]
fn worker() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    let group = if scenario == "init-rank" {
        match cpu_rank() {
            Ok(rank) => {
                assert!(rank.device.is_cpu(), "{rank:?}");
                let g = rank.group;
                println!(
                    "init_rank: rank {} of {} on the CPU",
                    g.rank(),
                    g.world_size()
                );
                g
            }
            Err(e) => expected(e),
        }
    } else {
        match ProcessGroup::from_env(&Device::Cpu) {
            Ok(g) => g,
            Err(e) => expected(e),
        }
    };
    match scenario.as_str() {
        "equivalence" | "init-rank" => equivalence(&group).unwrap(),
        "eval-only" => eval_only(&group).unwrap(),
        "kill" | "hang" | "mismatch" => {
            // Rank 1 builds a wider layer in the mismatch.
            let wider = scenario == "mismatch" && group.rank() == 1;
            common::faulty_step(&group, if wider { C + 1 } else { C }, "", &scenario)
        }
        "fail-rank-1" => {
            if group.rank() == 1 {
                std::process::exit(3)
            }
            std::thread::sleep(Duration::from_secs(60));
        }
        s => panic!("unknown scenario {s}"),
    }
}

/// This rank's CPU device and group in one call: `init_rank` itself in a
/// CPU build (the one a CUDA build would point at a GPU).
fn cpu_rank() -> candle::Result<candle_syncbn::Rank> {
    #[cfg(not(feature = "cuda"))]
    return candle_syncbn::init_rank();
    #[cfg(feature = "cuda")]
    return candle_syncbn::Rank::from_env(candle_syncbn::launch::RankDevice::Cpu);
}

/// The arguments that make this executable run [`worker`] and no other test.
fn worker_args() -> Vec<OsString> {
    common::worker_args(module_path!())
}

/// Starts `world` workers (this executable) directly, with `env(rank)` extra
/// variables, and waits at most `limit` for the ranks in `wait_for`; the rest
/// are killed afterwards.
fn run_workers(
    world: usize,
    scenario: &str,
    env: impl Fn(usize) -> Vec<(&'static str, String)>,
    wait_for: &[usize],
    limit: Duration,
) -> Vec<Outcome> {
    let dir = scratch_dir("mp");
    let exe = std::env::current_exe().unwrap();
    let start = Instant::now();
    let mut children: Vec<Child> = (0..world)
        .map(|r| {
            let out = std::fs::File::create(dir.join(format!("out{r}"))).unwrap();
            let mut cmd = Command::new(&exe);
            cmd.args(worker_args())
                .env(SCENARIO, scenario)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", "0")
                .env("SYNCBN_PORT_FILE", dir.join("port"))
                .env("SYNCBN_TOKEN", "test-token")
                .env("SYNCBN_TIMEOUT", "3")
                .env("RUST_BACKTRACE", "0")
                .stdin(Stdio::null())
                .stdout(Stdio::from(out.try_clone().unwrap()))
                .stderr(Stdio::from(out));
            for (k, v) in env(r) {
                cmd.env(k, v);
            }
            cmd.spawn().unwrap()
        })
        .collect();
    let mut done: Vec<Option<(Option<i32>, Duration)>> = vec![None; world];
    while wait_for.iter().any(|&r| done[r].is_none()) && start.elapsed() < limit {
        for (r, c) in children.iter_mut().enumerate() {
            if done[r].is_none() {
                if let Some(st) = c.try_wait().unwrap() {
                    done[r] = Some((st.code(), start.elapsed()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let out = (0..world)
        .map(|r| {
            let (code, elapsed) = done[r].unwrap_or((None, start.elapsed()));
            Outcome {
                code,
                output: std::fs::read_to_string(dir.join(format!("out{r}"))).unwrap_or_default(),
                elapsed,
            }
        })
        .collect();
    out
}

fn all(world: usize) -> Vec<usize> {
    (0..world).collect()
}

/// Runs two workers of an equivalence `scenario` on `batches` and checks
/// that each matched one process and printed what `also(rank)` says.
fn two_ranks_match_one(scenario: &str, batches: &str, also: impl Fn(usize) -> String) {
    let out = run_workers(
        2,
        scenario,
        |_| vec![(BATCHES, batches.into())],
        &all(2),
        Duration::from_secs(60),
    );
    for (r, o) in out.iter().enumerate() {
        assert_eq!(o.code, Some(0), "rank {r}:\n{}", o.output);
        assert!(
            o.output.contains("match the single-process result") && o.output.contains(&also(r)),
            "{}",
            o.output
        );
    }
}

#[test]
fn two_processes_match_one() {
    two_ranks_match_one("equivalence", "5,3", |_| String::new());
}

/// `init_rank` reads the launcher's variables, gives each process the CPU
/// and a TCP group of the two ranks, which then match one process.
#[test]
fn init_rank_sets_up_cpu_ranks_in_one_call() {
    two_ranks_match_one("init-rank", "4,3", |r| {
        format!("init_rank: rank {r} of 2 on the CPU")
    });
}

/// A synchronized layer that has only run in eval mode after 100 forwards
/// (the model never passes `train` on) says so on stderr, once; a layer
/// that trained does not.
#[test]
fn a_layer_only_ever_in_eval_mode_warns_once() {
    let out = run_workers(2, "eval-only", |_| vec![], &all(2), Duration::from_secs(60));
    for (r, o) in out.iter().enumerate() {
        assert_eq!(o.code, Some(0), "rank {r}:\n{}", o.output);
        assert!(o.output.contains("eval-only: done"), "{}", o.output);
        let warning = "warning: SyncBatchNorm 'never_trained' synchronizes over 2 ranks but has run 100 forwards in eval mode and none in training mode";
        assert_eq!(
            o.output.matches(warning).count(),
            1,
            "rank {r}:\n{}",
            o.output
        );
        assert!(!o.output.contains("'trained_once'"), "{}", o.output);
    }
}

#[test]
fn three_processes_uneven_and_empty_through_the_launcher() {
    let mut cfg = LaunchConfig::new(3, std::env::current_exe().unwrap(), worker_args());
    cfg.envs = vec![
        (SCENARIO.into(), "equivalence".into()),
        (BATCHES.into(), "7,0,2".into()),
        ("SYNCBN_TIMEOUT".into(), "20".into()),
    ];
    assert_eq!(launch(&cfg).unwrap(), 0);
}

#[test]
fn killed_rank_makes_the_others_fail() {
    let out = run_workers(3, "kill", |_| vec![], &[0, 1, 2], Duration::from_secs(30));
    assert_ne!(out[1].code, Some(0));
    for r in [0, 2] {
        let o = &out[r];
        assert_eq!(o.code, Some(EXPECTED_ERROR), "rank {r}:\n{}", o.output);
        assert!(
            o.output.contains("rank 1 closed the connection"),
            "rank {r}:\n{}",
            o.output
        );
        assert!(o.elapsed < Duration::from_secs(15), "{:?}", o.elapsed);
    }
}

#[test]
fn silent_rank_makes_the_others_fail_within_the_timeout() {
    // SYNCBN_TIMEOUT is 3 s; rank 1 sleeps 60 s in the middle of the step.
    let out = run_workers(3, "hang", |_| vec![], &[0, 2], Duration::from_secs(30));
    for r in [0, 2] {
        let o = &out[r];
        assert_eq!(o.code, Some(EXPECTED_ERROR), "rank {r}:\n{}", o.output);
        assert!(
            o.output.contains("rank 1 did not answer"),
            "rank {r}:\n{}",
            o.output
        );
        assert!(o.elapsed < Duration::from_secs(12), "{:?}", o.elapsed);
    }
}

#[test]
fn mismatched_channel_counts_fail_on_every_rank() {
    let out = run_workers(3, "mismatch", |_| vec![], &all(3), Duration::from_secs(30));
    for (r, o) in out.iter().enumerate() {
        assert_eq!(o.code, Some(EXPECTED_ERROR), "rank {r}:\n{}", o.output);
        assert!(
            o.output.contains("ranks disagree"),
            "rank {r}:\n{}",
            o.output
        );
        assert!(
            o.output.contains("all_reduce_sum of 15 f64"),
            "rank {r}:\n{}",
            o.output
        );
    }
}

#[test]
fn wrong_token_is_refused() {
    let out = run_workers(
        2,
        "equivalence",
        |r| {
            let t = if r == 1 { "intruder" } else { "test-token" };
            vec![("SYNCBN_TOKEN", t.to_string()), (BATCHES, "2,2".into())]
        },
        &all(2),
        Duration::from_secs(30),
    );
    assert_eq!(out[1].code, Some(EXPECTED_ERROR), "{}", out[1].output);
    assert!(
        out[1].output.contains("wrong job token"),
        "{}",
        out[1].output
    );
    assert_eq!(out[0].code, Some(EXPECTED_ERROR), "{}", out[0].output);
    assert!(out[0].output.contains("did not join"), "{}", out[0].output);
}

#[test]
fn launcher_stops_the_others_when_a_rank_fails() {
    let mut cfg = LaunchConfig::new(2, std::env::current_exe().unwrap(), worker_args());
    cfg.envs = vec![(SCENARIO.into(), "fail-rank-1".into())];
    let start = Instant::now();
    assert_eq!(launch(&cfg).unwrap(), 3);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
}
