"""Group-robust evaluation: per-group accuracy, worst-group accuracy (WGA) and both averages.

Conventions (DESIGN.md, stated in every report):
- WGA = min over groups of the accuracy within the group (groups with no example ignored).
- `avg_acc`: plain accuracy over all evaluated examples.
- `avg_acc_weighted`: group accuracies weighted by the TRAINING set's group proportions (the
  DFR / JTT convention; on Waterbirds it differs a lot from the plain test average).
- `gap` = avg_acc_weighted - WGA.
- Model selection (`improves`): the higher validation WGA, ties broken by the higher plain
  validation average (so that a split whose WGA is stuck, e.g. at 0 on many small groups, still
  selects by something).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agre_jax import distributed

SELECTION_RULE = "val_wga, then val_avg"  # in the teacher stage's key
SELECTION = (
    "selected by worst-group accuracy on the validation split (ties: the validation average)"
)


def summarize(
    predictions: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    num_groups: int,
    train_group_counts: Sequence[int],
) -> dict[str, Any]:
    """Metrics of one model on one split.

    Args:
      predictions, labels, groups: [N] integers.
      num_groups: G.
      train_group_counts: [G] training-set counts, for the weighted average.

    Returns:
      {'group_acc': [G] (NaN where a group is empty), 'group_count': [G], 'wga',
       'worst_group', 'avg_acc', 'avg_acc_weighted', 'gap', 'n'} as plain Python values.
    """
    predictions, labels, groups = (
        np.asarray(a).astype(np.int64) for a in (predictions, labels, groups)
    )
    correct = predictions == labels
    counts = np.bincount(groups, minlength=num_groups)[:num_groups]
    hits = np.bincount(groups, weights=correct, minlength=num_groups)[:num_groups]
    acc = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
    present = counts > 0
    worst = int(np.nanargmin(acc)) if present.any() else -1
    weights = np.asarray(train_group_counts, np.float64)[:num_groups] * present
    weighted = (
        float(np.nansum(acc * weights) / weights.sum()) if weights.sum() > 0 else float("nan")
    )
    wga = float(acc[worst]) if worst >= 0 else float("nan")
    return {
        "group_acc": [float(a) for a in acc],
        "group_count": [int(c) for c in counts],
        "wga": wga,
        "worst_group": worst,
        "avg_acc": float(correct.mean()) if correct.size else float("nan"),
        "avg_acc_weighted": weighted,
        "gap": weighted - wga,
        "n": int(correct.size),
    }


def improves(wga: Any, avg: Any, best_wga: Any, best_avg: Any) -> jax.Array:
    """Whether a checkpoint with validation (wga, avg) replaces the best so far: wga higher, or
    equal and avg higher. Elementwise over stacked models ([M] arrays) or scalars; the
    comparison is in float32, the dtype the selection carries keep, so that an accuracy equal
    to the stored best is a tie and not a rounding difference."""
    wga, avg, best_wga, best_avg = (
        jnp.asarray(x, jnp.float32) for x in (wga, avg, best_wga, best_avg)
    )
    return (wga > best_wga) | ((wga == best_wga) & (avg > best_avg))


def collect(
    fn: Callable[[jax.Array], jax.Array],
    batches: Iterable[Mapping[str, Any]],
    all_processes: bool = False,
) -> dict[str, np.ndarray]:
    """Runs `fn(images) -> [..., B, K]` (logits or features) over evaluation batches and keeps
    the real (mask == 1) examples. Works for [B, ...] and pmap [D, B/D, ...] batches alike; a
    leading model axis of the outputs (e.g. [M, B, K] for stacked teachers) is kept.

    With `all_processes`, `batches` are this process's share of a multi-process evaluation
    (`Dataset.sharded`): the outputs of every process are gathered (distributed.allgather),
    so that every process returns every example once, process by process.

    Returns:
      {'output': [..., N, K], 'label': [N], 'group': [N]}.
    """
    logits, labels, groups, masks = [], [], [], []
    for batch in batches:
        out = np.asarray(fn(batch["image"]))
        mask = np.asarray(batch["mask"]).reshape(-1) > 0
        lead = out.shape[: out.ndim - np.asarray(batch["mask"]).ndim - 1]
        logits.append(out.reshape(lead + (-1, out.shape[-1])))
        labels.append(np.asarray(batch["label"]).reshape(-1))
        groups.append(np.asarray(batch["group"]).reshape(-1))
        masks.append(mask)
    local = {
        "output": np.concatenate(logits, axis=-2),
        "label": np.concatenate(labels),
        "group": np.concatenate(groups),
        "mask": np.concatenate(masks),
    }
    if all_processes:  # [P, ...] -> the processes' rows one after the other
        every = distributed.allgather(local)
        local = {
            "output": np.concatenate(list(every["output"]), axis=-2),
            **{k: every[k].reshape(-1) for k in ("label", "group", "mask")},
        }
    keep = local.pop("mask")
    return {
        "output": local["output"][..., keep, :],
        "label": local["label"][keep],
        "group": local["group"][keep],
    }


def ensemble_predictions(logits: np.ndarray) -> dict[str, np.ndarray]:
    """[M, N, C] member logits -> predictions of the averaged-logits ensemble and of the
    majority vote (ties to the lowest class)."""
    avg = np.argmax(logits.mean(axis=0), axis=-1)
    votes = np.argmax(logits, axis=-1)  # [M, N]
    counts = np.apply_along_axis(np.bincount, 0, votes, minlength=logits.shape[-1])
    return {"avg_logits": avg, "majority": np.argmax(counts, axis=0)}


def evaluate(
    fn: Callable[[jax.Array], jax.Array],
    batches: Iterable[Mapping[str, Any]],
    num_groups: int,
    train_group_counts: Sequence[int],
    all_processes: bool = False,
) -> dict[str, Any] | list[dict[str, Any]]:
    """`summarize` of the argmax predictions of `fn` over evaluation batches.

    Args:
      fn: images -> logits [B, C], or [M, B, C] for M stacked models.
      all_processes: gather the predictions of every process first (see `collect`).

    Returns:
      One summary, or a list of M summaries for stacked models.
    """
    out = collect(fn, batches, all_processes)

    def one(logits: np.ndarray) -> dict[str, Any]:
        return summarize(
            np.argmax(logits, -1), out["label"], out["group"], num_groups, train_group_counts
        )

    logits = out["output"]
    return one(logits) if logits.ndim == 2 else [one(lg) for lg in logits]


def format_table(
    rows: Mapping[str, Mapping[str, Any]], group_names: Sequence[str], title: str = ""
) -> str:
    """A Markdown table: one row per model with WGA, both averages, gap and group accuracies."""
    head = ["model", "n", "WGA", "avg (train-weighted)", "avg (plain)", "gap", "worst group"]
    head += [f"acc {g}" for g in group_names]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [
            name,
            str(r["n"]),
            _pct(r["wga"]),
            _pct(r["avg_acc_weighted"]),
            _pct(r["avg_acc"]),
            _pct(r["gap"]),
            group_names[r["worst_group"]] if r["worst_group"] >= 0 else "-",
        ]
        cells += [_pct(a) for a in r["group_acc"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"
