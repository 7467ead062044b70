#!/usr/bin/env bash
# The real-data results bundle of the paper profile on one GPU, as one command:
#   the speed figures a and e on that GPU, then the paper-profile run matrix within a time budget — task x loss x
#   with/without the extra COVID images x seeds 0-2 (24 runs) plus the arm without weighted sampling (both tasks,
#   CE, 3 seeds: 6 runs), 30 in all — then a bundle of the run folders (no weights; bundle.json gives the matrix's
#   wall time and aggregate images/s, and the data's TRANSPORT.json when DATA is a `python -m cxrlib.transport`
#   copy) as OUT/bundle.tar.gz, and the featured run's weights as fp16 chunks in OUT/w (chapters 03/04 need them).
#   Exits 1 when a step failed (OUT/log.txt says which); the bundle is still packed when the matrix had a failed run.
#   Dry run on CPU at tiny sizes (tests/test_gpu_scripts.py does this on synthetic data):
#     PROFILE=quick SEEDS=1 SETTINGS="--set image_size=32 --set epochs=1" CONCURRENT=1 BENCH_ARGS=--quick \
#       bash bench/paper_bundle.sh /tmp/out DATA
# Usage: bash bench/paper_bundle.sh OUT DATA [TIME_BUDGET_SECONDS]
#   DATA holds coronahack/, covid-chestxray-dataset/, nih-chestxray14-subset/ (e.g. a `python -m cxrlib.transport` copy)
#   Environment: PROFILE (paper), SEEDS (3), CONCURRENT (8), SETTINGS (extra flags), VARIANTS (unweighted; empty:
#   none), VARIANT_LOSSES (ce; chapter 06's arms: VARIANTS=negs,negs+clahe,holdout:country=italy VARIANT_LOSSES=focal),
#   BENCH_ONLY (ae), RUN_ROOT (/tmp/paper-runs), and those bench/bundle_steps.sh reads (PYTHON, CXRLIB_CACHE, ...)
source "$(dirname "${BASH_SOURCE[0]}")/bundle_steps.sh"
[[ $# -ge 2 ]] || { sed -n '2,/^source/p' "$0" | sed '$d' >&2; exit 2; }
bundle_begin "$1" "$2" "${3:-330}" /tmp/paper-runs
profile=${PROFILE:-paper}

bundle_bench "${BENCH_ONLY-ae}"
# shellcheck disable=SC2086  # SETTINGS is a list of flags
bundle_matrix --profile "$profile" --concurrent "${CONCURRENT:-8}" --seeds "${SEEDS:-3}" --extra-covid-axis both \
    --extra-negatives "$negatives" --set "external=nih=$negatives" \
    --variants "${VARIANTS-unweighted}" --variant-losses "${VARIANT_LOSSES:-ce}" ${SETTINGS:-}
bundle_pack "made by bench/paper_bundle.sh (profile $profile, time budget $budget s)"
bundle_weights
bundle_end
