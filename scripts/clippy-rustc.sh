#!/usr/bin/env bash
# A RUSTC_WORKSPACE_WRAPPER that compiles this crate's targets with
# clippy-driver and every warning (clippy's lints included) denied: a build
# that lints as it compiles. `cargo clippy` is this same wrapper in check
# mode, which cannot give the test binaries; CI (.ci/run) builds the tests
# once this way instead of checking them with clippy and then building them
# again. clippy-driver takes the rustc path cargo passes first, as with
# `cargo clippy`. Dependencies are compiled by rustc as usual (cargo applies
# the wrapper to workspace members only), so their builds are shared with
# builds without the wrapper.
set -euo pipefail
exec "${CLIPPY_DRIVER:-clippy-driver}" "$@" -D warnings
