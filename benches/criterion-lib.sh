# Shell helpers of the bench scripts in benches/ (sourced, not run). Needs $root (the repository)
# and $target (the cargo target directory).
#
# Every comparison script measures its contenders alternately (A B A B ...) over $rounds rounds
# ([`rounds_arg`]), prints each round, and ends with [`summary`]: the median over the rounds, the
# range, and a warning when the range is too wide for the median to be trusted.

# Spread (max - min) / median above which `summary` says not to trust a median; env TRUST_SPREAD.
trust_spread=${TRUST_SPREAD:-0.25}

# require_tools [--hint TEXT] TOOL...: exits, saying "<script>: TOOL is missing" (and TEXT, the
# way to install it, if given), unless every TOOL is on the PATH.
require_tools() {
    local hint="" tool
    if [[ ${1:-} == --hint ]]; then
        hint=" ($2)"
        shift 2
    fi
    for tool in "$@"; do
        command -v "$tool" >/dev/null || {
            echo "$(basename "$0" .sh): $tool is missing$hint" >&2
            exit 1
        }
    done
}

# rounds_arg "$@": sets $rounds from a leading numeric argument, else $ROUNDS, else 5, and
# $shift_args to 1 if the first argument was that number (the caller then does `shift`).
rounds_arg() {
    rounds=${ROUNDS:-5} shift_args=0
    if [[ ${1:-} =~ ^[0-9]+$ ]]; then
        rounds=$1 shift_args=1
    fi
    ((rounds >= 1)) || {
        echo "rounds must be at least 1" >&2
        exit 1
    }
}

# bench_exe BENCH: builds the criterion bench BENCH of vmbus-benches (release) and prints the
# path of its executable, so that rounds run it directly without cargo in between.
bench_exe() {
    (cd "$root" && cargo bench -q -p vmbus-benches --bench "$1" --no-run --message-format=json) |
        jq -r 'select(.reason == "compiler-artifact" and .target.name == "'"$1"'" and .executable != null) | .executable' |
        tail -n1
}

# criterion_ns GROUP FUNCTION [HOME]: the estimated time per element in ns of a criterion
# benchmark (the slope, else the mean), from its estimates.json under HOME (default
# $target/criterion, where criterion also keeps its HTML reports: open report/index.html).
criterion_ns() {
    local f="${3:-$target/criterion}/$1/$2/new/estimates.json"
    jq -r '(.slope // .mean).point_estimate' "$f"
}

# median: the median of the numbers on stdin, one per line.
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# summary LABEL VALUE...: one line "LABEL: median M  range MIN..MAX (spread S%) over N rounds",
# with a warning when the spread (max - min) / median exceeds $trust_spread or fewer than 5
# rounds were run.
summary() {
    local label=$1
    shift
    printf '%s\n' "$@" | sort -g | awk -v l="$label" -v t="$trust_spread" '
        { v[NR] = $1 }
        END {
            if (NR == 0) { printf "%s: no value\n", l; exit }
            m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            s = (m != 0) ? (v[NR] - v[1]) / m : 0
            printf "%s: median %.3g  range %.3g..%.3g (spread %.0f%%) over %d rounds", l, m, v[1], v[NR], 100 * s, NR
            if (s > t) printf "  [TOO WIDE to trust: spread > %.0f%%; rerun on a quieter machine or with more rounds]", 100 * t
            else if (NR < 5) printf "  [fewer than 5 rounds]"
            printf "\n"
        }'
}

# wait_socket PATH PID: waits (up to 10 s) for the server PID to create its socket PATH; exits
# the script if the server ends first or never does.
wait_socket() {
    local i
    for ((i = 0; i < 500; i++)); do
        [[ -S $1 ]] && return 0
        kill -0 "$2" 2>/dev/null || {
            echo "$(basename "$0"): the server for $1 exited" >&2
            exit 1
        }
        sleep 0.02
    done
    echo "$(basename "$0"): no socket $1 after 10 s" >&2
    exit 1
}

# bench_image DIR: the 1 GiB image of random bytes the storage scripts share (made once, in
# DIR); prints its path.
bench_image() {
    mkdir -p "$1"
    local img=$1/image.raw
    if [[ $(stat -c %s "$img" 2>/dev/null || echo 0) != $((1 << 30)) ]]; then
        echo "creating $img (1 GiB)" >&2
        dd if=/dev/urandom of="$img" bs=1M count=1024 conv=fsync status=none
    fi
    echo "$img"
}
