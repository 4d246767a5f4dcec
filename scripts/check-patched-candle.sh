#!/usr/bin/env bash
# Checks what benches/candle_inplace_grads.py claims: storing an op's first
# gradient contribution instead of adding it to zeros changes no value.
#   1. this crate's unit tests and CPU integration tests (tests/cpu: every
#      backward and gradient check of the ops and layers, on in-process
#      ranks) pass against the patched candle-core; tests/multiprocess (the
#      same layers across processes, the launcher, the rendezvous) runs on the
#      stock build only, to keep CI within its budget, and step 2 covers
#      training across processes;
#   2. the training example (2 ranks, 6 steps, seeded: convolutions, ReLU,
#      pooling, SyncBatchNorm, linear, cross-entropy, AdamW) writes a
#      checkpoint byte-identical to the one stock candle gives.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/with-patched-candle.sh test --lib --test cpu
bash scripts/with-patched-candle.sh build --example train
cargo build --example train
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
args=(--nproc-per-node 2 --epochs 1 --max-steps 6 --train-size 256 --test-size 64 --batch-size 16)
for build in debug patched-candle/debug; do
  name="${build%%/*}"
  if ! "target/$build/examples/train" "${args[@]}" --checkpoint "$dir/$name.safetensors" \
      >"$dir/$name.log" 2>&1; then
    cat "$dir/$name.log" >&2
    exit 1
  fi
  grep -h "epoch 1/1" "$dir/$name.log" | sed "s|^|$name: |" >&2
done
if ! cmp "$dir/debug.safetensors" "$dir/patched-candle.safetensors"; then
  echo "the patched candle-core changed the trained weights" >&2
  exit 1
fi
echo "trained weights identical with stock and patched candle-core" >&2
