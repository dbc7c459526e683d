#!/usr/bin/env bash
# fio, 4 KiB random read and random write at QD1 and QD32, against three targets on the same
# 1 GiB image file (on the target directory's file system, not tmpfs):
#   file    fio's io_uring engine on the file itself (the ceiling);
#   nbdkit  nbdkit's file plugin over NBD on a Unix socket (a peer userspace NBD server),
#           fio's nbd engine (libnbd, asynchronous: iodepth applies);
#   ours    target/release/vspd serving the file, target/release/vscd --nbd exporting it
#           (NBD -> storvsc -> VMBus ring -> storvsp -> io_uring), fio's nbd engine on disk0;
#   ours0   the same with --poll-us 0 on both daemons (no polling: they sleep at once);
# each both buffered (page cache, warmed first) and direct:
#   file    --direct=1 (O_DIRECT);
#   nbdkit  cache=none: nbdkit 1.32's file plugin has no O_DIRECT mode; cache=none drops the
#           pages of every request from the page cache after it (posix_fadvise DONTNEED, and
#           for writes sync_file_range first), which makes reads come from the disk like
#           O_DIRECT does, at the cost of extra syscalls per request; fadvise=random too;
#   ours    vspd --disk path=FILE,direct=on (O_DIRECT).
# Before each direct case the file is synced and dropped from the page cache
# (dd iflag=nocache count=0), so that no target reads from a warm cache.
#
# Every case runs ROUNDS times (default 5), the targets one after the other in each round
# (A B C A B C ...: this is the A/B script of the NBD comparisons). Each run prints IOPS, p50/p99
# latency, and the CPU time per I/O: of the server side (vspd + vscd for ours, nbdkit; none for
# the file) over the fio run, from perf's task-clock (else /proc/<pid>/stat's ticks), and of fio
# itself (its usr+sys from its JSON); and, if perf can count the raw_syscalls tracepoint here,
# the server side's system calls per I/O.
# (Server figures are per I/O completed in fio's measured window, over the whole fio process,
# ramp included: steady-state rates, a few percent high.)
# At the end, one table of medians over the rounds, then the ratios ours/nbdkit (IOPS) and the
# p50 difference ours - file as median and range, flagged when the range is too wide to trust.
# Latency is fio's total latency (`lat`: submission plus completion, --lat_percentiles=1): its
# `clat` alone is ~0 for the file's buffered io_uring requests, which complete inline in the
# submitting system call.
#
# The QD1 summary also gives nbdkit's p50 above the file's: what the NBD transport alone (the
# socket, libnbd's send/poll/receive in fio) costs a peer server, the floor under ours.
#
# Usage: benches/storage-vs-baseline.sh     (RUNTIME=seconds per run, default 6; ROUNDS=N)
#   e.g. ROUNDS=3 RUNTIME=3 TARGETS="file nbdkit ours" benches/storage-vs-baseline.sh
#   a subset of the cases: MODES="buffered direct", RWS="randread randwrite", QDS="1 32".
#   VSPD, VSCD: the daemons to run (default: the release build's), e.g. an older build's copy
#   for an A/B: run the script alternately with each.
# Installs its tools only through scripts/install-deps.sh (fio, nbdkit); builds the release
# binaries. Servers it starts are stopped on exit. fio's JSON is kept in <target>/storage-fio/.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
runtime=${RUNTIME:-6}
# shellcheck source=benches/criterion-lib.sh
source "$root/benches/criterion-lib.sh"
rounds_arg
read -r -a tgts <<<"${TARGETS:-file nbdkit ours ours0}"

"$root/scripts/install-deps.sh" >&2
require_tools fio nbdkit jq
(cd "$root" && cargo build -q --release --bins) >&2
vspd=${VSPD:-$target/release/vspd}
vscd=${VSCD:-$target/release/vscd}

dir=$target/storage-fio
img=$(bench_image "$dir")

pids=()
declare -A server_pids # target -> its server processes
cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    pids=()
    server_pids=()
    rm -f "$dir"/*.sock
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_ours() { # name mode poll-args...
    local name=$1 direct=$2
    shift 2
    local disk="path=$img"
    [[ $direct == direct ]] && disk+=",direct=on"
    VSPD_LOG=warn "$vspd" "$@" --socket "$dir/vspd-$name.sock" --disk "$disk" </dev/null &
    pids+=($!)
    server_pids[$name]=$!
    wait_socket "$dir/vspd-$name.sock" $!
    "$vscd" "$@" --connect "$dir/vspd-$name.sock" --nbd "$dir/$name.sock" </dev/null 2>/dev/null &
    pids+=($!)
    server_pids[$name]+=" $!"
    wait_socket "$dir/$name.sock" $!
}

start_servers() { # mode
    local direct=$1
    rm -f "$dir"/*.sock
    local nbdkit_opts=()
    [[ $direct == direct ]] && nbdkit_opts=(cache=none fadvise=random)
    nbdkit --foreground --exit-with-parent -U "$dir/nbdkit.sock" file "$img" "${nbdkit_opts[@]}" &
    pids+=($!)
    server_pids[nbdkit]=$!
    wait_socket "$dir/nbdkit.sock" $!
    start_ours ours "$direct"
    start_ours ours0 "$direct" --poll-us 0
}

uncache() { # drop the image from the page cache
    sync "$img"
    dd if="$img" iflag=nocache count=0 status=none
}

# cpu_ticks PID...: the processes' utime + stime so far, in clock ticks.
cpu_ticks() {
    local p t=0
    for p in "$@"; do
        t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{ print $12 + $13 }')))
    done
    echo "$t"
}

perf_ok=0
perf stat -e raw_syscalls:sys_enter,task-clock -x , -o /dev/null true 2>/dev/null && perf_ok=1
# perf_start PID...: counts the processes' system calls and CPU time until perf_stop.
perf_start() {
    perf_pids=()
    ((perf_ok)) || return 0
    local p
    for p in "$@"; do
        perf stat -e raw_syscalls:sys_enter,task-clock -x , -o "$dir/perf-$p.csv" -p "$p" 2>/dev/null &
        perf_pids+=($!)
    done
    sleep 0.3 # perf has no ready signal
}
# perf_stop PID...: sets perf_calls and perf_cpu (seconds), summed over the processes, or "?".
# Runs in this shell (not in a $(...) subshell): it must wait for its own perf children.
perf_stop() {
    perf_calls="?" perf_cpu="?"
    ((perf_ok)) || return 0
    local p
    for p in "${perf_pids[@]}"; do
        kill -INT "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    read -r perf_calls perf_cpu < <(for p in "$@"; do
        cat "$dir/perf-$p.csv"
        rm -f "$dir/perf-$p.csv"
    done | awk -F, '$3 == "raw_syscalls:sys_enter" && $1 ~ /^[0-9]/ { n += $1 }
                    $3 == "task-clock" && $1 ~ /^[0-9]/ { c += $1 / 1e3 }
                    END { printf "%d %.6f\n", n, c }')
}

declare -A iops p50 p99 srv_cpu fio_cpu srv_sys # "mode rw qd target" -> values, one per round
run_fio() { # mode rw qd target round
    local mode=$1 rw=$2 qd=$3 tgt=$4 round=$5 out
    out="$dir/$mode-$rw-qd$qd-$tgt-$round.json"
    local args=(--name="$tgt" --rw="$rw" --bs=4k --iodepth="$qd" --time_based
        --runtime="$runtime" --ramp_time=1 --norandommap --randrepeat=1
        --lat_percentiles=1 --output-format=json --output="$out")
    case $tgt in
    file)
        args+=(--ioengine=io_uring --filename="$img" --size=1g --invalidate=0
            --direct=$([[ $mode == direct ]] && echo 1 || echo 0))
        ;;
    nbdkit) args+=(--ioengine=nbd --uri="nbd+unix:///?socket=$dir/nbdkit.sock") ;;
    ours*) args+=(--ioengine=nbd --uri="nbd+unix:///disk0?socket=$dir/$tgt.sock") ;;
    esac
    [[ $mode == direct ]] && uncache
    local srv
    read -r -a srv <<<"${server_pids[$tgt]:-}"
    perf_start "${srv[@]}"
    local t0 c0 t1 c1 calls cpu
    c0=$(cpu_ticks "${srv[@]}")
    t0=$(date +%s.%N)
    fio "${args[@]}" >/dev/null
    t1=$(date +%s.%N)
    c1=$(cpu_ticks "${srv[@]}")
    perf_stop "${srv[@]}"
    calls=$perf_calls cpu=$perf_cpu
    # perf's task-clock is exact; /proc's ticks (10 ms) are the fallback.
    if [[ $cpu == "?" ]]; then
        cpu=$(awk -v t=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" 'BEGIN { print t / hz }')
    fi
    local dirn=read
    [[ $rw == randwrite ]] && dirn=write
    local k="$mode $rw $qd $tgt" v
    v=$(jq -r --arg d "$dirn" --argjson c "$cpu" \
        --argjson w "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" --arg calls "$calls" '
        .jobs[0] as $j | $j[$d].iops as $iops |
        "\($iops) \($j[$d].lat_ns.percentile["50.000000"] / 1000) \($j[$d].lat_ns.percentile["99.000000"] / 1000)" +
        " \($c / $w / $iops * 1e6)" +
        " \(($j.usr_cpu + $j.sys_cpu) / 100 / $iops * 1e6)" +
        " \(if $calls == "?" then "?" else ($calls | tonumber) / $w / $iops * 1000 | round / 1000 end)"' "$out")
    local a
    read -r -a a <<<"$v"
    iops[$k]+="${a[0]} " p50[$k]+="${a[1]} " p99[$k]+="${a[2]} "
    srv_cpu[$k]+="${a[3]} " fio_cpu[$k]+="${a[4]} " srv_sys[$k]+="${a[5]} "
    printf '%-8s %-9s QD%-3s %-6s round %d: %8.0f IOPS  p50 %8.1f us  p99 %8.1f us  CPU us/IO: server %5.2f fio %5.2f  server syscalls/IO %s\n' \
        "$mode" "$rw" "$qd" "$tgt" "$round" "${a[@]:0:5}" "${a[5]}"
}

read -r -a modes <<<"${MODES:-buffered direct}"
read -r -a rws <<<"${RWS:-randread randwrite}"
read -r -a qds <<<"${QDS:-1 32}"
start=$SECONDS
echo "fio 4 KiB random I/O, ${runtime} s per run, $rounds rounds, 1 GiB image on $(findmnt -no FSTYPE -T "$img" 2>/dev/null || echo '?');" \
    "$(uptime)"
for mode in "${modes[@]}"; do
    start_servers "$mode"
    [[ $mode == buffered ]] && cat "$img" >/dev/null
    for rw in "${rws[@]}"; do
        for qd in "${qds[@]}"; do
            for ((r = 1; r <= rounds; r++)); do
                for tgt in "${tgts[@]}"; do
                    run_fio "$mode" "$rw" "$qd" "$tgt" "$r"
                done
            done
        done
    done
    cleanup
done

med() { printf '%s\n' $1 | median; } # "v1 v2 ..." -> median
echo "medians over $rounds rounds: file = fio io_uring on the file, nbdkit = nbdkit file plugin" \
    "over NBD, ours = vspd + vscd --nbd, ours0 = the same with --poll-us 0; CPU = us per I/O" \
    "(server side + fio)"
for mode in "${modes[@]}"; do
    for rw in "${rws[@]}"; do
        for qd in "${qds[@]}"; do
            line=$(printf '%-8s %-9s QD%-2s' "$mode" "$rw" "$qd")
            for tgt in "${tgts[@]}"; do
                k="$mode $rw $qd $tgt"
                line+=$(printf ' | %s %7.0f IOPS p50 %6.1f CPU %5.2f+%5.2f' "$tgt" "$(med "${iops[$k]}")" \
                    "$(med "${p50[$k]}")" "$(med "${srv_cpu[$k]}")" "$(med "${fio_cpu[$k]}")")
            done
            echo "$line"
        done
    done
done
# ratios PREFIX A B: per-round IOPS ratios A/B of every case, summarised.
for mode in "${modes[@]}"; do
    for rw in "${rws[@]}"; do
        for qd in "${qds[@]}"; do
            c="$mode $rw $qd"
            for ours in nbdkit ours ours0; do
                [[ " ${tgts[*]} " == *" $ours "* ]] || continue
                if [[ $ours != nbdkit && " ${tgts[*]} " == *" nbdkit "* ]]; then
                    # shellcheck disable=SC2046 # one value per round
                    summary "$(printf '%-8s %-9s QD%-2s %-5s/nbdkit IOPS' $c $ours)" $(paste -d' ' \
                        <(printf '%s\n' ${iops[$c $ours]}) <(printf '%s\n' ${iops[$c nbdkit]}) |
                        awk '{ printf "%.3f\n", $1 / $2 }')
                fi
                if [[ $qd == 1 && " ${tgts[*]} " == *" file "* ]]; then
                    # shellcheck disable=SC2046
                    summary "$(printf '%-8s %-9s QD%-2s %-5s p50 - file p50 (us)' $c $ours)" $(paste -d' ' \
                        <(printf '%s\n' ${p50[$c $ours]}) <(printf '%s\n' ${p50[$c file]}) |
                        awk '{ printf "%.1f\n", $1 - $2 }')
                fi
            done
        done
    done
done
echo "goals: ours/nbdkit >= 1.2 at QD32; QD1 p50 at most 10 us above the file's. ($((SECONDS - start)) s; $(uptime))"
