"""The package's shape (docs/architecture.md): only thin absl programs at the top level, imports that go down the
layers, names that do not shadow their modules, and a project that refers to nothing outside itself."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'lpl_jax')
PROGRAMS = {'main', 'sample', 'evaluate', 'encode', 'train_autoencoder', 'demo', 'compare'}
# Rank of each subpackage: it may import only from lower ranks (and from itself).
LAYERS = {
  'weights': 0,
  'models': 1,
  'autoencoder': 1,
  'diffusion': 1,
  'lpl': 2,
  'data': 3,
  'eval': 3,
  'train': 4,
  'workflows': 5,
  'cli': 5,
}


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(root, f)
        yield os.path.relpath(path, PACKAGE)[:-3].split(os.sep), path


def _imports(path):
  """Top-level names imported from `lpl_jax` (`lpl_jax.X...` and `from lpl_jax import X`), and `configs` imports."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f'{node.module}.{a.name}' for a in node.names if node.module == 'lpl_jax']
    for name in names:
      parts = name.split('.')
      if parts[0] == 'lpl_jax' and len(parts) > 1:
        out.add(parts[1])
      elif parts[0] == 'configs':
        out.add('configs')
  return out


def test_the_top_level_holds_only_the_programs():
  top = {parts[0] for parts, _ in _modules() if len(parts) == 1} - {'__init__'}
  assert top == PROGRAMS
  packages = {e for e in os.listdir(PACKAGE) if os.path.isfile(os.path.join(PACKAGE, e, '__init__.py'))}
  assert packages == set(LAYERS)


@pytest.mark.parametrize('program', sorted(PROGRAMS))
def test_programs_are_thin_absl_programs(program):
  text = open(os.path.join(PACKAGE, f'{program}.py')).read()
  assert 'from absl import app' in text and 'app.run(main' in text, program
  assert 'argparse' not in text, program
  assert len(text.splitlines()) < 120, f'{program}.py: move library code into a subpackage'


def test_imports_go_down_the_layers():
  wrong = []
  for parts, path in _modules():
    if len(parts) == 1:
      continue  # the programs may import anything
    own = parts[0]
    for target in _imports(path) - {own}:
      if target == 'configs' or target not in LAYERS or LAYERS[target] >= LAYERS[own]:
        wrong.append(f'{"/".join(parts)}.py imports {target}')
  assert not wrong, wrong


def test_no_name_shadows_its_module():
  from lpl_jax.models import dit, mmdit

  assert type(dit).__name__ == 'module' and type(mmdit).__name__ == 'module'


def test_the_project_refers_to_nothing_outside_it():
  """Code, docs, tests and notebooks stand on their own: no design notes or shared folders outside the repository."""
  outside = re.compile('|'.join(['DESIGN' + r'\.md', r'\.\./' + 'shared', 'STYLE' + r'\.md']))
  found = []
  for folder in ('lpl_jax', 'tests', 'docs', 'configs', 'benchmarks', 'launch', 'notebooks'):
    for root, _, files in os.walk(os.path.join(ROOT, folder)):
      for f in files:
        if f.endswith(('.py', '.md', '.sh', '.ipynb')):
          path = os.path.join(root, f)
          found += [
            f'{os.path.relpath(path, ROOT)}:{i}' for i, line in enumerate(open(path), 1) if outside.search(line)
          ]
  found += [f'README.md:{i}' for i, line in enumerate(open(os.path.join(ROOT, 'README.md')), 1) if outside.search(line)]
  assert not found, found
