"""Shared pieces of experiment configs: model sizes, the `:arg` parser, the smoke override.

A config file's `get_config(arg)` receives what follows the colon in
`--config=experiments/sft.py:tiny` (or `size=1.3b,smoke=True`), parsed by `parse_arg`.
"""
from __future__ import annotations

import ml_collections

# InstructGPT policies are GPT-3 shapes (Brown et al. 2020, Table 2.1) with the GPT-2 BPE
# vocabulary and a 2048-token context. 'tiny' and 'smoke' are the CPU sizes of the embedded task
# (byte tokenizer: 259 ids, padded to 320 so the vocabulary shards over tensor <= 64).
SIZES = {
    'smoke': dict(d_model=32, n_layer=2, n_head=2, d_ff=64, vocab_size=320, max_len=128),
    'tiny': dict(d_model=128, n_layer=4, n_head=4, d_ff=512, vocab_size=320, max_len=128),
    '1.3b': dict(d_model=2048, n_layer=24, n_head=16, d_ff=8192, vocab_size=50304, max_len=2048),
    '6b': dict(d_model=4096, n_layer=32, n_head=32, d_ff=16384, vocab_size=50304, max_len=2048),
    '175b': dict(d_model=12288, n_layer=96, n_head=96, d_ff=49152, vocab_size=50304, max_len=2048),
}
CPU_SIZES = ('smoke', 'tiny')


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'smoke' -> smoke=True (a bare boolean field); 'tiny' -> size=tiny (a bare value is the size);
  'size=1.3b,mix=True' -> fields. Unknown fields fail by name."""
  out = dict(defaults)
  for part in filter(None, (arg or '').split(',')):
    if '=' not in part:
      if isinstance(out.get(part), bool):
        key, value = part, 'true'
      elif 'size' in out:
        key, value = 'size', part
      else:
        raise ValueError(f'config arg {part!r}: not a boolean field and this config has no size')
    else:
      key, value = part.split('=', 1)
    if key not in out:
      raise ValueError(f'unknown config arg {key!r}; valid: {sorted(out)}')
    default = out[key]
    out[key] = (value.lower() in ('1', 'true', 'yes')) if isinstance(default, bool) else type(default)(value)
  if 'size' in out and out['size'] not in SIZES:
    raise ValueError(f"unknown size {out['size']!r}; valid: {sorted(SIZES)}")
  return ml_collections.ConfigDict(out)


def model(size: str, **overrides) -> ml_collections.ConfigDict:
  """Every ModelConfig field, so that command-line overrides of any of them work."""
  from rlhf_jax.model import ModelConfig
  import dataclasses
  fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  fields.update(style='gpt2', n_kv_head=0, tie_embeddings=True, **SIZES[size])
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def tokenizer(data: str) -> ml_collections.ConfigDict:
  """The embedded task's byte tokenizer, or GPT-2 BPE (from ../shared/data) for real data."""
  if data == 'synthetic':
    return ml_collections.ConfigDict(dict(kind='byte'))
  return ml_collections.ConfigDict(dict(kind='gpt2_bpe', encoder_json='../shared/data/tokenizers/gpt2/encoder.json',
                                        vocab_bpe='../shared/data/tokenizers/gpt2/vocab.bpe'))


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
