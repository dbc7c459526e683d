#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/: first it replays the target's checked-in seeds
# (fuzz/seeds/TARGET: inputs that reach deep into the parser, and every input that once crashed
# it), then it fuzzes for SECONDS from those seeds and the local corpus.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 30 s, every target)
#        SECONDS 0 only replays the seeds.
#        FUZZ_JOBS=N runs N libFuzzer processes per target (default 1).
#
# Installs cargo-fuzz if it is missing. cargo-fuzz needs nightly compiler features (sanitizer
# flags); RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them. Exits non-zero if a target
# crashes on a seed or while fuzzing (libFuzzer then leaves the input in
# fuzz/artifacts/TARGET/: add it to fuzz/seeds/TARGET once fixed) or fails to build.
# fuzz/target, fuzz/corpus and fuzz/artifacts are git-ignored; fuzz/seeds is not.
set -euo pipefail

seconds="${1:-30}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
fi
shift || true

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
if (($#)); then
    targets="$*"
else
    targets="$(cargo fuzz list)"
fi
status=0
for target in $targets; do
    mkdir -p "corpus/$target" "seeds/$target"
    seeds=$(find "seeds/$target" -type f | wc -l)
    echo "=== $target: replaying $seeds seeds" >&2
    if ! cargo fuzz run "$target" "seeds/$target" -- -runs=0; then
        echo "=== $target FAILED on a seed" >&2
        status=1
        continue
    fi
    if [ "$seconds" -eq 0 ]; then
        continue
    fi
    echo "=== fuzzing $target for ${seconds}s" >&2
    parallel=()
    if [ "${FUZZ_JOBS:-1}" -gt 1 ]; then
        # libFuzzer's own fork mode: N processes sharing the corpus, logs in fuzz-N.log.
        parallel=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS")
    fi
    if ! cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 "${parallel[@]}"; then
        echo "=== $target FAILED (see fuzz/artifacts/$target/)" >&2
        status=1
    fi
done
exit "$status"
