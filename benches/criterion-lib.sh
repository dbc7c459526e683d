# Shell helpers of the *-ratio.sh scripts (sourced, not run). Needs $target (the cargo target
# directory).

# criterion_ns GROUP FUNCTION: the estimated time per element in ns of a criterion benchmark
# (the slope, else the mean), from its estimates.json.
criterion_ns() {
    local f="$target/criterion/$1/$2/new/estimates.json"
    if command -v jq >/dev/null; then
        jq -r '(.slope // .mean).point_estimate' "$f"
    else
        python3 -c 'import json,sys; e=json.load(open(sys.argv[1])); print((e.get("slope") or e["mean"])["point_estimate"])' "$f"
    fi
}

# median: the median of the numbers on stdin, one per line.
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
