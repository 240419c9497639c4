"""Metrics from the first process only: stdout, `metrics.jsonl` and TensorBoard event files.

Train steps return scalar metrics as device arrays; the loop fetches them once per log interval
(one host sync) and hands plain floats to `Writer.write`.
"""
from __future__ import annotations

import json
import time
from typing import Mapping

import jax

from rlhf_jax import fs


class Writer:
  def __init__(self, workdir: str, *, stage: str = '', tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.stage = stage
    self._tb = None
    if not self.active:
      return
    self._jsonl = fs.LineFile(fs.join(workdir, 'metrics.jsonl'))
    if tensorboard:
      from tensorboardX import SummaryWriter  # writes event files without TensorFlow
      self._tb = SummaryWriter(fs.join(workdir, 'tb'))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.active:
      return
    record = {'step': int(step), 'time': time.time(), **{k: float(v) for k, v in metrics.items()}}
    if self.stage:
      record['stage'] = self.stage
    self._jsonl.append(json.dumps(record))
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def read(workdir: str) -> list[dict]:
  """The records of a run's metrics.jsonl (for reports, tests and notebooks)."""
  return [json.loads(line) for line in fs.read_text(fs.join(workdir, 'metrics.jsonl')).splitlines() if line.strip()]


def fetch(metrics_list) -> dict[str, float]:
  """Means over the steps of one log interval, with a single device-to-host transfer."""
  host = jax.device_get(metrics_list)
  keys = host[0].keys() if host else ()
  return {k: float(sum(m[k] for m in host) / len(host)) for k in keys}
