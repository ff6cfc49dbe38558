"""absl plumbing shared by the entry points."""

from __future__ import annotations

import functools
import logging
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from absl import flags

from lpl_jax.data.errors import DataError
from lpl_jax.train.errors import ConfigError, DivergedError, WorkdirError
from lpl_jax.weights import WeightsMismatchError

# Errors that describe the user's input or run (a config, data, weights, the workdir, a diverged loss): one line,
# exit status 2 (`--verbose` adds the traceback). Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
  ConfigError,
  DataError,
  WorkdirError,
  DivergedError,
  WeightsMismatchError,
  FileNotFoundError,
  PermissionError,
)


def fail(message: Any) -> NoReturn:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def one_line(message: str) -> str:
  """A flag error in one line: ml_collections puts the traceback of a failing `get_config` into the message, and its
  last line is the exception itself."""
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  return lines[0] if len(lines) <= 1 else f'{lines[0]} {lines[-1]}'


def _overrides(argv: list[str]) -> list[str]:
  return [a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]


def parse_flags_or_exit(argv: list[str], *, default_config: str | None = None) -> list[str]:
  """absl's parsing; a bad flag value, config file or `--config.a.b=v` override ends with one `error:` line and
  exit status 2 (ml_collections raises a bare KeyError/AttributeError for a field the config does not have).

  Args:
    default_config: `--config` when the command line gives none. (A config flag's own default would be loaded,
      with its overrides, when the flag is defined at import, out of reach of this error handling.)
  """
  if default_config and not any(re.match(r'^--?config(=|$)', a) for a in argv[1:]):
    argv = argv[:1] + [f'--config={default_config}'] + argv[1:]
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(one_line(str(e)))
  except (KeyError, AttributeError) as e:
    # The quoted field name, then possibly `Did you mean "x" instead of "y"?`, quoted again per wrapping exception.
    key = re.search(r"'(\w+)", str(e))
    key = key.group(1) if key else str(e)
    guess = re.search(r'Did you mean "(\w+)"', str(e))
    bad = [n for n in _overrides(argv) if key in n.split('.')] or _overrides(argv)
    hint = f' (did you mean {guess.group(1)!r}?)' if guess else ''
    fail(
      f'{", ".join(bad)}: the config has no field {key!r}{hint}; overrides must name an existing field of the '
      'config file (see docs/configs.md).'
    )
  except TypeError as e:  # a path through a field that is not a section, e.g. --config.total_steps.x
    fail(f'{", ".join(_overrides(argv))}: {e}; only sections have fields.')


def flags_parser(default_config: str | None = None) -> Callable[[list[str]], list[str]]:
  """`parse_flags_or_exit` for `app.run(main, flags_parser=...)`."""
  return functools.partial(parse_flags_or_exit, default_config=default_config)


def setup_logging(level: int = logging.INFO) -> None:
  logging.basicConfig(level=level, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax logs every save step at INFO through absl


def define_verbose_flag() -> flags.FlagHolder:
  """`--verbose`, for a program to pass to `run_or_exit` (called by the programs: a library module defines no flag)."""
  return flags.DEFINE_bool('verbose', False, 'On an error in the input, print its traceback too (default: one line).')


def run_or_exit(
  fn: Callable[[], Any], errors: tuple[type[BaseException], ...] = USER_ERRORS, *, verbose: bool = False
) -> Any:
  """`fn()`, or one `error:` line and exit status 2 if it raises one of `errors` (after its traceback if
  `verbose`)."""
  try:
    return fn()
  except errors as e:
    if verbose:
      traceback.print_exc()
    fail(one_line(str(e)) if isinstance(e, OSError) else e)
