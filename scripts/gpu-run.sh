#!/usr/bin/env bash
# Runs the bundle made by scripts/gpu-bundle.sh on a GPU machine (copied there
# as gpu-bundle/run.sh):
#
#   bash gpu-bundle/run.sh OUT [STEP...]
#
# STEP is any of: info, tests, bench, pytorch, train (default: all of them, in
# that order). Each step's output goes to OUT/<step>.txt (and the benchmark's
# JSON to OUT/bench-cuda.json); a failing step is recorded in OUT/status.txt
# and the next step still runs. Steps are bounded by `timeout` so that one
# hang cannot eat the machine's time: STEP_TIMEOUT seconds each (default 540).
#
# The CUDA 13 runtime libraries come from the nvidia-* wheels of `python3`
# (PyTorch's dependencies), found through its site-packages.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:?usage: run.sh OUT [info|tests|bench|pytorch|train ...]}"
shift
STEPS=("$@")
[[ ${#STEPS[@]} -eq 0 ]] && STEPS=(info tests bench pytorch train)
STEP_TIMEOUT="${STEP_TIMEOUT:-540}"
mkdir -p "$OUT"

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
  echo "== $name: $*" | tee "$OUT/$name.txt"
  local t0=$SECONDS
  timeout "$STEP_TIMEOUT" "$@" >>"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/status.txt"
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
    bench)
      run_step bench "$BIN/bench" --device cuda --relu --json "$OUT/bench-cuda.json"
      ;;
    pytorch)
      run_step pytorch python3 "$HERE/pytorch_bench.py" --device cuda --relu --ours "$OUT/bench-cuda.json"
      ;;
    train)
      # World size 1 over NCCL on the one GPU: the whole data-parallel path.
      run_step train "$BIN/train" --device cuda --nproc-per-node 1 --epochs 1 --checkpoint "$OUT/train.safetensors"
      ;;
    *)
      echo "unknown step $step (info, tests, bench, pytorch, train)" >&2
      exit 2
      ;;
  esac
done
