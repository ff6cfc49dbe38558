#!/usr/bin/env bash
# Runs on the machine that trains: each TPU VM worker (launch/tpu.sh sends `cd <repo> && bash launch/worker.sh ...`
# there with `gcloud compute tpus tpu-vm ssh --worker=...`), or a GPU host (launch/gpu.sh runs it locally).
#
#   worker.sh setup [--extra tpu|cuda12|cuda13|cpu] [--python PY]  .venv with Python >= 3.11, pip install -c constraints
#   worker.sh train [--env KEY=VALUE]... -- ARG...    python -m lpl_jax.main ARG... in the background (nohup, setsid);
#                                                     log appended to logs/train-w<worker>.log, pid in logs/train.pid
#   worker.sh stop [--timeout S]                      SIGTERM (the trainer checkpoints, then exits); waits S seconds
#   worker.sh status                                  running or not, and the last log line
#   worker.sh logs [--lines N] [--follow]             tail of this worker's log
#   worker.sh data --src URL --dest DIR               gcloud storage rsync --recursive URL DIR (this worker's disk;
#                                                     DIR is created, with sudo if needed)
#
# The worker number (log names, messages) is TPU_WORKER_ID if set, else the TPU VM's metadata attribute
# agent-worker-number, else the host name. It only names things: jax.distributed.initialize() gets the process id
# from the TPU runtime, not from here.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/common.sh
source launch/common.sh

PID_FILE=logs/train.pid
METADATA_URL=http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number

worker_id() {
  if [[ -n ${TPU_WORKER_ID:-} ]]; then
    printf '%s' "$TPU_WORKER_ID"
  else
    curl -sf --max-time 2 -H 'Metadata-Flavor: Google' "$METADATA_URL" 2>/dev/null || hostname
  fi
}

alive() {  # a process that exists and is not a zombie waiting to be reaped
  kill -0 "$1" 2>/dev/null && [[ $(ps -o stat= -p "$1" 2>/dev/null) != Z* ]]
}

running_pid() {  # prints the pid of a live training process started by `train`, or fails
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

cmd_train() {
  local -a envs=(PYTHONUNBUFFERED=1)
  while (($#)); do
    case $1 in
      --env) [[ ${2:-} == *=* ]] || die "train: --env needs KEY=VALUE."; envs+=("$2"); shift 2 ;;
      --) shift; break ;;
      *) die "train: unexpected argument '$1' (the trainer's arguments go after --)." ;;
    esac
  done
  (($#)) || die "train: no arguments for lpl_jax.main after --."
  [[ -x .venv/bin/python ]] || die "worker $W: $PWD/.venv/bin/python is missing; run setup first."
  local pid log=logs/train-w$W.log
  if pid=$(running_pid); then
    die "worker $W: a training process is already running (pid $pid); stop it first (launch/tpu.sh stop)."
  fi
  mkdir -p logs
  printf '\n=== %s worker %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$W" \
    "$(join_quoted env "${envs[@]}" python -m lpl_jax.main "$@")" >>"$log"
  # No job control here, so the child is not a process-group leader and setsid execs in place: $! is the trainer.
  nohup setsid env "${envs[@]}" .venv/bin/python -m lpl_jax.main "$@" >>"$log" 2>&1 </dev/null &
  echo $! >"$PID_FILE"
  echo "worker $W: started pid $! (log: $PWD/$log)"
}

cmd_stop() {
  local timeout=600 pid waited=0
  while (($#)); do
    case $1 in
      --timeout) timeout=${2:?--timeout needs a value}; shift 2 ;;
      *) die "stop: unexpected argument '$1'." ;;
    esac
  done
  if ! pid=$(running_pid); then
    echo "worker $W: not running"
    return 0
  fi
  kill -TERM "$pid"
  echo "worker $W: sent SIGTERM to pid $pid (the trainer saves a checkpoint at the next step, then exits)"
  while alive "$pid" && ((waited < 5 * timeout)); do
    sleep 0.2
    waited=$((waited + 1))
  done
  if alive "$pid"; then
    echo "worker $W: pid $pid still running after ${timeout}s" >&2
    return 1
  fi
  echo "worker $W: stopped"
}

cmd_status() {
  local pid last
  last=$(tail -n 1 "logs/train-w$W.log" 2>/dev/null || true)
  if pid=$(running_pid); then
    echo "worker $W: running (pid $pid); last log line: $last"
  else
    echo "worker $W: not running; last log line: ${last:-(no log)}"
  fi
}

cmd_logs() {
  local lines=100 follow=0 log=logs/train-w$W.log
  while (($#)); do
    case $1 in
      --lines) lines=${2:?--lines needs a value}; shift 2 ;;
      --follow) follow=1; shift ;;
      *) die "logs: unexpected argument '$1'." ;;
    esac
  done
  [[ -f $log ]] || die "worker $W: no log yet ($PWD/$log)."
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
