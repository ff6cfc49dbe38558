"""launch/tpu.sh against a fake gcloud: the exact commands, what reaches the trainer on each worker, --dry-run."""

import json
import os
import shlex
import shutil
import subprocess
import tarfile
import time

import pytest

from tests.launch.conftest import LAUNCH

NODE = ['--name', 'pod', '--zone', 'us-central2-b', '--project', 'my-proj']
LOC = ['--zone=us-central2-b', '--project=my-proj']
SSH = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod', *LOC]

# Arguments a shell would mangle if any step forgot to quote: spaces, single and double quotes, $, glob characters.
WORKDIR = 'gs://my-bucket/runs/post 256'
OVERRIDES = [
  "--config.data.source=folder:/mnt/disks/data/it's here",
  '--config.total_steps=1000',
  '--config.autoencoder.weights=/mnt/ae "sd" $HOME *',
]


def test_create_tpu_vm(launch):
  launch.run('tpu.sh', 'create', *NODE, '--accelerator-type', 'v4-32')
  assert launch.calls() == [
    [
      'gcloud',
      'compute',
      'tpus',
      'tpu-vm',
      'create',
      'pod',
      *LOC,
      '--accelerator-type=v4-32',
      '--version=tpu-ubuntu2204-base',
    ]
  ]


def test_create_queued_spot(launch):
  launch.run('tpu.sh', 'create', *NODE, '--accelerator-type=v5litepod-16', '--queued', '--spot', '--valid-until', '6h')
  assert launch.calls() == [
    [
      'gcloud',
      'compute',
      'tpus',
      'queued-resources',
      'create',
      'pod',
      *LOC,
      '--node-id=pod',
      '--accelerator-type=v5litepod-16',
      '--runtime-version=v2-alpha-tpuv5-lite',
      '--spot',
      '--valid-until-duration=6h',
    ]
  ]


def test_create_best_effort_is_queued_on_alpha_with_extra_flags(launch):
  launch.run(
    'tpu.sh',
    'create',
    *NODE,
    '--accelerator-type',
    'v5p-16',
    '--best-effort',
    '--runtime-version',
    'my-runtime',
    '--',
    '--network=my net',
    '--internal-ips',
  )
  assert launch.calls() == [
    [
      'gcloud',
      'alpha',
      'compute',
      'tpus',
      'queued-resources',
      'create',
      'pod',
      *LOC,
      '--node-id=pod',
      '--accelerator-type=v5p-16',
      '--runtime-version=my-runtime',
      '--best-effort',
      '--network=my net',
      '--internal-ips',
    ]
  ]


def test_setup_ships_this_checkout_to_all_workers(launch):
  launch.run('tpu.sh', 'setup', *NODE)
  tarball = str(launch.tmp / 'lpl-jax-pod.tar.gz')
  assert launch.calls() == [
    ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball, 'pod:lpl-jax.tar.gz', *LOC, '--worker=all'],
    [
      *SSH,
      '--worker=all',
      '--command',
      'mkdir -p lpl-jax && find lpl-jax -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} + && '
      'tar -xzf lpl-jax.tar.gz -C lpl-jax && rm -f lpl-jax.tar.gz && '
      'cd lpl-jax && bash launch/worker.sh setup --extra tpu',
    ],
  ]
  assert not os.path.exists(tarball)  # removed once sent
  with tarfile.open(launch.tmp / 'shipped.tar.gz') as tar:
    names = set(tar.getnames())
  assert {'setup.py', 'constraints.txt', 'launch/worker.sh', 'launch/common.sh', 'lpl_jax/main.py'} <= names
  assert not any(n.startswith(('.venv/', '.git/')) for n in names)


def test_setup_from_git_url_and_ref(launch):
  launch.run(
    'tpu.sh',
    'setup',
    *NODE,
    '--repo-url',
    'https://example.org/lpl-jax.git',
    '--ref',
    'v0.1',
    '--remote-dir',
    'code/lpl jax',
  )
  assert launch.calls() == [
    [
      *SSH,
      '--worker=all',
      '--command',
      "{ [ -d 'code/lpl jax/.git' ] || git clone --quiet https://example.org/lpl-jax.git 'code/lpl jax'; } && "
      "git -C 'code/lpl jax' fetch --quiet origin v0.1 && git -C 'code/lpl jax' checkout --quiet --detach "
      "FETCH_HEAD && cd 'code/lpl jax' && bash launch/worker.sh setup --extra tpu",
    ]
  ]


def test_train_runs_the_same_command_on_every_worker(launch):
  launch.run(
    'tpu.sh',
    'train',
    *NODE,
    '--config',
    'configs/imagenet.py:post256,lpl',
    '--workdir',
    WORKDIR,
    '--env',
    'MY_FLAG=a b',
    '--',
    *OVERRIDES,
  )
  [call] = launch.calls()
  assert call[:-2] == [*SSH, '--worker=all'] and call[-2] == '--command'
  expected = [
    '-m',
    'lpl_jax.main',
    '--multihost',
    '--config=configs/imagenet.py:post256,lpl',
    f'--workdir={WORKDIR}',
    *OVERRIDES,
  ]
  for w in (0, 1):  # what each worker's login shell does with the --command
    worker = launch.worker(w)
    result = worker.sh(call[-1])
    assert result.returncode == 0, result.stderr
    assert f'worker {w}: started pid' in result.stdout
    [record] = worker.trainer_calls()
    assert record['argv'] == expected
    assert record['env']['MY_FLAG'] == 'a b' and record['env']['PYTHONUNBUFFERED'] == '1'
    assert record['cwd'] == str(worker.repo)
    log = worker.repo / 'logs' / f'train-w{w}.log'
    deadline = time.monotonic() + 5
    while 'fake trainer started' not in log.read_text() and time.monotonic() < deadline:
      time.sleep(0.02)
    assert 'fake trainer started' in log.read_text()
    assert (worker.repo / 'logs' / 'train.pid').read_text().strip().isdigit()


def test_train_refuses_a_second_start_and_stop_sends_sigterm(launch):
  launch.run('tpu.sh', 'train', *NODE, '--config', 'configs/demo_cpu.py', '--workdir', 'gs://b/r')
  launch.run('tpu.sh', 'stop', *NODE)
  train_cmd, stop_cmd = (call[-1] for call in launch.calls())
  assert launch.calls()[1][:-2] == [*SSH, '--worker=all']
  worker = launch.worker(0)
  assert worker.sh(train_cmd, FAKE_PYTHON_SLEEP='60').returncode == 0
  worker.trainer_calls()
  again = worker.sh(train_cmd)
  assert again.returncode != 0 and 'already running' in again.stderr
  pid = int((worker.repo / 'logs' / 'train.pid').read_text())
  stopped = worker.sh(stop_cmd)
  assert stopped.returncode == 0, stopped.stderr
  assert f'sent SIGTERM to pid {pid}' in stopped.stdout and 'stopped' in stopped.stdout
  assert 'not running' in worker.sh(stop_cmd).stdout


def test_logs_of_worker_0_or_a_given_worker(launch):
  launch.run('tpu.sh', 'logs', *NODE)
  launch.run('tpu.sh', 'logs', *NODE, '--worker', '3', '--lines', '20', '--no-follow')
  assert launch.calls() == [
    [*SSH, '--worker=0', '--command', 'cd lpl-jax && bash launch/worker.sh logs --lines 100 --follow'],
    [*SSH, '--worker=3', '--command', 'cd lpl-jax && bash launch/worker.sh logs --lines 20'],
  ]
  worker = launch.worker(3)
  (worker.repo / 'logs').mkdir()
  (worker.repo / 'logs' / 'train-w3.log').write_text(''.join(f'line {i}\n' for i in range(50)))
  out = worker.sh(launch.calls()[1][-1])
  assert out.returncode == 0 and out.stdout.splitlines() == [f'line {i}' for i in range(30, 50)]


def test_status_asks_the_workers_only_when_the_node_is_ready(launch):
  describe = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', 'pod', *LOC, '--format=value(state)']
  ssh_status = [*SSH, '--worker=all', '--command', 'cd lpl-jax && bash launch/worker.sh status']
  out = launch.run('tpu.sh', 'status', *NODE).stdout
  assert 'TPU VM pod: READY' in out and launch.calls() == [describe, ssh_status]
  launch.log.unlink()
  out = launch.run('tpu.sh', 'status', *NODE, FAKE_TPU_STATE='PREEMPTED').stdout
  assert 'TPU VM pod: PREEMPTED' in out and launch.calls() == [describe]
  launch.log.unlink()
  out = launch.run('tpu.sh', 'status', *NODE, '--queued', FAKE_QR_STATE='WAITING_FOR_RESOURCES').stdout
  assert 'queued resource pod: WAITING_FOR_RESOURCES' in out
  assert launch.calls() == [
    ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'pod', *LOC, '--format=value(state.state)']
  ]


def test_delete(launch):
  launch.run('tpu.sh', 'delete', *NODE)
  launch.run('tpu.sh', 'delete', *NODE, '--queued')
  assert launch.calls() == [
    ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'pod', *LOC, '--quiet'],
    ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'pod', *LOC, '--force', '--quiet'],
  ]


def test_data_rsyncs_to_each_workers_disk(launch):
  launch.run('tpu.sh', 'data', *NODE, '--src', 'gs://b/latents/imagenet 256', '--dest', '/mnt/disks/data/in256')
  [call] = launch.calls()
  assert call == [
    *SSH,
    '--worker=all',
    '--command',
    "cd lpl-jax && bash launch/worker.sh data --src 'gs://b/latents/imagenet 256' --dest /mnt/disks/data/in256",
  ]
  launch.log.unlink()
  worker = launch.worker(0)
  dest = worker.home / 'data dir'
  result = worker.sh(call[-1].replace('/mnt/disks/data/in256', shlex.quote(str(dest))))
  assert result.returncode == 0, result.stderr
  assert dest.is_dir()
  assert launch.calls() == [['gcloud', 'storage', 'rsync', '--recursive', 'gs://b/latents/imagenet 256', str(dest)]]


COMMANDS = {
  'create': ['--accelerator-type', 'v4-8', '--spot'],
  'create --queued': ['--accelerator-type', 'v6e-8', '--queued', '--spot'],
  'setup': [],
  'setup --repo-url': ['--repo-url', 'https://example.org/x.git'],
  'data': ['--src', 'gs://b/c', '--dest', '/tmp/c'],
  'train': ['--config', 'configs/imagenet.py:post256,lpl', '--workdir', WORKDIR, '--', *OVERRIDES],
  'logs': ['--worker', '1'],
  'status': [],
  'status --queued': ['--queued'],
  'stop': [],
  'stop --force': ['--force', '--timeout', '5'],
  'delete': [],
  'create --autocheckpoint': ['--accelerator-type', 'v5litepod-8', '--autocheckpoint'],
  'train --watch': ['--config', 'c.py', '--workdir', WORKDIR, '--watch', '--max-restarts', '3', '--', *OVERRIDES],
}


@pytest.mark.parametrize('name', COMMANDS)
def test_dry_run_prints_exactly_the_commands_and_runs_nothing(launch, name):
  command, args = name.split()[0], COMMANDS[name]
  dry = launch.run('tpu.sh', command, *NODE, '--dry-run', *args)
  assert launch.calls() == []
  printed = [shlex.split(line) for line in dry.stdout.splitlines() if line.startswith('gcloud ')]
  launch.run('tpu.sh', command, *NODE, *args)
  assert printed == launch.calls() and printed


@pytest.mark.parametrize(
  'args, flag',
  [
    (['create', '--zone', 'z', '--accelerator-type', 'v4-8'], '--name'),
    (['create', '--name', 'n', '--accelerator-type', 'v4-8'], '--zone'),
    (['create', '--name', 'n', '--zone', 'z'], '--accelerator-type'),
    (['train', '--name', 'n', '--zone', 'z', '--workdir', 'gs://b/r'], '--config'),
    (['train', '--name', 'n', '--zone', 'z', '--config', 'c.py'], '--workdir'),
    (['data', '--name', 'n', '--zone', 'z', '--dest', '/d'], '--src'),
    (['data', '--name', 'n', '--zone', 'z', '--src', 'gs://b'], '--dest'),
    (['train', '--name', 'n', '--zone', 'z', '--config'], '--config'),  # a flag without its value
  ],
)
def test_missing_argument_is_named(launch, args, flag):
  result = launch.run('tpu.sh', *args, check=False)
  assert result.returncode != 0
  assert flag in result.stderr and result.stderr.startswith('error:')
  assert launch.calls() == []


@pytest.mark.parametrize(
  'args, message',
  [
    (['train', *NODE, '--spot'], "'train' has no option --spot"),
    (['reboot', *NODE], "unknown command 'reboot'"),
    (['create', *NODE, '--accelerator-type', 'v4-8', '--spot', '--best-effort'], 'exclude each other'),
    (['create', *NODE, '--accelerator-type', 'v4-8', '--valid-until', '1h'], '--valid-until needs --queued'),
    (['create', *NODE, '--accelerator-type', 'v9-8'], '--runtime-version'),
    (['logs', *NODE, '--', 'x'], 'no arguments after --'),
    (['train', *NODE, 'configs/x.py'], "unexpected argument 'configs/x.py'"),
  ],
)
def test_bad_usage_fails_before_calling_gcloud(launch, args, message):
  result = launch.run('tpu.sh', *args, check=False)
  assert result.returncode != 0 and message in result.stderr
  assert launch.calls() == []


def test_name_zone_and_project_from_the_environment(launch):
  launch.run('tpu.sh', 'delete', LPL_TPU_NAME='pod', LPL_TPU_ZONE='us-central2-b', LPL_TPU_PROJECT='my-proj')
  assert launch.calls() == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'pod', *LOC, '--quiet']]


def test_help_lists_every_command(launch):
  out = launch.run('tpu.sh', '--help').stdout
  for command in ('create', 'setup', 'data', 'train', 'logs', 'status', 'stop', 'delete', 'watch'):
    assert f'launch/tpu.sh {command}' in out
  assert launch.calls() == []


def test_setup_ships_uncommitted_edits_but_not_untracked_files(launch, tmp_path):
  repo = tmp_path / 'checkout'
  shutil.copytree(LAUNCH, repo / 'launch')
  (repo / 'setup.py').write_text('committed\n')
  git = ['git', '-C', str(repo), '-c', 'user.name=t', '-c', 'user.email=t@example.org']
  env = {**launch.env, 'GIT_CONFIG_GLOBAL': os.devnull, 'GIT_CONFIG_NOSYSTEM': '1'}
  for args in (['init', '-q'], ['add', '.'], ['commit', '-qm', 'x']):
    subprocess.run([*git, *args], check=True, env=env)
  (repo / 'setup.py').write_text('edited\n')
  (repo / 'scratch.txt').write_text('untracked\n')
  result = subprocess.run(
    ['bash', str(repo / 'launch' / 'tpu.sh'), 'setup', *NODE], capture_output=True, text=True, env=env
  )
  assert result.returncode == 0, result.stderr
  with tarfile.open(launch.tmp / 'shipped.tar.gz') as tar:
    assert tar.extractfile('setup.py').read() == b'edited\n'
    assert 'scratch.txt' not in tar.getnames()
  assert subprocess.run([*git, 'stash', 'list'], capture_output=True, text=True, env=env).stdout == ''


def test_create_with_autocheckpoint_uses_the_alpha_track(launch):
  launch.run('tpu.sh', 'create', *NODE, '--accelerator-type', 'v4-32', '--spot', '--autocheckpoint')
  launch.run('tpu.sh', 'create', *NODE, '--accelerator-type', 'v5litepod-16', '--queued', '--autocheckpoint')
  assert launch.calls() == [
    ['gcloud', 'alpha', *CREATE[1:], '--autocheckpoint-enabled'],  # CREATE: the spot v4-32 create below
    [
      'gcloud',
      'alpha',
      'compute',
      'tpus',
      'queued-resources',
      'create',
      'pod',
      *LOC,
      '--node-id=pod',
      '--accelerator-type=v5litepod-16',
      '--runtime-version=v2-alpha-tpuv5-lite',
      '--autocheckpoint-enabled',
    ],
  ]


def test_train_watch_and_stop_force_reach_worker_sh(launch):
  launch.run(
    'tpu.sh',
    'train',
    *NODE,
    '--config',
    'c.py',
    '--workdir',
    'gs://b/r',
    '--watch',
    '--max-restarts',
    '5',
    '--no-cleanup',
    '--',
    '--config.total_steps=10',
  )
  launch.run('tpu.sh', 'stop', *NODE, '--timeout', '30', '--force', '--worker', '2')
  assert launch.calls() == [
    [
      *SSH,
      '--worker=all',
      '--command',
      'cd lpl-jax && bash launch/worker.sh train --watch --max-restarts 5 --no-cleanup -- --multihost --config=c.py '
      '--workdir=gs://b/r --config.total_steps=10',
    ],
    [*SSH, '--worker=2', '--command', 'cd lpl-jax && bash launch/worker.sh stop --timeout 30 --force'],
  ]


def test_train_watch_on_the_workers_restarts_a_crash(launch):
  launch.run('tpu.sh', 'train', *NODE, '--config', 'c.py', '--workdir', WORKDIR, '--watch', '--', *OVERRIDES)
  [call] = launch.calls()
  worker = launch.worker(1)
  result = worker.sh(call[-1], FAKE_EXITS='139,0', LPL_RESTART_BACKOFF_S='0')
  assert result.returncode == 0, result.stderr
  worker.wait_for_run_end()
  records = worker.trainer_calls(2)
  expected = ['-m', 'lpl_jax.main', '--multihost', '--config=c.py', f'--workdir={WORKDIR}', *OVERRIDES]
  assert [r['argv'] for r in records] == [expected, expected]
  assert 'exit 139: restarting (1/100)' in worker.log() and 'supervise: finished (exit 0)' in worker.log()
  copies = [c for c in launch.calls() if c[1:3] == ['storage', 'cp']]
  assert copies and copies[-1] == [
    'gcloud',
    'storage',
    'cp',
    str(worker.logs / 'train-w1.log'),
    f'{WORKDIR}/logs/train-w1.log',
  ]


# --- watch ---

WATCH = [*NODE, '--accelerator-type', 'v4-32', '--spot', '--config', 'c.py', '--workdir', 'gs://b/r', '--once']
CAT = ['gcloud', 'storage', 'cat', 'gs://b/r/status.json']
DESCRIBE = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', 'pod', *LOC, '--format=value(state)']
QR_DESCRIBE = ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'pod', *LOC, '--format=value(state.state)']
DELETE = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'pod', *LOC, '--quiet']
QR_DELETE = ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'pod', *LOC, '--force', '--quiet']
CREATE = [
  'gcloud',
  'compute',
  'tpus',
  'tpu-vm',
  'create',
  'pod',
  *LOC,
  '--accelerator-type=v4-32',
  '--version=tpu-ubuntu2204-base',
  '--spot',
]
STATUS_0 = [*SSH, '--worker=0', '--command', 'cd lpl-jax && bash launch/worker.sh status']
TRAIN = 'cd lpl-jax && bash launch/worker.sh train --watch -- --multihost --config=c.py --workdir=gs://b/r'


def ssh_commands(calls):
  return [c[-1] for c in calls if 'ssh' in c]


def status(state, **fields):
  return json.dumps({'state': state, 'step': 10, 'total_steps': 100, 'time': 1.0, 'message': '', **fields})


def test_watch_stops_when_the_run_finished_or_failed(launch):
  done = launch.run('tpu.sh', 'watch', *WATCH, FAKE_STATUS_JSON=status('finished', step=100))
  assert done.returncode == 0 and 'the run finished' in done.stdout
  failed = launch.run(
    'tpu.sh', 'watch', *WATCH, check=False, FAKE_STATUS_JSON=status('failed', message='error: "x" is bad')
  )
  assert failed.returncode == 2 and 'the run failed: error: \\"x\\" is bad' in failed.stdout
  assert launch.calls() == [CAT, CAT]


@pytest.mark.parametrize('state', ['NOT_FOUND', 'PREEMPTED', 'TERMINATED'])
def test_watch_recreates_a_lost_node_installs_and_trains_with_force(launch, state):
  out = launch.run('tpu.sh', 'watch', *WATCH, '--data', 'gs://b/lat=/data/lat', FAKE_TPU_STATE=state).stdout
  assert 'run: no status.json yet' in out and 're-creating it' in out
  lost = [] if state == 'NOT_FOUND' else [DELETE]
  calls = launch.calls()
  assert calls[: 3 + len(lost)] == [CAT, DESCRIBE, *lost, CREATE]
  scp, setup, data, train = calls[3 + len(lost) :]
  assert scp[4] == 'scp' and setup[-1].endswith('cd lpl-jax && bash launch/worker.sh setup --extra tpu')
  assert data[-1] == 'cd lpl-jax && bash launch/worker.sh data --src gs://b/lat --dest /data/lat'
  assert train == [*SSH, '--worker=all', '--command', f'{TRAIN} --force']


def test_watch_leaves_a_running_trainer_alone(launch):
  out = launch.run(
    'tpu.sh',
    'watch',
    *WATCH,
    FAKE_STATUS_JSON=status('running', step=1200, total_steps=100000),
    FAKE_SSH_OUTPUT='worker 0: running (pid 7, trainer pid 8); last log line: step 1200',
  ).stdout
  assert 'run: running at step 1200/100000' in out
  assert launch.calls() == [CAT, DESCRIBE, STATUS_0]


def test_watch_starts_a_trainer_on_a_ready_node_without_one(launch):
  launch.run('tpu.sh', 'watch', *WATCH, FAKE_SSH_OUTPUT='worker 0: not running; last log line: exit 1')
  assert launch.calls() == [CAT, DESCRIBE, STATUS_0, [*SSH, '--worker=all', '--command', TRAIN]]


def test_watch_installs_a_ready_node_that_is_not_set_up(launch):
  launch.run('tpu.sh', 'watch', *WATCH, FAKE_SSH_OUTPUT='bash: line 1: cd: lpl-jax: No such file', FAKE_SSH_RC='1')
  calls = launch.calls()
  assert calls[:3] == [CAT, DESCRIBE, STATUS_0] and calls[3][4] == 'scp'
  assert ssh_commands(calls[4:])[-1] == f'{TRAIN} --force' and len(calls) == 6


@pytest.mark.parametrize('env', [{'FAKE_TPU_STATE': 'ERROR'}, {'FAKE_SSH_RC': '255'}])
def test_watch_does_nothing_drastic_when_gcloud_fails(launch, env):
  result = launch.run('tpu.sh', 'watch', *WATCH, check=False, **env)
  assert result.returncode != 0 and 'this round failed' in result.stdout
  assert not [c for c in launch.calls() if {'create', 'delete', 'scp'} & set(c) or TRAIN in c[-1]]


def test_watch_waits_for_a_node_in_transition(launch):
  out = launch.run('tpu.sh', 'watch', *WATCH, FAKE_TPU_STATE='CREATING').stdout
  assert 'TPU VM pod: CREATING: waiting' in out and launch.calls() == [CAT, DESCRIBE]


@pytest.mark.parametrize(
  'qr, node, expected',
  [
    ('WAITING_FOR_RESOURCES', 'READY', [CAT, QR_DESCRIBE]),
    ('NOT_FOUND', 'READY', [CAT, QR_DESCRIBE, 'create']),
    ('SUSPENDED', 'READY', [CAT, QR_DESCRIBE, QR_DELETE, 'create']),
    ('ACTIVE', 'PREEMPTED', [CAT, QR_DESCRIBE, DESCRIBE, QR_DELETE, 'create']),
    ('ACTIVE', 'READY', [CAT, QR_DESCRIBE, DESCRIBE, STATUS_0]),
  ],
)
def test_watch_with_a_queued_resource(launch, qr, node, expected):
  running = 'worker 0: running (pid 7, trainer pid 8)'
  launch.run('tpu.sh', 'watch', *WATCH, '--queued', FAKE_QR_STATE=qr, FAKE_TPU_STATE=node, FAKE_SSH_OUTPUT=running)
  calls = launch.calls()
  assert [('create' if 'create' in c else c) for c in calls] == expected
  for call in calls:
    if 'create' in call:  # then a later round installs and trains, once the queued resource is ACTIVE
      assert call[:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create'] and '--spot' in call


def test_watch_dry_run_prints_one_round_and_runs_nothing(launch):
  out = launch.run('tpu.sh', 'watch', *WATCH, '--dry-run', '--', '--config.total_steps=10').stdout
  assert launch.calls() == []
  gcloud = [shlex.split(line) for line in out.splitlines() if line.startswith('gcloud ')]
  assert gcloud[:4] == [CAT, DESCRIBE, DELETE, CREATE]
  commands = [c[-1] for c in gcloud if 'ssh' in c]
  assert f'{TRAIN} --force --config.total_steps=10' in commands and f'{TRAIN} --config.total_steps=10' in commands
  assert STATUS_0 in gcloud
  assert all(line.startswith(('gcloud ', 'git ', '#')) for line in out.splitlines())


@pytest.mark.parametrize(
  'args, message',
  [
    (['train', *NODE, '--config', 'c', '--workdir', 'gs://b', '--max-restarts', '3'], '--max-restarts needs --watch'),
    (['stop', *NODE, '--watch'], "'stop' has no option --watch"),
    (['stop', *NODE, '--timeout', '1m'], 'expected whole seconds'),
    (['create', *NODE, '--accelerator-type', 'v4-8', '--force'], "'create' has no option --force"),
    (['watch', *NODE, '--accelerator-type', 'v4-8', '--config', 'c', '--workdir', '/tmp/r'], 'expected gs://'),
    (['watch', *NODE, '--config', 'c', '--workdir', 'gs://b/r'], '--accelerator-type'),
    (['watch', *NODE, '--accelerator-type', 'v4-8', '--workdir', 'gs://b/r'], '--config'),
    (
      ['watch', *NODE, '--accelerator-type', 'v4-8', '--config', 'c', '--workdir', 'gs://b', '--data', 'x'],
      'SRC=/DEST',
    ),
    (
      ['watch', *NODE, '--accelerator-type', 'v4-8', '--config', 'c', '--workdir', 'gs://b', '--interval', '0'],
      'seconds',
    ),
  ],
)
def test_new_options_bad_usage(launch, args, message):
  result = launch.run('tpu.sh', *args, check=False)
  assert result.returncode != 0 and message in result.stderr
  assert launch.calls() == []
