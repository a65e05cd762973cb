"""The package's imports go one way: no module imports itself back."""

import ast
import os

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'dino_jax')

# Library layers: none of them may import an entry point or an evaluation.
LIBRARY = (
  'dino_jax.config',
  'dino_jax.models',
  'dino_jax.loss',
  'dino_jax.schedules',
  'dino_jax.optim',
  'dino_jax.parallel',
  'dino_jax.checkpoint',
  'dino_jax.workdir',
  'dino_jax.step',
  'dino_jax.data',
)
UPPER = (
  'dino_jax.train',
  'dino_jax.main',
  'dino_jax.eval',
  'dino_jax.evaluation',
  'dino_jax.interop',
)

# The three parts (docs/layout.md): the shell (the commands: flags, config
# files, one-line errors, the workdir lock, signal handlers) and the tools
# import the library; the library imports neither.
# dino_jax.eval: the evaluation commands; dino_jax.evaluation: the library.
SHELL = ('dino_jax.cli', 'dino_jax.main', 'dino_jax.eval', 'dino_jax.hostmem')
TOOLS = ('dino_jax.aot', 'dino_jax.interop', 'dino_jax.plot')


def module_names() -> dict[str, str]:
  """{'dino_jax.evaluation.knn': path} for every module of the package."""
  out = {}
  for dirpath, _, filenames in os.walk(PACKAGE):
    for name in filenames:
      if name.endswith('.py'):
        path = os.path.join(dirpath, name)
        parts = os.path.relpath(path, ROOT)[: -len('.py')].split(os.sep)
        if parts[-1] == '__init__':
          parts = parts[:-1]
        out['.'.join(parts)] = path
  return out


def imports_of(name: str, path: str, modules) -> set[str]:
  """dino_jax modules ``name`` imports anywhere (functions and
  ``if __name__ == '__main__':`` blocks included)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  package = name if path.endswith('__init__.py') else name.rsplit('.', 1)[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: from . import x / from .a import b
        anchor = package.rsplit('.', node.level - 1)[0]
        base = f'{anchor}.{base}' if base else anchor
      for alias in node.names:
        sub = f'{base}.{alias.name}'
        found.add(sub if sub in modules else base)
  return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
  modules = module_names()
  return {n: imports_of(n, p, modules) for n, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as [a, b, ..., a], or None (iterative DFS, three colours)."""
  state = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
  for start in sorted(graph):
    if state[start]:
      continue
    stack = [(start, iter(sorted(graph[start])))]
    state[start] = 1
    while stack:
      node, edges = stack[-1]
      nxt = next(edges, None)
      if nxt is None:
        state[node] = 2
        stack.pop()
      elif state[nxt] == 1:
        path = [n for n, _ in stack]
        return path[path.index(nxt) :] + [nxt]
      elif state[nxt] == 0:
        state[nxt] = 1
        stack.append((nxt, iter(sorted(graph[nxt]))))
  return None


def _within(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + '.') for p in prefixes)


class ImportGraphTest(absltest.TestCase):
  def test_graph_is_read(self):
    graph = import_graph()
    # Function-level imports count: train imports evaluation.run inside a
    # function.
    self.assertIn('dino_jax.evaluation.run', graph['dino_jax.train'])
    self.assertIn('dino_jax.workdir', graph['dino_jax.evaluation.knn'])
    # A command's import under ``if __name__ == '__main__':`` counts too.
    self.assertIn('dino_jax.cli.evals', graph['dino_jax.eval.knn'])
    self.assertIn('dino_jax.models.vit', graph['dino_jax.models.head'])

  def test_no_cycle(self):
    self.assertIsNone(find_cycle(import_graph()))

  def test_cycle_finder(self):
    graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
    self.assertEqual(find_cycle(graph), ['a', 'b', 'c', 'a'])
    self.assertIsNone(find_cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}))

  def test_library_does_not_import_entry_points_or_eval(self):
    bad = [
      f'{name} -> {dep}'
      for name, deps in sorted(import_graph().items())
      if _within(name, LIBRARY)
      for dep in sorted(deps)
      if _within(dep, UPPER)
    ]
    self.assertEqual(bad, [])

  def test_library_imports_no_shell_and_no_tool(self):
    graph = import_graph()
    self.assertIn('dino_jax.cli.flags', graph['dino_jax.main'])  # read
    bad = [
      f'{name} -> {dep}'
      for name, deps in sorted(graph.items())
      if not _within(name, SHELL + TOOLS)
      for dep in sorted(deps)
      if _within(dep, SHELL + TOOLS)
    ]
    self.assertEqual(bad, [])

  def test_library_touches_no_signal_and_no_flag(self):
    # Signals are the shell's (cli/signals.py records, the library polls
    # dino_jax.interrupt); flags too (the evaluations' commands are
    # dino_jax.eval.<name> and cli/evals.py).
    names = module_names()
    library = [n for n in names if not _within(n, SHELL + TOOLS)]
    bad = []
    for name in sorted(library):
      with open(names[name]) as f:
        tree = ast.parse(f.read())
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          used = {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
          used = {f'{node.module}.{a.name}' for a in node.names}
        else:
          continue
        bad += [
          f'{name}: {u}' for u in sorted(used) if u.split('.')[0] == 'signal'
        ]
        if _within(name, ('dino_jax.evaluation',)):
          bad += [f'{name}: {u}' for u in sorted(used) if u == 'absl.flags']
    self.assertEqual(bad, [])


if __name__ == '__main__':
  absltest.main()


def test_metric_writer_does_not_import_torch(tmp_path):
  # tensorboardX imports torch when installed (~3.5 s per training process
  # on 2 cores); the writer writes floats and keeps it out.
  import subprocess
  import sys

  code = (
    'import sys; from dino_jax import metrics; '
    f'metrics.MetricWriter({str(tmp_path)!r}).close(); '
    "import tensorboardX; print('torch' in sys.modules)"
  )
  result = subprocess.run(
    [sys.executable, '-c', code],
    cwd=ROOT,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == 'False'
  assert os.listdir(tmp_path / 'tensorboard')  # the event file is written
