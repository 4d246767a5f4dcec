#!/usr/bin/env python3
"""The data-parallel step of examples/train.rs on 2 CPU processes, with the
TCP group's all-reduces on rank 0's star (SYNCBN_RING_MIN_BYTES=off: the path
of every all-reduce before the ring), with the default threshold, and with
every all-reduce on the ring (SYNCBN_RING_MIN_BYTES=0).

Each round runs every configuration once (fresh processes, order alternating
from round to round): one epoch of --steps steps of the example's CNN on its
synthetic data, batch 32 per rank; the step time is rank 0's epoch time over
the steps (forward, backward, average_gradients, AdamW). Prints min/median/max
per configuration and, per round, the ratio star / configuration (> 1: faster
than the star).

    python3 benches/train_step.py                 # 3 rounds x 60 steps
    python3 benches/train_step.py --rounds 5 --steps 100
"""
import argparse, os, re, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"star (off)": "off", "default": None, "ring for all (0)": "0"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--example", "train"], check=True, cwd=ROOT)
    exe = os.path.join(ROOT, "target", "release", "examples", "train")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {os.uname().nodename}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}, {args.rounds} rounds x {args.steps} steps, ms per step")
    times = {k: [] for k in CONFIGS}
    ratios = {k: [] for k in CONFIGS if k != "star (off)"}
    for rnd in range(args.rounds):
        order = list(CONFIGS) if rnd % 2 == 0 else list(reversed(CONFIGS))
        got = {}
        for name in order:
            env = dict(os.environ)
            env.pop("SYNCBN_RING_MIN_BYTES", None)
            if CONFIGS[name] is not None:
                env["SYNCBN_RING_MIN_BYTES"] = CONFIGS[name]
            out = subprocess.run([exe, "--epochs", "1", "--max-steps", str(args.steps)],
                                 env=env, capture_output=True, text=True, timeout=900)
            m = re.search(r"epoch 1/1: .*\(([0-9.]+) s\)", out.stdout)
            if out.returncode != 0 or not m:
                sys.exit(f"{name}: the example failed:\n{out.stdout}\n{out.stderr}")
            got[name] = float(m.group(1)) * 1e3 / args.steps
            times[name].append(got[name])
        for k in ratios:
            ratios[k].append(got["star (off)"] / got[k])
    for name, ts in times.items():
        print(f"  {name:18s} {min(ts):7.1f} {statistics.median(ts):7.1f} {max(ts):7.1f}")
    for k, rs in ratios.items():
        print(f"  star/{k} per round: " + ", ".join(f"{r:.2f}x" for r in rs))


if __name__ == "__main__":
    main()
