"""A character-level transformer language model of the Python standard library's source.

The task, independent of any optimizer study: data (`studies.data`), model and
held-out evaluation. `CharLM` fits `studies.tasks.Task` (what a study trains) and
`service.examples.models.Model`, so a worker can train it through the optimizer server:

    lamb-sharded worker --model studies.charlm:model ...   # the default size
    lamb-sharded worker --model studies.charlm:small ...   # the --quick size

Batches: the training text is cut into non-overlapping windows of `context + 1`
characters (N of them); epoch e visits them in a permutation seeded by
(seed, e). Step t of a global batch of B windows takes the slice t % (N // B) of
its epoch's permutation (the remainder is dropped); worker w of W takes the
w-th of its W equal parts. The input is a window's first `context` characters,
the target the next character at every position.

Evaluation: the mean cross-entropy (nats per character) of predicting every
character of `eval_windows` windows spread evenly over the held-out files.

Example:
    >>> lm = small(seed=0)
    >>> params = lm.init(0)
    >>> x, y = lm.batch(step=0, worker=0, size=4)
    >>> x.shape, y.shape
    ((4, 32), (4, 32))
    >>> 4.0 < lm.evaluate(params) < 5.5   # about ln(128) = 4.85 before training
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from studies import data as data_lib
from studies import tasks


@dataclasses.dataclass(frozen=True)
class CharLM:
  """A pre-LayerNorm decoder-only transformer over characters, with its data and evaluation.

  Parameters: token and position embeddings (the output layer reuses the token
  embedding), `depth` blocks of causal self-attention and a GELU MLP, a final
  LayerNorm; one pytree leaf per weight, bias and LayerNorm vector (LAMB's
  trust ratio is per leaf).
  """
  context: int = 64
  width: int = 96
  depth: int = 2
  heads: int = 4
  mlp_ratio: int = 4
  train_chars: int = 4_000_000
  heldout_chars: int = 700_000
  eval_windows: int = 512
  seed: int = 0
  vocab: int = data_lib.VOCAB_SIZE
  name = 'charlm'  # studies.tasks.Task
  metric = tasks.HELDOUT_LOSS
  example_unit = 'characters'
  loss_unit = 'nats/char'
  shards_global_batch = True  # batch() takes num_workers (service.examples.models.Model)

  # ------------------------------------------------------------------ data

  def corpus(self) -> data_lib.Corpus:
    return data_lib.load_corpus(self.train_chars, self.heldout_chars)

  @property
  def num_windows(self) -> int:
    """Training windows (of context + 1 characters, stride `context`)."""
    return (len(self.corpus().train) - 1) // self.context

  @property
  def num_examples(self) -> int:
    return self.num_windows

  @property
  def example_size(self) -> int:
    """Characters predicted per window."""
    return self.context

  def steps_per_epoch(self, global_batch: int) -> int:
    n = self.num_windows
    if not 0 < global_batch <= n:
      raise ValueError(f'the global batch must be in [1, {n}] (the training windows), '
                       f'got {global_batch}')
    return n // global_batch

  def batch(self, step: int, worker: int, size: int, num_workers: int = 1
            ) -> tuple[np.ndarray, np.ndarray]:
    """Worker `worker`'s `size` windows of step `step`'s global batch (size * num_workers):
    (inputs, targets), int32 arrays of shape (size, context)."""
    idx = self.window_indices(step, worker, size, num_workers)
    windows = self.corpus().train[idx[:, None] * self.context + np.arange(self.context + 1)]
    windows = windows.astype(np.int32)
    return windows[:, :-1], windows[:, 1:]

  def window_indices(self, step: int, worker: int, size: int, num_workers: int = 1
                     ) -> np.ndarray:
    """Which training windows `batch` returns (window i starts at character i * context)."""
    if not 0 <= worker < num_workers:
      raise ValueError(f'worker index {worker} is not in [0, {num_workers})')
    global_batch = size * num_workers
    epoch, i = divmod(step, self.steps_per_epoch(global_batch))
    perm = _permutation(self.seed, epoch, self.num_windows)
    return perm[i * global_batch:(i + 1) * global_batch][worker * size:(worker + 1) * size]

  def heldout_windows(self) -> np.ndarray:
    """The evaluation windows (eval_windows, context + 1), int32, evenly spaced."""
    text = self.corpus().heldout
    starts = np.linspace(0, len(text) - self.context - 1, self.eval_windows).astype(np.int64)
    return text[starts[:, None] + np.arange(self.context + 1)].astype(np.int32)

  # ------------------------------------------------------------------ model

  def init(self, seed: int) -> dict:
    """Float32 parameters: N(0, 0.02) weights (output projections scaled by 1/sqrt(2 depth)),
    zero biases, unit LayerNorm scales."""
    rng = np.random.default_rng(seed)
    d, f = self.width, self.width * self.mlp_ratio

    def normal(*shape, std=0.02):
      return (rng.normal(size=shape) * std).astype(np.float32)
    zeros = lambda n: np.zeros((n,), np.float32)  # pylint: disable=unnecessary-lambda-assignment
    ones = lambda n: np.ones((n,), np.float32)  # pylint: disable=unnecessary-lambda-assignment
    out_std = 0.02 / math.sqrt(2 * self.depth)
    params = {'embed': normal(self.vocab, d), 'position': normal(self.context, d)}
    for i in range(self.depth):
      params[f'block{i}'] = {
          'ln1': {'scale': ones(d), 'bias': zeros(d)},
          'qkv': {'w': normal(d, 3 * d), 'b': zeros(3 * d)},
          'proj': {'w': normal(d, d, std=out_std), 'b': zeros(d)},
          'ln2': {'scale': ones(d), 'bias': zeros(d)},
          'fc': {'w': normal(d, f), 'b': zeros(f)},
          'out': {'w': normal(f, d, std=out_std), 'b': zeros(d)},
      }
    params['ln_f'] = {'scale': ones(d), 'bias': zeros(d)}
    return params

  def num_params(self) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(self.init(0)))

  def apply(self, params, tokens):
    """Logits (batch, time, vocab) of the next character at every position."""
    _, t = tokens.shape
    h = params['embed'][tokens] + params['position'][:t]
    mask = jnp.tril(jnp.ones((t, t), bool))
    for i in range(self.depth):
      p = params[f'block{i}']
      h = h + self._attention(p, _layer_norm(p['ln1'], h), mask)
      m = _layer_norm(p['ln2'], h) @ p['fc']['w'] + p['fc']['b']
      h = h + jax.nn.gelu(m) @ p['out']['w'] + p['out']['b']
    return _layer_norm(params['ln_f'], h) @ params['embed'].T

  def _attention(self, p, x, mask):
    b, t, d = x.shape
    qkv = (x @ p['qkv']['w'] + p['qkv']['b']).reshape(b, t, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(d // self.heads)
    weights = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, t, d)
    return out @ p['proj']['w'] + p['proj']['b']

  def loss(self, params, x, y):
    """Mean cross-entropy (nats per character) of the targets `y` given the inputs `x`."""
    logp = jax.nn.log_softmax(self.apply(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))

  def grad_fn(self) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    return jax.jit(jax.value_and_grad(self.loss))

  @functools.cached_property
  def _eval_loss(self):
    return jax.jit(self.loss)

  def evaluate(self, params) -> float:
    """The held-out mean cross-entropy, in nats per character."""
    windows = self.heldout_windows()
    chunk = min(256, len(windows))
    total = 0.0
    for i in range(0, len(windows) - chunk + 1, chunk):
      w = windows[i:i + chunk]
      total += float(self._eval_loss(params, w[:, :-1], w[:, 1:])) * len(w)
    return total / (len(windows) // chunk * chunk)

  def measure(self, params) -> dict[str, float]:
    """The held-out figures (`studies.tasks.Task`): the loss only."""
    return {'heldout_loss': self.evaluate(params)}

  def describe(self) -> dict[str, Any]:
    corpus, params = self.corpus(), self.num_params()
    return tasks.description(
        self, name=self.name, parameters=params, context=self.context, width=self.width,
        depth=self.depth, train_chars=len(corpus.train), heldout_chars=len(corpus.heldout),
        train_files=len(corpus.train_files), heldout_files=len(corpus.heldout_files),
        eval_chars=self.eval_windows * self.context, batch_unit='sequences',
        title=f'char-LM ({params:,} params) on the Python stdlib',
        summary=f'{params:,}-parameter char-LM, {len(corpus.train):,} training / '
                f'{len(corpus.heldout):,} held-out characters')


def _layer_norm(p, x, eps: float = 1e-5):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p['scale'] + p['bias']


@functools.lru_cache(maxsize=16)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def model(seed: int = 0) -> CharLM:
  """The default task (`lamb-sharded worker --model studies.charlm:model`): a 2-block,
  width-96 transformer over 64 characters, 4 M training / 0.7 M held-out characters."""
  return CharLM(seed=seed)


def small(seed: int = 0) -> CharLM:
  """The --quick task: a 1-block, width-48 transformer over 32 characters, 1 M / 0.2 M
  characters, 256 evaluation windows."""
  return CharLM(context=32, width=48, depth=1, heads=4, train_chars=1_000_000,
                heldout_chars=200_000, eval_windows=256, seed=seed)
