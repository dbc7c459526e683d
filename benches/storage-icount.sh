#!/usr/bin/env bash
# Instructions per request of vspd's storage hot path, counted by valgrind's callgrind: the
# storage bench (library path, 4 KiB at QD32) runs against a vspd under callgrind, and this
# prints, per SRB served, the instructions of the channel worker's two halves:
#   handle: read the packet, parse it, decode the SCSI command, translate the buffer, queue
#           the io_uring SQE (<Storvsp as Device>::handle, inclusive);
#   poll:   submit, reap the CQEs, build and write the completion packets (::poll, inclusive);
# and the functions with the most instructions of their own. The kernel's share (the copy, the
# page cache, io_uring) is not counted: user space only.
#
# Why: the worker is the bottleneck thread at QD32 on the page cache, and wall time on this
# machine moves by a fifth from run to run; instruction counts compare two versions of the hot
# path where IOPS cannot (repeatable to well under 1%: batch sizes, and so the per-batch share
# of `poll`, vary a little with timing). Fewer instructions is not always faster (cache misses
# on the ring's lines dominate), so confirm a gain with storage-ratio.sh.
#
# Usage: [CASES="randread_qd32 randwrite_qd32"] [VSPD=path] benches/storage-icount.sh
#   VSPD: the vspd to count (default: the release build's), e.g. an older build's copy.
#   KEEP=DIR keeps each case's callgrind output as DIR/callgrind.CASE.out, for
#   `callgrind_annotate --auto=yes` (instructions per source line).
#   GUEST=1 counts the guest side instead: the bench process (its storvsc queue thread) under
#   callgrind against a native vspd. It prints per request the submit call (Disk::submit_read,
#   or Disk::submit for writes, with the SegQueue or same-thread hand-over), the SRB packet's
#   ring write, and per completion read `complete_one` (which runs the bench's callback, and
#   so the next submit); and the queue thread's total per SRB, which also counts its idle
#   polling (not repeatable: compare the per-call figures).
# Criterion's results of these (slow) runs go to a temporary directory, not target/criterion.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
# shellcheck source=benches/criterion-lib.sh
source "$root/benches/criterion-lib.sh"
require_tools --hint "apt-get install valgrind jq" valgrind callgrind_annotate jq
(cd "$root" && cargo build -q --release --bins) >&2
vspd=${VSPD:-$target/release/vspd}
exe=$(bench_exe storage)
read -r -a cases <<<"${CASES:-randread_qd32 randwrite_qd32}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The bench starts `$VMBUS_BENCH_VSPD` with vspd's arguments: run it under callgrind. No
# seccomp filter: valgrind makes system calls the filter does not allow.
cat >"$work/vspd" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$work/callgrind.out "$vspd" --no-seccomp "\$@"
EOF
chmod +x "$work/vspd"

if [[ ${GUEST:-} == 1 ]]; then
    echo "storage-icount: user-space instructions per request of the guest's storvsc queue thread"
    for c in "${cases[@]}"; do
        (cd "$root" && CRITERION_HOME="$work/criterion" VMBUS_BENCH_VSPD="$vspd" \
            VMBUS_BENCH_STORAGE_CASES="$c" valgrind --tool=callgrind \
            --callgrind-out-file="$work/guest.out" "$exe" --bench --warm-up-time 1 \
            --measurement-time 1 "storage/vmbus_$c") >"$work/bench.log" 2>&1 || {
            tail -n 20 "$work/bench.log" >&2
            exit 1
        }
        [[ -n ${KEEP:-} ]] && mkdir -p "$KEEP" && cp "$work/guest.out" "$KEEP/callgrind.guest.$c.out"
        callgrind_annotate --inclusive=yes --tree=calling --auto=no "$work/guest.out" \
            >"$work/tree.txt" 2>/dev/null
        # per_call NAME: "instructions calls" of the first callee line naming NAME.
        per_call() {
            awk -v name="$1" 'index($0, name " (") && / > / {
                ir = $1; gsub(",", "", ir)
                match($0, /\([0-9,]+x\)/); calls = substr($0, RSTART, RLENGTH)
                gsub(/[(),x]/, "", calls)
                print ir, calls; exit }' "$work/tree.txt"
        }
        submit="vsc::storvsc::Disk::submit_read"
        [[ $c == randwrite* ]] && submit="vsc::storvsc::Disk::submit"
        read -r s_ir s_n < <(per_call "$submit") || true
        read -r w_ir w_n < <(per_call "ringbuf::ring::OutgoingRing::write") || true
        read -r c_ir c_n < <(per_call "vsc::storvsc::Queue::complete_one") || true
        total=$(awk '/\*.*vsc::queue::EventLoop::run \[/ { gsub(",", "", $1); print $1; exit }' \
            "$work/tree.txt")
        if [[ -z ${s_n:-} || -z ${w_n:-} || -z ${c_n:-} || -z $total ]]; then
            echo "storage-icount: the guest profile lacks the functions it looks for" >&2
            exit 1
        fi
        awk -v c="$c" -v si="$s_ir" -v sn="$s_n" -v wi="$w_ir" -v wn="$w_n" -v ci="$c_ir" \
            -v cn="$c_n" -v t="$total" 'BEGIN {
            printf "  %-15s %d SRBs: submit %.0f, SRB write %.0f, complete_one %.0f (callback included);" \
                " queue thread %.0f per SRB (idle polling included)\n", c, wn, si / sn, wi / wn, ci / cn, t / wn }'
    done
    exit 0
fi

echo "storage-icount: user-space instructions per request of vspd's channel worker ($vspd)"
for c in "${cases[@]}"; do
    rm -f "$work/callgrind.out"
    (cd "$root" && CRITERION_HOME="$work/criterion" VMBUS_BENCH_VSPD="$work/vspd" \
        VMBUS_BENCH_STORAGE_CASES="$c" "$exe" --bench --warm-up-time 1 --measurement-time 1 \
        "storage/vmbus_$c") >"$work/bench.log" 2>&1 || {
        tail -n 20 "$work/bench.log" >&2
        exit 1
    }
    if grep -q '^storage bench skipped' "$work/bench.log"; then
        grep '^storage bench skipped' "$work/bench.log"
        exit 1
    fi
    [[ -s $work/callgrind.out ]] || {
        echo "storage-icount: vspd left no callgrind output" >&2
        exit 1
    }
    if [[ -n ${KEEP:-} ]]; then
        mkdir -p "$KEEP"
        cp "$work/callgrind.out" "$KEEP/callgrind.$c.out"
    fi
    # The callees of the worker loop, with their inclusive counts and calls: lines like
    #   432,680,869 (57.71%)  >   /path/storvsp.rs:<vsp::storvsp::Storvsp as ...>::handle (386,669x)
    callgrind_annotate --inclusive=yes --tree=calling --auto=no "$work/callgrind.out" >"$work/tree.txt" 2>/dev/null
    callee() { # NAME: "instructions calls" of the worker loop's callee NAME
        awk -v name="$1" '
            /^ *[0-9,]+ .*\* .*vsp::channel::Worker::run / { inside = 1; next }
            inside && !/>/ { inside = 0 }
            inside && index($0, name " (") {
                ir = $1; gsub(",", "", ir)
                match($0, /\([0-9,]+x\)/); calls = substr($0, RSTART, RLENGTH)
                gsub(/[(),x]/, "", calls)
                print ir, calls; exit
            }' "$work/tree.txt"
    }
    read -r handle_ir requests < <(callee "as vsp::channel::Device>::handle") || true
    read -r poll_ir _ < <(callee "as vsp::channel::Device>::poll") || true
    if [[ -z ${requests:-} || ${requests:-0} == 0 ]]; then
        echo "storage-icount: no requests found in the profile" >&2
        exit 1
    fi
    awk -v c="$c" -v h="$handle_ir" -v p="$poll_ir" -v n="$requests" 'BEGIN {
        printf "  %-15s %d requests: handle %.0f + poll %.0f = %.0f instructions per request\n",
            c, n, h / n, p / n, (h + p) / n }'
    echo "    most instructions of their own (inlined code counted where it was inlined), per request:"
    callgrind_annotate --auto=no "$work/callgrind.out" >"$work/flat.txt" 2>/dev/null
    awk -v n="$requests" '
        /file:function/ { on = 1; getline; next }
        on && NF == 0 { on = 0 }
        on && NF >= 3 && $1 ~ /^[0-9,]+$/ {
            ir = $1; gsub(",", "", ir)
            fn = $0; sub(/^ *[0-9,]+ *(\([^)]*\))? */, "", fn); sub(/ \[.*\]$/, "", fn)
            sub(/^[^:]*:/, "", fn)
            own[fn] += ir
        }
        END { for (f in own) printf "    %8.1f  %s\n", own[f] / n, substr(f, 1, 110) }' \
        "$work/flat.txt" | sort -rn | head -n 12
done
