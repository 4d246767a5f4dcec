//! The training example, end to end: 2 ranks launched by the example itself,
//! a few steps on a small synthetic dataset, checkpoint saved and reloaded.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `target/<profile>/examples/train`, built by `cargo test` with the tests.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap();
    profile_dir
        .join("examples")
        .join(format!("train{}", std::env::consts::EXE_SUFFIX))
}

/// Runs the example on 2 ranks for 4 steps, writing `ckpt`; returns whether
/// it succeeded and its stdout and stderr.
fn train(ckpt: &Path) -> (bool, String) {
    train_with(ckpt, &["--nproc-per-node", "2"])
}

/// [`train`] with other arguments (`--nproc-per-node` among them).
fn train_with(ckpt: &Path, extra: &[&str]) -> (bool, String) {
    let bin = example_binary();
    assert!(
        bin.exists(),
        "{bin:?} is missing: run `cargo test` (it builds the examples)"
    );
    let out = Command::new(&bin)
        .args(extra)
        .args(["--epochs", "1", "--max-steps", "4"])
        .args([
            "--train-size",
            "256",
            "--test-size",
            "64",
            "--batch-size",
            "16",
        ])
        .arg("--checkpoint")
        .arg(ckpt)
        .env("SYNCBN_TIMEOUT", "60")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A scratch directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("syncbn-train-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `--seed` fixes everything, the initial weights included (drawn by the
/// example, since candle cannot seed its CPU generator): two runs write the
/// same checkpoint, byte for byte.
#[test]
fn train_example_is_reproducible() {
    let dir = Scratch::new("repro");
    let (a, b) = (dir.0.join("a.safetensors"), dir.0.join("b.safetensors"));
    for ckpt in [&a, &b] {
        let (ok, text) = train(ckpt);
        assert!(ok, "{text}");
    }
    let (a, b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert!(
        !a.is_empty() && a == b,
        "two runs with the same seed differ"
    );
}

#[test]
fn train_example_runs_end_to_end() {
    let bin = example_binary();
    let dir = Scratch::new("e2e");
    let ckpt = dir.0.join("ckpt.safetensors");
    let (ok, text) = train(&ckpt);
    assert!(ok, "{text}");
    for needle in [
        "[rank 0] 2 rank(s)",
        "epoch 1/1: loss",
        "test accuracy",
        "running statistics identical on all 2 ranks: yes",
        "reloaded checkpoint",
        "same as before saving",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(ckpt.exists());
    // the eval path reloads the checkpoint on its own
    let out = Command::new(&bin)
        .args([
            "--nproc-per-node",
            "1",
            "--eval-only",
            "--test-size",
            "64",
            "--checkpoint",
        ])
        .arg(&ckpt)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains("test accuracy"),
        "{text}"
    );
}

/// `--bn-group-size 2` on 4 ranks: the layers synchronize within pairs and
/// the running statistics are identical within each pair
/// (tests/cpu/subgroups.rs checks the numbers); a size that does not divide
/// the world fails on every rank with a clear error, not a hang.
#[test]
fn train_example_synchronizes_within_blocks() {
    let dir = Scratch::new("blocks");
    let ckpt = dir.0.join("ckpt.safetensors");
    let (ok, text) = train_with(&ckpt, &["--nproc-per-node", "4", "--bn-group-size", "2"]);
    assert!(ok, "{text}");
    for needle in [
        "[rank 0] 4 rank(s)",
        "batch statistics synchronized within 2 blocks of 2 ranks",
        "running statistics identical within each block of 2 ranks: yes",
        "same as before saving",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let (ok, text) = train_with(&ckpt, &["--nproc-per-node", "4", "--bn-group-size", "3"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("group size 3 does not divide the world size 4"),
        "{text}"
    );
}

/// Runs the example with a valid small configuration in which `bad` replaces
/// the value of one argument; returns the exit code and stderr.
fn run_with_bad(bad: (&str, &str), dir: &Path) -> (Option<i32>, String) {
    let ckpt = dir.join("never-written.safetensors");
    let mut args: Vec<(&str, &str)> = vec![
        ("--nproc-per-node", "1"),
        ("--epochs", "1"),
        ("--max-steps", "1"),
        ("--train-size", "32"),
        ("--test-size", "8"),
        ("--batch-size", "8"),
        ("--lr", "0.001"),
        ("--checkpoint", ckpt.to_str().unwrap()),
    ];
    match args.iter_mut().find(|(k, _)| *k == bad.0) {
        Some(a) => *a = bad,
        None => args.push(bad),
    }
    let out = Command::new(example_binary())
        .args(args.iter().flat_map(|(k, v)| [*k, *v]))
        .env("SYNCBN_TIMEOUT", "20")
        .output()
        .unwrap();
    assert!(!ckpt.exists(), "{bad:?}: the example trained");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Out-of-range arguments are usage errors (clap's exit code 2) that name the
/// argument and what it expects, found before anything starts: no panic (a
/// batch size of 0 divided by zero), no misleading error after training (a
/// test size of 0 or a NaN learning rate made the reloaded checkpoint
/// "evaluate differently").
#[test]
fn train_example_rejects_bad_arguments() {
    let dir = Scratch::new("args");
    for (bad, expected) in [
        (
            ("--batch-size", "0"),
            "expected a whole number of at least 1",
        ),
        (
            ("--test-size", "0"),
            "expected a whole number of at least 1",
        ),
        (
            ("--train-size", "0"),
            "expected a whole number of at least 1",
        ),
        (("--epochs", "0"), "expected a whole number of at least 1"),
        (
            ("--max-steps", "0"),
            "expected a whole number of at least 1",
        ),
        (
            ("--bn-group-size", "0"),
            "expected a whole number of at least 1",
        ),
        (
            ("--nproc-per-node", "0"),
            "expected a whole number of at least 1",
        ),
        (
            ("--image-size", "3"),
            "expected a whole number of at least 4",
        ),
        (
            ("--batch-size", "-2"),
            "expected a whole number of at least 1",
        ),
        (("--lr", "nan"), "expected a finite number above 0"),
        (("--lr", "inf"), "expected a finite number above 0"),
        (("--lr", "0"), "expected a finite number above 0"),
        (("--lr", "-0.1"), "expected a finite number above 0"),
        (("--device", "gpu"), "[possible values: cpu, cuda, metal]"),
    ] {
        let (code, text) = run_with_bad(bad, &dir.0);
        let (arg, value) = bad;
        assert_eq!(code, Some(2), "{bad:?}:\n{text}");
        let head = format!("error: invalid value '{value}' for '{arg} <");
        assert!(
            text.contains(&head) && text.contains(expected),
            "{bad:?}: expected {head:?}… {expected:?} in:\n{text}"
        );
        assert!(!text.contains("panicked"), "{bad:?}:\n{text}");
    }
}

/// `--freeze-bn-prefix bn1 --precise-bn 4`: the first BatchNorm stays at its
/// initial statistics and parameters (frozen, not trained), the second gets
/// precise statistics after training, the accuracy is printed before and
/// after, and the checkpoint reloads to the same accuracy; too many precise
/// batches are a clear error.
#[test]
fn train_example_freezes_and_recomputes_statistics() {
    let dir = Scratch::new("frozen");
    let ckpt = dir.0.join("ckpt.safetensors");
    let args = [
        "--nproc-per-node",
        "2",
        "--freeze-bn-prefix",
        "bn1",
        "--precise-bn",
        "4",
    ];
    let (ok, text) = train_with(&ckpt, &args);
    assert!(ok, "{text}");
    for needle in [
        "precise BN over 4 global batches",
        "% before, ",
        "running statistics identical on all 2 ranks: yes",
        "same as before saving",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let saved = candle::safetensors::load(&ckpt, &candle::Device::Cpu).unwrap();
    let vals = |name: &str| -> Vec<f32> { saved[name].to_vec1::<f32>().unwrap() };
    for (name, init) in [
        ("bn1.weight", 1.0),
        ("bn1.bias", 0.0),
        ("bn1.running_mean", 0.0),
        ("bn1.running_var", 1.0),
    ] {
        assert!(vals(name).iter().all(|&v| v == init), "{name} changed");
    }
    assert!(
        vals("bn2.weight").iter().any(|&v| v != 1.0),
        "bn2 not trained"
    );
    assert!(vals("bn2.running_var").iter().any(|&v| v != 1.0));
    // The counter counts the 4 training steps, not the precise batches.
    let nbt = saved["bn2.num_batches_tracked"].to_scalar::<i64>().unwrap();
    assert_eq!(nbt, 4);
    let (ok, text) = train_with(&ckpt, &["--nproc-per-node", "2", "--precise-bn", "9"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("--precise-bn: expected 1 to 8 batches"),
        "{text}"
    );
}

/// `--nproc-per-node 100000` (which used to fork thousands of ranks before
/// a signal could stop it) is refused before any rank starts, naming the
/// bound and how to lift it; with `--device cuda` the bound is the visible
/// GPUs. Run under a process cap, so that a regression fails instead of
/// flooding the machine.
#[cfg(target_os = "linux")]
#[test]
fn train_example_refuses_more_ranks_than_the_machine_runs() {
    use crate::common::{capped, scratch_dir};
    use std::time::{Duration, Instant};
    if !capped::can_switch_user("train_example_refuses_more_ranks_than_the_machine_runs") {
        return;
    }
    let uid = capped::unused_uid(15);
    let dir = scratch_dir("train-nproc");
    let exe = capped::reachable_copy(&example_binary(), &dir, uid);
    for device in ["cpu", "cuda"] {
        let log = dir.join(format!("{device}.out"));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(&exe);
        cmd.args(["--nproc-per-node", "100000", "--device", device])
            .arg("--checkpoint")
            .arg(dir.join("never-written.safetensors"))
            .env_remove("SYNCBN_MAX_NPROC")
            .env("SYNCBN_TIMEOUT", "20")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        capped::run_capped(&mut cmd, uid, 24, &dir);
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{device}:\n{text}");
        assert!(
            text.contains("launcher: 100000 ranks requested (--nproc-per-node)")
                || device == "cuda"
                    && text.contains("launcher: CUDA ranks need a build with the `cuda` feature"),
            "{device}:\n{text}"
        );
        if device == "cpu" {
            assert!(
                text.contains("CPU rank(s) (8 per core)") && text.contains("SYNCBN_MAX_NPROC"),
                "{text}"
            );
        } else {
            assert!(text.contains("CUDA"), "{text}");
        }
        assert!(
            !text.contains("[rank "),
            "{device}: a rank started:\n{text}"
        );
    }
}
