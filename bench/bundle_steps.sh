# Steps shared by bench/paper_bundle.sh and bench/remedies_bundle.sh (sourced, not run): set-up and log, the
# speed figures, the run matrix, the bundle (run folders without weights; bundle.json gives the data's transport
# record, the matrix's wall time and aggregate images/s), the featured run's weights as fp16 chunks, the tarball.
# Every step's output goes to OUT/log.txt. A step that fails is logged ("FAILED: <step>") and the later steps
# still run where they can (a matrix with a failed run is still packed, and one cut short by its time budget too:
# bundle.json lists the runs it did not start as "missing"); `bundle_end` then exits 1.
# Environment: PYTHON (python3), RUN_ROOT, CXRLIB_CACHE (/tmp/cxrlib-cache), BENCH_ARGS (bench_speed flags),
# BENCH_TIMEOUT (120 s; a bench that runs out of time leaves the bundle without speed figures, which is no
# failure), MATRIX_TIMEOUT (seconds; default the time budget + 240), CODE_COMMIT (recorded in bundle.json where
# the machine has no git checkout), TAIL_LINES (30: the lines of each step shown on the terminal; all are logged).
set -uo pipefail

# bundle_begin OUT DATA BUDGET DEFAULT_RUN_ROOT: checks DATA, makes OUT, starts the log and the clock.
bundle_begin() {
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    out=$1 data=$2 budget=$3 root=${RUN_ROOT:-$4} py=${PYTHON:-python3}
    failed=() started=$(date +%s)
    local folder
    for folder in coronahack covid-chestxray-dataset nih-chestxray14-subset; do
        [[ -d $data/$folder ]] || { echo "$0: no $data/$folder (DATA holds coronahack/, covid-chestxray-dataset/," \
                                         "nih-chestxray14-subset/)" >&2; exit 2; }
    done
    mkdir -p "$out" || exit 2
    log=$out/log.txt
    : >"$log"
    export PYTHONUNBUFFERED=1 PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
    export CXRLIB_CACHE=${CXRLIB_CACHE:-/tmp/cxrlib-cache}
    { nvidia-smi -L 2>/dev/null || echo "no GPU"; } | tee -a "$log"
    local torch
    torch=$("$py" -c "import torch; print(torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')") \
        || { echo "$0: $py cannot import torch" | tee -a "$log" >&2; exit 2; }
    device=${torch##* }
    echo "torch ${torch% *}, device $device" | tee -a "$log"
    data_args=(--coronahack-dir "$data/coronahack" --extra-covid-dir "$data/covid-chestxray-dataset")
    negatives=$data/nih-chestxray14-subset
}

# step NAME COMMAND...: runs COMMAND, its output to the log and its last TAIL_LINES lines to the terminal; its status.
step() {
    local name=$1
    shift
    echo "== $name ($(date -u +%H:%M:%S), $(($(date +%s) - started)) s in)" | tee -a "$log"
    "$@" 2>&1 | tee -a "$log" | tail -n "${TAIL_LINES:-30}"
    return "${PIPESTATUS[0]}"
}

# failed NAME STATUS: records a failed step.
failed() {
    echo "FAILED: $1 (exit $2)" | tee -a "$log"
    failed+=("$1")
}

# bundle_bench FIGURES: bench_speed's figures (e.g. ae; empty: none) on this machine's device.
bundle_bench() {
    [[ -n $1 ]] || return 0
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
    step "speed figures $1 on $device" timeout "${BENCH_TIMEOUT:-120}" "$py" "$repo/bench/bench_speed.py" \
        --device "$device" --only "$1" --out "$out/speed_$device.json" ${BENCH_ARGS:-}
    local status=$?
    if ((status == 124)); then
        echo "speed figures ran out of time (BENCH_TIMEOUT): the bundle holds none" | tee -a "$log"
        rm -f "$out/speed_$device.json"
    elif ((status != 0)); then
        failed "speed figures" "$status"
    fi
}

# bundle_matrix RUNS_FLAGS...: python -m cxrlib.runs with the data, run root and time budget, under MATRIX_TIMEOUT;
# then sets `tagged`, the run root's folder for these data (runs --where).
bundle_matrix() {
    step "run matrix" timeout "${MATRIX_TIMEOUT:-$((budget + 240))}" "$py" -m cxrlib.runs --executor inline \
        --run-root "$root" "${data_args[@]}" --time-budget "$budget" "$@" || failed "run matrix" $?
    echo "matrix wall: $(($(date +%s) - started)) s so far" | tee -a "$log"
    tagged=$("$py" -m cxrlib.runs --where --run-root "$root" "${data_args[@]}" 2>>"$log" | tail -n 1)
    [[ -d $tagged ]] || { failed "run folder (runs --where: '$tagged')" 1; bundle_end; }
}

# bundle_pack NOTE: the bundle of `tagged` into OUT/bundle, with the speed figures and the data's transport record.
bundle_pack() {
    local speed=("$out"/speed_*.json)
    [[ -e ${speed[0]} ]] || speed=()
    step "pack" "$py" -m cxrlib.bundle pack "$tagged" "$out/bundle" ${speed[@]:+--bench "${speed[@]}"} \
        --data "$data" --commit "${CODE_COMMIT:-}" --note "$1" --partial || { failed "pack" $?; return 1; }
    step "bundle summary" "$py" - "$out/bundle/bundle.json" <<'EOF' || failed "bundle summary" $?
import json, sys
from collections import Counter
record = json.load(open(sys.argv[1]))
print("runs:", dict(Counter(r["status"] for r in record["runs"])), "missing:", len(record["missing"]))
print("wall_seconds:", record["wall_seconds"])
print("aggregate train images/s:", record["aggregate_train_images_per_second"])
print("data:", [(d["folder"], (d["transport_copy"] or {}).get("max_side")) for d in record["data"]])
EOF
}

# bundle_weights: the featured run's (chapters 03/04) weights as fp16 chunks in OUT/w, named in OUT/w/featured.txt.
bundle_weights() {
    step "featured weights" "$py" - "$tagged" "$out/w" <<'EOF' || failed "featured weights" $?
import sys
from pathlib import Path
from cxrlib import book, bundle
featured = book.featured_run(Path(sys.argv[1]))
if featured is None or not (featured / "model.pt").is_file():
    sys.exit(f"no complete featured run with weights in {sys.argv[1]}: chapters 03/04 would lack them")
parts = bundle.split_weights(featured / "model.pt", sys.argv[2])
(Path(sys.argv[2]) / "featured.txt").write_text(featured.name + "\n")
print(f"featured {featured.name}: {len(parts)} weight chunk(s)")
EOF
}

# bundle_end: OUT/bundle as OUT/bundle.tar.gz, the total time; exit 1 when a step failed.
bundle_end() {
    if [[ -f $out/bundle/bundle.json ]]; then
        step "tarball" tar czf "$out/bundle.tar.gz" -C "$out" bundle && rm -rf "$out/bundle" || failed "tarball" $?
    fi
    echo "total: $(($(date +%s) - started)) s" | tee -a "$log"
    ls -la "$out" "$out/w" 2>/dev/null
    if ((${#failed[@]})); then
        echo "$0: failed step(s): ${failed[*]} (see $log)" | tee -a "$log" >&2
        exit 1
    fi
    exit 0
}
