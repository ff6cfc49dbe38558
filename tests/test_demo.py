"""`make demo` end to end at the smallest settings: every stage runs, the report carries both branches' measured
metrics and its figures, and a second run reuses what the first one finished. The first run is the command `make demo`
runs (`python -m lpl_jax.demo`), the second the library call (`lpl_jax.workflows.miniature.run`)."""

import json
import os
import re
import subprocess
import sys

import pytest

from configs import demo_cpu
from lpl_jax.train.config import Experiment
from lpl_jax.workflows import miniature
from tests.run import common


def _run(workdir):
  experiments = {v: Experiment.from_config_dict(demo_cpu.get_config(v)) for v in miniature.VARIANTS}
  return miniature.run(str(workdir), experiments, miniature.DemoSettings.quick())


@pytest.mark.slow
def test_demo_quick_writes_the_report(tmp_path, capsys, compilation_cache):
  # The session's compilation cache: the second run (in this process) loads what the first compiled, and the
  # experiment notebook, the same pipeline, what both did.
  proc = subprocess.run(
    [sys.executable, '-m', 'lpl_jax.demo', f'--workdir={tmp_path}', '--quick'],
    cwd=common.ROOT,
    env=common.cli_env(compilation_cache),
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  path = str(tmp_path / 'report.md')
  assert f'report: {path}' in proc.stdout
  text = open(path).read()
  for figure in (
    'samples.png',
    'loss_curves.png',
    'spectrum_lpl_vs_baseline.png',
    'spectrum_lpl_vs_real.png',
    'decoder_features_outliers.png',
  ):
    assert f'figures/{figure}' in text and os.path.getsize(tmp_path / 'figures' / figure) > 1000, figure
  measured = json.load(open(tmp_path / 'metrics.json'))['metrics']
  for branch in ('baseline', 'LPL'):
    assert set(measured[branch]) == {'frechet_small_domain', 'precision', 'recall', 'density', 'coverage'}
    row = re.search(r'\| Frechet distance.*\| ([0-9.]+) \| ([0-9.]+) \|', text)
    assert row and float(row.group(1)) == pytest.approx(measured['baseline']['frechet_small_domain'], abs=1e-3)
  assert 'NOT Inception-FID' in text
  # The LPL branch trained with LPL, the baseline without.
  lpl_rows = [json.loads(line).get('lpl/rows', 0) for line in open(tmp_path / 'post_lpl' / 'metrics.jsonl')]
  assert max(lpl_rows) > 0
  assert all('loss/lpl' not in json.loads(line) for line in open(tmp_path / 'post_baseline' / 'metrics.jsonl'))
  # A second run recomputes only samples, metrics and the report: nothing trained is written again.
  trained = [tmp_path / 'latents' / 'index.json'] + [
    p for p in tmp_path.glob('**/*') if p.is_file() and ('checkpoints' in p.parts or 'export' in p.parts)
  ]
  before = {p: p.stat().st_mtime_ns for p in trained}
  assert _run(tmp_path) == path
  assert f'report: {path}' in capsys.readouterr().out
  assert {p: p.stat().st_mtime_ns for p in trained} == before
