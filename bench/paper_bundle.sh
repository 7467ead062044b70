#!/usr/bin/env bash
# The real-data results bundle on one GPU, as one command (what makes results/<bundle>/):
#   the speed figures a and e on that GPU, then the paper-profile run matrix within a time budget — task x loss x
#   with/without the extra COVID images x seeds 0-2 (24 runs) plus the arm without weighted sampling (both tasks,
#   CE, 3 seeds: 6 runs), 30 in all — then a bundle of the run folders (no weights; bundle.json gives the matrix's
#   wall time and aggregate images/s) and the featured run's weights as fp16 chunks (chapters 03/04 need them).
#   Dry run on CPU at tiny sizes: PROFILE=quick SEEDS=1 SETTINGS="--set image_size=32 --set epochs=1" CONCURRENT=2
# Usage: bash bench/paper_bundle.sh OUT DATA [TIME_BUDGET_SECONDS]
#   DATA holds coronahack/, covid-chestxray-dataset/, nih-chestxray14-subset/ (e.g. a `python -m cxrlib.transport` copy)
#   Environment: PROFILE (paper), SEEDS (3), CONCURRENT (8), SETTINGS (extra flags), VARIANTS (unweighted),
#   VARIANT_LOSSES (ce; chapter 06's arms: VARIANTS=negs,negs+clahe,holdout:country=italy VARIANT_LOSSES=focal), PYTHON, RUN_ROOT,
#   CODE_COMMIT (recorded in bundle.json where the machine has no git checkout), MATRIX_TIMEOUT (seconds)
set -uo pipefail
out=$1
data=$2
budget=${3:-330}
py=${PYTHON:-python3}
root=${RUN_ROOT:-/tmp/paper-runs}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} CXRLIB_CACHE=${CXRLIB_CACHE:-/tmp/cxrlib-cache}
mkdir -p "$out"
started=$(date +%s)
{ nvidia-smi -L 2>/dev/null || echo "no GPU"; "$py" -c "import torch; print('torch', torch.__version__)"; } | tee "$out/log.txt"

device=$("$py" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
timeout 120 "$py" bench/bench_speed.py --device "$device" --only ae --out "$out/speed_$device.json" \
    ${BENCH_ARGS:-} 2>&1 | tail -5 | tee -a "$out/log.txt"

# shellcheck disable=SC2086  # SETTINGS is a list of flags
timeout "${MATRIX_TIMEOUT:-$((budget + 240))}" "$py" -m cxrlib.runs --profile "${PROFILE:-paper}" --executor inline \
    --concurrent "${CONCURRENT:-8}" --run-root "$root" \
    --coronahack-dir "$data/coronahack" --extra-covid-dir "$data/covid-chestxray-dataset" \
    --seeds "${SEEDS:-3}" --extra-covid-axis both \
    --extra-negatives "$data/nih-chestxray14-subset" --variants "${VARIANTS:-unweighted}" \
    --variant-losses "${VARIANT_LOSSES:-ce}" --set "external=nih=$data/nih-chestxray14-subset" --time-budget "$budget" \
    ${SETTINGS:-} 2>&1 | tee -a "$out/log.txt" | grep -v "^ *complete\b" | tail -40
tagged=$(ls -d "$root"/*/ | head -1)
echo "matrix wall: $(( $(date +%s) - started )) s so far" | tee -a "$out/log.txt"

shopt -s nullglob
speed=("$out"/speed_*.json)  # none when bench_speed ran out of time: the bundle then says it holds no speed figures
"$py" -m cxrlib.bundle pack "$tagged" "$out/bundle" ${speed:+--bench "${speed[@]}"} --data "$data" \
    --commit "${CODE_COMMIT:-}" \
    --note "made by bench/paper_bundle.sh (profile ${PROFILE:-paper}, time budget ${budget} s)" | tee -a "$out/log.txt"
"$py" - "$tagged" "$out/w" <<'EOF' 2>&1 | tee -a "$out/log.txt"
import sys
from pathlib import Path
from cxrlib import bundle, runs
featured = runs.featured_run(Path(sys.argv[1]))
if featured is not None and (featured / "model.pt").is_file():
    parts = bundle.split_weights(featured / "model.pt", sys.argv[2])
    (Path(sys.argv[2]) / "featured.txt").write_text(featured.name + "\n")
    print(f"featured {featured.name}: {len(parts)} weight chunk(s)")
EOF
tar czf "$out/bundle.tar.gz" -C "$out" bundle && rm -rf "$out/bundle"
echo "total: $(( $(date +%s) - started )) s" | tee -a "$out/log.txt"
ls -la "$out" "$out/w" 2>/dev/null
