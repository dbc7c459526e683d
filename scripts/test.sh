#!/usr/bin/env bash
# The project's test command (README.md and .ci/run call exactly this).
# Installs what the tests need, then runs every test of the workspace (unit tests, the
# cross-process ring test, the control-plane tests against the real vspd, the loom model,
# property tests), the doctests, and a short run of every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo nextest run --workspace --no-fail-fast
cargo test --workspace --doc
scripts/fuzz-smoke.sh "${FUZZ_SECONDS:-15}"
