#!/usr/bin/env bash
# Runs on the machine that trains: each TPU VM worker (launch/tpu.sh sends `cd <repo> && bash launch/worker.sh ...`
# there with `gcloud compute tpus tpu-vm ssh --worker=...`), or a GPU host (launch/gpu.sh runs it locally).
#
#   worker.sh setup [--extra tpu|cuda12|cuda13|cpu] [--python PY]  .venv with Python >= 3.11, pip install -c constraints
#   worker.sh train [--watch [--max-restarts N]] [--no-cleanup] [--env KEY=VALUE]... -- ARG...
#       python -m lpl_jax.main ARG... in the background (nohup, setsid) under launch/supervise.sh, which runs it
#       again after a crash when --watch is given (at most N times, default 100; never after exit 0, exit 2 = an
#       input error, or a stop). Log appended to logs/train-w<worker>.log; the supervisor's pid (the leader of
#       the process group of the whole run) in logs/train.pid, the trainer's in logs/trainer.pid. When ARG...
#       holds --workdir=DIR, the log is also copied to DIR/logs/train-w<worker>.log after each exit of the
#       trainer and every $LPL_LOG_SYNC_S seconds (default 300). Before starting, processes that still hold the
#       accelerator (stale ones from an earlier run) are killed, unless --no-cleanup; it refuses to start while
#       a run that this script started is alive.
#   worker.sh stop [--timeout S] [--force]            SIGTERM to the supervisor (no more restarts), which passes it
#                                                     to the trainer (it checkpoints, then exits); waits S seconds
#                                                     (default 600), then with --force SIGKILLs the whole run
#   worker.sh status                                  running or not (or not set up), and the last log line
#   worker.sh logs [--lines N] [--follow]             tail of this worker's log
#   worker.sh data --src URL --dest DIR               gcloud storage rsync --recursive URL DIR (this worker's disk;
#                                                     DIR is created, with sudo if needed)
#
# The worker number (log names, messages) is TPU_WORKER_ID if set, else the TPU VM's metadata attribute
# agent-worker-number, else the host name. It only names things: jax.distributed.initialize() gets the process id
# from the TPU runtime, not from here.
#
# Environment: LPL_LOG_DIR (default <repo>/logs), LPL_ACCEL_DEVICES (the device files the cleanup looks at: globs,
# space-separated; default '/dev/accel* /dev/vfio/*'; empty: none), LPL_CLEANUP_GRACE_S (how long a stale process
# gets between SIGTERM and SIGKILL, default 5), and launch/supervise.sh's LPL_RESTART_BACKOFF_S and LPL_LOG_SYNC_S.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/common.sh
source launch/common.sh

LOG_DIR=${LPL_LOG_DIR:-logs}
[[ $LOG_DIR == /* ]] || LOG_DIR=$PWD/$LOG_DIR
PID_FILE=$LOG_DIR/train.pid
TRAINER_PID_FILE=$LOG_DIR/trainer.pid
METADATA_URL=http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number

worker_id() {
  if [[ -n ${TPU_WORKER_ID:-} ]]; then
    printf '%s' "$TPU_WORKER_ID"
  else
    curl -sf --max-time 2 -H 'Metadata-Flavor: Google' "$METADATA_URL" 2>/dev/null || hostname
  fi
}

alive() {  # a process that exists and is not a zombie waiting to be reaped (ps: kill -0 fails on others' processes)
  local stat
  stat=$(ps -o stat= -p "$1" 2>/dev/null) && [[ -n $stat && $stat != Z* ]]
}

running_pid() {  # prints the pid of a live run started by `train` (its supervisor), or fails
  local pid
  pid=$(cat "$PID_FILE" 2>/dev/null) || return 1
  [[ -n $pid ]] && alive "$pid" && printf '%s' "$pid"
}

find_python() {
  local py
  for py in ${PYTHON:+"$PYTHON"} python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      printf '%s' "$py"
      return 0
    fi
  done
  return 1
}

cmd_setup() {
  local extra=tpu py
  while (($#)); do
    case $1 in
      --extra) extra=${2:?--extra needs a value}; shift 2 ;;
      --python) PYTHON=${2:?--python needs a value}; shift 2 ;;
      *) die "setup: unexpected argument '$1'." ;;
    esac
  done
  local -a pkgs
  case $extra in
    tpu | cuda12 | cuda13) pkgs=("jax[$extra]") ;;
    cpu) pkgs=() ;;
    *) die "setup: --extra=$extra; expected tpu, cuda12, cuda13 or cpu." ;;
  esac
  if ! py=$(find_python); then
    # TPU VM images based on Ubuntu 22.04 ship Python 3.10; the project needs >= 3.11 (universe has 3.11).
    echo "worker $W: no Python >= 3.11 found; installing python3.11 with apt-get" >&2
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv
    py=python3.11
  fi
  if [[ ! -x .venv/bin/python ]]; then
    if ! "$py" -m venv .venv; then  # Debian/Ubuntu split ensurepip into pythonX.Y-venv
      rm -rf .venv
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$(basename "$py")-venv"
      "$py" -m venv .venv
    fi
  fi
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e . "${pkgs[@]}"
  echo "worker $W: installed ($(.venv/bin/python -c 'import jax, lpl_jax; print("jax", jax.__version__)'))"
}

# workdir_of ARG...: the trainer's --workdir among its arguments (absl takes --workdir=DIR and --workdir DIR).
workdir_of() {
  local prev='' a
  for a in "$@"; do
    if [[ $prev == --workdir ]]; then
      printf '%s' "$a"
      return 0
    fi
    if [[ $a == --workdir=* ]]; then
      printf '%s' "${a#--workdir=}"
      return 0
    fi
    prev=$a
  done
  return 1
}

# as_root CMD...: CMD as root when that needs no password (to see and signal other users' processes), else as is.
as_root() {
  if ((EUID == 0)); then
    "$@"
  elif sudo -n true 2>/dev/null; then
    sudo -n "$@"
  else
    "$@"
  fi
}

# holders FILE...: the pids of the processes that have any of the files open, one per line.
holders() {
  if command -v lsof >/dev/null; then
    as_root lsof -t -w -- "$@" 2>/dev/null || true
  else  # fuser prints the pids on stdout, the file names and access letters on stderr
    as_root fuser "$@" 2>/dev/null | tr -s ' \t' '\n' | grep -E '^[0-9]+$' || true
  fi
}

# ancestors: this process and the ones it runs under (never to be killed by the cleanup), one per line.
ancestors() {
  local p=$$
  while [[ $p =~ ^[0-9]+$ ]] && ((p > 1)); do
    printf '%s\n' "$p"
    p=$(ps -o ppid= -p "$p" 2>/dev/null | tr -d ' ') || break
  done
}

# kill_stale PID: SIGTERM, then SIGKILL after LPL_CLEANUP_GRACE_S seconds; one line saying what happened.
kill_stale() {
  local pid=$1 grace=${LPL_CLEANUP_GRACE_S:-5} waited=0 owner who how='SIGTERM'
  local -a as=()
  [[ $grace =~ ^[0-9]+$ ]] || die "LPL_CLEANUP_GRACE_S=$grace; expected whole seconds."
  owner=$(ps -o uid= -p "$pid" 2>/dev/null | tr -d ' ') || return 0  # gone meanwhile
  who=$(ps -o user=,args= -p "$pid" 2>/dev/null | cut -c1-160) || return 0
  # Another user's process (e.g. a trainer started with sudo) needs root to be signalled.
  ((EUID == 0)) || [[ $owner == "$EUID" ]] || as=(sudo -n)
  "${as[@]}" kill -TERM "$pid" 2>/dev/null || true
  while alive "$pid" && ((waited < 10 * grace)); do
    sleep 0.1
    waited=$((waited + 1))
  done
  if alive "$pid"; then
    how="SIGKILL after ${grace}s"
    "${as[@]}" kill -KILL "$pid" 2>/dev/null || true
    waited=0
    while alive "$pid" && ((waited < 50)); do
      sleep 0.1
      waited=$((waited + 1))
    done
  fi
  if alive "$pid"; then
    echo "worker $W: stale process $pid holds the accelerator and could not be killed ($who)" >&2
  else
    echo "worker $W: killed stale process $pid that held the accelerator ($how): $who"
  fi
}

# cleanup_accelerators: processes that hold the accelerator while no run of this script is alive are left over from
# an earlier run (a crashed trainer keeps the chips, and the next one fails with "TPU in use"): kill them.
cleanup_accelerators() {
  local -a patterns files=() pids
  local p f pid keep
  read -ra patterns <<<"${LPL_ACCEL_DEVICES-/dev/accel* /dev/vfio/*}"
  for p in "${patterns[@]}"; do
    while IFS= read -r f; do
      files+=("$f")
    done < <(compgen -G "$p" || true)
  done
  ((${#files[@]})) || return 0
  if ! command -v lsof >/dev/null && ! command -v fuser >/dev/null; then
    echo "worker $W: neither lsof nor fuser is installed: not looking for stale processes on ${files[*]}" >&2
    return 0
  fi
  keep=" $(ancestors | tr '\n' ' ')"
  mapfile -t pids < <(holders "${files[@]}" | sort -un)
  for pid in "${pids[@]}"; do
    [[ $keep == *" $pid "* ]] || kill_stale "$pid"
  done
}

cmd_train() {
  local -a envs=(PYTHONUNBUFFERED=1)
  local watch=0 max_restarts='' cleanup=1
  while (($#)); do
    case $1 in
      --env) [[ ${2:-} == *=* ]] || die "train: --env needs KEY=VALUE."; envs+=("$2"); shift 2 ;;
      --watch) watch=1; shift ;;
      --max-restarts) max_restarts=${2:?--max-restarts needs a value}; shift 2 ;;
      --no-cleanup) cleanup=0; shift ;;
      --) shift; break ;;
      *) die "train: unexpected argument '$1' (the trainer's arguments go after --)." ;;
    esac
  done
  (($#)) || die "train: no arguments for lpl_jax.main after --."
  [[ -z $max_restarts ]] || ((watch)) || die 'train: --max-restarts needs --watch.'
  [[ -z $max_restarts || $max_restarts =~ ^[0-9]+$ ]] ||
    die "train: --max-restarts=$max_restarts; expected a whole number."
  [[ -x .venv/bin/python ]] || die "worker $W: $PWD/.venv/bin/python is missing; run setup first."
  local pid log=$LOG_DIR/train-w$W.log workdir restarts=0
  if pid=$(running_pid); then
    die "worker $W: a training process is already running (pid $pid); stop it first (launch/tpu.sh stop)."
  fi
  ((!cleanup)) || cleanup_accelerators
  ((!watch)) || restarts=${max_restarts:-100}
  local -a supervise=(bash launch/supervise.sh --max-restarts "$restarts" --pid-file "$TRAINER_PID_FILE" --log "$log")
  if workdir=$(workdir_of "$@"); then
    supervise+=(--log-dest "${workdir%/}/logs/train-w$W.log")
  fi
  mkdir -p "$LOG_DIR"
  rm -f "$TRAINER_PID_FILE"
  printf '\n=== %s worker %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$W" \
    "$(join_quoted env "${envs[@]}" python -m lpl_jax.main "$@")" >>"$log"
  # No job control here, so the child is not a process-group leader and setsid execs in place: $! is the
  # supervisor, and the leader of a new process group that holds the trainer and all it starts (stop --force).
  nohup setsid "${supervise[@]}" -- env "${envs[@]}" .venv/bin/python -m lpl_jax.main "$@" \
    >>"$log" 2>&1 </dev/null &
  echo $! >"$PID_FILE"
  echo "worker $W: started pid $! (launch/supervise.sh, restarts after a crash: $restarts; log: $log)"
}

# kill_run PID: SIGKILL to the run whose supervisor is PID: its whole process group when it leads one (setsid in
# `train`), else PID and the trainer.
kill_run() {
  local pid=$1 pgid trainer
  pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ') || true
  if [[ $pgid == "$pid" ]]; then
    kill -KILL -- "-$pid" 2>/dev/null || true
  else
    kill -KILL "$pid" 2>/dev/null || true
    trainer=$(cat "$TRAINER_PID_FILE" 2>/dev/null) || true
    if [[ -n $trainer ]] && alive "$trainer"; then
      kill -KILL "$trainer" 2>/dev/null || true
    fi
  fi
}

# wait_gone PID TICKS: waits while PID is alive, at most TICKS tenths of a second.
wait_gone() {
  local waited=0
  while alive "$1" && ((waited < $2)); do
    sleep 0.1
    waited=$((waited + 1))
  done
}

cmd_stop() {
  local timeout=600 force=0 pid
  while (($#)); do
    case $1 in
      --timeout) timeout=${2:?--timeout needs a value}; shift 2 ;;
      --force) force=1; shift ;;
      *) die "stop: unexpected argument '$1'." ;;
    esac
  done
  [[ $timeout =~ ^[0-9]+$ ]] || die "stop: --timeout=$timeout; expected whole seconds."
  if ! pid=$(running_pid); then
    echo "worker $W: not running"
    return 0
  fi
  # The supervisor stops restarting and passes SIGTERM on to the trainer, then exits once the trainer has.
  kill -TERM "$pid"
  echo "worker $W: sent SIGTERM to pid $pid (the trainer saves a checkpoint at the next step, then exits)"
  wait_gone "$pid" $((10 * timeout))
  if alive "$pid"; then
    if ((!force)); then
      echo "worker $W: pid $pid still running after ${timeout}s (stop --force kills it)" >&2
      return 1
    fi
    echo "worker $W: pid $pid still running after ${timeout}s: SIGKILL to the run's process group"
    kill_run "$pid"
    wait_gone "$pid" 50
    if alive "$pid"; then
      echo "worker $W: pid $pid survived SIGKILL" >&2
      return 1
    fi
    echo "worker $W: killed"
    return 0
  fi
  echo "worker $W: stopped"
}

cmd_status() {
  local pid trainer last
  last=$(tail -n 1 "$LOG_DIR/train-w$W.log" 2>/dev/null || true)
  if pid=$(running_pid); then
    trainer=$(cat "$TRAINER_PID_FILE" 2>/dev/null) || true
    if [[ -n $trainer ]] && alive "$trainer"; then
      echo "worker $W: running (pid $pid, trainer pid $trainer); last log line: $last"
    else
      echo "worker $W: running (pid $pid, no trainer at the moment); last log line: $last"
    fi
  elif [[ ! -x .venv/bin/python ]]; then
    echo "worker $W: not set up ($PWD/.venv/bin/python is missing)"
  else
    echo "worker $W: not running; last log line: ${last:-(no log)}"
  fi
}

cmd_logs() {
  local lines=100 follow=0 log=$LOG_DIR/train-w$W.log
  while (($#)); do
    case $1 in
      --lines) lines=${2:?--lines needs a value}; shift 2 ;;
      --follow) follow=1; shift ;;
      *) die "logs: unexpected argument '$1'." ;;
    esac
  done
  [[ -f $log ]] || die "worker $W: no log yet ($log)."
  if ((follow)); then
    exec tail -n "$lines" -F "$log"
  fi
  tail -n "$lines" "$log"
}

cmd_data() {
  local src='' dest=''
  while (($#)); do
    case $1 in
      --src) src=${2:?--src needs a value}; shift 2 ;;
      --dest) dest=${2:?--dest needs a value}; shift 2 ;;
      *) die "data: unexpected argument '$1'." ;;
    esac
  done
  need "$src" --src
  need "$dest" --dest
  if ! mkdir -p "$dest" 2>/dev/null; then  # e.g. /data: TPU VM users have passwordless sudo
    sudo mkdir -p "$dest"
    sudo chown "$(id -u):$(id -g)" "$dest"
  fi
  gcloud storage rsync --recursive "$src" "$dest"
  echo "worker $W: $src -> $dest ($(du -sh "$dest" | cut -f1))"
}

(($#)) || die "usage: worker.sh setup|train|stop|status|logs|data [options]"
W=$(worker_id)
command=$1
shift
case $command in
  setup | train | stop | status | logs | data) "cmd_$command" "$@" ;;
  *) die "unknown command '$command'; expected setup, train, stop, status, logs or data." ;;
esac
