#!/usr/bin/env bash
# Sets up and runs the whole test suite on a fresh machine (Rust and Python 3
# with pip are the only prerequisites):
#   1. the CPU build: unit, integration and doc tests;
#   2. the CUDA build (features `cuda,nccl`), with a pinned CUDA 13.0 toolchain from
#      PyPI (scripts/cuda-toolchain.sh): on a machine with a GPU, the same
#      tests plus the CUDA tests; without one, its unit tests (the CUDA code's
#      included): its CPU integration tests and doctests take the CPU paths
#      step 1 ran, and its GPU tests run in step 3;
#   3. without a GPU, the CUDA tests again on an emulated GPU
#      (scripts/emulated-gpu.sh: the driver API in host memory, this crate's
#      kernels and candle's element-wise, cast, fill and reduction kernels
#      compiled for the CPU, four devices and an emulated NCCL), where all of
#      them and the NCCL group's tests run for real, and smoke runs of the
#      benchmark's and the training example's CUDA paths.
# Set SYNCBN_SKIP_CUDA=1 to run only step 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== tests (CPU build)" >&2
cargo test

if [[ "${SYNCBN_SKIP_CUDA:-0}" == "1" ]]; then
  echo "== CUDA build skipped (SYNCBN_SKIP_CUDA=1)" >&2
  exit 0
fi
echo "== tests (CUDA build: all of them on a GPU, the unit tests without one)" >&2
eval "$(bash scripts/cuda-toolchain.sh)"
if [[ -e /dev/nvidiactl ]]; then
  cargo test --features cuda,nccl
  exit 0  # a real GPU ran the GPU tests
fi
cargo test --features cuda,nccl --lib
echo "== GPU tests on the emulated GPU (the kernels on the CPU; see scripts/emulated-gpu.sh)" >&2
eval "$(bash scripts/emulated-gpu.sh)"
# The emulated GPU must be found: a test that would skip for want of a CUDA
# device (or of two, for NCCL) fails instead.
SYNCBN_REQUIRE_CUDA=1 cargo test --features cuda,nccl --test cuda --test nccl
echo "== the benchmark's and the training example's CUDA paths on the emulated GPU (smoke runs; emulated timings mean nothing)" >&2
cargo run --features cuda,nccl --example bench -- --device cuda --shapes 4x8x6x6,64x16 --dtypes f32,bf16 --iters 2 --relu
cargo run --features cuda,nccl --example train -- --device cuda --nproc-per-node 2 --epochs 1 \
  --train-size 128 --test-size 64 --image-size 8 --batch-size 16 --max-steps 3 \
  --checkpoint target/emulated-gpu/train-smoke.safetensors
# 4 processes whose layers synchronize in pairs, on split NCCL communicators
cargo run --features cuda,nccl --example train -- --device cuda --nproc-per-node 4 --bn-group-size 2 \
  --epochs 1 --train-size 128 --test-size 64 --image-size 8 --batch-size 16 --max-steps 3 \
  --checkpoint target/emulated-gpu/train-smoke-pairs.safetensors
