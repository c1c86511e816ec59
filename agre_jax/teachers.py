"""Teacher training: ERM training of M same-architecture teachers in one compiled computation,
and DFR last-layer retraining of each.

ERM teachers differ by seed (initialisation and data order: teacher m uses seed + m). Their
variables are stacked on a leading axis [M, ...] and one jitted step runs them all with
`lax.map` (or `vmap`). Each keeps its best-on-validation-WGA weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from agre_jax import dfr, evaluation, loop, models, optim
from agre_jax.data import device_input, pipeline


class ModelState(flax.struct.PyTreeNode):
    """Trainable state of one classifier (stacked [M, ...] for a teacher ensemble)."""

    params: Any
    batch_stats: Any
    opt_state: Any


def erm_step(
    carry: dict[str, Any],
    batch: dict[str, jax.Array],
    *,
    model: models.ResNet,
    tx: optax.GradientTransformation,
    how: str,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One cross-entropy step of every teacher on its own batch: batch arrays [M, B, ...]."""

    def one(member):
        state, images, labels = member

        def loss_fn(params):
            logits, new_state = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return ce, (new_state["batch_stats"], jnp.mean(jnp.argmax(logits, -1) == labels))

        with jax.named_scope("teacher"):  # labels the profile (benchmarks/profile_step.py)
            (loss, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params
            )
        with jax.named_scope("optimizer"):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = ModelState(optax.apply_updates(state.params, updates), batch_stats, opt_state)
        return new, (loss, acc)

    state, (loss, acc) = models.map_stacked(
        one, (carry["state"], batch["image"], batch["label"]), how
    )
    return {**carry, "state": state}, {
        "loss": jnp.mean(loss),
        "accuracy": jnp.mean(acc),
        **{f"loss/{m}": v for m, v in enumerate(loss)},
    }


def stacked_logits_fn(model: models.ResNet, how: str) -> Callable[[Any, jax.Array], jax.Array]:
    """jit: (stacked variables [M, ...], images [B, ...]) -> logits [M, B, C]."""

    def fn(stacked, images):
        return models.map_stacked(lambda v: model.apply(v, images, train=False), stacked, how)

    return jax.jit(fn)


def train_erm(
    *,
    cfg: Any,
    model: models.ResNet,
    data: Any,
    directory: Path,
    init: Callable[[dict[str, Any]], dict[str, Any]] | None,
    progress: bool,
    name: str = "teachers",
    keep: str = "best",
) -> list[dict[str, Any]]:
    """Trains cfg.num ERM teachers together; returns each one's best-on-val-WGA variables.

    Teacher m uses seed cfg.seed + m for its initialisation and data order.

    Args:
      cfg: config.teachers (num, seed, epochs, batch_size, augment, optimizer, map).
      data: a stages.Dataset.
      directory: the stage directory (checkpoints, metrics).
      init: maps a teacher's fresh variables to its starting ones (init_from weights grafted
        on, own head), or None.
      name: the stage's name in logs ('pretrain' trains one network on the pretraining task).
      keep: which weights to return: 'best' (the epoch of best validation WGA) or 'last'.

    Returns:
      Per teacher {'params', 'batch_stats' (numpy), 'val_wga', 'epoch'} of the kept weights
      ('last': val_wga None, epoch cfg.epochs).
    """
    m, seed = cfg.num, cfg.seed
    spe = pipeline.steps_per_epoch(data.splits["train"], cfg.batch_size)
    tx = optim.from_config(cfg.optimizer, epochs=cfg.epochs, steps_per_epoch=spe)
    members = []
    for t in range(m):
        v = models.init(model, jax.random.key(seed + t), data.image_size)
        if init is not None:
            v = init(v)
        members.append(ModelState(v["params"], v["batch_stats"], tx.init(v["params"])))
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *members)
    carry = {
        "state": state,
        "best_params": jax.tree.map(jnp.copy, state.params),  # own buffers: the step donates
        "best_batch_stats": jax.tree.map(jnp.copy, state.batch_stats),
        # Strongly typed: a weak-typed float here became float32 after the first evaluation
        # and made the jitted step compile again (30 s on the default).
        "best_wga": jnp.full((m,), -1.0, jnp.float32),
        "best_avg": jnp.full((m,), -1.0, jnp.float32),
        "best_epoch": jnp.zeros((m,), jnp.int32),
    }

    def augmented_step(carry, batch):  # device batches (data.device_augment) finish here
        batch = device_input.augment(batch, data.image_size, data.dtype)
        return erm_step(carry, batch, model=model, tx=tx, how=cfg.map)

    step = jax.jit(augmented_step, donate_argnums=0)
    logits_fn = stacked_logits_fn(model, cfg.map)

    def batches(epoch: int, start: int):
        streams = [
            data.train_batches(
                batch_size=cfg.batch_size,
                seed=seed + t,
                epoch=epoch,
                start_step=start,
                augment=cfg.augment,
                prefetch=0,
            )
            for t in range(m)
        ]
        for parts in zip(*streams, strict=True):
            keys = ("image", "label", *device_input.PARAM_KEYS)
            yield {k: np.stack([p[k] for p in parts]) for k in keys if k in parts[0]}

    def evaluate(carry, epoch):
        variables = {"params": carry["state"].params, "batch_stats": carry["state"].batch_stats}
        scores = data.evaluate(functools.partial(logits_fn, variables), "validation")
        wga = jnp.asarray([s["wga"] for s in scores], jnp.float32)
        avg = jnp.asarray([s["avg_acc"] for s in scores], jnp.float32)
        better = evaluation.improves(wga, avg, carry["best_wga"], carry["best_avg"])

        def pick(new, old):
            return jnp.where(better.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

        carry = {
            **carry,
            "best_params": jax.tree.map(pick, carry["state"].params, carry["best_params"]),
            "best_batch_stats": jax.tree.map(
                pick, carry["state"].batch_stats, carry["best_batch_stats"]
            ),
            "best_wga": jnp.where(better, wga, carry["best_wga"]),
            "best_avg": jnp.where(better, avg, carry["best_avg"]),
            "best_epoch": jnp.where(better, epoch + 1, carry["best_epoch"]),
        }
        return carry, {
            "val_wga": [s["wga"] for s in scores],
            "val_avg": [s["avg_acc"] for s in scores],
        }

    def summary(epoch, means, ev):
        line = f"train loss {means['loss']:.4f} acc {100 * means['accuracy']:.1f}"
        if ev:
            line += " | val WGA " + " ".join(f"{100 * w:.1f}" for w in ev["val_wga"])
            line += " avg " + " ".join(f"{100 * a:.1f}" for a in ev["val_avg"])
        return line

    carry = loop.Loop(
        name=name,
        directory=directory,
        epochs=cfg.epochs,
        steps_per_epoch=spe,
        batches=batches,
        step=lambda c, b, s: step(c, b),
        evaluate=evaluate,
        summary=summary,
        progress=progress,
    ).run(carry)
    if keep == "last":
        params, batch_stats = carry["state"].params, carry["state"].batch_stats
        wga, epochs = [None] * m, [cfg.epochs] * m
    else:
        params, batch_stats = carry["best_params"], carry["best_batch_stats"]
        wga = [float(w) for w in carry["best_wga"]]
        epochs = [int(e) for e in carry["best_epoch"]]
    return [
        {
            "params": jax.tree.map(lambda x, t=t: np.asarray(x[t]), params),
            "batch_stats": jax.tree.map(lambda x, t=t: np.asarray(x[t]), batch_stats),
            "val_wga": wga[t],
            "epoch": epochs[t],
        }
        for t in range(m)
    ]


def fit_dfr_heads(
    *,
    cfg: dfr.DFRConfig,
    model: models.ResNet,
    teacher_variables: Sequence[dict[str, Any]],
    data: Any,
    how: str,
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, Any]]]:
    """DFR heads for every ERM teacher: pooled validation features (no augmentation), a
    group-stratified half (seeded by cfg.seed) to train on, the other half to select the L1
    strength.

    Args:
      cfg: DFR settings.
      teacher_variables: M ERM variables of `model`.
      data: a stages.Dataset.
      how: how stacked teachers run (models.map_stacked).

    Returns:
      (M heads {'kernel': [D, C], 'bias': [C]}, M selection records).
    """
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *teacher_variables)

    def pooled(v, images):
        return models.apply_with_features(model, v, images, layers=("pooled",))[1]["pooled"]

    pooled_fn = jax.jit(
        lambda s, x: models.map_stacked(functools.partial(pooled, images=x), s, how)
    )
    out = evaluation.collect(functools.partial(pooled_fn, stacked), data.eval_batches("validation"))
    feats, labels, groups = out["output"], out["label"], out["group"]
    train_idx, select_idx = pipeline.split_halves(groups, cfg.seed)
    heads, infos = [], []
    for f in feats:
        head, info = dfr.fit(
            f[train_idx],
            labels[train_idx],
            groups[train_idx],
            f[select_idx],
            labels[select_idx],
            groups[select_idx],
            num_classes=model.num_classes,
            num_groups=data.num_groups,
            cfg=cfg,
        )
        heads.append(head)
        infos.append(info)
    return heads, infos
