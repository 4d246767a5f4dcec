#!/usr/bin/env bash
# Installs a pinned CUDA 13.0 toolchain from PyPI wheels (no system CUDA needed)
# into a cache folder, and prints the environment to use it.
#
#   eval "$(bash scripts/cuda-toolchain.sh)"
#
# Cache folder: ${CUDA_TOOLCHAIN_DIR:-<repo>/.cuda-toolchain}. Re-running is
# cheap: work already done (recorded in stamp files) is skipped.
#
# What it makes there:
#   venv/   a Python venv with the pinned nvidia-* wheels (nvcc, headers, and
#           the runtime libraries candle-core/cudarc link against);
#   lib/    unversioned symlinks (libcublas.so, libcublasLt.so, libcurand.so,
#           libnvrtc.so, libcudart.so, libnccl.so) to the versioned files in the
#           wheels, and a generated libcuda stub (libcuda.so, soname
#           libcuda.so.1) whose every cu* entry point returns 34 =
#           CUDA_ERROR_STUB_LIBRARY, so executables link and run without a GPU
#           driver (Device::new_cuda then returns an error).
#
# stdout carries only `export` lines; progress goes to stderr.
#
# Exports: NVCC (scripts/nvcc-cache.sh, and NVCC_CACHE_REAL, when
# NVCC_CACHE_DIR is set), CUDA_HOME, PATH (cudarc's build script runs `nvcc` from PATH),
# CUDA_COMPUTE_CAP (only when unset and there is no nvidia-smi),
# CUDAFORGE_THREADS (the number of cores, when unset), RUSTFLAGS and
# RUSTDOCFLAGS (`-L lib/`, appended), LD_LIBRARY_PATH (lib/ unless a real
# libcuda.so.1 is installed, and the wheels' lib folders).
#
# Environment it reads: CUDA_TOOLCHAIN_DIR, PYTHON (default python3),
# CUDA_COMPUTE_CAP, RUSTFLAGS, RUSTDOCFLAGS, LD_LIBRARY_PATH, PATH, CARGO_HOME,
# NVCC_CACHE_DIR.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${CUDA_TOOLCHAIN_DIR:-$REPO/.cuda-toolchain}"
PYTHON="${PYTHON:-python3}"

# CUDA 13.0 (driver 580). Do not bump past 13.0: PTX from a newer nvcc does not
# load on a 13.0 driver, and cudarc 0.19 rejects unknown nvcc versions.
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88
  # cudarc's `nccl` feature binds NCCL 2.30 (feature nccl-02030).
  nvidia-nccl-cu13==2.30.7
)
# Bump when the lib/ folder recipe (symlinks, stub) changes.
LIB_RECIPE=2

log() { printf '[cuda-toolchain] %s\n' "$*" >&2; }
die() { printf '[cuda-toolchain] error: %s\n' "$*" >&2; exit 1; }

mkdir -p "$DIR"
VENV="$DIR/venv"
LIB="$DIR/lib"
WHEEL_STAMP="$DIR/.stamp-wheels"
LIB_STAMP="$DIR/.stamp-lib"
WANT_WHEELS="$(printf '%s\n' "${WHEELS[@]}")"

# ---------------------------------------------------------------- wheels
if [[ -f "$WHEEL_STAMP" && -x "$VENV/bin/python" ]] && [[ "$(cat "$WHEEL_STAMP")" == "$WANT_WHEELS" ]]; then
  log "wheels up to date in $VENV"
else
  log "installing CUDA 13.0 wheels into $VENV (about 1.4 GiB) ..."
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON to a Python 3 interpreter)"
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV" >&2 \
    || die "could not create a venv (on Debian: apt-get install python3-venv)"
  rm -f "$WHEEL_STAMP" "$LIB_STAMP"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q "${WHEELS[@]}" >&2
  printf '%s\n' "$WANT_WHEELS" >"$WHEEL_STAMP"
  log "wheels installed"
fi

SP="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
NV="$SP/nvidia"
CUDA_ROOT="$NV/cu13"
NVCC_BIN="$CUDA_ROOT/bin/nvcc"
[[ -x "$NVCC_BIN" ]] || die "nvcc missing at $NVCC_BIN (delete $DIR and re-run)"
for h in cuda_runtime.h cuda_fp16.h cuda_bf16.h; do
  [[ -f "$CUDA_ROOT/include/$h" ]] || die "header $h missing in $CUDA_ROOT/include"
done

# ---------------------------------------------------------------- cudarc source
find_cudarc() {
  local home="${CARGO_HOME:-$HOME/.cargo}" d
  d="$(find "$home"/registry/src -mindepth 2 -maxdepth 2 -type d -name 'cudarc-0.19.*' 2>/dev/null | sort -V | tail -n 1 || true)"
  [[ -n "$d" && -f "$d/src/driver/sys/mod.rs" ]] && printf '%s\n' "$d"
}

CUDARC="$(find_cudarc || true)"
if [[ -z "$CUDARC" ]]; then
  log "cudarc 0.19 sources not in the cargo registry; running cargo fetch"
  (cd "$REPO" && cargo fetch >&2) || die "cargo fetch failed"
  CUDARC="$(find_cudarc || true)"
  [[ -n "$CUDARC" ]] || die "cudarc-0.19.* not found under \${CARGO_HOME:-~/.cargo}/registry/src after cargo fetch"
fi
DRIVER_RS="$CUDARC/src/driver/sys/mod.rs"

# ---------------------------------------------------------------- lib folder
WANT_LIB="$(printf 'recipe=%s\nsite=%s\ncudarc=%s\n%s\n' "$LIB_RECIPE" "$SP" "$CUDARC" "$WANT_WHEELS")"
if [[ -f "$LIB_STAMP" && -e "$LIB/libcuda.so.1" ]] && [[ "$(cat "$LIB_STAMP")" == "$WANT_LIB" ]]; then
  log "lib folder up to date in $LIB"
else
  log "making $LIB (symlinks + libcuda stub from $DRIVER_RS)"
  command -v gcc >/dev/null || die "gcc not found (needed for the libcuda stub and by nvcc as host compiler)"
  rm -rf "$LIB"
  mkdir -p "$LIB"

  # Unversioned link names -> the versioned files shipped in the wheels.
  for name in cublas cublasLt curand nvrtc cudart nccl; do
    target="$(find "$NV" -path "*/lib/lib$name.so.*" ! -name '*.alt.*' 2>/dev/null | sort -V | sed -n 1p)"
    [[ -n "$target" ]] || die "lib$name.so.* not found in the wheels under $NV"
    ln -s "$target" "$LIB/lib$name.so"
  done

  # libcuda stub: one function per `fn cu...(` declared by cudarc (both the
  # `pub unsafe fn cuX(` wrappers and the `fn cuX(` inside extern "C" blocks
  # match; duplicates are removed).
  mapfile -t SYMS < <(grep -oE '\bfn[[:space:]]+cu[A-Za-z0-9_]+[[:space:]]*\(' "$DRIVER_RS" \
    | sed -E 's/^fn[[:space:]]+//; s/[[:space:]]*\($//' | sort -u)
  ((${#SYMS[@]} > 100)) || die "found only ${#SYMS[@]} cu* functions in $DRIVER_RS; the parser needs updating"
  {
    echo '/* Generated by scripts/cuda-toolchain.sh from'
    echo " * $DRIVER_RS"
    echo ' * A stand-in libcuda.so.1 for machines without an NVIDIA driver: every'
    echo ' * entry point returns CUDA_ERROR_STUB_LIBRARY (34). cuGetErrorName and'
    echo ' * cuGetErrorString answer with a fixed text so errors print readably. */'
    echo '#define STUB_ERR 34'
    echo 'static const char stub_name[] = "CUDA_ERROR_STUB_LIBRARY";'
    echo 'static const char stub_text[] = "CUDA driver is a stub library (no NVIDIA driver on this machine)";'
    for s in "${SYMS[@]}"; do
      case "$s" in
        cuGetErrorName) echo 'int cuGetErrorName(int e, const char **p) { (void)e; if (p) *p = stub_name; return 0; }' ;;
        cuGetErrorString) echo 'int cuGetErrorString(int e, const char **p) { (void)e; if (p) *p = stub_text; return 0; }' ;;
        *) echo "int $s() { return STUB_ERR; }" ;;
      esac
    done
  } >"$LIB/cuda_stub.c"
  gcc -shared -fPIC -O1 -w -Wl,-soname,libcuda.so.1 -o "$LIB/libcuda.so" "$LIB/cuda_stub.c" >&2 \
    || die "compiling the libcuda stub failed"
  ln -s libcuda.so "$LIB/libcuda.so.1"
  printf '%s\n' "$WANT_LIB" >"$LIB_STAMP"
  log "lib folder ready (${#SYMS[@]} stub functions)"
fi

# ---------------------------------------------------------------- exports
q() { printf '%q' "$1"; }

# Every lib folder inside the wheels (nvidia/cu13/lib, nvidia/nccl/lib, ...).
WHEEL_LIBS=""
for d in "$NV"/*/lib; do
  [[ -d "$d" ]] && WHEEL_LIBS="${WHEEL_LIBS:+$WHEEL_LIBS:}$d"
done

# The stub libcuda.so.1 must not shadow a real driver at run time: put the lib
# folder on LD_LIBRARY_PATH only when no real libcuda.so.1 is found.
has_real_libcuda() {
  local d cache
  cache="$({ ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null || true)"
  [[ "$cache" == *"libcuda.so.1 "* ]] && return 0
  for d in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib/wsl/lib /usr/local/nvidia/lib64; do
    [[ -e "$d/libcuda.so.1" ]] && return 0
  done
  return 1
}

LDP="$WHEEL_LIBS"
if has_real_libcuda; then
  log "a real libcuda.so.1 is installed: the stub is used for linking only"
else
  LDP="$LIB:$LDP"
fi
case ":${LD_LIBRARY_PATH:-}:" in
  *":$LIB:"* | *":$CUDA_ROOT/lib:"*) LDP="${LD_LIBRARY_PATH}" ;; # already applied
  *) LDP="$LDP${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
esac

# rustc gets RUSTFLAGS; rustdoc (doctests are linked executables too) only
# reads RUSTDOCFLAGS, so both need the -L.
add_L() {
  case " $1 " in
    *" -L $LIB "*) printf '%s' "$1" ;; # already applied
    *) printf '%s' "${1:+$1 }-L $LIB" ;;
  esac
}
RF="$(add_L "${RUSTFLAGS:-}")"
RDF="$(add_L "${RUSTDOCFLAGS:-}")"

# cudarc's build script (cuda-version-from-build-system) runs plain `nvcc
# --version` from PATH, so nvcc's folder must be on PATH too.
P="$PATH"
case ":$P:" in
  *":$CUDA_ROOT/bin:"*) ;;
  *) P="$CUDA_ROOT/bin:$P" ;;
esac

if [[ -n "${NVCC_CACHE_DIR:-}" ]]; then
  # Object compiles go through a cache (scripts/nvcc-cache.sh), for runs that
  # build the same CUDA sources twice, as CI's clippy and test builds do.
  echo "export NVCC_CACHE_REAL=$(q "$NVCC_BIN")"
  echo "export NVCC=$(q "$REPO/scripts/nvcc-cache.sh")"
else
  echo "export NVCC=$(q "$NVCC_BIN")"
fi
echo "export CUDA_HOME=$(q "$CUDA_ROOT")"
echo "export PATH=$(q "$P")"
if [[ -z "${CUDA_COMPUTE_CAP:-}" ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "export CUDA_COMPUTE_CAP=90"
fi
if [[ -z "${CUDAFORGE_THREADS:-}" ]]; then
  # candle-kernels' build script (cudaforge) compiles its quantized-matmul
  # objects on half the cores by default, and they take most of a CUDA build:
  # on 2 cores, 10 minutes on one while the other sat idle.
  echo "export CUDAFORGE_THREADS=$(nproc 2>/dev/null || echo 2)"
fi
echo "export RUSTFLAGS=$(q "$RF")"
echo "export RUSTDOCFLAGS=$(q "$RDF")"
echo "export LD_LIBRARY_PATH=$(q "$LDP")"
log "ready: $("$NVCC_BIN" --version | tail -n 1)"
