"""One run as a SLURM batch job on GPU nodes: `srun` starts the processes, JAX reads SLURM's variables.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 --partition=gpu --time=24:00:00 \\
      --setup='source .venv/bin/activate' -- --config=experiments/sft.py:size=1.3b --workdir=/shared/runs/sft_1b
  python launch/slurm.py --nodes=4 --gpus_per_node=8 --per=node --dry-run -- --config=... --workdir=...

Writes an sbatch script to <log_dir>/<job_name>-<time>.sbatch and submits it with `sbatch`; the job's
output goes to <log_dir>/<job_name>-<job id>.out. --per=gpu (default) starts one process per GPU
(JAX gives each process the GPU numbered by its SLURM_LOCALID); --per=node one per node that drives
all its GPUs (JAX_LOCAL_DEVICE_IDS lists them; else JAX would take GPU SLURM_LOCALID = 0 alone). The
job runs in the folder this is started from (a shared file system); --setup runs before srun. A CMD
that starts with `-` is arguments of `<python> -m rlhf_jax.main`. --dry-run prints the script and
the sbatch command.
"""
import argparse
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common  # noqa: E402


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
  p.add_argument('--nodes', type=int, required=True)
  p.add_argument('--gpus_per_node', type=int, required=True)
  p.add_argument('--per', choices=('gpu', 'node'), default='gpu', help='one process per GPU or per node')
  p.add_argument('--partition')
  p.add_argument('--time', help='time limit, HH:MM:SS')
  p.add_argument('--account')
  p.add_argument('--job_name', default='rlhf_jax')
  p.add_argument('--log_dir', default='runs/slurm', help='the sbatch script and the job\'s output')
  p.add_argument('--setup', default='', help="shell commands before srun, e.g. 'source .venv/bin/activate'")
  p.add_argument('--python', help='the interpreter (default: python after --setup, else this one)')
  p.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true', help='print, submit nothing')
  return p


def script(args, cmd: list[str]) -> str:
  """The sbatch script's text."""
  log_dir = os.path.abspath(args.log_dir)
  tasks = args.gpus_per_node if args.per == 'gpu' else 1
  lines = ['#!/bin/bash', f'#SBATCH --job-name={args.job_name}', f'#SBATCH --nodes={args.nodes}',
           f'#SBATCH --ntasks-per-node={tasks}', f'#SBATCH --gpus-per-node={args.gpus_per_node}',
           f'#SBATCH --output={log_dir}/%x-%j.out']
  lines += [f'#SBATCH --{k}={v}' for k, v in [('partition', args.partition), ('time', args.time),
                                               ('account', args.account)] if v]
  lines += ['set -e', f'cd {shlex.quote(os.getcwd())}', 'export PYTHONUNBUFFERED=1']
  if args.setup:
    lines.append(args.setup)
  if args.per == 'node':   # all of the node's GPUs, not just the one of SLURM_LOCALID (0)
    lines.append(f'export JAX_LOCAL_DEVICE_IDS={",".join(map(str, range(args.gpus_per_node)))}')
  python = args.python or ('python' if args.setup else shlex.quote(sys.executable))
  lines.append(f'srun {common.command_line(cmd, python)}')
  return '\n'.join(lines) + '\n'


def run(args, cmd: list[str]) -> int:
  """Write the script and submit it (print both with --dry-run); sbatch's exit code."""
  text = script(args, cmd)
  path = os.path.join(args.log_dir, f'{args.job_name}-{time.strftime("%Y%m%d-%H%M%S")}.sbatch')
  if args.dry_run:
    print(text, end='')
  else:
    os.makedirs(args.log_dir, exist_ok=True)   # SLURM does not create the output's folder
    with open(path, 'w') as f:
      f.write(text)
  return common.execute(['sbatch', path], args.dry_run)


def main(argv=None):
  own, cmd = common.split_argv(sys.argv[1:] if argv is None else argv)
  sys.exit(run(parser().parse_args(own), cmd))


if __name__ == '__main__':
  main()
