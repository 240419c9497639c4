"""Plain-Python parsers for the real-data source formats, one per format.

The TFDS builders (`builders.py`) are thin shells around these functions, so everything that
decides *what a record is* lives here, in code that needs neither TFDS nor TensorFlow and can be
called directly from a notebook or a test.

Every reader yields plain dicts of Python values:

  demonstration  {'prompt': str, 'response': str, 'id': str, 'group': str}
  ranking        {'prompt': str, 'responses': [str, ...] best first, 'k': int, 'id', 'group'}
  document       {'text': str, 'id': str, 'group': str}

`id` is a stable, unique name for the record that points back to its source (file and line, or
message id), used as the TFDS example key and for debugging. `group` is a 16-hex-digit hash of
the text that decides the record's train/test split (see `builders.split_of`): it is computed
from a *prefix* of the prompt (the Self-Instruct instruction, the first human turn of an HH-RLHF
transcript, the root message of an OpenAssistant tree), so equal prompts always share a group and
hence a split, and so do all the turns of one conversation (no test prompt extends a train one).

Errors. Malformed input raises `DataError` (a `ValueError`) whose message starts with
`path:line:` (e.g. `/data/seed_tasks.jsonl:17: invalid JSON (...)`, `...:3: missing field
'instances'`). Records that are well formed but unusable (an OpenAssistant reply without a rank,
an HH-RLHF pair whose two answers are identical, ...) are skipped, never silently: each reader
takes an optional `stats` Counter and adds one count per reason, so callers can log what was
dropped. Files ending in `.gz` are read as gzip; Git LFS pointer files (what a clone without LFS
holds instead of the data) are recognised and reported as such.

Chat format. OpenAssistant conversations are rendered like HH-RLHF transcripts, with the roles
named `User` and `Assistant`:

  "User: <first message>\\n\\nAssistant: <reply>\\n\\nUser: <follow-up>\\n\\nAssistant:"

A chat prompt always ends with the assistant cue `Assistant:` (no trailing space) and its
responses start with the separating space, exactly as HH-RLHF splits its transcripts, so that
`prompt + response` is the transcript and the input pipeline can concatenate the two as is.
"""
from __future__ import annotations

import collections
import contextlib
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TextIO

__all__ = [
    'DataError', 'group_key', 'open_text', 'read_jsonl',
    'self_instruct',
    'oasst_trees', 'oasst_demonstrations', 'oasst_rankings', 'render_conversation',
    'USER', 'ASSISTANT', 'ASSISTANT_CUE',
    'hh_rlhf', 'hh_rlhf_demonstrations', 'hh_rlhf_comparisons', 'split_transcript', 'HH_CUE',
    'plain_text', 'EOT',
]

Stats = collections.Counter

USER = 'User'
ASSISTANT = 'Assistant'
ASSISTANT_CUE = f'{ASSISTANT}:'
HH_CUE = '\n\nAssistant:'
EOT = '<|endoftext|>'

_LFS_MAGIC = b'version https://git-lfs'


class DataError(ValueError):
  """Malformed input; the message starts with `path:line:` (or `path:` for whole-file faults)."""


def _bump(stats: Stats | None, key: str, n: int = 1) -> None:
  if stats is not None:
    stats[key] += n


def group_key(text: str) -> str:
  """Stable 64-bit hash (16 hex digits) of `text`; the same on every machine and Python run
  (unlike `hash()`), so splits derived from it never move."""
  return hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]


# ----------------------------------------------------------------------------
# Files.


@contextlib.contextmanager
def open_text(path: str | os.PathLike[str]) -> Iterator[TextIO]:
  """Opens a UTF-8 text file, gunzipping when the name ends in `.gz`.

  Fails with a message naming the file when it is missing, is a Git LFS pointer instead of the
  data, or is not gzip data despite its suffix: each of these otherwise surfaces as a confusing
  decode error deep inside a parser.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  with open(path, 'rb') as raw:
    head = raw.read(len(_LFS_MAGIC))
  if head == _LFS_MAGIC:
    raise DataError(f'{path}: is a Git LFS pointer, not the data (fetch it with `git lfs pull`)')
  if path.endswith('.gz'):
    if head[:2] != b'\x1f\x8b':
      raise DataError(f'{path}: not gzip data although the name ends in .gz')
    stream: TextIO = io.TextIOWrapper(gzip.open(path, 'rb'), encoding='utf-8', newline='')
  else:
    stream = open(path, encoding='utf-8', newline='')
  with stream:
    yield stream


def _lines(path: str, stream: TextIO) -> Iterator[tuple[int, str]]:
  """(1-based line number, line) pairs; decoding faults name the line where they happen."""
  lineno = 0
  try:
    for lineno, line in enumerate(stream, 1):
      yield lineno, line
  except UnicodeDecodeError as e:
    raise DataError(f'{path}:{lineno + 1}: not valid UTF-8 ({e.reason})') from e
  except (EOFError, gzip.BadGzipFile, OSError) as e:
    raise DataError(f'{path}:{lineno + 1}: corrupt or truncated gzip data ({e})') from e


def read_jsonl(path: str | os.PathLike[str],
               stats: Stats | None = None) -> Iterator[tuple[int, Any]]:
  """(line number, parsed JSON value) for each non-blank line of a JSON Lines file."""
  path = os.fspath(path)
  with open_text(path) as f:
    for lineno, line in _lines(path, f):
      if not line.strip():
        _bump(stats, 'blank_lines')
        continue
      try:
        value = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f'{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})') from e
      yield lineno, value


def _field(obj: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
  """obj[name], checked for presence and type; `where` is the `path:line[: ...]` prefix."""
  if not isinstance(obj, dict):
    raise DataError(f'{where}: expected a JSON object, got {type(obj).__name__}')
  if name not in obj:
    raise DataError(f"{where}: missing field '{name}'")
  value = obj[name]
  if not isinstance(value, kind):
    want = kind.__name__ if isinstance(kind, type) else ' or '.join(k.__name__ for k in kind)
    raise DataError(f"{where}: field '{name}' is {type(value).__name__}, expected {want}")
  return value


# ----------------------------------------------------------------------------
# Self-Instruct seed tasks.


def self_instruct(path: str | os.PathLike[str],
                  stats: Stats | None = None) -> Iterator[dict[str, str]]:
  """Demonstrations from Self-Instruct `seed_tasks.jsonl`, one per instance of each task.

  prompt = instruction, plus "\\n\\n" + input when the input is not blank; response = output.
  The split group is the instruction, so all instances of one task share a split. Instances
  with a blank output are skipped (`empty_output`).
  """
  path = os.fspath(path)
  for lineno, task in read_jsonl(path, stats):
    where = f'{path}:{lineno}'
    instruction = _field(task, 'instruction', str, where)
    instances = _field(task, 'instances', list, where)
    if not instances:
      raise DataError(f"{where}: field 'instances' is empty")
    task_id = task.get('id') or f'line{lineno}'
    group = group_key(instruction)
    _bump(stats, 'tasks')
    for j, inst in enumerate(instances):
      inst_where = f'{where}: instances[{j}]'
      inp = _field(inst, 'input', str, inst_where)
      out = _field(inst, 'output', str, inst_where)
      if not out.strip():
        _bump(stats, 'empty_output')
        continue
      prompt = f'{instruction}\n\n{inp}' if inp.strip() else instruction
      _bump(stats, 'demonstrations')
      yield {'prompt': prompt, 'response': out, 'id': f'{task_id}/{j}', 'group': group}


# ----------------------------------------------------------------------------
# OpenAssistant message trees.

_ROLES = {'prompter': USER, 'assistant': ASSISTANT}


def render_conversation(turns: Sequence[tuple[str, str]]) -> str:
  """Turns [(role, text)] (role 'prompter' or 'assistant') as a prompt ending in the cue.

  "User: a\\n\\nAssistant: b\\n\\nUser: c\\n\\nAssistant:"
  """
  parts = [f'{_ROLES[role]}: {text}' for role, text in turns]
  parts.append(ASSISTANT_CUE)
  return '\n\n'.join(parts)


def _check_node(node: Any, where: str) -> str:
  """Validates the fields a node must have; returns `where` extended by the message id."""
  message_id = _field(node, 'message_id', str, where)
  where = f'{where}: message {message_id}'
  _field(node, 'text', str, where)
  role = _field(node, 'role', str, where)
  if role not in _ROLES:
    raise DataError(f"{where}: field 'role' is {role!r}, expected 'prompter' or 'assistant'")
  if 'replies' in node:  # absent on leaves in some exports
    _field(node, 'replies', list, where)
  rank = node.get('rank')
  if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
    raise DataError(f"{where}: field 'rank' is {rank!r}, expected an integer or null")
  return where


def _usable(node: dict, stats: Stats | None) -> bool:
  """Whether a node and its subtree are used: deleted messages, and messages that failed review
  (`review_result` false: spam, off-topic), are skipped with everything below them."""
  if node.get('deleted'):
    _bump(stats, 'deleted_messages')
    _bump(stats, 'messages_below_skipped', _count_nodes(node) - 1)
    return False
  if node.get('review_result') is False:
    _bump(stats, 'failed_review_messages')
    _bump(stats, 'messages_below_skipped', _count_nodes(node) - 1)
    return False
  return True


def _count_nodes(node: dict) -> int:
  return 1 + sum(_count_nodes(r) for r in node.get('replies', []) if isinstance(r, dict))


def oasst_trees(path: str | os.PathLike[str],
                stats: Stats | None = None) -> Iterator[tuple[str, dict]]:
  """Validated message trees from an OpenAssistant trees file (`en_100_tree.jsonl`, or the full
  release `*.trees.jsonl.gz`), one per line, as (`path:line`, tree).

  Every node is checked (message_id, text, role, replies, integer-or-null rank; replies have the
  other role than their parent) before anything is yielded from the tree, so a bad node fails
  with its file, line and message id rather than midway through a build.
  """
  path = os.fspath(path)
  for lineno, tree in read_jsonl(path, stats):
    where = f'{path}:{lineno}'
    root = _field(tree, 'prompt', dict, where)
    stack = [(root, where, None)]
    while stack:
      node, parent_where, parent_role = stack.pop()
      node_where = _check_node(node, parent_where)
      node.setdefault('replies', [])
      if parent_role is None and node['role'] != 'prompter':
        raise DataError(f'{node_where}: the root message must have role prompter')
      if parent_role is not None and node['role'] == parent_role:
        raise DataError(f"{node_where}: a reply has the same role ({parent_role}) as its parent")
      stack.extend((r, where, node['role']) for r in node['replies'])
    _bump(stats, 'trees')
    _bump(stats, 'messages', _count_nodes(root))
    yield where, tree


def _oasst_turns(path: str, stats: Stats | None
                 ) -> Iterator[tuple[str, str, list[tuple[str, str]], dict, list[dict]]]:
  """For each usable prompter message: (tree id, split group, conversation up to and including
  it, the message, its usable assistant replies)."""
  for where, tree in oasst_trees(path, stats):
    root = tree['prompt']
    tree_id = tree.get('message_tree_id') or root['message_id']
    group = group_key(root['text'])
    if not _usable(root, stats):
      continue
    stack: list[tuple[dict, list[tuple[str, str]]]] = [(root, [])]
    while stack:
      node, history = stack.pop()
      turns = history + [(node['role'], node['text'])]
      replies = [r for r in node['replies'] if _usable(r, stats)]
      if node['role'] == 'prompter':
        _bump(stats, 'prompter_messages')
        yield tree_id, group, turns, node, replies
      # Reversed so that the stack pops replies in file order (stable record order).
      stack.extend((r, turns) for r in reversed(replies))


def oasst_demonstrations(path: str | os.PathLike[str],
                         stats: Stats | None = None) -> Iterator[dict[str, str]]:
  """Demonstrations: for each user message, its best-ranked assistant reply (rank 0, or the
  lowest rank left after deleted replies are dropped), with the conversation so far as prompt.

  User messages with no reply are counted as `demo_no_reply`; with replies but none ranked (in
  particular a single, unranked reply: nobody compared it with anything) as `demo_no_ranked_reply`;
  with two replies sharing the best rank as `demo_tied_best`. The response carries the separating
  leading space (see the module docstring).
  """
  path = os.fspath(path)
  for tree_id, group, turns, _, replies in _oasst_turns(path, stats):
    if not replies:
      _bump(stats, 'demo_no_reply')
      continue
    ranked = [r for r in replies if r.get('rank') is not None]
    if not ranked:
      _bump(stats, 'demo_no_ranked_reply')
      continue
    best_rank = min(r['rank'] for r in ranked)
    best = [r for r in ranked if r['rank'] == best_rank]
    if len(best) > 1:
      _bump(stats, 'demo_tied_best')
      continue
    _bump(stats, 'demonstrations')
    yield {'prompt': render_conversation(turns), 'response': ' ' + best[0]['text'],
           'id': f'{tree_id}/{best[0]["message_id"]}', 'group': group}


def oasst_rankings(path: str | os.PathLike[str], stats: Stats | None = None, *,
                   keep_partial: bool = False) -> Iterator[dict[str, Any]]:
  """K-way rankings: each set of >= 2 sibling assistant replies that humans ranked completely,
  best first (ascending `rank`), with the conversation so far as prompt; k = number of replies.

  Skipped and counted:
    * `unranked_replies`: replies with rank null (not part of any ranking), in every group;
    * `groups_partial`: groups where some replies are ranked and some are not. The ranked ones
      were ranked against each other only, so with `keep_partial=True` they are kept as a
      smaller K-way ranking; by default such groups are dropped so every ranking is complete;
    * `groups_unranked`: groups of >= 2 replies with no ranks at all;
    * `groups_tied`: groups in which two replies share a rank value. A tie is not a preference,
      and the reward-model loss treats every pair of a ranking as one, so the whole group is
      dropped rather than given an arbitrary order.
  Deleted / failed-review replies are removed first (`deleted_messages`, ...); their remaining
  siblings keep their relative order. `k=<K>` counts the rankings kept per K.
  """
  path = os.fspath(path)
  for tree_id, group, turns, node, replies in _oasst_turns(path, stats):
    ranked = [r for r in replies if r.get('rank') is not None]
    n_unranked = len(replies) - len(ranked)
    _bump(stats, 'unranked_replies', n_unranked)
    if len(replies) < 2:
      continue
    if not ranked:
      _bump(stats, 'groups_unranked')
      continue
    if n_unranked:
      _bump(stats, 'groups_partial')
      if not keep_partial:
        continue
    if len(ranked) < 2:
      continue
    ranks = [r['rank'] for r in ranked]
    if len(set(ranks)) != len(ranks):
      _bump(stats, 'groups_tied')
      continue
    ranked.sort(key=lambda r: r['rank'])
    k = len(ranked)
    _bump(stats, 'rankings')
    _bump(stats, f'k={k}')
    yield {'prompt': render_conversation(turns), 'responses': [' ' + r['text'] for r in ranked],
           'k': k, 'id': f'{tree_id}/{node["message_id"]}', 'group': group}


# ----------------------------------------------------------------------------
# Anthropic HH-RLHF.


def split_transcript(transcript: str) -> tuple[str, str] | None:
  """"\\n\\nHuman: ...\\n\\nAssistant: x" -> (everything up to and including the last
  "\\n\\nAssistant:", the final response " x"); None when there is no assistant turn."""
  i = transcript.rfind(HH_CUE)
  if i < 0:
    return None
  cut = i + len(HH_CUE)
  return transcript[:cut], transcript[cut:]


def _first_turn(prompt: str) -> str:
  """The transcript up to its first assistant cue: the opening human turn, the split group."""
  return prompt[:prompt.find(HH_CUE)]


def hh_rlhf(path: str | os.PathLike[str],
            stats: Stats | None = None) -> Iterator[dict[str, str]]:
  """Pairs from an HH-RLHF file (`{train,test}.jsonl.gz`): {'prompt', 'chosen', 'rejected',
  'id', 'group'}, the two responses being the final assistant turns of the two transcripts.

  The transcripts are meant to share everything up to the last assistant turn. Where they do
  not (`prompt_mismatch`: in practice one side holds two assistant turns, or an "Assistant:
  Human: ..." turn), or one has no assistant turn (`no_assistant_turn`), the pair is skipped:
  there is no single prompt both responses answer.
  """
  path = os.fspath(path)
  name = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
  for lineno, obj in read_jsonl(path, stats):
    where = f'{path}:{lineno}'
    chosen = split_transcript(_field(obj, 'chosen', str, where))
    rejected = split_transcript(_field(obj, 'rejected', str, where))
    _bump(stats, 'pairs_read')
    if chosen is None or rejected is None:
      _bump(stats, 'no_assistant_turn')
      continue
    if chosen[0] != rejected[0]:
      _bump(stats, 'prompt_mismatch')
      continue
    yield {'prompt': chosen[0], 'chosen': chosen[1], 'rejected': rejected[1],
           'id': f'{name}:{lineno}', 'group': group_key(_first_turn(chosen[0]))}


def hh_rlhf_demonstrations(path: str | os.PathLike[str],
                           stats: Stats | None = None) -> Iterator[dict[str, str]]:
  """Demonstrations from the `chosen` side: prompt + response is the chosen transcript.

  Chosen responses that are blank (the labeler preferred silence over the alternative: a
  valid comparison, but nothing to imitate) are skipped (`empty_chosen`).
  """
  for pair in hh_rlhf(path, stats):
    if not pair['chosen'].strip():
      _bump(stats, 'empty_chosen')
      continue
    _bump(stats, 'demonstrations')
    yield {'prompt': pair['prompt'], 'response': pair['chosen'], 'id': pair['id'],
           'group': pair['group']}


def hh_rlhf_comparisons(path: str | os.PathLike[str],
                        stats: Stats | None = None) -> Iterator[dict[str, Any]]:
  """K = 2 rankings [chosen, rejected]. Pairs whose final turns are identical carry no
  preference and are skipped (`ties`)."""
  for pair in hh_rlhf(path, stats):
    if pair['chosen'] == pair['rejected']:
      _bump(stats, 'ties')
      continue
    _bump(stats, 'comparisons')
    yield {'prompt': pair['prompt'], 'responses': [pair['chosen'], pair['rejected']], 'k': 2,
           'id': pair['id'], 'group': pair['group']}


# ----------------------------------------------------------------------------
# Plain text (pretraining corpora).

_SNIFF_CHARS = 1 << 20


def _sniff_mode(path: str) -> str:
  """'eot' if the first MiB holds an <|endoftext|> separator, else 'paragraphs'. Only a prefix
  is read so that multi-GB corpora are not scanned twice."""
  with open_text(path) as f:
    try:
      head = f.read(_SNIFF_CHARS)
    except UnicodeDecodeError as e:
      raise DataError(f'{path}: not valid UTF-8 near the start ({e.reason})') from e
  return 'eot' if EOT in head else 'paragraphs'


def _documents(path: str, mode: str, chunk_chars: int) -> Iterator[str]:
  """Raw (unstripped) documents of one file, streamed line by line."""
  buf: list[str] = []
  size = 0
  with open_text(path) as f:
    for _, line in _lines(path, f):
      if mode == 'eot':
        *done, rest = line.split(EOT)
        for piece in done:
          buf.append(piece)
          yield ''.join(buf)
          buf = []
        buf.append(rest)
      elif mode == 'paragraphs':
        if line.strip():
          buf.append(line)
        elif buf:
          yield ''.join(buf)
          buf = []
      else:  # chunks
        buf.append(line)
        size += len(line)
        if size >= chunk_chars:
          yield ''.join(buf)
          buf, size = [], 0
  if buf:
    yield ''.join(buf)


def plain_text(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
               stats: Stats | None = None, *, mode: str = 'auto',
               chunk_chars: int = 4096) -> Iterator[dict[str, str]]:
  """Documents {'text', 'id', 'group'} from plain UTF-8 text files (gzip if `.gz`).

  mode:
    'eot': split on `<|endoftext|>` (TinyStories, GPT-2-style dumps);
    'paragraphs': split on blank lines (tiny-shakespeare: one speech per document);
    'chunks': whole lines gathered until a document reaches `chunk_chars` characters;
    'auto' (default): per file, 'eot' if the separator occurs in its first MiB, else
      'paragraphs'.
  Documents are stripped of surrounding whitespace; empty ones (e.g. after a trailing
  separator) are skipped and counted (`empty_documents`). id = `<file name>#<index>`; the split
  group is the text itself, so duplicate documents share a split.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  if mode not in ('auto', 'eot', 'paragraphs', 'chunks'):
    raise ValueError(f"mode={mode!r}: expected 'auto', 'eot', 'paragraphs' or 'chunks'")
  for path in map(os.fspath, paths):
    file_mode = _sniff_mode(path) if mode == 'auto' else mode
    _bump(stats, f'files_{file_mode}')
    index = 0
    for raw in _documents(path, file_mode, chunk_chars):
      text = raw.strip()
      if not text:
        _bump(stats, 'empty_documents')
        continue
      _bump(stats, 'documents')
      yield {'text': text, 'id': f'{os.path.basename(path)}#{index}', 'group': group_key(text)}
      index += 1
