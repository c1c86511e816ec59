"""Teacher weights against brute force: explicit per-sample gradients of every student
parameter (one `jax.grad` per sample and reference), cosines computed by hand in float64."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agre_jax import distill, losses, models, weighting

TAU = 4.0
B, M = 6, 3


def tiny_resnet(num_classes):
    return models.ResNet(
        stage_sizes=(1, 1, 1, 1),
        block_cls=models.BasicBlock,
        num_classes=num_classes,
        width=4,
        small_input=True,
    )


def fixed_stats(model):
    """Randomised BatchNorm statistics standing in for a batch's own."""
    variables = models.init(model, jax.random.key(0), 8)
    k1 = jax.random.split(jax.random.key(1), 4)[0]
    return jax.tree.map(
        lambda x: x + 0.3 * jax.random.uniform(k1, x.shape), variables["batch_stats"]
    )


@functools.cache
def setup(num_classes):
    """A tiny student with randomised BN statistics (standing in for a batch's own), its
    fixed-statistics logit function, images and random teacher / biased logits."""
    model = tiny_resnet(num_classes)
    variables = models.init(model, jax.random.key(0), 8)
    _, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
    stats = fixed_stats(model)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(k2, x.shape), variables["params"])

    def logit_fn(p, x):  # not jitted: layerwise_gram intercepts its layers while tracing
        return model.apply({"params": p, "batch_stats": stats}, x, train=False)

    images = jax.random.normal(k3, (B, 8, 8, 3))
    s_logits = jax.jit(logit_fn)(params, images)
    ref = s_logits[None] + 2.0 * jax.random.normal(k4, (M + 1, B, num_classes))
    return logit_fn, params, images, s_logits, ref[:M], ref[M]


def per_sample_grads(logit_fn, params, images, refs, scope="full"):
    """[R, B, P] float64: grad_theta kd(z_s(x_i), z_r^i) for every reference r and sample i."""

    @jax.jit
    def grad_one(x, z_ref):
        def loss(p):
            return losses.kd_loss(logit_fn(p, x[None]), z_ref[None], TAU)[0]

        g = jax.grad(loss)(params)
        if scope == "last_layer":
            g = g["fc"]
        return jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(g)])

    out = [[grad_one(images[i], refs[r, i]) for i in range(B)] for r in range(refs.shape[0])]
    return np.asarray(out, np.float64)


def brute_force_agre(gt, gb, normalize, empty_rows="uniform"):
    """gt [M, B, P], gb [B, P] -> weights [B, M] by the paper's formula, by hand."""
    raw = np.zeros((B, M))
    for i in range(B):
        # At an exact tie (reference == student) the true gradient is 0; its float32 value is
        # rounding noise (softmax sums are not exactly 1), so treat tiny norms as 0.
        scale = max(np.linalg.norm(gb[i]), max(np.linalg.norm(gt[t, i]) for t in range(M)))
        zero = lambda g, scale=scale: np.linalg.norm(g) <= 1e-6 * scale
        for t in range(M):
            dot = gt[t, i] @ gb[i]
            if normalize:
                tie = zero(gt[t, i]) or zero(gb[i])
                denom = 0.0 if tie else np.linalg.norm(gt[t, i]) * np.linalg.norm(gb[i])
                raw[i, t] = 1.0 - (dot / denom if denom > 0 else 0.0)
            else:
                raw[i, t] = max(1.0 - dot, 0.0)
    out = np.zeros_like(raw)
    for i in range(B):
        s = raw[i].sum()
        out[i] = (
            raw[i] / s
            if s > weighting.EMPTY_ROW_EPS
            else (1.0 / M if empty_rows == "uniform" else 0.0)
        )
    return out


@pytest.mark.parametrize("method", weighting.GRAM_METHODS)
@pytest.mark.parametrize("num_classes", [2, 10])
@pytest.mark.parametrize("normalize", [True, False])
def test_agre_full_scope_matches_brute_force(num_classes, normalize, method):
    logit_fn, params, images, s_logits, t_logits, b_logits = setup(num_classes)
    g_t, g_b = weighting.kd_grads(s_logits, t_logits, b_logits, TAU)
    gram = jax.jit(weighting.gram, static_argnums=(0, 3, 4))(logit_fn, params, images, 4, method)
    chex.assert_shape(gram, (B, num_classes, num_classes))
    ours, _ = weighting.agre_weights(
        g_t, g_b, gram=gram, normalize_grads=normalize, empty_rows="uniform"
    )
    grads = per_sample_grads(logit_fn, params, images, jnp.concatenate([t_logits, b_logits[None]]))
    ref = brute_force_agre(grads[:M], grads[M], normalize)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.sum(ours, -1), 1.0, atol=1e-6)


@pytest.mark.parametrize("num_classes", [2, 10])
@pytest.mark.parametrize("normalize", [True, False])
def test_agre_last_layer_matches_brute_force(num_classes, normalize):
    logit_fn, params, images, s_logits, t_logits, b_logits = setup(num_classes)
    pooled = fixed_stats_pooled(num_classes, params, images)
    g_t, g_b = weighting.kd_grads(s_logits, t_logits, b_logits, TAU)
    gram = weighting.last_layer_gram(pooled, num_classes)
    ours, _ = weighting.agre_weights(
        g_t, g_b, gram=gram, normalize_grads=normalize, empty_rows="uniform"
    )
    grads = per_sample_grads(
        logit_fn, params, images, jnp.concatenate([t_logits, b_logits[None]]), "last_layer"
    )
    ref = brute_force_agre(grads[:M], grads[M], normalize)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def fixed_stats_pooled(num_classes, params, images):
    """Pooled features [B, D] of the same fixed-statistics forward as `setup`'s logit_fn."""
    model = tiny_resnet(num_classes)
    variables = {"params": params, "batch_stats": fixed_stats(model)}
    fwd = functools.partial(models.apply_with_features, model, layers=("pooled",))
    return jax.jit(fwd)(variables, images)[1]["pooled"]


def two_class_cases():
    """Random logits plus a tie (teacher == student: zero gradient) and an empty row (every
    teacher pulls the student's class-0 probability the same way as the biased model)."""
    logit_fn, params, images, s_logits, t_logits, b_logits = setup(2)
    t_logits = t_logits.at[0, 0].set(s_logits[0])  # teacher == student
    t_logits = t_logits.at[2, 3].set(b_logits[3])  # teacher == biased model: cosine 1
    push = s_logits[1] + jnp.array([3.0, -3.0])  # p_r[0] > p_s[0]: a_r < 0
    b_logits = b_logits.at[1].set(push)
    t_logits = t_logits.at[:, 1].set(push + jnp.arange(M)[:, None] * jnp.array([0.5, -0.5]))
    return logit_fn, params, images, s_logits, t_logits, b_logits


@pytest.mark.parametrize("empty_rows", ["uniform", "drop"])
def test_two_class_closed_form_equals_gram_and_brute_force(empty_rows):
    logit_fn, params, images, s_logits, t_logits, b_logits = two_class_cases()
    g_t, g_b = weighting.kd_grads(s_logits, t_logits, b_logits, TAU)
    closed, empty = weighting.agre_weights(
        g_t, g_b, gram=None, normalize_grads=True, empty_rows=empty_rows
    )
    raw = weighting.agre_two_class(g_t, g_b)
    assert set(np.unique(np.asarray(raw))) <= {0.0, 1.0, 2.0}
    assert float(raw[0, 0]) == 1.0  # the tie with the student: cosine 0
    assert float(raw[2, 3]) == 0.0  # the tie with the biased model: cosine 1
    assert bool(empty[1]) and not bool(empty[0])
    expected_row = np.full(M, 1.0 / M) if empty_rows == "uniform" else np.zeros(M)
    np.testing.assert_allclose(closed[1], expected_row, rtol=1e-6)
    gram = jax.jit(weighting.layerwise_gram, static_argnums=(0, 3))(logit_fn, params, images, 3)
    via_gram, empty_gram = weighting.agre_weights(
        g_t, g_b, gram=gram, normalize_grads=True, empty_rows=empty_rows
    )
    np.testing.assert_allclose(closed, via_gram, atol=1e-5)
    np.testing.assert_array_equal(empty, empty_gram)
    grads = per_sample_grads(logit_fn, params, images, jnp.concatenate([t_logits, b_logits[None]]))
    ref = brute_force_agre(grads[:M], grads[M], True, empty_rows)
    np.testing.assert_allclose(closed, ref, atol=1e-5)


def test_two_class_closed_form_needs_normalisation():
    g = jnp.ones((M, B, 2))
    with pytest.raises(ValueError, match="closed form"):
        weighting.agre_weights(g, g[0], gram=None, normalize_grads=False, empty_rows="uniform")


@pytest.mark.parametrize("scope", ["full", "last_layer"])
@pytest.mark.parametrize("normalize", [True, False])
def test_agre_batch_matches_explicit_batch_mean_gradients(scope, normalize):
    logit_fn, params, images, s_logits, t_logits, b_logits = setup(10)
    refs = jnp.concatenate([t_logits, b_logits[None]])
    g_refs = losses.kd_logit_grad(s_logits, refs, TAU)
    if scope == "full":
        grads = jax.jit(
            lambda p, x, g: weighting.batch_mean_grads(weighting.logit_vjp(logit_fn, p, x), g)
        )(params, images, g_refs)
    else:
        grads = weighting.last_layer_batch_grads(fixed_stats_pooled(10, params, images), g_refs)
    ours = weighting.agre_batch_weights(grads, normalize_grads=normalize, min_weight=0.01)

    def mean_loss(p, z_ref):
        return jnp.mean(losses.kd_loss(logit_fn(p, images), z_ref, TAU))

    explicit = []
    grad_fn = jax.jit(jax.grad(mean_loss))
    for r in range(M + 1):
        g = grad_fn(params, refs[r])
        if scope == "last_layer":
            g = g["fc"]
        explicit.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]))
    explicit = np.asarray(explicit, np.float64)
    dots = explicit[:M] @ explicit[M]
    if normalize:
        dots = dots / (np.linalg.norm(explicit[:M], axis=1) * np.linalg.norm(explicit[M]))
    raw = np.maximum(1.0 - dots, 0.01)
    np.testing.assert_allclose(ours, raw / raw.sum(), atol=1e-5)


def test_aver_random_and_metrics():
    w = weighting.uniform(B, M)
    np.testing.assert_allclose(w, 1.0 / M)
    picks = set()
    for seed in range(12):
        r = weighting.random_teacher(jax.random.key(seed), B, M)
        assert np.all(np.asarray(r) == np.asarray(r[0]))  # one teacher per mini-batch
        assert float(r[0].sum()) == 1.0 and float(r[0].max()) == 1.0
        picks.add(int(np.argmax(r[0])))
    assert picks == set(range(M))
    m = weighting.weight_metrics(w, jnp.array([True, False, False, False, False, False]))
    np.testing.assert_allclose(m["weight_entropy"], np.log(M), rtol=1e-6)
    np.testing.assert_allclose(m["empty_rows"], 1 / 6)
    assert float(weighting.weight_metrics(r)["weight_entropy"]) == 0.0


def test_step_weights_use_this_batch_statistics():
    """The step's fixed-statistics logit function reproduces its training-mode logits: the
    statistics the Gram matrices hold constant are exactly this batch's."""
    model = tiny_resnet(10)
    variables = models.init(model, jax.random.key(3), 8)
    images = jax.random.normal(jax.random.key(4), (B, 8, 8, 3))
    train_logits, _, _, moments = models.apply_with_features(
        model, variables, images, train=True, layers=(), moments=True
    )
    fixed = model.apply({"params": variables["params"], "batch_stats": moments}, images)
    np.testing.assert_allclose(fixed, train_logits, atol=1e-5)
    cfg = distill.DistillConfig(weighting="agre", grad_scope="full", chunk_size=2)
    assert cfg.needs_gram


@pytest.mark.parametrize("block", [models.BasicBlock, models.Bottleneck])
def test_layerwise_gram_equals_per_sample_jacobians(block):
    """Strided 7x7 stem, max-pool, downsampling, basic and Bottleneck blocks: every layer
    kind of the ResNets, one block per stage (the deeper ResNets repeat these layers).
    Three classes (the Gram path's cost grows with them; ten classes are checked against
    brute force on the small ResNet above)."""
    model = models.ResNet(stage_sizes=(1, 1, 1, 1), block_cls=block, num_classes=3, width=4)
    variables = models.init(model, jax.random.key(0), 16)
    stats = jax.tree.map(lambda x: x + 0.5, variables["batch_stats"])

    def logit_fn(p, x):
        return model.apply({"params": p, "batch_stats": stats}, x, train=False)

    images = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    grams = [
        jax.jit(weighting.gram, static_argnums=(0, 3, 4))(
            logit_fn, variables["params"], images, 2, method
        )
        for method in ("layerwise", "vmap")
    ]
    scale = float(jnp.max(jnp.abs(grams[1])))
    np.testing.assert_allclose(grams[0] / scale, grams[1] / scale, atol=1e-5)


def test_layerwise_gram_refuses_what_it_cannot_decompose():
    model = tiny_resnet(3)
    variables = models.init(model, jax.random.key(0), 8)
    images = jnp.ones((2, 8, 8, 3))

    def fixed(p, x):
        return model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=False)

    with pytest.raises(ValueError, match="must not be a jax.jit"):
        jitted = jax.jit(fixed)
        jitted(variables["params"], images)  # cached trace without the interceptor
        weighting.layerwise_gram(jitted, variables["params"], images, 2)

    def batch_stats(p, x):
        out, _ = model.apply(
            {"params": p, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return out

    with pytest.raises(ValueError, match="fixed BatchNorm statistics"):
        weighting.layerwise_gram(batch_stats, variables["params"], images, 2)

    class WithLayerNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
            return nn.Dense(3)(x)

    ln = WithLayerNorm()
    ln_params = ln.init(jax.random.key(0), images)["params"]
    with pytest.raises(ValueError, match="other parametrised layers"):
        weighting.layerwise_gram(lambda p, x: ln.apply({"params": p}, x), ln_params, images, 2)


def _capped_simplex_qp(gram: np.ndarray, cap: float) -> tuple[np.ndarray, float]:
    """min_w w^T G w over {0 <= w <= cap, sum w = 1} by scipy's SLSQP (float64)."""
    from scipy.optimize import minimize

    m = gram.shape[0]
    res = minimize(
        lambda w: w @ gram @ w,
        np.full(m, 1.0 / m),
        jac=lambda w: 2 * gram @ w,
        bounds=[(0.0, cap)] * m,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    assert res.success, res.message
    return res.x, float(res.fun)


def _aekd_reference(g_mean: np.ndarray, cap: float) -> np.ndarray:
    """AE-KD's public code: a one-class SVM on the precomputed Gram matrix of the batch-mean
    logit gradients, nu = 1 / (cap * M), weights = dual coefficients / (M * nu)."""
    from sklearn.svm import OneClassSVM

    m = g_mean.shape[0]
    nu = 1.0 / (cap * m)
    svm = OneClassSVM(kernel="precomputed", nu=nu, tol=1e-10).fit(g_mean @ g_mean.T)
    w = np.zeros(m)
    w[svm.support_] = svm.dual_coef_[0] / (m * nu)
    return w


@pytest.mark.parametrize("cap", [0.3, 0.6, 1.0])
def test_capped_simplex_projection_matches_scipy(cap):
    from scipy.optimize import minimize

    rng = np.random.default_rng(int(cap * 10))
    for _ in range(5):
        v = rng.normal(size=5) * 2
        ours = np.asarray(weighting.project_capped_simplex(jnp.asarray(v, jnp.float32), cap))
        ref = minimize(
            lambda w, v=v: np.sum((w - v) ** 2),
            np.full(5, 0.2),
            bounds=[(0.0, cap)] * 5,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
            method="SLSQP",
            options={"ftol": 1e-14},
        ).x
        np.testing.assert_allclose(ours, ref, atol=1e-5)
        assert abs(ours.sum() - 1) < 1e-5 and ours.min() >= 0 and ours.max() <= cap + 1e-7


@pytest.mark.parametrize("cap", [0.35, 0.6, 1.0])
def test_aekd_weights_match_scipy_and_the_reference_svm(cap):
    """Full-rank Gram (C = 10 > M = 4): the minimum is unique, so the weights themselves
    agree with scipy's QP and with AE-KD's own one-class SVM formulation (sklearn)."""
    rng = np.random.default_rng(7)
    g = rng.normal(size=(4, 6, 10)) + rng.normal(size=(4, 1, 10))  # [M, B, C]
    ours = np.asarray(weighting.aekd_weights(jnp.asarray(g, jnp.float32), cap=cap))
    g_mean = g.mean(axis=1)
    qp, _ = _capped_simplex_qp(g_mean @ g_mean.T, cap)
    svm = _aekd_reference(g_mean, cap)
    print(f"\ncap {cap}: ours {ours}, scipy {qp}, sklearn one-class SVM {svm}")
    np.testing.assert_allclose(ours, qp, atol=1e-5)
    np.testing.assert_allclose(ours, svm, atol=1e-5)
    assert abs(ours.sum() - 1) < 1e-5 and ours.max() <= cap + 1e-6
    if cap == 0.35:  # uncapped, teacher 2 would take 0.55 (see cap 0.6)
        assert np.isclose(ours.max(), cap, atol=1e-4), "the cap should bind here"


def test_aekd_weights_on_a_singular_gram_reach_the_minimum_norm():
    """Two classes, five teachers: every batch-mean gradient is a multiple of (1, -1) and
    many weight vectors reach the minimum; ours reaches scipy's objective (the ridge makes
    the choice unique and deterministic)."""
    s = jnp.asarray([[0.2, -0.1], [1.5, 0.3], [-0.7, 0.4]] * 2, jnp.float32)  # [B, 2]
    t = jax.random.normal(jax.random.key(3), (5, 6, 2)) * 2.0
    g = np.asarray(losses.kd_logit_grad(s, t, TAU), np.float64)
    ours = np.asarray(weighting.aekd_weights(jnp.asarray(g, jnp.float32), cap=0.6))
    g_mean = g.mean(axis=1)
    gram = g_mean @ g_mean.T
    _, best = _capped_simplex_qp(gram, 0.6)
    assert ours @ gram @ ours <= best + 1e-6 * np.trace(gram)
    assert abs(ours.sum() - 1) < 1e-5 and ours.max() <= 0.6 + 1e-6


def test_aekd_weights_under_pmap_use_the_global_batch():
    g = jax.random.normal(jax.random.key(0), (3, 8, 10))
    ref = weighting.aekd_weights(g, cap=0.5)
    shards = jnp.stack(jnp.split(g, 4, axis=1))  # [4 devices, M, 2, C]
    got = jax.pmap(
        lambda x: weighting.aekd_weights(x, cap=0.5, axis_name="batch"), axis_name="batch"
    )(shards)
    np.testing.assert_allclose(got, jnp.broadcast_to(ref, got.shape), atol=1e-5)


def _brute_force_distance(s, f, kind):
    """One sample's feature loss, written out: average-pool s to f's map, then the mean
    squared error, or attention transfer's mean squared difference of normalised maps."""
    if s.ndim == 3 and s.shape[:2] != f.shape[:2]:
        h, w = f.shape[:2]
        s = s.reshape(h, s.shape[0] // h, w, s.shape[1] // w, s.shape[2]).mean(axis=(1, 3))
    if kind == "mse":
        return jnp.mean(jnp.square(s - f))

    def attention(x):
        a = jnp.mean(jnp.square(x), axis=-1).ravel()
        return a / jnp.linalg.norm(a)

    return jnp.mean(jnp.square(attention(s) - attention(f)))


@pytest.mark.parametrize(
    "kind, method, normalize",
    [("mse", "layerwise", True), ("mse", "vmap", False), ("attention", "layerwise", True)],
)
def test_feature_agre_weights_match_brute_force(kind, method, normalize):
    """Per-layer AGRE weights of the feature loss against explicit per-sample gradients of
    every student and adapter parameter, one `jax.grad` per sample, layer and reference.
    Teachers of another width (real 1x1-conv and Dense adapters) and a coarser map at every
    spatial layer (the student's maps are pooled), as a small-input student against
    ImageNet-stem teachers."""
    layers = ("layer2", "pooled") if kind == "mse" else ("layer1", "layer2")
    gammas = tuple((name, 0.5) for name in layers)
    cfg = distill.DistillConfig(
        feature_weighting="agre",
        feature_loss=kind,
        gammas=gammas,
        gram=method,
        chunk_size=4,
        normalize_grads=normalize,
    )
    student = tiny_resnet(2)
    teacher = models.create("resnet18", 2, width=6)  # ImageNet stem: strides 8 .. 32
    size = 16
    ens = distill.Ensemble(teachers=(teacher,), group_sizes=(M,), biased_backbone=(0, 0))
    mdl = distill.create_models(student, ens, cfg)
    variables = models.init(student, jax.random.key(0), size)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(2), 4)
    stats = jax.tree.map(lambda x: x + 0.3, variables["batch_stats"])
    images = jax.random.normal(k1, (B, size, size, 3))
    _, s_feats = models.apply_with_features(
        student, {"params": variables["params"], "batch_stats": stats}, images, layers=layers
    )
    params = {"student": variables["params"]}
    if mdl.adapters is not None:
        params["adapters"] = mdl.adapters.init(k2, dict(s_feats))["params"]
        adapted = mdl.adapters.apply({"params": params["adapters"]}, dict(s_feats))
    else:
        adapted = dict(s_feats)
    t_shapes = {
        k: v.shape[1:]
        for k, v in models.apply_with_features(
            teacher, models.init(teacher, k3, size), images, layers=layers
        )[1].items()
    }
    refs = {}  # M teachers then the biased model, near the student's (pooled) features
    for i, k in enumerate(layers):
        near = adapted[k] if len(t_shapes[k]) == 1 else losses.pool_to(adapted[k], t_shapes[k][:2])
        noise = jax.random.normal(jax.random.fold_in(k4, i), (M + 1, B, *t_shapes[k]))
        refs[k] = noise + (near[None] if near.shape[1:] == t_shapes[k] else 0.0)
    t_feats = {k: v[:M] for k, v in refs.items()}
    b_feats = {k: v[M] for k, v in refs.items()}
    ours, metrics = jax.jit(
        lambda p, x, s, t, b: distill.feature_weights(
            cfg, mdl, params=p, batch_moments=stats, images=x, s_feats=s, t_feats=t, b_feats=b
        )
    )(params, images, s_feats, t_feats, b_feats)

    def features(p, x):  # the student's adapted features of one image, from scratch
        _, f = models.apply_with_features(
            student, {"params": p["student"], "batch_stats": stats}, x[None], layers=layers
        )
        if mdl.adapters is not None:
            f = mdl.adapters.apply({"params": p["adapters"]}, dict(f))
        return {k: v[0] for k, v in f.items()}

    @functools.partial(jax.jit, static_argnums=0)
    def grad_one(name, x, f):
        g = jax.grad(lambda p: _brute_force_distance(features(p, x)[name], f, kind))(params)
        return jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(g)])

    for name in layers:
        grads = np.asarray(
            [[grad_one(name, images[i], refs[name][r, i]) for i in range(B)] for r in range(M + 1)],
            np.float64,
        )
        ref = brute_force_agre(grads[:M], grads[M], normalize)
        chex.assert_shape(ours[name], (B, M))
        np.testing.assert_allclose(ours[name], ref, atol=2e-5, err_msg=name)
        np.testing.assert_allclose(
            metrics[f"feat_weight/0/{name}"], ref[:, 0].mean(), atol=2e-5, err_msg=name
        )


class WeightsVariantsTest(chex.TestCase):
    """The weighting functions op by op (no jit) and compiled give the same weights."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_variants_agree(self):
        k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
        s_logits = jax.random.normal(k1, (B, 10))
        refs = s_logits[None] + jax.random.normal(k2, (M + 1, B, 10))
        a = jax.random.normal(k3, (B, 10, 10))
        gram = a @ jnp.swapaxes(a, 1, 2)  # positive semi-definite, like J J^T

        def weights(s, r, k):
            g_t, g_b = weighting.kd_grads(s, r[:M], r[M], TAU)
            w, _ = weighting.agre_weights(
                g_t, g_b, gram=k, normalize_grads=True, empty_rows="uniform"
            )
            layer_w, _ = weighting.feature_agre_weights(
                jnp.tile(k[:, : M + 1, : M + 1], (1, 2, 2)),
                2,
                normalize_grads=True,
                empty_rows="drop",
            )
            return w, layer_w

        got = self.variant(weights)(s_logits, refs, gram)
        want = jax.jit(weights)(s_logits, refs, gram)
        chex.assert_trees_all_close(got, want, atol=1e-6)
        chex.assert_shape(got[1], (2, B, M))


def test_cotangent_gram_of_bfloat16_outputs():
    """Float32 cotangents at bfloat16 outputs (features without adapters under
    dtype=bfloat16): both methods cast them to the outputs' dtype."""
    model = tiny_resnet(2).clone(dtype=jnp.bfloat16)
    variables = models.init(model, jax.random.key(0), 8)

    def features(p, x):
        _, f = models.apply_with_features(
            model, {"params": p, "batch_stats": variables["batch_stats"]}, x, layers=("layer2",)
        )
        return dict(f)

    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    shape = jax.eval_shape(features, variables["params"], images)["layer2"].shape
    cot = {"layer2": jax.random.normal(jax.random.key(2), (3, *shape), jnp.float32)}
    gram = jax.jit(weighting.cotangent_gram, static_argnums=(0, 4, 5))
    grams = [
        gram(features, variables["params"], images, cot, 2, method)
        for method in ("layerwise", "vmap")
    ]
    assert features(variables["params"], images)["layer2"].dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(grams[1])))
    np.testing.assert_allclose(grams[0] / scale, grams[1] / scale, atol=2e-2)
