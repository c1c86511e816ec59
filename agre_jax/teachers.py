"""Teacher training: ERM training of M same-architecture teachers in one compiled computation,
and DFR last-layer retraining of each.

ERM teachers differ by seed (initialisation and data order: teacher m uses seed + m). Their
variables are stacked on a leading axis [M, ...] and one jitted step runs them all with
`lax.map` (or `vmap`). Each keeps its best-on-validation-WGA weights.

Data-parallel (`train_erm(pmap=True)`): the same step under `pmap` over the local devices of
every process, each device on its slice of every teacher's global batch, with the gradients
and BatchNorm statistics averaged over the global batch (as the distillation's step,
agre_jax/distill.py): up to float summation order, the one-device computation.
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

from agre_jax import dfr, distill, evaluation, loop, models, optim
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
    axis_name: str | None = None,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One cross-entropy step of every teacher on its own batch: batch arrays [M, B, ...].

    Under pmap (`axis_name` the device axis; `model`'s BatchNorm is made to average over it),
    B is this device's slice of each teacher's global batch: the gradients, the BatchNorm
    statistics and the metrics are means over the global batch (equal slices)."""
    if axis_name is not None:
        model = model.clone(bn_axis_name=axis_name)

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
        if axis_name is not None:
            grads, loss, acc = jax.lax.pmean((grads, loss, acc), axis_name)
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
    pmap: bool = False,
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
      pmap: data-parallel over every local device (of every process in a multi-process run,
        each feeding its share of each global batch and gathering the validation predictions
        of all; every process must call it): cfg.batch_size must divide over them. False: one
        jitted step on one device (a multi-process run needs True).

    Returns:
      Per teacher {'params', 'batch_stats' (numpy), 'val_wga', 'epoch'} of the kept weights
      ('last': val_wga None, epoch cfg.epochs); the same on every process.
    """
    if jax.process_count() > 1 and not pmap:
        raise ValueError(f"{name}: a multi-process run trains under pmap (pmap=True)")
    m, seed = cfg.num, cfg.seed
    spe = pipeline.steps_per_epoch(data.splits["train"], cfg.batch_size)
    tx = optim.from_config(cfg.optimizer, epochs=cfg.epochs, steps_per_epoch=spe)
    variables = []
    for t in range(m):
        v = models.init(model, jax.random.key(seed + t), data.image_size)
        variables.append(v if init is None else init(v))

    # One compiled call each (stacking, copying, zeros are exact): leaf by leaf, every shape
    # compiled a program of its own (seconds of the tests' tiny runs).
    @jax.jit
    def start(variables):
        members = [
            ModelState(v["params"], v["batch_stats"], tx.init(v["params"])) for v in variables
        ]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *members)

    state = start(variables)
    # Copies in buffers of their own (a separate call): the step donates the state's.
    best_params, best_batch_stats = jax.jit(lambda t: jax.tree.map(jnp.copy, t))(
        (state.params, state.batch_stats)
    )
    carry = {
        "state": state,
        "best_params": best_params,
        "best_batch_stats": best_batch_stats,
        # Strongly typed: a weak-typed float here became float32 after the first evaluation
        # and made the jitted step compile again (30 s on the default).
        "best_wga": jnp.full((m,), -1.0, jnp.float32),
        "best_avg": jnp.full((m,), -1.0, jnp.float32),
        "best_epoch": jnp.zeros((m,), jnp.int32),
    }

    if pmap:
        if jax.process_count() > 1:  # each process feeds and evaluates its share
            data = data.sharded()
        devices = jax.local_device_count()
        hosts = f" in each of {jax.process_count()} processes" if jax.process_count() > 1 else ""
        print(
            f"[{name}] pmap over {devices} devices{hosts}, "
            f"{cfg.batch_size // (devices * jax.process_count())} examples each (per network)"
        )

        def device_step(state, batch):  # [M, B / (P x D), ...] batches on each device
            batch = device_input.augment(batch, data.image_size, data.dtype)
            out, metrics = erm_step(
                {"state": state},
                batch,
                model=model,
                tx=tx,
                how=cfg.map,
                axis_name=distill.AXIS_NAME,
            )
            return out["state"], metrics

        pstep = jax.pmap(device_step, axis_name=distill.AXIS_NAME, donate_argnums=0)

        def step(carry, batch):
            state, metrics = pstep(carry["state"], batch)
            return {**carry, "state": state}, metrics

        # Replicated as the step lays out its outputs: traced once (distill.replicate).
        carry = {**carry, "state": distill.replicate(carry["state"])}
        unreplicate = flax.jax_utils.unreplicate

    else:
        devices = None

        def augmented_step(carry, batch):  # device batches (data.device_augment) finish here
            batch = device_input.augment(batch, data.image_size, data.dtype)
            return erm_step(carry, batch, model=model, tx=tx, how=cfg.map)

        step = jax.jit(augmented_step, donate_argnums=0)
        unreplicate = lambda x: x  # noqa: E731
    logits_fn = stacked_logits_fn(model, cfg.map)

    def batches(epoch: int, start: int):
        streams = [
            data.train_batches(
                batch_size=cfg.batch_size,
                seed=seed + t,
                epoch=epoch,
                start_step=start,
                augment=cfg.augment,
                num_devices=devices,
                prefetch=0,
            )
            for t in range(m)
        ]
        axis = 0 if devices is None else 1  # [M, B, ...] or [D, M, B / D, ...]
        for parts in zip(*streams, strict=True):
            keys = ("image", "label", *device_input.PARAM_KEYS)
            yield {k: np.stack([p[k] for p in parts], axis) for k in keys if k in parts[0]}

    @jax.jit
    def keep_better(carry, state, wga, avg, epoch):  # [M] wga, avg: each teacher's best
        better = evaluation.improves(wga, avg, carry["best_wga"], carry["best_avg"])

        def pick(new, old):
            return jnp.where(better.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

        return {
            "best_params": jax.tree.map(pick, state.params, carry["best_params"]),
            "best_batch_stats": jax.tree.map(pick, state.batch_stats, carry["best_batch_stats"]),
            "best_wga": jnp.where(better, wga, carry["best_wga"]),
            "best_avg": jnp.where(better, avg, carry["best_avg"]),
            "best_epoch": jnp.where(better, epoch + 1, carry["best_epoch"]),
        }

    def evaluate(carry, epoch):
        state = unreplicate(carry["state"])
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        scores = data.evaluate(functools.partial(logits_fn, variables), "validation")
        wga = jnp.asarray([s["wga"] for s in scores], jnp.float32)
        avg = jnp.asarray([s["avg_acc"] for s in scores], jnp.float32)
        best = {k: v for k, v in carry.items() if k.startswith("best_")}
        carry = {**carry, **keep_better(best, state, wga, avg, jnp.int32(epoch))}
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
        # Checkpoints hold one copy (a stage resumes with any layout).
        save_view=lambda c: {**c, "state": unreplicate(c["state"])},
        load_view=lambda c: {**c, "state": distill.replicate(c["state"])} if pmap else c,
    ).run(carry)
    if keep == "last":
        state = unreplicate(carry["state"])
        params, batch_stats = state.params, state.batch_stats
        wga, epochs = [None] * m, [cfg.epochs] * m
    else:
        params, batch_stats = carry["best_params"], carry["best_batch_stats"]
        wga = [float(w) for w in carry["best_wga"]]
        epochs = [int(e) for e in carry["best_epoch"]]
    params, batch_stats = jax.device_get((params, batch_stats))
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
