"""Workdir files on local or remote storage: the remote code path (epath; whole-file rewrites
instead of appends) is exercised on a local folder by treating every path as remote."""
import json

import pytest

from rlhf_jax import fs, metrics


@pytest.mark.parametrize('remote', [False, True])
def test_metrics_and_json_round_trip(tmp_path, monkeypatch, remote):
  monkeypatch.setattr(fs, 'is_remote', lambda path: remote)
  workdir = str(tmp_path / 'run' / 'sft')
  w = metrics.Writer(workdir, stage='sft', tensorboard=False)
  w.write(1, {'sft/loss': 2.5})
  w.write(2, {'sft/loss': 2.0})
  w.close()
  again = metrics.Writer(workdir, stage='sft', tensorboard=False)   # a resumed run appends
  again.write(3, {'sft/loss': 1.5})
  again.close()
  assert [(r['step'], r['sft/loss']) for r in metrics.read(workdir)] == [(1, 2.5), (2, 2.0), (3, 1.5)]
  path = fs.join(str(tmp_path), 'deep', 'done.json')
  assert not fs.exists(path)
  fs.write_text(path, json.dumps({'seconds': 3}))
  assert fs.exists(path) and json.loads(fs.read_text(path)) == {'seconds': 3}
  assert not (tmp_path / 'deep' / 'done.json.tmp').exists()


def test_urls_are_kept_as_they_are():
  assert fs.absolute('gs://bucket/run') == 'gs://bucket/run'
  assert fs.join('gs://bucket/run', 'sft', 'checkpoints') == 'gs://bucket/run/sft/checkpoints'
  assert fs.absolute('runs/x').startswith('/')
