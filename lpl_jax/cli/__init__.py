"""What the entry points (`python -m lpl_jax.main`, `.sample`, `.evaluate`, `.encode`, `.train_autoencoder`,
`.demo`) share: flag parsing whose errors name the bad override, logging, and one `error:` line with exit status 2
for the errors a user can fix."""

from lpl_jax.cli.app import (
  USER_ERRORS,
  define_verbose_flag,
  fail,
  flags_parser,
  one_line,
  parse_flags_or_exit,
  run_or_exit,
  setup_logging,
)

__all__ = [
  'USER_ERRORS',
  'define_verbose_flag',
  'fail',
  'flags_parser',
  'one_line',
  'parse_flags_or_exit',
  'run_or_exit',
  'setup_logging',
]
