"""A plain NumPy LAMB written from the paper's formulas, for the tests to compare against.

You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes", Algorithm 2, with the opt-in variants of other implementations
(see shared/LAMB.md): layer-adaptation exclusion (TF Addons), trust-ratio
clipping (DeepSpeed min_coeff/max_coeff), global grad-norm pre-normalisation
(apex FusedLAMB max_grad_norm), bias correction off. Everything in float64,
one leaf at a time, no JAX.
"""

from __future__ import annotations

import numpy as np


def lamb_reference(params, grads_per_step, *, lr, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0,
                   weight_decay=0.0, decay=None, adapt=None, min_ratio=None, max_ratio=None,
                   max_grad_norm=None, bias_correction=True, ratios=None):
  """Runs LAMB on a dict of NumPy arrays; returns the params after every step.

  Args:
    params: dict name -> np.ndarray (initial params).
    grads_per_step: list over steps of dicts name -> gradient.
    lr: callable step -> learning rate (step counts from 0).
    decay: dict name -> bool, where weight decay applies (default all).
    adapt: dict name -> bool, where the trust ratio applies (default all).
    ratios: a list to append, for every step, a dict name -> the trust ratio used.
    Others: as in the paper / the implementations named in the module docstring.

  Returns:
    List of dicts of params, one per step.
  """
  x = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in x.items()}
  v = {k: np.zeros_like(val) for k, val in x.items()}
  history = []
  for t, grads in enumerate(grads_per_step, start=1):
    g = {k: np.asarray(val, np.float64) for k, val in grads.items()}
    if max_grad_norm is not None:
      norm = np.sqrt(sum(np.sum(val ** 2) for val in g.values()))
      if norm > max_grad_norm:
        g = {k: val * (max_grad_norm / norm) for k, val in g.items()}
    new_x, used = {}, {}
    for k in x:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      m_hat = m[k] / (1 - b1 ** t) if bias_correction else m[k]
      v_hat = v[k] / (1 - b2 ** t) if bias_correction else v[k]
      u = m_hat / (np.sqrt(v_hat + eps_root) + eps)
      if weight_decay and (decay is None or decay[k]):
        u = u + weight_decay * x[k]
      ratio = 1.0
      if adapt is None or adapt[k]:
        w_norm, u_norm = np.linalg.norm(x[k]), np.linalg.norm(u)
        if w_norm > 0 and u_norm > 0:
          ratio = w_norm / u_norm
          if min_ratio is not None:
            ratio = max(ratio, min_ratio)
          if max_ratio is not None:
            ratio = min(ratio, max_ratio)
      used[k] = ratio
      new_x[k] = x[k] - lr(t - 1) * ratio * u
    if ratios is not None:
      ratios.append(used)
    x = new_x
    history.append(dict(x))
  return history
