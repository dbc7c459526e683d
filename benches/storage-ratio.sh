#!/usr/bin/env bash
# Runs the `storage` criterion bench ROUNDS times (default 5) for each polling setting and
# prints, for each round and as the median and range over the rounds, for 4 KiB random reads and
# writes at QD1 and QD32:
#   - the ratio library-path IOPS ÷ raw io_uring IOPS (storage/vmbus_<case> against
#     storage/uring_<case>, measured one after the other in each run: A B A B over the rounds),
#     from criterion's estimates.json (the slope, else the mean); at QD1 also the time added per
#     request (us);
#   - the two-thread io_uring baseline (storage/pipe_<case>: the same io_uring work split over
#     two spinning threads that hand requests and completions over lock-free queues, the
#     ceiling of any split design on this machine): its IOPS ÷ raw io_uring's, and the library
#     path's IOPS ÷ its;
#   - the CPU time per I/O of the stack (vspd + the guest side, this bench's process) and of raw
#     io_uring, and their ratio; the system calls per I/O on each side (counted by perf, if it
#     can here); from the bench's `cost` lines (a fixed run after each function);
#   - the bench's wake-up counts (`wakeups` lines).
# Polling: POLL_US="1000 0" (default) runs every round once with both sides polling up to
# 1000 us (vspd's default) and once with --poll-us 0 (sleep at once), alternately.
#
# Usage: benches/storage-ratio.sh [ROUNDS] [criterion options...]
#   e.g. ROUNDS=3 POLL_US=0 benches/storage-ratio.sh --measurement-time 2
#        VMBUS_BENCH_STORAGE_DIRECT=1 benches/storage-ratio.sh     (O_DIRECT on both sides)
#        CASES="randread_qd32" benches/storage-ratio.sh 5          (only that case: the bench runs
#                                                                   no other, cost runs included)
# Builds the release binaries first (the bench runs target/release/vspd).
# Criterion's own report goes to stderr (HTML under <target>/criterion); stdout has the figures.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
# shellcheck source=benches/criterion-lib.sh
source "$root/benches/criterion-lib.sh"
rounds_arg "$@"
shift "$shift_args"
read -r -a polls <<<"${POLL_US:-1000 0}"

read -r -a cases <<<"${CASES:-randread_qd1 randread_qd32 randwrite_qd1 randwrite_qd32}"
declare -A ratio delta cpu_ratio sys_stack sys_uring pipe_ratio vs_pipe
log=$(mktemp)
trap 'rm -f "$log"' EXIT
(cd "$root" && cargo build -q --release --bins) >&2
exe=$(bench_exe storage)
ns() { criterion_ns storage "$1"; }
# field KEY: the number after KEY on a `cost` line (stdin); "?" if absent.
field() { awk -v k="$1" '{ gsub(/[()]/, ""); for (i = 1; i < NF; i++) if ($i == k) { print $(i + 1); f = 1; exit } } END { if (!f) print "?" }'; }
cost_line() { grep "^cost storage/$1:" "$log" | tail -n1; }

echo "storage: library path (vspd + loopback storvsc Disk) vs raw io_uring, 4 KiB random," \
    "$([[ ${VMBUS_BENCH_STORAGE_DIRECT:-} == 1 ]] && echo O_DIRECT || echo page cache); $rounds rounds;" \
    "polling ${polls[*]} us; $(uptime)"
for ((i = 1; i <= rounds; i++)); do
    for poll in "${polls[@]}"; do
        (cd "$root" && VMBUS_BENCH_POLL_US=$poll VMBUS_BENCH_STORAGE_CASES="${cases[*]}" "$exe" --bench "$@") 2>&1 | tee "$log" >&2
        if grep -q '^storage bench skipped' "$log"; then
            grep '^storage bench skipped' "$log"
            exit 1
        fi
        echo "round $i, poll $poll us:"
        for c in "${cases[@]}"; do
            v=$(ns "vmbus_$c") u=$(ns "uring_$c") p=$(ns "pipe_$c")
            vl=$(cost_line "vmbus_$c") ul=$(cost_line "uring_$c")
            vc=$(field cpu_us_per_io <<<"$vl") uc=$(field cpu_us_per_io <<<"$ul")
            vs=$(field vspd <<<"$(sed 's/.*syscalls_per_io//' <<<"$vl")")
            gs=$(field guest <<<"$(sed 's/.*syscalls_per_io//' <<<"$vl")")
            us=$(field syscalls_per_io <<<"$ul")
            k="$poll $c"
            ratio[$k]+="$(awk -v u="$u" -v v="$v" 'BEGIN { printf "%.3f", u / v }') "
            pipe_ratio[$k]+="$(awk -v u="$u" -v p="$p" 'BEGIN { printf "%.3f", u / p }') "
            vs_pipe[$k]+="$(awk -v p="$p" -v v="$v" 'BEGIN { printf "%.3f", p / v }') "
            delta[$k]+="$(awk -v u="$u" -v v="$v" 'BEGIN { printf "%.1f", (v - u) / 1e3 }') "
            cpu_ratio[$k]+="$(awk -v a="$vc" -v b="$uc" 'BEGIN { printf "%.2f", (b > 0) ? a / b : 0 }') "
            sys_stack[$k]+="$(awk -v a="$vs" -v b="$gs" 'BEGIN { printf "%.4f", (a > b) ? a : b }') "
            sys_uring[$k]+="$us "
            awk -v c="$c" -v u="$u" -v v="$v" -v p="$p" -v vc="$vc" -v uc="$uc" -v vs="$vs" -v gs="$gs" -v us="$us" 'BEGIN {
                printf "  %-15s vmbus %7.0f IOPS  io_uring %7.0f IOPS  ratio %.3f", c, 1e9 / v, 1e9 / u, u / v
                printf "  (two-thread io_uring %7.0f IOPS, %.3f of io_uring; vmbus/two-thread %.3f)", 1e9 / p, u / p, p / v
                if (c ~ /qd1$/) printf " (+%.1f us/req)", (v - u) / 1e3
                printf "  CPU us/IO: stack %s, io_uring %s", vc, uc
                printf "  syscalls/IO: vspd %s, guest %s, io_uring %s\n", vs, gs, us }'
        done
        sed -n "s/^wakeups storage\/vmbus_/  wakeups /p" "$log"
    done
done
echo "over $rounds rounds (ratio = library IOPS / io_uring IOPS; CPU ratio = stack CPU per I/O / io_uring's;" \
    "syscalls = the busier side's per I/O):"
for poll in "${polls[@]}"; do
    for c in "${cases[@]}"; do
        k="$poll $c"
        # shellcheck disable=SC2086 # word splitting of the value lists is intended
        {
            summary "  poll $poll us $c IOPS ratio" ${ratio[$k]}
            summary "  poll $poll us $c two-thread io_uring / io_uring (split-design ceiling)" ${pipe_ratio[$k]}
            summary "  poll $poll us $c IOPS ratio against the two-thread io_uring" ${vs_pipe[$k]}
            if [[ $c == *qd1 ]]; then
                summary "  poll $poll us $c added us per request" ${delta[$k]}
            fi
            summary "  poll $poll us $c CPU per I/O stack/io_uring" ${cpu_ratio[$k]}
            if [[ $c == *qd32 ]]; then
                summary "  poll $poll us $c syscalls per I/O, busier stack side (io_uring: $(printf '%s\n' ${sys_uring[$k]} | median))" ${sys_stack[$k]}
            fi
        }
    done
done
echo "goals: QD32 ratio >= 0.80 (page cache) / >= 0.95 (O_DIRECT); QD1 added latency <= 10 us;" \
    "QD32 with poll 0: CPU per I/O <= 2x io_uring's, <= 1/8 syscall per I/O on each side"
echo "load after: $(uptime)"
