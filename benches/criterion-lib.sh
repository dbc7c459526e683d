# Shell helpers of the bench scripts in benches/ (sourced, not run). Needs $root (the repository)
# and $target (the cargo target directory).
#
# Every comparison script measures its contenders alternately (A B A B ...) over $rounds rounds
# ([`rounds_arg`]), prints each round, and ends with [`summary`]: the median over the rounds, the
# range, and a warning when the range is too wide for the median to be trusted.

# Spread (max - min) / median above which `summary` says not to trust a median; env TRUST_SPREAD.
trust_spread=${TRUST_SPREAD:-0.25}

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
