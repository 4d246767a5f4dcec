#!/usr/bin/env python3
"""Precise BN statistics of candle-syncbn against fvcore's update_bn_stats.

The same model, weights and batches on both sides:

- torchvision's resnet18 with random weights (torch.manual_seed; the
  BatchNorm weights and biases randomized too), saved with torch.save;
- K fixed batches of (N, 3, H, W) (default 4 of (8, 3, 64, 64)), saved to a
  safetensors file both sides read;
- fvcore: ``fvcore.nn.update_bn_stats`` in float32 on the CPU (today's
  ``_PopulationVarianceEstimator``), and once more with its older
  ``_MeanOfBatchVarianceEstimator`` swapped in;
- candle: ``examples/precise_bn_vs_fvcore.rs`` (every BatchNorm a
  SyncBatchNorm, the checkpoint loaded with the crate's ``load_checkpoint``)
  on 1 rank and on 2 in-process ranks each holding half of every batch, with
  ``Estimator::Population`` and ``Estimator::MeanOfBatchVariances``.

Prints, per estimator and rank count, the worst relative error of every
layer's running mean and running variance against fvcore and the layer where
it occurs, and fails (exit 1) above ``--rtol`` (default 1e-4).

Run from the repository root, in a Python with torch, torchvision and fvcore:

    python benches/precise_bn_vs_fvcore.py [--work-dir DIR] [--seed 0]
"""

import argparse
import copy
import json
import os
import struct
import subprocess
import sys
import tempfile

import torch
import torchvision
from fvcore.nn import precise_bn


def save_safetensors(tensors, path):
    """Writes float32 tensors in the safetensors format (no extra package)."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().contiguous().to(torch.float32).numpy().tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


def load_safetensors(path):
    """Reads the float32 tensors of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        a, b = info["data_offsets"]
        out[name] = torch.frombuffer(bytearray(data[a:b]), dtype=torch.float32).reshape(
            info["shape"]
        )
    return out


def running_stats(model):
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.endswith(".running_mean") or k.endswith(".running_var")
    }


def fvcore_stats(model, batches, estimator):
    """fvcore's update_bn_stats on a copy of `model`, with `estimator`."""
    model = copy.deepcopy(model).train()
    saved = precise_bn._PopulationVarianceEstimator
    precise_bn._PopulationVarianceEstimator = estimator
    try:
        precise_bn.update_bn_stats(model, list(batches), num_iters=len(batches))
    finally:
        precise_bn._PopulationVarianceEstimator = saved
    return running_stats(model)


def worst(got, want):
    """The worst error of every layer's statistics, as {kind: (error, layer)}:

    - ``running_var``: element-wise ``|got - want| / |want|``;
    - ``running_mean``: element-wise ``|got - want| / max(|want|, std)``,
      with ``std = sqrt(want running_var)``: relative to the channel's
      scale, since a mean near 0 (|mean| = 4e-5 beside std 0.8 in layer4 of
      this model) has no meaningful relative error in float32 (fvcore's own
      float32 result differs from its float64 one there by 7e-3);
    - ``running_mean (plain)``: element-wise ``|got - want| / |want|``, for
      the record.
    """
    out = {"running_mean": (0.0, ""), "running_var": (0.0, ""), "running_mean (plain)": (0.0, "")}

    def keep(kind, err, layer):
        if not err <= out[kind][0]:
            out[kind] = (err, layer)

    for name, w in want.items():
        if not name.endswith(".running_mean"):
            continue
        layer = name[: -len(".running_mean")]
        m, v = w.double(), want[layer + ".running_var"].double()
        gm, gv = got[name].double(), got[layer + ".running_var"].double()
        keep("running_var", ((gv - v).abs() / v.abs()).max().item(), layer)
        scale = torch.maximum(m.abs(), v.sqrt())
        keep("running_mean", ((gm - m).abs() / scale).max().item(), layer)
        keep("running_mean (plain)", ((gm - m).abs() / m.abs()).max().item(), layer)
    return out


def print_errors(what, errors, rtol):
    """Prints `errors` (see `worst`); returns whether one is above `rtol`."""
    failed = False
    for kind, (err, layer) in errors.items():
        judged = kind in ("running_mean", "running_var")
        above = judged and not err <= rtol
        failed |= above
        print(f"{what} {kind:20}: worst {err:.2e} ({layer}){'  ABOVE ' + str(rtol) if above else ''}")
    return failed


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument(
        "--candle",
        default="cargo run --release --quiet --example precise_bn_vs_fvcore --",
        help="the command that runs the candle side",
    )
    args = p.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="precise-bn-vs-fvcore-")
    os.makedirs(work, exist_ok=True)

    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    weights = os.path.join(work, "resnet18.pth")
    torch.save(model.state_dict(), weights)
    n, s = args.batch_size, args.image_size
    # Batches that differ in mean and spread, as the batches of a data set do.
    batches = torch.stack(
        [
            torch.randn(n, 3, s, s) * (1.0 + 0.1 * i) + 0.1 * i
            for i in range(args.batches)
        ]
    )
    batches_path = os.path.join(work, "batches.safetensors")
    save_safetensors({"batches": batches}, batches_path)

    want = {
        "population": fvcore_stats(model, batches, precise_bn._PopulationVarianceEstimator),
        "mean-of-batch-variances": fvcore_stats(
            model, batches, precise_bn._MeanOfBatchVarianceEstimator
        ),
    }
    failed = False
    print(
        f"resnet18 (torch.manual_seed({args.seed})), {args.batches} batches of "
        f"({n}, 3, {s}, {s}), fvcore {precise_bn.__file__}"
    )
    for estimator, fv in want.items():
        out = os.path.join(work, estimator)
        cmd = args.candle.split() + [
            "--weights", weights,
            "--batches", batches_path,
            "--out-dir", out,
            "--ranks", "1,2",
            "--estimator", estimator,
        ]
        subprocess.run(cmd, check=True)
        for ranks in (1, 2):
            got = load_safetensors(os.path.join(out, f"candle_ranks{ranks}.safetensors"))
            assert set(got) == set(fv), sorted(set(got) ^ set(fv))
            failed |= print_errors(f"candle {estimator:23} {ranks} rank(s)", worst(got, fv), args.rtol)
    # fvcore's own float32 rounding: fvcore in float64 against float32.
    fv64 = fvcore_stats(model.double(), batches.double(), precise_bn._PopulationVarianceEstimator)
    print_errors("fvcore float32 against fvcore float64    ", worst(want["population"], fv64), float("inf"))
    # How far apart the two estimators are (fvcore's numbers).
    print_errors(
        "fvcore's mean of batch variances against its population",
        worst(want["mean-of-batch-variances"], want["population"]),
        float("inf"),
    )
    print(f"files in {work}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
