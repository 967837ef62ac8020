#!/bin/bash
# One hpo-peft study spread over a SLURM job array: every array task is one `hpo-peft study worker`
# on the same study. --n-trials is the study's TOTAL over all tasks: each task runs trials until the
# study has that many, then exits 0 (tasks that start late, or are requeued, find the work done).
# A task killed by the scheduler (time limit: SIGTERM, then SIGKILL) leaves its trial to the others:
# they fail it by its heartbeat and run its parameters once more.
#
# Needs a PostgreSQL database for Optuna and an MLflow tracking server that every node reaches
# (README, "Studies across machines"). Submit from the project folder (sbatch passes the
# environment on; OPTUNA_STORAGE and MLFLOW_TRACKING_URI may stand for the two HPO_PEFT_ variables):
#
#   export HPO_PEFT_STORAGE=postgresql+psycopg2://hpo:PASSWORD@dbhost/optuna
#   export HPO_PEFT_TRACKING_URI=http://mlflow-host:5000
#   sbatch --array=0-7 deploy/slurm_study.sh --set data.root=/data/SICAPv2
#
# GPUs: one per array task (`--gres=gpu:1`, below or on the sbatch line). SLURM then sets the
# task's CUDA_VISIBLE_DEVICES to its own GPU and the worker, with train.device auto (or cuda),
# uses it. One worker per task: within one task, `study run --jobs N` would spread N workers
# over the task's visible GPUs (worker i on GPU i mod G), so ask for N GPUs there instead.
#
# Variables: CONFIG (default studies/sicapv2_plip.yaml), N_TRIALS (default 64), HPO_PEFT (the
# command, default `hpo-peft`, e.g. `.venv/bin/hpo-peft`). Arguments after the script go to
# `study worker` (--study-name, --set KEY=VALUE, --timeout, --accept-changes).
#
#SBATCH --job-name=hpo-peft-study
#SBATCH --array=0-3
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=hpo-peft-%A_%a.log
## on GPU nodes, one GPU per array task, i.e. per worker (remove one '#'):
##SBATCH --gres=gpu:1
set -euo pipefail

HPO_PEFT_STORAGE="${HPO_PEFT_STORAGE:-${OPTUNA_STORAGE:-}}"
HPO_PEFT_TRACKING_URI="${HPO_PEFT_TRACKING_URI:-${MLFLOW_TRACKING_URI:-}}"
: "${HPO_PEFT_STORAGE:?set HPO_PEFT_STORAGE (or OPTUNA_STORAGE) to the Optuna database, e.g. postgresql+psycopg2://user:pw@host/optuna}"
: "${HPO_PEFT_TRACKING_URI:?set HPO_PEFT_TRACKING_URI (or MLFLOW_TRACKING_URI) to the MLflow server, e.g. http://mlflow-host:5000}"
CONFIG="${CONFIG:-studies/sicapv2_plip.yaml}"
N_TRIALS="${N_TRIALS:-64}"
HPO_PEFT="${HPO_PEFT:-hpo-peft}"
# Each task records who it is on its trials and runs; tasks on one node differ by their task id.
export HPO_PEFT_WORKER_HOST="${HPO_PEFT_WORKER_HOST:-$(hostname)}-${SLURM_ARRAY_TASK_ID:-0}"

echo "task ${SLURM_ARRAY_TASK_ID:-0} of job ${SLURM_ARRAY_JOB_ID:-none} on $(hostname): worker ${HPO_PEFT_WORKER_HOST}" \
    "(CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})"
# exec: the scheduler's SIGTERM reaches the worker itself, which closes its trial and runs
exec ${HPO_PEFT} study worker "${CONFIG}" --n-trials "${N_TRIALS}" \
    --storage "${HPO_PEFT_STORAGE}" --tracking-uri "${HPO_PEFT_TRACKING_URI}" "$@"
