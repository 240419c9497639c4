"""Tests for rlhf_jax.tokenizers against known ids and independent libraries."""

from pathlib import Path

import numpy as np
import pytest

from rlhf_jax import tokenizers as tk

DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
GPT2_DIR = DATA / 'tokenizers' / 'gpt2'
SP_MODEL = DATA / 'tokenizers' / 'sentencepiece-test' / 'test_model.model'

# Mixed text for comparing encoders: punctuation, numbers, contractions, runs
# of spaces, tabs, newlines, trailing whitespace and non-Latin scripts.
PARAGRAPH = (
    "Hello, world! I'll say it: don't panic -- we've got 3.14159 reasons & "
    "42 ways.\n\n  Indented line\twith\ttabs;   three spaces.\n"
    "It's 2024-01-05, isn't it? She'd've said 'yes'.\n"
    "Unicode: héllo wörld ✓ 日本語 Ελληνικά émoji 🤖🙂 naïve café.\r\n"
    "Numbers 1234567890 and  x=y+z*2   \n   trailing   ")


def _need(path: Path) -> Path:
  if not path.exists():
    pytest.skip(f'{path} absent: tokenizer data files are not available')
  return path


@pytest.fixture(scope='module')
def gpt2_files() -> tuple[str, str]:
  return (str(_need(GPT2_DIR / 'encoder.json')),
          str(_need(GPT2_DIR / 'vocab.bpe')))


@pytest.fixture(scope='module')
def gpt2(gpt2_files) -> tk.GPT2BPETokenizer:
  return tk.GPT2BPETokenizer(*gpt2_files)


@pytest.fixture(scope='module')
def hf_reference(gpt2_files):
  """GPT-2 rebuilt with the Rust `tokenizers` library, as an oracle."""
  import tokenizers as hf

  ref = hf.Tokenizer(hf.models.BPE.from_file(*gpt2_files))
  ref.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  ref.decoder = hf.decoders.ByteLevel()
  return ref


# ----------------------------------------------------------------------------
# ByteTokenizer.


@pytest.mark.parametrize('text', ['hello world', 'héllo wörld ✓ 日本', ''])
def test_byte_round_trip(text):
  tok = tk.ByteTokenizer()
  ids = tok.encode(text)
  assert ids == list(text.encode('utf-8'))
  assert tok.decode(ids) == text


def test_byte_specials():
  tok = tk.ByteTokenizer()
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256,
                                                                  257, 258)
  assert tok.encode('ab', add_bos=True) == [257, 97, 98]
  assert tok.encode('ab', add_eos=True) == [97, 98, 258]
  assert tok.encode('ab', add_bos=True, add_eos=True) == [257, 97, 98, 258]
  ids = np.array([257, 104, 105, 258, 256, 256], dtype=np.int32)
  assert tok.decode(ids) == 'hi'
  kept = tok.decode(ids, skip_special=False)
  assert kept.startswith('<bos>') and kept.endswith('<eos>')
  assert 'hi' in kept and '256' not in kept


def test_byte_decode_invalid_utf8_and_bad_ids():
  tok = tk.ByteTokenizer()
  cut = list('é'.encode('utf-8'))[:1]  # First byte of a 2-byte character.
  assert tok.decode([104] + cut) == 'h\ufffd'
  with pytest.raises(ValueError, match='outside'):
    tok.decode([104, 300])  # A padded-vocab id the tokenizer never emits.
  with pytest.raises(ValueError, match='1-D'):
    tok.decode(np.zeros((2, 2), np.int32))


def test_byte_satisfies_protocol():
  assert isinstance(tk.ByteTokenizer(), tk.Tokenizer)


# ----------------------------------------------------------------------------
# GPT-2 BPE.


@pytest.mark.parametrize('text, ids', [
    ('Hello world', [15496, 995]),
    (' Hello', [18435]),
    ('hello world', [31373, 995]),
    ('Hello, world!', [15496, 11, 995, 0]),
    ("don't", [9099, 470]),
    ('\n\n', [628]),
])
def test_gpt2_known_ids(gpt2, hf_reference, text, ids):
  assert gpt2.encode(text) == ids
  assert hf_reference.encode(text).ids == ids


def test_gpt2_specials(gpt2):
  assert gpt2.vocab_size == 50257
  assert gpt2.eos_id == gpt2.pad_id == gpt2.bos_id == 50256
  assert gpt2.encode('Hello world', add_bos=True, add_eos=True) == [
      50256, 15496, 995, 50256]
  assert gpt2.decode([15496, 995, 50256, 50256]) == 'Hello world'
  # The literal string is text, not the special token.
  assert 50256 not in gpt2.encode('<|endoftext|>')
  assert gpt2.decode(gpt2.encode('<|endoftext|>')) == '<|endoftext|>'


@pytest.mark.parametrize('text', [
    PARAGRAPH,
    *PARAGRAPH.splitlines(keepends=True),
    '', ' ', '   ', '\n', "I'll", "they're'", 'a  b   c', '🤖',
])
def test_gpt2_matches_hf_reference(gpt2, hf_reference, text):
  ref = hf_reference.encode(text).ids
  assert gpt2.encode(text) == ref
  assert gpt2.decode(ref) == text
  assert hf_reference.decode(ref) == text


def test_gpt2_decode_accepts_arrays(gpt2):
  ids = gpt2.encode(PARAGRAPH)
  assert gpt2.decode(np.asarray(ids, np.int32)) == PARAGRAPH
  assert gpt2.decode(tuple(ids)) == PARAGRAPH


# ----------------------------------------------------------------------------
# HF tokenizer.json.


@pytest.fixture(scope='module')
def hf_json(hf_reference, tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp('hf') / 'tokenizer.json'
  hf_reference.save(str(path))
  return str(path)


def test_hf_matches_gpt2(hf_json, gpt2):
  tok = tk.HFTokenizer(hf_json)
  assert tok.vocab_size == 50257
  assert tok.eos_id == tok.pad_id == 50256  # No pad token: pad falls to eos.
  assert tok.bos_id is None  # GPT-2 has no dedicated bos name.
  for text in [PARAGRAPH, 'Hello world', ' Hello', '']:
    ids = tok.encode(text)
    assert ids == gpt2.encode(text)
    assert tok.decode(ids) == text
  assert tok.encode('Hello world', add_eos=True) == [15496, 995, 50256]
  assert tok.decode([15496, 995, 50256]) == 'Hello world'
  with pytest.raises(ValueError, match='no BOS'):
    tok.encode('x', add_bos=True)


def test_hf_explicit_tokens(hf_json):
  tok = tk.HFTokenizer(hf_json, bos_token='<|endoftext|>', pad_token='!')
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (50256, 50256, 0)
  with pytest.raises(ValueError, match='not in the vocab'):
    tk.HFTokenizer(hf_json, eos_token='<definitely-not-a-token>')


def test_hf_missing_eos_names_file(tmp_path):
  import tokenizers as hf

  vocab = {'a': 0, 'b': 1, '<unk>': 2}
  path = tmp_path / 'tiny.json'
  hf.Tokenizer(hf.models.WordLevel(vocab, unk_token='<unk>')).save(str(path))
  with pytest.raises(ValueError, match='no eos') as err:
    tk.HFTokenizer(path)
  assert str(path) in str(err.value)


# ----------------------------------------------------------------------------
# SentencePiece.


@pytest.fixture(scope='module')
def sp_model() -> str:
  return str(_need(SP_MODEL))


SENTENCES = [
    'It was the best of times, it was the worst of times.',
    'I am not a man of many words, said the old gentleman.',
    'She walked slowly down the road towards the house.',
]


def test_sentencepiece(sp_model):
  import sentencepiece

  ref = sentencepiece.SentencePieceProcessor(model_file=sp_model)
  tok = tk.SentencePieceTokenizer(sp_model)
  assert tok.vocab_size == ref.get_piece_size()
  assert tok.eos_id == ref.eos_id()
  assert tok.bos_id == (ref.bos_id() if ref.bos_id() >= 0 else None)
  assert tok.pad_id == (ref.pad_id() if ref.pad_id() >= 0 else ref.eos_id())
  for text in SENTENCES:
    ids = tok.encode(text)
    assert ids == ref.encode(text, out_type=int)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    wrapped = tok.encode(text, add_bos=True, add_eos=True)
    assert wrapped == [tok.bos_id, *ids, tok.eos_id]
    assert tok.decode(wrapped + [tok.pad_id] * 3) == text


# ----------------------------------------------------------------------------
# encode_batch.


def test_encode_batch_padding():
  tok = tk.ByteTokenizer()
  P = tok.pad_id
  ids, mask = tk.encode_batch(tok, ['ab', 'abcd', ''], 5, pad_left=True)
  assert ids.dtype == mask.dtype == np.int32
  np.testing.assert_array_equal(ids, [[P, P, P, 97, 98], [P, 97, 98, 99, 100],
                                      [P, P, P, P, P]])
  np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1],
                                       [0, 0, 0, 0, 0]])
  ids, mask = tk.encode_batch(tok, ['ab', 'abcd'], 5, pad_left=False)
  np.testing.assert_array_equal(ids, [[97, 98, P, P, P], [97, 98, 99, 100, P]])
  np.testing.assert_array_equal(mask, [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
  ids, mask = tk.encode_batch(tok, ['ab'], 4, pad_left=False, add_bos=True,
                              add_eos=True)
  np.testing.assert_array_equal(ids, [[257, 97, 98, 258]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1]])


def test_encode_batch_too_long_and_truncate():
  tok = tk.ByteTokenizer()
  with pytest.raises(ValueError, match='text 1 has 6 tokens > length 4'):
    tk.encode_batch(tok, ['ab', 'abcdef'], 4, pad_left=True)
  ids, mask = tk.encode_batch(tok, ['abcdef'], 4, pad_left=True, truncate=True)
  np.testing.assert_array_equal(ids, [list(b'cdef')])  # Keeps the end.
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1]])
  ids, _ = tk.encode_batch(tok, ['abcdef'], 4, pad_left=False, truncate=True)
  np.testing.assert_array_equal(ids, [list(b'abcd')])  # Keeps the start.


def test_encode_batch_gpt2_pads_with_eos(gpt2):
  ids, mask = tk.encode_batch(gpt2, ['Hello world', ' Hello'], 3,
                              pad_left=True)
  np.testing.assert_array_equal(ids, [[50256, 15496, 995],
                                      [50256, 50256, 18435]])
  np.testing.assert_array_equal(mask, [[0, 1, 1], [0, 0, 1]])


# ----------------------------------------------------------------------------
# Factory.


def test_factory_byte():
  tok = tk.from_config({'kind': 'byte'})
  assert isinstance(tok, tk.ByteTokenizer)
  assert isinstance(tk.load('byte', model_file=None), tk.ByteTokenizer)


def test_factory_files(gpt2_files, sp_model, hf_json):
  enc, bpe = gpt2_files
  gpt2 = tk.from_config({'kind': 'gpt2_bpe', 'encoder_json': enc,
                         'vocab_bpe': bpe})
  assert gpt2.encode('Hello world') == [15496, 995]
  hf = tk.load('hf', tokenizer_json=hf_json, pad_token='!')
  assert hf.encode('Hello world') == [15496, 995] and hf.pad_id == 0
  sp = tk.load('sentencepiece', model_file=sp_model)
  assert sp.decode(sp.encode(SENTENCES[0])) == SENTENCES[0]


@pytest.mark.parametrize('kind, key', [
    ('gpt2_bpe', 'vocab_bpe'),
    ('hf', 'tokenizer_json'),
    ('sentencepiece', 'model_file'),
])
def test_factory_missing_file(tmp_path, kind, key):
  missing = tmp_path / 'nope' / 'missing.file'
  cfg = {'kind': kind, key: str(missing)}
  if kind == 'gpt2_bpe':
    enc = tmp_path / 'encoder.json'
    enc.write_text('{}')
    cfg['encoder_json'] = str(enc)
  with pytest.raises(FileNotFoundError) as err:
    tk.from_config(cfg)
  assert str(missing) in str(err.value) and key in str(err.value)


def test_factory_bad_configs():
  with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
    tk.load('wordpiece')
  with pytest.raises(ValueError) as err:
    tk.from_config({'kind': 'bogus'})
  for kind in ('byte', 'gpt2_bpe', 'hf', 'sentencepiece'):
    assert kind in str(err.value)
  with pytest.raises(ValueError, match="needs \\['model_file'\\]"):
    tk.load('sentencepiece')
  with pytest.raises(ValueError, match='unexpected'):
    tk.load('sentencepiece', model_flie='x.model')
  with pytest.raises(ValueError, match="needs a 'kind'"):
    tk.from_config({'model_file': 'x.model'})
