#!/usr/bin/env bash
# Cloud TPU VMs (one host or a pod slice) for lpl_jax: create, install, copy data, train, watch, delete.
# Step by step, with costs and caveats: docs/launch.md.
#
#   launch/tpu.sh create --name N --zone Z --accelerator-type v4-32 [--runtime-version V] [--queued]
#                        [--spot | --best-effort] [--valid-until 6h] [--data-disk SPEC] [--autocheckpoint]
#                        [-- EXTRA_GCLOUD_FLAGS...]
#   launch/tpu.sh setup  --name N --zone Z [--repo-url URL [--ref REF]] [--extra tpu] [--remote-dir DIR]
#   launch/tpu.sh data   --name N --zone Z --src gs://BUCKET/PATH --dest /local/dir
#   launch/tpu.sh train  --name N --zone Z --config configs/X.py:variant --workdir gs://BUCKET/RUN
#                        [--watch [--max-restarts 100]] [--no-cleanup] [--env KEY=VALUE]... [-- --config.a.b=v ...]
#   launch/tpu.sh logs   --name N --zone Z [--worker 0] [--lines 100] [--no-follow]
#   launch/tpu.sh status --name N --zone Z [--queued]
#   launch/tpu.sh stop   --name N --zone Z [--worker all] [--timeout 600] [--force]
#   launch/tpu.sh delete --name N --zone Z [--queued]
#   launch/tpu.sh watch  --name N --zone Z --accelerator-type T [create options] [--repo-url URL [--ref REF]]
#                        [--data gs://SRC=/DEST]... --config C --workdir gs://BUCKET/RUN [--max-restarts N]
#                        [--env KEY=VALUE]... [--interval 300] [--once] [-- --config.a.b=v ...]
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
#
# train --watch: each worker runs the trainer under launch/supervise.sh, which runs it again after a crash (not
# after it finished, an input error (exit 2) or `stop`). stop --force: SIGKILL to the whole run on a worker that
# has not stopped within --timeout seconds. create --autocheckpoint: the TPU runtime sends the trainer SIGTERM
# before a maintenance event, so it saves a checkpoint (gcloud's alpha track: --autocheckpoint-enabled).
# watch: runs here until the run is over: every --interval seconds it reads <workdir>/status.json (finished: exit
# 0; failed: exit 2), re-creates a node that is missing, PREEMPTED or TERMINATED (delete, create, setup, data,
# train --watch), and starts train --watch on a READY node where worker 0 runs no trainer. --dry-run prints the
# commands of one round, --once runs one round.
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
CREATE_OPTIONS='--accelerator-type --runtime-version --queued --spot --best-effort --valid-until --data-disk
  --autocheckpoint'
declare -A ALLOWED=(
  [create]=$CREATE_OPTIONS
  [setup]='--repo-url --ref --extra --remote-dir'
  [data]='--src --dest --remote-dir'
  [train]='--config --workdir --env --watch --max-restarts --no-cleanup --remote-dir'
  [logs]='--worker --lines --no-follow --remote-dir'
  [status]='--queued --remote-dir'
  [stop]='--worker --timeout --force --remote-dir'
  [delete]='--queued'
  [watch]="$CREATE_OPTIONS --repo-url --ref --extra --data --config --workdir --env --max-restarts --no-cleanup
    --interval --once --remote-dir"
)

if (($# == 0)) || [[ $1 == -h || $1 == --help ]]; then
  usage
  exit 0
fi
COMMAND=$1
shift
[[ -n ${ALLOWED[$COMMAND]+x} ]] ||
  die "unknown command '$COMMAND'; expected one of: create setup data train logs status stop delete watch."

NAME=${LPL_TPU_NAME:-}
ZONE=${LPL_TPU_ZONE:-}
PROJECT=${LPL_TPU_PROJECT:-}
ACCELERATOR='' RUNTIME='' QUEUED=0 SPOT=0 BEST_EFFORT=0 VALID_UNTIL='' DATA_DISK='' AUTOCHECKPOINT=0
REPO_URL='' REF=HEAD EXTRA=tpu REMOTE_DIR=lpl-jax SRC='' DEST='' CONFIG='' WORKDIR='' WORKER='' LINES=100 FOLLOW=1
WATCH=0 MAX_RESTARTS='' NO_CLEANUP=0 TIMEOUT='' FORCE=0 INTERVAL=300 ONCE=0
ENVS=() REST=() DATA=()

while (($#)); do
  arg=$1
  case $arg in
    --) shift; REST=("$@"); break ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    -h | --help) usage; exit 0 ;;
    --queued | --spot | --best-effort | --no-follow | --autocheckpoint | --watch | --no-cleanup | --force | --once)
      key=$arg; shift ;;
    --*=*) key=${arg%%=*}; val=${arg#*=}; shift ;;
    --*) key=$arg; (($# >= 2)) || die "$arg needs a value."; val=$2; shift 2 ;;
    *) die "unexpected argument '$arg' (arguments for the trainer or gcloud go after --)." ;;
  esac
  allowed=$(printf '%s' "${ALLOWED[$COMMAND]}" | tr -s ' \n' '  ')
  case " --name --zone --project $allowed " in
    *" $key "*) ;;
    *) die "'$COMMAND' has no option $key (it takes: --name --zone --project --dry-run $allowed)." ;;
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
    --autocheckpoint) AUTOCHECKPOINT=1 ;;
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
    --watch) WATCH=1 ;;
    --max-restarts) [[ $val =~ ^[0-9]+$ ]] || die "--max-restarts=$val; expected a whole number."; MAX_RESTARTS=$val ;;
    --no-cleanup) NO_CLEANUP=1 ;;
    --timeout) [[ $val =~ ^[0-9]+$ ]] || die "--timeout=$val; expected whole seconds."; TIMEOUT=$val ;;
    --force) FORCE=1 ;;
    --interval) [[ $val =~ ^[1-9][0-9]*$ ]] || die "--interval=$val; expected seconds."; INTERVAL=$val ;;
    --once) ONCE=1 ;;
    --data) [[ $val == ?*=/?* ]] || die "--data needs SRC=/DEST, got '$val'."; DATA+=("$val") ;;
  esac
done
# After --: gcloud flags for create, trainer flags for train and watch.
GCLOUD_EXTRA=() TRAINER_ARGS=()
case $COMMAND in
  create) GCLOUD_EXTRA=("${REST[@]}") ;;
  train | watch) TRAINER_ARGS=("${REST[@]}") ;;
  *) ((${#REST[@]} == 0)) ||
    die "'$COMMAND' takes no arguments after -- (only create: gcloud flags, and train and watch: trainer flags)." ;;
esac
[[ $COMMAND != watch ]] || WATCH=1
[[ -z $MAX_RESTARTS ]] || ((WATCH)) || die '--max-restarts needs --watch.'

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

check_create() {
  need "$ACCELERATOR" --accelerator-type 'e.g. v4-32, v5litepod-16'
  ((!(SPOT && BEST_EFFORT))) || die '--spot and --best-effort exclude each other.'
  [[ -z $VALID_UNTIL ]] || ((QUEUED)) || die '--valid-until needs --queued (only queued resources expire).'
  RUNTIME=${RUNTIME:-$(default_runtime "$ACCELERATOR")}
}

cmd_create() {
  check_create
  # --best-effort and --autocheckpoint-enabled exist only in gcloud's alpha track (both for tpu-vm create and for
  # queued-resources create); without them the command stays on the GA track.
  local -a cmd=(gcloud)
  ((!BEST_EFFORT && !AUTOCHECKPOINT)) || cmd+=(alpha)
  if ((QUEUED)); then
    cmd+=(compute tpus queued-resources create "$NAME" "${LOCATION[@]}" "--node-id=$NAME"
      "--accelerator-type=$ACCELERATOR" "--runtime-version=$RUNTIME")
    ((!SPOT)) || cmd+=(--spot)
    ((!BEST_EFFORT)) || cmd+=(--best-effort)
    [[ -z $VALID_UNTIL ]] || cmd+=("--valid-until-duration=$VALID_UNTIL")
  else
    cmd+=(compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" "--accelerator-type=$ACCELERATOR"
      "--version=$RUNTIME")
    ((!SPOT)) || cmd+=(--spot)
  fi
  ((!AUTOCHECKPOINT)) || cmd+=(--autocheckpoint-enabled)
  [[ -z $DATA_DISK ]] || cmd+=("--data-disk=$DATA_DISK")
  run "${cmd[@]}" "${GCLOUD_EXTRA[@]}"
  if ((QUEUED)) && [[ $COMMAND == create ]]; then
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

check_train() {
  need "$CONFIG" --config 'e.g. configs/imagenet.py:post256,lpl'
  need "$WORKDIR" --workdir 'e.g. gs://bucket/runs/post256_lpl'
}

# cmd_train [TRAINER_FLAG...]: these flags go to the trainer before the ones after -- (watch adds --force).
cmd_train() {
  check_train
  if [[ $WORKDIR != gs://* ]]; then
    echo "warning: --workdir=$WORKDIR is not a gs:// path; on a pod every worker must see the same checkpoints." >&2
  fi
  local -a args=()
  local e
  for e in "${ENVS[@]}"; do
    args+=(--env "$e")
  done
  ((!WATCH)) || args+=(--watch)
  [[ -z $MAX_RESTARTS ]] || args+=(--max-restarts "$MAX_RESTARTS")
  ((!NO_CLEANUP)) || args+=(--no-cleanup)
  args+=(-- --multihost "--config=$CONFIG" "--workdir=$WORKDIR" "$@" "${TRAINER_ARGS[@]}")
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
  local -a args=(stop)
  [[ -z $TIMEOUT ]] || args+=(--timeout "$TIMEOUT")
  ((!FORCE)) || args+=(--force)
  on_workers "${WORKER:-all}" "$(worker_sh "${args[@]}")"
}

cmd_delete() {
  if ((QUEUED)); then
    # --force deletes the TPU VM that the queued resource created along with the request.
    run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
  fi
}

# --- watch: an unattended run (spot capacity) from this machine ---

say() {  # one line of watch's own
  printf '[watch %s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"
}

# json_field KEY JSON: the value of a string or number field of status.json (a flat object), or nothing.
json_field() {
  local re="\"$1\""'[[:space:]]*:[[:space:]]*("(([^"\\]|\\.)*)"|(-?[0-9][0-9.eE+-]*))'
  [[ $2 =~ $re ]] || return 0
  printf '%s' "${BASH_REMATCH[2]}${BASH_REMATCH[4]}"
}

# describe qr|node: the state of the queued resource or of the TPU VM; nothing when it does not exist. Any other
# error fails: a passing one (network, credentials) must not make watch delete a node that is fine.
describe() {
  local out err rc=0
  local -a cmd=(gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" '--format=value(state)')
  [[ $1 == node ]] ||
    cmd=(gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" '--format=value(state.state)')
  printf '+ %s\n' "$(join_quoted "${cmd[@]}")" >&2
  err=$(mktemp)
  out=$("${cmd[@]}" 2>"$err") || rc=$?
  if ((rc == 0)); then
    printf '%s' "$out"
  elif grep -q NOT_FOUND "$err"; then
    rc=0
  else
    cat "$err" >&2
  fi
  rm -f "$err"
  return "$rc"
}

# install_and_train: a new TPU VM: setup, data, then train --watch with the trainer's --force: the workdir's lock
# can only be held by a trainer on the VM this one replaced, which is gone, and it would keep the workdir for ten
# minutes (until its heartbeat is stale).
install_and_train() {
  cmd_setup
  local d
  for d in "${DATA[@]}"; do
    SRC=${d%%=*} DEST=${d#*=}
    cmd_data
  done
  cmd_train --force
}

# watch_round: one look at the run and the node, and what they need. Runs in a subshell with errexit: a failed step
# ends the round (watch tries again at the next one). Exit status 10: the run finished; 11: it failed.
watch_round() {
  local json state step total out rc=0
  json=$(gcloud storage cat "${WORKDIR%/}/status.json" 2>/dev/null) || json=''
  state=$(json_field state "$json")
  case $state in
    finished) say "the run finished: $json"; exit 10 ;;
    failed) say "the run failed: $(json_field message "$json")"; exit 11 ;;
  esac
  step=$(json_field step "$json")
  total=$(json_field total_steps "$json")
  say "run: ${state:-no status.json yet}${step:+ at step $step/$total}"
  if ((QUEUED)); then
    state=$(describe qr)
    case $state in
      ACTIVE) ;;
      '' | FAILED | SUSPENDED)
        say "queued resource $NAME: ${state:-missing}: requesting it again (setup and train once it is ACTIVE)"
        [[ -z $state ]] || cmd_delete
        cmd_create
        return 0 ;;
      *) say "queued resource $NAME: $state: waiting"; return 0 ;;
    esac
  fi
  state=$(describe node)
  case $state in
    READY) ;;
    '' | PREEMPTED | TERMINATED)
      if ((QUEUED)); then
        say "TPU VM $NAME: ${state:-missing}: deleting its queued resource and requesting it again"
        cmd_delete
        cmd_create
        return 0
      fi
      say "TPU VM $NAME: ${state:-missing}: re-creating it"
      [[ -z $state ]] || cmd_delete
      cmd_create
      install_and_train
      return 0 ;;
    *) say "TPU VM $NAME: $state: waiting"; return 0 ;;
  esac
  out=$(on_workers 0 "$(worker_sh status)") || rc=$?
  [[ -z $out ]] || printf '%s\n' "$out"
  if grep -qE '^worker [^:]*: running' <<<"$out"; then
    return 0
  elif grep -qE '^worker [^:]*: not running' <<<"$out"; then
    say "TPU VM $NAME: READY, no trainer on worker 0: starting train --watch"
    cmd_train
  elif ((rc == 255)); then
    say "worker 0 did not answer (ssh exit 255)"
    return 1
  else  # no copy of the repo, or no .venv: a new TPU VM (a queued resource that became ACTIVE)
    say "TPU VM $NAME: READY, not set up: setup, then train --watch"
    install_and_train
  fi
}

watch_dry_run() {
  echo "# one round of watch (every ${INTERVAL}s until the run's status.json says finished: exit 0, or failed: exit 2)"
  run gcloud storage cat "${WORKDIR%/}/status.json"
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" '--format=value(state.state)'
    echo '# the queued resource is missing, FAILED or SUSPENDED (or its TPU VM is missing, PREEMPTED or TERMINATED):'
    echo '# request it again (when it is ACTIVE, a later round installs and trains)'
    cmd_delete
    cmd_create
    echo '# the queued resource is ACTIVE:'
    run gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" '--format=value(state)'
  else
    run gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" '--format=value(state)'
    echo '# the TPU VM is missing, PREEMPTED or TERMINATED: re-create it, install, train'
    cmd_delete
    cmd_create
    install_and_train
  fi
  echo '# the TPU VM is READY: does worker 0 run a trainer?'
  on_workers 0 "$(worker_sh status)"
  echo '# no: start one'
  cmd_train
  echo '# not set up (a new TPU VM): install it, then train'
  install_and_train
}

cmd_watch() {
  check_create
  check_train
  [[ $WORKDIR == gs://* ]] || die "watch: --workdir=$WORKDIR; expected gs://... (watch reads the run's status.json)."
  if ((DRY_RUN)); then
    watch_dry_run
    return 0
  fi
  local rc
  while :; do
    set +e
    (set -e; watch_round)
    rc=$?
    set -e
    case $rc in
      0) ;;
      10) exit 0 ;;
      11) exit 2 ;;
      *) say "this round failed (exit $rc); next round in ${INTERVAL}s" ;;
    esac
    ((!ONCE)) || exit "$rc"
    sleep "$INTERVAL"
  done
}

"cmd_$COMMAND"
