#!/usr/bin/env bash
# Instructions per packet of the ring's data path (write + commit + read + validate + commit, one
# thread; see benches/src/bin/ring-icount.rs), counted by valgrind's callgrind: the difference
# between a run of N packets and a run of none, divided by N. Repeatable to the instruction, so
# it compares two versions of the hot path where wall time on a shared machine cannot.
#
# Usage: benches/ring-icount.sh [N]      (default N = 200000 packets per size)
#   BASELINE=<another ring-icount binary> (e.g. built from main) adds its counts and new/old.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
n=${1:-200000}
command -v valgrind >/dev/null || {
    echo "ring-icount: valgrind is missing (apt-get install valgrind)" >&2
    exit 1
}
(cd "$root" && cargo build -q --release -p vmbus-benches --bin ring-icount) >&2

# instructions BINARY SIZE PACKETS: the program's total instruction count under callgrind.
instructions() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$1" "$2" "$3" 2>&1 |
        sed -n 's/.*Collected : *\([0-9]*\).*/\1/p'
}
per_packet() { # BINARY SIZE
    local zero many
    zero=$(instructions "$1" "$2" 0)
    many=$(instructions "$1" "$2" "$n")
    awk -v z="$zero" -v m="$many" -v n="$n" 'BEGIN { printf "%.1f", (m - z) / n }'
}

for size in 64 4096; do
    new=$(per_packet "$target/release/ring-icount" "$size")
    line="$size B payload: $new instructions per packet"
    if [[ -n ${BASELINE:-} ]]; then
        old=$(per_packet "$BASELINE" "$size")
        line+=" (baseline $old, new/old $(awk -v a="$new" -v b="$old" 'BEGIN { printf "%.3f", a / b }'))"
    fi
    echo "$line"
done
