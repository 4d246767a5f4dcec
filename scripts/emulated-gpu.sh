#!/usr/bin/env bash
# Builds an emulated CUDA device (see cuda-kernels/emulator/fake_driver.cpp)
# and prints the environment that makes CUDA builds use it:
#
#   eval "$(bash scripts/emulated-gpu.sh)"
#   cargo test --features cuda,nccl --test cuda -- <test names>
#
# The folder (${EMULATED_GPU_DIR:-target/emulated-gpu}) gets libcuda.so.1
# (the driver subset, the emulator and this crate's kernels compiled for the
# host) and shells of libcublas.so.13, libcurand.so.10 and libcudart.so.13.
# Only this crate's kernels run: tests that need candle's own kernels, cuBLAS
# or cuRAND fail with "not found"/"not supported" errors under it.
#
# Needs g++ 12+ (or $CXX). stdout carries only `export` lines.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${EMULATED_GPU_DIR:-$REPO/target/emulated-gpu}"
CXX="${CXX:-g++}"
EMU="$REPO/cuda-kernels/emulator"
mkdir -p "$DIR"

common=(-std=c++17 -O2 -fPIC -shared -ffp-contract=off -Wall -Wno-unknown-pragmas)
"$CXX" "${common[@]}" -I "$REPO/cuda-kernels" -I "$EMU/include" -include "$EMU/cuda_emulator.h" \
  -Wl,-soname,libcuda.so.1 -o "$DIR/libcuda.so.1" \
  -x c++ "$EMU/fake_driver.cpp" "$EMU/runtime.cpp" >&2
ln -sf libcuda.so.1 "$DIR/libcuda.so"

# Each shell carries the real soname and a version node of the same name, as
# the references of a CUDA build name them (e.g. cublasCreate_v2@libcublas.so.13).
shell() {
  local macro="$1" soname="$2"
  echo "$soname { global: *; };" >"$DIR/$soname.map"
  "$CXX" "${common[@]}" -D"$macro" -Wl,-soname,"$soname" -Wl,--version-script="$DIR/$soname.map" \
    -o "$DIR/$soname" "$EMU/fake_libs.cpp" >&2
}
shell FAKE_CUBLAS libcublas.so.13
shell FAKE_CURAND libcurand.so.10
shell FAKE_CUDART libcudart.so.13

echo "[emulated-gpu] ready in $DIR" >&2
echo "export LD_LIBRARY_PATH=\"$DIR\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
# Tests that need candle's own kernels skip themselves under it.
echo "export SYNCBN_EMULATED_GPU=1"
