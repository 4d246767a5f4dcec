//! The training example, end to end: 2 ranks launched by the example itself,
//! a few steps on a small synthetic dataset, checkpoint saved and reloaded.

use std::path::PathBuf;
use std::process::Command;

/// `target/<profile>/examples/train`, built by `cargo test` with the tests.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap();
    profile_dir
        .join("examples")
        .join(format!("train{}", std::env::consts::EXE_SUFFIX))
}

#[test]
fn train_example_runs_end_to_end() {
    let bin = example_binary();
    assert!(
        bin.exists(),
        "{bin:?} is missing: run `cargo test` (it builds the examples)"
    );
    let dir = std::env::temp_dir().join(format!("syncbn-train-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ckpt = dir.join("ckpt.safetensors");
    let out = Command::new(&bin)
        .args(["--nproc-per-node", "2", "--epochs", "1", "--max-steps", "4"])
        .args([
            "--train-size",
            "256",
            "--test-size",
            "64",
            "--batch-size",
            "16",
        ])
        .arg("--checkpoint")
        .arg(&ckpt)
        .env("SYNCBN_TIMEOUT", "60")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
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
    let _ = std::fs::remove_dir_all(&dir);
}
