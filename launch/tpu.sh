#!/usr/bin/env bash
# Cloud TPU VMs (one host or a pod slice) for lpl_jax: create, install, copy data, train, watch, delete.
# Step by step, with costs and caveats: docs/launch.md.
#
#   launch/tpu.sh create --name N --zone Z --accelerator-type v4-32 [--runtime-version V] [--queued]
#                        [--spot | --best-effort] [--valid-until 6h] [--data-disk SPEC] [-- EXTRA_GCLOUD_FLAGS...]
#   launch/tpu.sh setup  --name N --zone Z [--repo-url URL [--ref REF]] [--extra tpu] [--remote-dir DIR]
#   launch/tpu.sh data   --name N --zone Z --src gs://BUCKET/PATH --dest /local/dir
#   launch/tpu.sh train  --name N --zone Z --config configs/X.py:variant --workdir gs://BUCKET/RUN
#                        [--env KEY=VALUE]... [-- --config.a.b=v ...]
#   launch/tpu.sh logs   --name N --zone Z [--worker 0] [--lines 100] [--no-follow]
#   launch/tpu.sh status --name N --zone Z [--queued]
#   launch/tpu.sh stop   --name N --zone Z [--worker all]
#   launch/tpu.sh delete --name N --zone Z [--queued]
#
# Every command takes --project P (else gcloud's default project) and --dry-run (print each command, one per line,
# quoted exactly as it would run, and run nothing). --name, --zone and --project default to $LPL_TPU_NAME,
# $LPL_TPU_ZONE and $LPL_TPU_PROJECT.
#
# `setup`, `data`, `train`, `logs`, `status` and `stop` run launch/worker.sh on the workers through
# `gcloud compute tpus tpu-vm ssh --worker=...`. `train` starts the same command on every worker
# (`--worker=all`): `python -m lpl_jax.main --multihost --config=... --workdir=... OVERRIDES`. Nothing differs
# between workers: `jax.distributed.initialize()` learns the coordinator address, the number of processes and
# this process's id from the TPU runtime.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$LAUNCH_DIR")
# shellcheck source=launch/common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

# The runtime version that matches an accelerator type (Cloud TPU's documented defaults for JAX).
default_runtime() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime version for --accelerator-type=$1; pass --runtime-version." ;;
  esac
}

# Options each command accepts (besides --name, --zone, --project, --dry-run).
declare -A ALLOWED=(
  [create]='--accelerator-type --runtime-version --queued --spot --best-effort --valid-until --data-disk'
  [setup]='--repo-url --ref --extra --remote-dir'
  [data]='--src --dest --remote-dir'
  [train]='--config --workdir --env --remote-dir'
  [logs]='--worker --lines --no-follow --remote-dir'
  [status]='--queued --remote-dir'
  [stop]='--worker --remote-dir'
  [delete]='--queued'
)

if (($# == 0)) || [[ $1 == -h || $1 == --help ]]; then
  usage
  exit 0
fi
COMMAND=$1
shift
[[ -n ${ALLOWED[$COMMAND]+x} ]] || die "unknown command '$COMMAND'; expected one of: create setup data train logs status stop delete."

NAME=${LPL_TPU_NAME:-}
ZONE=${LPL_TPU_ZONE:-}
PROJECT=${LPL_TPU_PROJECT:-}
ACCELERATOR='' RUNTIME='' QUEUED=0 SPOT=0 BEST_EFFORT=0 VALID_UNTIL='' DATA_DISK=''
REPO_URL='' REF=HEAD EXTRA=tpu REMOTE_DIR=lpl-jax SRC='' DEST='' CONFIG='' WORKDIR='' WORKER='' LINES=100 FOLLOW=1
ENVS=() REST=()

while (($#)); do
  arg=$1
  case $arg in
    --) shift; REST=("$@"); break ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    -h | --help) usage; exit 0 ;;
    --queued | --spot | --best-effort | --no-follow) key=$arg; shift ;;
    --*=*) key=${arg%%=*}; val=${arg#*=}; shift ;;
    --*) key=$arg; (($# >= 2)) || die "$arg needs a value."; val=$2; shift 2 ;;
    *) die "unexpected argument '$arg' (arguments for the trainer or gcloud go after --)." ;;
  esac
  case " --name --zone --project ${ALLOWED[$COMMAND]} " in
    *" $key "*) ;;
    *) die "'$COMMAND' has no option $key (it takes: --name --zone --project --dry-run ${ALLOWED[$COMMAND]})." ;;
  esac
  case $key in
    --name) NAME=$val ;;
    --zone) ZONE=$val ;;
    --project) PROJECT=$val ;;
    --accelerator-type) ACCELERATOR=$val ;;
    --runtime-version) RUNTIME=$val ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --best-effort) BEST_EFFORT=1 QUEUED=1 ;;
    --valid-until) VALID_UNTIL=$val ;;
    --data-disk) DATA_DISK=$val ;;
    --repo-url) REPO_URL=$val ;;
    --ref) REF=$val ;;
    --extra) EXTRA=$val ;;
    --remote-dir) REMOTE_DIR=$val ;;
    --src) SRC=$val ;;
    --dest) DEST=$val ;;
    --config) CONFIG=$val ;;
    --workdir) WORKDIR=$val ;;
    --env) [[ $val == [A-Za-z_]*=* ]] || die "--env needs KEY=VALUE, got '$val'."; ENVS+=("$val") ;;
    --worker) WORKER=$val ;;
    --lines) LINES=$val ;;
    --no-follow) FOLLOW=0 ;;
  esac
done
if ((${#REST[@]})) && [[ $COMMAND != create && $COMMAND != train ]]; then
  die "'$COMMAND' takes no arguments after -- (only create: gcloud flags, and train: trainer flags)."
fi

need "$NAME" --name "or \$LPL_TPU_NAME"
need "$ZONE" --zone "or \$LPL_TPU_ZONE"
LOCATION=("--zone=$ZONE")
[[ -z $PROJECT ]] || LOCATION+=("--project=$PROJECT")

# on_workers WORKER COMMAND: one command line, run by the login shell of each chosen worker ('all' or a number).
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" "--worker=$1" --command "$2"
}

# worker_sh ARG...: the command line that runs launch/worker.sh ARG... in the copy of the repo on a worker.
worker_sh() {
  printf 'cd %s && bash launch/worker.sh %s' "$(quote "$REMOTE_DIR")" "$(join_quoted "$@")"
}

cmd_create() {
  need "$ACCELERATOR" --accelerator-type 'e.g. v4-32, v5litepod-16'
  ((!(SPOT && BEST_EFFORT))) || die '--spot and --best-effort exclude each other.'
  [[ -z $VALID_UNTIL ]] || ((QUEUED)) || die '--valid-until needs --queued (only queued resources expire).'
  RUNTIME=${RUNTIME:-$(default_runtime "$ACCELERATOR")}
  local -a cmd
  if ((QUEUED)); then
    # --best-effort exists only in gcloud's alpha track.
    cmd=(gcloud)
    ((!BEST_EFFORT)) || cmd+=(alpha)
    cmd+=(compute tpus queued-resources create "$NAME" "${LOCATION[@]}" "--node-id=$NAME"
      "--accelerator-type=$ACCELERATOR" "--runtime-version=$RUNTIME")
    ((!SPOT)) || cmd+=(--spot)
    ((!BEST_EFFORT)) || cmd+=(--best-effort)
    [[ -z $VALID_UNTIL ]] || cmd+=("--valid-until-duration=$VALID_UNTIL")
  else
    cmd=(gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" "--accelerator-type=$ACCELERATOR"
      "--version=$RUNTIME")
    ((!SPOT)) || cmd+=(--spot)
  fi
  [[ -z $DATA_DISK ]] || cmd+=("--data-disk=$DATA_DISK")
  run "${cmd[@]}" "${REST[@]}"
  if ((QUEUED)); then
    echo "queued: 'launch/tpu.sh status --queued' shows when it is ACTIVE; then run setup." >&2
  fi
}

cmd_setup() {
  local install remote
  install="cd $(quote "$REMOTE_DIR") && bash launch/worker.sh $(join_quoted setup --extra "$EXTRA")"
  if [[ -n $REPO_URL ]]; then
    # Each worker clones (first time) or fetches, then checks out exactly REF.
    remote=$(printf '%s && %s && %s && %s' \
      "{ [ -d $(quote "$REMOTE_DIR/.git") ] || git clone --quiet $(quote "$REPO_URL") $(quote "$REMOTE_DIR"); }" \
      "git -C $(quote "$REMOTE_DIR") fetch --quiet origin $(quote "$REF")" \
      "git -C $(quote "$REMOTE_DIR") checkout --quiet --detach FETCH_HEAD" "$install")
  else
    [[ $REF == HEAD ]] || die '--ref needs --repo-url (without it, setup ships this checkout as it is).'
    # This checkout as it is: tracked files with their uncommitted edits (git stash create records them in a
    # commit without touching the work tree or the stash list). Untracked files are not shipped.
    local snapshot tarball=${TMPDIR:-/tmp}/lpl-jax-$NAME.tar.gz
    git -C "$REPO_DIR" rev-parse --git-dir >/dev/null 2>&1 ||
      die "$REPO_DIR is not a git checkout; pass --repo-url URL [--ref REF] to install from a repository."
    # (The stash commit's author is irrelevant; set one so this works where git has no identity configured.)
    snapshot=$(git -C "$REPO_DIR" -c user.name=lpl-launch -c user.email=lpl-launch@localhost stash create)
    snapshot=${snapshot:-HEAD}
    run git -C "$REPO_DIR" archive --format=tar.gz -o "$tarball" "$snapshot"
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:lpl-jax.tar.gz" "${LOCATION[@]}" --worker=all
    ((DRY_RUN)) || rm -f "$tarball"
    # Replace the previous copy but keep its .venv (fast re-installs) and logs.
    remote=$(printf 'mkdir -p %s && %s && %s && rm -f lpl-jax.tar.gz && %s' "$(quote "$REMOTE_DIR")" \
      "find $(quote "$REMOTE_DIR") -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} +" \
      "tar -xzf lpl-jax.tar.gz -C $(quote "$REMOTE_DIR")" "$install")
  fi
  on_workers all "$remote"
}

cmd_data() {
  need "$SRC" --src 'e.g. gs://bucket/latents/imagenet256'
  need "$DEST" --dest 'a directory on each worker, e.g. /mnt/disks/data/imagenet256'
  on_workers all "$(worker_sh data --src "$SRC" --dest "$DEST")"
}

cmd_train() {
  need "$CONFIG" --config 'e.g. configs/imagenet.py:post256,lpl'
  need "$WORKDIR" --workdir 'e.g. gs://bucket/runs/post256_lpl'
  if [[ $WORKDIR != gs://* ]]; then
    echo "warning: --workdir=$WORKDIR is not a gs:// path; on a pod every worker must see the same checkpoints." >&2
  fi
  local -a args=()
  local e
  for e in "${ENVS[@]}"; do
    args+=(--env "$e")
  done
  args+=(-- --multihost "--config=$CONFIG" "--workdir=$WORKDIR" "${REST[@]}")
  on_workers all "$(worker_sh train "${args[@]}")"
}

cmd_logs() {
  local -a args=(logs --lines "$LINES")
  ((!FOLLOW)) || args+=(--follow)
  on_workers "${WORKER:-0}" "$(worker_sh "${args[@]}")"
}

cmd_status() {
  local -a qr=(gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" '--format=value(state.state)')
  local -a node=(gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" '--format=value(state)')
  local state
  if ((DRY_RUN)); then
    ((!QUEUED)) || run "${qr[@]}"
    run "${node[@]}"
    on_workers all "$(worker_sh status)"
    return
  fi
  if ((QUEUED)); then
    state=$(run "${qr[@]}")
    echo "queued resource $NAME: $state"
    [[ $state == ACTIVE ]] || return 0
  fi
  state=$(run "${node[@]}")
  echo "TPU VM $NAME: $state"
  if [[ $state == READY ]]; then
    on_workers all "$(worker_sh status)"
  fi
}

cmd_stop() {
  on_workers "${WORKER:-all}" "$(worker_sh stop)"
}

cmd_delete() {
  if ((QUEUED)); then
    # --force deletes the TPU VM that the queued resource created along with the request.
    run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
  fi
}

"cmd_$COMMAND"
