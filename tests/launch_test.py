"""The launch scripts: the commands they print with --dry-run, and local.py's processes for real."""
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from experiments import sft

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # launch/ is scripts, not an installed package
from launch import common  # noqa: E402

PY = sys.executable
ENV = {**os.environ, 'XLA_FLAGS': '--xla_cpu_foo=1 --xla_force_host_platform_device_count=8'}


def launch(script, *args, env=ENV, timeout=60):
  return subprocess.run([PY, str(ROOT / 'launch' / script), *args], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=timeout)


def dry_run(script, *args):
  out = launch(script, '--dry-run', *args)
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


def test_local_dry_run_gives_each_process_its_environment():
  lines = dry_run('local.py', '--processes=2', '--devices_per_process=4', '--port=1234', '--',
                  '--config=experiments/sft.py:smoke', '--workdir=/tmp/x y')
  assert lines == [
    f"JAX_PLATFORMS=cpu XLA_FLAGS='--xla_cpu_foo=1 --xla_force_host_platform_device_count=4' "
    f"JAX_COORDINATOR_ADDRESS=localhost:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={i} PYTHONUNBUFFERED=1 "
    f"{shlex.quote(PY)} -m rlhf_jax.main --config=experiments/sft.py:smoke '--workdir=/tmp/x y'" for i in (0, 1)]
  # The shell reads the line as assignments, then the command.
  assert shlex.split(lines[0])[1] == 'XLA_FLAGS=--xla_cpu_foo=1 --xla_force_host_platform_device_count=4'


def test_local_dry_run_picks_a_free_port_and_keeps_a_plain_command():
  lines = dry_run('local.py', '--processes=3', '--', 'python', 'train.py', '--x=1')
  ports = {re.search(r'JAX_COORDINATOR_ADDRESS=localhost:(\d+) ', line).group(1) for line in lines}
  assert len(lines) == 3 and len(ports) == 1 and int(ports.pop()) > 0
  assert all(line.endswith(f'JAX_PROCESS_ID={i} PYTHONUNBUFFERED=1 python train.py --x=1')
             for i, line in enumerate(lines))


def test_local_runs_every_process_with_its_id(tmp_path):
  code = ("import os; print('process', os.environ['JAX_PROCESS_ID'], 'of', os.environ['JAX_NUM_PROCESSES'], "
          "os.environ['JAX_COORDINATOR_ADDRESS'], os.environ['XLA_FLAGS'])")
  out = launch('local.py', '--processes=2', '--devices_per_process=1', f'--log_dir={tmp_path}', '--',
               PY, '-c', code)
  assert out.returncode == 0, out.stderr
  logs = [(tmp_path / f'process_{i}.log').read_text() for i in (0, 1)]
  for i, log in enumerate(logs):
    assert log.startswith(f'process {i} of 2 localhost:')
    assert log.rstrip().endswith(' --xla_cpu_foo=1 --xla_force_host_platform_device_count=1')
  assert logs[0].split()[4] == logs[1].split()[4]          # one coordinator address
  assert out.stdout == logs[0]                              # process 0 is shown live; 1 only logged


def alive(folder):
  """The processes that wrote a pid_<i> file in folder and still run; killed, so a failed test
  leaves no process sleeping."""
  pids = []
  for pid in [int(t) for t in (f.read_text() for f in folder.glob('pid_*')) if t]:
    try:
      os.kill(pid, signal.SIGKILL)
      pids.append(pid)
    except ProcessLookupError:
      pass
  return pids


def test_local_failure_stops_the_others_and_reports_it(tmp_path):
  # Process 1 fails; process 0 would sleep for 10 minutes (as if blocked in a collective).
  code = ("import os, sys, time; i = int(os.environ['JAX_PROCESS_ID']); "
          "open(f'{sys.argv[1]}/pid_{i}', 'w').write(str(os.getpid())); "
          "time.sleep(600) if i == 0 else (time.sleep(0.5), sys.exit('process 1 gives up'))")
  start = time.time()
  out = launch('local.py', '--processes=2', f'--log_dir={tmp_path}', '--', PY, '-c', code, str(tmp_path))
  assert time.time() - start < 20
  assert out.returncode == 1
  assert 'process 1 exited with code 1' in out.stderr and 'process 1 gives up' in out.stderr
  assert alive(tmp_path) == []


def test_local_forwards_sigterm_to_every_process(tmp_path):
  code = ("import os, sys, time; open(f\"{sys.argv[1]}/pid_{os.environ['JAX_PROCESS_ID']}\", 'w')"
          ".write(str(os.getpid())); time.sleep(600)")
  proc = subprocess.Popen([PY, str(ROOT / 'launch' / 'local.py'), '--processes=2', f'--log_dir={tmp_path}', '--',
                           PY, '-c', code, str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 20
  while len([f for f in tmp_path.glob('pid_*') if f.read_text()]) < 2 and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=20) == 128 + signal.SIGTERM
  assert len(list(tmp_path.glob('pid_*'))) == 2 and alive(tmp_path) == []


def test_tpu_dry_run_creates_copies_runs_on_all_workers_and_collects_every_log():
  lines = dry_run('tpu.py', '--name=rlhf', '--zone=us-central2-b', '--accelerator=v4-64', '--project=p',
                  '--create', '--spot', '--run_name=r1', '--log_dir=/tmp/tpu_logs', '--',
                  '--config=experiments/sft.py:smoke', '--workdir=gs://bucket/sft')
  tpu, where = 'gcloud compute tpus tpu-vm', '--zone=us-central2-b --project=p'
  assert lines[0] == (f'{tpu} describe rlhf {where} >/dev/null 2>&1 || {tpu} create rlhf --accelerator-type=v4-64 '
                      f'--version=tpu-ubuntu2204-base {where} --spot')
  assert lines[1].startswith(f'cd {ROOT} && git ls-files -z --cached --others --exclude-standard | tar -czf ')
  assert re.fullmatch(rf'{tpu} scp \S+/rlhf_jax-r1\.tar\.gz rlhf:rlhf_jax\.tar\.gz --worker=all {where}', lines[2])
  assert lines[3].startswith(f'{tpu} ssh rlhf --worker=all ') and 'pip install -q -e ".[tpu]"' in lines[3]
  assert lines[4] == (f"{tpu} ssh rlhf --worker=all '--command=cd ~/rlhf_jax && mkdir -p logs && set -o pipefail"
                      " && python3 -m rlhf_jax.main --config=experiments/sft.py:smoke --workdir=gs://bucket/sft"
                      f" 2>&1 | tee logs/r1.log' {where}")
  assert lines[5] == 'mkdir -p /tmp/tpu_logs/r1'
  assert lines[6:] == [f'{tpu} scp rlhf:rlhf_jax/logs/r1.log /tmp/tpu_logs/r1/worker_{i}.log --worker={i} {where}'
                       for i in range(8)]                # v4-64: 32 chips on 8 hosts


def test_tpu_warns_about_a_local_workdir_and_rejects_unknown_accelerators():
  out = launch('tpu.py', '--dry-run', '--name=t', '--zone=z', '--accelerator=v5litepod-16', '--no_sync', '--',
               '--config=experiments/sft.py:smoke', '--workdir=runs/x')
  assert out.returncode == 0 and 'warning: --workdir=runs/x' in out.stderr
  assert len(out.stdout.splitlines()) == 1 + 1 + 4      # run, mkdir, 4 hosts' logs; no create, no sync
  out = launch('tpu.py', '--dry-run', '--name=t', '--zone=z', '--accelerator=v9-8', '--', '--workdir=gs://b')
  assert out.returncode == 2 and "unknown TPU accelerator 'v9-8'" in out.stderr


@pytest.mark.parametrize('name, chips, hosts', [('v4-8', 4, 1), ('v4-64', 32, 8), ('v5p-128', 64, 16),
                                                ('v5litepod-8', 8, 1), ('v5litepod-16', 16, 4),
                                                ('v6e-8', 8, 1), ('v6e-256', 256, 64)])
def test_tpu_slice_table(name, chips, hosts):
  assert common.tpu_slice(name)[:2] == (chips, hosts)


@pytest.mark.parametrize('name', ['v9-8', 'v4', 'tpu-64', 'v4-7', 'v6e-18'])
def test_tpu_slice_rejects_unknown_names(name):
  with pytest.raises(ValueError, match=re.escape(repr(name))):
    common.tpu_slice(name)


def slurm_expected(tasks, extra=()):
  return ['#!/bin/bash', '#SBATCH --job-name=sft', '#SBATCH --nodes=2', f'#SBATCH --ntasks-per-node={tasks}',
          '#SBATCH --gpus-per-node=8', '#SBATCH --output=/scratch/logs/%x-%j.out', '#SBATCH --partition=gpu',
          '#SBATCH --time=01:00:00', 'set -e', f'cd {ROOT}', 'export PYTHONUNBUFFERED=1',
          'source .venv/bin/activate', *extra,
          'srun python -m rlhf_jax.main --config=experiments/sft.py:smoke --workdir=/scratch/runs/sft']


@pytest.mark.parametrize('per, tasks, extra', [('gpu', 8, []),
                                               ('node', 1, ['export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7'])])
def test_slurm_dry_run_prints_the_script_and_sbatch(per, tasks, extra):
  lines = dry_run('slurm.py', '--nodes=2', '--gpus_per_node=8', f'--per={per}', '--partition=gpu',
                  '--time=01:00:00', '--job_name=sft', '--log_dir=/scratch/logs', '--setup=source .venv/bin/activate',
                  '--', '--config=experiments/sft.py:smoke', '--workdir=/scratch/runs/sft')
  assert lines[:-1] == slurm_expected(tasks, extra)
  assert re.fullmatch(r'sbatch /scratch/logs/sft-\d{8}-\d{6}\.sbatch', lines[-1])


def test_sweep_local_runs_one_command_per_point():
  lines = dry_run('sweep.py', '--launcher=local', '--config=experiments/sft.py:tiny', '--workdir=runs/sweep', '--',
                  '--config.train.steps=10')
  lrs = [p['optim.lr'] for p in sft.get_sweep()]
  assert lines == [f'{PY} -m rlhf_jax.main --config=experiments/sft.py:tiny --workdir=runs/sweep/{i}_optim.lr={lr} '
                   f'--config.optim.lr={lr} --config.train.steps=10' for i, lr in enumerate(lrs)]


def test_sweep_workdir_names_are_file_names():
  assert common.safe_name("0_data.source=a/b c_tags=('x', 1)") == '0_data.source=a_b_c_tags=__x___1_'


def test_sweep_local_with_processes_goes_through_local():
  lines = dry_run('sweep.py', '--launcher=local', '--processes=2', '--port=1234', '--config=experiments/sft.py:tiny',
                  '--workdir=runs/sweep')
  assert len(lines) == 2 * len(sft.get_sweep())
  assert 'JAX_PROCESS_ID=1 ' in lines[3] and lines[3].endswith('--workdir=runs/sweep/1_optim.lr=0.001 '
                                                               '--config.optim.lr=0.001')


def test_sweep_slurm_submits_one_job_per_point():
  lines = dry_run('sweep.py', '--launcher=slurm', '--nodes=1', '--gpus_per_node=4', '--job_name=lr',
                  '--log_dir=/scratch/logs', '--config=experiments/sft.py:tiny', '--workdir=/scratch/sweep')
  lrs = [p['optim.lr'] for p in sft.get_sweep()]
  assert [line for line in lines if line.startswith('#SBATCH --job-name')] == [
    f'#SBATCH --job-name=lr-{i}' for i in range(len(lrs))]
  assert [line for line in lines if line.startswith('srun ')] == [
    f'srun {shlex.quote(PY)} -m rlhf_jax.main --config=experiments/sft.py:tiny '
    f'--workdir=/scratch/sweep/{i}_optim.lr={lr} --config.optim.lr={lr}' for i, lr in enumerate(lrs)]
  assert [line.rsplit('-', 2)[0] for line in lines if line.startswith('sbatch ')] == [
    f'sbatch /scratch/logs/lr-{i}' for i in range(len(lrs))]


def test_sweep_without_get_sweep_fails_naming_the_file(tmp_path):
  config = tmp_path / 'no_sweep.py'
  config.write_text('def get_config(arg=None):\n  return None\n')
  out = launch('sweep.py', '--dry-run', '--launcher=local', f'--config={config}:smoke', '--workdir=runs/x')
  assert out.returncode != 0 and f'{config} has no get_sweep()' in out.stderr
