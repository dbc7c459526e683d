#!/usr/bin/env bash
# fio, 4 KiB random read and random write at QD1 and QD32, against three targets on the same
# 1 GiB image file (on the target directory's file system, not tmpfs):
#   file    fio's io_uring engine on the file itself (the ceiling);
#   nbdkit  nbdkit's file plugin over NBD on a Unix socket (a peer userspace NBD server),
#           fio's nbd engine (libnbd, asynchronous: iodepth applies);
#   ours    target/release/vspd serving the file, target/release/vscd --nbd exporting it
#           (NBD -> storvsc -> VMBus ring -> storvsp -> io_uring), fio's nbd engine on disk0;
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
# Prints one table: IOPS and p50/p99 latency per case, then the ratios ours/nbdkit and ours/file
# (IOPS) and the p50 difference ours - file. Latency is fio's total latency (`lat`: submission
# plus completion, --lat_percentiles=1): its `clat` alone is ~0 for the file's buffered io_uring
# requests, which complete inline in the submitting system call.
#
# Usage: benches/storage-vs-baseline.sh          (RUNTIME=seconds per case, default 6)
#   e.g. CARGO_TARGET_DIR=/work/target-sbench benches/storage-vs-baseline.sh
# Installs its tools only through scripts/install-deps.sh (fio, nbdkit); builds the release
# binaries. Servers it starts are stopped on exit. fio's JSON is kept in <target>/storage-fio/.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
runtime=${RUNTIME:-6}

"$root/scripts/install-deps.sh" >&2
for tool in fio nbdkit jq; do
    command -v "$tool" >/dev/null || {
        echo "storage-vs-baseline: $tool is missing" >&2
        exit 1
    }
done
(cd "$root" && cargo build -q --release --bins) >&2
vspd=$target/release/vspd
vscd=$target/release/vscd

dir=$target/storage-fio
mkdir -p "$dir"
img=$dir/image.raw
if [[ $(stat -c %s "$img" 2>/dev/null || echo 0) != $((1 << 30)) ]]; then
    echo "creating $img (1 GiB)" >&2
    dd if=/dev/urandom of="$img" bs=1M count=1024 conv=fsync status=none
fi

pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    pids=()
    rm -f "$dir"/*.sock
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_socket() { # path pid
    local i
    for ((i = 0; i < 500; i++)); do
        [[ -S $1 ]] && return 0
        kill -0 "$2" 2>/dev/null || {
            echo "storage-vs-baseline: the server for $1 exited" >&2
            exit 1
        }
        sleep 0.02
    done
    echo "storage-vs-baseline: no socket $1 after 10 s" >&2
    exit 1
}

start_servers() { # mode
    local direct=$1
    rm -f "$dir"/*.sock
    local nbdkit_opts=()
    [[ $direct == direct ]] && nbdkit_opts=(cache=none fadvise=random)
    nbdkit --foreground --exit-with-parent -U "$dir/nbdkit.sock" file "$img" "${nbdkit_opts[@]}" &
    pids+=($!)
    wait_socket "$dir/nbdkit.sock" $!
    local disk="path=$img"
    [[ $direct == direct ]] && disk+=",direct=on"
    VSPD_LOG=warn "$vspd" --socket "$dir/vspd.sock" --disk "$disk" </dev/null &
    pids+=($!)
    wait_socket "$dir/vspd.sock" $!
    "$vscd" --connect "$dir/vspd.sock" --nbd "$dir/ours.sock" </dev/null 2>/dev/null &
    pids+=($!)
    wait_socket "$dir/ours.sock" $!
}

uncache() { # drop the image from the page cache
    sync "$img"
    dd if="$img" iflag=nocache count=0 status=none
}

declare -A iops p50 p99
run_fio() { # mode rw qd target
    local mode=$1 rw=$2 qd=$3 tgt=$4 out
    out="$dir/$mode-$rw-qd$qd-$tgt.json"
    local args=(--name="$tgt" --rw="$rw" --bs=4k --iodepth="$qd" --time_based
        --runtime="$runtime" --ramp_time=1 --norandommap --randrepeat=1
        --lat_percentiles=1 --output-format=json --output="$out")
    case $tgt in
    file)
        args+=(--ioengine=io_uring --filename="$img" --size=1g --invalidate=0
            --direct=$([[ $mode == direct ]] && echo 1 || echo 0))
        ;;
    nbdkit) args+=(--ioengine=nbd --uri="nbd+unix:///?socket=$dir/nbdkit.sock") ;;
    ours) args+=(--ioengine=nbd --uri="nbd+unix:///disk0?socket=$dir/ours.sock") ;;
    esac
    [[ $mode == direct ]] && uncache
    fio "${args[@]}" >/dev/null
    local dirn=read
    [[ $rw == randwrite ]] && dirn=write
    local k="$mode $rw $qd $tgt"
    read -r "iops[$k]" "p50[$k]" "p99[$k]" < <(jq -r --arg d "$dirn" '.jobs[0][$d] |
        "\(.iops) \(.lat_ns.percentile["50.000000"] / 1000) \(.lat_ns.percentile["99.000000"] / 1000)"' "$out")
    printf '%-8s %-9s QD%-3s %-7s %9.0f IOPS  p50 %8.1f us  p99 %8.1f us\n' \
        "$mode" "$rw" "$qd" "$tgt" "${iops[$k]}" "${p50[$k]}" "${p99[$k]}" >&2
}

modes=(buffered direct)
rws=(randread randwrite)
qds=(1 32)
tgts=(file nbdkit ours)
start=$SECONDS
for mode in "${modes[@]}"; do
    start_servers "$mode"
    [[ $mode == buffered ]] && cat "$img" >/dev/null
    for rw in "${rws[@]}"; do
        for qd in "${qds[@]}"; do
            for tgt in "${tgts[@]}"; do
                run_fio "$mode" "$rw" "$qd" "$tgt"
            done
        done
    done
    cleanup
done

echo "fio 4 KiB random I/O, ${runtime} s per case, 1 GiB image on $(findmnt -no FSTYPE -T "$img" 2>/dev/null || echo '?'):" \
    "file = fio io_uring on the file, nbdkit = nbdkit file plugin over NBD, ours = vspd + vscd --nbd"
printf '%-8s %-9s %-4s | %-28s | %-28s | %-28s | %-14s %-12s %s\n' mode workload qd \
    "file: IOPS p50/p99 us" "nbdkit: IOPS p50/p99 us" "ours: IOPS p50/p99 us" \
    ours/nbdkit ours/file "p50 ours-file"
for mode in "${modes[@]}"; do
    for rw in "${rws[@]}"; do
        for qd in "${qds[@]}"; do
            line=$(printf '%-8s %-9s QD%-2s' "$mode" "$rw" "$qd")
            for tgt in "${tgts[@]}"; do
                k="$mode $rw $qd $tgt"
                line+=$(printf ' | %8.0f %8.1f/%-9.1f' "${iops[$k]}" "${p50[$k]}" "${p99[$k]}")
            done
            o="$mode $rw $qd ours"
            line+=$(awk -v o="${iops[$o]}" -v n="${iops[$mode $rw $qd nbdkit]}" \
                -v f="${iops[$mode $rw $qd file]}" -v po="${p50[$o]}" -v pf="${p50[$mode $rw $qd file]}" \
                'BEGIN { printf " | %-14.2f %-12.2f %+.1f us", o / n, o / f, po - pf }')
            echo "$line"
        done
    done
done
echo "goals: ours/nbdkit >= 1.2 at QD32; QD1 p50 at most 10 us above the file's. ($((SECONDS - start)) s)"
