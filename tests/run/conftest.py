"""The trainer subprocesses of this folder's tests share one persistent compilation cache."""

import pytest

from tests.run import common


@pytest.fixture(scope='session')
def env(tmp_path_factory):
  return common.cli_env(tmp_path_factory.mktemp('jax_cache'))
