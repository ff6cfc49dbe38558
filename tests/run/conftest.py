"""The trainer subprocesses of this folder's tests share the session's persistent compilation cache."""

import pytest

from tests.run import common


@pytest.fixture(scope='session')
def env(compilation_cache_dir):
  return common.cli_env(compilation_cache_dir)
