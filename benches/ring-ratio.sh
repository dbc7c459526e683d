#!/usr/bin/env bash
# Runs the `ring` criterion bench ROUNDS times (default 5) and prints, for each round and as the
# median and range over the rounds, the ratio ring packets/s ÷ ArrayQueue packets/s for 64-byte
# and 4 KiB payloads, and at 4 KiB the ring's bytes/s ÷ a plain memcpy's between the same two
# threads (the physical limit). Each round measures the contenders one after the other in one
# run of the bench (ring, ArrayQueue, then at 4 KiB memcpy), so rounds alternate A B A B. Both
# contenders of a size count the same packets per iteration: the ratio is the baseline's time
# per packet ÷ the ring's, from criterion's estimates.json (the slope, else the mean).
#
# With BASELINE=<an older ring bench executable> (e.g. built from main, see README), every round
# first runs that executable (its results under <target>/criterion-baseline), then the current
# one, and also prints the ratio current ring ÷ baseline ring: old against new, interleaved.
#
# Usage: benches/ring-ratio.sh [ROUNDS] [criterion options...]
#   e.g. ROUNDS=7 benches/ring-ratio.sh --measurement-time 3
#        BASELINE=target/baseline/ring-main benches/ring-ratio.sh 5
# The ring's data area is VMBUS_BENCH_RING_KIB (KiB) if set, else the bench's default.
# RT=1 runs the bench under SCHED_FIFO (chrt -f 10; root): each of its two threads then keeps
# a core to itself, where under normal scheduling the ratios depend on whether the scheduler
# puts both on one core (no cross-core traffic: ArrayQueue's 85 instructions per element win)
# or on two, and swing by several times on a shared machine. It takes both cores for the
# run (the kernel's RT throttling leaves 5% to everything else).
# Criterion's own report goes to stderr (HTML under <target>/criterion); stdout has the ratios.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
# shellcheck source=benches/criterion-lib.sh
source "$root/benches/criterion-lib.sh"
rounds_arg "$@"
shift "$shift_args"

exe=$(bench_exe ring)
run=()
if [[ ${RT:-0} == 1 ]]; then
    command -v chrt >/dev/null && [[ $(id -u) == 0 ]] || {
        echo "ring-ratio: RT=1 needs root and chrt" >&2
        exit 1
    }
    run=(chrt -f 10)
fi
base_home=$target/criterion-baseline
ns() { criterion_ns ring "$@"; } # function/parameter [home] -> time per packet in ns
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }

r64=() r4k=() rmem=() old64=() old4k=()
echo "ring: $rounds rounds$([[ ${RT:-0} == 1 ]] && echo ", SCHED_FIFO"); $(uptime)"
for ((i = 1; i <= rounds; i++)); do
    if [[ -n ${BASELINE:-} ]]; then
        CRITERION_HOME=$base_home "${run[@]}" "$BASELINE" --bench "$@" >&2
    fi
    "${run[@]}" "$exe" --bench "$@" >&2
    line="round $i:"
    for size in 64 4096; do
        ring=$(ns "vmbus_ring/$size") aq=$(ns "arrayqueue/$size")
        q=$(ratio "$aq" "$ring")
        line+=$(awk -v a="$aq" -v r="$ring" -v s="$size" -v q="$q" 'BEGIN {
            printf "  %s B: ring %.2f Mpkt/s, ArrayQueue %.2f, ratio %s", s, 1e3 / r, 1e3 / a, q }')
        if [[ $size == 64 ]]; then r64+=("$q"); else r4k+=("$q"); fi
        if [[ -n ${BASELINE:-} ]]; then
            old=$(ns "vmbus_ring/$size" "$base_home")
            line+=$(awk -v o="$old" 'BEGIN { printf " (baseline ring %.2f", 1e3 / o }')
            line+=", new/old $(ratio "$old" "$ring"))"
            if [[ $size == 64 ]]; then old64+=("$(ratio "$old" "$ring")"); else old4k+=("$(ratio "$old" "$ring")"); fi
        fi
    done
    mem=$(ns "memcpy/4096")
    rmem+=("$(ratio "$mem" "$(ns "vmbus_ring/4096")")")
    line+=$(awk -v m="$mem" -v q="${rmem[-1]}" 'BEGIN { printf "  memcpy 4 KiB %.2f GB/s, ring/memcpy %s", 4096 / m, q }')
    echo "$line"
done
summary "64 B ring/ArrayQueue (goal >= 2)" "${r64[@]}"
summary "4 KiB ring/ArrayQueue (goal >= 1)" "${r4k[@]}"
summary "4 KiB ring/memcpy bytes/s" "${rmem[@]}"
if [[ -n ${BASELINE:-} ]]; then
    summary "64 B ring new/baseline" "${old64[@]}"
    summary "4 KiB ring new/baseline" "${old4k[@]}"
fi
echo "load after: $(uptime)"
