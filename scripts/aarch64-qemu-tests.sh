#!/usr/bin/env bash
# Runs the CPU test suite for AArch64 Linux (Graviton, Grace) under qemu-user
# on an x86-64 Debian/Ubuntu machine: cross-built with the distribution's
# AArch64 GCC, run through qemu-aarch64. Not part of CI (it takes a few
# minutes and, for the tests that start processes, a binfmt registration).
#
#   bash scripts/aarch64-qemu-tests.sh [cargo test args, without --]
#
# Needs qemu-user, gcc-aarch64-linux-gnu and libc6-dev-arm64-cross (installed
# with apt-get when missing and apt-get can), rustup's std for
# aarch64-unknown-linux-gnu, and for the emulated CUDA kernels a C++ compiler
# with _Float16 for AArch64: clang-15 or newer (used when installed; Debian
# 12's AArch64 GCC 12 lacks it, and those tests then say they were skipped).
# The tests that start processes (the launcher's, the training example's)
# need the kernel to run AArch64 programs through qemu (binfmt_misc): the
# script registers qemu-aarch64 when it is root and the registration is
# missing, and otherwise skips those tests, saying so.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TARGET=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu
log() { echo "[aarch64-qemu] $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null || [[ ! -d $SYSROOT/lib ]]; then
  command -v apt-get >/dev/null || die "qemu-user or the AArch64 cross GCC is missing, and there is no apt-get"
  log "installing qemu-user, gcc-aarch64-linux-gnu and libc6-dev-arm64-cross"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross; } >/dev/null
fi
rustup target add "$TARGET" >/dev/null

# candle 0.11.1's gemm-f16 needs half-precision arithmetic on AArch64 (ARMv8.2+).
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+fp16"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $SYSROOT"
export QEMU_LD_PREFIX=$SYSROOT

# The emulated kernels are compiled at test time by $CXX for the target.
clang="$(command -v clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 2>/dev/null | head -n 1 || true)"
if [[ -n "$clang" ]]; then
  wrapper="$PWD/target/aarch64-clang++"
  mkdir -p target
  printf '#!/bin/sh\nexec %s --target=aarch64-linux-gnu "$@"\n' "$clang" >"$wrapper"
  chmod +x "$wrapper"
  export CXX="$wrapper"
else
  export CXX=aarch64-linux-gnu-g++
  command -v "$CXX" >/dev/null || log "no C++ cross compiler: the emulated kernel tests will say they were skipped"
fi

# binfmt_misc, so that the tests' child processes (AArch64 programs) run.
binfmt=/proc/sys/fs/binfmt_misc
registered() { [[ -e $binfmt/qemu-aarch64 ]] && [[ "$(head -n 1 $binfmt/qemu-aarch64)" == enabled ]]; }
if ! registered && [[ $(id -u) == 0 ]]; then
  [[ -e $binfmt/register ]] || mount -t binfmt_misc binfmt_misc $binfmt 2>/dev/null || true
  if [[ -e $binfmt/register ]]; then
    magic='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
    mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
    echo ":qemu-aarch64:M::$magic:$mask:$(command -v qemu-aarch64):" >$binfmt/register 2>/dev/null || true
  fi
fi
skip=()
if ! registered; then
  log "AArch64 programs cannot start here without qemu (no binfmt_misc registration): skipping the tests that start processes"
  skip=(--exact)
  for t in multiprocess::{two_processes_match_one,three_processes_uneven_and_empty_through_the_launcher} \
    multiprocess::{killed_rank_makes_the_others_fail,silent_rank_makes_the_others_fail_within_the_timeout} \
    multiprocess::{mismatched_channel_counts_fail_on_every_rank,wrong_token_is_refused} \
    multiprocess::launcher_stops_the_others_when_a_rank_fails \
    rendezvous::{valid_ranks_join_under_an_idle_connection_flood,every_rank_warns_once_without_a_token} \
    train_example::{train_example_is_reproducible,train_example_runs_end_to_end} \
    train_example::train_example_synchronizes_within_blocks; do
    skip+=(--skip "$t")
  done
fi

log "cargo test --target $TARGET under $(qemu-aarch64 --version | head -n 1), CXX=$CXX"
if ((${#skip[@]})); then
  cargo test --target "$TARGET" "$@" -- "${skip[@]}"
else
  cargo test --target "$TARGET" "$@"
fi
