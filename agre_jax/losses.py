"""Distillation losses as plain jnp functions with per-sample outputs.

- `kd_loss`: tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)) per sample (paper Eq. 1).
- `kd_logit_grad`: its closed-form gradient with respect to the student's logits.
- `cross_entropy`: with integer labels, per sample.
- `feature_loss`: the plan's multi-layer feature loss sum_l gamma_l * D(s_l, t_l) with D the
  mean squared error (FitNets-style, after the adapters) or attention transfer (Zagoruyko &
  Komodakis), optionally with feature-channel dropout; `feature_distance` is its per-sample
  distance of one layer.
- `class_feature_loss`: the same loss against teachers of several feature classes (groups of
  different feature shapes), each class with its own renormalised teacher-weighted target.
- `crd_loss`: contrastive representation distillation (Tian et al. 2020), in-batch negatives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import chex
import jax
import jax.numpy as jnp

FEATURE_LOSSES = ("mse", "attention", "crd")


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """Per-sample KD loss tau^2 * KL(p_t || p_s), p = softmax(z / tau).

    Args:
      student_logits: [B, C].
      teacher_logits: [..., B, C] (e.g. [M, B, C] for M teachers).
      temperature: tau > 0.

    Returns:
      [..., B] losses; `mean` over B equals torch's `kl_div(log_softmax(z_s / tau),
      softmax(z_t / tau), reduction='batchmean') * tau**2`.
    """
    chex.assert_rank(student_logits, 2)
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
    return temperature**2 * kl


def kd_logit_grad(
    student_logits: jax.Array, reference_logits: jax.Array, temperature: float
) -> jax.Array:
    """d kd_loss / d z_s = tau * (softmax(z_s / tau) - softmax(z_r / tau)).

    Args:
      student_logits: [B, C].
      reference_logits: [..., B, C].

    Returns:
      [..., B, C] per-sample gradients with respect to the student's logits.
    """
    ps = jax.nn.softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    pr = jax.nn.softmax(reference_logits.astype(jnp.float32) / temperature, axis=-1)
    return temperature * (ps - pr)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-sample softmax cross-entropy: logits [B, C], integer labels [B] -> [B]."""
    chex.assert_rank(logits, 2)
    chex.assert_rank(labels, 1)
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def pool_to(x: jax.Array, spatial: tuple[int, int]) -> jax.Array:
    """Average-pools [B, H, W, C] to [B, h, w, C] when H, W are integer multiples of h, w."""
    b, h, w, c = x.shape
    th, tw = spatial
    if (h, w) == (th, tw):
        return x
    if h % th or w % tw or h < th or w < tw:
        raise ValueError(
            f"cannot pool a {h}x{w} student map to the teacher's {th}x{tw}: the student map "
            "must be an integer multiple of the teacher's"
        )
    return x.reshape(b, th, h // th, tw, w // tw, c).mean(axis=(2, 4))


def attention_map(x: jax.Array) -> jax.Array:
    """Zagoruyko & Komodakis attention: [B, H, W, C] -> [B, H*W], the channel mean of squared
    activations, L2-normalised per sample."""
    a = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1).reshape(x.shape[0], -1)
    return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def _channel_mask(rng: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """A {0, 1} mask of shape [B, 1, ..., 1, C] keeping each (sample, channel) w.p. 1 - rate."""
    mask_shape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
    return jax.random.bernoulli(rng, 1.0 - rate, mask_shape).astype(jnp.float32)


def _per_sample_mse(s: jax.Array, t: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean squared error per sample over the kept elements: [B, ...] -> [B]."""
    d = jnp.square(s.astype(jnp.float32) - t.astype(jnp.float32))
    axes = tuple(range(1, d.ndim))
    if mask is None:
        return jnp.mean(d, axis=axes)
    mask = jnp.broadcast_to(mask, d.shape)
    # Unbiased for the plain MSE: the sum over kept elements divided by their number.
    return jnp.sum(d * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axis=axes), 1.0)


def feature_loss(
    student: Mapping[str, jax.Array],
    teacher: Mapping[str, jax.Array],
    gammas: Mapping[str, float],
    *,
    kind: str = "mse",
    dropout_rate: float = 0.0,
    rng: jax.Array | None = None,
    sample_weight: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Multi-layer feature loss L_feat = sum_l gamma_l * D(student_l, teacher_l).

    Args:
      student: {layer: [B, H, W, C] or [B, C]}; for `kind='mse'` already mapped to the
        teacher's width by the adapters. A larger student map is average-pooled to the
        teacher's spatial size.
      teacher: {layer: same-shaped target} (e.g. the teacher-weighted average).
      gammas: {layer: gamma >= 0}; layers with gamma 0 are skipped.
      kind: 'mse' (mean over all elements) or 'attention' (attention transfer on the
        normalised channel-mean squared maps; `pooled` is not spatial and is rejected).
      dropout_rate: feature-channel dropout: the same random (sample, channel) mask is applied
        to student and teacher features and the mean is over kept elements.
      rng: key for the dropout mask (required when dropout_rate > 0).
      sample_weight: optional [B] weights (e.g. 0 for samples dropped from distillation),
        or {layer: [B]} per layer; the loss is then sum_i w_i D_i / B.

    Returns:
      (total, {layer: unweighted D_l}) as float32 scalars.
    """
    if kind not in ("mse", "attention"):  # 'crd' compares embeddings: crd_loss
        raise ValueError(f"unknown feature loss {kind!r} here; expected 'mse' or 'attention'")
    if dropout_rate > 0 and rng is None:
        raise ValueError("feature dropout needs an rng")
    total = jnp.zeros((), jnp.float32)
    per_layer = {}
    for i, (name, gamma) in enumerate(sorted(gammas.items())):
        if gamma == 0:
            continue
        # float32 before pooling: bf16 features (dtype='bfloat16') would round the pooled
        # mean and the loss (a no-op on float32 features).
        s, t = student[name].astype(jnp.float32), teacher[name].astype(jnp.float32)
        if s.ndim == 4:
            s = pool_to(s, t.shape[1:3])
        mask_s = mask_t = None
        if dropout_rate > 0:
            if kind == "mse":
                chex.assert_equal_shape([s, t])
            mask_s = _channel_mask(jax.random.fold_in(rng, i), s.shape, dropout_rate)
            # Same channel mask on both sides when the widths agree; otherwise (attention
            # transfer) each side drops its own channels (attention maps are width-free).
            mask_t = (
                mask_s
                if s.shape[-1] == t.shape[-1]
                else _channel_mask(jax.random.fold_in(rng, 1000 + i), t.shape, dropout_rate)
            )
        d = feature_distance(s, t, kind, mask_s, mask_t)
        w = sample_weight[name] if isinstance(sample_weight, Mapping) else sample_weight
        layer_loss = jnp.mean(d) if w is None else jnp.sum(d * w) / d.shape[0]
        per_layer[name] = layer_loss
        total = total + gamma * layer_loss
    return total, per_layer


def class_feature_loss(
    student: Sequence[Mapping[str, jax.Array]],
    teachers: Sequence[Mapping[str, jax.Array]],
    weights: Sequence[jax.Array],
    gammas: Mapping[str, float],
    *,
    kind: str = "mse",
    dropout_rate: float = 0.0,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Multi-layer feature loss against K feature classes of teachers (groups of teachers
    whose features differ in shape from the other classes').

    Within class k the target is the class's per-sample teacher-weighted average, with the
    weights renormalised within the class, and the class's loss is weighted by the class's
    share of the teacher weights:

        W_ik = sum_{t in k} w_it,   target_ik = sum_{t in k} w_it f_t(x_i) / W_ik,
        L = sum_k sum_l gamma_l * sum_i W_ik D_l(s_ik, target_ik) / B,

    with s_ik the student's features mapped to class k (its adapters). A sample with W_ik = 0
    (no weight on class k; every class for a row dropped from distillation) has target 0 and
    contributes 0 to class k. With one class whose weights sum to 1 (or 0 on dropped rows)
    this is `feature_loss` against sum_t w_it f_t with sample weight sum_t w_it, the
    single-class step's loss.

    Args:
      student: per class k, {layer: [B, H, W, C_k] or [B, C_k]} (for 'mse' already at the
        class's widths; a larger map is average-pooled to the class's spatial size).
      teachers: per class k, {layer: [M_k, B, ...]} its teachers' features.
      weights: per class k, [B, M_k] the teacher weights of its teachers (the class's columns
        of the [B, M] weights; constants).
      gammas, kind, dropout_rate: as in `feature_loss`.
      rng: the dropout key; class k draws its masks from fold_in(rng, k).

    Returns:
      (total, {layer: sum_k of the class's W-weighted D_l}) as float32 scalars.
    """
    if not len(student) == len(teachers) == len(weights):
        raise ValueError(
            f"one student map, teacher stack and weight matrix per class: got {len(student)}, "
            f"{len(teachers)} and {len(weights)}"
        )
    total = jnp.zeros((), jnp.float32)
    per_layer: dict[str, jax.Array] = {}
    for k, (s, t, w) in enumerate(zip(student, teachers, weights, strict=True)):
        chex.assert_rank(w, 2)
        w = w.astype(jnp.float32)
        mass = jnp.sum(w, axis=-1)  # W_ik [B]
        safe = jnp.where(mass > 0, mass, 1.0)
        targets = {}
        for name, gamma in gammas.items():
            if gamma == 0:
                continue
            x = t[name].astype(jnp.float32)
            chex.assert_axis_dimension(x, 0, w.shape[1])
            avg = jnp.einsum("bm,mb...->b...", w, x)
            targets[name] = avg / safe.reshape((-1,) + (1,) * (avg.ndim - 1))
        class_total, class_layers = feature_loss(
            s,
            targets,
            gammas,
            kind=kind,
            dropout_rate=dropout_rate,
            rng=None if rng is None else jax.random.fold_in(rng, k),
            sample_weight=mass,
        )
        total = total + class_total
        for name, v in class_layers.items():
            per_layer[name] = per_layer.get(name, 0.0) + v
    return total, per_layer


def feature_distance(
    s: jax.Array,
    t: jax.Array,
    kind: str = "mse",
    mask_s: jax.Array | None = None,
    mask_t: jax.Array | None = None,
) -> jax.Array:
    """Per-sample distance D(s_i, t_i) of one layer: [B, ...] x [B, ...] -> [B] float32.

    Args:
      s: student features [B, H, W, C] or [B, C] (for 'mse' at the teacher's width); a
        larger map is average-pooled to the teacher's spatial size first.
      t: the target, [B, h, w, c] or [B, c].
      kind: 'mse' (mean over the kept elements) or 'attention' (attention transfer: mean
        squared difference of the normalised attention maps; spatial layers only).
      mask_s, mask_t: optional channel-dropout masks (broadcastable to s and t).

    Computed in float32 whatever the features' dtype (bf16 compute pools in float32 too).
    """
    s, t = s.astype(jnp.float32), t.astype(jnp.float32)
    if s.ndim == 4:
        s = pool_to(s, t.shape[1:3])
    if kind == "mse":
        chex.assert_equal_shape([s, t])
        return _per_sample_mse(s, t, mask_s)
    if kind != "attention":
        raise ValueError(f"unknown feature loss {kind!r} here; expected 'mse' or 'attention'")
    if s.ndim != 4:
        raise ValueError("attention transfer needs a spatial layer, not pooled features")
    if mask_s is not None:
        s, t = s * mask_s, t * mask_t
    return jnp.mean(jnp.square(attention_map(s) - attention_map(t)), axis=-1)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / max(||x||, 1e-12) along `axis`, in float32 (torch.nn.functional.normalize); a zero
    vector (a dropped row's combined target) stays zero with a finite gradient."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), 1e-24))
    return x / norm


def crd_loss(
    student_emb: jax.Array,
    teacher_emb: jax.Array,
    temperature: float,
    sample_weight: jax.Array | None = None,
) -> jax.Array:
    """Contrastive representation distillation with in-batch negatives: InfoNCE in both
    directions between L2-normalised student and teacher embeddings.

    CRD (Tian et al., ICLR 2020) contrasts each student embedding with its own example's
    teacher embedding against N negatives drawn from a memory bank, and each teacher embedding
    likewise (its code sums the two directions). Here the negatives are the batch's other
    examples (no memory bank) and the bound is InfoNCE's (the paper's eq. 10 family):

        L_i = -log softmax_j(s_i . t_j / tau)[i] - log softmax_j(t_i . s_j / tau)[i]

    Args:
      student_emb: [B, d] student embeddings (normalised here).
      teacher_emb: [B, d] teacher embeddings (normalised here; e.g. the teacher-weighted
        combination of each teacher's normalised embedding).
      temperature: tau > 0 (CRD's default 0.07).
      sample_weight: optional [B] weights in {0, 1}: rows of weight 0 (dropped from
        distillation) are neither anchors nor negatives; the loss is sum_i w_i L_i / B.

    Returns:
      The float32 scalar loss.
    """
    chex.assert_rank([student_emb, teacher_emb], 2)
    chex.assert_equal_shape([student_emb, teacher_emb])
    s, t = l2_normalize(student_emb), l2_normalize(teacher_emb)
    logits = s @ t.T / temperature  # [B, B]: student anchors in rows, teachers in columns
    if sample_weight is not None:
        keep = sample_weight > 0
        mask = keep[None, :] & keep[:, None]
        logits = jnp.where(mask | jnp.eye(s.shape[0], dtype=bool), logits, -jnp.inf)
    diagonal = jnp.diagonal(logits)
    per_sample = (
        jax.nn.logsumexp(logits, axis=1) - diagonal + jax.nn.logsumexp(logits, axis=0) - diagonal
    )
    if sample_weight is None:
        return jnp.mean(per_sample)
    return jnp.sum(jnp.where(keep, per_sample, 0.0) * sample_weight) / s.shape[0]
