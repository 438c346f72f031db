"""The stdlib corpus: which files, in which order, split by file, encoded as characters."""

import os

import numpy as np
import pytest

from studies import data


def _tree(root, files):
  for rel, text in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as fh:
      fh.write(text)


def test_tests_installed_packages_and_generated_files_are_left_out(tmp_path):
  _tree(tmp_path, {'os.py': 'a', 'json/decoder.py': 'b', 'test/test_os.py': 'c',
                   'json/tests/x.py': 'd', 'site-packages/numpy/core.py': 'e',
                   'idlelib/idle_test/t.py': 'f', 'encodings/cp1252.py': 'g',
                   'unittest/test_case.py': 'h', '_sysconfigdata__linux.py': 'i',
                   'config-3.11-x86_64/makesetup.py': 'j', 'README.txt': 'k'})
  assert sorted(data.source_files(str(tmp_path))) == ['json/decoder.py', 'os.py']


def test_the_order_is_fixed_by_the_paths_not_by_the_directory_listing(tmp_path):
  names = {f'm{i}.py': 'x' for i in range(30)}
  _tree(tmp_path / 'a', names)
  _tree(tmp_path / 'b', dict(reversed(list(names.items()))))  # created in the other order
  order = data.source_files(str(tmp_path / 'a'))
  assert order == data.source_files(str(tmp_path / 'b'))
  assert order != sorted(order)  # a shuffle (CRC-32), not alphabetical


def test_the_splits_are_whole_files_and_never_share_one(tmp_path):
  _tree(tmp_path, {f'm{i}.py': f'# module {i}\n' + 'x = 1\n' * (i + 1) for i in range(40)})
  corpus = data.load_corpus(train_chars=300, heldout_chars=100, root=str(tmp_path))
  assert not set(corpus.train_files) & set(corpus.heldout_files)
  order = data.source_files(str(tmp_path))
  assert list(corpus.heldout_files + corpus.train_files) == order[:len(corpus.heldout_files)
                                                                  + len(corpus.train_files)]
  assert len(corpus.heldout) >= 100 and len(corpus.train) >= 300
  # Every file's text is in its split, whole, after a separator.
  text = data.decode(corpus.train)
  for rel in corpus.train_files:
    with open(tmp_path / rel, encoding='utf-8') as fh:
      assert '\n\n' + fh.read() in text
  assert np.count_nonzero(corpus.heldout == data.FILE_SEPARATOR) == len(corpus.heldout_files)


def test_too_little_text_is_an_error_naming_the_directory(tmp_path):
  _tree(tmp_path, {'a.py': 'x' * 50})
  with pytest.raises(ValueError, match=str(tmp_path)):
    data.load_corpus(train_chars=1000, heldout_chars=10, root=str(tmp_path))


def test_characters_outside_ascii_become_the_unknown_id():
  ids = data.encode('def f():\n\treturn "é"\n')
  assert ids.dtype == np.uint8 and ids.max() < data.VOCAB_SIZE
  assert data.decode(ids) == 'def f():\n\treturn "?"\n'


def test_the_real_stdlib_gives_the_documented_sizes():
  corpus = data.load_corpus()  # 4 M / 0.7 M characters (cached: the task loads the same)
  assert 4_000_000 <= len(corpus.train) < 4_200_000
  assert 700_000 <= len(corpus.heldout) < 900_000
  assert len(corpus.train_files) > 100 and len(corpus.heldout_files) > 10
  assert not any('test' in f.split(os.sep)[:-1] for f in corpus.train_files)
