#!/usr/bin/env bash
# nvcc with a content-addressed cache of object files, for a run that builds
# the same CUDA sources more than once.
#
# Why: cargo runs candle-kernels' build script once for `cargo clippy` (check
# mode) and again for `cargo test` (build mode): the two builds hash its build
# dependencies differently. Each run compiles candle's 15 quantized-matmul and
# MoE sources to sm_90a objects with -O3, about 10 minutes on 2 cores, so CI
# paid for them twice. scripts/cuda-toolchain.sh points NVCC here when
# NVCC_CACHE_DIR is set (.ci/run sets it to a folder of the clone's target/).
#
# Object compiles (`-c ... -o FILE`) and PTX compiles (`--ptx
# --output-directory DIR FILE.cu`, cudaforge's form: candle's PTX, about two
# minutes for quantized.cu, and this crate's) are cached; every other call
# (--lib, --version, -M) runs nvcc unchanged. The key hashes nvcc's version,
# the arguments without the output path, the working directory, and the
# contents of every file the source includes, as nvcc -M lists them. A hit
# copies the object and replays nvcc's stderr; a failed compile is not cached.
#
# cudaforge derives the CUDA_INCLUDE_DIR it hands candle-kernels from nvcc's
# location, which is then this repository's root; nothing in candle reads it.
#
# NVCC_CACHE_FAST_CANDLE=1 (set by .ci/run only) compiles candle's own CUDA
# sources (those outside this repository) for a machine that never runs them:
#   - the 15 quantized-matmul and MoE objects are compiled to PTX only
#     (`code=compute_XX` instead of `code=sm_XX`: no ptxas; a GPU would
#     JIT-compile the PTX when it loads them) with `-Xcicc -O0`: 17 s against
#     63 s with the former fast flags (`-Xcicc -O0 -Xptxas -O0`) and about
#     250 s with candle's, for one of them (measured 2026-12-08, 2-core
#     machine under load 4-5);
#   - candle's PTX with `-Xcicc -O0`: 27 s against 95 s for its 11 files.
# CI has no GPU, and the emulated GPU runs candle's kernels compiled from
# source for the CPU, not this PTX or these objects (fake_driver.cpp reports
# the quantized ones as not found). The front end still parses every source,
# so a compile error still fails. This crate's kernels keep their flags.
#
# Environment: NVCC_CACHE_REAL (the nvcc to run), NVCC_CACHE_DIR (the cache),
# NVCC_CACHE_FAST_CANDLE (above).
set -euo pipefail

real="${NVCC_CACHE_REAL:?NVCC_CACHE_REAL must name the nvcc to run}"
cache="${NVCC_CACHE_DIR:-}"

compile=0
ptx=0
out=""
outdir=""
source=""
rest=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  a="${args[i]}"
  case "$a" in
    -c) compile=1 ;;
    --ptx | -ptx) ptx=1 ;; # kept out of the -M call below, and in the key
    -o)
      i=$((i + 1))
      out="${args[i]:-}"
      ;;
    --output-directory | -odir)
      i=$((i + 1))
      outdir="${args[i]:-}"
      ;;
    *.cu)
      source="$a"
      rest+=("$a")
      ;;
    *) rest+=("$a") ;;
  esac
done
if [[ "$ptx" == 1 && "$compile" != 1 && -z "$out" && -n "$outdir" && -n "$source" ]]; then
  # cudaforge's PTX form: the output is DIR/<source's stem>.ptx.
  out="$outdir/$(basename "$source" .cu).ptx"
elif [[ "$compile" != 1 || -z "$out" ]]; then
  out=""
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
src_abs="$(cd "$(dirname "${source:-.}")" 2>/dev/null && pwd -P)" || src_abs=""
if [[ "${NVCC_CACHE_FAST_CANDLE:-0}" == 1 && -n "$out" && -n "$source" && "$src_abs" != "$repo"* ]]; then
  fast=(-Xcicc -O0)
  if [[ "$compile" == 1 ]]; then
    # Objects: embed PTX only, so ptxas never runs (arch=compute_90a,code=sm_90a
    # becomes arch=compute_90a,code=compute_90a).
    for ((i = 0; i < ${#args[@]}; i++)); do
      if [[ "${args[i]}" =~ ^(-gencode=|--generate-code=)arch=(compute_[0-9a-z]+),code=sm_[0-9a-z]+$ ]]; then
        args[i]="${BASH_REMATCH[1]}arch=${BASH_REMATCH[2]},code=${BASH_REMATCH[2]}"
      fi
    done
    for ((i = 0; i < ${#rest[@]}; i++)); do
      if [[ "${rest[i]}" =~ ^(-gencode=|--generate-code=)arch=(compute_[0-9a-z]+),code=sm_[0-9a-z]+$ ]]; then
        rest[i]="${BASH_REMATCH[1]}arch=${BASH_REMATCH[2]},code=${BASH_REMATCH[2]}"
      fi
    done
  fi
  rest+=("${fast[@]}")
  set -- "${args[@]}" "${fast[@]}"
fi
if [[ -z "$cache" || -z "$out" ]]; then
  exec "$real" "$@"
fi

mkdir -p "$cache"
# Every file the compile reads: the source and its includes, system ones too.
deps="$("$real" "${rest[@]}" -M 2>/dev/null)" || exec "$real" "$@"
key="$(
  {
    "$real" --version
    pwd
    echo "ptx=$ptx"
    printf '%s\0' "${rest[@]}"
    # The make rule: "target: dep dep \" lines; keep the dependencies.
    printf '%s\n' "$deps" | sed -e 's/^[^:]*://' -e 's/\\$//' | tr -s ' \t' '\n\n' |
      sed '/^$/d' | while IFS= read -r f; do
        printf '%s\0' "$f"
        sha256sum <"$f"
      done
  } | sha256sum | cut -d' ' -f1
)"

if [[ -f "$cache/$key.o" ]]; then
  cp "$cache/$key.o" "$out"
  cat "$cache/$key.err" >&2 2>/dev/null || true
  echo "nvcc-cache: reused $out" >>"$cache/log"
  exit 0
fi

err="$(mktemp "$cache/.err.XXXXXX")"
status=0
"$real" "$@" 2>"$err" || status=$?
cat "$err" >&2
if [[ "$status" == 0 && -f "$out" ]]; then
  tmp="$(mktemp "$cache/.obj.XXXXXX")"
  cp "$out" "$tmp"
  mv "$err" "$cache/$key.err"
  mv "$tmp" "$cache/$key.o"
  echo "nvcc-cache: compiled $out" >>"$cache/log"
else
  rm -f "$err"
fi
exit "$status"
