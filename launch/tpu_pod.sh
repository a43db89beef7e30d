#!/usr/bin/env bash
# Runs medguide_jax on a Cloud TPU VM pod slice: one JAX process per TPU VM worker.
#
#   launch/tpu_pod.sh [--dry-run] create            # the TPU VM slice
#   launch/tpu_pod.sh [--dry-run] setup             # copy this repo + venv on every worker
#   launch/tpu_pod.sh [--dry-run] run -- --config=configs/guidance.py:dataset=derm7pt \
#       --workdir=gs://BUCKET/guidance_derm7pt [--config.key=value ...]
#   launch/tpu_pod.sh [--dry-run] delete
#
# `run` starts `python -m medguide_jax.main ARGS` on --worker=all with MEDGUIDE_DISTRIBUTED=1
# (every process joins through jax.distributed.initialize()) and reruns it while it exits 75
# (preempted after a successful save; the rerun resumes from the workdir's checkpoint).
# Settings come from the environment (defaults in brackets):
#   TPU_NAME [medguide]  ZONE [us-central2-b]  ACCELERATOR_TYPE [v4-16]
#   RUNTIME_VERSION [tpu-ubuntu2204-base]  PROJECT [gcloud's default]
#   CREATE_FLAGS [none; e.g. "--spot"]  REPO_URL [none: copy this checkout; else git clone it]
#   MEDGUIDE_DATA_DIR [$HOME/medguide_data, expanded on each worker; use gs:// for real data]
#   MAX_REQUEUES [20]
# --dry-run prints the commands instead of running them.
set -euo pipefail

TPU_NAME="${TPU_NAME:-medguide}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PROJECT="${PROJECT:-}"
CREATE_FLAGS="${CREATE_FLAGS:-}"
REPO_URL="${REPO_URL:-}"
DATA_DIR="${MEDGUIDE_DATA_DIR:-\$HOME/medguide_data}"
MAX_REQUEUES="${MAX_REQUEUES:-20}"
REMOTE_DIR="medguide_jax"            # on each worker, relative to $HOME
REMOTE_VENV="\$HOME/medguide_venv"
EXIT_FILE="\$HOME/.medguide_exit_code"  # worker 0's last exit code (see run_on_pod)
EXIT_PREEMPTED=75
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0

usage() {  # the header comment above; to stderr when it answers a mistake
  local code="${1:-2}"
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" \
    >&"$(( code ? 2 : 1 ))"
  exit "$code"
}

# Prints a command with shell quoting where needed.
show() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then out+=("$a"); else
      out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

# Runs a command, or prints it under --dry-run.
x() {
  if (( DRY_RUN )); then show "$@"; else "$@"; fi
}

gcloud_tpu() {
  x gcloud compute tpus tpu-vm "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
}

on_workers() {  # on_workers WORKERS COMMAND: COMMAND runs in bash on each worker
  gcloud_tpu ssh "$TPU_NAME" --worker="$1" --command="$2"
}

cmd_create() {
  # shellcheck disable=SC2086  # CREATE_FLAGS holds several flags on purpose
  gcloud_tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" $CREATE_FLAGS
}

cmd_setup() {
  local fetch
  if [[ -n "$REPO_URL" ]]; then
    fetch="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR pull --ff-only; \
else git clone $(show "$REPO_URL") $REMOTE_DIR; fi"
  else  # this checkout as it is now: tracked and untracked-but-not-ignored files
    local tarball="${TMPDIR:-/tmp}/medguide_jax_$$.tgz"
    if (( DRY_RUN )); then
      echo "git -C $REPO_ROOT ls-files -co --exclude-standard -z | tar -C $REPO_ROOT --null -T - -czf $tarball"
    else
      git -C "$REPO_ROOT" ls-files -co --exclude-standard -z \
        | tar -C "$REPO_ROOT" --null -T - -czf "$tarball"
    fi
    gcloud_tpu scp "$tarball" "$TPU_NAME:medguide_jax.tgz" --worker=all
    (( DRY_RUN )) || rm -f "$tarball"
    fetch="mkdir -p $REMOTE_DIR && tar -xzf medguide_jax.tgz -C $REMOTE_DIR"
  fi
  on_workers all "set -e; $fetch; cd $REMOTE_DIR; \
[ -d $REMOTE_VENV ] || python3 -m venv $REMOTE_VENV; . $REMOTE_VENV/bin/activate; \
pip install -q -U pip; pip install -q -e '.[tpu]'"
}

# One attempt of the run on every worker; returns worker 0's exit code of medguide_jax.main.
# gcloud's own status does not reliably carry the remote code for --worker=all, so worker 0
# records it in EXIT_FILE and we read it back.
run_on_pod() {
  local args status=0 code
  args="$(show "$@")"
  on_workers all "rm -f $EXIT_FILE; cd $REMOTE_DIR && . $REMOTE_VENV/bin/activate || exit 1; \
MEDGUIDE_DISTRIBUTED=1 MEDGUIDE_DATA_DIR=\"$DATA_DIR\" python -m medguide_jax.main $args; \
code=\$?; echo \$code > $EXIT_FILE; exit \$code" || status=$?
  (( DRY_RUN )) && { on_workers 0 "cat $EXIT_FILE"; return 0; }
  code="$(on_workers 0 "cat $EXIT_FILE" 2>/dev/null | tr -dc 0-9)" || true
  return "${code:-$status}"
}

cmd_run() {
  [[ "${1:-}" == "--" ]] && shift
  (( $# )) || { echo "run: give the arguments of medguide_jax.main after --" >&2; usage 2; }
  local attempt code
  for (( attempt = 0; attempt <= MAX_REQUEUES; attempt++ )); do
    code=0
    run_on_pod "$@" || code=$?
    if (( code != EXIT_PREEMPTED )); then return "$code"; fi
    echo "tpu_pod.sh: preempted after a save (exit 75); rerunning (attempt $((attempt + 1)))" >&2
  done
  echo "tpu_pod.sh: still preempted after $MAX_REQUEUES reruns; giving up" >&2
  return "$EXIT_PREEMPTED"
}

cmd_delete() {
  gcloud_tpu delete "$TPU_NAME" --quiet
}

main() {
  while [[ "${1:-}" == -* ]]; do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) usage 0 ;;
      *) echo "unknown option: $1" >&2; usage 2 ;;
    esac
    shift
  done
  local sub="${1:-}"
  (( $# )) && shift
  case "$sub" in
    create) cmd_create ;;
    setup) cmd_setup ;;
    run) cmd_run "$@" ;;
    delete) cmd_delete ;;
    *) usage 2 ;;
  esac
}

main "$@"
