#!/usr/bin/env bash
# Runs one cargo command against a copy of candle-core whose autograd stores
# an op's first gradient contribution instead of adding it to zeros
# (benches/candle_inplace_grads.py says why and what changes). It measures
# what candle's gradient bookkeeping costs a training step; this crate never
# depends on the copy.
#   bash scripts/with-patched-candle.sh run --release --example bench -- --keep-freed-memory
#   bash scripts/with-patched-candle.sh test --test cpu
# Builds go to target/patched-candle, so the normal build cache stays valid
# and the stock and patched binaries live side by side;
# PATCHED_CANDLE_TARGET_DIR picks another folder (scripts/check-patched-candle.sh
# shares target/, reusing every dependency that does not depend on candle-core).
# Cargo.lock is restored afterwards (cargo rewrites it for the patch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 benches/candle_inplace_grads.py
cp Cargo.lock target/Cargo.lock.unpatched
trap 'cp target/Cargo.lock.unpatched Cargo.lock' EXIT
CARGO_TARGET_DIR="${PATCHED_CANDLE_TARGET_DIR:-target/patched-candle}" \
  cargo --config 'patch.crates-io.candle-core.path="target/candle-core-inplace-grads"' "$@"
