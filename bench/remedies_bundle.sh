#!/usr/bin/env bash
# Chapter 6's remedy arms (the arm set of `make remedies`) and chapter 4's lungs-removed pair on one GPU, as one
# command: binary, cross-entropy, random init, with the extra COVID images, the NIH adults as extra negatives and
# external set, every run holding out the same sources (REMEDY_HOLD_OUT) — per seed the paper set-up (the baseline,
# and the intact arm of the lungs-removed comparison), lungs_only, adults, adults+lungs_only,
# adults+lungs_only_clahe, the lungs-only control lungs_only_marker, and lungs_removed, lungs_removed_marker (8 runs;
# 24 with seeds 0-2) in one matrix at the paper profile's settings (224 px, up to 20 epochs, early stopping with
# patience 5), then the bundle of the run folders as OUT/bundle.tar.gz (no weights; bundle.json gives the matrix's
# wall time and aggregate images/s, and the data's TRANSPORT.json when DATA is a `python -m cxrlib.transport` copy).
# Chapter 6 reads the runs with its remedy_root parameter, chapter 4's lungs-removed section from any run root.
#   Exits 1 when a step failed (OUT/log.txt says which); the bundle is still packed when the matrix had a failed run.
#   Dry run on CPU at tiny sizes (tests/test_gpu_scripts.py does this on synthetic data):
#     PROFILE=quick SEEDS=1 SETTINGS="--set image_size=32 --set epochs=1" CONCURRENT=1 BENCH_ONLY= \
#       bash bench/remedies_bundle.sh /tmp/out DATA
# Usage: bash bench/remedies_bundle.sh OUT DATA [TIME_BUDGET_SECONDS]
#   DATA holds coronahack/, covid-chestxray-dataset/, nih-chestxray14-subset/ (e.g. a `python -m cxrlib.transport` copy)
#   Environment: PROFILE (paper), SEEDS (3), CONCURRENT (8), SETTINGS (--set epochs=20), REMEDY_VARIANTS,
#   REMEDY_HOLD_OUT (the Makefile's defaults), CONTROL_VARIANTS (lungs_only_marker), AUDIT_VARIANTS
#   (lungs_removed,lungs_removed_marker), BENCH_ONLY (a), RUN_ROOT (/tmp/remedy-runs), and those
#   bench/bundle_steps.sh reads (PYTHON, CXRLIB_CACHE, ...)
source "$(dirname "${BASH_SOURCE[0]}")/bundle_steps.sh"
[[ $# -ge 2 ]] || { sed -n '2,/^source/p' "$0" | sed '$d' >&2; exit 2; }
bundle_begin "$1" "$2" "${3:-420}" /tmp/remedy-runs
profile=${PROFILE:-paper}
settings=${SETTINGS-"--set epochs=20"}
hold_out=${REMEDY_HOLD_OUT:-country=italy;collection=ieee8023&covid=no}
variants=${REMEDY_VARIANTS:-lungs_only,adults,adults+lungs_only,adults+lungs_only_clahe}
variants+=,${CONTROL_VARIANTS-lungs_only_marker},${AUDIT_VARIANTS-lungs_removed,lungs_removed_marker}

bundle_bench "${BENCH_ONLY-a}"
# shellcheck disable=SC2086  # SETTINGS is a list of flags
bundle_matrix --profile "$profile" --concurrent "${CONCURRENT:-8}" --seeds "${SEEDS:-3}" --tasks binary --losses ce \
    --arms random --extra-covid-axis with --extra-negatives "$negatives" --set "external=nih=$negatives" \
    --set "hold_out=$hold_out" --variants "$variants" $settings
bundle_pack "made by bench/remedies_bundle.sh (profile $profile, hold-out $hold_out, time budget $budget s)"
bundle_end
