#!/usr/bin/env bash
# The network path against a plain veth pair, in one run: iperf3 TCP (guest->host and
# host->guest, 1 and 4 streams) and ping RTT between two network namespaces, through our path
# (vscd --tap gtap -> netvsc -> VMBus ring -> netvsp -> vspd's TAP htap) and through a veth
# pair; then raw TAP frames/s against ours (the criterion bench `network`, 64-byte frames).
#
# Rounds alternate ours, veth, ours, veth...; each round is printed, then per metric the
# median and range of each path and the median ratio ours/veth (with its range). A range wider
# than 25% of the median gets a warning: the machine is shared and noisy, compare ratios only.
#
# Usage: [ROUNDS=5] [SECONDS_PER_TEST=3] [QUEUES=1] [RAW=1] benches/network-vs-baseline.sh
# VSPD=, VSCD=: the daemons to run (default: the release build's), e.g. an older build's copy
# for an A/B. Needs root, ip, iperf3 and ping (scripts/install-deps.sh). Builds the release
# binaries.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
rounds=${ROUNDS:-5}
secs=${SECONDS_PER_TEST:-3}
queues=${QUEUES:-1}
if [ "$(id -u)" -ne 0 ]; then
    echo "network-vs-baseline: needs root (network namespaces, TAPs)" >&2
    exit 1
fi
for t in ip iperf3 ping; do
    command -v "$t" >/dev/null || { echo "network-vs-baseline: $t is missing (scripts/install-deps.sh)" >&2; exit 1; }
done
cd "$root"
# shellcheck source=benches/criterion-lib.sh
source "$root/benches/criterion-lib.sh"
cargo build -q --release --bins >&2
bin=$target/release

tag=$$
H=nbh$tag G=nbg$tag A=nba$tag B=nbb$tag
dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for f in "$dir"/iperf3-*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for n in $H $G $A $B; do ip netns del "$n" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT
for n in $H $G $A $B; do
    ip netns add "$n"
    ip -n "$n" link set lo up
done

# Ours: vspd in H (host TAP htap), vscd in G (guest TAP gtap).
ip netns exec "$H" "${VSPD:-$bin/vspd}" --socket "$dir/vspd.sock" --nic "tap=htap,queues=$queues" 2>"$dir/vspd.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$dir/vspd.sock" ] && break; sleep 0.1; done
ip -n "$H" addr add 10.78.0.1/24 dev htap
ip -n "$H" link set htap up
ip netns exec "$G" "${VSCD:-$bin/vscd}" --connect "$dir/vspd.sock" --tap gtap --queues "$queues" 2>"$dir/vscd.log" &
vscd_pid=$!
pids+=($vscd_pid)
for _ in $(seq 100); do grep -q "network adapter behind" "$dir/vscd.log" && break; sleep 0.1; done
ip -n "$G" addr add 10.78.0.2/24 dev gtap
ip -n "$G" link set gtap up
# The baseline: a veth pair between A and B.
ip link add "va$tag" netns "$A" type veth peer name "vb$tag" netns "$B"
ip -n "$A" addr add 10.79.0.1/24 dev "va$tag"
ip -n "$B" addr add 10.79.0.2/24 dev "vb$tag"
ip -n "$A" link set "va$tag" up
ip -n "$B" link set "vb$tag" up
for ns in $H $A; do ip netns exec "$ns" iperf3 -s -D -I "$dir/iperf3-$ns.pid" >/dev/null; done
for _ in $(seq 50); do
    ip netns exec "$G" ping -c1 -W1 10.78.0.1 >/dev/null 2>&1 && break
done
ip netns exec "$B" ping -c1 -W1 10.79.0.1 >/dev/null

# iperf3 NS SERVER ARGS: the receiver's Gbit/s (the run is tried again once if the server
# was still busy with the previous one).
gbps() {
    local ns=$1 server=$2 v
    shift 2
    for _ in 1 2; do
        v=$({ ip netns exec "$ns" iperf3 -c "$server" -t "$secs" -f g "$@" 2>/dev/null || true; } |
            awk '/receiver/ { v = $(NF-2) } END { print v + 0 }')
        [ "$v" != 0 ] && break
        sleep 0.5
    done
    echo "$v"
}
# rtt NS ADDR COUNT INTERVAL: the median ping RTT in microseconds (the mean would follow the
# few pings a busy machine delays by milliseconds). 10 ms apart, every hop has gone to sleep
# (idle: each wakeup is paid); 0.2 ms apart, the two sides are still polling.
rtt() {
    { ip netns exec "$1" ping -c "$3" -i "$4" "$2" || true; } |
        sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' | median | awk '{ print $1 * 1000 }'
}

metrics=(tcp_g2h_1 tcp_h2g_1 tcp_g2h_4 tcp_h2g_4 ping_idle_us ping_busy_us tcp_g2h_1_notso)
declare -A vals
echo "network: ours (netvsc/netvsp over TAPs) vs veth, $rounds rounds, ${secs}s per iperf3 run, queues=$queues"
for ((r = 1; r <= rounds; r++)); do
    for path in ours veth; do
        if [ "$path" = ours ]; then c=$G s=10.78.0.1; else c=$B s=10.79.0.1; fi
        v1=$(gbps "$c" "$s")
        v2=$(gbps "$c" "$s" -R)
        v3=$(gbps "$c" "$s" -P 4)
        v4=$(gbps "$c" "$s" -P 4 -R)
        v5=$(rtt "$c" "$s" 100 0.01)
        v6=$(rtt "$c" "$s" 1000 0.0002)
        # The sender's segmentation offloads off (TSO and GSO: the guest's TCP cuts 1500-byte
        # frames itself), for the TSO gain.
        if [ "$path" = ours ]; then dev=gtap; else dev=vb$tag; fi
        ip netns exec "$c" ethtool -K "$dev" tso off gso off >/dev/null 2>&1 || true
        v7=$(gbps "$c" "$s")
        ip netns exec "$c" ethtool -K "$dev" tso on gso on >/dev/null 2>&1 || true
        i=0
        for v in "$v1" "$v2" "$v3" "$v4" "$v5" "$v6" "$v7"; do
            vals[$path.${metrics[$i]}]+="$v "
            i=$((i + 1))
        done
        printf 'round %d %-4s  g->h %6.2f Gbit/s  h->g %6.2f  (4 streams: %6.2f  %6.2f)  ping idle %6.1f us busy %5.1f us  g->h TSO off %6.2f\n' \
            "$r" "$path" "$v1" "$v2" "$v3" "$v4" "$v5" "$v6" "$v7"
    done
done

# stats "v1 v2 ...": median min max
stats() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m, v[1], v[NR] }'; }
echo
printf '%-12s %28s %28s %22s\n' metric "ours median [min-max]" "veth median [min-max]" "ours/veth [range]"
for m in "${metrics[@]}"; do
    read -r om omin omax <<<"$(stats <<<"${vals[ours.$m]}")"
    read -r vm vmin vmax <<<"$(stats <<<"${vals[veth.$m]}")"
    # Per-round ratios (round i of ours over round i of veth).
    ratios=$(paste -d' ' <(tr ' ' '\n' <<<"${vals[ours.$m]}" | grep -v '^$') \
        <(tr ' ' '\n' <<<"${vals[veth.$m]}" | grep -v '^$') |
        awk '{ if ($2 > 0) print $1 / $2 }' | tr '\n' ' ')
    read -r rm rmin rmax <<<"$(stats <<<"$ratios")"
    printf '%-12s %10.2f [%7.2f-%7.2f] %10.2f [%7.2f-%7.2f] %8.3f [%5.3f-%5.3f]\n' \
        "$m" "$om" "$omin" "$omax" "$vm" "$vmin" "$vmax" "$rm" "$rmin" "$rmax"
    for p in ours veth; do
        read -r med lo hi <<<"$(stats <<<"${vals[$p.$m]}")"
        if awk -v m="$med" -v l="$lo" -v h="$hi" 'BEGIN { exit !(m > 0 && (h - l) / m > 0.25) }'; then
            echo "  warning: $p $m varies by more than 25% of its median across rounds (noisy machine)"
        fi
    done
done
# TSO gain: single-stream guest->host with the sender's TSO on over TSO off, per round.
tso=$(paste -d' ' <(tr ' ' '\n' <<<"${vals[ours.tcp_g2h_1]}" | grep -v '^$') \
    <(tr ' ' '\n' <<<"${vals[ours.tcp_g2h_1_notso]}" | grep -v '^$') |
    awk '{ if ($2 > 0) print $1 / $2 }' | tr '\n' ' ')
read -r tm tmin tmax <<<"$(stats <<<"$tso")"
printf 'ours TSO on / TSO off, guest->host: %.2f [%.2f-%.2f] (goal at least 3)\n' "$tm" "$tmin" "$tmax"
echo "ping_*_us: lower is better (ours/veth above 1 is slower); the rest: Gbit/s."
# The latency goals are differences: ours at most 150 us above veth idle, 30 us polling
# (medians of the rounds).
for m in idle:150 busy:30; do
    read -r om _ <<<"$(stats <<<"${vals[ours.ping_${m%%:*}_us]}")"
    read -r vm _ <<<"$(stats <<<"${vals[veth.ping_${m%%:*}_us]}")"
    awk -v o="$om" -v v="$vm" -v m="${m%%:*}" -v g="${m##*:}" 'BEGIN { printf "ping %s: ours %.1f us above veth (goal at most %d: %s)\n", m, o - v, g, (o - v <= g) ? "met" : "not met" }'
done
# vscd prints its NIC's counters (frames per queue, wakeups per frame) when it stops.
kill -TERM "$vscd_pid" 2>/dev/null || true
wait "$vscd_pid" 2>/dev/null || true
grep -h "NIC counters" "$dir/vscd.log" 2>/dev/null || true

if [ "${RAW:-1}" = 1 ]; then
    echo
    echo "raw TAP frames/s vs ours, 64-byte frames (criterion bench network, one run):"
    cargo bench -q -p vmbus-benches --bench network -- --warm-up-time 1 --measurement-time 2 \
        'network/(vmbus|tap)_(tx|rx)_64$' >"$dir/bench.log" 2>&1 || true
    if grep -q "bench skipped" "$dir/bench.log"; then
        grep "bench skipped" "$dir/bench.log"
    else
        for d in tx rx; do
            ours=$(criterion_ns network "vmbus_${d}_64")
            raw=$(criterion_ns network "tap_${d}_64")
            awk -v o="$ours" -v r="$raw" -v d="$d" 'BEGIN { printf "  %s: ours %.0f frames/s, raw TAP %.0f frames/s, ratio %.3f\n", d, 1e9 / o, 1e9 / r, r / o }'
        done
        grep -h "frames lost\|netvsc counters" "$dir/bench.log" || true
    fi
fi
