# shellcheck shell=bash
# Shared by launch/tpu.sh and launch/gpu.sh (sourced, not run): errors, quoting, and running or printing commands.
#
# `run CMD ARG...` is the only way the launch scripts start an outside command. With DRY_RUN=1 it prints the
# command on one line, every argument quoted for a POSIX shell (paste the line into a shell and it runs exactly
# that), and runs nothing; otherwise it echoes the same line to stderr with a '+ ' prefix, then runs it.

DRY_RUN=${DRY_RUN:-0}

die() {
  echo "error: $*" >&2
  exit 2
}

# quote WORD -> WORD as one word for sh/bash: bare when it only holds characters no shell treats specially,
# otherwise in single quotes (a quote inside becomes '\''). Safe to nest: quote the output again for another shell.
quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# join_quoted ARG... -> the arguments as one command line.
join_quoted() {
  local out='' a
  for a in "$@"; do
    out+="${out:+ }$(quote "$a")"
  done
  printf '%s' "$out"
}

run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(join_quoted "$@")"
  else
    printf '+ %s\n' "$(join_quoted "$@")" >&2
    "$@"
  fi
}

# need VALUE FLAG [HINT]: dies naming FLAG when VALUE is empty.
need() {
  [[ -n $1 ]] || die "$2 is required${3:+ ($3)}."
}
