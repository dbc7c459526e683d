#!/usr/bin/env bash
# QD1 latency of the NBD export against fio on the file, and where our microseconds go.
#
# For each case (buffered random read, direct random read, direct random write; 4 KiB, QD1),
# one vspd and one vscd --nbd run with --latency-breakdown on a 1 GiB image; each round runs
# fio's io_uring engine on the file, then fio's nbd engine on our export (A B A B ...), and
# prints both p50s. At the end of a case: the median and range over the rounds of
# ours p50 - file p50 (goal: at most 10 us), then the daemons' own breakdown over all its
# rounds (printed by them when they stop):
#   vscd nbd: reply write -> next request read             (idle: client turn + socket both ways)
#   vscd storvsc: request submitted -> SRB in the ring     (guest side, before the ring)
#   vscd storvsc: SRB in the ring -> its completion read   (host hops + transport both ways)
#   vscd nbd: completion -> reply write starts              (the reply path)
#   vspd storvsp: SRB read -> I/O submitted                (buffered: the read itself, inline)
#   vspd storvsp: I/O submitted -> completion reaped       (the disk)
#   vspd storvsp: completion reaped -> answer in the ring
# The transport (ring, polling or wakeups, both ways) is the round trip minus vspd's hops; the
# rest of fio's p50 is the NBD client and the socket into vscd.
# Each round also runs fio's nbd engine against `nbd-null` (the same NBD server code with a
# device that answers at once: no VMBus hop, no disk), the floor under any NBD export here:
# floor - file (buffered) is what the NBD client and the socket cost by themselves, ours -
# floor what the VMBus path and the I/O add to it. nbd-null and its fio run pinned to one CPU
# (FLOOR_CPU, default 0): the placement where fio's wake-up costs least, and the one fio finds
# with our export (three busy threads on two cores: fio shares a core with the thread that
# answers it, and the reply's wake-up preempts that thread at once). Unpinned, fio and
# nbd-null's one busy thread spread over both cores and each reply wakes fio on an idle core:
# measured on an AMD EPYC machine of this kind, 37-39 us p50 instead of 11-13 us.
#
# Usage: [ROUNDS=5] [RUNTIME=4] [POLL_US=1000] [CASES=...] [FLOOR_CPU=0] benches/latency-breakdown.sh
#   CASES: a comma-separated subset, e.g. CASES="direct randread,direct randwrite".
#   VSPD, VSCD: the daemons to run (default: the release build's), e.g. an older build's copy
#   for an A/B: run the script alternately with each.
# Needs fio and jq (scripts/install-deps.sh); builds the release binaries.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
runtime=${RUNTIME:-4}
poll_us=${POLL_US:-1000}
# shellcheck source=benches/criterion-lib.sh
source "$root/benches/criterion-lib.sh"
rounds_arg "$@"

"$root/scripts/install-deps.sh" >&2
require_tools fio jq taskset
floor_cpu=${FLOOR_CPU:-0}
(cd "$root" && cargo build -q --release --bins) >&2
bin=$target/release

dir=$target/storage-fio
img=$(bench_image "$dir")
logs=$(mktemp -d)
pids=()
stop_daemons() {
    local p
    # vscd first: its report, then vspd's.
    for p in "${pids[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    pids=()
}
trap 'stop_daemons; rm -rf "$logs"' EXIT
trap 'exit 130' INT TERM

uncache() {
    sync "$img"
    dd if="$img" iflag=nocache count=0 status=none
}

# p50 MODE RW TARGET: fio's p50 total latency in microseconds; TARGET: file, ours or null.
p50() {
    local mode=$1 rw=$2 tgt=$3 direct=0 dirn=read out=$logs/fio.json
    [[ $mode == direct ]] && direct=1
    [[ $rw == randwrite ]] && dirn=write
    local args=(--name=qd1 --rw="$rw" --bs=4k --iodepth=1 --time_based --runtime="$runtime"
        --ramp_time=1 --norandommap --randrepeat=1 --lat_percentiles=1 --output-format=json
        --output="$out")
    if [[ $tgt == file ]]; then
        args+=(--ioengine=io_uring --filename="$img" --size=1g --invalidate=0 --direct=$direct)
    else
        args+=(--ioengine=nbd --uri="nbd+unix:///disk0?socket=$logs/$tgt.sock")
    fi
    [[ $mode == direct ]] && uncache
    local pin=()
    [[ $tgt == null ]] && pin=(taskset -c "$floor_cpu")
    "${pin[@]}" fio "${args[@]}" >/dev/null
    jq -r --arg d "$dirn" '.jobs[0][$d].lat_ns.percentile["50.000000"] / 1000' "$out"
}

echo "QD1 p50: ours (vspd + vscd --nbd, --poll-us $poll_us) against fio io_uring on the file," \
    "$rounds rounds of ${runtime} s; $(uptime)"
IFS=, read -r -a cases <<<"${CASES:-buffered randread,direct randread,direct randwrite}"
for case in "${cases[@]}"; do
    read -r mode rw <<<"$case"
    [[ $mode =~ ^(buffered|direct)$ && $rw =~ ^rand(read|write)$ ]] || {
        echo "latency-breakdown: unknown case '$case' (MODE RW: buffered|direct randread|randwrite)" >&2
        exit 1
    }
    disk="path=$img"
    [[ $mode == direct ]] && disk+=",direct=on"
    rm -f "$logs"/*.sock
    VSPD_LOG=warn "${VSPD:-$bin/vspd}" --latency-breakdown --poll-us "$poll_us" --socket "$logs/vspd.sock" \
        --disk "$disk" </dev/null 2>"$logs/vspd.log" &
    vspd_pid=$!
    wait_socket "$logs/vspd.sock" $vspd_pid
    "${VSCD:-$bin/vscd}" --latency-breakdown --poll-us "$poll_us" --connect "$logs/vspd.sock" \
        --nbd "$logs/ours.sock" </dev/null 2>"$logs/vscd.log" &
    pids=($! $vspd_pid)
    wait_socket "$logs/ours.sock" "${pids[0]}"
    taskset -c "$floor_cpu" "$bin/nbd-null" "$logs/null.sock" 1024 </dev/null 2>"$logs/null.log" &
    pids+=($!)
    wait_socket "$logs/null.sock" "${pids[2]}"
    [[ $mode == buffered ]] && cat "$img" >/dev/null
    diffs=() floors=() adds=()
    for ((r = 1; r <= rounds; r++)); do
        f=$(p50 "$mode" "$rw" file)
        o=$(p50 "$mode" "$rw" ours)
        n=$(p50 "$mode" "$rw" null)
        d=$(awk -v o="$o" -v f="$f" 'BEGIN { print o - f }')
        diffs+=("$d")
        floors+=("$(awk -v n="$n" -v f="$f" 'BEGIN { print n - f }')")
        adds+=("$(awk -v o="$o" -v n="$n" 'BEGIN { print o - n }')")
        printf '%-8s %-9s round %d: file p50 %6.1f us  ours p50 %6.1f us  ours - file %6.1f us  (floor: nbd-null p50 %6.1f us, CPU %s)\n' \
            "$mode" "$rw" "$r" "$f" "$o" "$d" "$n" "$floor_cpu"
    done
    stop_daemons
    summary "$mode $rw: ours p50 - file p50 (us, goal at most 10)" "${diffs[@]}"
    # (With O_DIRECT the file's p50 holds the disk's time, which nbd-null does not have.)
    if [[ $mode == buffered ]]; then
        summary "$mode $rw: floor: nbd-null p50 - file p50 (us; the NBD client and socket alone)" "${floors[@]}"
    fi
    summary "$mode $rw: ours p50 - nbd-null p50 (us; what the VMBus path and the I/O add)" "${adds[@]}"
    sed -n '/latency breakdown/,$p' "$logs/vscd.log" "$logs/vspd.log" | sed 's/^/  /'
done
