"""One run per point of an experiment's `get_sweep()`, on this machine, a TPU slice or SLURM.

  python launch/sweep.py --launcher=local --config=experiments/sft.py:tiny --workdir=runs/sft_sweep
  python launch/sweep.py --launcher=local --processes=2 --devices_per_process=4 \\
      --config=experiments/sft.py:smoke --workdir=runs/sft_sweep -- --config.train.steps=4
  python launch/sweep.py --launcher=tpu --name=rlhf-v4 --zone=us-central2-b --accelerator=v4-64 \\
      --config=experiments/rm.py:size=1.3b --workdir=gs://my-bucket/rm_sweep
  python launch/sweep.py --launcher=slurm --nodes=2 --gpus_per_node=8 --dry-run \\
      --config=experiments/ppo.py:size=1.3b --workdir=/shared/runs/ppo_sweep

Point i of the sweep, e.g. {'optim.lr': 0.001}, runs `rlhf_jax.main --config=<config>
--workdir=<workdir>/<i>_optim.lr=0.001 --config.optim.lr=0.001` plus what follows `--`. The other
options go to that launcher (see `python launch/<launcher>.py --help`). local: the points run
one after another, as one process each or, with --processes > 1, through launch/local.py; tpu: one
after another on the slice (created and given the code once); slurm: one job per point. A failed
point does not stop the others; the exit code is the first failure's.
"""
import argparse
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common, local, slurm, tpu  # noqa: E402


def load_sweep(config: str) -> list[dict]:
  """get_sweep() of the config file named by `--config` (its `:arg` ignored)."""
  path = config.split(':')[0]
  if not os.path.isfile(path):
    raise SystemExit(f'sweep: no config file {path}')
  spec = importlib.util.spec_from_file_location('swept_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)   # `from experiments import common` finds the repo root on sys.path
  if not hasattr(module, 'get_sweep'):
    raise SystemExit(f'sweep: {path} has no get_sweep(); nothing to sweep')
  return module.get_sweep()


def points(config: str, workdir: str) -> list[tuple[str, list[str]]]:
  """(name, rlhf_jax.main arguments) of every point: its workdir and its --config.<k>=<v>."""
  out = []
  for i, point in enumerate(load_sweep(config)):
    name = common.safe_name('_'.join([str(i), *(f'{k}={v}' for k, v in point.items())]))
    out.append((name, [f'--config={config}', f'--workdir={workdir.rstrip("/")}/{name}',
                       *(f'--config.{k}={v}' for k, v in point.items())]))
  return out


def main(argv=None):
  own, extra = common.split_argv(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
  p.add_argument('--launcher', choices=('local', 'tpu', 'slurm'), required=True)
  p.add_argument('--config', required=True, help='experiments/<file>.py[:arg]; the file has get_sweep()')
  p.add_argument('--workdir', required=True, help='each point runs in <workdir>/<i>_<k>=<v>...')
  p.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true', help='print, run nothing')
  args, rest = p.parse_known_args(own)
  launcher = {'local': local, 'tpu': tpu, 'slurm': slurm}[args.launcher]
  launcher_parser = launcher.parser()
  launcher_parser.prog = f'sweep.py --launcher={args.launcher}'
  if launcher is local:
    launcher_parser.set_defaults(processes=1)   # one plain process per point unless asked for more
  t = launcher_parser.parse_args(rest + ['--dry-run'] * args.dry_run)
  base = dict(vars(t))
  failed = []
  for i, (name, cmd) in enumerate(points(args.config, args.workdir)):
    cmd += extra
    if launcher is local and t.processes == 1:
      code = common.execute(common.command(cmd), args.dry_run)
    else:
      if launcher is local and base['log_dir']:
        t.log_dir = os.path.join(base['log_dir'], name)
      if launcher is tpu:   # the slice is created and given the code once
        t.run_name = f'{base["run_name"]}-{i}'
        t.create, t.no_sync = base['create'] and i == 0, base['no_sync'] or i > 0
      if launcher is slurm:
        t.job_name = f'{base["job_name"]}-{i}'
      code = launcher.run(t, cmd)
    if code:
      failed.append((name, code))
      print(f'sweep: point {name} failed with exit code {code}', file=sys.stderr)
  if failed:
    print(f'sweep: {len(failed)} point(s) failed: {", ".join(n for n, _ in failed)}', file=sys.stderr)
  sys.exit(failed[0][1] if failed else 0)


if __name__ == '__main__':
  main()
