#!/usr/bin/env python3
"""Times PyTorch's batch normalization on the shapes of `examples/bench.rs` and
prints the ratios against candle-syncbn's numbers from the same machine.

    cargo run --release --example bench -- --json ours.json          # CPU
    python3 benches/pytorch_bench.py --ours ours.json

    cargo run --release --features cuda --example bench -- --device cuda --json ours.json
    python3 benches/pytorch_bench.py --device cuda --ours ours.json

CPU: `torch.nn.BatchNorm{1,2,3}d` in training mode, forward and backward through
autograd (seeded with ones, as our benchmark does), and an eval forward. This
runs the two sides one after the other, a quick look: the CPU tables of
docs/performance.md come from `benches/compare_cpu.py`, which times the same
calls (`TorchCase`) in alternation with ours.

Every autograd step does what a training loop does: gradients reset before
the backward (`x.grad = None`, `zero_grad(set_to_none=True)`), and freed with
the outputs inside the timed call (`TorchCase`).

CUDA (world size 1): the kernels of `torch.nn.SyncBatchNorm` — forward
`batch_norm_stats` + `batch_norm_gather_stats_with_counts` + `batch_norm_elemt`,
backward `batch_norm_backward_reduce` + `batch_norm_backward_elemt` — and
cuDNN's BatchNorm (`torch.nn.BatchNorm{1,2,3}d`, training) forward + backward
through autograd, seeded with a tensor of ones made once (our kernels get
theirs made once too).

Ratios are PyTorch time / our time: above 1 means candle-syncbn is faster.
CPU compares whole training steps (ours includes candle's autograd
bookkeeping), and PyTorch's whole step against our kernels alone (`fwd` +
`bwd ops`), with candle's bookkeeping for one op of that shape printed beside
it: the part of our step that no kernel of ours can remove. CUDA compares the
kernels (our `fwd` + `bwd ops`).

With `--relu` (and our JSON from `bench -- --relu`), a second table times
`relu(bn(x))` and `relu(bn(x) + z)` as whole training steps through autograd
(on CUDA with cuDNN's BatchNorm), against our fused `forward_relu_t` and
`forward_add_relu_t` steps.

Set the same allocator environment for both runs when comparing (glibc's
`MALLOC_*` variables apply to the Python process as they do to ours).
"""
import argparse
import copy
import json
import math
import statistics
import time

import torch

SUITE = "32x64x112x112,32x256x56x56,32x512x28x28,32x1024x14x14,32x2048x7x7,4096x1024,2x64x16x56x56"
DTYPES = {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16, "bf16": torch.bfloat16}


def timed(fn, device, iters):
    """Median seconds of `iters` calls after one warm-up."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def bn_module(shape, dtype, device):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[len(shape)]
    # Half inputs with f32 parameters, as under autocast (and as our benchmark).
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return cls(shape[1]).to(device=device, dtype=param_dtype)


class TorchCase:
    """PyTorch's side of one case: BatchNorm{1,2,3}d over a standard-normal
    input (and, with `relu`, a residual `z`, trained too). Each method is one
    call as a training loop makes it: the gradients of the input, the residual
    and the parameters are reset before the backward (`set_to_none`, what
    `zero_grad()` does by default), so no call adds to the last one's, and
    they are freed, with the outputs, before the call returns (our benchmark
    drops its `GradStore` inside the timing too). The backward's seed of ones
    is made in each call, as candle's `backward()` makes it, unless
    `fixed_seed` (the GPU's comparison with our kernels, which get theirs
    made once)."""

    def __init__(self, shape, dtype, device="cpu", relu=False, fixed_seed=False):
        def randn():
            return torch.randn(shape, device=device, dtype=torch.float32).to(dtype).requires_grad_(True)

        self.x = randn()
        self.z = randn() if relu else None
        bn = bn_module(shape, dtype, device)
        if device == "cpu" and dtype in (torch.float16, torch.bfloat16):
            bn = bn.to(dtype)  # PyTorch's CPU BatchNorm wants matching dtypes
        self.bn = bn.train()
        self.bn_eval = copy.deepcopy(bn).eval()
        self.seed = torch.ones_like(self.x) if fixed_seed else None

    def _free_grads(self):
        self.x.grad = None
        if self.z is not None:
            self.z.grad = None
        self.bn.zero_grad(set_to_none=True)

    def _backward(self, y):
        self._free_grads()
        y.backward(self.seed if self.seed is not None else torch.ones_like(y))
        self._free_grads()

    def step(self):
        """Training forward, then backward through autograd, seeded with ones."""
        self._backward(self.bn(self.x))

    def relu_step(self):
        """The same for `relu(bn(x))`."""
        self._backward(torch.relu(self.bn(self.x)))

    def add_relu_step(self):
        """The same for `relu(bn(x) + z)`."""
        self._backward(torch.relu(self.bn(self.x) + self.z))

    def fwd(self):
        """A training forward without autograd."""
        with torch.no_grad():
            self.bn(self.x)

    def eval(self):
        """An eval forward."""
        with torch.no_grad():
            self.bn_eval(self.x)


def cpu_row(shape, dtype, iters):
    case = TorchCase(shape, dtype)
    return {
        "step_ms": timed(case.step, "cpu", iters) * 1e3,
        "fwd_ms": timed(case.fwd, "cpu", iters) * 1e3,
        "eval_ms": timed(case.eval, "cpu", iters) * 1e3,
    }


def relu_steps(shape, dtype, device, iters):
    """Seconds of training steps through autograd (cuDNN on CUDA) of
    relu(bn(x)) and of relu(bn(x) + z), z trained too."""
    case = TorchCase(shape, dtype, device, relu=True)
    return timed(case.relu_step, device, iters), timed(case.add_relu_step, device, iters)


def cuda_row(shape, dtype, iters):
    dev = "cuda"
    x = torch.randn(shape, device=dev, dtype=torch.float32).to(dtype)
    dy = torch.ones_like(x)
    c = shape[1]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.ones(c, device=dev, dtype=pdt)
    bias = torch.zeros(c, device=dev, dtype=pdt)
    running_mean = torch.zeros(c, device=dev, dtype=pdt)
    running_var = torch.ones(c, device=dev, dtype=pdt)
    count = x.numel() // c
    counts = torch.full((1,), count, device=dev, dtype=pdt)
    eps, momentum = 1e-5, 0.1

    def sync_fwd():
        mean, invstd = torch.batch_norm_stats(x, eps)
        mean_all, invstd_all = torch.batch_norm_gather_stats_with_counts(
            x, mean.unsqueeze(0), invstd.unsqueeze(0), running_mean, running_var, momentum, eps, counts
        )
        return torch.batch_norm_elemt(x, weight, bias, mean_all, invstd_all, eps), mean_all, invstd_all

    _, mean_all, invstd_all = sync_fwd()

    def sync_bwd():
        sum_dy, sum_dy_xmu, gw, gb = torch.batch_norm_backward_reduce(dy, x, mean_all, invstd_all, weight, True, True, True)
        return torch.batch_norm_backward_elemt(dy, x, mean_all, invstd_all, weight, sum_dy, sum_dy_xmu, counts.to(torch.int32))

    t_fwd = timed(sync_fwd, dev, iters)
    t_bwd = timed(sync_bwd, dev, iters)
    t_cudnn = timed(TorchCase(shape, dtype, dev, fixed_seed=True).step, dev, iters)
    return {"fwd_ms": t_fwd * 1e3, "bwd_ms": t_bwd * 1e3, "step_ms": (t_fwd + t_bwd) * 1e3, "cudnn_step_ms": t_cudnn * 1e3}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", default=SUITE)
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--ours", help="JSON written by `cargo run --release --example bench -- --json FILE`")
    ap.add_argument("--relu", action="store_true", help="also time relu(bn(x)) steps against our fused ones")
    args = ap.parse_args()

    ours = {}
    if args.ours:
        with open(args.ours) as f:
            for r in json.load(f):
                ours[(tuple(r["shape"]), r["dtype"])] = r
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, median of {args.iters}")
    if args.device == "cpu":
        print(f"{'shape dtype':<26} {'torch step':>10} {'ours step':>10} {'ratio':>6} | {'ours kern':>9} {'ratio':>6} {'bookkp':>7} | {'torch eval':>10} {'ours eval':>10} {'ratio':>6}")
    else:
        print(f"{'shape dtype':<26} {'sync fwd':>9} {'sync bwd':>9} {'ours f+b':>9} {'ratio':>6} | {'cudnn f+b':>9} {'ratio':>6}")
    ratios = []
    kernel_ratios = []
    relu_lines = []
    relu_ratios = []
    add_relu_ratios = []
    for s in args.shapes.split(","):
        shape = [int(d) for d in s.split("x")]
        for name in args.dtypes.split(","):
            dtype = DTYPES[name]
            label = f"{s} {name}"
            mine = ours.get((tuple(shape), name))
            if args.device == "cpu":
                r = cpu_row(shape, dtype, args.iters)
                if mine:
                    ratio = r["step_ms"] / mine["step_ms"]
                    ratios.append(ratio)
                    kernels = mine["fwd_ms"] + mine["bwd_ops_ms"]
                    kernel_ratios.append(r["step_ms"] / kernels)
                    book = mine.get("bookkeeping_ms")
                    book = f"{book:>7.3f}" if book is not None else f"{'-':>7}"
                    print(
                        f"{label:<26} {r['step_ms']:>10.3f} {mine['step_ms']:>10.3f} {ratio:>5.2f}x | "
                        f"{kernels:>9.3f} {r['step_ms'] / kernels:>5.2f}x {book} | "
                        f"{r['eval_ms']:>10.3f} {mine['eval_ms']:>10.3f} {r['eval_ms'] / mine['eval_ms']:>5.2f}x"
                    )
                else:
                    print(f"{label:<26} {r['step_ms']:>10.3f} {'-':>10} {'-':>6} | {'-':>9} {'-':>6} {'-':>7} | {r['eval_ms']:>10.3f} {'-':>10} {'-':>6}")
            else:
                r = cuda_row(shape, dtype, args.iters)
                if mine:
                    our_fb = mine["fwd_ms"] + mine["bwd_ops_ms"]
                    ratio = r["step_ms"] / our_fb
                    ratios.append(ratio)
                    print(f"{label:<26} {r['fwd_ms']:>9.3f} {r['bwd_ms']:>9.3f} {our_fb:>9.3f} {ratio:>5.2f}x | {r['cudnn_step_ms']:>9.3f} {r['cudnn_step_ms'] / our_fb:>5.2f}x")
                else:
                    print(f"{label:<26} {r['fwd_ms']:>9.3f} {r['bwd_ms']:>9.3f} {'-':>9} {'-':>6} | {r['cudnn_step_ms']:>9.3f} {'-':>6}")
            if args.relu:
                t, t_add = (v * 1e3 for v in relu_steps(shape, dtype, args.device, args.iters))
                fused = mine.get("relu_step_ms") if mine else None
                add_fused = mine.get("add_relu_step_ms") if mine else None
                if fused and add_fused:
                    relu_ratios.append(t / fused)
                    add_relu_ratios.append(t_add / add_fused)
                    relu_lines.append(
                        f"{label:<26} {t:>12.3f} {fused:>12.3f} {t / fused:>5.2f}x | "
                        f"{t_add:>14.3f} {add_fused:>12.3f} {t_add / add_fused:>5.2f}x"
                    )
                else:
                    relu_lines.append(f"{label:<26} {t:>12.3f} {'-':>12} {'-':>6} | {t_add:>14.3f} {'-':>12} {'-':>6}")
    def summary(name, rs):
        geo = math.exp(sum(math.log(r) for r in rs) / len(rs))
        print(f"{name}: geometric mean of PyTorch / ours {geo:.2f}x, worst {min(rs):.2f}x")

    if ratios:
        summary("whole step" if args.device == "cpu" else "kernels", ratios)
    if kernel_ratios:
        summary("PyTorch's step / our kernels", kernel_ratios)
    if relu_lines:
        print()
        print("training steps, ms:")
        print(
            f"{'shape dtype':<26} {'relu(bn(x))':>12} {'ours fused':>12} {'ratio':>6} | "
            f"{'relu(bn(x)+z)':>14} {'ours fused':>12} {'ratio':>6}"
        )
        for line in relu_lines:
            print(line)
    if relu_ratios:
        summary("relu(bn(x)) step", relu_ratios)
        summary("relu(bn(x) + z) step", add_relu_ratios)


if __name__ == "__main__":
    main()
