"""Teacher stages: ERM training of M same-architecture teachers in one compiled computation,
ported teachers, and DFR last-layer retraining.

ERM teachers differ by seed (initialisation and data order: teacher m uses seed + m). Their
variables are stacked on a leading axis [M, ...] and one jitted step runs them all with
`lax.map` (or `vmap`). Each keeps its best-on-validation-WGA weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from agre_jax import checkpoints, dfr, evaluation, loop, models, optim, workdir
from agre_jax.data import pipeline


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

        (loss, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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


def evaluate_stacked(
    logits_fn: Callable, stacked: Any, batches: Iterator, num_groups: int, train_counts
) -> list[dict[str, Any]]:
    """Per-member evaluation summaries of stacked models over evaluation batches."""
    out = evaluation.collect(functools.partial(logits_fn, stacked), batches)
    return [
        evaluation.summarize(
            np.argmax(lg, -1), out["label"], out["group"], num_groups, train_counts
        )
        for lg in out["output"]
    ]


def train_erm(
    *,
    cfg,
    model: models.ResNet,
    data: dict[str, Any],
    directory: Path,
    seed: int,
    init_variables: dict[str, Any] | None,
    progress: bool,
) -> list[dict[str, Any]]:
    """Trains cfg.num ERM teachers together; returns each one's best-on-val-WGA variables.

    Args:
      cfg: config.teachers.
      data: {'train', 'validation'} SplitData, 'image_size', 'num_groups', 'train_counts',
        'eval_batch_size', 'dtype'.
      directory: the stage directory (checkpoints, metrics).
      init_variables: ported backbone weights shared by all teachers (heads stay fresh), or None.
    """
    m = cfg.num
    spe = pipeline.steps_per_epoch(data["train"], cfg.batch_size)
    tx = create_optimizer(cfg.optimizer, cfg.epochs * spe, spe)
    members = []
    for t in range(m):
        v = models.init(model, jax.random.key(seed + t), data["image_size"])
        if init_variables is not None:
            v = _graft_backbone(v, init_variables)
        members.append(ModelState(v["params"], v["batch_stats"], tx.init(v["params"])))
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *members)
    carry = {
        "state": state,
        "best_params": jax.tree.map(jnp.copy, state.params),  # own buffers: the step donates
        "best_batch_stats": jax.tree.map(jnp.copy, state.batch_stats),
        "best_wga": jnp.full((m,), -1.0),
        "best_epoch": jnp.zeros((m,), jnp.int32),
    }
    step = jax.jit(functools.partial(erm_step, model=model, tx=tx, how=cfg.map), donate_argnums=0)
    logits_fn = stacked_logits_fn(model, cfg.map)

    def batches(epoch: int, start: int):
        streams = [
            pipeline.train_epoch(
                data["train"],
                batch_size=cfg.batch_size,
                image_size=data["image_size"],
                seed=seed + t,
                epoch=epoch,
                start_step=start,
                augment=cfg.augment,
                prefetch=0,
                dtype=data["dtype"],
            )
            for t in range(m)
        ]
        for parts in zip(*streams, strict=True):
            yield {k: np.stack([p[k] for p in parts]) for k in ("image", "label")}

    def evaluate(carry, epoch):
        variables = {"params": carry["state"].params, "batch_stats": carry["state"].batch_stats}
        scores = evaluate_stacked(
            logits_fn,
            variables,
            eval_batches(data, "validation"),
            data["num_groups"],
            data["train_counts"],
        )
        wga = jnp.asarray([s["wga"] for s in scores])
        better = wga > carry["best_wga"]

        def pick(new, old):
            return jnp.where(better.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

        carry = {
            **carry,
            "best_params": jax.tree.map(pick, carry["state"].params, carry["best_params"]),
            "best_batch_stats": jax.tree.map(
                pick, carry["state"].batch_stats, carry["best_batch_stats"]
            ),
            "best_wga": jnp.where(better, wga, carry["best_wga"]),
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
        return line

    carry = loop.Loop(
        name="teachers",
        directory=directory,
        epochs=cfg.epochs,
        steps_per_epoch=spe,
        batches=batches,
        step=lambda c, b, s: step(c, b),
        evaluate=evaluate,
        summary=summary,
        progress=progress,
    ).run(carry)
    return [
        {
            "params": jax.tree.map(lambda x, t=t: np.asarray(x[t]), carry["best_params"]),
            "batch_stats": jax.tree.map(lambda x, t=t: np.asarray(x[t]), carry["best_batch_stats"]),
            "val_wga": float(carry["best_wga"][t]),
            "epoch": int(carry["best_epoch"][t]),
        }
        for t in range(m)
    ]


def eval_batches(data: dict[str, Any], split: str) -> Iterator:
    """Evaluation batches of a split of `data` (every example once, with a mask)."""
    return pipeline.eval_batches(
        data[split],
        batch_size=data["eval_batch_size"],
        image_size=data["image_size"],
        dtype=data["dtype"],
        prefetch=0,
    )


def create_optimizer(
    opt_cfg, total_steps: int, steps_per_epoch: int
) -> optax.GradientTransformation:
    """The optax optimiser of a config.*.optimizer block."""
    return optim.create_optimizer(
        opt_cfg.name,
        opt_cfg.learning_rate,
        total_steps,
        momentum=opt_cfg.momentum,
        weight_decay=opt_cfg.weight_decay,
        schedule=opt_cfg.schedule,
        warmup_steps=int(opt_cfg.warmup_epochs * steps_per_epoch),
    )


def _graft_backbone(fresh: dict[str, Any], ported: dict[str, Any]) -> dict[str, Any]:
    """Ported weights for everything but the head (`fc`), whose size may differ."""
    params = dict(ported["params"])
    params["fc"] = fresh["params"]["fc"]
    return {"params": params, "batch_stats": ported["batch_stats"]}


def load_ported(
    paths: Sequence[str], num_classes: int
) -> tuple[models.ResNet, list[dict[str, Any]], list[dict[str, Any]]]:
    """Ported teachers (directories of `python -m convert`), one architecture for all.

    Returns:
      (model, variables per teacher, provenance per teacher).
    """
    variables, infos = [], []
    for path in paths:
        v, info = checkpoints.load_variables(path)
        if info.get("num_classes") != num_classes:
            raise ValueError(
                f"teacher checkpoint {path} has {info.get('num_classes')} classes but the "
                f"dataset has {num_classes}"
            )
        variables.append(v)
        infos.append(info)
    archs = {(i["arch"], json_key(i.get("model_options", {}))) for i in infos}
    if len(archs) != 1:
        raise ValueError(
            f"ported teachers must share one architecture to be stacked; got {sorted(archs)}"
        )
    model = model_from_provenance(infos[0])
    check_variables(model, variables[0], paths[0], 32)
    return model, variables, infos


def json_key(options: dict) -> str:
    return workdir.key_of(options)


def model_from_provenance(info: dict[str, Any]) -> models.ResNet:
    options = dict(info.get("model_options", {}))
    options.pop("num_classes", None)
    return models.create(info["arch"], info["num_classes"], **options)


def check_variables(model: models.ResNet, variables: dict, source: str, image_size: int) -> None:
    """Raises a clear error when `variables` do not fit `model` (keys or shapes)."""
    expected = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jnp.zeros((1, image_size, image_size, 3)),
    )
    want = {
        jax.tree_util.keystr(k): v.shape
        for k, v in jax.tree_util.tree_leaves_with_path(
            {"params": expected["params"], "batch_stats": expected["batch_stats"]}
        )
    }
    got = {
        jax.tree_util.keystr(k): np.shape(v)
        for k, v in jax.tree_util.tree_leaves_with_path(
            {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        )
    }
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shapes = sorted(k for k in set(want) & set(got) if tuple(want[k]) != tuple(got[k]))
    if missing or unexpected or shapes:
        raise ValueError(
            f"the weights in {source} do not fit the configured model "
            f"({model.block_cls.__name__}, width "
            f"{model.width}, {model.num_classes} classes): missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatches {[(k, got[k], want[k]) for k in shapes[:5]]}"
        )


def fit_dfr_heads(
    *,
    cfg,
    model: models.ResNet,
    teacher_variables: Sequence[dict[str, Any]],
    data: dict[str, Any],
    seed: int,
    how: str,
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, Any]]]:
    """DFR heads for every ERM teacher: pooled validation features (no augmentation), a
    group-stratified half to train on, the other half to select the L1 strength."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *teacher_variables)

    def pooled(v, images):
        return models.apply_with_features(model, v, images, layers=("pooled",))[1]["pooled"]

    pooled_fn = jax.jit(
        lambda s, x: models.map_stacked(functools.partial(pooled, images=x), s, how)
    )
    out = evaluation.collect(
        functools.partial(pooled_fn, stacked), eval_batches(data, "validation")
    )
    feats, labels, groups = out["output"], out["label"], out["group"]
    train_idx, select_idx = pipeline.split_halves(groups, seed)
    dfr_cfg = dfr.DFRConfig(
        c_grid=tuple(cfg.c_grid),
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        seed=seed,
    )
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
            num_groups=data["num_groups"],
            cfg=dfr_cfg,
        )
        heads.append(head)
        infos.append(info)
    return heads, infos
