#!/usr/bin/env bash
# Runs the `ring` criterion bench REPS times (default 1) and prints, for each run and as the
# median over the runs, the ratio ring packets/s ÷ ArrayQueue packets/s for 64-byte and 4 KiB
# payloads. Both benchmarks of a size count the same packets per iteration, so the ratio is
# ArrayQueue's time per packet ÷ the ring's, from criterion's estimates.json: the slope point
# estimate (the "time" criterion prints, robust to a sample that lost its core to another
# process), or the mean where criterion computed no slope.
#
# Usage: benches/ring-ratio.sh [REPS] [criterion options...]
#   e.g. CARGO_TARGET_DIR=/work/target-bench benches/ring-ratio.sh 5 --measurement-time 3
# The ring's data area is VMBUS_BENCH_RING_KIB (KiB) if set, else the bench's default.
# Criterion's own report goes to stderr; stdout has only the ratios.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
reps=1
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
    reps=$1
    shift
fi

# shellcheck source=benches/criterion-lib.sh
source "$root/benches/criterion-lib.sh"
time_ns() { criterion_ns ring "$1"; } # function/parameter -> time per packet in ns (slope, else mean)

r64=() r4k=()
cd "$root"
for ((i = 1; i <= reps; i++)); do
    cargo bench -q -p vmbus-benches --bench ring -- "$@" >&2
    line="run $i:"
    for size in 64 4096; do
        ring=$(time_ns "vmbus_ring/$size")
        aq=$(time_ns "arrayqueue/$size")
        ratio=$(awk -v a="$aq" -v r="$ring" 'BEGIN { printf "%.2f", a / r }')
        line+=$(awk -v a="$aq" -v r="$ring" -v s="$size" -v q="$ratio" 'BEGIN {
            printf "  %s B: ring %.2f Mpkt/s, ArrayQueue %.2f Mpkt/s, ratio %s", s, 1e3 / r, 1e3 / a, q }')
        if [[ $size == 64 ]]; then r64+=("$ratio"); else r4k+=("$ratio"); fi
    done
    echo "$line"
done
echo "median of $reps: 64 B ratio $(printf '%s\n' "${r64[@]}" | median)  4096 B ratio $(printf '%s\n' "${r4k[@]}" | median)  (goal: >= 2 and >= 1)"
