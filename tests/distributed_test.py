"""Multi-process start-up settings: flags over environment, clear errors, cluster detection."""
import pytest

from rlhf_jax import distributed

ENV = {'JAX_COORDINATOR_ADDRESS': 'h0:1234', 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '3'}


def test_single_process_needs_nothing():
  assert distributed.settings(environ={}) is None


def test_environment_and_flags():
  assert distributed.settings(environ=ENV) == dict(coordinator_address='h0:1234', num_processes=4, process_id=3)
  # explicit values win over the environment
  assert distributed.settings('h1:99', 2, 0, environ=ENV) == dict(coordinator_address='h1:99', num_processes=2,
                                                                   process_id=0)


@pytest.mark.parametrize('env,match', [
    ({'JAX_COORDINATOR_ADDRESS': 'h0:1'}, 'JAX_NUM_PROCESSES, JAX_PROCESS_ID not set'),
    ({**ENV, 'JAX_PROCESS_ID': '4'}, r'process id 4 is not in \[0, 4\)'),
    ({**ENV, 'JAX_NUM_PROCESSES': 'two'}, 'must be integers'),
])
def test_incomplete_or_wrong_settings_fail_by_name(env, match):
  with pytest.raises(ValueError, match=match):
    distributed.settings(environ=env)


def test_clusters_are_detected(monkeypatch):
  for k in ('TPU_WORKER_HOSTNAMES', 'SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_NPROCS', *ENV):
    monkeypatch.delenv(k, raising=False)
  assert distributed.settings() is None
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0')          # a single-host TPU VM: one process
  assert distributed.settings() is None
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0,w1,w2,w3')  # a pod slice: JAX finds the rest
  assert distributed.settings() == {}
  monkeypatch.delenv('TPU_WORKER_HOSTNAMES')
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert distributed.settings() is None
  monkeypatch.setenv('SLURM_NTASKS', '16')
  assert distributed.settings() == {}
