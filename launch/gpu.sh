#!/usr/bin/env bash
# One host with one or several NVIDIA GPUs: install jax[cuda12] beside lpl_jax, then train with the same configs.
# More in docs/launch.md.
#
#   launch/gpu.sh setup [--cuda 12|13]
#   launch/gpu.sh train --config configs/X.py:variant --workdir DIR [--gpus N] [--fsdp N] [--mem-fraction F]
#                       [--python PY] [--watch [--max-restarts 100]] [--env KEY=VALUE]... [-- --config.a.b=v ...]
#
# setup: .venv in the repo (Python >= 3.11), `pip install -c constraints.txt -e . 'jax[cuda12]'` (launch/worker.sh).
# train: runs in the foreground (use tmux or nohup for long runs):
#   env XLA_PYTHON_CLIENT_MEM_FRACTION=F [CUDA_VISIBLE_DEVICES=0,..,N-1] PY -m lpl_jax.main --config=... \
#       --workdir=... --config.mesh.data=-1 --config.mesh.fsdp=N OVERRIDES
# The mesh covers every visible GPU: a (data, fsdp) mesh with mesh.data=-1 (what fsdp leaves); the batch is sharded
# over both axes, and with --config.mesh.shard_params=True the denoiser parameters and optimizer state are sharded
# over groups of --fsdp GPUs.
# --mem-fraction (default 0.9) is the share of each GPU's memory that XLA preallocates (JAX's own default: 0.75).
# --watch runs the same command under launch/supervise.sh (still in the foreground): after a crash it runs it again
# (at most --max-restarts times), not after it finished (exit 0), an input error (exit 2) or Ctrl-C (which makes the
# trainer save a checkpoint and exit).
# --dry-run prints each command, one per line, quoted exactly as it would run, and runs nothing.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$LAUNCH_DIR")
# shellcheck source=launch/common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

if (($# == 0)) || [[ $1 == -h || $1 == --help ]]; then
  usage
  exit 0
fi
COMMAND=$1
shift
case $COMMAND in
  setup) allowed='--cuda' ;;
  train) allowed='--config --workdir --gpus --fsdp --mem-fraction --python --env --watch --max-restarts' ;;
  *) die "unknown command '$COMMAND'; expected setup or train." ;;
esac

CUDA=12 CONFIG='' WORKDIR='' GPUS='' FSDP=1 MEM_FRACTION=0.9 PYTHON=$REPO_DIR/.venv/bin/python WATCH=0 MAX_RESTARTS=''
ENVS=() REST=()
while (($#)); do
  arg=$1
  case $arg in
    --) shift; REST=("$@"); break ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    -h | --help) usage; exit 0 ;;
    --watch) key=$arg; shift ;;
    --*=*) key=${arg%%=*}; val=${arg#*=}; shift ;;
    --*) key=$arg; (($# >= 2)) || die "$arg needs a value."; val=$2; shift 2 ;;
    *) die "unexpected argument '$arg' (arguments for the trainer go after --)." ;;
  esac
  case " $allowed " in
    *" $key "*) ;;
    *) die "'$COMMAND' has no option $key (it takes: --dry-run $allowed)." ;;
  esac
  case $key in
    --cuda) CUDA=$val ;;
    --config) CONFIG=$val ;;
    --workdir) WORKDIR=$val ;;
    --gpus) GPUS=$val ;;
    --fsdp) FSDP=$val ;;
    --mem-fraction) MEM_FRACTION=$val ;;
    --python) PYTHON=$val ;;
    --env) [[ $val == [A-Za-z_]*=* ]] || die "--env needs KEY=VALUE, got '$val'."; ENVS+=("$val") ;;
    --watch) WATCH=1 ;;
    --max-restarts) [[ $val =~ ^[0-9]+$ ]] || die "--max-restarts=$val; expected a whole number."; MAX_RESTARTS=$val ;;
  esac
done

cmd_setup() {
  [[ $CUDA == 12 || $CUDA == 13 ]] || die "--cuda=$CUDA; expected 12 or 13."
  ((${#REST[@]} == 0)) || die "'setup' takes no arguments after --."
  run bash "$LAUNCH_DIR/worker.sh" setup --extra "cuda$CUDA"
}

cmd_train() {
  need "$CONFIG" --config 'e.g. configs/imagenet.py:post256,lpl'
  need "$WORKDIR" --workdir 'e.g. runs/post256_lpl'
  [[ $FSDP =~ ^[1-9][0-9]*$ ]] || die "--fsdp=$FSDP; expected a positive integer."
  local -a env=("XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION")
  if [[ -n $GPUS ]]; then
    [[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus=$GPUS; expected a positive integer."
    ((GPUS % FSDP == 0)) || die "--gpus=$GPUS is not a multiple of --fsdp=$FSDP."
    env+=("CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((GPUS - 1)))")
  fi
  [[ -z $MAX_RESTARTS ]] || ((WATCH)) || die '--max-restarts needs --watch.'
  local -a supervise=()
  ((!WATCH)) || supervise=(bash "$LAUNCH_DIR/supervise.sh" --max-restarts "${MAX_RESTARTS:-100}" --)
  run "${supervise[@]}" env "${env[@]}" "${ENVS[@]}" "$PYTHON" -m lpl_jax.main "--config=$CONFIG" \
    "--workdir=$WORKDIR" --config.mesh.data=-1 "--config.mesh.fsdp=$FSDP" "${REST[@]}"
}

"cmd_$COMMAND"
