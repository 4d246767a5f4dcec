#!/usr/bin/env bash
# Checks what benches/candle_inplace_grads.py claims: storing an op's first
# gradient contribution instead of adding it to zeros changes no value.
#   1. this crate's CPU integration tests (tests/cpu: every backward and
#      gradient check of the ops and layers, on in-process ranks) pass
#      against the patched candle-core; the unit tests (kernels, groups,
#      the launcher; one gradient check, of the parameter stacking that
#      every layer gradient in tests/cpu goes through) and
#      tests/multiprocess (the same layers across processes) run on the stock
#      build only, to keep CI within its budget, and step 2 covers training
#      across processes;
#   2. the training example (2 ranks, 6 steps, seeded: convolutions, ReLU,
#      pooling, SyncBatchNorm, linear, cross-entropy, AdamW) writes a
#      checkpoint byte-identical to the one stock candle gives.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# One target folder for both builds: the patched candle-core is another
# package to cargo, so it, candle-nn and this crate build again while every
# other dependency is reused (the separate folder rebuilt all of them: about
# 2.5 minutes of CI). The stock example runs before the patched build
# replaces target/debug/examples/train.
export PATCHED_CANDLE_TARGET_DIR=target
bash scripts/with-patched-candle.sh test --test cpu
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
args=(--nproc-per-node 2 --epochs 1 --max-steps 6 --train-size 256 --test-size 64 --batch-size 16)
train() { # name, cargo command (after `build`) for the example
  local name="$1"
  shift
  "$@" build --example train
  if ! target/debug/examples/train "${args[@]}" --checkpoint "$dir/$name.safetensors" \
      >"$dir/$name.log" 2>&1; then
    cat "$dir/$name.log" >&2
    exit 1
  fi
  grep -h "epoch 1/1" "$dir/$name.log" | sed "s|^|$name: |" >&2
}
train stock cargo
train patched bash scripts/with-patched-candle.sh
if ! cmp "$dir/stock.safetensors" "$dir/patched.safetensors"; then
  echo "the patched candle-core changed the trained weights" >&2
  exit 1
fi
echo "trained weights identical with stock and patched candle-core" >&2
