#!/usr/bin/env bash
# The project's test command (README.md and .ci/run call exactly this).
# Installs what the tests need, then runs every test of the workspace (unit tests, the
# cross-process ring test, the control-plane tests against the real vspd, the loom model,
# property tests), the doctests, and a short run of every fuzz target (first, so the test
# runners' summaries close the output).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/fuzz.sh "${FUZZ_SECONDS:-15}"
cargo nextest run --workspace --no-fail-fast
cargo test --workspace --doc
