"""Input pipelines (grain): tokenize, truncate, pad or pack, mask the loss, batch, shard per host.

Every pipeline is deterministic from its seed and checkpointable: the iterator's state
(`get_state()`, a small dict) is saved with the train state, and `set_state` on a fresh pipeline
continues with the next batch.

Several processes: the training streams are defined globally (one shuffle of all records from the
seed; global batch b is elements [b·G, (b+1)·G) of it) and process p yields rows
[p·G/n, (p+1)·G/n) of each global batch, encoding only those. So a run sees the same batches, and
ends with the same numbers, on any number of processes, and a saved position restores on another
number of processes. (Packed streams are packed globally by every process, which then keeps its
rows: packing needs every document's length.) Evaluation passes give each process a slice of the
records; their totals do not depend on how the records are split.

Batches are dicts of int32 [B, T] arrays, the model's inputs:
  tokens; mask (1 = real token); positions (restart at 0 per document); segments (document id
  within a packed row, 0 on padding); loss_mask (1 on the tokens whose prediction is trained:
  response tokens and the final EOS for demonstrations, every token after BOS for pretraining text).
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Mapping, Sequence

import grain
import grain.experimental as grain_exp
import jax
import numpy as np

from rlhf_jax import reward, tokenizers

FIELDS = ('tokens', 'mask', 'positions', 'segments', 'loss_mask')


@dataclasses.dataclass(frozen=True)
class Encoded:
  tokens: np.ndarray     # int32 [L]
  loss_mask: np.ndarray  # int32 [L]
  truncated: bool


def encode_demo(tok: tokenizers.Tokenizer, prompt: str, response: str, seq_len: int) -> Encoded:
  """[bos] prompt response [eos], with the loss on response + eos only.

  Too long: the prompt keeps its end (at least half the budget, or all of it if shorter), then
  the response keeps its start; `truncated` says so (the pipeline counts and logs these).
  """
  p = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
  r = tok.encode(response) + [tok.eos_id]
  truncated = len(p) + len(r) > seq_len
  if truncated:
    keep_p = min(len(p), max(seq_len - len(r), seq_len // 2))
    p = p[len(p) - keep_p:]
    r = r[:seq_len - keep_p]
  tokens = np.asarray(p + r, np.int32)
  loss = np.concatenate([np.zeros(len(p), np.int32), np.ones(len(r), np.int32)])
  return Encoded(tokens, loss, truncated)


def encode_text(tok: tokenizers.Tokenizer, text: str, seq_len: int) -> Encoded:
  """Pretraining text: [bos] text [eos], the loss on every token after the first."""
  ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text) + [tok.eos_id]
  truncated = len(ids) > seq_len
  ids = ids[:seq_len]
  loss = np.ones(len(ids), np.int32)
  loss[0] = 0
  return Encoded(np.asarray(ids, np.int32), loss, truncated)


def encode(tok, record: Mapping[str, Any], seq_len: int) -> Encoded:
  """A demonstration ({'prompt', 'response'}) or a document ({'text'})."""
  if 'text' in record:
    return encode_text(tok, record['text'], seq_len)
  return encode_demo(tok, record['prompt'], record['response'], seq_len)


def _pad(e: Encoded, seq_len: int) -> dict:
  n = len(e.tokens)
  out = {k: np.zeros(seq_len, np.int32) for k in FIELDS}
  out['tokens'][:n] = e.tokens
  out['loss_mask'][:n] = e.loss_mask
  out['mask'][:n] = 1
  out['segments'][:n] = 1
  out['positions'][:n] = np.arange(n)
  return out


def _from_packed(x: dict) -> dict:
  seg = x['tokens_segment_ids'].astype(np.int32)
  return {'tokens': x['tokens'].astype(np.int32), 'loss_mask': x['loss_mask'].astype(np.int32),
          'segments': seg, 'mask': (seg > 0).astype(np.int32),
          'positions': x['tokens_positions'].astype(np.int32)}


def _host_slice(records):
  return grain.MapDataset.source(records)[jax.process_index()::jax.process_count()]


def _host_rows(ds: grain.MapDataset, global_batch: int) -> grain.MapDataset:
  """This process's rows of each global batch of the global stream `ds`: its element j is
  ds[b·G + p·R + r] for j = b·R + r, with R = G / n rows per process."""
  n, pid = jax.process_count(), jax.process_index()
  if n == 1:
    return ds
  rows = global_batch // n
  return grain.MapDataset.range(len(ds) // n).map(lambda j: ds[(j // rows) * global_batch + pid * rows + j % rows])


def _check_processes(global_batch: int) -> int:
  n_proc = jax.process_count()
  if global_batch % n_proc:
    raise ValueError(f'batch_size={global_batch} is not divisible by the {n_proc} processes')
  return global_batch // n_proc


class Stream:
  """A training stream: iterating it gives this process's rows of each global batch, through an
  iterator whose position (`get_state`) records how many processes read it, so that `set_state`
  restores it on another number of processes."""

  def __init__(self, ds: grain.IterDataset, per_host_index: bool):
    self.ds, self.per_host_index = ds, per_host_index

  def __iter__(self):
    return _StreamIterator(iter(self.ds), self.per_host_index)


class _StreamIterator:
  def __init__(self, it, per_host_index: bool):
    self._it, self._per_host_index = it, per_host_index

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._it)

  def get_state(self) -> dict:
    return {'processes': jax.process_count(), 'grain': self._it.get_state()}

  def set_state(self, state: dict) -> None:
    if 'grain' not in state:  # saved before positions recorded their process count: same count
      self._it.set_state(state)
      return
    inner, saved, n = dict(state['grain']), state['processes'], jax.process_count()
    if saved != n and self._per_host_index:
      # A per-process element index j means global element j·n (see _host_rows).
      if set(inner) != {'next_index'}:
        raise ValueError(f'data position {state} was saved by {saved} processes and cannot be converted '
                         f'for {n}: unknown iterator state')
      inner['next_index'] = inner['next_index'] * saved // n
    self._it.set_state(inner)


def truncation_count(tok, records: Sequence[Mapping[str, Any]], seq_len: int) -> int:
  """How many records are longer than seq_len (they are truncated, never dropped)."""
  return sum(encode(tok, r, seq_len).truncated for r in records)


def train_batches(tok, sources: Sequence[Sequence[Mapping[str, Any]]], *, seq_len: int, global_batch: int,
                  seed: int, weights: Sequence[float] | None = None, pack: bool = False) -> Stream:
  """An endless, shuffled (reshuffled every epoch) stream of this host's rows of each global batch.

  sources: record lists (demonstrations and/or pretraining documents); with several, they are
  mixed by `weights` (e.g. SFT + 10 % pretraining: weights (0.9, 0.1)). pack: first-fit packing of
  several documents per row (segments keep attention within a document); otherwise one document
  per row, right-padded.
  """
  rows = _check_processes(global_batch)
  parts = [grain.MapDataset.source(s).seed(seed + i).shuffle().repeat() for i, s in enumerate(sources)]
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  if pack:
    ds = ds.map(lambda r: encode(tok, r, seq_len)).map(lambda e: {'tokens': e.tokens, 'loss_mask': e.loss_mask})
    ds = grain_exp.FirstFitPackIterDataset(ds.to_iter_dataset(), num_packing_bins=global_batch, seed=seed,
                                           length_struct={'tokens': seq_len, 'loss_mask': seq_len}, shuffle_bins=False)
    ds = ds.map(_from_packed).batch(global_batch, drop_remainder=True)
    if rows != global_batch:
      start = jax.process_index() * rows
      ds = ds.map(lambda b: {k: v[start:start + rows] for k, v in b.items()})
    return Stream(ds, per_host_index=False)
  ds = _host_rows(ds, global_batch).map(lambda r: _pad(encode(tok, r, seq_len), seq_len))
  return Stream(ds.to_iter_dataset().batch(rows, drop_remainder=True), per_host_index=True)


def eval_batches(tok, records: Sequence[Mapping[str, Any]], *, seq_len: int, global_batch: int):
  """One ordered pass over this host's records, right-padded, filled up with rows whose loss_mask
  is 0 (they count for nothing), so that every batch has the static shape and every host yields
  the same number of batches."""
  n_proc = jax.process_count()
  rows = global_batch // n_proc
  per_host = -(-len(records) // n_proc)
  n_batches = max(-(-per_host // rows), 1)
  examples = [_pad(encode(tok, r, seq_len), seq_len) for r in _host_slice(records)]
  empty = {k: np.zeros(seq_len, np.int32) for k in FIELDS}
  examples += [empty] * (n_batches * rows - len(examples))
  for i in range(0, len(examples), rows):
    yield {k: np.stack([e[k] for e in examples[i:i + rows]]) for k in FIELDS}


# ----------------------------------------------------------------------------
# Rankings (reward model): one batch element per prompt, its responses padded to K_max.

RANKING_FIELDS = {'tokens': 3, 'mask': 3, 'positions': 3, 'read_at': 2, 'ranks': 2, 'valid': 2}


def _subset(record: Mapping[str, Any], k_max: int) -> list[int]:
  """Which responses a ranking of more than k_max keeps: a random subset (seeded by the prompt and
  responses, so the same record always keeps the same ones), in rank order."""
  k = len(record['responses'])
  if k <= k_max:
    return list(range(k))
  h = zlib.crc32(('\x00'.join([record['prompt'], *record['responses']])).encode('utf-8'))
  return sorted(np.random.default_rng(h).choice(k, k_max, replace=False).tolist())


def encode_ranking(tok: tokenizers.Tokenizer, record: Mapping[str, Any], seq_len: int, k_max: int) -> dict:
  """One ranked group {'prompt', 'responses' (best first)[, 'ranks']} -> arrays of K_max slots:
  tokens, mask, positions [K_max, T], each response [bos] prompt response [eos] right-padded
  (truncated as `encode_demo`); read_at [K_max], the index of its last real token; ranks [K_max]
  (the given ranks, else 0..k-1; equal ranks are ties and form no pair); valid [K_max]."""
  keep = _subset(record, k_max)
  ranks = record.get('ranks') or list(range(len(record['responses'])))
  out = {k: np.zeros((k_max, seq_len) if n == 3 else (k_max,), np.int32) for k, n in RANKING_FIELDS.items()}
  for slot, i in enumerate(keep):
    e = encode_demo(tok, record['prompt'], record['responses'][i], seq_len)
    n = len(e.tokens)
    out['tokens'][slot, :n] = e.tokens
    out['mask'][slot, :n] = 1
    out['positions'][slot, :n] = np.arange(n)
    out['read_at'][slot] = n - 1
    out['ranks'][slot] = ranks[i]
    out['valid'][slot] = 1
  return out


def ranking_truncation_count(tok, records: Sequence[Mapping[str, Any]], seq_len: int) -> int:
  """How many responses (over all rankings) are longer than seq_len with their prompt."""
  return sum(encode_demo(tok, r['prompt'], y, seq_len).truncated for r in records for y in r['responses'])


def pairs_of(records: Sequence[Mapping[str, Any]]) -> list[dict]:
  """The flat "shuffled pairs" ablation's data: every (better, worse) pair of every ranking as a
  K = 2 record of its own (InstructGPT §3.5 contrasts this with one element per prompt)."""
  out = []
  for r in records:
    ranks = r.get('ranks') or list(range(len(r['responses'])))
    for i, j in reward.pairs_of(ranks):
      out.append({'prompt': r['prompt'], 'responses': [r['responses'][i], r['responses'][j]]})
  return out


def _ranking_order(records: Sequence[Mapping[str, Any]], seed: int) -> grain.MapDataset:
  """The global training order of rankings: shuffled from `seed`, repeated without end."""
  return grain.MapDataset.source(records).seed(seed).shuffle().repeat()


def ranking_batches(tok, records: Sequence[Mapping[str, Any]], *, seq_len: int, k_max: int,
                    global_batch: int, seed: int) -> Stream:
  """An endless, shuffled (reshuffled every epoch) stream of this host's rows of each global batch
  of rankings (`encode_ranking`); checkpointable like `train_batches`."""
  rows = _check_processes(global_batch)
  ds = _host_rows(_ranking_order(records, seed), global_batch)
  ds = ds.map(lambda r: encode_ranking(tok, r, seq_len, k_max)).to_iter_dataset()
  return Stream(ds.batch(rows, drop_remainder=True), per_host_index=True)


# Packed rankings: a batch's responses share rows of `row_len` tokens (segments keep them apart),
# so the model computes real tokens instead of K_max · seq_len slots per prompt.

PACKED_RANKING_FIELDS = {'tokens': 2, 'mask': 2, 'positions': 2, 'segments': 2, 'read_at': 2, 'slot': 2,
                         'ranks': 2, 'valid': 2}


@dataclasses.dataclass(frozen=True)
class PackShape:
  """Rows per process of `row_len` tokens, each holding at most `docs` responses."""
  rows: int
  row_len: int
  docs: int


def _first_fit(lengths: Sequence[int], row_len: int, rows: int | None = None, docs: int | None = None):
  """First-fit decreasing: (row, start, index in row) of each length, longest first (ties in order),
  each into the first row with room, a new row when none has. None if `rows`/`docs` are too few."""
  fill, count, where = [], [], [None] * len(lengths)
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    n = lengths[i]
    row = next((r for r in range(len(fill)) if fill[r] + n <= row_len and (docs is None or count[r] < docs)), None)
    if row is None:
      if rows is not None and len(fill) >= rows:
        return None
      row = len(fill)
      fill.append(0)
      count.append(0)
    where[i] = (row, fill[row], count[row])
    fill[row] += n
    count[row] += 1
  return where


def _response_lengths(batch) -> list[int]:
  """Real tokens of each valid response of stacked `encode_ranking` arrays, in (prompt, slot) order."""
  lengths = batch['mask'].sum(-1)                                                     # [b, K]
  return [int(n) for n, v in zip(lengths.ravel(), batch['valid'].ravel()) if v]


def pack_need(batch, row_len: int) -> tuple[int, int]:
  """(rows, most responses in one row) that `pack_rankings` needs for this batch."""
  where = _first_fit(_response_lengths(batch), row_len)
  return max((w[0] + 1 for w in where), default=1), max((w[2] + 1 for w in where), default=1)


def pack_rankings(batch, shape: PackShape, slot_offset: int = 0) -> dict:
  """Stacked `encode_ranking` arrays [b, K, T] -> packed fields (PACKED_RANKING_FIELDS): tokens, mask,
  positions, segments [rows, row_len] (segment ids 1, 2, ... per row, 0 on padding); read_at
  [rows, docs] (each response's last token); slot [b, K], the index of each response's score in the
  flattened [rows · docs] scores of the whole global batch (`slot_offset`: this process's first);
  ranks and valid as given. Raises ValueError if the responses do not fit `shape`."""
  b, k, _ = batch['tokens'].shape
  lengths = batch['mask'].sum(-1)
  valid = batch['valid'].astype(bool)
  keys = [(i, j) for i in range(b) for j in range(k) if valid[i, j]]
  where = _first_fit([int(lengths[i, j]) for i, j in keys], shape.row_len, shape.rows, shape.docs)
  if where is None:
    rows, docs = pack_need(batch, shape.row_len)
    raise ValueError(f'a batch of rankings needs {rows} rows of {shape.row_len} tokens with up to {docs} '
                     f'responses each; the packing allows {shape.rows} rows and {shape.docs} responses '
                     '(rm.pack_rows / rm.pack_docs; 0 sizes them from the run\'s own batches)')
  out = {f: np.zeros((shape.rows, shape.row_len), np.int32) for f in ('tokens', 'mask', 'positions', 'segments')}
  out['read_at'] = np.zeros((shape.rows, shape.docs), np.int32)
  out['slot'] = np.zeros((b, k), np.int32)
  for (i, j), (row, start, doc) in zip(keys, where):
    n = int(lengths[i, j])
    out['tokens'][row, start:start + n] = batch['tokens'][i, j, :n]
    out['mask'][row, start:start + n] = 1
    out['positions'][row, start:start + n] = np.arange(n)
    out['segments'][row, start:start + n] = doc + 1
    out['read_at'][row, doc] = start + n - 1
    out['slot'][i, j] = slot_offset + row * shape.docs + doc
  out['ranks'], out['valid'] = batch['ranks'], batch['valid']
  return out


def packed_ranking_batches(tok, records: Sequence[Mapping[str, Any]], *, seq_len: int, k_max: int,
                           global_batch: int, seed: int, shape: PackShape) -> Stream:
  """`ranking_batches` with each batch's responses packed (`pack_rankings`) into `shape`."""
  offset = jax.process_index() * shape.rows * shape.docs
  stream = ranking_batches(tok, records, seq_len=seq_len, k_max=k_max, global_batch=global_batch, seed=seed)
  return Stream(stream.ds.map(lambda batch: pack_rankings(batch, shape, offset)), stream.per_host_index)


def pack_shape_for(tok, records: Sequence[Mapping[str, Any]], *, seq_len: int, k_max: int, global_batch: int,
                   seed: int, steps: int, row_len: int, multiple: int = 1) -> PackShape:
  """The smallest PackShape that holds every process's part of the first `steps` global batches of
  `ranking_batches(... seed)` (the same order, read for every process), rows rounded up so that the
  global row count is a multiple of `multiple` (the mesh's batch devices)."""
  n_proc = jax.process_count()
  per = _check_processes(global_batch)
  ds = _ranking_order(records, seed)
  rows = docs = 1
  for step in range(steps):
    for p in range(n_proc):
      start = step * global_batch + p * per
      enc = [encode_ranking(tok, ds[start + i], seq_len, k_max) for i in range(per)]
      r, d = pack_need({f: np.stack([e[f] for e in enc]) for f in ('mask', 'valid')}, row_len)
      rows, docs = max(rows, r), max(docs, d)
  step = multiple // math.gcd(multiple, n_proc)   # rows per process, so n_proc · rows is a multiple
  return PackShape(rows=-(-rows // step) * step, row_len=row_len, docs=docs)


def ranking_eval_batches(tok, records: Sequence[Mapping[str, Any]], *, seq_len: int, k_max: int,
                         global_batch: int):
  """One ordered pass: global batch i holds records [i·G, (i+1)·G), this host yielding its block of
  rows, so gathered outputs come back in record order. The last batch is filled up with empty
  elements (valid 0: no pair, no score)."""
  n_proc, pid = jax.process_count(), jax.process_index()
  rows = global_batch // n_proc
  empty = {k: np.zeros((k_max, seq_len) if n == 3 else (k_max,), np.int32) for k, n in RANKING_FIELDS.items()}
  for start in range(0, max(len(records), 1), global_batch):
    chunk = records[start + pid * rows:start + (pid + 1) * rows]
    examples = [encode_ranking(tok, r, seq_len, k_max) for r in chunk]
    examples += [empty] * (rows - len(examples))
    yield {k: np.stack([e[k] for e in examples]) for k in RANKING_FIELDS}


# ----------------------------------------------------------------------------
# Prompts (PPO rollouts).

PROMPT_FIELDS = ('prompt_ids', 'prompt_mask', 'index')


def encode_prompt(tok: tokenizers.Tokenizer, prompt: str, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
  """[bos] prompt, left-padded to prompt_len (a too-long prompt keeps its end, next to the response)."""
  ids, mask = tokenizers.encode_batch(tok, [prompt], prompt_len, pad_left=True, truncate=True,
                                      add_bos=tok.bos_id is not None)
  return ids[0], mask[0]


def prompt_batches(tok, prompts: Sequence[str], *, prompt_len: int, global_batch: int, seed: int) -> Stream:
  """An endless, shuffled (reshuffled every epoch) stream of this host's rows of each global batch of
  prompts: prompt_ids, prompt_mask [B, P] (left-padded) and index [B] (the prompt's position in
  `prompts`, for looking up its text). Checkpointable like `train_batches`."""
  rows = _check_processes(global_batch)

  def enc(r):
    ids, mask = encode_prompt(tok, r['prompt'], prompt_len)
    return {'prompt_ids': ids, 'prompt_mask': mask, 'index': np.int32(r['index'])}
  records = [{'prompt': p, 'index': i} for i, p in enumerate(prompts)]
  ds = _host_rows(grain.MapDataset.source(records).seed(seed).shuffle().repeat(), global_batch)
  return Stream(ds.map(enc).to_iter_dataset().batch(rows, drop_remainder=True), per_host_index=True)


class Zip:
  """Several checkpointable iterators as one: each batch is a dict of their batches, merged at the
  top level for the one named '' and nested under its name for the others; `get_state` /
  `set_state` cover all of them."""

  def __init__(self, **iterators):
    self.iterators = iterators

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    out = {}
    for name, it in self.iterators.items():
      b = next(it)
      if name:
        out[name] = b
      else:
        out.update(b)
    return out

  def get_state(self) -> dict:
    return {name or 'main': it.get_state() for name, it in self.iterators.items()}

  def set_state(self, state: dict) -> None:
    for name, it in self.iterators.items():
      it.set_state(state[name or 'main'])
