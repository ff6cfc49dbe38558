"""launch/gpu.sh: the trainer's command line and environment on a GPU host, and --dry-run."""

import json
import shlex
import shutil
import subprocess

import pytest

from tests.launch.conftest import FAKE_PYTHON, LAUNCH, _executable

ARGS = [
  '--config',
  'configs/imagenet.py:post256,lpl',
  '--workdir',
  'runs/post 256',
  '--gpus',
  '8',
  '--fsdp',
  '4',
  '--env',
  'MY_FLAG=x y',
  '--',
  "--config.data.source=folder:/data/it's here",
]
EXPECTED = [
  '-m',
  'lpl_jax.main',
  '--config=configs/imagenet.py:post256,lpl',
  '--workdir=runs/post 256',
  '--config.mesh.data=-1',
  '--config.mesh.fsdp=4',
  "--config.data.source=folder:/data/it's here",
]


@pytest.fixture
def python(launch):
  return _executable(launch.tmp / 'python', FAKE_PYTHON)


def test_train_command_line_and_environment(launch, python):
  launch.run('gpu.sh', 'train', '--python', str(python), *ARGS, HOME=str(launch.tmp))
  [record] = [json.loads(line) for line in (launch.tmp / 'python_calls.jsonl').read_text().splitlines()]
  assert record['argv'] == EXPECTED
  assert record['env']['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.9'
  assert record['env']['CUDA_VISIBLE_DEVICES'] == '0,1,2,3,4,5,6,7'
  assert record['env']['MY_FLAG'] == 'x y'


def test_dry_run_prints_the_command_and_runs_nothing(launch, python):
  out = launch.run('gpu.sh', 'train', '--python', str(python), '--mem-fraction', '.8', '--dry-run', *ARGS).stdout
  [line] = out.splitlines()
  assert shlex.split(line) == [
    'env',
    'XLA_PYTHON_CLIENT_MEM_FRACTION=.8',
    'CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7',
    'MY_FLAG=x y',
    str(python),
    *EXPECTED,
  ]
  assert not (launch.tmp / 'python_calls.jsonl').exists()
  [setup] = launch.run('gpu.sh', 'setup', '--cuda', '13', '--dry-run').stdout.splitlines()
  assert shlex.split(setup) == ['bash', str(LAUNCH / 'worker.sh'), 'setup', '--extra', 'cuda13']


def test_all_visible_gpus_without_gpus(launch, python):
  [line] = launch.run(
    'gpu.sh', 'train', '--config', 'c.py', '--workdir', 'w', '--python', str(python), '--dry-run'
  ).stdout.splitlines()
  assert shlex.split(line) == [
    'env',
    'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9',
    str(python),
    '-m',
    'lpl_jax.main',
    '--config=c.py',
    '--workdir=w',
    '--config.mesh.data=-1',
    '--config.mesh.fsdp=1',
  ]


def test_watch_runs_the_trainer_under_the_supervisor(launch, python):
  [line] = launch.run(
    'gpu.sh', 'train', '--python', str(python), *ARGS[:-2], '--watch', '--max-restarts', '3', '--dry-run'
  ).stdout.splitlines()
  env = ['env', 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9', 'CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7', 'MY_FLAG=x y']
  assert shlex.split(line) == [
    'bash',
    str(LAUNCH / 'supervise.sh'),
    '--max-restarts',
    '3',
    '--',
    *env,
    str(python),
    *EXPECTED[:-1],
  ]
  # For real: a crash, then the run finishes; all in the foreground.
  result = launch.run(
    'gpu.sh',
    'train',
    '--python',
    str(python),
    '--watch',
    *ARGS,
    HOME=str(launch.tmp),
    FAKE_EXITS='1,0',
    LPL_RESTART_BACKOFF_S='0',
  )
  records = [json.loads(line) for line in (launch.tmp / 'python_calls.jsonl').read_text().splitlines()]
  assert [r['argv'] for r in records] == [EXPECTED, EXPECTED]
  assert 'exit 1: restarting (1/100)' in result.stdout and 'supervise: finished (exit 0)' in result.stdout


@pytest.mark.parametrize(
  'args, message',
  [
    (['train', '--config', 'c.py', '--workdir', 'w', '--max-restarts', '2'], '--max-restarts needs --watch'),
    (['train', '--workdir', 'w'], '--config is required'),
    (['train', '--config', 'c.py'], '--workdir is required'),
    (['train', '--config', 'c.py', '--workdir', 'w', '--gpus', '6', '--fsdp', '4'], 'not a multiple of --fsdp=4'),
    (['train', '--config', 'c.py', '--workdir', 'w', '--zone', 'z'], "'train' has no option --zone"),
    (['setup', '--cuda', '11'], 'expected 12 or 13'),
  ],
)
def test_bad_usage(launch, args, message):
  result = launch.run('gpu.sh', *args, check=False)
  assert result.returncode != 0 and message in result.stderr


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck is not installed')
def test_scripts_are_shellcheck_clean():
  scripts = sorted(str(p) for p in LAUNCH.glob('*.sh'))
  result = subprocess.run(['shellcheck', '-x', *scripts], capture_output=True, text=True, cwd=LAUNCH.parent)
  assert result.returncode == 0, result.stdout
