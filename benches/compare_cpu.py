#!/usr/bin/env python3
"""The CPU tables of docs/performance.md: candle-syncbn against PyTorch (and
candle-nn), the two sides timed in alternation, repetition by repetition.

    cargo build --release --example bench
    python3 benches/compare_cpu.py                                # glibc's default allocator policy
    python3 benches/compare_cpu.py --keep-freed-memory --relu     # freed memory kept, + ReLU steps
    # with the candle-core that accumulates gradients in place as a third side:
    bash scripts/with-patched-candle.sh build --release --example bench
    python3 benches/compare_cpu.py --keep-freed-memory --relu \\
        --in-place target/patched-candle/release/examples/bench

`benches/measure_cpu_tables.sh` runs all of them.

How. Ours runs as a long-lived `bench --serve` process (examples/bench/serve.rs)
that times one call per request, inside the process, as the table mode does;
PyTorch runs in this process (`TorchCase` of benches/pytorch_bench.py). Only
one side works at a time: the other waits on a pipe. In each repetition every
measurement of a row is timed once, each call after `--warm` untimed calls of
the same work, so that caches and allocator meet it as in back-to-back steps
and the other side's threads have gone idle. The measurements compared (our
step and PyTorch's, our eval and PyTorch's, our fused ReLU steps and
PyTorch's) run back to back, in an order that rotates from repetition to
repetition, and a ratio is computed per repetition from that pair's two calls:
drift of the machine (this one's copy bandwidth swings by up to 2x between
runs) hits both sides of a ratio alike. candle-nn's steps take ten times ours:
they are timed in the first `--nn-reps` repetitions only, the first after
`--warm` untimed calls, the others after none.

A cell gives the median over the repetitions and, in brackets, the min and
max, in ms; a "per pair" ratio is the median of the per-repetition ratios
(PyTorch / ours: above 1 means we are faster) and their min and max. Other
ratios divide medians.

What each call does, on both sides: a step is a training forward, then a
backward through autograd seeded with ones made in the call; its outputs and
gradients are freed before its timing ends (ours drops the `GradStore`;
PyTorch's gradients are reset with `x.grad = None` and
`zero_grad(set_to_none=True)` before the backward and again after it, so no
step accumulates into the last one's gradient). PyTorch's BatchNorm has
parameters in the input's dtype for bf16 (its CPU kernel wants them so), ours
f32. `--keep-freed-memory` gives ours `keep_freed_memory(&Device::Cpu)` and this
process glibc's equivalent variables (it restarts itself with them).
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

KEEP_MEMORY_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "18446744073709551615",
    "MALLOC_TOP_PAD_": "67108864",
    "MALLOC_ARENA_MAX": "1",
}


class Ours:
    """A `bench --serve` process."""

    def __init__(self, binary, keep_memory):
        # Ours sets its policy with mallopt; glibc's variables stay ours-free.
        env = {k: v for k, v in os.environ.items() if k not in KEEP_MEMORY_ENV}
        args = [binary, "--serve"] + (["--keep-freed-memory"] if keep_memory else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = json.loads(self._line())

    def _line(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench --serve ended (exit status {self.proc.wait()})")
        return line.strip()

    def request(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self._line()
        if answer.startswith("error"):
            raise RuntimeError(f"bench --serve: {line}: {answer}")
        return answer

    def case(self, shape, dtype, nn, relu):
        self.request(f"case {shape} {dtype}" + (" nn" if nn else "") + (" relu" if relu else ""))

    def time(self, work, warm, n=1):
        return [float(s) for s in self.request(f"time {work} {warm} {n}").split()]

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


class Torch:
    """PyTorch in this process."""

    def __init__(self):
        import torch

        import pytorch_bench

        self.torch = torch
        self.cases = pytorch_bench
        self.current = None

    def case(self, shape, dtype, nn, relu):
        self.current = None  # the previous case's tensors go first
        dims = [int(d) for d in shape.split("x")]
        self.current = self.cases.TorchCase(dims, self.cases.DTYPES[dtype], "cpu", relu=relu)

    def time(self, work, warm, n=1):
        fn = getattr(self.current, work)
        for _ in range(warm):
            fn()
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out


def plan(args):
    """Groups of (side, measurement) of one repetition; a group's members run
    back to back and are the pairs of the ratios. The second list: the
    candle-nn groups (first `--nn-reps` repetitions only)."""
    inplace = ["inplace"] if args.in_place else []
    groups = [[("ours", "fwd")], [("ours", "bwd_ops")], [("ours", "bookkeeping")]]
    groups.append([("ours", "step"), ("torch", "step")] + [(s, "step") for s in inplace])
    groups.append([("ours", "eval"), ("torch", "eval")])
    nn = [[("ours", "nn_step")]] + [[(s, "nn_step")] for s in inplace]
    if args.relu:
        groups.append([("ours", "relu_step"), ("torch", "relu_step")] + [(s, "relu_step") for s in inplace])
        groups += [[("ours", "relu_bwd_ops")], [("ours", "relu_bwd_ops_mask_pass")]]
        groups += [[(s, "bn_then_relu_step")] for s in ["ours"] + inplace]
        groups.append([("ours", "add_relu_step"), ("torch", "add_relu_step")] + [(s, "add_relu_step") for s in inplace])
        groups += [[(s, "bn_add_relu_step")] for s in ["ours"] + inplace]
        nn += [[("ours", "nn_relu_step")], [("ours", "nn_add_relu_step")]]
    if args.no_candle_nn:
        nn = []
    return groups, nn


def measure_row(sides, shape, dtype, args):
    """Samples (seconds, in repetition order) of every measurement of a row."""
    groups, nn_groups = plan(args)
    for name, side in sides.items():
        side.case(shape, dtype, nn=not args.no_candle_nn and name != "torch", relu=args.relu)
    samples = {}
    # The copy baseline: the best of 3 per repetition, a ceiling, so that a
    # noisy run does not flatter the kernels.
    samples[("ours", "copy")] = sides["ours"].time("copy", 1, 3 * args.reps)
    for rep in range(args.reps):
        todo = groups + (nn_groups if rep < args.nn_reps else [])
        for group in todo:
            k = rep % len(group)
            for side, work in group[k:] + group[:k]:
                warm = 0 if (side, work) in samples and work.startswith("nn_") else args.warm
                samples.setdefault((side, work), []).extend(sides[side].time(work, warm))
    return samples


def ms(v):
    v *= 1e3
    return f"{v:.0f}" if v >= 1000 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def cell(s, bold=False):
    med = ms(statistics.median(s))
    med = f"**{med}**" if bold else med
    return f"{med} ({ms(min(s))}–{ms(max(s))})"


def pair_ratios(num, den):
    return [a / b for a, b in zip(num, den)]


def ratio_cell(rs):
    return f"{statistics.median(rs):.2f}× ({min(rs):.2f}–{max(rs):.2f})"


def over(a, b):
    """Median of `a` over median of `b`."""
    return statistics.median(a) / statistics.median(b)


def versus(a, base):
    """A cell, and its median over `base`'s."""
    return f"{cell(a)}, {over(a, base):.2f}×"


def geo(rs):
    return math.exp(sum(math.log(r) for r in rs) / len(rs))


class Tables:
    """The markdown tables, row by row, and the per-pair ratio summaries."""

    def __init__(self, args):
        self.args = args
        self.rows = {"step": [], "relu": [], "inplace": [], "inplace_relu": []}
        self.ratios = {}

    def note(self, name, rs):
        self.ratios.setdefault(name, []).append(statistics.median(rs))

    def add(self, label, s):
        a = self.args
        copy = min(s[("ours", "copy")])
        pct = lambda work, passes: f"{100 * passes * copy / (2 * statistics.median(s[('ours', work)])):.0f}%"
        step_pairs = pair_ratios(s[("torch", "step")], s[("ours", "step")])
        eval_pairs = pair_ratios(s[("torch", "eval")], s[("ours", "eval")])
        self.note("PyTorch step / our step", step_pairs)
        self.note("PyTorch eval / our eval", eval_pairs)
        kernels = statistics.median(s[("ours", "fwd")]) + statistics.median(s[("ours", "bwd_ops")])
        self.note("PyTorch step / our kernels", [statistics.median(s[("torch", "step")]) / kernels])
        nn = "-" if a.no_candle_nn else f"{cell(s[('ours', 'nn_step')])}, {over(s[('ours', 'nn_step')], s[('ours', 'step')]):.1f}×"
        self.rows["step"].append(
            [
                label,
                f"{cell(s[('ours', 'fwd')])}, {pct('fwd', 3)}",
                f"{cell(s[('ours', 'bwd_ops')])}, {pct('bwd_ops', 5)}",
                f"{cell(s[('ours', 'eval')])}, {pct('eval', 2)}",
                cell(s[("ours", "bookkeeping")]),
                cell(s[("ours", "step")], bold=True),
                nn,
                cell(s[("torch", "step")]),
                ratio_cell(step_pairs),
                f"{statistics.median(s[('torch', 'step')]) / kernels:.2f}×",
                cell(s[("torch", "eval")]),
                ratio_cell(eval_pairs),
            ]
        )
        if a.relu:
            self.add_relu(label, s)
        if a.in_place:
            self.add_in_place(label, s, kernels)

    def fused_steps(self, s, side, name):
        """`side`'s fused steps and PyTorch's per-pair ratios against them."""
        fused, add_fused = s[(side, "relu_step")], s[(side, "add_relu_step")]
        relu_pairs = pair_ratios(s[("torch", "relu_step")], fused)
        add_pairs = pair_ratios(s[("torch", "add_relu_step")], add_fused)
        self.note(f"PyTorch relu(bn) / {name}", relu_pairs)
        self.note(f"PyTorch relu(bn + z) / {name}", add_pairs)
        return fused, add_fused, relu_pairs, add_pairs

    def add_relu(self, label, s):
        a = self.args
        fused, add_fused, relu_pairs, add_pairs = self.fused_steps(s, "ours", "our fused")
        vs = lambda key, base: versus(s[key], base)
        nn = lambda work, base: "-" if a.no_candle_nn else vs(("ours", work), base)
        mask = s[("ours", "relu_bwd_ops")]
        self.rows["relu"].append(
            [
                label,
                cell(fused, bold=True),
                cell(mask),
                vs(("ours", "relu_bwd_ops_mask_pass"), mask),
                vs(("ours", "bn_then_relu_step"), fused),
                nn("nn_relu_step", fused),
                cell(s[("torch", "relu_step")]),
                ratio_cell(relu_pairs),
                cell(add_fused, bold=True),
                vs(("ours", "bn_add_relu_step"), add_fused),
                nn("nn_add_relu_step", add_fused),
                cell(s[("torch", "add_relu_step")]),
                ratio_cell(add_pairs),
            ]
        )

    def add_in_place(self, label, s, kernels):
        a = self.args
        step = s[("inplace", "step")]
        pairs = pair_ratios(s[("torch", "step")], step)
        released_pairs = pair_ratios(s[("torch", "step")], s[("ours", "step")])
        self.note("PyTorch step / our in-place step", pairs)
        nn = "-"
        if not a.no_candle_nn:
            nn_in_place = s[("inplace", "nn_step")]
            nn = f"{ms(statistics.median(s[('ours', 'nn_step')]))} / {cell(nn_in_place)}, {over(nn_in_place, step):.1f}×"
        self.rows["inplace"].append(
            [
                label,
                ms(kernels),
                cell(s[("ours", "step")]),
                cell(step, bold=True),
                cell(s[("torch", "step")]),
                ratio_cell(pairs),
                ratio_cell(released_pairs),
                nn,
            ]
        )
        if a.relu:
            fused, add_fused, relu_pairs, add_pairs = self.fused_steps(s, "inplace", "our in-place fused")
            self.rows["inplace_relu"].append(
                [
                    label,
                    cell(fused, bold=True),
                    versus(s[("inplace", "bn_then_relu_step")], fused),
                    ratio_cell(relu_pairs),
                    cell(add_fused, bold=True),
                    versus(s[("inplace", "bn_add_relu_step")], add_fused),
                    ratio_cell(add_pairs),
                ]
            )

    HEADERS = {
        "step": [
            "shape, dtype",
            "fwd, % of copy",
            "bwd ops, %",
            "eval, %",
            "bookkp",
            "step",
            "candle-nn step, ÷ step",
            "PyTorch step",
            "PyTorch ÷ our step, per pair",
            "PyTorch step ÷ our kernels",
            "PyTorch eval",
            "PyTorch ÷ our eval, per pair",
        ],
        "relu": [
            "shape, dtype",
            "relu(bn) fused",
            "bwd ops, mask in passes",
            "mask pass first, ÷ in passes",
            "bn, relu, ÷ fused",
            "candle-nn bn, relu, ÷ fused",
            "PyTorch relu(bn)",
            "PyTorch ÷ fused, per pair",
            "relu(bn + z) fused",
            "bn, + z, relu, ÷ fused",
            "candle-nn, ÷ fused",
            "PyTorch relu(bn + z)",
            "PyTorch ÷ fused, per pair",
        ],
        "inplace": [
            "shape, dtype",
            "kernels",
            "step, candle as released",
            "step, in-place gradients",
            "PyTorch step",
            "PyTorch ÷ in-place step, per pair",
            "PyTorch ÷ released step, per pair",
            "candle-nn step, released / in-place, ÷ in-place step",
        ],
        "inplace_relu": [
            "shape, dtype",
            "relu(bn) fused, in-place",
            "bn, relu, ÷ fused",
            "PyTorch ÷ fused, per pair",
            "relu(bn + z) fused, in-place",
            "bn, + z, relu, ÷ fused",
            "PyTorch ÷ fused, per pair",
        ],
    }
    TITLES = {
        "step": "Steps, kernels and eval",
        "relu": "Batch norm + ReLU (+ residual) steps",
        "inplace": "Steps with candle-core's gradients accumulated in place",
        "inplace_relu": "Batch norm + ReLU (+ residual) steps with in-place gradients (PyTorch's times: the table above)",
    }

    def print(self, out):
        for name, rows in self.rows.items():
            if not rows:
                continue
            head = self.HEADERS[name]
            print(f"\n{self.TITLES[name]}, ms, median (min–max) of {self.args.reps} repetitions:\n", file=out)
            print("| " + " | ".join(head) + " |", file=out)
            print("|---" + "|---:" * (len(head) - 1) + "|", file=out)
            for row in rows:
                print("| " + " | ".join(row) + " |", file=out)
        print(file=out)
        for name, rs in self.ratios.items():
            faster = sum(r > 1 for r in rs)
            print(
                f"- {name} (median per row): {min(rs):.2f}–{max(rs):.2f}×, geometric mean {geo(rs):.2f}×, "
                f"above 1 on {faster} of {len(rs)} rows",
                file=out,
            )


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--bin", default=os.path.join(here, "..", "target", "release", "examples", "bench"), help="our bench binary (built with candle as released)")
    ap.add_argument("--in-place", metavar="BIN", help="also time a bench binary built against the in-place candle-core (scripts/with-patched-candle.sh)")
    ap.add_argument("--shapes", default="32x64x112x112,32x256x56x56,32x512x28x28,32x1024x14x14,32x2048x7x7,4096x1024,2x64x16x56x56")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--reps", type=int, default=11, help="timed repetitions per measurement")
    ap.add_argument("--warm", type=int, default=1, help="untimed calls before each timed one")
    ap.add_argument("--nn-reps", type=int, default=3, help="repetitions of candle-nn's steps")
    ap.add_argument("--no-candle-nn", action="store_true")
    ap.add_argument("--relu", action="store_true", help="also the batch norm + ReLU (+ residual) steps")
    ap.add_argument("--keep-freed-memory", action="store_true", help="freed memory kept, both sides")
    ap.add_argument("--json", help="write every sample (seconds) to this file")
    args = ap.parse_args()
    if args.keep_freed_memory and any(os.environ.get(k) != v for k, v in KEEP_MEMORY_ENV.items()):
        # glibc reads its variables when the process starts.
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **KEEP_MEMORY_ENV})
    if not args.keep_freed_memory and any(k in os.environ for k in KEEP_MEMORY_ENV):
        sys.exit("glibc's MALLOC_* variables are set: unset them, or pass --keep-freed-memory")
    sys.path.insert(0, here)
    torch_side = Torch()
    sides = {"ours": Ours(args.bin, args.keep_freed_memory), "torch": torch_side}
    if args.in_place:
        sides["inplace"] = Ours(args.in_place, args.keep_freed_memory)
        if not sides["inplace"].info["candle_in_place"]:
            sys.exit(f"{args.in_place}: not built against the in-place candle-core")
    if sides["ours"].info["candle_in_place"]:
        sys.exit(f"{args.bin}: built against the in-place candle-core; --bin wants candle as released")
    torch = torch_side.torch
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_model()}, {os.cpu_count()} CPUs; "
        f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads), ours {sides['ours'].info['threads']} threads; "
        f"allocator: {'freed memory kept' if args.keep_freed_memory else 'glibc default'}; "
        f"{args.reps} repetitions, {args.warm} untimed call(s) before each timed one, candle-nn {args.nn_reps}",
        flush=True,
    )
    tables = Tables(args)
    record = []
    start = time.monotonic()
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            label = f"{shape} {dtype}"
            s = measure_row(sides, shape, dtype, args)
            tables.add(label, s)
            record.append({"shape": shape, "dtype": dtype, "samples": {f"{k[0]} {k[1]}": v for k, v in s.items()}})
            print(f"{label}: done at {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    for name, side in sides.items():
        if name != "torch":
            side.close()
    tables.print(sys.stdout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": record}, f, indent=1)


if __name__ == "__main__":
    main()
