#!/usr/bin/env bash
# The project's test command (README.md and .ci/run call exactly this).
# Installs what the tests need, then runs every test of the workspace: unit tests, the
# cross-process ring test, the loom model, property tests and doctests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo nextest run --workspace --no-fail-fast
cargo test --workspace --doc
