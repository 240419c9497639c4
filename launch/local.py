"""N processes of one run on this machine, on CPU: the multi-host code paths without a cluster.

  python launch/local.py --processes=2 --devices_per_process=4 -- \\
      --config=experiments/sft.py:smoke --workdir=runs/sft_2proc
  python launch/local.py --processes=2 --dry-run -- --config=experiments/sft.py:smoke --workdir=runs/x
  python launch/local.py --processes=4 --log_dir=/tmp/logs -- python my_check.py

A CMD that starts with `-` is arguments of `python -m rlhf_jax.main` (this interpreter). Process i
gets JAX_PLATFORMS=cpu, XLA_FLAGS with --xla_force_host_platform_device_count=<devices_per_process>
(any other XLA flags kept), JAX_COORDINATOR_ADDRESS=localhost:<port> (--port=0: a free port),
JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i (what rlhf_jax.distributed reads) and PYTHONUNBUFFERED=1 (logs
as they happen). Its output goes to <log_dir>/process_<i>.log (default: a new temporary folder);
process 0's is also shown here. When a process fails, the others are stopped (they would wait for it
in a collective forever), the end of its log is printed, and this exits with its code. Ctrl-C and
SIGTERM are passed on to every process.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common  # noqa: E402

DEVICE_FLAG = '--xla_force_host_platform_device_count'
GRACE_S = 10  # how long stopped processes get to exit before SIGKILL


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
  p.add_argument('--processes', type=int, default=2)
  p.add_argument('--devices_per_process', type=int, default=1, help='simulated CPU devices per process')
  p.add_argument('--port', type=int, default=0, help='coordinator port on localhost (0: a free one)')
  p.add_argument('--log_dir', help='where process_<i>.log go (default: a new temporary folder)')
  p.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true', help='print, run nothing')
  return p


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def process_env(i: int, n: int, devices: int, port: int, xla_flags: str = '') -> dict[str, str]:
  """The variables process i of n gets on top of this environment."""
  flags = [f for f in xla_flags.split() if not f.startswith(DEVICE_FLAG + '=')]
  return {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ' '.join([*flags, f'{DEVICE_FLAG}={devices}']),
          'JAX_COORDINATOR_ADDRESS': f'localhost:{port}', 'JAX_NUM_PROCESSES': str(n),
          'JAX_PROCESS_ID': str(i), 'PYTHONUNBUFFERED': '1'}


def _tee(pipe, log):
  """Process 0's output to its log and to this terminal, chunk by chunk (progress bars too)."""
  for chunk in iter(lambda: os.read(pipe.fileno(), 1 << 16), b''):
    log.write(chunk)
    log.flush()
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()


def _signal(proc, sig):
  """Signal a process and everything it started (its own session, see Popen below)."""
  try:
    os.killpg(proc.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def _stop(procs):
  """SIGTERM to the processes still running; SIGKILL to those alive GRACE_S later."""
  running = [p for p in procs if p.poll() is None]
  for p in running:
    _signal(p, signal.SIGTERM)
  deadline = time.time() + GRACE_S
  while any(p.poll() is None for p in running) and time.time() < deadline:
    time.sleep(0.05)
  for p in running:
    if p.poll() is None:
      _signal(p, signal.SIGKILL)
      p.wait()


def _tail(path: str, n: int = 40) -> str:
  with open(path, errors='replace') as f:
    return ''.join(f.readlines()[-n:])


def run(args, cmd: list[str]) -> int:
  """Start the processes (or print their commands) and wait; the exit code of the run."""
  cmd = common.command(cmd)
  port = args.port or free_port()
  envs = [process_env(i, args.processes, args.devices_per_process, port, os.environ.get('XLA_FLAGS', ''))
          for i in range(args.processes)]
  if args.dry_run:
    for env in envs:
      print(common.env_line(env, cmd))
    return 0
  log_dir = args.log_dir or tempfile.mkdtemp(prefix='rlhf_jax_local_')
  os.makedirs(log_dir, exist_ok=True)
  print(f'{args.processes} processes, logs in {log_dir}/process_<i>.log', file=sys.stderr, flush=True)
  paths = [os.path.join(log_dir, f'process_{i}.log') for i in range(args.processes)]
  logs = [open(p, 'wb') for p in paths]
  procs, tee, failed = [], None, None

  def forward(sig, _):
    for p in procs:
      _signal(p, sig)
  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}  # before any process starts
  try:
    # Each process leads its own session: a terminal's Ctrl-C reaches only us, and we signal each
    # process group as a whole, so a shell's children stop with it.
    for i, (env, log) in enumerate(zip(envs, logs)):
      procs.append(subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE if i == 0 else log,
                                    stderr=subprocess.STDOUT, start_new_session=True))
    tee = threading.Thread(target=_tee, args=(procs[0].stdout, logs[0]), daemon=True)
    tee.start()
    while True:
      time.sleep(0.05)
      codes = [p.poll() for p in procs]   # None while running
      failed = next((i for i, c in enumerate(codes) if c), None)
      if failed is not None or None not in codes:
        break
  finally:   # after a failure the others would block in their next collective: stop them
    _stop(procs)
    for s, handler in old.items():
      signal.signal(s, handler)
    if tee:
      tee.join(timeout=5)
    for log in logs:
      log.close()
  if failed is None:
    return 0
  code = procs[failed].returncode
  print(f'\nprocess {failed} exited with code {code}; the others were stopped. Last lines of '
        f'{paths[failed]}:\n{_tail(paths[failed])}', file=sys.stderr, flush=True)
  return code if code > 0 else 128 - code   # killed by signal s: 128 + s, as a shell reports it


def main(argv=None):
  own, cmd = common.split_argv(sys.argv[1:] if argv is None else argv)
  sys.exit(run(parser().parse_args(own), cmd))


if __name__ == '__main__':
  main()
