#!/usr/bin/env bash
# Runs the bundle made by scripts/gpu-bundle.sh on a GPU machine (copied there
# as gpu-bundle/run.sh):
#
#   bash gpu-bundle/run.sh OUT [STEP...]
#
# STEP is any of: info, tests, multigpu, bench, pytorch, train, profile
# (default: all of them, in that order; profile, last, takes what is left of the budget: Nsight
# Compute's counters for the kernels of eight suite cases, through
# ncu_table.py), and sanitize (not in the default list: the CUDA op tests
# under compute-sanitizer's memcheck, then racecheck on the shared-memory
# reductions; minutes, and the sanitizer and ncu's counters work on some of
# the lent machines only, see the device tool's KINDS.md). multigpu runs only
# where nvidia-smi lists two GPUs or more (elsewhere it is recorded as
# skipped): the NCCL tests (tests/nccl.rs: k ranks as threads, one per GPU,
# failures of a late, stalled or dropped peer) and the training example as
# one process per GPU over NCCL, so that the first machine with two GPUs runs
# the multi-GPU path in the same single command. Each step's output
# goes to OUT/<step>.txt (and the benchmark's JSON to OUT/bench-cuda.json); a
# failing step is recorded in OUT/status.txt and the next step still runs.
# The default run writes 8 files, what the device tool brings back (the
# training checkpoint and ncu's reports stay on the machine): run sanitize
# in a call of its own.
#
# Time: the whole run keeps within BUDGET seconds (default 540, so that it
# ends inside the device tool's 600-second command limit, whose session
# budget is 15 minutes, machine start included). Each step is bounded by
# `timeout` at its own cap (below; STEP_TIMEOUT overrides them all) and by
# what is left of BUDGET, so one hang cannot eat the others' time; a step
# that would get less than 15 seconds is recorded as skipped.
#
# The CUDA 13 runtime libraries come from the nvidia-* wheels of `python3`
# (PyTorch's dependencies), found through its site-packages.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:?usage: run.sh OUT [info|tests|multigpu|bench|pytorch|train|profile|sanitize ...]}"
shift
STEPS=("$@")
[[ ${#STEPS[@]} -eq 0 ]] && STEPS=(info tests multigpu bench pytorch train profile)
BUDGET="${BUDGET:-540}"
START=$SECONDS
mkdir -p "$OUT"

# The cap of each step in seconds: what it needs on an H100 with a margin
# (the tests' CPU references dominate theirs), unless STEP_TIMEOUT is set.
step_cap() {
  if [[ -n "${STEP_TIMEOUT:-}" ]]; then
    echo "$STEP_TIMEOUT"
    return
  fi
  case "$1" in
    info) echo 30 ;;
    sanitize) echo 300 ;;
    tests) echo 240 ;;
    multigpu) echo 150 ;;
    bench) echo 180 ;;
    pytorch) echo 150 ;;
    train) echo 120 ;;
    profile) echo 180 ;;
  esac
}

libs="$(python3 - <<'EOF'
import glob, site
dirs = []
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += sorted(glob.glob(f"{sp}/nvidia/*/lib")) + sorted(glob.glob(f"{sp}/nvidia/cu*/lib"))
print(":".join(dict.fromkeys(dirs)))
EOF
)"
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The binaries are stripped: backtraces would only list <unknown> frames.
export RUST_BACKTRACE=0
# A GPU is expected here: a GPU test that finds no CUDA device fails instead
# of reporting that it was skipped (tests/common/mod.rs, skip_without_gpu).
export SYNCBN_REQUIRE_CUDA=1

# The binaries travel xz-compressed; unpack them once.
BIN="${TMPDIR:-/tmp}/candle-syncbn-gpu-bin"
mkdir -p "$BIN"
for f in "$HERE"/bin/*.xz; do
  exe="$BIN/$(basename "$f" .xz)"
  if [[ ! -x "$exe" || "$f" -nt "$exe" ]]; then
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$exe"
    chmod +x "$exe"
  fi
done

run_step() {
  local name="$1"
  shift
  local cap left
  cap="$(step_cap "$name")"
  left=$((BUDGET - (SECONDS - START)))
  if ((left < 15)); then
    echo "$name skipped: ${left}s left of the ${BUDGET}s budget" | tee -a "$OUT/status.txt"
    return
  fi
  ((left < cap)) && cap=$left
  echo "== $name (at most ${cap}s): $*" | tee "$OUT/$name.txt"
  local t0=$SECONDS
  timeout -k 5 "$cap" "$@" >>"$OUT/$name.txt" 2>&1
  local rc=$?
  local note=""
  ((rc == 124 || rc == 137)) && note=" (timed out)"
  echo "$name rc=$rc$note $((SECONDS - t0))s" | tee -a "$OUT/status.txt"
  tail -n 40 "$OUT/$name.txt"
}

for step in "${STEPS[@]}"; do
  case "$step" in
    info)
      run_step info bash -c 'nvidia-smi; echo; cat "$0/COMMIT" 2>/dev/null; python3 -c "import torch; print(\"torch\", torch.__version__, torch.version.cuda)"' "$HERE"
      ;;
    tests)
      # One test at a time: the tests share GPU 0 and some open k ranks on it.
      run_step tests "$BIN/cuda" --test-threads=1
      ;;
    multigpu)
      ngpu="$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU ')"
      if ((ngpu < 2)); then
        echo "multigpu skipped: nvidia-smi lists ${ngpu} GPU(s), NCCL across GPUs needs 2" | tee -a "$OUT/status.txt"
        continue
      fi
      # The NCCL tests one at a time (each opens min(GPUs, 3) ranks, the
      # subgroup test 4), then one training process per GPU over NCCL.
      run_step multigpu bash -c '
        "$0" --test-threads=1 || exit
        "$1" --device cuda --nproc-per-node "$3" --epochs 1 --max-steps 50 \
          --checkpoint "${TMPDIR:-/tmp}/candle-syncbn-train-multigpu.safetensors"
      ' "$BIN/nccl" "$BIN/train" "$OUT" "$ngpu"
      ;;
    bench)
      # The issue's suite (read by the PyTorch step), then maps whose rows
      # rule out 128-bit loads along them (65x65 as in DeepLab's 513 crops,
      # 33x33; 7x7 is in the suite): the element-wise passes' vectors across
      # rows and the reductions' scalar kernels.
      # Twice: with candle's default CUDA memory pool (freed memory goes back
      # to the driver at every synchronization), then with
      # cuda_memory::keep_freed_memory (kept, as PyTorch's caching allocator
      # keeps it); that JSON stays on the machine (OUT holds 8 files). The
      # last table ends with the suite's first shape again: its forward ran
      # 0.17-0.2 ms as the first row of a run against 0.11 ms for the same
      # bytes in (32, 256, 56, 56).
      run_step bench bash -c '
        "$0" --device cuda --relu --json "$1" || exit
        "$0" --device cuda --relu --keep-freed-memory --json "$2" || exit
        "$0" --device cuda --no-candle-nn --keep-freed-memory --shapes 8x256x65x65,16x512x33x33,32x64x112x112
      ' "$BIN/bench" "$OUT/bench-cuda.json" "${TMPDIR:-/tmp}/bench-cuda-kept.json"
      ;;
    pytorch)
      run_step pytorch bash -c '
        echo "## against our default-pool run"
        python3 "$0/pytorch_bench.py" --device cuda --relu --ours "$1" || exit
        echo; echo "## against our run with cuda_memory::keep_freed_memory"
        python3 "$0/pytorch_bench.py" --device cuda --relu --ours "$2"
      ' "$HERE" "$OUT/bench-cuda.json" "${TMPDIR:-/tmp}/bench-cuda-kept.json"
      ;;
    train)
      # World size 1 over NCCL on the one GPU: the whole data-parallel path.
      run_step train "$BIN/train" --device cuda --nproc-per-node 1 --epochs 1 \
        --checkpoint "${TMPDIR:-/tmp}/candle-syncbn-train.safetensors"
      ;;
    profile)
      # Nsight Compute on the kernels of one training forward and backward
      # (and more) per case: duration, DRAM traffic and rate, DRAM and SM
      # throughput against the GPU's peak, occupancy, registers; one table per
      # case (benches/ncu_table.py). Hardware counters were readable on the
      # Firecracker machines only (the device tool's KINDS.md).
      run_step profile bash -c '
        bench="$0"; here="$1"; rep="${TMPDIR:-/tmp}/candle-syncbn-ncu"
        ncu="$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | tail -n 1)"
        [[ -x "$ncu" ]] || { echo "ncu not found"; exit 3; }
        metrics="$(python3 "$here/ncu_table.py" --print-metrics)" || exit
        rc=0
        for case in 32x256x56x56:f32 32x256x56x56:bf16 32x64x112x112:f32 32x64x112x112:bf16 32x1024x14x14:bf16 32x2048x7x7:f32 4096x1024:f32 4096x1024:bf16; do
          shape="${case%%:*}"; dtype="${case##*:}"
          if ! "$ncu" --clock-control none --metrics "$metrics" --kernel-name regex:^bn_ --launch-count 40 \
              -o "$rep" --force-overwrite "$bench" --device cuda --no-candle-nn --iters 1 \
              --shapes "$shape" --dtypes "$dtype" >"$rep.log" 2>&1; then
            echo "ncu failed on $shape $dtype:"; tail -n 15 "$rep.log"; rc=1; continue
          fi
          "$ncu" --import "$rep.ncu-rep" --page raw --csv --print-units base >"$rep.csv" || { rc=1; continue; }
          python3 "$here/ncu_table.py" "$rep.csv" --label "$shape $dtype" || rc=1
        done
        exit $rc
      ' "$BIN/bench" "$HERE"
      ;;
    sanitize)
      # The op tests (every kernel, small shapes) under memcheck, then the
      # block reductions' shared memory under racecheck.
      run_step sanitize bash -c '
        ops="batch_stats_match_cpu grad_stats_match_cpu batch_norm_op_matches_cpu"
        ops="$ops input_grad_and_affine_grads_match_cpu grad_stats_with_affine_grads_match_separate_ops"
        ops="$ops stack_params_match_cpu fused_relu_layer_matches_cpu"
        compute-sanitizer --tool memcheck --error-exitcode 9 "$0" --test-threads=1 $ops || exit
        compute-sanitizer --tool racecheck --error-exitcode 9 "$0" --test-threads=1 \
          batch_stats_match_cpu grad_stats_match_cpu
      ' "$BIN/cuda"
      ;;
    *)
      echo "unknown step $step (info, tests, multigpu, bench, pytorch, train, profile, sanitize)" >&2
      exit 2
      ;;
  esac
done
