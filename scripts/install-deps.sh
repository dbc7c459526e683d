#!/usr/bin/env bash
# Installs what the build and the tests need, idempotently. Safe to run on every CI run: each
# step checks before it installs.
set -euo pipefail

# The Rust toolchain itself comes with the machine (rustup, stable); its lint and format tools:
for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
        rustup component add "${component}"
    fi
done

# cargo-nextest runs each test in its own process (the cross-process tests rely on that only for
# isolation; plain `cargo test` works too).
if ! command -v cargo-nextest >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi
