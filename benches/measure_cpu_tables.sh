#!/usr/bin/env bash
# Measures the CPU tables of docs/performance.md that compare with PyTorch or
# candle-nn, PyTorch and ours timed in alternation (benches/compare_cpu.py says
# how), and writes them as markdown with the raw samples beside them:
#   1. glibc's default allocator policy: steps, kernels, eval (default.md);
#   2. freed memory kept for both sides: the same table, the batch norm +
#      ReLU (+ residual) steps, and both again with the candle-core that
#      accumulates gradients in place as a third side (kept.md).
# Run it on a quiet machine: other work on the cores shows up in every cell.
#   bash benches/measure_cpu_tables.sh [OUTDIR] [compare_cpu.py options...]
#   bash benches/measure_cpu_tables.sh target/cpu-tables --reps 2 --shapes 8x16x32x32,256x64   # smoke test
# The builds come first (the in-place one compiles candle-core again, once);
# the measurements then take about 8 minutes on 2 quiet cores (11
# repetitions; 17 minutes with other builds running beside them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-target/cpu-tables}
shift || true
python3 -c 'import torch' 2>/dev/null || {
  echo "PyTorch is not installed (pip install torch)" >&2
  exit 1
}
cargo build --release --example bench
bash scripts/with-patched-candle.sh build --release --example bench
mkdir -p "$out"
{
  echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src examples benches || echo ' (modified)')"
  rustc --version
  python3 -c 'import torch; print("torch", torch.__version__)'
  uname -sr
  ldd --version | sed -n 1p
} | tee "$out/versions.txt"
# The suite of examples/bench.rs, and (32, 64, 56, 56), the reference shape
# of docs/performance.md.
shapes=32x64x112x112,32x256x56x56,32x512x28x28,32x1024x14x14,32x2048x7x7,4096x1024,2x64x16x56x56,32x64x56x56
python3 benches/compare_cpu.py --shapes "$shapes" "$@" --json "$out/default.json" | tee "$out/default.md"
python3 benches/compare_cpu.py --keep-freed-memory --relu \
  --in-place target/patched-candle/release/examples/bench \
  --shapes "$shapes" "$@" --json "$out/kept.json" | tee "$out/kept.md"
