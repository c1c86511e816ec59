"""Deep Feature Reweighting (Kirichenko et al. 2023), the variant of the AGRE-KD paper:
retrain only the last layer of an ERM model on half of the validation set with
group-balanced batches; the other half selects the regularisation strength by worst-group
accuracy.

The head is an L1-regularised logistic regression on standardised pooled features (as the
DFR reference code with sklearn), trained with Adam on group-balanced mini-batches. All
regularisation strengths are trained at once (vmap) in one compiled `lax.scan`. The result is
folded back into raw-feature space, so it replaces the teacher's `fc` as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agre_jax import evaluation

# The DFR paper's grid of inverse L1 strengths C (sklearn convention).
DEFAULT_C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)


@dataclasses.dataclass(frozen=True)
class DFRConfig:
    """Attributes: c_grid (inverse L1 strengths), steps, batch_size (per group x groups),
    learning_rate, seed."""

    c_grid: tuple[float, ...] = DEFAULT_C_GRID
    steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 1e-2
    seed: int = 0

    def __post_init__(self):
        if not self.c_grid or min(self.c_grid) <= 0:
            raise ValueError(f"dfr c_grid must hold positive values, got {self.c_grid}")
        if self.steps < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("dfr steps, batch_size and learning_rate must be positive")


def split_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of range(n) into a training half and a selection half."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])


def _balanced_indices(rng: np.random.Generator, groups: np.ndarray, steps: int, batch: int):
    """[steps, batch] example indices drawing each present group equally often."""
    present = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    which = rng.integers(0, len(present), size=(steps, batch))
    out = np.empty((steps, batch), np.int64)
    for k, members in enumerate(present):
        sel = which == k
        out[sel] = members[rng.integers(0, len(members), size=int(sel.sum()))]
    return out


def fit(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    train_groups: np.ndarray,
    select_features: np.ndarray,
    select_labels: np.ndarray,
    select_groups: np.ndarray,
    *,
    num_classes: int,
    num_groups: int,
    cfg: DFRConfig,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fits the DFR head for every C in the grid and keeps the best selection-half WGA (ties:
    the higher selection-half average, then the first C of the grid).

    Args:
      train_features: [N, D] pooled features of the training half; labels / groups [N].
      select_features: [N', D] of the selection half; labels / groups [N'].

    Returns:
      ({'kernel': [D, C], 'bias': [C]} in raw feature space,
       {'c': chosen C, 'select_wga': {C: WGA}, 'select_avg': {C: accuracy}}).
    """
    x = np.asarray(train_features, np.float32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = jnp.asarray((x - mean) / std)
    y = jnp.asarray(train_labels, jnp.int32)
    idx = jnp.asarray(
        _balanced_indices(
            np.random.default_rng(cfg.seed), np.asarray(train_groups), cfg.steps, cfg.batch_size
        )
    )
    n, d = xs.shape
    # sklearn's objective ||w||_1 + C * sum_i CE_i, divided by C * N: mean CE + ||w||_1 / (C N).
    l1 = jnp.asarray([1.0 / (c * n) for c in cfg.c_grid], jnp.float32)
    tx = optax.adam(cfg.learning_rate)

    def train_one(l1_strength):
        params = {"kernel": jnp.zeros((d, num_classes)), "bias": jnp.zeros((num_classes,))}

        def loss_fn(p, rows):
            logits = xs[rows] @ p["kernel"] + p["bias"]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[rows]).mean()
            return ce + l1_strength * jnp.sum(jnp.abs(p["kernel"]))

        def body(carry, rows):
            p, opt = carry
            grads = jax.grad(loss_fn)(p, rows)
            updates, opt = tx.update(grads, opt, p)
            return (optax.apply_updates(p, updates), opt), None

        (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), idx)
        return params

    heads = jax.jit(jax.vmap(train_one))(l1)
    xsel = (np.asarray(select_features, np.float32) - mean) / std
    preds = np.argmax(np.einsum("nd,kdc->knc", xsel, heads["kernel"]) + heads["bias"][:, None], -1)
    scores = [
        evaluation.summarize(p, select_labels, select_groups, num_groups, np.ones(num_groups))
        for p in preds
    ]
    # Highest selection-half WGA, ties by the selection-half average, then the first in the grid
    # (as evaluation.improves).
    best = max(range(len(scores)), key=lambda i: (scores[i]["wga"], scores[i]["avg_acc"]))
    kernel = np.asarray(heads["kernel"][best]) / std[:, None]
    bias = np.asarray(heads["bias"][best]) - (mean / std) @ np.asarray(heads["kernel"][best])
    info = {
        "c": cfg.c_grid[best],
        "select_wga": {str(c): s["wga"] for c, s in zip(cfg.c_grid, scores, strict=True)},
        "select_avg": {str(c): s["avg_acc"] for c, s in zip(cfg.c_grid, scores, strict=True)},
    }
    return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}, info
