"""One run on a Cloud TPU slice: every worker (host) runs the same command; JAX finds the others.

  python launch/tpu.py --name=rlhf-v4 --zone=us-central2-b --accelerator=v4-64 --create -- \\
      --config=experiments/sft.py:size=1.3b --workdir=gs://my-bucket/sft_1b
  PY311='test -x ~/venv/bin/python || (curl -LsSf https://astral.sh/uv/install.sh | sh && ~/.local/bin/uv venv -p 3.11 --seed ~/venv)'
  python launch/tpu.py --name=rlhf-v5e --zone=us-west4-a --accelerator=v5litepod-16 --spot --create \\
      --setup="$PY311" --python='~/venv/bin/python' --dry-run -- \\
      --config=experiments/ppo.py:size=1.3b --workdir=gs://my-bucket/ppo_1b

Run it from the repository root. The steps, each a command printed before it runs (only printed
with --dry-run):
1. --create: create the slice (`--spot`: a spot VM) unless `gcloud ... describe` finds it;
2. package the working tree as `git ls-files` lists it (tracked and untracked files, not ignored
   ones; uncommitted edits included, so what runs is what you see; a deleted file must be
   `git rm`-ed) into a tar.gz, copy it to every worker, unpack it into ~/rlhf_jax (replacing the
   code there, keeping ~/rlhf_jax/logs), then `--setup` and `pip install -e '.[tpu]'` with --python
   (--no_sync skips this step: the workers keep what they have);
3. run CMD in ~/rlhf_jax on all workers at once; worker i's output goes to ~/rlhf_jax/logs/<run>.log
   (all of it is also shown here);
4. copy every worker's log to <log_dir>/<run>/worker_<i>.log, whether or not the run succeeded.
A CMD that starts with `-` is arguments of `<python> -m rlhf_jax.main`. The workdir should be on
gs://: each worker's disk is its own. The runtime images come with Python 3.10 and this package
needs 3.11 or newer: the second example installs one. Workers per accelerator: common.TPUS.
"""
import argparse
import os
import shlex
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common  # noqa: E402


def _accelerator(name: str) -> str:
  try:
    common.tpu_slice(name)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return name


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
  p.add_argument('--name', required=True, help='the TPU VM (slice) name')
  p.add_argument('--zone', required=True)
  p.add_argument('--accelerator', required=True, type=_accelerator, help='e.g. v4-64, v5litepod-16, v6e-8')
  p.add_argument('--project', help='default: gcloud config')
  p.add_argument('--version', help="runtime version (default: the accelerator's, in common.TPUS)")
  p.add_argument('--create', action='store_true', help='create the slice if it does not exist')
  p.add_argument('--spot', action='store_true', help='with --create: a spot VM')
  p.add_argument('--python', default='python3', help='the workers\' interpreter (shell text)')
  p.add_argument('--setup', default='', help='shell commands run on every worker before pip install '
                 '(not before the run: give the interpreter with --python)')
  p.add_argument('--no_sync', action='store_true', help='skip packaging, copying and installing')
  p.add_argument('--run_name', default=time.strftime('%Y%m%d-%H%M%S'), help='names the logs')
  p.add_argument('--log_dir', default='runs/tpu_logs', help='where the workers\' logs are collected')
  p.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true', help='print, run nothing')
  return p


def gcloud(args, verb: str, *rest: str) -> list[str]:
  project = [f'--project={args.project}'] if args.project else []
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *rest, f'--zone={args.zone}', *project]


def plan(args, cmd: list[str]) -> tuple[list[str], str, list[str]]:
  """The shell lines of one run: (before it, the run, collecting its logs)."""
  _, hosts, version = common.tpu_slice(args.accelerator)
  q = shlex.join
  before = []
  if args.create:
    create = gcloud(args, 'create', args.name, f'--accelerator-type={args.accelerator}',
                    f'--version={args.version or version}') + (['--spot'] if args.spot else [])
    before.append(f'{q(gcloud(args, "describe", args.name))} >/dev/null 2>&1 || {q(create)}')
  if not args.no_sync:
    archive = os.path.join(tempfile.gettempdir(), f'rlhf_jax-{args.run_name}.tar.gz')
    before.append(f'cd {shlex.quote(common.ROOT)} && git ls-files -z --cached --others --exclude-standard '
                  f'| tar -czf {shlex.quote(archive)} --null -T -')
    before.append(q(gcloud(args, 'scp', archive, f'{args.name}:rlhf_jax.tar.gz', '--worker=all')))
    install = ('mkdir -p ~/rlhf_jax && cd ~/rlhf_jax && find . -mindepth 1 -maxdepth 1 ! -name logs '
               "-exec rm -rf {} + && tar -xzf ~/rlhf_jax.tar.gz && "
               f'{args.python} -m pip install -q -e ".[tpu]"')
    if args.setup:
      install = f'{args.setup} && {install}'
    before.append(q(gcloud(args, 'ssh', args.name, '--worker=all', f'--command={install}')))
  log = f'logs/{args.run_name}.log'
  main = (f'cd ~/rlhf_jax && mkdir -p logs && set -o pipefail && '
          f'{common.command_line(cmd, args.python)} 2>&1 | tee {log}')
  run = q(gcloud(args, 'ssh', args.name, '--worker=all', f'--command={main}'))
  local = os.path.join(args.log_dir, args.run_name)
  collect = [q(['mkdir', '-p', local])] + [
    q(gcloud(args, 'scp', f'{args.name}:rlhf_jax/{log}', os.path.join(local, f'worker_{i}.log'), f'--worker={i}'))
    for i in range(hosts)]
  return before, run, collect


def run(args, cmd: list[str]) -> int:
  """Prepare the slice, run CMD on every worker, collect the logs; the run's exit code."""
  workdir = common.flag(cmd, 'workdir')
  if workdir and not workdir.startswith('gs://'):
    print(f'warning: --workdir={workdir} is on each worker\'s own disk; a pod run needs one shared '
          'gs:// workdir for its checkpoints', file=sys.stderr)
  before, main, collect = plan(args, cmd)
  for line in before:
    if code := common.execute(line, args.dry_run):
      return code
  code = common.execute(main, args.dry_run)
  for line in collect:
    common.execute(line, args.dry_run)
  return code


def main(argv=None):
  own, cmd = common.split_argv(sys.argv[1:] if argv is None else argv)
  sys.exit(run(parser().parse_args(own), cmd))


if __name__ == '__main__':
  main()
