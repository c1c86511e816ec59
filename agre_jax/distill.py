"""The distillation step: frozen teachers and biased model, teacher weighting, weighted KD,
cross-entropy and multi-layer feature losses, one optax update. Pure; compiled with
`jax.jit` on one device and `jax.pmap(axis_name='batch')` across devices from one body.

Shapes: B = per-device batch, M = number of teachers, C = classes.

Teacher groups of different feature shapes (e.g. ResNet-50 and ResNet-18 teachers) are
partitioned into feature classes (`feature_classes`): groups whose features agree in shape
(channels, and stride on spatial layers) on every layer with a gamma > 0 form one class. Each
class has its own adapters and its own target, the teacher-weighted average of its teachers'
features with the weights renormalised within the class; the class's loss is weighted by its
share of the teacher weights (losses.class_feature_loss). An ensemble of one class (every
one-architecture ensemble, and ResNet-18 with ResNet-34) runs exactly the one-class step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from agre_jax import losses, models, weighting

TEACHER_MAPS = models.STACK_MAPS
AXIS_NAME = "batch"


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Static settings of the step (hashable; validated on construction).

    Attributes:
      temperature: tau of the KD loss.
      alpha: L = alpha * L_wKD + (1 - alpha) * CE + L_feat.
      weighting: one of weighting.METHODS.
      grad_scope: 'full' (all student parameters, the paper's theta) or 'last_layer' (fc).
      normalize_grads: cosine (paper) or raw dot product (paper Table 6 ablation).
      empty_rows: 'uniform' or 'drop' for rows where every teacher pulls with the biased model.
      gram: how full-scope Gram matrices are computed (weighting.GRAM_METHODS): 'layerwise'
        (from layer inputs and output cotangents, no per-sample gradients) or 'vmap'
        (vmapped per-sample Jacobians; any model).
      chunk_size: samples per chunk of the per-sample Gram computation.
      batch_min_weight: lower clip of `agre_batch` weights before normalising.
      aekd_cap: AE-KD's upper bound C of every teacher's weight (its code's `-C`, 0.6), in
        (0, 1]; needs C * M >= 1.
      batch_bn: `agre_batch`'s batch-mean gradients (weighting.BATCH_BN): 'through' the
        training-mode forward's BatchNorm statistics (the earlier PyTorch code; the step's own
        pullback, no extra forward) or with them 'fixed' (an extra forward; the convention of
        the per-sample weights).
      gammas: ((layer, gamma), ...) for the feature loss; gamma 0 layers are ignored.
      feature_loss: 'mse' (through 1x1-conv / Dense adapters), 'attention' (transfer) or
        'crd' (contrastive, losses.crd_loss, through models.CRDHeads; the `pooled` layer only).
        Teachers of different feature shapes: one target (and adapters, or CRD heads) per
        feature class, see `feature_classes` and `distill_step`.
      crd_dim: CRD's embedding width d.
      crd_temperature: CRD's InfoNCE temperature.
      feature_dropout: feature-channel dropout rate in the feature loss.
      feature_weighting: the feature targets' teacher weights (weighting.FEATURE_WEIGHTINGS):
        'shared' (the KD's weights) or 'agre' (per layer, from the cosines of the feature
        losses' own gradients, weighting.feature_agre_weights; over the student's and the
        adapters' parameters, BatchNorm statistics fixed, without feature dropout; computed
        by `gram`, needs the biased model's features at the teachers' shapes, and teachers
        of one feature class).
      teacher_map: how a stack of teachers runs, see models.map_stacked.
    """

    temperature: float = 4.0
    alpha: float = 1.0
    weighting: str = "agre"
    grad_scope: str = "full"
    normalize_grads: bool = True
    empty_rows: str = "uniform"
    gram: str = "layerwise"
    chunk_size: int = 8
    batch_min_weight: float = 0.01
    batch_bn: str = "through"
    aekd_cap: float = 0.6
    gammas: tuple[tuple[str, float], ...] = ()
    feature_loss: str = "mse"
    crd_dim: int = 128
    crd_temperature: float = 0.07
    feature_dropout: float = 0.0
    feature_weighting: str = "shared"
    teacher_map: str = "unroll"

    def __post_init__(self):
        def check(ok: bool, what: str):
            if not ok:
                raise ValueError(f"invalid distillation config: {what}")

        check(
            math.isfinite(self.temperature) and self.temperature > 0,
            f"temperature must be a finite number > 0, got {self.temperature}",
        )
        check(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        check(
            self.weighting in weighting.METHODS,
            f"unknown weighting {self.weighting!r}; expected one of {weighting.METHODS}",
        )
        check(
            self.grad_scope in weighting.GRAD_SCOPES,
            f"unknown grad_scope {self.grad_scope!r}; expected one of {weighting.GRAD_SCOPES}",
        )
        check(
            self.empty_rows in weighting.EMPTY_ROWS,
            f"unknown empty_rows {self.empty_rows!r}; expected one of {weighting.EMPTY_ROWS}",
        )
        check(
            self.gram in weighting.GRAM_METHODS,
            f"unknown gram {self.gram!r}; expected one of {weighting.GRAM_METHODS}",
        )
        check(self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}")
        check(
            0.0 <= self.batch_min_weight < 1.0,
            f"batch_min_weight must be in [0, 1), got {self.batch_min_weight}",
        )
        check(
            self.batch_bn in weighting.BATCH_BN,
            f"unknown batch_bn {self.batch_bn!r}; expected one of {weighting.BATCH_BN}",
        )
        check(0.0 < self.aekd_cap <= 1.0, f"aekd_cap must be in (0, 1], got {self.aekd_cap}")
        names = [name for name, _ in self.gammas]
        unknown = [n for n in names if n not in models.LAYERS]
        check(not unknown, f"unknown feature layers {unknown}; expected any of {models.LAYERS}")
        check(len(set(names)) == len(names), f"feature layers listed twice: {names}")
        negative = {n: g for n, g in self.gammas if not (g >= 0 and math.isfinite(g))}
        check(not negative, f"gammas must be >= 0 and finite, got {negative}")
        check(
            self.feature_loss in losses.FEATURE_LOSSES,
            f"unknown feature_loss {self.feature_loss!r}; expected one of {losses.FEATURE_LOSSES}",
        )
        check(
            not (self.feature_loss == "attention" and "pooled" in self.feature_layers),
            "attention transfer needs spatial layers; 'pooled' has none",
        )
        check(
            self.feature_loss != "crd" or self.feature_layers in ((), ("pooled",)),
            f"CRD contrasts pooled embeddings: set only gammas.pooled, not {self.feature_layers}",
        )
        check(
            self.feature_loss != "crd" or self.feature_dropout == 0,
            "feature_dropout does not apply to crd; set it to 0",
        )
        check(self.crd_dim >= 1, f"crd_dim must be >= 1, got {self.crd_dim}")
        check(
            math.isfinite(self.crd_temperature) and self.crd_temperature > 0,
            f"crd_temperature must be a finite number > 0, got {self.crd_temperature}",
        )
        check(
            0.0 <= self.feature_dropout < 1.0,
            f"feature_dropout must be in [0, 1), got {self.feature_dropout}",
        )
        check(
            self.feature_weighting in weighting.FEATURE_WEIGHTINGS,
            f"unknown feature_weighting {self.feature_weighting!r}; expected one of "
            f"{weighting.FEATURE_WEIGHTINGS}",
        )
        check(
            self.feature_weighting == "shared" or self.feature_layers,
            "feature_weighting 'agre' weights the feature loss: set a gamma > 0",
        )
        check(
            self.feature_weighting == "shared" or self.feature_loss != "crd",
            "feature_weighting 'agre' needs a per-layer feature loss ('mse' or 'attention'), "
            "not 'crd'",
        )
        check(
            self.teacher_map in TEACHER_MAPS,
            f"unknown teacher_map {self.teacher_map!r}; expected one of {TEACHER_MAPS}",
        )

    @property
    def feature_layers(self) -> tuple[str, ...]:
        """Layers with gamma > 0, in models.LAYERS order."""
        active = {name for name, gamma in self.gammas if gamma > 0}
        return tuple(name for name in models.LAYERS if name in active)

    @property
    def feature_agre(self) -> bool:
        """Whether the feature targets get their own per-layer AGRE weights."""
        return self.feature_weighting == "agre"  # refused above without a feature layer

    @property
    def needs_gram(self) -> bool:
        """Whether agre needs per-sample Gram matrices (not the two-class closed form)."""
        return self.weighting == "agre" and self.grad_scope == "full"


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """Static description of the frozen models.

    Attributes:
      teachers: one model per architecture group; the group's variables are stacked on a
        leading axis of size `group_sizes[g]` in the frozen pytree.
      group_sizes: teachers per group (M = sum).
      biased: a separate biased model, or None when it shares a teacher's backbone.
      biased_backbone: (group, index) of the teacher whose backbone the biased model shares
        (e.g. the ERM version of a DFR teacher); its own `fc` head is in the frozen pytree.
    """

    teachers: tuple[models.ResNet, ...]
    group_sizes: tuple[int, ...]
    biased: models.ResNet | None = None
    biased_backbone: tuple[int, int] | None = None

    def __post_init__(self):
        if len(self.teachers) != len(self.group_sizes) or not self.teachers:
            raise ValueError("need one group size per teacher architecture group")
        if min(self.group_sizes) < 1:
            raise ValueError(f"every teacher group needs >= 1 teacher, got {self.group_sizes}")
        if (self.biased is None) == (self.biased_backbone is None):
            raise ValueError("give exactly one of a biased model or a shared teacher backbone")
        if self.biased_backbone is not None:
            g, i = self.biased_backbone
            if not (0 <= g < len(self.teachers) and 0 <= i < self.group_sizes[g]):
                raise ValueError(f"biased_backbone {self.biased_backbone} is not a teacher")

    @property
    def num_teachers(self) -> int:
        return sum(self.group_sizes)


@dataclasses.dataclass(frozen=True)
class Models:
    """Student, adapters and frozen ensemble (static parts of the step).

    `adapters`: None (no feature loss, or attention transfer), FeatureAdapters ('mse', one
    feature class), ClassAdapters ('mse', several feature classes: params {'class_k': ...}) or
    CRDHeads ('crd'; per-class teacher heads when the classes' pooled widths differ).
    """

    student: models.ResNet
    adapters: models.FeatureAdapters | models.ClassAdapters | models.CRDHeads | None
    ensemble: Ensemble


class TrainState(flax.struct.PyTreeNode):
    """What is trained: {'student', 'adapters'} params, the student's BatchNorm statistics,
    the optimiser state and the step. Teachers are never part of it."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def feature_classes(ens: Ensemble, layers: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Partitions the teacher groups into feature classes for the feature layers `layers`.

    Two groups are in one class when their features have the same shape on every layer of
    `layers`: the same channels, and the same stride on spatial layers (so the same spatial
    size). Classes are ordered by their first group and list their groups in group order:
    class 0 holds group 0, and an ensemble whose groups all agree (every one-group ensemble,
    ResNet-18 with ResNet-34, any ensemble without feature layers) is the one class
    (0, 1, ..., G - 1).

    Returns:
      Per class, its group indices.
    """
    out: dict[tuple[Any, ...], list[int]] = {}
    for g, model in enumerate(ens.teachers):
        channels, strides = models.feature_channels(model), models.feature_strides(model)
        key = tuple((channels[name], strides.get(name)) for name in layers)
        out.setdefault(key, []).append(g)
    return tuple(tuple(groups) for groups in out.values())


def class_teachers(ens: Ensemble, classes: Sequence[Sequence[int]]) -> tuple[np.ndarray, ...]:
    """Per feature class, its teachers' positions on the ensemble's teacher axis M (the axis of
    the [M, B, C] logits and of the [B, M] weights), in the order of the class's stacked
    features from `ensemble_forward(by_class=True)`."""
    starts = np.cumsum((0,) + tuple(ens.group_sizes))
    return tuple(
        np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups]) for groups in classes
    )


def create_models(student: models.ResNet, ensemble: Ensemble, cfg: DistillConfig) -> Models:
    """Validates the models against the config and builds the adapters.

    Teacher groups of different feature shapes on the feature layers form several feature
    classes (`feature_classes`): 'mse' then gets one FeatureAdapters per class (a
    ClassAdapters), 'attention' none, and 'crd' one teacher head stack per class. Refused with
    several classes: feature_weighting 'agre' (its per-layer cosines compare each teacher's
    feature-loss gradient with the biased model's through one set of adapters, which teachers
    of another class do not share).
    """
    classes = {("teacher group", g): m.num_classes for g, m in enumerate(ensemble.teachers)}
    if ensemble.biased is not None:
        classes[("biased model", 0)] = ensemble.biased.num_classes
    wrong = {
        k[0] + (f" {k[1]}" if k[0] != "biased model" else ""): c
        for k, c in classes.items()
        if c != student.num_classes
    }
    if wrong:
        raise ValueError(
            f"class counts disagree: the student has {student.num_classes} classes but {wrong}"
        )
    layers = cfg.feature_layers
    adapters = None
    if layers:
        widths = {k: models.feature_channels(m) for k, m in enumerate(ensemble.teachers)}
        strides = {k: models.feature_strides(m) for k, m in enumerate(ensemble.teachers)}
        classes = feature_classes(ensemble, layers)
        if cfg.feature_agre and len(classes) > 1:
            raise ValueError(
                "feature_weighting 'agre' needs teachers of equal feature shapes on "
                f"{list(layers)}: teacher groups {classes} form {len(classes)} feature classes "
                "of different widths or strides, and its per-layer cosines compare every "
                "teacher's feature-loss gradient with the biased model's through one set of "
                "adapters; use feature_weighting 'shared'"
            )
        if cfg.feature_agre and ensemble.biased is not None:
            b_widths = models.feature_channels(ensemble.biased)
            b_strides = models.feature_strides(ensemble.biased)
            for name in layers:
                if b_widths[name] != widths[0][name] or (
                    name != "pooled" and b_strides[name] != strides[0][name]
                ):
                    raise ValueError(
                        f"feature_weighting 'agre' compares the biased model's {name!r} "
                        f"features with the teachers': widths {b_widths[name]} against "
                        f"{widths[0][name]}; expected a biased model of the teachers' "
                        "architecture"
                    )
        s_strides = models.feature_strides(student)
        for k in strides:
            for name in layers:
                if name != "pooled" and s_strides[name] > strides[k][name]:
                    which = "teachers'" if len(classes) == 1 else f"teacher group {k}'s"
                    raise ValueError(
                        f"student {name} is coarser (stride {s_strides[name]}) than the "
                        f"{which} (stride {strides[k][name]}): cannot pool it to the "
                        "teacher's size"
                    )
        if cfg.feature_loss == "mse" and len(classes) == 1:
            adapters = models.create_adapters(student, ensemble.teachers[0], layers)
        elif cfg.feature_loss == "mse":
            heads = [ensemble.teachers[groups[0]] for groups in classes]
            adapters = models.create_class_adapters(student, heads, layers)
        elif cfg.feature_loss == "crd" and len(classes) == 1:
            adapters = models.CRDHeads(cfg.crd_dim, sum(ensemble.group_sizes))
        elif cfg.feature_loss == "crd":
            sizes = tuple(sum(ensemble.group_sizes[g] for g in groups) for groups in classes)
            adapters = models.CRDHeads(cfg.crd_dim, sizes)
    return Models(student=student, adapters=adapters, ensemble=ensemble)


def create_train_state(
    mdl: Models,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    image_size: int,
    student_variables: Mapping[str, Any] | None = None,
) -> TrainState:
    """Initial state: student variables (given, e.g. ported ImageNet weights, or fresh) and
    fresh adapters."""
    s_rng, a_rng = jax.random.split(rng)
    if student_variables is None:
        student_variables = models.init(mdl.student, s_rng, image_size)
    params = {"student": student_variables["params"], "adapters": {}}
    if isinstance(mdl.adapters, models.CRDHeads) and isinstance(mdl.adapters.num_teachers, int):
        widths = (
            models.feature_channels(mdl.student)["pooled"],
            models.feature_channels(mdl.ensemble.teachers[0])["pooled"],
        )
        m = mdl.adapters.num_teachers
        dummy = jnp.zeros((1, widths[0])), jnp.zeros((m, 1, widths[1]))
        params["adapters"] = mdl.adapters.init(a_rng, *dummy)["params"]
    elif isinstance(mdl.adapters, models.CRDHeads):  # one head stack per feature class
        ens = mdl.ensemble
        stacks = tuple(
            jnp.zeros((m, 1, models.feature_channels(ens.teachers[groups[0]])["pooled"]))
            for m, groups in zip(
                mdl.adapters.num_teachers, feature_classes(ens, ("pooled",)), strict=True
            )
        )
        s_dummy = jnp.zeros((1, models.feature_channels(mdl.student)["pooled"]))
        params["adapters"] = mdl.adapters.init(a_rng, s_dummy, stacks)["params"]
    elif mdl.adapters is not None:
        dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        _, feats = jax.eval_shape(
            functools.partial(
                models.apply_with_features, mdl.student, layers=tuple(mdl.adapters.student_channels)
            ),
            student_variables,
            dummy,
        )
        feats = {k: jnp.zeros(v.shape, jnp.float32) for k, v in feats.items()}
        params["adapters"] = mdl.adapters.init(a_rng, feats).get("params", {})
    params = jax.tree.map(jnp.asarray, params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=jax.tree.map(jnp.asarray, student_variables["batch_stats"]),
        opt_state=tx.init(params),
    )


def stack_variables(variables: Sequence[Mapping[str, Any]]) -> Any:
    """Stacks same-architecture variables on a new leading axis: M trees -> one [M, ...] tree."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[dict(v) for v in variables])


def ensemble_forward(
    ens: Ensemble,
    frozen: Mapping[str, Any],
    images: jax.Array,
    layers: tuple[str, ...],
    teacher_map: str = "unroll",
    biased_layers: tuple[str, ...] = (),
    by_class: bool = False,
) -> tuple[Any, ...]:
    """Inference-mode forwards of every teacher (each backbone once) and of the biased model.

    Args:
      frozen: {'teachers': (stacked variables per group), 'biased': variables of the separate
        biased model, or {'kernel': [D, C], 'bias': [C]}, its head on a shared backbone}.
      images: [B, H, W, 3].
      layers: teacher feature layers to return.
      biased_layers: the biased model's feature layers to return (a subset of `layers`).
      by_class: return the teachers' features per feature class (`feature_classes` of
        `layers`), which teacher groups of different feature shapes need.

    Returns:
      (teacher logits [M, B, C], teacher features, biased logits [B, C], {layer: [B, ...]}
      the biased model's features). Teacher features: {layer: [M, B, ...]} (every group's
      stacks concatenated in group order; refused when the groups' shapes differ), or with
      `by_class` a tuple with, per class k, {layer: [M_k, B, ...]} its groups' stacks
      concatenated in group order (teachers `class_teachers(ens, classes)[k]`; for one class
      the same dict as without `by_class`).
    """
    shared = ens.biased_backbone is not None
    wanted = layers + (("pooled",) if shared and "pooled" not in layers else ())
    logits, feats = [], []
    for model, stacked in zip(ens.teachers, frozen["teachers"], strict=True):
        fwd = functools.partial(models.apply_with_features, model, images=images, layers=wanted)
        out = models.map_stacked(fwd, stacked, teacher_map)
        logits.append(out[0])
        feats.append(out[1])
    if shared:  # a DFR-style head on a teacher's backbone: that teacher's features
        g, i = ens.biased_backbone
        head = frozen["biased"]
        pooled = feats[g]["pooled"][i].astype(jnp.float32)
        b_logits = pooled @ head["kernel"] + head["bias"]
        b_feats = {name: feats[g][name][i] for name in biased_layers}
    elif biased_layers:
        b_logits, b_feats = models.apply_with_features(
            ens.biased, frozen["biased"], images, layers=biased_layers
        )
    else:
        b_logits, b_feats = ens.biased.apply(frozen["biased"], images, train=False), {}
    t_logits = jnp.concatenate(logits, axis=0)
    classes = feature_classes(ens, layers)
    if by_class:
        t_feats = tuple(
            {name: jnp.concatenate([feats[g][name] for g in groups], axis=0) for name in layers}
            for groups in classes
        )
    elif len(classes) > 1:
        raise ValueError(
            f"teacher groups {classes} differ in feature shape on {list(layers)}: their features "
            "cannot be stacked; pass by_class=True for one stack per feature class"
        )
    else:
        t_feats = {name: jnp.concatenate([f[name] for f in feats], axis=0) for name in layers}
    return jax.lax.stop_gradient((t_logits, t_feats, b_logits, b_feats))


def teacher_weights(
    cfg: DistillConfig,
    *,
    s_logits: jax.Array,
    t_logits: jax.Array,
    b_logits: jax.Array,
    rng: jax.Array,
    logit_fn: weighting.LogitFn,
    train_vjp: Callable[[jax.Array], Any],
    student_params: Any,
    images: jax.Array,
    pooled: jax.Array | None,
    axis_name: str | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """[B, M] weights of the configured method (constants for the loss) and their metrics.

    `logit_fn` evaluates the student with this batch's BatchNorm statistics held fixed, the
    convention of every per-sample gradient here (and of `agre_batch` with batch_bn 'fixed').
    `train_vjp` maps a logit cotangent [B, C] to the student's parameter gradient through the
    step's training-mode forward (BatchNorm statistics included): `agre_batch`'s default.
    """
    b, m = s_logits.shape[0], t_logits.shape[0]
    if cfg.weighting == "aver":
        w = weighting.uniform(b, m)
        return w, weighting.weight_metrics(w)
    if cfg.weighting == "random":
        w = weighting.random_teacher(rng, b, m)
        return w, weighting.weight_metrics(w)
    g_t, g_b = weighting.kd_grads(s_logits, t_logits, b_logits, cfg.temperature)
    if cfg.weighting == "aekd":
        if cfg.aekd_cap * m < 1 - 1e-9:
            raise ValueError(f"aekd_cap {cfg.aekd_cap} * {m} teachers < 1: no feasible weights")
        per_teacher = weighting.aekd_weights(g_t, cap=cfg.aekd_cap, axis_name=axis_name)
        w = jnp.broadcast_to(per_teacher, (b, m))
        return w, weighting.weight_metrics(w)
    if cfg.weighting == "agre_batch":
        g_refs = jnp.concatenate([g_t, g_b[None]], axis=0)
        if cfg.grad_scope == "full":
            vjp = (
                train_vjp
                if cfg.batch_bn == "through"
                else weighting.logit_vjp(logit_fn, student_params, images)
            )
            grads = weighting.batch_mean_grads(vjp, g_refs)
        else:
            grads = weighting.last_layer_batch_grads(pooled, g_refs)
        per_teacher = weighting.agre_batch_weights(
            grads,
            normalize_grads=cfg.normalize_grads,
            min_weight=cfg.batch_min_weight,
            axis_name=axis_name,
        )
        w = jnp.broadcast_to(per_teacher, (b, m))
        return w, weighting.weight_metrics(w)
    c = s_logits.shape[-1]
    if c == 2 and cfg.normalize_grads:
        gram = None  # exact closed form, any parameter scope
    elif cfg.grad_scope == "full":
        gram = weighting.gram(logit_fn, student_params, images, cfg.chunk_size, cfg.gram)
    else:
        gram = weighting.last_layer_gram(pooled, c)
    w, empty = weighting.agre_weights(
        g_t, g_b, gram=gram, normalize_grads=cfg.normalize_grads, empty_rows=cfg.empty_rows
    )
    return w, weighting.weight_metrics(w, empty)


def feature_weights(
    cfg: DistillConfig,
    mdl: Models,
    *,
    params: Mapping[str, Any],
    batch_moments: Any,
    images: jax.Array,
    s_feats: Mapping[str, jax.Array],
    t_feats: Mapping[str, jax.Array],
    b_feats: Mapping[str, jax.Array],
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Per-layer AGRE weights of the feature targets (DistillConfig.feature_weighting 'agre').

    For each feature layer l and sample i, W_t^l(x_i) = 1 - cos(g_t, g_b) with g_r the
    gradient of the sample's feature loss D_l(A_l(s_l(x_i)), f_r^l(x_i)) with respect to the
    student's and the adapters' parameters (BatchNorm statistics of the batch held fixed, as
    for the KD weights), r a teacher or the biased model (the plan's section 9.3). The
    gradients are never formed: `weighting.cotangent_gram` contracts the M + 1 cotangents
    dD_l/dA_l per layer through the student (exact, L (M + 1) backward passes per chunk).

    Args:
      params: {'student', 'adapters'} trainable parameters.
      batch_moments: the BatchNorm statistics the step's forward normalised with.
      images: [B, H, W, 3].
      s_feats: {layer: [B, ...]} the student's raw features (before the adapters).
      t_feats: {layer: [M, B, ...]}; b_feats: {layer: [B, ...]} the biased model's.

    Returns:
      ({layer: [B, M] weights}, metrics: mean weight per layer and teacher, entropy, empty
      rows).
    """
    layers = cfg.feature_layers
    p = {"student": params["student"]}
    if mdl.adapters is not None:
        p["adapters"] = params["adapters"]

    def adapted(q, x=None):
        if x is None:  # the step's own features (it may hold more layers, e.g. 'pooled')
            feats = {k: s_feats[k] for k in layers}
        else:
            variables = {"params": q["student"], "batch_stats": batch_moments}
            _, feats = models.apply_with_features(mdl.student, variables, x, layers=layers)
        if mdl.adapters is None:
            return dict(feats)
        return mdl.adapters.apply({"params": q["adapters"]}, dict(feats))

    def distance(s, f):
        return losses.feature_distance(s, f, cfg.feature_loss)

    cot = weighting.feature_cotangents(adapted(p), t_feats, b_feats, distance)
    gram = weighting.cotangent_gram(adapted, p, images, cot, cfg.chunk_size, cfg.gram)
    w, empty = weighting.feature_agre_weights(
        gram, len(layers), normalize_grads=cfg.normalize_grads, empty_rows=cfg.empty_rows
    )
    out, metrics = {}, {}
    for i, k in enumerate(layers):
        out[k] = w[i]
        for name, v in weighting.weight_metrics(w[i], empty[i]).items():
            metrics[f"feat_{name}/{k}"] = v
    return jax.lax.stop_gradient(out), metrics


def distill_step(
    state: TrainState,
    frozen: Mapping[str, Any],
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    mdl: Models,
    cfg: DistillConfig,
    tx: optax.GradientTransformation,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One distillation update.

    Loss, with w [B, M] the teacher weights (rows sum to 1, or 0 for dropped rows):
    alpha * sum_i sum_t w_it kd(z_s^i, z_t^i) / B + (1 - alpha) * CE + L_feat, where for one
    feature class L_feat = sum_l gamma_l * sum_i keep_i D_l(A_l(s_l^i), sum_t w_it f_t^l(x_i)) / B
    (keep_i = sum_t w_it), and for several (teacher groups of different feature shapes)
    L_feat = sum_k sum_l gamma_l * sum_i W_ik D_l(A_kl(s_l^i), target_ik^l) / B with
    W_ik = sum_{t in k} w_it and target_ik the within-class renormalised average
    (losses.class_feature_loss); with one class both are the same.

    Args:
      state: the TrainState (replicated under pmap).
      frozen: teachers and biased model, see `ensemble_forward`.
      batch: {'image': [B, H, W, 3], 'label': [B]} (per device under pmap).
      rng: the step's key, identical on every device (one random teacher per global batch).
      mdl, cfg, tx: static parts, bound with functools.partial.
      axis_name: the pmap axis, or None under jit.

    Returns:
      (new state, metrics averaged over devices).
    """
    images, labels = batch["image"], batch["label"]
    chex.assert_rank(images, 4)
    layers = cfg.feature_layers
    ens = mdl.ensemble
    # Named scopes label the step's parts in profiles (benchmarks/profile_step.py).
    classes = feature_classes(ens, layers)
    with jax.named_scope("teachers"):
        t_logits, class_feats, b_logits, b_feats = ensemble_forward(
            ens,
            frozen,
            images,
            layers,
            teacher_map=cfg.teacher_map,
            biased_layers=layers if cfg.feature_agre else (),
            by_class=True,
        )
    # Every teacher's features when they form one feature class (create_models refuses
    # feature_weighting 'agre' otherwise); per class below when there are several.
    t_feats = class_feats[0] if len(classes) == 1 else None
    chex.assert_shape(t_logits, (ens.num_teachers, images.shape[0], mdl.student.num_classes))

    # Student forward in training mode. It returns the updated running statistics (torch's
    # update: unbiased batch variance) and the moments this batch was normalised with, which
    # the Gram matrices hold constant (models.TorchBatchNorm).
    need_pooled = cfg.grad_scope == "last_layer" and cfg.weighting in ("agre", "agre_batch")
    s_layers = tuple(n for n in models.LAYERS if n in layers or (n == "pooled" and need_pooled))
    student_train = mdl.student.clone(bn_axis_name=axis_name)

    def forward(p):
        variables = {"params": p, "batch_stats": state.batch_stats}
        logits, feats, new_stats, moments = models.apply_with_features(
            student_train, variables, images, train=True, layers=s_layers, moments=True
        )
        return (logits, feats), (new_stats, moments)

    with jax.named_scope("student"):
        (s_logits, s_feats), vjp_fn, (batch_stats, batch_moments) = jax.vjp(
            forward, state.params["student"], has_aux=True
        )

    def logit_fn(p, x):
        return mdl.student.apply({"params": p, "batch_stats": batch_moments}, x, train=False)

    def train_vjp(g_logits):
        return vjp_fn((g_logits, jax.tree.map(jnp.zeros_like, s_feats)))[0]

    rng_weights, rng_dropout = jax.random.split(rng)
    if axis_name is not None:
        rng_dropout = jax.random.fold_in(rng_dropout, jax.lax.axis_index(axis_name))
    with jax.named_scope("weighting"):
        weights, metrics = teacher_weights(
            cfg,
            s_logits=jax.lax.stop_gradient(s_logits),
            t_logits=t_logits,
            b_logits=b_logits,
            rng=rng_weights,
            logit_fn=logit_fn,
            train_vjp=train_vjp,
            student_params=state.params["student"],
            images=images,
            pooled=s_feats.get("pooled"),
            axis_name=axis_name,
        )
    weights = jax.lax.stop_gradient(weights)
    keep = jnp.sum(weights, axis=-1)  # 1, or 0 for dropped rows
    # The feature targets' weights: the KD's, or per layer their own ({layer: [B, M]}).
    feat_weights = {k: weights for k in layers}
    feat_keep: jax.Array | dict[str, jax.Array] = keep
    if cfg.feature_agre:
        with jax.named_scope("feature_weighting"):
            feat_weights, feat_metrics = feature_weights(
                cfg,
                mdl,
                params=state.params,
                batch_moments=batch_moments,
                images=images,
                s_feats=jax.lax.stop_gradient(s_feats),
                t_feats=t_feats,
                b_feats=b_feats,
            )
        feat_keep = {k: jnp.sum(w, axis=-1) for k, w in feat_weights.items()}
        metrics.update(feat_metrics)

    def head_loss(adapter_params, logits, feats):
        kd = losses.kd_loss(logits, t_logits, cfg.temperature)  # [M, B]
        l_kd = jnp.sum(weights.T * kd) / logits.shape[0]
        l_ce = jnp.mean(losses.cross_entropy(logits, labels))
        loss = cfg.alpha * l_kd + (1.0 - cfg.alpha) * l_ce
        aux = {"kd_loss": l_kd, "ce_loss": l_ce}
        aux.update({f"kd/{t}": v for t, v in enumerate(jnp.mean(kd, axis=1))})
        if layers and cfg.feature_loss == "crd":
            # Each teacher's normalised embedding, combined with the teacher weights.
            if t_feats is not None:
                s_emb, t_emb = mdl.adapters.apply(
                    {"params": adapter_params}, feats["pooled"], t_feats["pooled"]
                )
                target = jnp.einsum("bm,mbd->bd", weights, losses.l2_normalize(t_emb))
            else:  # per-class heads: embeddings [M, B, d] in class order, weights reordered
                s_emb, t_emb = mdl.adapters.apply(
                    {"params": adapter_params},
                    feats["pooled"],
                    tuple(f["pooled"] for f in class_feats),
                )
                order = np.concatenate(class_teachers(ens, classes))
                target = jnp.einsum("bm,mbd->bd", weights[:, order], losses.l2_normalize(t_emb))
            l_crd = losses.crd_loss(s_emb, target, cfg.crd_temperature, sample_weight=keep)
            l_feat = dict(cfg.gammas)["pooled"] * l_crd
            loss = loss + l_feat
            aux.update({"feat_loss": l_feat, "feat/pooled": l_crd})
        elif layers and t_feats is None:  # several feature classes
            student_feats = {k: feats[k] for k in layers}
            if mdl.adapters is not None:  # ClassAdapters: the student at each class's widths
                per_class = mdl.adapters.apply({"params": adapter_params}, student_feats)
            else:  # attention transfer: width-free
                per_class = (student_feats,) * len(classes)
            l_feat, per_layer = losses.class_feature_loss(
                per_class,
                class_feats,
                tuple(weights[:, idx] for idx in class_teachers(ens, classes)),
                dict(cfg.gammas),
                kind=cfg.feature_loss,
                dropout_rate=cfg.feature_dropout,
                rng=rng_dropout,
            )
            loss = loss + l_feat
            aux["feat_loss"] = l_feat
            aux.update({f"feat/{k}": v for k, v in per_layer.items()})
        elif layers:
            student_feats = {k: feats[k] for k in layers}
            if mdl.adapters is not None:
                student_feats = mdl.adapters.apply({"params": adapter_params}, student_feats)
            targets = {
                k: jnp.einsum("bm,mb...->b...", feat_weights[k], t_feats[k].astype(jnp.float32))
                for k in layers
            }
            l_feat, per_layer = losses.feature_loss(
                student_feats,
                targets,
                dict(cfg.gammas),
                kind=cfg.feature_loss,
                dropout_rate=cfg.feature_dropout,
                rng=rng_dropout,
                sample_weight=feat_keep,
            )
            loss = loss + l_feat
            aux["feat_loss"] = l_feat
            aux.update({f"feat/{k}": v for k, v in per_layer.items()})
        return loss, aux

    with jax.named_scope("loss"):
        (loss, aux), (g_adapters, g_logits, g_feats) = jax.value_and_grad(
            head_loss, argnums=(0, 1, 2), has_aux=True
        )(state.params["adapters"], s_logits, s_feats)
    (g_student,) = vjp_fn((g_logits, g_feats))
    grads = {"student": g_student, "adapters": g_adapters}
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    with jax.named_scope("optimizer"):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

    metrics.update(aux)
    metrics["loss"] = loss
    metrics["accuracy"] = jnp.mean(jnp.argmax(s_logits, -1) == labels)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if axis_name is not None:
        metrics = jax.lax.pmean(metrics, axis_name)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, metrics


def replicate(tree: Any) -> Any:
    """One copy of `tree` per local device on a leading axis, laid out as the pmapped step
    lays out its outputs (a mesh over the local devices named AXIS_NAME).

    flax.jax_utils.replicate lays its copies out on a mesh of another axis name, so a step
    fed its state would be traced and compiled twice: once for the first call and once for
    the later calls on its own outputs (measured: 4.7 s more per distillation of
    configs/tiny.py).
    """
    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS_NAME,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS_NAME))

    def relabel(x: jax.Array) -> jax.Array:  # the same per-device copies, no data moved
        shards = [shard.data for shard in x.addressable_shards]
        return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)

    return jax.tree.map(relabel, flax.jax_utils.replicate(tree))


def compile_step(
    mdl: Models, cfg: DistillConfig, tx: optax.GradientTransformation, *, pmap: bool
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """`distill_step` bound to its static parts, jitted, or pmapped over local devices with
    every argument but the batch replicated (leading device axis)."""
    if pmap:
        step = functools.partial(distill_step, mdl=mdl, cfg=cfg, tx=tx, axis_name=AXIS_NAME)
        return jax.pmap(step, axis_name=AXIS_NAME, donate_argnums=(0,))
    step = functools.partial(distill_step, mdl=mdl, cfg=cfg, tx=tx, axis_name=None)
    return jax.jit(step, donate_argnums=(0,))
