#!/usr/bin/env bash
# Runs the `storage` criterion bench REPS times (default 1) and prints, for each run and as the
# median over the runs, the ratio library-path IOPS ÷ raw io_uring IOPS for 4 KiB random reads
# and writes at QD1 and QD32 (storage/vmbus_<op>_qd<N> against storage/uring_<op>_qd<N>), from
# criterion's estimates.json: the slope point estimate (time per request), or the mean where
# criterion computed no slope. At QD1 it also prints the difference in time per request (the
# mean latency added by the library path, in us), and for QD32 the bench's wake-up counts.
#
# Usage: benches/storage-ratio.sh [REPS] [criterion options...]
#   e.g. CARGO_TARGET_DIR=/work/target-sbench benches/storage-ratio.sh 3
#        VMBUS_BENCH_STORAGE_DIRECT=1 benches/storage-ratio.sh 3     (O_DIRECT on both sides)
# Builds the release binaries first (the bench runs target/release/vspd).
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
time_ns() { criterion_ns storage "$1"; } # function -> time per request in ns (slope, else mean)

cases=(randread_qd1 randread_qd32 randwrite_qd1 randwrite_qd32)
declare -A ratios deltas
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cd "$root"
cargo build -q --release --bins >&2
echo "storage: library path (vspd + loopback storvsc Disk) vs raw io_uring, 4 KiB random," \
    "${VMBUS_BENCH_STORAGE_DIRECT:+O_DIRECT}${VMBUS_BENCH_STORAGE_DIRECT:-page cache}"
for ((i = 1; i <= reps; i++)); do
    cargo bench -q -p vmbus-benches --bench storage -- "$@" 2>&1 | tee "$log" >&2
    if grep -q '^storage bench skipped' "$log"; then
        grep '^storage bench skipped' "$log"
        exit 1
    fi
    echo "run $i:"
    for c in "${cases[@]}"; do
        v=$(time_ns "vmbus_$c")
        u=$(time_ns "uring_$c")
        ratio=$(awk -v u="$u" -v v="$v" 'BEGIN { printf "%.3f", u / v }')
        delta=$(awk -v u="$u" -v v="$v" 'BEGIN { printf "%.1f", (v - u) / 1e3 }')
        ratios[$c]+="$ratio "
        deltas[$c]+="$delta "
        awk -v c="$c" -v u="$u" -v v="$v" -v q="$ratio" -v d="$delta" 'BEGIN {
            printf "  %-15s vmbus %8.0f IOPS  io_uring %8.0f IOPS  ratio %s", c, 1e9 / v, 1e9 / u, q
            if (c ~ /qd1$/) printf "  (+%s us per request)", d
            printf "\n" }'
    done
    sed -n "s/^wakeups storage\/vmbus_/  wakeups /p" "$log"
done
echo "median of $reps runs (ratio = library IOPS / io_uring IOPS):"
for c in "${cases[@]}"; do
    r=$(printf '%s\n' ${ratios[$c]} | median)
    line=$(printf '  %-15s ratio %s' "$c" "$r")
    if [[ $c == *qd1 ]]; then
        line+="  added latency $(printf '%s\n' ${deltas[$c]} | median) us (mean per request)"
    fi
    echo "$line"
done
echo "goals: QD32 ratio >= 0.80 (page cache) / >= 0.95 (O_DIRECT); QD1 added latency <= 10 us;" \
    "QD32 wake-ups (signals + interrupts) <= 0.1 per request"
