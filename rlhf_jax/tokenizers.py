"""Tokenizers behind one small interface.

Four kinds share the `Tokenizer` protocol so the rest of the code (data
pipelines, samplers, reward models) never branches on where ids came from:

  * `ByteTokenizer`: raw UTF-8 bytes plus three specials. Needs no files, so
    tests and toy runs work anywhere.
  * `GPT2BPETokenizer`: GPT-2 byte-level BPE from `encoder.json` + `vocab.bpe`,
    in plain Python so GPT-2 checkpoints can be used without extra libraries.
  * `HFTokenizer`: any Hugging Face `tokenizer.json` (via `tokenizers`).
  * `SentencePieceTokenizer`: a SentencePiece `.model` file.

`encode` never adds specials unless asked (`add_bos`/`add_eos`), so prompt
building stays explicit. `decode` always drops pad ids: sampled sequences are
padded after EOS, and that padding is not text.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    'Tokenizer', 'ByteTokenizer', 'GPT2BPETokenizer', 'HFTokenizer',
    'SentencePieceTokenizer', 'KINDS', 'load', 'from_config', 'encode_batch',
]


@runtime_checkable
class Tokenizer(Protocol):
  """What every tokenizer offers.

  `vocab_size` counts the ids the tokenizer can emit; a model's embedding may be
  padded larger (e.g. to a multiple of 128) and those extra ids never decode.
  """
  vocab_size: int
  pad_id: int
  bos_id: int | None
  eos_id: int

  def encode(self, text: str, *, add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    ...

  def decode(self, ids: Iterable[int] | np.ndarray, *,
             skip_special: bool = True) -> str:
    ...


# ----------------------------------------------------------------------------
# Shared helpers.


def _require_file(path: str | os.PathLike[str], key: str) -> str:
  """Fails early, naming both the config key and the path, if a file is missing.

  The libraries' own errors on a missing file are vague (SentencePiece raises
  OSError with no path, `tokenizers` a generic Exception).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'tokenizer file for {key!r} not found: {path}')
  return path


def _wrap(ids: list[int], bos_id: int | None, eos_id: int, add_bos: bool,
          add_eos: bool) -> list[int]:
  if add_bos:
    if bos_id is None:
      raise ValueError('add_bos=True but this tokenizer has no BOS token')
    ids = [bos_id] + ids
  if add_eos:
    ids = ids + [eos_id]
  return ids


def _ids_to_decode(ids: Iterable[int] | np.ndarray, tok: Tokenizer,
                   skip_special: bool) -> list[int]:
  """Flattens `ids` to a list of Python ints, dropping pad (and specials).

  Ids outside [0, vocab_size) raise: they mean the sampler picked a padded
  embedding row, which is a bug to surface rather than text to hide.
  """
  arr = np.asarray(ids if hasattr(ids, '__len__') else list(ids))
  if arr.ndim != 1:
    raise ValueError(f'decode expects a 1-D id sequence, got shape {arr.shape}')
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(f'decode expects integer ids, got dtype {arr.dtype}')
  drop = {tok.pad_id}
  if skip_special:
    drop |= {tok.eos_id} | ({tok.bos_id} if tok.bos_id is not None else set())
  out = [i for i in arr.tolist() if i not in drop]
  bad = [i for i in out if not 0 <= i < tok.vocab_size]
  if bad:
    raise ValueError(f'ids outside [0, {tok.vocab_size}): {bad[:8]}')
  return out


# ----------------------------------------------------------------------------
# Bytes.


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then pad=256, bos=257, eos=258."""

  vocab_size = 259
  pad_id = 256
  bos_id = 257
  eos_id = 258
  _SPECIAL_TEXT = {257: '<bos>', 258: '<eos>'}

  def encode(self, text: str, *, add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    return _wrap(list(text.encode('utf-8')), self.bos_id, self.eos_id, add_bos,
                 add_eos)

  def decode(self, ids: Iterable[int] | np.ndarray, *,
             skip_special: bool = True) -> str:
    """Invalid UTF-8 (e.g. a sequence cut mid-character) becomes U+FFFD."""
    pieces, run = [], bytearray()
    for i in _ids_to_decode(ids, self, skip_special):
      if i < 256:
        run.append(i)
      else:
        pieces.append(run.decode('utf-8', errors='replace'))
        pieces.append(self._SPECIAL_TEXT[i])
        run = bytearray()
    pieces.append(run.decode('utf-8', errors='replace'))
    return ''.join(pieces)


# ----------------------------------------------------------------------------
# GPT-2 byte-level BPE.

# GPT-2's pre-tokenisation: contractions, optional-space + letters / digits /
# other symbols, then whitespace (trailing whitespace before a word stays apart
# so the word keeps its leading space).
_GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+"""
                 r"""| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


@functools.lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table.

  BPE merges are stored as text, so every byte needs a visible, non-whitespace
  character: printable Latin-1 bytes keep their own character, the other 68
  bytes (controls, space, etc.) are moved to U+0100 onwards in byte order.
  """
  keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
          *range(ord('®'), ord('ÿ') + 1)]
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


class GPT2BPETokenizer:
  """GPT-2's tokenizer, from its `encoder.json` and `vocab.bpe`.

  `<|endoftext|>` serves as eos, pad and bos, as in GPT-2 training. Text that
  happens to contain the string "<|endoftext|>" is encoded as ordinary text, so
  user data can never inject an end-of-text id.
  """

  EOT = '<|endoftext|>'

  def __init__(self, encoder_json: str | os.PathLike[str],
               vocab_bpe: str | os.PathLike[str]):
    import regex  # Needed for \p{L} / \p{N}; the stdlib `re` lacks them.

    with open(_require_file(encoder_json, 'encoder_json'),
              encoding='utf-8') as f:
      self._encoder: dict[str, int] = json.load(f)
    self._decoder = {i: t for t, i in self._encoder.items()}
    with open(_require_file(vocab_bpe, 'vocab_bpe'), encoding='utf-8') as f:
      lines = f.read().split('\n')
    self._ranks: dict[tuple[str, str], int] = {}
    for n, line in enumerate(lines):
      if not line or (n == 0 and line.startswith('#version')):
        continue
      pair = line.split(' ')
      if len(pair) != 2:
        raise ValueError(f'{os.fspath(vocab_bpe)}:{n + 1}: bad merge {line!r}')
      self._ranks.setdefault((pair[0], pair[1]), len(self._ranks))
    if self.EOT not in self._encoder:
      raise ValueError(f'{os.fspath(encoder_json)} has no {self.EOT!r} token')

    self._pattern = regex.compile(_GPT2_PATTERN)
    self._byte_encoder = _bytes_to_unicode()
    self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
    # Words repeat a lot in natural text; caching per instance keeps the cache
    # tied to this vocabulary.
    self._bpe = functools.lru_cache(maxsize=1 << 16)(self._merge_word)
    self.vocab_size = len(self._encoder)
    self.eos_id = self._encoder[self.EOT]
    self.pad_id = self.eos_id
    self.bos_id: int | None = self.eos_id

  def _merge_word(self, word: str) -> tuple[str, ...]:
    """Applies merges to one pre-token, always the lowest-ranked pair first."""
    parts = list(word)
    while len(parts) > 1:
      best = min(zip(parts, parts[1:]),
                 key=lambda p: self._ranks.get(p, float('inf')))
      if best not in self._ranks:
        break
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return tuple(parts)

  def encode(self, text: str, *, add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    ids = []
    for piece in self._pattern.findall(text):
      word = ''.join(self._byte_encoder[b] for b in piece.encode('utf-8'))
      ids.extend(self._encoder[t] for t in self._bpe(word))
    return _wrap(ids, self.bos_id, self.eos_id, add_bos, add_eos)

  def decode(self, ids: Iterable[int] | np.ndarray, *,
             skip_special: bool = True) -> str:
    """Pad shares eos's id, so `<|endoftext|>` is dropped even when kept."""
    text = ''.join(
        self._decoder[i] for i in _ids_to_decode(ids, self, skip_special))
    data = bytes(self._byte_decoder[c] for c in text)
    return data.decode('utf-8', errors='replace')


# ----------------------------------------------------------------------------
# Hugging Face tokenizer.json.

# Names used by GPT-2/NeoX, Llama, Mistral, Gemma and similar decoder models.
_EOS_NAMES = ('<|endoftext|>', '</s>', '<eos>', '<|eos|>', '<|end_of_text|>')
_BOS_NAMES = ('<s>', '<bos>', '<|bos|>', '<|begin_of_text|>',
              '<|startoftext|>')
_PAD_NAMES = ('<pad>', '<|pad|>', '[PAD]', '<|padding|>', '<PAD>')


class HFTokenizer:
  """A Hugging Face `tokenizer.json`, loaded with the `tokenizers` library.

  Special tokens come from the `*_token` arguments when given (tokenizer.json
  does not say which token plays which role), else from the first common name
  present in the vocabulary. With no pad token, pad = eos.
  """

  def __init__(self, tokenizer_json: str | os.PathLike[str], *,
               bos_token: str | None = None, eos_token: str | None = None,
               pad_token: str | None = None):
    import tokenizers

    self._path = _require_file(tokenizer_json, 'tokenizer_json')
    self._tok = tokenizers.Tokenizer.from_file(self._path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    eos = self._find('eos_token', eos_token, _EOS_NAMES)
    if eos is None:
      raise ValueError(
          f'{self._path}: no eos token found (tried {list(_EOS_NAMES)}); '
          'pass eos_token=...')
    self.eos_id: int = eos
    self.bos_id: int | None = self._find('bos_token', bos_token, _BOS_NAMES)
    pad = self._find('pad_token', pad_token, _PAD_NAMES)
    self.pad_id: int = eos if pad is None else pad

  def _find(self, arg: str, given: str | None,
            names: Sequence[str]) -> int | None:
    if given is not None:
      i = self._tok.token_to_id(given)
      if i is None:
        raise ValueError(f'{self._path}: {arg}={given!r} is not in the vocab')
      return i
    for name in names:
      i = self._tok.token_to_id(name)
      if i is not None:
        return i
    return None

  def encode(self, text: str, *, add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    # The file's post-processor would add its own specials; we add ours.
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return _wrap(list(ids), self.bos_id, self.eos_id, add_bos, add_eos)

  def decode(self, ids: Iterable[int] | np.ndarray, *,
             skip_special: bool = True) -> str:
    return self._tok.decode(_ids_to_decode(ids, self, skip_special),
                            skip_special_tokens=skip_special)


# ----------------------------------------------------------------------------
# SentencePiece.


class SentencePieceTokenizer:
  """A SentencePiece model; specials are the ones the model was trained with."""

  def __init__(self, model_file: str | os.PathLike[str]):
    import sentencepiece

    self._sp = sentencepiece.SentencePieceProcessor(
        model_file=_require_file(model_file, 'model_file'))
    self.vocab_size = self._sp.get_piece_size()
    bos, eos, pad = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
    if eos < 0:
      raise ValueError(f'{os.fspath(model_file)}: model has no eos token')
    self.eos_id: int = eos
    self.bos_id: int | None = bos if bos >= 0 else None
    self.pad_id: int = pad if pad >= 0 else eos  # -1 means the model has none.

  def encode(self, text: str, *, add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    ids = self._sp.encode(text, out_type=int)
    return _wrap(list(ids), self.bos_id, self.eos_id, add_bos, add_eos)

  def decode(self, ids: Iterable[int] | np.ndarray, *,
             skip_special: bool = True) -> str:
    return self._sp.decode(_ids_to_decode(ids, self, skip_special))


# ----------------------------------------------------------------------------
# Factory.

# kind -> (class, required file keys, optional keyword keys).
KINDS: dict[str, tuple[type, tuple[str, ...], tuple[str, ...]]] = {
    'byte': (ByteTokenizer, (), ()),
    'gpt2_bpe': (GPT2BPETokenizer, ('encoder_json', 'vocab_bpe'), ()),
    'hf': (HFTokenizer, ('tokenizer_json',),
           ('bos_token', 'eos_token', 'pad_token')),
    'sentencepiece': (SentencePieceTokenizer, ('model_file',), ()),
}


def load(kind: str, **kwargs: Any) -> Tokenizer:
  """Builds a tokenizer of `kind` from its file paths (and, for 'hf', tokens).

  Keys set to None are ignored, so one config can carry fields for every kind.
  Unknown keys raise rather than being silently ignored (typos in configs).
  """
  if kind not in KINDS:
    raise ValueError(f'unknown tokenizer kind {kind!r}; valid: {sorted(KINDS)}')
  cls, files, options = KINDS[kind]
  kwargs = {k: v for k, v in kwargs.items() if v is not None}
  unknown = sorted(set(kwargs) - set(files) - set(options))
  if unknown:
    raise ValueError(f'tokenizer kind {kind!r} takes {list(files + options)}, '
                     f'got unexpected {unknown}')
  missing = [k for k in files if k not in kwargs]
  if missing:
    raise ValueError(f'tokenizer kind {kind!r} needs {missing}')
  for k in files:
    kwargs[k] = _require_file(kwargs[k], k)
  return cls(**kwargs)


def from_config(cfg: Mapping[str, Any]) -> Tokenizer:
  """`load` from a mapping such as {'kind': 'hf', 'tokenizer_json': path}."""
  cfg = dict(cfg)
  if 'kind' not in cfg:
    raise ValueError(f"tokenizer config needs a 'kind'; valid: {sorted(KINDS)}")
  return load(**cfg)


# ----------------------------------------------------------------------------
# Batching.


def encode_batch(tok: Tokenizer, texts: Sequence[str], length: int, *,
                 pad_left: bool, truncate: bool = False, add_bos: bool = False,
                 add_eos: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Encodes `texts` into a fixed-size [B, length] int32 batch plus its mask.

  Prompts are padded on the left so every prompt ends at the same position and
  generation continues from there; targets/responses are padded on the right.
  Too-long texts raise unless `truncate`: then left padding keeps the end of the
  text (closest to where generation starts) and right padding keeps the start.
  Returns (ids, mask) with mask 1 on real tokens and 0 on padding.
  """
  if length < 0:
    raise ValueError(f'length must be >= 0, got {length}')
  ids = np.full((len(texts), length), tok.pad_id, dtype=np.int32)
  mask = np.zeros((len(texts), length), dtype=np.int32)
  for row, text in enumerate(texts):
    toks = tok.encode(text, add_bos=add_bos, add_eos=add_eos)
    if len(toks) > length:
      if not truncate:
        raise ValueError(f'text {row} has {len(toks)} tokens > length {length} '
                         '(pass truncate=True to cut it)')
      toks = toks[len(toks) - length:] if pad_left else toks[:length]
    n = len(toks)
    span = slice(length - n, length) if pad_left else slice(0, n)
    ids[row, span] = toks
    mask[row, span] = 1
  return ids, mask
