#!/usr/bin/env bash
# Fuzz smoke test: runs every cargo-fuzz target in fuzz/ for a short time.
#
# Usage: scripts/fuzz-smoke.sh [SECONDS_PER_TARGET]   (default 30)
#
# Installs cargo-fuzz if it is missing. cargo-fuzz needs nightly compiler features (sanitizer
# flags); RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them. Exits non-zero if a target
# crashes (libFuzzer then leaves the input in fuzz/artifacts/<target>/) or fails to build.
# fuzz/target, fuzz/corpus and fuzz/artifacts are git-ignored.
set -euo pipefail

seconds="${1:-30}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
targets="$(cargo fuzz list)"
status=0
for target in $targets; do
    echo "=== fuzzing $target for ${seconds}s" >&2
    mkdir -p "corpus/$target"
    if ! cargo fuzz run "$target" -- -max_total_time="$seconds" -print_final_stats=1; then
        echo "=== $target FAILED (see fuzz/artifacts/$target/)" >&2
        status=1
    fi
done
exit "$status"
