#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything a GPU machine needs to run the
# CUDA tests, the benchmarks and the training example, into one folder that a
# GPU machine without a Rust toolchain can run (see docs/testing.md, "GPU machines"):
#
#   bash scripts/gpu-bundle.sh            # makes gpu-bundle/ (ignored by git)
#   # on the GPU machine, from the repository root:
#   bash gpu-bundle/run.sh "$OUT"         # results in $OUT
#
# gpu-bundle/ holds release binaries built with `--features cuda,nccl` for
# compute capability ${CUDA_COMPUTE_CAP:-90} (H100), stripped and xz-compressed
# (run.sh unpacks them with Python's lzma):
#   bin/cuda.xz     the CUDA tests (tests/cuda.rs)
#   bin/nccl.xz     the NCCL tests (tests/nccl.rs; run.sh's multigpu step, on 2+ GPUs)
#   bin/bench.xz    the benchmark table (examples/bench.rs)
#   bin/train.xz    the data-parallel training example (examples/train.rs)
#   run.sh          runs them on GPU 0 (and, with 2+ GPUs, the NCCL tests and
#                   the training example on all of them), and the PyTorch script
#   ncu_table.py    summarizes Nsight Compute's counters (run.sh's profile step)
# The binaries need the CUDA 13 runtime libraries (cuBLAS, cuRAND, NVRTC,
# cudart, NCCL) at run time; run.sh finds them in the nvidia-* wheels of the
# python3 on the GPU machine, and the driver provides libcuda.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTDIR="${GPU_BUNDLE_DIR:-gpu-bundle}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

eval "$(bash scripts/cuda-toolchain.sh)"

echo "[gpu-bundle] building release binaries for compute_${CUDA_COMPUTE_CAP}" >&2
mkdir -p target
cargo build --release --features cuda,nccl --test cuda --test nccl --example bench --example train \
  --message-format=json-render-diagnostics >target/gpu-bundle-build.json

rm -rf "$OUTDIR"
mkdir -p "$OUTDIR/bin"
# The executables cargo reports, by target name.
python3 - "$OUTDIR/bin" target/gpu-bundle-build.json <<'EOF'
import json, shutil, sys
dest, log = sys.argv[1], sys.argv[2]
wanted = {"cuda", "nccl", "bench", "train"}
found = {}
for line in open(log):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    name = msg["target"]["name"]
    if name in wanted:
        found[name] = msg["executable"]
missing = wanted - set(found)
if missing:
    sys.exit(f"[gpu-bundle] cargo built no executable for {sorted(missing)}")
for name, path in found.items():
    shutil.copy2(path, f"{dest}/{name}")
EOF
strip "$OUTDIR"/bin/*
# PTX text dominates the binaries (about 53 MB each stripped): xz brings the
# bundle well under the device tool's 64 MiB carry limit.
xz -T0 -6 "$OUTDIR"/bin/*
cp scripts/gpu-run.sh "$OUTDIR/run.sh"
cp benches/pytorch_bench.py benches/ncu_table.py "$OUTDIR/"
git rev-parse HEAD >"$OUTDIR/COMMIT" 2>/dev/null || true
du -sh "$OUTDIR" >&2
echo "[gpu-bundle] ready: $OUTDIR (carry it; run: bash $OUTDIR/run.sh \"\$OUT\")" >&2
