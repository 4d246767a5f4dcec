#!/usr/bin/env bash
# The MPI group (feature `mpi`, tests/mpi.rs) under a real mpirun, for CI:
#   1. installs Open MPI and what rsmpi's bindings need, unless `mpirun` and
#      `mpicc` are already there (Debian/Ubuntu, apt-get; as root, or through
#      sudo);
#   2. clippy with the feature (all targets, and the library alone), warnings
#      denied; under CI's RUSTC_WORKSPACE_WRAPPER=scripts/clippy-rustc.sh the
#      builds of step 3 lint every target they compile (the library, its unit
#      tests, tests/mpi.rs, the example: the only code gated on the feature
#      is in the library), so only the library alone is checked here;
#   3. builds the training example with the feature (the tests run it under
#      mpirun -np 2 against its TCP run) and runs the MPI tests, which start
#      `mpirun -np 2` and `-np 3` jobs; SYNCBN_REQUIRE_MPI=1 makes a missing
#      mpirun a failure instead of a skip.
# Only what the feature adds: the rest of the suite runs without it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v mpirun >/dev/null || ! command -v mpicc >/dev/null; then
  echo "== installing Open MPI (libopenmpi-dev openmpi-bin) and libclang for the bindings" >&2
  sudo=""
  if [[ "$(id -u)" != "0" ]]; then sudo="sudo"; fi
  pkgs=(libopenmpi-dev openmpi-bin libclang1-14 libclang-common-14-dev)
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y --no-install-recommends "${pkgs[@]}" \
    || { $sudo apt-get update && $sudo apt-get install -y --no-install-recommends "${pkgs[@]}"; }
fi

# Open MPI refuses to start ranks as root without these; the tests pass
# --oversubscribe (more ranks than cores on small CI machines).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

echo "== clippy (mpi)" >&2
if [[ "${RUSTC_WORKSPACE_WRAPPER:-}" != */scripts/clippy-rustc.sh ]]; then
  cargo clippy --all-targets --features mpi -- -D warnings
fi
cargo clippy --features mpi -- -D warnings

echo "== MPI tests under mpirun -np 2 and -np 3" >&2
cargo build --features mpi --example train
SYNCBN_REQUIRE_MPI=1 cargo test --features mpi --test mpi
# The unit tests the feature adds (the header check, the backend choice).
cargo test --features mpi --lib group::mpi
