"""Files in a workdir that may be local or remote (`gs://bucket/run`, as runs on a TPU pod use: every
host must see the same checkpoints, so the workdir is on shared storage).

Local paths use the operating system; URLs go through `etils.epath` (installed with Orbax; Google
Cloud Storage also needs `gcsfs`, which the `tpu` extra installs). Remote objects cannot be appended
to, so `LineFile.append` rewrites the whole (small) file there.
"""
from __future__ import annotations

import os

from etils import epath


def is_remote(path: str) -> bool:
  return '://' in str(path)


def join(*parts: str) -> str:
  if is_remote(parts[0]):
    return str(epath.Path(parts[0]).joinpath(*parts[1:]))
  return os.path.join(*parts)


def absolute(path: str) -> str:
  return str(path) if is_remote(path) else os.path.abspath(path)


def _parent(path: str) -> str:
  return str(epath.Path(path).parent) if is_remote(path) else (os.path.dirname(path) or '.')


def exists(path: str) -> bool:
  return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
  if is_remote(path):
    return epath.Path(path).read_text()
  with open(path, encoding='utf-8') as f:
    return f.read()


def write_bytes(path: str, data: bytes) -> None:
  """Write a whole file; locally through a temporary file and a rename, so a reader never sees it
  half written (an object store makes a whole object visible at once)."""
  makedirs(_parent(path))
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  with open(path + '.tmp', 'wb') as f:
    f.write(data)
  os.replace(path + '.tmp', path)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


class LineFile:
  """A file of lines opened for appending: kept open locally; rewritten whole at each line on
  remote storage (metrics logs are small)."""

  def __init__(self, path: str):
    self.path = path
    if is_remote(path):
      self._lines = read_text(path) if exists(path) else ''
      self._f = None
      makedirs(_parent(path))
    else:
      makedirs(_parent(path))
      self._f = open(path, 'a', encoding='utf-8')

  def append(self, line: str) -> None:
    if self._f is None:
      self._lines += line + '\n'
      epath.Path(self.path).write_text(self._lines)
    else:
      self._f.write(line + '\n')
      self._f.flush()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
