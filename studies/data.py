"""A text corpus that ships with every Python: the standard library's own source files.

No download: the files are read from `sysconfig.get_paths()['stdlib']`. The
selection is deterministic -- it depends only on the Python version's stdlib:

* every `*.py` file under the stdlib directory, except tests (`test/`,
  `tests/`, `idle_test/`, `test_*.py`), installed packages (`site-packages/`),
  generated tables (`encodings/`, `pydoc_data/`, `_sysconfigdata*`, which
  also differ between machines) and build leftovers (`__pycache__/`,
  `config-*/`, `lib-dynload/`);
* ordered by the CRC-32 of their path relative to the stdlib directory (a fixed
  shuffle that mixes packages, unlike alphabetical order);
* the first files of that order, whole, up to `heldout_chars` characters, are the
  held-out split; the next ones, up to `train_chars`, the training split. The
  split is by file: no held-out file contributes a character to training.

Characters are encoded as one token each: code points below 128 are their own
id, any other character is id 0 (NUL, which source files do not contain); a
file starts with FILE_SEPARATOR (ASCII 28). `decode` is the inverse up to the
non-ASCII characters.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sysconfig
import zlib
from typing import Optional, Sequence

import numpy as np

VOCAB_SIZE = 128
UNKNOWN = 0
FILE_SEPARATOR = 28  # ASCII FS, before every file's text

EXCLUDED_DIRS = frozenset({'test', 'tests', 'idle_test', 'site-packages', 'dist-packages',
                           '__pycache__', 'encodings', 'pydoc_data', 'lib-dynload'})


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The two splits, as token ids (uint8), and the files each is made of (relative paths)."""
  train: np.ndarray
  heldout: np.ndarray
  train_files: tuple[str, ...]
  heldout_files: tuple[str, ...]
  root: str


def stdlib_dir() -> str:
  """The directory of this Python's standard library (not a virtual environment's)."""
  return sysconfig.get_paths()['stdlib']


def _excluded(relpath: str) -> bool:
  parts = relpath.split(os.sep)
  name = parts[-1]
  return (any(p in EXCLUDED_DIRS or p.startswith('config-') for p in parts[:-1])
          or name.startswith(('test_', '_sysconfigdata')))


def source_files(root: Optional[str] = None) -> list[str]:
  """The selected `*.py` files under `root` (default: the stdlib), as paths relative to it,
  in the corpus's order (CRC-32 of the relative path, then the path)."""
  root = root or stdlib_dir()
  found = []
  for directory, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(files):
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(directory, name), root)
        if not _excluded(rel):
          found.append(rel)
  return sorted(found, key=lambda rel: (zlib.crc32(rel.encode()), rel))


def encode(text: str) -> np.ndarray:
  """Token ids (uint8) of `text`: code point if below VOCAB_SIZE, else UNKNOWN."""
  codes = np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32)
  return np.where(codes < VOCAB_SIZE, codes, UNKNOWN).astype(np.uint8)


def decode(ids: Sequence[int]) -> str:
  """The text of token ids (UNKNOWN shown as '?', FILE_SEPARATOR as a blank line)."""
  out = []
  for i in np.asarray(ids).tolist():
    out.append('?' if i == UNKNOWN else '\n\n' if i == FILE_SEPARATOR else chr(i))
  return ''.join(out)


def _take(files: list[str], root: str, budget: int, start: int) -> tuple[list[str], list[str], int]:
  """Whole files from files[start:] until `budget` characters are reached: (names, texts, next)."""
  names, texts, total, i = [], [], 0, start
  while i < len(files) and total < budget:
    with open(os.path.join(root, files[i]), encoding='utf-8', errors='replace') as fh:
      text = fh.read()
    names.append(files[i])
    texts.append(text)
    total += len(text) + 1
    i += 1
  return names, texts, i


def _join(texts: list[str]) -> np.ndarray:
  if not texts:
    return np.zeros((0,), np.uint8)
  sep = np.array([FILE_SEPARATOR], np.uint8)
  return np.concatenate([part for t in texts for part in (sep, encode(t))])


@functools.lru_cache(maxsize=8)
def load_corpus(train_chars: int = 4_000_000, heldout_chars: int = 700_000,
                root: Optional[str] = None) -> Corpus:
  """The corpus: `heldout_chars` of held-out files, then `train_chars` of training files
  (each rounded up to a whole file).

  Raises ValueError if the directory has too little text for either split.

  Example:
    >>> c = load_corpus(train_chars=20_000, heldout_chars=5_000)
    >>> len(c.train) >= 20_000 and len(c.heldout) >= 5_000
    True
    >>> set(c.train_files) & set(c.heldout_files)
    set()
  """
  if train_chars < 1 or heldout_chars < 1:
    raise ValueError(f'train_chars and heldout_chars must be >= 1, got {train_chars}, '
                     f'{heldout_chars}')
  root = root or stdlib_dir()
  files = source_files(root)
  held_names, held_texts, nxt = _take(files, root, heldout_chars, 0)
  train_names, train_texts, _ = _take(files, root, train_chars, nxt)
  corpus = Corpus(_join(train_texts), _join(held_texts), tuple(train_names), tuple(held_names),
                  root)
  if len(corpus.train) < train_chars or len(corpus.heldout) < heldout_chars:
    raise ValueError(f'{root}: only {len(corpus.heldout):,} held-out and {len(corpus.train):,} '
                     f'training characters in {len(files)} source files; asked for '
                     f'{heldout_chars:,} and {train_chars:,}')
  return corpus
