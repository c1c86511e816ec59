"""Teacher weighting strategies: [B, M] weights whose rows sum to 1 (or 0 for dropped rows).

- `aver`: the plain ensemble average (You et al. 2017).
- `random`: one teacher per mini-batch (Fukuda et al. 2017).
- `agre`: the paper's per-sample weights (Kenfack et al., Eq. 5),
  W_t(x_i) = 1 - cos(grad_theta l_t^i, grad_theta l_b^i), normalised over teachers.
- `agre_batch`: the earlier PyTorch code's variant, one weight per teacher from the cosine of
  the batch-mean gradients, clipped below and normalised. As in that code, the gradients
  flow through the training-mode BatchNorm statistics of the batch (`BATCH_BN` 'through');
  'fixed' holds them constant, the convention of the per-sample weights.
- `aekd`: AE-KD (Du et al., NeurIPS 2020), one weight per teacher per batch: the minimum-norm
  point of the teachers' KD gradients in the student's logit space, weights capped at C.
- feature weighting `agre` (the plan's section 9.3): per layer l and sample, the same
  1 - cos between the student-parameter gradients of the feature loss D_l towards each
  teacher's features and towards the biased model's (`feature_cotangents`,
  `cotangent_gram`, `feature_agre_weights`). Exact: the Gram of the M + 1 per-sample
  gradients comes from M + 1 cotangents at the adapted features, whatever their size.

Exact per-sample cosines, cheaply. With z_i the student's logits, the KD gradient with respect
to the logits is g_r^i = tau * (softmax(z_s / tau) - softmax(z_r / tau)) and
grad_theta l_r^i = J_i^T g_r^i with J_i = dz_i / dtheta. Every inner product is then the
quadratic form g_t^T K_i g_b with the c x c per-sample Gram matrix K_i = J_i J_i^T, whose cost
does not grow with the number of teachers. `last_layer` scope (the `fc` kernel and bias only)
has K_i = (|h_i|^2 + 1) I with h_i the pooled features. With two classes and normalised
gradients every g_r^i is a multiple of (1, -1), so the cosine is sign(a_t a_b) = +-1 and
W_t is in {0, 1, 2} from the logits alone: computed in closed form, never from a rounded
cosine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from agre_jax import losses

METHODS = ("aver", "random", "agre", "agre_batch", "aekd")
GRAD_SCOPES = ("full", "last_layer")
EMPTY_ROWS = ("uniform", "drop")
BATCH_BN = ("through", "fixed")  # agre_batch: BatchNorm statistics in its batch-mean gradients
GRAM_METHODS = ("layerwise", "vmap")  # how full-scope per-sample Gram matrices are computed
# The feature loss's targets: the KD's teacher weights ('shared') or per-layer AGRE weights
# of the feature losses' own gradients ('agre').
FEATURE_WEIGHTINGS = ("shared", "agre")

# A row of AGRE weights summing below this is empty (every teacher pulls with the biased
# model). In the two-class closed form empty rows are exactly 0.
EMPTY_ROW_EPS = 1e-6

# logit_fn(params, images [n, H, W, 3]) -> logits [n, C], BatchNorm statistics held fixed.
LogitFn = Callable[[Any, jax.Array], jax.Array]


def uniform(batch_size: int, num_teachers: int) -> jax.Array:
    """[B, M] weights 1 / M."""
    return jnp.full((batch_size, num_teachers), 1.0 / num_teachers, jnp.float32)


def random_teacher(rng: jax.Array, batch_size: int, num_teachers: int) -> jax.Array:
    """[B, M] one-hot rows, the same teacher for the whole mini-batch."""
    t = jax.random.randint(rng, (), 0, num_teachers)
    return jnp.broadcast_to(jax.nn.one_hot(t, num_teachers), (batch_size, num_teachers))


def per_sample_gram(
    logit_fn: LogitFn, params: Any, images: jax.Array, chunk_size: int
) -> jax.Array:
    """K_i = J_i J_i^T for every sample, J_i = d logit_fn(params, x_i) / d params.

    The per-sample Jacobian (C x P) is built with C vector-Jacobian products, vmapped over
    `chunk_size` samples at a time (peak memory ~ chunk_size * C * P floats); the chunks are
    unrolled in the computation (on the CPU a `lax.map` over them ran 5x slower). `logit_fn`
    must hold BatchNorm statistics fixed (the batch's own statistics as constants): the
    per-sample gradient then has no cross-sample coupling.

    Args:
      logit_fn: (params, images [n, H, W, 3]) -> [n, C].
      params: the pytree to differentiate.
      images: [B, H, W, 3].
      chunk_size: samples per vmapped chunk.

    Returns:
      [B, C, C] float32 Gram matrices.
    """

    def gram_one(x: jax.Array) -> jax.Array:
        jac = jax.jacrev(lambda p: logit_fn(p, x[None])[0])(params)
        leaves = [j.reshape(j.shape[0], -1).astype(jnp.float32) for j in jax.tree.leaves(jac)]
        return sum(leaf @ leaf.T for leaf in leaves)

    b = images.shape[0]
    chunk = max(1, min(chunk_size, b))
    return jnp.concatenate([jax.vmap(gram_one)(images[i : i + chunk]) for i in range(0, b, chunk)])


def layerwise_gram(logit_fn: LogitFn, params: Any, images: jax.Array, chunk_size: int) -> jax.Array:
    """K_i = J_i J_i^T for every sample, assembled layer by layer without per-sample gradients.

    Every parameter of a Conv, Dense or BatchNorm layer enters linearly, so its per-sample
    gradient for logit a is a product of the layer's input and of the cotangent at its
    output: a Conv kernel's is patches(x_i)^T delta_ia ([P, S] x [S, O]), a Dense kernel's
    likewise with S the positions it is applied at, BatchNorm's scale and bias are the sums
    over positions of delta_ia * xhat_i and of delta_ia. The cotangents of all C logits at
    every layer come from C batched vector-Jacobian products with respect to zero
    perturbations added to each layer's output (`nn.intercept_methods`; valid because with
    fixed BatchNorm statistics sample i's logits depend on sample i only). Each layer's
    contribution <g_ia, g_ib> is then contracted either directly (patches^T delta, cost
    ~C S P O) or through the S x S Gram of the patches (cost ~S^2 (P + C O)), whichever is
    cheaper: deep layers have few positions and wide kernels. Dense batched matmuls replace
    the grouped convolutions of vmapped per-sample gradients (`per_sample_gram`).

    Args:
      logit_fn: (params, images [n, H, W, 3]) -> [n, C], a Flax model built of nn.Conv,
        nn.Dense, nn.BatchNorm (with fixed statistics) and parameter-free operations, not
        itself jitted (it is traced here); a model with other parametrised layers, or a layer
        called twice, raises ValueError.
      params: the pytree to differentiate (all of the model's parameters).
      images: [B, H, W, 3].
      chunk_size: samples per chunk (peak memory ~ chunk_size * C * the model's activations).

    Returns:
      [B, C, C] float32 Gram matrices, equal to `per_sample_gram`'s up to rounding.
    """
    b = images.shape[0]
    chunk = max(1, min(chunk_size, b))
    total = sum(x.size for x in jax.tree.leaves(params))
    parts = [
        _layerwise_chunk(logit_fn, params, images[i : i + chunk], total) for i in range(0, b, chunk)
    ]
    return jnp.concatenate(parts)


def cotangent_gram(
    fn: Callable[[Any, jax.Array], Any],
    params: Any,
    images: jax.Array,
    cotangents: Any,
    chunk_size: int,
    method: str = "layerwise",
) -> jax.Array:
    """Inner products of per-sample parameter gradients J_i^T u_ir for given cotangents.

    With fn(params, x_i) = y_i (any pytree of per-sample outputs) and R cotangents u_ir at
    y_i, returns G_i[r, s] = <J_i^T u_ir, J_i^T u_is>, J_i = dy_i / dparams. The gradient of
    a per-sample loss l(y_i) is J_i^T dl/dy_i, so with u_ir = dl_r/dy_i (e.g. the feature
    losses towards each teacher and towards the biased model) G_i holds every inner product
    of their parameter gradients, at the cost of R backward passes per chunk whatever the
    size of y. `layerwise_gram` is the case y = logits, u = the identity basis.

    Args:
      fn: (params, images [n, H, W, 3]) -> pytree of [n, ...] arrays; per sample (BatchNorm
        statistics fixed), not jitted (see `layerwise_gram`).
      params: the pytree to differentiate.
      images: [B, H, W, 3].
      cotangents: pytree like fn's output with leaves [R, B, ...].
      chunk_size: samples per chunk.
      method: 'layerwise' (layer inputs times output cotangents; Conv/Dense/BatchNorm models)
        or 'vmap' (vmapped per-sample pullbacks; any model).

    Returns:
      [B, R, R] float32.
    """
    b = images.shape[0]
    chunk = max(1, min(chunk_size, b))

    def part(i: int) -> jax.Array:
        x = images[i : i + chunk]
        u = jax.tree.map(lambda v: v[:, i : i + chunk], cotangents)
        if method == "layerwise":
            total = sum(leaf.size for leaf in jax.tree.leaves(params))
            return _layerwise_chunk(fn, params, x, total, u)
        if method == "vmap":
            return jax.vmap(functools.partial(_cotangent_gram_one, fn, params), (0, 1))(x, u)
        raise ValueError(f"unknown gram method {method!r}; expected one of {GRAM_METHODS}")

    return jnp.concatenate([part(i) for i in range(0, b, chunk)])


def _cotangent_gram_one(fn: Callable[[Any, jax.Array], Any], params: Any, x: jax.Array, u: Any):
    """One sample: x [H, W, 3], u leaves [R, ...] -> [R, R]."""
    out, vjp_fn = jax.vjp(lambda p: fn(p, x[None]), params)
    (grads,) = jax.vmap(vjp_fn)(jax.tree.map(lambda v, o: v[:, None].astype(o.dtype), u, out))
    r = jax.tree.leaves(u)[0].shape[0]
    leaves = [g.reshape(r, -1).astype(jnp.float32) for g in jax.tree.leaves(grads)]
    return sum(leaf @ leaf.T for leaf in leaves)


_LINEAR_LAYERS = (nn.Conv, nn.Dense, nn.BatchNorm)
_NOT_TRACED = (
    "layerwise Gram: the Conv/Dense/BatchNorm layers were not seen when tracing logit_fn; it "
    "must not be a jax.jit-compiled function (its cached trace bypasses nn.intercept_methods)"
)


def _layerwise_chunk(
    logit_fn: Callable[[Any, jax.Array], Any],
    params: Any,
    images: jax.Array,
    total: int,
    cotangents: Any = None,
) -> jax.Array:
    layers: dict[str, tuple[nn.Module, dict[str, int]]] = {}  # name -> (module, param sizes)
    shapes: dict[str, jax.ShapeDtypeStruct] = {}  # name -> output shape

    def forward(perturbations):
        inputs = {}

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name != "__call__" or not isinstance(mod, _LINEAR_LAYERS):
                return next_fun(*args, **kwargs)
            name = "/".join(mod.path)
            if name in inputs:
                raise ValueError(f"layerwise Gram: layer {name} is called twice; use gram='vmap'")
            x = args[0]
            if isinstance(mod, nn.BatchNorm):
                if not nn.merge_param(
                    "use_running_average",
                    mod.use_running_average,
                    kwargs.get("use_running_average"),
                ):
                    raise ValueError(f"layerwise Gram needs fixed BatchNorm statistics ({name})")
                stats = mod.variables["batch_stats"]
                x = (x - stats["mean"]) * jax.lax.rsqrt(stats["var"] + mod.epsilon)
            out = next_fun(*args, **kwargs)
            inputs[name] = x
            sizes = {k: v.size for k, v in mod.variables.get("params", {}).items()}
            layers[name] = (mod, sizes)
            shapes[name] = jax.ShapeDtypeStruct(out.shape, out.dtype)
            if perturbations is None:
                return out
            return out + perturbations[name].astype(out.dtype)

        with nn.intercept_methods(interceptor):
            outputs = logit_fn(params, images)
        return outputs, inputs

    jax.eval_shape(lambda: forward(None))  # fills `layers` and `shapes`
    if not layers:
        raise ValueError(_NOT_TRACED)
    covered = sum(sum(sizes.values()) for _, sizes in layers.values())
    if covered != total:
        raise ValueError(
            f"layerwise Gram: Conv/Dense/BatchNorm layers hold {covered} of the {total} "
            "parameters; the model has other parametrised layers: use gram='vmap'"
        )
    zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
    outputs, vjp_fn, inputs = jax.vjp(forward, zeros, has_aux=True)
    if set(inputs) != set(layers):
        raise ValueError(_NOT_TRACED)
    n = images.shape[0]
    if cotangents is None:  # the logits' basis: K_i = J_i J_i^T
        c = outputs.shape[-1]
        basis = jnp.broadcast_to(jnp.eye(c, dtype=outputs.dtype)[:, None, :], (c, n, c))
    else:
        basis = jax.tree.map(lambda u, o: u.astype(o.dtype), cotangents, outputs)
        c = jax.tree.leaves(basis)[0].shape[0]
    (deltas,) = jax.vmap(vjp_fn)(basis)  # name -> [C, n, *output shape]

    gram = jnp.zeros((n, c, c), jnp.float32)
    for name, (mod, p) in layers.items():
        x = inputs[name].astype(jnp.float32)
        d = deltas[name].astype(jnp.float32)
        if isinstance(mod, nn.BatchNorm):
            axes = tuple(range(2, d.ndim - 1))
            if "scale" in p:
                gram += _outer(jnp.sum(d * x[None], axis=axes))
            if "bias" in p:
                gram += _outer(jnp.sum(d, axis=axes))
            continue
        if isinstance(mod, nn.Conv):
            x = _patches(mod, x)
        d = d.reshape(c, n, -1, d.shape[-1])  # [C, n, S, O]
        gram += _matmul_gram(x.reshape(n, -1, x.shape[-1]), d)
        if "bias" in p:
            gram += _outer(jnp.sum(d, axis=2))
    return gram


def _outer(g: jax.Array) -> jax.Array:
    """[C, n, O] per-sample gradients of one parameter -> [n, C, C] inner products."""
    return jnp.einsum("ano,bno->nab", g, g)


def _matmul_gram(x: jax.Array, d: jax.Array) -> jax.Array:
    """Inner products of the gradients x_i^T d_ia of a kernel applied at S positions.

    Args:
      x: [n, S, P] inputs (patches) per position.
      d: [C, n, S, O] cotangents at the outputs.

    Returns:
      [n, C, C].
    """
    c, _, s, o = d.shape
    p = x.shape[-1]
    if s * s * (p + c * o) < c * s * p * o + c * c * p * o:
        xx = jnp.einsum("nsp,ntp->nst", x, x)
        return jnp.einsum("anso,bnso->nab", d, jnp.einsum("nst,bnto->bnso", xx, d))
    g = jnp.einsum("nsp,cnso->cnpo", x, d)
    return jnp.einsum("anpo,bnpo->nab", g, g)


def _patches(mod: nn.Conv, x: jax.Array) -> jax.Array:
    """[n, H, W, I] -> [n, H', W', I * kh * kw] input patches of a 2-D nn.Conv."""
    padding = mod.padding
    if isinstance(padding, int):
        padding = ((padding, padding),) * 2
    elif not isinstance(padding, str):
        padding = tuple((q, q) if isinstance(q, int) else tuple(q) for q in padding)
    unsupported = (
        len(mod.kernel_size) != 2
        or (isinstance(padding, str) and padding not in ("SAME", "VALID"))
        or mod.feature_group_count != 1
        or (mod.input_dilation is not None and set(np.atleast_1d(mod.input_dilation)) != {1})
    )
    if unsupported:
        raise ValueError(f"layerwise Gram: unsupported Conv {'/'.join(mod.path)}; use gram='vmap'")
    strides = mod.strides if mod.strides is not None else 1
    dilation = mod.kernel_dilation if mod.kernel_dilation is not None else 1
    return jax.lax.conv_general_dilated_patches(
        x,
        tuple(mod.kernel_size),
        (strides,) * 2 if isinstance(strides, int) else tuple(strides),
        padding,
        rhs_dilation=(dilation,) * 2 if isinstance(dilation, int) else tuple(dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def gram(
    logit_fn: LogitFn, params: Any, images: jax.Array, chunk_size: int, method: str
) -> jax.Array:
    """[B, C, C] per-sample Gram matrices by `method` in GRAM_METHODS."""
    if method == "layerwise":
        return layerwise_gram(logit_fn, params, images, chunk_size)
    if method == "vmap":
        return per_sample_gram(logit_fn, params, images, chunk_size)
    raise ValueError(f"unknown gram method {method!r}; expected one of {GRAM_METHODS}")


def _normalise_rows(raw: jax.Array, empty_rows: str) -> tuple[jax.Array, jax.Array]:
    """raw [B, M] >= 0 -> (weights [B, M], empty [B] bool)."""
    total = jnp.sum(raw, axis=-1, keepdims=True)
    empty = total[:, 0] <= EMPTY_ROW_EPS
    weights = raw / jnp.where(total > EMPTY_ROW_EPS, total, 1.0)
    fallback = 1.0 / raw.shape[1] if empty_rows == "uniform" else 0.0
    weights = jnp.where(empty[:, None], fallback, weights)
    return weights, empty


def agre_two_class(g_teachers: jax.Array, g_biased: jax.Array) -> jax.Array:
    """Closed-form W_t(x_i) = 1 - sign(a_t a_b) for two classes, a_r = g_r[:, 0].

    Args:
      g_teachers: [M, B, 2] logit gradients; g_biased: [B, 2].

    Returns:
      [M, B] raw weights in {0, 1, 2} (1 where a gradient is exactly zero).
    """
    chex.assert_axis_dimension(g_teachers, -1, 2)
    return 1.0 - jnp.sign(g_teachers[..., 0]) * jnp.sign(g_biased[None, :, 0])


def agre_from_gram(
    g_teachers: jax.Array, g_biased: jax.Array, gram: jax.Array, normalize_grads: bool
) -> jax.Array:
    """W_t(x_i) = 1 - cos (or 1 - dot without normalisation) from Gram matrices.

    Args:
      g_teachers: [M, B, C]; g_biased: [B, C]; gram: [B, C, C] (K_i, or a multiple of I).
      normalize_grads: cosine (paper) or raw dot product (paper Table 6 ablation).

    Returns:
      [M, B] raw weights. A zero gradient gives cosine 0 (weight 1).
    """
    kb = jnp.einsum("bcd,bd->bc", gram, g_biased)
    dot = jnp.einsum("mbc,bc->mb", g_teachers, kb)
    if not normalize_grads:
        return 1.0 - dot
    nt = jnp.einsum("mbc,bcd,mbd->mb", g_teachers, gram, g_teachers)
    nb = jnp.einsum("bc,bc->b", g_biased, kb)
    denom = jnp.sqrt(jnp.maximum(nt, 0.0) * jnp.maximum(nb, 0.0)[None])
    cos = jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0)
    return 1.0 - jnp.clip(cos, -1.0, 1.0)


def last_layer_gram(pooled: jax.Array, num_classes: int) -> jax.Array:
    """K_i = (|h_i|^2 + 1) I for the fc kernel and bias: pooled [B, D] -> [B, C, C]."""
    scale = jnp.sum(jnp.square(pooled.astype(jnp.float32)), axis=-1) + 1.0
    return scale[:, None, None] * jnp.eye(num_classes, dtype=jnp.float32)


def agre_weights(
    g_teachers: jax.Array,
    g_biased: jax.Array,
    *,
    gram: jax.Array | None,
    normalize_grads: bool,
    empty_rows: str,
) -> tuple[jax.Array, jax.Array]:
    """The paper's per-sample weights, normalised over teachers.

    Args:
      g_teachers: [M, B, C] KD logit gradients of the teachers; g_biased: [B, C].
      gram: [B, C, C] per-sample Gram matrices; None selects the two-class closed form
        (valid for C == 2 with normalised gradients, whatever the parameter scope).
      normalize_grads: see `agre_from_gram`. Without normalisation 1 - dot can be negative;
        it is clipped at 0 so that the weights stay a convex combination.
      empty_rows: rows whose raw weights sum to 0 get 1/M ('uniform') or 0 ('drop').

    Returns:
      (weights [B, M], empty [B] bool).
    """
    if gram is None:
        if not normalize_grads or g_teachers.shape[-1] != 2:
            raise ValueError("the closed form needs two classes and normalised gradients")
        raw = agre_two_class(g_teachers, g_biased)
    else:
        raw = jnp.maximum(agre_from_gram(g_teachers, g_biased, gram, normalize_grads), 0.0)
    return _normalise_rows(raw.T, empty_rows)


def feature_cotangents(
    student: dict[str, jax.Array],
    teachers: dict[str, jax.Array],
    biased: dict[str, jax.Array],
    distance: Callable[[jax.Array, jax.Array], jax.Array],
) -> dict[str, jax.Array]:
    """Cotangents of the per-sample feature losses towards each teacher and the biased model.

    Layer k of the L layers owns rows k (M + 1) .. k (M + 1) + M of the result: teacher
    t's row is d D(s_i, f_ti) / d s_i, the biased model's is last; the rows of other layers
    are zero there. `cotangent_gram` then gives every layer's gradient inner products at once
    (its diagonal blocks).

    Args:
      student: {layer: [B, ...]} the student's features as the loss sees them (after the
        adapters; a larger map is pooled inside `distance`).
      teachers: {layer: [M, B, ...]}; biased: {layer: [B, ...]} the biased model's.
      distance: (s [B, ...], f [B, ...]) -> [B] per-sample loss, e.g. losses.feature_distance.

    Returns:
      {layer: [L (M + 1), B, ...]} float32, in the order of `student`'s keys.
    """
    names = list(student)
    m = teachers[names[0]].shape[0]
    out = {}
    for k, name in enumerate(names):
        s = student[name].astype(jnp.float32)
        refs = jnp.concatenate([teachers[name], biased[name][None]]).astype(jnp.float32)
        grad = jax.vmap(jax.grad(lambda s, f: jnp.sum(distance(s, f))), (None, 0))(s, refs)
        pad = ((k * (m + 1), (len(names) - k - 1) * (m + 1)),) + ((0, 0),) * s.ndim
        out[name] = jnp.pad(grad, pad)
    return out


def feature_agre_weights(
    gram: jax.Array, num_layers: int, *, normalize_grads: bool, empty_rows: str
) -> tuple[jax.Array, jax.Array]:
    """Per-layer AGRE weights of the feature loss (the plan's section 9.3):
    W_t^l(x_i) = 1 - cos(grad_theta D_l(s_i, f_ti), grad_theta D_l(s_i, f_bi)), normalised.

    Args:
      gram: [B, L (M + 1), L (M + 1)] from `cotangent_gram` of `feature_cotangents`.
      num_layers: L.
      normalize_grads, empty_rows: as `agre_weights`.

    Returns:
      (weights [L, B, M], empty [L, B] bool).
    """
    r = gram.shape[-1] // num_layers
    basis = jnp.eye(r, dtype=jnp.float32)
    g_t = jnp.broadcast_to(basis[: r - 1, None], (r - 1, gram.shape[0], r))
    g_b = jnp.broadcast_to(basis[r - 1], (gram.shape[0], r))
    out = [
        agre_weights(
            g_t,
            g_b,
            gram=gram[:, k * r : (k + 1) * r, k * r : (k + 1) * r],
            normalize_grads=normalize_grads,
            empty_rows=empty_rows,
        )
        for k in range(num_layers)
    ]
    return jnp.stack([w for w, _ in out]), jnp.stack([e for _, e in out])


def batch_mean_grads(vjp_fn: Callable[[jax.Array], Any], g_refs: jax.Array) -> Any:
    """grad_theta (1/B) sum_i l_r^i for each reference r: pytree with leaves [R, ...].

    Args:
      vjp_fn: a logit cotangent [B, C] -> the student's parameter gradient (a pytree), the
        pullback of a forward already run: the step's own training-mode forward (gradients
        through the batch's BatchNorm statistics, as the earlier PyTorch code) or
        `logit_vjp(logit_fn, ...)` (statistics held fixed).
      g_refs: [R, B, C] KD logit gradients (the batch's size B divides them here).
    """
    # One backward pass per reference, unrolled (they share the forward's residuals): on
    # XLA:CPU, vmapping the R cotangents was 1.3x slower than R passes (ResNet-18, 64 px,
    # B = 32, R = 6: 3.7 against 2.8 s), and lax.map 27x slower.
    grads = [vjp_fn(g_refs[r] / g_refs.shape[1]) for r in range(g_refs.shape[0])]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *grads)


def logit_vjp(logit_fn: LogitFn, params: Any, images: jax.Array) -> Callable[[jax.Array], Any]:
    """The pullback of `logit_fn(params, images)` [B, C] to `params` (one forward now, one
    backward pass per call)."""
    _, vjp_fn = jax.vjp(lambda p: logit_fn(p, images), params)
    return lambda g: vjp_fn(g)[0]


def agre_batch_weights(
    grads: Any, *, normalize_grads: bool, min_weight: float, axis_name: str | None = None
) -> jax.Array:
    """One weight per teacher from the cosine of batch-mean gradients.

    Args:
      grads: pytree with leaves [M + 1, ...]: the M teachers' batch-mean gradients, then the
        biased model's.
      normalize_grads: cosine or raw dot product.
      min_weight: W_t = max(1 - cos, min_weight) before normalising (0.01 in the PyTorch code).
      axis_name: pmap axis over which the batch means are averaged (the global batch).

    Returns:
      [M] weights summing to 1.
    """
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    leaves = [g.reshape(g.shape[0], -1).astype(jnp.float32) for g in jax.tree.leaves(grads)]
    inner = sum(leaf @ leaf.T for leaf in leaves)  # [M + 1, M + 1]
    dot = inner[:-1, -1]
    if normalize_grads:
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(inner), 0.0))
        denom = norms[:-1] * norms[-1]
        cos = jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0)
        raw = 1.0 - cos
    else:
        raw = 1.0 - dot
    raw = jnp.maximum(raw, min_weight)
    return raw / jnp.sum(raw)


def last_layer_batch_grads(pooled: jax.Array, g_refs: jax.Array) -> dict[str, jax.Array]:
    """Batch-mean gradients of the fc kernel and bias: pooled [B, D], g_refs [R, B, C] ->
    {'kernel': [R, D, C], 'bias': [R, C]}."""
    b = pooled.shape[0]
    return {
        "kernel": jnp.einsum("bd,rbc->rdc", pooled.astype(jnp.float32), g_refs) / b,
        "bias": jnp.sum(g_refs, axis=1) / b,
    }


def project_capped_simplex(v: jax.Array, cap: float, iters: int = 60) -> jax.Array:
    """Euclidean projection of v [M] onto {w : 0 <= w_t <= cap, sum_t w_t = 1} (cap >= 1/M):
    w = clip(v - s, 0, cap) with the shift s found by bisection (sum is monotone in s)."""
    lo = jnp.min(v) - 1.0  # sum >= min(M * cap, ...) >= 1
    hi = jnp.max(v)  # sum = 0

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        over = jnp.sum(jnp.clip(v - mid, 0.0, cap)) > 1.0
        return jnp.where(over, mid, lo), jnp.where(over, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return jnp.clip(v - 0.5 * (lo + hi), 0.0, cap)


def aekd_weights(
    g_teachers: jax.Array,
    *,
    cap: float,
    iters: int = 500,
    ridge: float = 1e-6,
    axis_name: str | None = None,
) -> jax.Array:
    """AE-KD's teacher weights (Du et al., "Agree to Disagree: Adaptive Ensemble Knowledge
    Distillation in Gradient Space", NeurIPS 2020, as their public code computes
    them: github.com/AnTuo1998/AE-KD, helper/loops.py and helper/optimization.py).

    The gradient space is the student's logits: g_t = the batch mean over samples of the
    gradient of teacher t's KD loss with respect to the student's logits ([C] per teacher;
    the code hooks `logit_s` and averages the hooked [B, C] gradient over the batch). The
    weights solve min_w |sum_t w_t g_t|^2 over {0 <= w_t <= cap, sum_t w_t = 1}: the code's
    one-class SVM dual with nu = 1 / (cap * M) (sklearn's solution divided by M * nu), whose
    `-C` tolerance (cap) defaults to 0.6, without its optional normalisation of g_t (off by
    default there). Solved here by accelerated projected gradient (FISTA, `iters` steps of
    size 1 / lambda_max) with a small ridge pulling towards the uniform weights,
    ridge * trace(G) / M * |w - 1/M|^2, so that the solution is unique when the Gram matrix
    is singular (always with fewer classes than teachers: with two classes every g_t is a
    multiple of (1, -1)). Tested against scipy and sklearn in tests/test_weighting.py.

    Args:
      g_teachers: [M, B, C] per-sample KD logit gradients (weighting.kd_grads).
      cap: the upper bound C of every weight, in [1/M, 1].
      axis_name: pmap axis over which the batch mean runs (the global batch).

    Returns:
      [M] weights summing to 1, each in [0, cap].
    """
    m = g_teachers.shape[0]
    g = jnp.mean(g_teachers.astype(jnp.float32), axis=1)  # [M, C]
    if axis_name is not None:
        g = jax.lax.pmean(g, axis_name)
    gram = g @ g.T  # [M, M]
    lam = ridge * jnp.trace(gram) / m + 1e-30
    hessian = gram + lam * jnp.eye(m)
    step = 1.0 / jnp.maximum(jnp.linalg.eigvalsh(hessian)[-1], 1e-30)
    uniform = jnp.full((m,), 1.0 / m)

    def body(_, carry):
        w, y, t = carry
        grad = hessian @ y - lam * uniform  # d/dy of y^T G y / 2 + lam |y - u|^2 / 2
        w_next = project_capped_simplex(y - step * grad, cap)
        t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        y_next = w_next + ((t - 1.0) / t_next) * (w_next - w)
        return w_next, y_next, t_next

    w, _, _ = jax.lax.fori_loop(0, iters, body, (uniform, uniform, jnp.float32(1.0)))
    return w


def entropy(weights: jax.Array) -> jax.Array:
    """Per-sample entropy of [B, M] weight rows (0 log 0 = 0) -> [B]."""
    w = jnp.clip(weights, 0.0, 1.0)
    return -jnp.sum(jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0), axis=-1)


def weight_metrics(weights: jax.Array, empty: jax.Array | None = None) -> dict[str, jax.Array]:
    """Mean weight per teacher, mean per-sample entropy and the fraction of empty rows."""
    metrics = {f"weight/{t}": m for t, m in enumerate(jnp.mean(weights, axis=0))}
    metrics["weight_entropy"] = jnp.mean(entropy(weights))
    if empty is not None:
        metrics["empty_rows"] = jnp.mean(empty.astype(jnp.float32))
    return metrics


def kd_grads(
    student_logits: jax.Array, teacher_logits: jax.Array, biased_logits: jax.Array, tau: float
) -> tuple[jax.Array, jax.Array]:
    """KD logit gradients of the teachers [M, B, C] and of the biased model [B, C]."""
    return (
        losses.kd_logit_grad(student_logits, teacher_logits, tau),
        losses.kd_logit_grad(student_logits, biased_logits, tau),
    )
