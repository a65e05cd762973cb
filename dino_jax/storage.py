"""The file layer: every path a run or a tool reads or writes.

Local paths and URLs (``gs://bucket/run``, or any scheme fsspec knows) go
through ``etils.epath``, the layer Orbax and TFDS use too. An object store
is not a disk, and the helpers here are written for both:

- a write uploads the object whole when the file closes: a reader sees the
  old or the new object, never half of one (on a disk the same is had with
  a temporary file and ``os.replace``);
- there is no append: a file that grows is rewritten whole;
- ``mkdir`` creates nothing (a prefix exists once an object is under it),
  and a prefix cannot be renamed: ``move_tree`` copies, then deletes;
- a bucket that does not exist, missing credentials or a server that does
  not answer show up at the first request, which ``check_reachable`` makes
  at start, with a time limit, and turns into one line.
"""

import os
import threading
import time

from etils import epath

# How long the probe of a remote path may take before the run gives up: gcsfs
# retries a refused connection for about 35 s (measured against a closed
# port), and a server that accepts but never answers would hold it forever.
PROBE_TIMEOUT_S = 20.0


class StorageError(RuntimeError):
  """A path cannot be read or written; the message says what to do."""


def is_remote(path: str) -> bool:
  """Whether ``path`` is a URL (``gs://...``) rather than a local path."""
  path = os.fspath(path)
  return '://' in path and not path.startswith('file://')


def as_path(path: str) -> epath.Path:
  return epath.Path(path)


def join(path: str, *parts: str) -> str:
  """``path/parts...`` as a string, for a URL as for a local path."""
  return os.fspath(epath.Path(path).joinpath(*parts))


def makedirs(path: str) -> None:
  """Creates a local directory and its parents; a prefix needs nothing."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def write_bytes(path: str, data: bytes) -> None:
  """Replaces ``path`` with ``data``, whole or not at all.

  Local: a temporary file beside it, renamed over it. Remote: one upload;
  the object is replaced when the upload ends.
  """
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  partial = f'{path}.{os.getpid()}.{threading.get_ident()}.tmp'
  try:
    with open(partial, 'wb') as f:
      f.write(data)
    os.replace(partial, path)
  except BaseException:
    if os.path.exists(partial):
      os.remove(partial)
    raise


def write_text(path: str, text: str) -> None:
  """``write_bytes`` of ``text`` in UTF-8."""
  write_bytes(path, text.encode())


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def _files(root: epath.Path):
  """Every file under ``root``, recursively (gcsfs has no ``rglob('**')``,
  and epath's ``walk`` drops the scheme of a URL)."""
  for child in root.iterdir():
    if child.is_dir():
      yield from _files(child)
    else:
      yield child


def walk(root: str) -> list[tuple[str, list[str]]]:
  """``(dirpath, sorted file names)`` for every folder under ``root``,
  sorted by dirpath: torchvision's ``sorted(os.walk(root))`` order.

  Local: ``os.walk`` (following links), files only. Remote: one recursive
  listing (``find``: 1,000 names a request) instead of a request per
  entry, which would take hours on ImageNet's 1.28 M files.
  """
  if not is_remote(root):
    return [
      (dirpath, sorted(f for f in files if os.path.isfile(f'{dirpath}/{f}')))
      for dirpath, _, files in sorted(os.walk(root, followlinks=True))
    ]
  import fsspec

  fs, path = fsspec.core.url_to_fs(root)
  scheme = root.split('://', 1)[0]
  folders = {}
  for name in fs.find(path):
    folder, _, file = name.rpartition('/')
    folders.setdefault(f'{scheme}://{folder}', []).append(file)
  return [(folder, sorted(files)) for folder, files in sorted(folders.items())]


def move_tree(source: str, target: str) -> None:
  """Moves the directory ``source`` to ``target`` (which must not exist).

  Local: one rename. Remote: each object is copied, then the source is
  deleted; a run stopped meanwhile leaves the source whole or partly
  deleted, and a partial copy at ``target``.
  """
  if not is_remote(source):
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    os.rename(source, target)
    return
  root, destination = epath.Path(source), epath.Path(target)
  for file in _files(root):
    file.copy(destination / file.relative_to(root))
  root.rmtree()


def _bucket_url(path: str) -> str:
  """``scheme://bucket`` of a URL."""
  scheme, rest = path.split('://', 1)
  return f'{scheme}://{rest.split("/", 1)[0]}'


def _emulator_note() -> str:
  host = os.environ.get('STORAGE_EMULATOR_HOST')
  return f' (STORAGE_EMULATOR_HOST={host})' if host else ''


def explain(error: BaseException, path: str) -> str:
  """One line: which path failed, why, and what to do."""
  name = type(error).__name__
  reason = ' '.join(str(error).split())[:200] or name
  if 'Credentials' in name or 'RefreshError' in name:
    return (
      f'no credentials for {path} ({reason}); run `gcloud auth '
      "application-default login`, or give the VM's service account "
      'access to the bucket'
    )
  if isinstance(error, FileNotFoundError):
    return f'{path} does not exist ({reason}); check the path'
  if isinstance(error, PermissionError):
    return (
      f'no permission for {path} ({reason}); grant the account access to '
      'the bucket'
    )
  return f'{path} cannot be reached: {name}: {reason}{_emulator_note()}'


def _with_time_limit(function, path: str, timeout: float):
  """``function()`` in a thread; StorageError after ``timeout`` seconds.

  A client stuck on a silent server stays in its (daemon) thread; the run
  stops with one line instead of hanging.
  """
  outcome = {}

  def target():
    try:
      outcome['value'] = function()
    except BaseException as e:  # noqa: BLE001 - reported by the caller
      outcome['error'] = e

  thread = threading.Thread(target=target, daemon=True, name='dino-probe')
  start = time.time()
  thread.start()
  thread.join(timeout)
  if thread.is_alive():
    raise StorageError(
      f'no answer for {path} within {timeout:.0f} s{_emulator_note()}; '
      'check the network and the storage service, then rerun'
    )
  if 'error' in outcome:
    error = outcome['error']
    if time.time() - start > 0.5 * timeout:
      raise StorageError(
        f'no answer for {path} within {time.time() - start:.0f} s '
        f'({type(error).__name__}){_emulator_note()}; check the network '
        'and the storage service, then rerun'
      ) from error
    raise StorageError(explain(error, path)) from error
  return outcome.get('value')


def check_reachable(
  path: str, what: str = '--workdir', timeout: float = PROBE_TIMEOUT_S
) -> None:
  """Raises StorageError unless the bucket of a remote ``path`` exists and
  answers within ``timeout`` seconds; local paths pass.

  Args:
    path: a local path or a URL.
    what: how the message names the path (a flag or config field).
    timeout: seconds before a silent server is reported.
  """
  if not is_remote(path):
    return
  bucket = _bucket_url(path)
  exists = _with_time_limit(
    lambda: epath.Path(bucket).exists(), f'{what}={path}', timeout
  )
  if not exists:
    raise StorageError(
      f'{what}={path}: bucket {bucket} does not exist; create it (gcloud '
      f'storage buckets create {bucket}) or pass another path'
    )


def exists(path: str, what: str = 'path') -> bool:
  """``path`` exists; a remote error becomes a one-line StorageError."""
  try:
    return epath.Path(path).exists()
  except Exception as e:  # noqa: BLE001 - client errors vary by scheme
    if not is_remote(path):
      raise
    raise StorageError(f'{what}: {explain(e, path)}') from e
