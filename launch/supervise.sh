#!/usr/bin/env bash
# Runs a training command and runs it again when it crashes. `worker.sh train` starts it in the background (its
# output appended to the worker's log; `--watch` allows restarts, without it the command runs once); `gpu.sh train
# --watch` runs it in the foreground. It needs only bash (and gcloud for a gs:// --log-dest): try it with any command.
#
#   launch/supervise.sh [--max-restarts N] [--pid-file FILE] [--log FILE [--log-dest DEST]] -- COMMAND ARG...
#
# What each exit status of COMMAND means (the contract of `python -m lpl_jax.main`), and what happens next:
#   0     the run reached total_steps: log "finished", exit 0.
#   2     an error in the input the user must fix (config, data, weights, a workdir held by another trainer, a
#         diverged run): running it again fails the same way. Log "input error, not restarting", exit 2.
#   75    stopped after SIGTERM with a checkpoint saved. When this supervisor was told to stop (SIGTERM or SIGINT to
#         it, as `worker.sh stop` sends), log "stopped" and exit 75. Otherwise the SIGTERM came from elsewhere (a
#         Cloud TPU maintenance event with autocheckpoint): restart, as below.
#   other a crash (1, 137 = SIGKILL, 139 = SIGSEGV, ...): the command resumes from its last checkpoint when run again,
#         so log "exit N: restarting (k/M)" and run it again after LPL_RESTART_BACKOFF_S seconds (default 10), at
#         most M = --max-restarts times (default 100; 0: never), then exit with that status.
# SIGTERM or SIGINT to the supervisor: no more restarts; COMMAND gets SIGTERM (it saves a checkpoint and exits) and
# the supervisor exits when it has, with its status. (To end both at once, SIGKILL the process group.)
#
# --pid-file FILE   COMMAND's pid, rewritten at each start (for status, and for tests that kill it).
# --log FILE       the file the output goes to (the caller redirects it there): the supervisor's lines start on a
#                   line of their own even after a progress bar's \r.
# --log-dest DEST   copy the --log FILE to DEST after each exit of COMMAND and every LPL_LOG_SYNC_S seconds (default
#                   300) while it runs: `gcloud storage cp` for gs://..., else cp (the folder is made). Best-effort: a
#                   failed copy is one line in the output, never fatal.
# The supervisor's own lines start with '=== <UTC time> supervise:'. Its exit status is COMMAND's last.
set -euo pipefail

LOG=''
say() {
  # A progress bar ends its lines with \r, not \n: start on a line of its own.
  if [[ -n $LOG && -s $LOG && -n $(tail -c 1 "$LOG") ]]; then
    echo
  fi
  printf '=== %s supervise: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"
}

# The handler goes in before anything else: a stop that arrives while the rest starts up must not be lost.
STOPPING=0 TRAPPED=0 CHILD='' SLEEPER='' SYNCER=''
on_stop() {
  TRAPPED=1
  if ((!STOPPING)); then
    STOPPING=1
    say 'stop requested: no more restarts'
  fi
  # The trainer only (not its process group): its own data-loading workers must keep running while it saves.
  [[ -z $CHILD ]] || kill -TERM "$CHILD" 2>/dev/null || true
  [[ -z $SLEEPER ]] || kill "$SLEEPER" 2>/dev/null || true
}
trap on_stop TERM INT

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$LAUNCH_DIR/common.sh"

MAX_RESTARTS=100 PID_FILE='' LOG_DEST=''
BACKOFF=${LPL_RESTART_BACKOFF_S:-10}
SYNC_EVERY=${LPL_LOG_SYNC_S:-300}
while (($#)); do
  case $1 in
    --max-restarts) MAX_RESTARTS=${2:?--max-restarts needs a value}; shift 2 ;;
    --pid-file) PID_FILE=${2:?--pid-file needs a value}; shift 2 ;;
    --log) LOG=${2:?--log needs a value}; shift 2 ;;
    --log-dest) LOG_DEST=${2:?--log-dest needs a value}; shift 2 ;;
    --) shift; break ;;
    *) die "supervise: unexpected argument '$1' (the command goes after --)." ;;
  esac
done
(($#)) || die 'supervise: no command after --.'
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "supervise: --max-restarts=$MAX_RESTARTS; expected a whole number."
[[ -z $LOG_DEST || -n $LOG ]] || die 'supervise: --log-dest needs --log.'

# sync_log: one best-effort copy of the log to its destination.
sync_log() {
  [[ -n $LOG_DEST && -f $LOG ]] || return 0
  local out
  if [[ $LOG_DEST == gs://* ]]; then
    out=$(gcloud storage cp "$LOG" "$LOG_DEST" 2>&1) && return 0
  else
    out=$({ mkdir -p "$(dirname "$LOG_DEST")" && cp "$LOG" "$LOG_DEST"; } 2>&1) && return 0
  fi
  say "copying the log to $LOG_DEST failed: $(printf '%s' "$out" | tail -n 1)"
}

# A background copy every SYNC_EVERY seconds while the supervisor lives. Its sleep runs in the background so that
# the TERM sent at the end interrupts the wait at once instead of leaving a sleep behind.
start_syncer() {
  [[ -n $LOG_DEST ]] || return 0
  (
    trap '[[ -z ${nap:-} ]] || kill "$nap" 2>/dev/null; exit 0' TERM
    while :; do
      sleep "$SYNC_EVERY" &
      nap=$!
      wait "$nap" || true
      sync_log
    done
  ) &
  SYNCER=$!
}

finish() {  # finish STATUS MESSAGE...: the last copy of the log, then exit with STATUS
  local status=$1
  shift
  say "$*"
  [[ -z $SYNCER ]] || kill "$SYNCER" 2>/dev/null || true
  sync_log
  exit "$status"
}

# wait_child: STATUS = the exit status of CHILD. A trapped signal makes `wait` return early (status > 128) while the
# child still runs; the handler then asked it to stop, so wait again.
wait_child() {
  while :; do
    TRAPPED=0
    STATUS=0
    wait "$CHILD" || STATUS=$?
    ((TRAPPED && STATUS > 128)) || return 0
  done
}

start_syncer
restarts=0
while :; do
  ((!STOPPING)) || finish 75 'stopped while waiting to restart'
  "$@" &
  CHILD=$!
  # A stop that came between the check above and CHILD= above found no child to pass SIGTERM to.
  ((!STOPPING)) || kill -TERM "$CHILD" 2>/dev/null || true
  [[ -z $PID_FILE ]] || echo "$CHILD" >"$PID_FILE"
  say "started pid $CHILD: $(join_quoted "$@")"
  wait_child
  CHILD=''
  # Each way on copies the log once, after saying what happens next.
  case $STATUS in
    0) finish 0 'finished (exit 0)' ;;
    2) finish 2 'input error, not restarting (exit 2)' ;;
  esac
  if ((STOPPING)); then
    ((STATUS == 75)) && finish 75 'stopped (exit 75: checkpoint saved)'
    finish "$STATUS" "exit $STATUS after the stop request: not restarting"
  fi
  if ((MAX_RESTARTS == 0)); then
    finish "$STATUS" "exit $STATUS: not restarting (restarts are off; 'train --watch' restarts)"
  fi
  if ((restarts >= MAX_RESTARTS)); then
    finish "$STATUS" "exit $STATUS: giving up after $restarts restarts (--max-restarts $MAX_RESTARTS)"
  fi
  restarts=$((restarts + 1))
  why=''
  ((STATUS != 75)) || why=' (SIGTERM from outside this supervisor, e.g. a maintenance event)'
  say "exit $STATUS$why: restarting ($restarts/$MAX_RESTARTS) in ${BACKOFF}s"
  sync_log
  sleep "$BACKOFF" &
  SLEEPER=$!
  # A stop that came after the check at the top of the loop and before SLEEPER= above (while the log was copied, say)
  # found no sleep to cut short: its handler ran once that command ended.
  ((!STOPPING)) || kill "$SLEEPER" 2>/dev/null || true
  wait "$SLEEPER" || true
  SLEEPER=''
done
