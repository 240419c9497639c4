"""What the launch scripts share: the command a process runs, the TPU slice table, printing."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])

# Cloud TPU accelerator types (gcloud's names), per family: what the number in the name counts, the
# chips of one host (TPU VM, a gcloud "worker") in a multi-host slice, the most chips one host holds,
# and the runtime version Google recommends for JAX (cloud.google.com/tpu/docs/runtimes).
#
#   accelerator                    chips  hosts  e.g.
#   v4-N, v5p-N (N TensorCores)     N/2    N/8   v4-8: 4 chips, 1 host; v4-64: 32 chips, 8 hosts
#   v5litepod-N, v6e-N, N <= 8       N      1    v6e-8: one host of 8 chips
#   v5litepod-N, v6e-N, N > 8        N     N/4   v5litepod-16: 4 hosts; v6e-256: 64 hosts
TPUS = {
  'v4': ('cores', 4, 4, 'tpu-ubuntu2204-base'),
  'v5p': ('cores', 4, 4, 'v2-alpha-tpuv5'),
  'v5litepod': ('chips', 4, 8, 'v2-alpha-tpuv5-lite'),
  'v6e': ('chips', 4, 8, 'v2-alpha-tpuv6e'),
}


def tpu_slice(accelerator: str) -> tuple[int, int, str]:
  """(chips, hosts, runtime version) of an accelerator type such as 'v4-64'; unknown names fail."""
  family, _, n = accelerator.rpartition('-')
  if family not in TPUS or not n.isdigit():
    raise ValueError(f'unknown TPU accelerator {accelerator!r}; known: '
                     f'{", ".join(f + "-N" for f in TPUS)} (e.g. v4-64, v5litepod-16, v6e-8)')
  counts, per_host, most, version = TPUS[family]
  chips = int(n) // 2 if counts == 'cores' else int(n)
  if chips < 1 or (counts == 'cores' and int(n) % 2) or (chips > most and chips % per_host):
    raise ValueError(f'{accelerator!r} is not a {family} slice size')
  return chips, 1 if chips <= most else chips // per_host, version


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
  """(the launcher's own arguments, CMD): CMD is everything after the first `--`."""
  if '--' not in argv:
    return argv, []
  i = argv.index('--')
  return argv[:i], argv[i + 1:]


def _check(cmd):
  if not cmd:
    raise SystemExit('no command: give it after `--`, e.g. '
                     '`-- --config=experiments/sft.py:smoke --workdir=runs/x`')


def command(cmd: list[str]) -> list[str]:
  """CMD as given, or `python -m rlhf_jax.main CMD` (this interpreter) when CMD starts with a flag."""
  _check(cmd)
  return [sys.executable, '-m', 'rlhf_jax.main', *cmd] if cmd[0].startswith('-') else list(cmd)


def command_line(cmd: list[str], python: str) -> str:
  """CMD as one shell line for another machine; `python` is shell text there (e.g. ~/venv/bin/python)."""
  _check(cmd)
  return f'{python} -m rlhf_jax.main {shlex.join(cmd)}' if cmd[0].startswith('-') else shlex.join(cmd)


def flag(cmd: list[str], name: str) -> str | None:
  """The value of `--name=V` or `--name V` in cmd, else None."""
  for i, a in enumerate(cmd):
    if a.startswith(f'--{name}='):
      return a.split('=', 1)[1]
    if a == f'--{name}' and i + 1 < len(cmd):
      return cmd[i + 1]
  return None


def env_line(env: dict[str, str], cmd: list[str]) -> str:
  """`A=1 B='x y' cmd ...`: only the values are quoted, so the shell still reads assignments."""
  return ' '.join([*(f'{k}={shlex.quote(v)}' for k, v in env.items()), shlex.join(cmd)])


def execute(cmd: list[str] | str, dry_run: bool) -> int:
  """Print a command (a list, or a str run by the shell) and run it unless dry_run; its exit code.

  A dry run prints the bare commands on stdout; a real one echoes them, `+ ` first, on stderr."""
  line = cmd if isinstance(cmd, str) else shlex.join(cmd)
  print(line if dry_run else f'+ {line}', file=sys.stdout if dry_run else sys.stderr, flush=True)
  return 0 if dry_run else subprocess.run(cmd, shell=isinstance(cmd, str)).returncode


def safe_name(text: str) -> str:
  """A file-name-safe version of text (sweep points' workdirs, run names)."""
  return re.sub(r'[^A-Za-z0-9._=+-]', '_', text)
