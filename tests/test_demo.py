"""`make demo` end to end at the smallest settings: every stage runs, the report leads with the paired comparison of
the two branches over two seeds and carries its figures, and a second run reuses what the first one finished. The
first run is the command `make demo` runs (`python -m lpl_jax.demo`), the second the library call
(`lpl_jax.workflows.miniature.run`). The experiment notebook then runs on the same workdir: its cells reuse every stage
the command finished and show the results."""

import json
import os
import re
import subprocess
import sys

import pytest

from configs import demo_cpu
from lpl_jax.train.config import Experiment
from lpl_jax.workflows import miniature
from tests import test_notebooks as notebooks
from tests.run import common


def _run(workdir):
  experiments = {v: Experiment.from_config_dict(demo_cpu.get_config(v)) for v in miniature.VARIANTS}
  return miniature.run(str(workdir), experiments, miniature.DemoSettings.quick())


@pytest.fixture(scope='module')
def demo(tmp_path_factory, compilation_cache_dir):
  """The workdir of one `python -m lpl_jax.demo --quick` run, and what the command printed.

  It compiles through the session's compilation cache: the second run of the first test (in this process) loads what
  it compiled, and so does the notebook's kernel."""
  workdir = tmp_path_factory.mktemp('demo')
  proc = subprocess.run(
    [sys.executable, '-m', 'lpl_jax.demo', f'--workdir={workdir}', '--quick'],
    cwd=common.ROOT,
    env=common.cli_env(compilation_cache_dir),
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


@pytest.mark.slow
def test_demo_quick_writes_the_report(demo, capsys, compilation_cache):
  tmp_path, proc = demo
  path = str(tmp_path / 'report.md')
  assert f'report: {path}' in proc.stdout
  text = open(path).read()
  for figure in (
    'fidelity_difference.png',
    'fidelity.png',
    'metrics_per_seed.png',
    'samples.png',
    'loss_curves.png',
    'decoder_features_outliers.png',
  ):
    assert f'figures/{figure}' in text and os.path.getsize(tmp_path / 'figures' / figure) > 1000, figure
  # The report leads with the paired differences, the fidelity curve first, then the sample-set metrics.
  assert text.index('## Paired differences') < text.index('x0-hat fidelity') < text.index('Sample-set metrics')
  assert text.index('## Paired differences') < text.index('## Setup') < text.index('## Time')
  assert 'NOT Inception-FID' in text
  summary = json.load(open(tmp_path / 'results.json'))['summary']
  assert summary['seeds'] == [0, 1] and list(summary['variants']) == ['baseline', 'lpl']
  fd = summary['variants']['lpl']['metrics']['fd_small_domain']
  assert len(fd['values']) == 2 and 'p_value' in fd['difference']
  row = re.search(r'\| Frechet distance[^|]*\| ([0-9.]+) \[', text)
  assert row and float(row.group(1)) == pytest.approx(
    summary['variants']['baseline']['metrics']['fd_small_domain']['interval']['mean'], abs=1e-3
  )
  # Each LPL run trained with LPL, each baseline without.
  for seed in (0, 1):
    lpl = [json.loads(line) for line in open(tmp_path / 'runs' / 'lpl' / f'seed_{seed}' / 'metrics.jsonl')]
    assert max(r.get('lpl/rows', 0) for r in lpl) > 0
    base = tmp_path / 'runs' / 'baseline' / f'seed_{seed}' / 'metrics.jsonl'
    assert all('loss/lpl' not in json.loads(line) for line in open(base))
  # A second run trains and evaluates nothing again: it only writes the report.
  kept = [tmp_path / 'latents' / 'index.json'] + [
    p
    for p in tmp_path.glob('**/*')
    if p.is_file() and ('checkpoints' in p.parts or 'export' in p.parts or p.name in ('result.json', 'samples.npz'))
  ]
  before = {p: p.stat().st_mtime_ns for p in kept}
  assert _run(tmp_path) == path
  out = capsys.readouterr().out
  assert f'report: {path}' in out and out.count('done earlier') == 4
  assert {p: p.stat().st_mtime_ns for p in kept} == before


@pytest.mark.slow
def test_experiment_notebook_shows_the_demo_results(demo, tmp_path, monkeypatch, compilation_cache_dir):
  workdir, _ = demo
  nb = notebooks.execute(
    'lpl_experiment.ipynb', tmp_path, monkeypatch, compilation_cache_dir, LPL_NOTEBOOK_WORKDIR=str(workdir)
  )
  text = notebooks.printed(nb)
  # Its settings are the demo's: every stage is reused, none is trained or evaluated again.
  assert text.count('done earlier') == 4, text[-3000:]
  assert "baseline {'fd_small_domain'" in text and "lpl {'fd_small_domain'" in text
  outputs = [o.get('data', {}) for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  assert sum('image/png' in o for o in outputs) == 6
  assert any('## Paired differences' in o.get('text/markdown', '') for o in outputs)
