"""Readers and TFDS builders on the real files in ../shared/data.

Every expectation is computed here independently of the code under test (json / gzip on the raw
files, a separate walk of the OpenAssistant trees), so a wrong parser cannot agree with itself.
The whole data folder is optional: without it every test here skips, naming the path.
"""
from __future__ import annotations

import collections
import gzip
import importlib.util
import json
import pickle
import re
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
SELF_INSTRUCT = 'sft/self-instruct/seed_tasks.jsonl'
OASST = 'preferences/oasst1-en100/en_100_tree.jsonl'
HH = 'preferences/hh-rlhf/harmless-base/test.jsonl.gz'
SHAKESPEARE = 'pretrain/tinyshakespeare/input.txt'
TINYSTORIES = 'pretrain/tinystories/tinystories_sample.txt'

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f'real data folder {DATA} is absent')

from rlhf_jax.data import builders, readers  # noqa: E402

# builder name -> the source file it reads.
SOURCES = {
    'self_instruct_demos': SELF_INSTRUCT,
    'oasst_demos': OASST,
    'oasst_rankings': OASST,
    'hh_rlhf_demos': HH,
    'hh_rlhf_comparisons': HH,
    'plain_text_corpus/tinyshakespeare': SHAKESPEARE,
    'plain_text_corpus/tinystories': TINYSTORIES,
}
READERS = {
    'self_instruct_demos': readers.self_instruct,
    'oasst_demos': readers.oasst_demonstrations,
    'oasst_rankings': readers.oasst_rankings,
    'hh_rlhf_demos': readers.hh_rlhf_demonstrations,
    'hh_rlhf_comparisons': readers.hh_rlhf_comparisons,
    'plain_text_corpus/tinyshakespeare': readers.plain_text,
    'plain_text_corpus/tinystories': readers.plain_text,
}
MANIFEST_K = {2: 57, 3: 116, 4: 27, 5: 3, 6: 6, 8: 1, 9: 1}


def _need(rel: str) -> Path:
  path = DATA / rel
  if not path.is_file():
    pytest.skip(f'data file {path} is absent')
  return path


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> Path:
  """One data_dir for the module, every builder prepared into it once (a few seconds)."""
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  out = tmp_path_factory.mktemp('tfds')
  for name, rel in SOURCES.items():
    _need(rel)
    builders.prepare(name, DATA, out)
  return out


def _splits(name: str, data_dir: Path) -> dict[str, list[dict]]:
  return {s: list(builders.load(name, s, data_dir=data_dir)) for s in builders.SPLITS}


def _all(name: str, data_dir: Path) -> list[dict]:
  parts = _splits(name, data_dir)
  return parts['train'] + parts['test']


# ----------------------------------------------------------------------------
# Storage: array_record, no TensorFlow, records equal to the readers'.


def test_no_tensorflow(data_dir):
  assert importlib.util.find_spec('tensorflow') is None
  assert 'tensorflow' not in sys.modules


@pytest.mark.parametrize('name', list(SOURCES))
def test_prepared_as_array_record_equal_to_reader(name, data_dir):
  version_dir = data_dir / name / '1.0.0'
  base = name.split('/')[0]
  for split in builders.SPLITS:
    files = list(version_dir.glob(f'{base}-{split}.array_record-*'))
    assert files and all(f.stat().st_size > 0 for f in files), (version_dir, split)
  assert not list(version_dir.glob('*.tfrecord*'))

  expected = list(READERS[name](DATA / SOURCES[name]))
  parts = _splits(name, data_dir)
  for split in builders.SPLITS:
    assert parts[split] == [r for r in expected if builders.split_of(r['group']) == split]
  assert parts['train'] and parts['test']
  ids = [r['id'] for r in expected]
  assert len(set(ids)) == len(ids)
  # Python types, not bytes / numpy, for the tokenizer and grain.
  record = parts['train'][0]
  assert all(isinstance(v, (str, int, list)) for v in record.values())
  if 'k' in record:
    assert type(record['k']) is int and all(type(r) is str for r in record['responses'])


def test_reader_stats_saved_with_data(data_dir):
  fresh = builders.builder('oasst_rankings', data_dir)  # reads dataset_info from disk
  stats = fresh.info.metadata['reader_stats']['all']
  assert stats['rankings'] == sum(MANIFEST_K.values())
  assert fresh.info.metadata['sources'] == [OASST]
  assert fresh.info.splits['train'].num_examples + fresh.info.splits['test'].num_examples == 211


def test_records_source_protocol(data_dir):
  ds = builders.load('oasst_rankings', 'test', data_dir=data_dir)
  assert ds[-1] == ds[len(ds) - 1]
  assert ds.__getitems__([0, 2]) == [ds[0], ds[2]]
  again = pickle.loads(pickle.dumps(ds))
  assert len(again) == len(ds) and again[1] == ds[1]
  with pytest.raises(IndexError):
    ds[len(ds)]
  assert len(builders.load('oasst_rankings', 'train[:10]', data_dir=data_dir)) == 10


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='not prepared'):
    builders.load('oasst_rankings', 'train', data_dir=tmp_path)
  with pytest.raises(ValueError, match='unknown builder'):
    builders.builder('no_such_builder', tmp_path)
  with pytest.raises(ValueError, match='needs a config'):
    builders.builder('plain_text_corpus', tmp_path)
  with pytest.raises(FileNotFoundError, match='seed_tasks.jsonl'):
    (tmp_path / 'manual').mkdir()
    (tmp_path / 'manual' / 'unrelated.txt').write_text('x')
    builders.prepare('self_instruct_demos', tmp_path / 'manual', tmp_path / 'out')


# ----------------------------------------------------------------------------
# Self-Instruct.


def test_self_instruct_against_json(data_dir):
  tasks = [json.loads(line) for line in _need(SELF_INSTRUCT).read_text().splitlines()]
  records = {r['id']: r for r in _all('self_instruct_demos', data_dir)}
  assert len(records) == sum(len(t['instances']) for t in tasks) == 175
  for task in tasks[::17]:
    inst = task['instances'][0]
    r = records[f"{task['id']}/0"]
    want = task['instruction'] + ('\n\n' + inst['input'] if inst['input'] else '')
    assert (r['prompt'], r['response']) == (want, inst['output'])
  with_input = [t for t in tasks if t['instances'][0]['input']]
  assert with_input and records[f"{with_input[0]['id']}/0"]['prompt'].count('\n\n') >= 1


# ----------------------------------------------------------------------------
# OpenAssistant: an independent walk of the trees.


def _oasst_reference():
  """Per user message id: (tree id, expected prompt, replies as (rank, text, id) sorted)."""
  out = {}
  for line in _need(OASST).read_text().splitlines():
    tree = json.loads(line)
    todo = [(tree['prompt'], '')]
    while todo:
      node, so_far = todo.pop()
      assert not node['deleted']  # this snapshot has none; the reader would drop them
      name = 'User' if node['role'] == 'prompter' else 'Assistant'
      convo = f"{so_far}{name}: {node['text']}\n\n"
      if node['role'] == 'prompter':
        replies = [(r.get('rank'), r['text'], r['message_id']) for r in node['replies']]
        out[node['message_id']] = (tree['message_tree_id'], convo + 'Assistant:', replies)
      todo.extend((r, convo) for r in node['replies'])
  return out


def test_oasst_rankings_against_trees(data_dir):
  ref = _oasst_reference()
  complete = {m: v for m, v in ref.items()
              if len(v[2]) >= 2 and all(rank is not None for rank, _, _ in v[2])}
  k_ref = collections.Counter(len(v[2]) for v in complete.values())
  assert k_ref == MANIFEST_K  # the manifest's K distribution, recounted from the trees

  records = _all('oasst_rankings', data_dir)
  assert collections.Counter(r['k'] for r in records) == k_ref
  assert len(records) == 211
  for r in records:
    tree_id, user_id = r['id'].split('/')
    want_tree, want_prompt, replies = complete[user_id]
    assert tree_id == want_tree
    assert r['prompt'] == want_prompt and r['prompt'].endswith('\n\nAssistant:')
    assert r['prompt'].startswith('User: ')
    best_first = [' ' + text for _, text, _ in sorted(replies, key=lambda x: x[0])]
    assert r['responses'] == best_first and r['k'] == len(best_first)
  assert max(r['prompt'].count('\nUser: ') for r in records) >= 1  # multi-turn prompts exist


def test_oasst_skips_are_counted():
  stats = collections.Counter()
  ranked = list(readers.oasst_rankings(_need(OASST), stats))
  # One group is ranked [0, 1, 2, null]: dropped by default, a K=3 ranking if kept.
  assert stats['groups_partial'] == 1 and stats['unranked_replies'] >= 1
  partial = list(readers.oasst_rankings(_need(OASST), keep_partial=True))
  assert len(partial) == len(ranked) + 1
  assert collections.Counter(r['k'] for r in partial)[3] == MANIFEST_K[3] + 1


def test_oasst_deleted_and_tied(tmp_path):
  tree = {'message_tree_id': 't', 'prompt': {
      'message_id': 'q', 'role': 'prompter', 'text': 'Q?', 'replies': [
          {'message_id': 'a', 'role': 'assistant', 'text': 'A', 'rank': 1, 'replies': []},
          {'message_id': 'b', 'role': 'assistant', 'text': 'B', 'rank': 1, 'replies': []},
          {'message_id': 'c', 'role': 'assistant', 'text': 'C', 'rank': 0, 'deleted': True,
           'replies': [{'message_id': 'd', 'role': 'prompter', 'text': 'D', 'replies': []}]},
      ]}}
  path = tmp_path / 'trees.jsonl'
  path.write_text(json.dumps(tree) + '\n')
  stats = collections.Counter()
  assert list(readers.oasst_rankings(path, stats)) == []
  assert stats['groups_tied'] == 1 and stats['deleted_messages'] == 1
  assert stats['messages_below_skipped'] == 1
  stats.clear()
  assert list(readers.oasst_demonstrations(path, stats)) == []
  assert stats['demo_tied_best'] == 1


def test_oasst_demonstrations_use_rank0(data_dir):
  ref = _oasst_reference()
  records = _all('oasst_demos', data_dir)
  with_rank0 = {m for m, v in ref.items() if any(rank == 0 for rank, _, _ in v[2])}
  assert len(records) == len(with_rank0) == 212
  by_reply = {rid: (m, rank, text) for m, v in ref.items() for rank, text, rid in v[2]}
  for r in records:
    user_id, rank, text = by_reply[r['id'].split('/')[1]]
    assert rank == 0 and r['response'] == ' ' + text
    assert r['prompt'] == ref[user_id][1]


# ----------------------------------------------------------------------------
# HH-RLHF.


def _hh_lines():
  with gzip.open(_need(HH), 'rt', encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_hh_comparisons_reconstruct_transcripts(data_dir):
  lines = _hh_lines()
  assert len(lines) == 2312
  cue = '\n\nAssistant:'
  def prefix(text):
    return text[:text.rfind(cue)]
  usable = [i for i, d in enumerate(lines, 1)
            if prefix(d['chosen']) == prefix(d['rejected']) and d['chosen'] != d['rejected']]
  records = _all('hh_rlhf_comparisons', data_dir)
  assert len(records) == len(usable) == 2307
  for r in records:
    line = lines[int(r['id'].rsplit(':', 1)[1]) - 1]
    assert r['k'] == 2 and len(r['responses']) == 2
    assert r['prompt'] + r['responses'][0] == line['chosen']
    assert r['prompt'] + r['responses'][1] == line['rejected']
    assert r['prompt'].endswith(cue) and cue not in r['responses'][0]


def test_hh_demonstrations(data_dir):
  lines = _hh_lines()
  records = _all('hh_rlhf_demos', data_dir)
  stats = collections.Counter()
  list(readers.hh_rlhf_demonstrations(_need(HH), stats))
  assert stats['prompt_mismatch'] == 5 and stats['empty_chosen'] == 4
  assert len(records) == len(lines) - 5 - 4
  for r in records:
    line = lines[int(r['id'].rsplit(':', 1)[1]) - 1]
    assert r['prompt'] + r['response'] == line['chosen'] and r['response'].strip()


# ----------------------------------------------------------------------------
# Plain text.


def test_plain_text_documents(data_dir):
  stories = _need(TINYSTORIES).read_text(encoding='utf-8')
  want = [d.strip() for d in stories.split('<|endoftext|>') if d.strip()]
  assert [r['text'] for r in _all('plain_text_corpus/tinystories', data_dir)] == [
      w for w in want if builders.split_of(readers.group_key(w)) == 'train'] + [
      w for w in want if builders.split_of(readers.group_key(w)) == 'test']
  assert len(want) == 5

  speeches = [p.strip() for p in re.split(r'\n\s*\n', _need(SHAKESPEARE).read_text()) if p.strip()]
  docs = _all('plain_text_corpus/tinyshakespeare', data_dir)
  assert sorted(d['text'] for d in docs) == sorted(speeches)
  assert len(docs) > 7000


def test_plain_text_chunks(tmp_path):
  path = tmp_path / 'a.txt'
  path.write_text(''.join(f'line {i}\n' for i in range(100)))
  docs = list(readers.plain_text(path, mode='chunks', chunk_chars=70))
  assert '\n'.join(d['text'] for d in docs) == path.read_text().strip()
  assert all(len(d['text']) <= 70 + 8 for d in docs) and len(docs) > 5


# ----------------------------------------------------------------------------
# Deterministic splits.


@pytest.mark.parametrize('name', list(SOURCES))
def test_split_is_a_function_of_the_prompt(name, data_dir):
  parts = _splits(name, data_dir)
  key = 'text' if name.startswith('plain') else 'prompt'
  train = {r[key] for r in parts['train']}
  test = {r[key] for r in parts['test']}
  assert not train & test
  assert not {r['id'] for r in parts['train']} & {r['id'] for r in parts['test']}
  n = len(parts['train']) + len(parts['test'])
  if n > 200:  # about TEST_FRACTION held out
    assert 0.04 < len(parts['test']) / n < 0.2, (len(parts['test']), n)


def test_split_is_stable_and_shared_across_builders(data_dir, tmp_path):
  again = builders.prepare('self_instruct_demos', DATA, tmp_path)
  assert again.data_dir != str(data_dir / 'self_instruct_demos' / '1.0.0')
  assert _splits('self_instruct_demos', tmp_path) == _splits('self_instruct_demos', data_dir)
  # Demonstrations and rankings of one conversation are held out together.
  demos, ranks = _splits('oasst_demos', data_dir), _splits('oasst_rankings', data_dir)
  demo_test = {r['prompt'] for r in demos['test']}
  rank_train = {r['prompt'] for r in ranks['train']}
  assert not demo_test & rank_train
  assert {r['prompt'] for r in ranks['test']} <= demo_test | {r['prompt'] for r in demos['train']}
  assert builders.split_of('0' * 16) == 'test' and builders.split_of('f' * 16) == 'train'


# ----------------------------------------------------------------------------
# Malformed input: the error names the file and the line.


def _write(path: Path, lines: list[str]) -> Path:
  text = ''.join(line + '\n' for line in lines)
  if path.suffix == '.gz':
    with gzip.open(path, 'wt', encoding='utf-8') as f:
      f.write(text)
  else:
    path.write_text(text, encoding='utf-8')
  return path


def _drop(line: str, field: str, nested: str | None = None) -> str:
  obj = json.loads(line)
  target = obj[nested] if nested else obj
  del target[field]
  return json.dumps(obj)


CASES = {
    'self_instruct': (SELF_INSTRUCT, readers.self_instruct, 'seed_tasks.jsonl',
                      lambda line: _drop(line, 'instances'), 'instances'),
    'oasst': (OASST, readers.oasst_rankings, 'en_100_tree.jsonl',
              lambda line: _drop(line, 'text', nested='prompt'), 'text'),
    'hh': (HH, readers.hh_rlhf_comparisons, 'test.jsonl.gz',
           lambda line: _drop(line, 'chosen'), 'chosen'),
}


def _source_lines(rel: str) -> list[str]:
  path = _need(rel)
  if path.suffix == '.gz':
    with gzip.open(path, 'rt', encoding='utf-8') as f:
      return f.read().splitlines()[:5]
  return path.read_text(encoding='utf-8').splitlines()[:5]


@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('fault', ['bad_json', 'missing_field'])
def test_malformed_line_is_named(case, fault, tmp_path):
  rel, reader, filename, drop, field = CASES[case]
  lines = _source_lines(rel)
  lines[2] = lines[2][:-7] if fault == 'bad_json' else drop(lines[2])
  path = _write(tmp_path / filename, lines)
  with pytest.raises(readers.DataError) as err:
    list(reader(path))
  message = str(err.value)
  assert message.startswith(f'{path}:3:'), message
  assert ('invalid JSON' if fault == 'bad_json' else f"missing field '{field}'") in message


def test_malformed_line_fails_the_build(tmp_path):
  lines = _source_lines(SELF_INSTRUCT)
  lines[2] = '{"id": "x", "instruction": "no instances"}'
  folder = tmp_path / 'manual' / 'sft' / 'self-instruct'
  folder.mkdir(parents=True)
  path = _write(folder / 'seed_tasks.jsonl', lines)
  with pytest.raises(ValueError, match=re.escape(f"{path}:3: missing field 'instances'")):
    builders.prepare('self_instruct_demos', tmp_path / 'manual', tmp_path / 'out')


def test_lfs_pointer_and_fake_gzip(tmp_path):
  pointer = tmp_path / 'train.jsonl.gz'
  pointer.write_text('version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 1\n')
  with pytest.raises(readers.DataError, match='Git LFS pointer'):
    list(readers.hh_rlhf(pointer))
  fake = tmp_path / 'x.jsonl.gz'
  fake.write_text('{}\n')
  with pytest.raises(readers.DataError, match='not gzip'):
    list(readers.hh_rlhf(fake))


def test_synthetic_builder_needs_no_files(tmp_path):
  """The embedded task prepares without a manual directory and reads back what the generator
  gives, split by split."""
  from rlhf_jax.data import builders, synthetic
  recs = builders.load('synthetic_demos', 'valid', data_dir=tmp_path)
  want = synthetic.sft_examples('valid')
  assert len(recs) == len(want)
  for i in (0, len(want) // 2, len(want) - 1):
    assert recs[i]['prompt'] == synthetic.format_prompt(want[i]['prompt'])
    assert recs[i]['response'] == want[i]['response']
  assert list(tmp_path.rglob('*.array_record*'))


@pytest.fixture(scope='module')
def synthetic_dir(tmp_path_factory) -> Path:
  """Both synthetic_rankings configs prepared once per test session (about 5 s each): under
  pytest-xdist the workers share one folder, the first to take the lock prepares it."""
  import fcntl
  import os
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  if 'PYTEST_XDIST_WORKER' not in os.environ:  # no xdist
    out = tmp_path_factory.mktemp('synthetic')
  else:  # the session's basetemp, shared by its workers (a fresh one per session)
    out = tmp_path_factory.getbasetemp().parent / 'synthetic'
    out.mkdir(exist_ok=True)
  with open(out / '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    for config in ('train', 'heldout'):
      builders.prepare(f'synthetic_rankings/{config}', None, out)  # no-op once prepared
  return out


def test_synthetic_rankings_equal_generator(synthetic_dir):
  """The `train` split of synthetic_rankings/train is synthetic.comparisons('train'), record by
  record, with formatted prompts."""
  from rlhf_jax.data import synthetic
  recs = builders.load('synthetic_rankings/train', 'train', data_dir=synthetic_dir)
  assert len(recs) == synthetic.DEFAULT_CONFIG.n_comparisons
  want = synthetic.comparisons('train', n=500)  # record i does not depend on n
  assert recs[:len(want)] == [
      {'prompt': synthetic.format_prompt(w['prompt']), 'responses': w['responses'],
       'k': len(w['responses']), 'id': f'train-{i}', 'group': w['family']}
      for i, w in enumerate(want)]
  assert recs[-1]['id'] == f'train-{len(recs) - 1}'
  assert all(len(builders.load('synthetic_rankings/train', s, data_dir=synthetic_dir))
             == len(synthetic.comparisons(s)) for s in ('valid', 'test', 'heldout'))


def test_synthetic_rankings_heldout_labeler_reorders_same_groups(synthetic_dir):
  """Both labelers rank the very same groups (same prompts and response sets, record by
  record), in a different order often enough to measure agreement on."""
  sizes = {len(builders.load(f'synthetic_rankings/{c}', 'train', data_dir=synthetic_dir))
           for c in ('train', 'heldout')}
  assert len(sizes) == 1
  part = 'train[:2000]'  # decoding costs ~0.2 ms a record: a fifth of the split is plenty
  train = builders.load('synthetic_rankings/train', part, data_dir=synthetic_dir)[:]
  held = builders.load('synthetic_rankings/heldout', part, data_dir=synthetic_dir)[:]
  assert len(held) == len(train) == 2000
  differ = 0
  for a, b in zip(train, held):
    assert (a['prompt'], a['id'], a['group'], a['k']) == (b['prompt'], b['id'], b['group'], b['k'])
    assert sorted(a['responses']) == sorted(b['responses'])
    differ += a['responses'] != b['responses']
  assert 0.05 < differ / len(train) < 1, differ


def test_synthetic_rankings_k_stats(synthetic_dir):
  """reader_stats (saved with the data) hold each split's K distribution, as recounted from
  the prepared records."""
  from rlhf_jax.data import synthetic
  stats = builders.builder('synthetic_rankings/train', synthetic_dir).info.metadata['reader_stats']
  assert set(stats) == set(synthetic.SPLITS)
  cfg = synthetic.DEFAULT_CONFIG
  for split in synthetic.SPLITS:
    src = builders.load('synthetic_rankings/train', split, data_dir=synthetic_dir)
    recs = src.__getitems__(range(len(src)))  # batched: faster than one by one
    ks = collections.Counter(r['k'] for r in recs)
    assert all(r['k'] == len(r['responses']) for r in recs)
    assert set(ks) <= set(range(cfg.k_min, cfg.k_max + 1)) and len(ks) > 1
    assert stats[split] == {'rankings': len(recs), **{f'k={k}': n for k, n in ks.items()}}
  # The held-out labeler ranks the same groups, so its K counts are the same.
  held = builders.builder('synthetic_rankings/heldout', synthetic_dir).info.metadata
  assert held['reader_stats'] == stats and held['labeler'] == 'heldout'
