#!/usr/bin/env bash
# The run matrix as a Slurm job array: each task runs its share of the matrix (python -m cxrlib.runs --shard slurm:
# the runs at positions I, I+N, ... for task I of N) on one GPU, into RUN_ROOT on a filesystem every node sees. Run
# folders lock, resume and verify themselves: tasks may run in any order or at once, and a task that died is rerun by
# resubmitting it (sbatch --array=I ...), which resumes its interrupted run and skips its complete ones.
# Submit from the repository's root on the shared filesystem (or `make slurm DATA=... RUN_ROOT=... SHARDS=N`):
#   DATA=/shared/data RUN_ROOT=/shared/runs/paper sbatch --array=0-29 bench/slurm_matrix.sh
# then, once the array is done, the same flags with --gather say what each run became and on which host:
#   python -m cxrlib.runs --gather --profile paper --run-root /shared/runs/paper \
#       --coronahack-dir /shared/data/coronahack --extra-covid-dir /shared/data/covid-chestxray-dataset
# Environment: DATA (holds coronahack/ and covid-chestxray-dataset/) and RUN_ROOT, both required; PROFILE (paper),
#   SEEDS (the profile's), CONCURRENT (1: runs at a time on the task's GPU), EXECUTOR (inline), MATRIX_FLAGS (more
#   python -m cxrlib.runs flags, e.g. "--set epochs=10"), PYTHON (python3), REPO (the repository; default: the
#   folder sbatch was run from). Every task must get the same flags and see the same weight files (e.g. the ImageNet
#   file in a shared TORCH_HOME, fetched once before submitting): the shares are positions in the matrix's order.
#SBATCH --job-name=cxr-matrix
#SBATCH --array=0-7
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=08:00:00
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
: "${DATA:?give DATA, the folder holding coronahack/ and covid-chestxray-dataset/}"
: "${RUN_ROOT:?give RUN_ROOT, a folder every node of the array sees}"
repo=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$repo"
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
flags=(--profile "${PROFILE:-paper}" --run-root "$RUN_ROOT" --coronahack-dir "$DATA/coronahack"
       --extra-covid-dir "$DATA/covid-chestxray-dataset" --executor "${EXECUTOR:-inline}"
       --concurrent "${CONCURRENT:-1}")
[[ -z ${SEEDS:-} ]] || flags+=(--seeds "$SEEDS")
echo "task ${SLURM_ARRAY_TASK_ID:-?} of ${SLURM_ARRAY_TASK_COUNT:-?} on $(hostname), $(date -u +%FT%TZ)"
# shellcheck disable=SC2086  # MATRIX_FLAGS is a list of flags
exec "${PYTHON:-python3}" -m cxrlib.runs "${flags[@]}" ${MATRIX_FLAGS:-} --shard slurm
