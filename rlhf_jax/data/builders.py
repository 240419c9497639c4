"""TensorFlow Datasets builders for the real-data sources, stored and read as array_record.

Why TFDS: a prepared dataset is a versioned directory (`<data_dir>/<name>[/<config>]/<version>/`)
with its features, split sizes and provenance recorded next to the data, written once and then
read by random access (`builder.as_data_source(split)`), which is what grain's index sampler
needs for shuffling, sharding across hosts and checkpointing the iterator position.

No TensorFlow. TFDS 4.9 has a TensorFlow-free path end to end: `GeneratorBasedBuilder`
serialises examples with its own protobuf writer, `file_format='array_record'` writes through
the `array_record` package, and `as_data_source` reads them back as numpy/bytes. What must be
avoided is the code that reaches for TF or the network: `tfds.builder(name)` / `tfds.load` /
`tfds.list_builders` consult the community GCS index (which imports TF when GCS is unreachable),
and `dataset_info_from_configs` looks for metadata files next to the builder's module. So the
builders here build their `DatasetInfo` directly, and `prepare` / `load` instantiate the classes
themselves (they never go through the TFDS registry lookup). `as_dataset` (a `tf.data` pipeline)
is the one reader that would need TF; it is not used.

Manual directory. Nothing is downloaded: the source files are read from `manual_dir`, laid out
like the shared data folder (the tests point it at `../shared/data`). Each builder lists glob
patterns relative to it (`SOURCES`); the first pattern that matches anything is used, and all of
its matches are read in sorted order. The later patterns accept the full public releases:

  SelfInstructDemos   sft/self-instruct/seed_tasks.jsonl[.gz]
  OasstDemos,         preferences/oasst1-en100/en_100_tree.jsonl
  OasstRankings         else preferences/oasst1/*.trees.jsonl[.gz] (full release, e.g.
                        2023-04-12_oasst_ready.trees.jsonl.gz)
  HhRlhfDemos,        preferences/hh-rlhf/<subset>/{train,test}.jsonl[.gz] for every subset
  HhRlhfComparisons     present (harmless-base, helpful-base, helpful-online, ...)
  PlainTextCorpus     config `tinyshakespeare`: pretrain/tinyshakespeare/input.txt
                      config `tinystories`: pretrain/tinystories/*.txt[.gz]

Splits. Every builder writes `train` and `test`. Where the source ships its own train/test files
(HH-RLHF's full release) those are used as is. Everywhere else (one file) the split is decided
by `split_of(record['group'])`: a record is `test` iff its 16-hex-digit group hash, read as a
fraction of 2**64, is below `TEST_FRACTION` = 0.1 (so about 10 % test, 90 % train). The group is
a hash of a prefix of the prompt (see `readers`), so the same prompt never lands in two splits,
all turns of one OpenAssistant conversation stay together, and OasstDemos and OasstRankings (or
HhRlhfDemos and HhRlhfComparisons) agree on which prompts are held out.

Records. Demonstrations {prompt, response, id, group}, rankings {prompt, responses (best first),
k, id, group}, documents {text, id, group}; `load` returns them as Python str / int. What the
readers skipped, and why, is counted in `builder.info.metadata['reader_stats']` (saved with the
data, so it can be read back without re-preparing) and logged.

Usage:
  ds = builders.load('oasst_rankings', 'train', manual_dir='../shared/data',
                     data_dir='~/tensorflow_datasets')
  len(ds), ds[0]['responses'], ds[0]['k']
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import inspect
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from rlhf_jax.data import readers

__all__ = [
    'TEST_FRACTION', 'SPLITS', 'split_of',
    'SelfInstructDemos', 'OasstDemos', 'OasstRankings', 'HhRlhfDemos', 'HhRlhfComparisons',
    'PlainTextCorpus', 'BUILDERS', 'builder', 'prepare', 'load', 'Records',
]

log = logging.getLogger(__name__)

TEST_FRACTION = 0.1
SPLITS = ('train', 'test')


def split_of(group: str, test_fraction: float = TEST_FRACTION) -> str:
  """'test' for about `test_fraction` of group hashes, else 'train'; a pure function of the
  group, so the assignment never changes between runs, machines or dataset versions."""
  return 'test' if int(group, 16) < test_fraction * 2**64 else 'train'


# ----------------------------------------------------------------------------
# Features.


def _text() -> tfds.features.Text:
  return tfds.features.Text()


def _demo_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict(
      {'prompt': _text(), 'response': _text(), 'id': _text(), 'group': _text()})


def _ranking_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'prompt': _text(),
      'responses': tfds.features.Sequence(_text()),  # best first; len == k
      'k': tfds.features.Scalar(dtype=np.int32),
      'id': _text(),
      'group': _text(),
  })


def _document_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({'text': _text(), 'id': _text(), 'group': _text()})


# ----------------------------------------------------------------------------
# The shared builder.


class _ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Reads source files from the manual directory through a `readers` function and writes
  `train` / `test` in the order the reader yields (TFDS's key-hash shuffle is disabled, so a
  prepared split can be compared record by record with the reader's output; grain shuffles)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES: ClassVar[dict[str, str]] = {'1.0.0': 'First release.'}
  SOURCES: ClassVar[tuple[str, ...]] = ()
  DESCRIPTION: ClassVar[str] = ''
  HOMEPAGE: ClassVar[str] = ''

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path | None:
    """The file defining the builder (where TFDS looks for a checksums file; we have none).

    TFDS 4.9.10 computes this with `importlib_resources`, a backport it declares only for
    Python < 3.9 but imports unconditionally, so preparing a builder that lives in an installed
    package fails with `No module named 'importlib_resources'` (tensorflow/datasets#11212).
    This is TFDS's own fallback for the same value, without the backport.
    """
    try:
      return epath.Path(inspect.getfile(cls))
    except (TypeError, OSError):
      return None

  @classmethod
  def manual_instructions(cls, sources: Sequence[str]) -> str:
    return ('Put the source files under the manual directory (e.g. `../shared/data`) at one '
            'of these paths (first match wins):\n' + '\n'.join(f'  {p}' for p in sources))

  @property
  def MANUAL_DOWNLOAD_INSTRUCTIONS(self) -> str:  # noqa: N802 (TFDS's name)
    return self.manual_instructions(self._sources())

  def _sources(self) -> tuple[str, ...]:
    return self.SOURCES

  def _features(self) -> tfds.features.FeaturesDict:
    raise NotImplementedError

  def _records(self, files: Sequence[str], stats: collections.Counter) -> Iterator[dict]:
    """Yields every record of the source files (before the split)."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION or (self.__doc__ or '').strip(),
        features=self._features(),
        homepage=self.HOMEPAGE or None,
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _find_sources(self, manual_dir: os.PathLike[str] | str) -> list[str]:
    """The files of the first pattern in `_sources()` that matches anything."""
    root = os.fspath(manual_dir)
    for pattern in self._sources():
      files = sorted(f for f in glob.glob(os.path.join(root, pattern)) if os.path.isfile(f))
      if files:
        return files
    raise FileNotFoundError(
        f'{self.name}: no source files in manual_dir={root}. '
        + self.manual_instructions(self._sources()))

  def _assign(self, files: Sequence[str]) -> dict[str, list[str]] | None:
    """Official split -> files when the source has its own splits; None to hash-split."""
    del files
    return None

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    files = self._find_sources(dl_manager.manual_dir)
    root = os.fspath(dl_manager.manual_dir)
    self.info.metadata['sources'] = [os.path.relpath(f, root) for f in files]
    official = self._assign(files)
    if official is not None:
      self.info.metadata['split_rule'] = 'official files'
      return {s: self._generate_examples(official[s], None) for s in SPLITS}
    self.info.metadata['split_rule'] = f'hash of group < {TEST_FRACTION} -> test'
    return {s: self._generate_examples(files, s) for s in SPLITS}

  def _generate_examples(self, files: Sequence[str], split: str | None):
    """Streams the files once per split, keeping this split's records (with split=None, all
    records of the given files). Reading twice keeps memory flat on multi-GB sources."""
    stats: collections.Counter = collections.Counter()
    for record in self._records(files, stats):
      if split is None or split_of(record['group']) == split:
        yield record['id'], record
    # Each pass reads the same files: the counts of the last pass are the counts of the source
    # (passes over official split files are summed).
    all_stats = self.info.metadata.setdefault('reader_stats', {})
    key = 'all' if split is not None else ','.join(os.path.basename(f) for f in files)
    all_stats[key] = dict(sorted(stats.items()))
    log.info('%s: reader counts %s', self.name, dict(stats))


# ----------------------------------------------------------------------------
# Self-Instruct.


class SelfInstructDemos(_ManualBuilder):
  """Self-Instruct seed tasks as demonstrations (one per instance): 175 in the seed file."""

  SOURCES = ('sft/self-instruct/seed_tasks.jsonl', 'sft/self-instruct/seed_tasks.jsonl.gz',
             'seed_tasks.jsonl', 'seed_tasks.jsonl.gz')
  HOMEPAGE = 'https://github.com/yizhongw/self-instruct'

  def _features(self):
    return _demo_features()

  def _records(self, files, stats):
    for f in files:
      yield from readers.self_instruct(f, stats)


# ----------------------------------------------------------------------------
# OpenAssistant.

_OASST_SOURCES = (
    'preferences/oasst1-en100/en_100_tree.jsonl',
    'preferences/oasst1/*.trees.jsonl.gz',
    'preferences/oasst1/*.trees.jsonl',
    'en_100_tree.jsonl',
    '*.trees.jsonl.gz',
    '*.trees.jsonl',
)


class OasstDemos(_ManualBuilder):
  """OpenAssistant conversations: the best-ranked assistant reply to each user turn, with the
  conversation so far rendered as "User: ...\\n\\nAssistant: ...\\n\\nAssistant:"."""

  SOURCES = _OASST_SOURCES
  HOMEPAGE = 'https://github.com/LAION-AI/Open-Assistant'

  def _features(self):
    return _demo_features()

  def _records(self, files, stats):
    for f in files:
      yield from readers.oasst_demonstrations(f, stats)


class OasstRankings(_ManualBuilder):
  """OpenAssistant K-way human rankings of sibling assistant replies (K = 2..9), best first;
  partially ranked and tied groups are dropped (counted in the reader stats)."""

  SOURCES = _OASST_SOURCES
  HOMEPAGE = 'https://github.com/LAION-AI/Open-Assistant'

  def _features(self):
    return _ranking_features()

  def _records(self, files, stats):
    for f in files:
      yield from readers.oasst_rankings(f, stats)


# ----------------------------------------------------------------------------
# Anthropic HH-RLHF.

_HH_SOURCES = (
    'preferences/hh-rlhf/*/t*.jsonl.gz',
    'preferences/hh-rlhf/*/t*.jsonl',
)


class _HhRlhf(_ManualBuilder, skip_registration=True):
  """HH-RLHF: `{train,test}.jsonl.gz` of every subset found; the official split files are used
  when both kinds are present, otherwise (this snapshot holds only harmless-base/test) the
  records are hash-split."""

  SOURCES = _HH_SOURCES
  HOMEPAGE = 'https://github.com/anthropics/hh-rlhf'

  def _find_sources(self, manual_dir):
    files = super()._find_sources(manual_dir)
    return [f for f in files if _hh_split_name(f) in SPLITS]

  def _assign(self, files):
    by_split = {s: [f for f in files if _hh_split_name(f) == s] for s in SPLITS}
    return by_split if all(by_split.values()) else None


def _hh_split_name(path: str) -> str:
  """'train' for .../train.jsonl.gz, 'test' for .../test.jsonl, else the bare name."""
  name = os.path.basename(path)
  for suffix in ('.gz', '.jsonl'):
    name = name.removesuffix(suffix)
  return name


class HhRlhfDemos(_HhRlhf):
  """HH-RLHF chosen transcripts as demonstrations: prompt + response == the transcript."""

  def _features(self):
    return _demo_features()

  def _records(self, files, stats):
    for f in files:
      yield from readers.hh_rlhf_demonstrations(f, stats)


class HhRlhfComparisons(_HhRlhf):
  """HH-RLHF preference pairs as K = 2 rankings [chosen, rejected]."""

  def _features(self):
    return _ranking_features()

  def _records(self, files, stats):
    for f in files:
      yield from readers.hh_rlhf_comparisons(f, stats)


# ----------------------------------------------------------------------------
# Pretraining text.


@dataclasses.dataclass(eq=False)
class PlainTextConfig(tfds.core.BuilderConfig):
  """One corpus: where its files are and how they split into documents (`readers.plain_text`)."""
  sources: tuple[str, ...] = ()
  mode: str = 'auto'


class PlainTextCorpus(_ManualBuilder):
  """Pretraining documents for PPO-ptx and the alignment-tax measurement (one config per
  corpus): tiny-shakespeare is split into speeches (blank-line paragraphs), TinyStories on
  `<|endoftext|>`."""

  BUILDER_CONFIGS = [
      PlainTextConfig(name='tinyshakespeare',
                      description='tiny-shakespeare, one document per speech.',
                      sources=('pretrain/tinyshakespeare/input.txt',
                               'pretrain/tinyshakespeare/*.txt')),
      PlainTextConfig(name='tinystories',
                      description='TinyStories, one document per story.',
                      sources=('pretrain/tinystories/*.txt', 'pretrain/tinystories/*.txt.gz')),
  ]

  def _sources(self):
    return self.builder_config.sources

  def _features(self):
    return _document_features()

  def _records(self, files, stats):
    yield from readers.plain_text(files, stats, mode=self.builder_config.mode)


# ----------------------------------------------------------------------------
# The embedded synthetic task (rlhf_jax/data/synthetic.py): generated by code, no files, with
# its own train / valid / test / heldout splits (sizes from synthetic.DEFAULT_CONFIG).


class SyntheticDemos(_ManualBuilder):
  """The embedded task's demonstrations from its noisy demonstrator; prompts already formatted
  (`synthetic.format_prompt`), as every stage feeds them to the model."""

  def _features(self):
    return _demo_features()

  def _split_generators(self, dl_manager):
    from rlhf_jax.data import synthetic
    del dl_manager
    self.info.metadata['split_rule'] = 'generated per split (synthetic.SPLITS)'
    return {s: self._generate_synthetic(s) for s in synthetic.SPLITS}

  def _generate_synthetic(self, split: str):
    from rlhf_jax.data import synthetic
    for i, r in enumerate(synthetic.sft_examples(split)):
      yield f'{split}-{i}', {'prompt': synthetic.format_prompt(r['prompt']), 'response': r['response'],
                             'id': f'{split}-{i}', 'group': r['family']}


BUILDERS: dict[str, type[_ManualBuilder]] = {
    cls.name: cls for cls in (
        SelfInstructDemos, OasstDemos, OasstRankings, HhRlhfDemos, HhRlhfComparisons,
        PlainTextCorpus, SyntheticDemos)
}


# ----------------------------------------------------------------------------
# Entry points.


def _lookup(name: str) -> tuple[type[_ManualBuilder], str | None]:
  """'oasst_rankings', 'OasstRankings' or 'plain_text_corpus/tinystories' -> (class, config)."""
  base, _, config = name.partition('/')
  for cls in BUILDERS.values():
    if base in (cls.name, cls.__name__):
      configs = [c.name for c in cls.BUILDER_CONFIGS]
      if configs and not config:
        raise ValueError(f'{name!r}: {cls.name} needs a config, one of '
                         + ', '.join(f'{cls.name}/{c}' for c in configs))
      if config and config not in configs:
        raise ValueError(f'{name!r}: unknown config {config!r}; expected one of {configs}')
      return cls, config or None
  known = sorted(cls.name for cls in BUILDERS.values())
  raise ValueError(f'unknown builder {name!r}; expected one of {known}')


def builder(name: str, data_dir: str | os.PathLike[str]) -> _ManualBuilder:
  """The builder instance for `name` (see `_lookup`) writing array_record under data_dir."""
  cls, config = _lookup(name)
  return cls(data_dir=os.fspath(os.path.expanduser(data_dir)), config=config,
             file_format='array_record')


def prepare(name: str, manual_dir: str | os.PathLike[str],
            data_dir: str | os.PathLike[str]) -> _ManualBuilder:
  """Prepares `name` from the files in manual_dir into data_dir (a no-op if already prepared
  for this version: bump VERSION when a reader changes) and returns the builder."""
  b = builder(name, data_dir)
  if not b._sources():  # generated by code: no manual directory
    b.download_and_prepare()
    return b
  manual_dir = os.fspath(os.path.expanduser(manual_dir))
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f'manual_dir={manual_dir}: no such directory')
  b.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return b


def _to_python(value: Any) -> Any:
  """Decoded TFDS values (bytes, numpy scalars and arrays) as str / int / float / lists."""
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray):
    return [_to_python(v) for v in value.tolist()]
  if isinstance(value, np.generic):
    return _to_python(value.item())
  if isinstance(value, Mapping):
    return {k: _to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_python(v) for v in value]
  return value


class Records(Sequence):
  """Random-access records of one prepared split, as dicts of Python str / int.

  Implements grain's RandomAccessDataSource protocol (`__len__`, `__getitem__`, and
  `__getitems__` for batched reads) and pickles (grain's worker processes reopen the files).
  """

  def __init__(self, source: Sequence[Any], name: str = ''):
    self._source = source
    self._name = name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):  # type: ignore[override]
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f'{self._name}: index {index} out of range for {n} records')
    return _to_python(self._source[index % n])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    getitems = getattr(self._source, '__getitems__', None)
    if getitems is None:
      return [self[i] for i in indices]
    return [_to_python(r) for r in getitems(list(indices))]

  def __repr__(self) -> str:
    return f'Records({self._name}, {len(self)} records)'


def load(name: str, split: str, manual_dir: str | os.PathLike[str] | None = None,
         data_dir: str | os.PathLike[str] = '~/tensorflow_datasets') -> Records:
  """Random-access records of `split` ('train', 'test', or TFDS slicing like 'train[:10%]'),
  preparing the dataset from manual_dir first if it is not prepared yet."""
  b = builder(name, data_dir)
  if not b.is_prepared():
    if manual_dir is None and b._sources():
      raise FileNotFoundError(
          f'{name} is not prepared in {b.data_dir} and no manual_dir was given to prepare it')
    b = prepare(name, manual_dir, data_dir)
  return Records(b.as_data_source(split), f'{name}:{split}')
