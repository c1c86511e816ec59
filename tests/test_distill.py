"""The distillation step: configuration checks, properties, pmap vs jit. (Its pure parts run
with and without jit in tests/test_weighting.py.)"""

import functools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from agre_jax import distill, losses, models, optim, weighting

SIZE, B, M = 8, 8, 3


def tiny(num_classes, width, block_cls=models.BasicBlock):
    return models.ResNet(
        stage_sizes=(1, 1, 1, 1),
        block_cls=block_cls,
        num_classes=num_classes,
        width=width,
        small_input=True,
    )


@functools.cache
def teacher_variables(num_classes):
    """M tiny teachers with perturbed weights and a biased head for the backbone of teacher 1."""
    model = tiny(num_classes, 8)
    base = models.init(model, jax.random.key(10), SIZE)
    out = []
    for t in range(M):
        k = jax.random.key(100 + t)
        params = jax.tree.map(
            lambda x, k=k: x + 0.2 * jax.random.normal(k, x.shape), base["params"]
        )
        out.append({"params": params, "batch_stats": base["batch_stats"]})
    head = jax.tree.map(lambda x: -x, out[1]["params"]["fc"])  # opposite of teacher 1's head
    return model, out, head


@functools.cache
def _static(num_classes, lr, cfg_items):
    """Models, config and optimiser, one object per setting, so that tests of one setting
    share its compiled step (`run`) instead of tracing it again (about 10 s each)."""
    t_model, _, _ = teacher_variables(num_classes)
    ens = distill.Ensemble(teachers=(t_model,), group_sizes=(M,), biased_backbone=(0, 1))
    cfg = distill.DistillConfig(**{"chunk_size": 4, **dict(cfg_items)})
    mdl = distill.create_models(tiny(num_classes, 4), ens, cfg)
    return mdl, cfg, optim.create_optimizer("sgd", lr, 100)


def setup(num_classes=10, identical=False, biased_is_teacher=None, lr=0.05, **cfg_kwargs):
    """Models, frozen pytree, config, optimiser, initial state and a batch."""
    _, t_vars, head = teacher_variables(num_classes)
    if identical:
        t_vars = [t_vars[0]] * M
    if biased_is_teacher is not None:
        head = t_vars[biased_is_teacher]["params"]["fc"]
    frozen = {"teachers": (distill.stack_variables(t_vars),), "biased": head}
    mdl, cfg, tx = _static(num_classes, lr, tuple(sorted(cfg_kwargs.items())))
    state = distill.create_train_state(mdl, tx, jax.random.key(0), SIZE)
    k1, k2 = jax.random.split(jax.random.key(7))
    batch = {
        "image": jax.random.normal(k1, (B, SIZE, SIZE, 3)),
        "label": jax.random.randint(k2, (B,), 0, num_classes),
    }
    return mdl, frozen, cfg, tx, state, batch


_STEPS = {}  # (id(mdl), id(cfg), id(tx)) -> (the objects, their jitted step)


def run(mdl, cfg, tx, state, frozen, batch, steps=1, seed=3):
    rng = jax.random.key(seed)
    key = (id(mdl), id(cfg), id(tx))
    if key not in _STEPS:  # the objects are kept with the step: their ids stay theirs
        _STEPS[key] = (mdl, cfg, tx, distill.compile_step(mdl, cfg, tx, pmap=False))
    step = _STEPS[key][3]
    state = jax.tree.map(jnp.copy, state)  # the step donates its input state
    for i in range(steps):
        state, metrics = step(state, frozen, batch, jax.random.fold_in(rng, i))
    return state, metrics


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gammas": (("layer9", 0.1),)}, "unknown feature layers"),
        ({"gammas": (("layer2", -0.1),)}, "gammas must be >= 0"),
        ({"alpha": 1.5}, "alpha must be in"),
        ({"alpha": -0.1}, "alpha must be in"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number > 0"),
        ({"gammas": (("layer3", float("inf")),)}, "gammas must be >= 0 and finite"),
        ({"weighting": "ae_kd"}, "unknown weighting"),
        ({"grad_scope": "some"}, "unknown grad_scope"),
        ({"empty_rows": "skip"}, "unknown empty_rows"),
        ({"feature_loss": "cosine"}, "unknown feature_loss"),
        ({"feature_loss": "crd", "gammas": (("layer3", 0.1),)}, "CRD contrasts pooled"),
        ({"feature_loss": "attention", "gammas": (("pooled", 1.0),)}, "spatial"),
        ({"teacher_map": "pmap"}, "unknown teacher_map"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"feature_weighting": "per_layer"}, "unknown feature_weighting"),
        ({"feature_weighting": "agre"}, "set a gamma > 0"),
        (
            {"feature_weighting": "agre", "feature_loss": "crd", "gammas": (("pooled", 0.5),)},
            "not 'crd'",
        ),
    ],
)
def test_bad_config_is_rejected_before_compiling(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distill.DistillConfig(**kwargs)


def test_class_count_mismatch_is_rejected():
    t_model, _, _ = teacher_variables(10)
    ens = distill.Ensemble(teachers=(t_model,), group_sizes=(M,), biased_backbone=(0, 0))
    with pytest.raises(ValueError, match="class counts disagree"):
        distill.create_models(tiny(2, 4), ens, distill.DistillConfig())
    ens = distill.Ensemble(teachers=(t_model,), group_sizes=(M,), biased=tiny(3, 4))
    with pytest.raises(ValueError, match="class counts disagree"):
        distill.create_models(tiny(10, 4), ens, distill.DistillConfig())
    with pytest.raises(ValueError, match="not a teacher"):
        distill.Ensemble(teachers=(t_model,), group_sizes=(M,), biased_backbone=(0, M))


def test_feature_agre_needs_the_biased_model_at_the_teachers_widths():
    t_model, _, _ = teacher_variables(10)
    cfg = distill.DistillConfig(feature_weighting="agre", gammas=(("layer3", 0.1),))
    ens = distill.Ensemble(teachers=(t_model,), group_sizes=(M,), biased=tiny(10, 4))
    with pytest.raises(ValueError, match="biased model's 'layer3' features"):
        distill.create_models(tiny(10, 4), ens, cfg)
    ens = distill.Ensemble(teachers=(t_model,), group_sizes=(M,), biased=tiny(10, 8))
    distill.create_models(tiny(10, 4), ens, cfg)  # the teachers' architecture: accepted


@pytest.mark.parametrize("weighting", ["agre", "agre_batch"])
def test_feature_agre_beside_last_layer_kd_weights_traces(weighting):
    """Last-layer KD weights make the step capture 'pooled' without a gamma; the feature
    weights take only the layers with one."""
    mdl, frozen, cfg, tx, state, batch = setup(
        2,
        weighting=weighting,
        grad_scope="last_layer",
        feature_weighting="agre",
        gammas=(("layer2", 0.1),),
    )
    step = functools.partial(distill.distill_step, mdl=mdl, cfg=cfg, tx=tx)
    _, metrics = jax.eval_shape(step, state, frozen, batch, jax.random.key(0))
    assert "feat_weight/0/layer2" in metrics and "feat_weight/0/pooled" not in metrics


def test_coarser_student_features_are_rejected():
    t_model, _, _ = teacher_variables(10)
    ens = distill.Ensemble(teachers=(t_model,), group_sizes=(M,), biased_backbone=(0, 0))
    student = models.ResNet(
        stage_sizes=(1, 1, 1, 1), block_cls=models.BasicBlock, num_classes=10, width=4
    )
    cfg = distill.DistillConfig(gammas=(("layer2", 0.1),))
    with pytest.raises(ValueError, match="coarser"):
        distill.create_models(student, ens, cfg)


def test_identical_teachers_give_the_same_loss_for_every_method():
    """Ten classes: every method's general path (two classes take agre's closed form, which
    StepVariantsTest and tests/test_weighting.py cover)."""
    loss = {}
    for method in weighting.METHODS:
        # No feature loss: the same steps as the tests below compile (persistent cache hits).
        mdl, frozen, cfg, tx, state, batch = setup(10, identical=True, weighting=method)
        _, metrics = run(mdl, cfg, tx, state, frozen, batch)
        loss[method] = float(metrics["loss"])
    assert max(loss.values()) - min(loss.values()) <= 1e-5 * abs(loss["aver"]), loss


@pytest.mark.parametrize("weighting", ["agre", "agre_batch"])
def test_teacher_equal_to_biased_model_gets_the_lowest_weight(weighting):
    mdl, frozen, cfg, tx, state, batch = setup(10, biased_is_teacher=1, weighting=weighting)
    _, metrics = run(mdl, cfg, tx, state, frozen, batch)
    w = [float(metrics[f"weight/{t}"]) for t in range(M)]
    assert w[1] == min(w) and w[1] < min(w[0], w[2]), w
    np.testing.assert_allclose(sum(w), 1.0, rtol=1e-5)


def test_aver_with_alpha_one_and_no_features_is_plain_ensemble_kd():
    mdl, frozen, cfg, tx, state, batch = setup(10, weighting="aver")  # alpha 1, the default
    assert cfg.alpha == 1.0
    _, metrics = run(mdl, cfg, tx, state, frozen, batch)
    t_model, t_vars, _ = teacher_variables(10)
    variables = {"params": state.params["student"], "batch_stats": state.batch_stats}
    s_logits, _, _ = jax.jit(
        lambda v, x: models.apply_with_features(mdl.student, v, x, train=True, layers=())
    )(variables, batch["image"])
    teacher = jax.jit(t_model.apply)  # compiled once: op by op, three networks take seconds
    per_teacher = [
        jnp.mean(losses.kd_loss(s_logits, teacher(v, batch["image"]), cfg.temperature))
        for v in t_vars
    ]
    np.testing.assert_allclose(metrics["loss"], np.mean(per_teacher), rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weighting": "agre", "gammas": (("layer2", 0.05), ("layer3", 0.1), ("layer4", 0.25))},
        {
            "weighting": "aver",
            "alpha": 0.5,
            "feature_loss": "attention",
            "gammas": (("layer3", 1.0),),
            "feature_dropout": 0.3,
        },
        {"weighting": "aver", "feature_loss": "crd", "gammas": (("pooled", 0.5),)},
    ],
)
def test_loss_decreases_on_a_fixed_batch(kwargs):
    mdl, frozen, cfg, tx, state, batch = setup(10, lr=0.005, **kwargs)
    step = distill.compile_step(mdl, cfg, tx, pmap=False)
    history = []
    for i in range(6):
        state, metrics = step(state, frozen, batch, jax.random.key(i))
        history.append(float(metrics["loss"]))
    assert history[-1] < history[0], history
    assert all(np.isfinite(history))


def test_separate_biased_model_and_every_teacher_map():
    t_model, t_vars, _ = teacher_variables(2)
    biased = tiny(2, 4)
    ens = distill.Ensemble(teachers=(t_model,), group_sizes=(M,), biased=biased)
    frozen = {
        "teachers": (distill.stack_variables(t_vars),),
        "biased": models.init(biased, jax.random.key(5), SIZE),
    }
    _, _, _, tx, _, batch = setup(2)
    # Every teacher map gives the same forwards (the step's only use of the map), up to
    # float32 rounding of batched against unrolled convolutions (relative to each output's
    # largest magnitude: logits reach ~60 here).
    layers = ("layer2", "pooled")
    outputs = {
        teacher_map: jax.jit(
            functools.partial(
                distill.ensemble_forward,
                ens,
                layers=layers,
                teacher_map=teacher_map,
                biased_layers=layers,
            )
        )(frozen, batch["image"])
        for teacher_map in distill.TEACHER_MAPS
    }
    for other in ("lax_map", "vmap"):
        want, got = jax.tree.leaves(outputs["unroll"]), jax.tree.leaves(outputs[other])
        for a, b in zip(want, got, strict=True):
            scale = float(jnp.max(jnp.abs(a)))
            np.testing.assert_allclose(a / scale, b / scale, atol=1e-5)
    t_logits, t_feats, b_logits, b_feats = outputs["unroll"]
    chex.assert_shape(t_logits, (M, B, 2))
    chex.assert_shape(b_feats["pooled"], (B, models.feature_channels(biased)["pooled"]))
    # Per-layer feature weights compare with the separate biased model's own features. Here
    # it is a copy of teacher 1 (as the ERM network under a DFR teacher), so that teacher's
    # feature gradients equal the biased model's (cosine 1) at every layer and sample: its
    # feature weight is 0, while the others share the rest.
    ens = distill.Ensemble(teachers=(t_model,), group_sizes=(M,), biased=tiny(2, 8))
    frozen["biased"] = t_vars[1]
    gammas = (("layer2", 0.1), ("pooled", 0.5))
    cfg = distill.DistillConfig(feature_weighting="agre", gammas=gammas)
    mdl = distill.create_models(tiny(2, 4), ens, cfg)
    state = distill.create_train_state(mdl, tx, jax.random.key(0), SIZE)
    _, metrics = run(mdl, cfg, tx, state, frozen, batch)
    assert np.isfinite(float(metrics["loss"]))
    for name, _ in gammas:
        weights = [float(metrics[f"feat_weight/{t}/{name}"]) for t in range(M)]
        np.testing.assert_allclose(sum(weights), 1.0, atol=1e-5)
        assert weights[1] < 1e-6 < min(weights[0], weights[2]), (name, weights)


@pytest.mark.parametrize(
    "kwargs",
    [
        {
            "weighting": "agre",
            "grad_scope": "full",
            "gammas": (("layer2", 0.1), ("pooled", 0.5)),
            "feature_weighting": "agre",
        },
        {"weighting": "agre_batch", "grad_scope": "full"},
    ],
)
def test_pmap_matches_single_device(kwargs):
    n = jax.local_device_count()
    assert n == 4, "tests/conftest.py sets 4 fake CPU devices"
    mdl, frozen, cfg, tx, state, batch = setup(10, **kwargs)
    ref_state, ref_metrics = run(mdl, cfg, tx, state, frozen, batch, steps=2)
    replicate = flax.jax_utils.replicate
    p_step = distill.compile_step(mdl, cfg, tx, pmap=True)
    p_state, p_frozen = replicate(state), replicate(frozen)
    p_batch = jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
    for i in range(2):
        rng = replicate(jax.random.fold_in(jax.random.key(3), i))
        p_state, p_metrics = p_step(p_state, p_frozen, p_batch, rng)
    got = flax.jax_utils.unreplicate(p_state)
    chex.assert_trees_all_close(got.params, ref_state.params, atol=2e-5, rtol=1e-4)
    chex.assert_trees_all_close(got.batch_stats, ref_state.batch_stats, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(p_metrics["loss"][0], ref_metrics["loss"], rtol=1e-4)


# Teacher groups of different feature shapes (feature classes). Three groups: BasicBlock
# width 8 (teachers 0, 1), Bottleneck width 4 (teacher 2: 4x the channels) and BasicBlock
# width 8 again (teacher 3), so the classes are groups (0, 2) and (1,), teachers [0, 1, 3]
# and [2]: not contiguous on the teacher axis.
MIXED_CLASSES = ([0, 1, 3], [2])
MIXED_GAMMAS = {
    "mse": (("layer2", 0.3), ("layer4", 0.5), ("pooled", 0.7)),
    "attention": (("layer2", 100.0), ("layer4", 200.0)),  # attention losses are small
    "crd": (("pooled", 0.5),),
}


def random_variables(model, seed):
    """He-normal kernels, BatchNorm affine and statistics away from their initial values,
    filled in numpy on `init`'s shapes (no initialisation to compile)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        if name in ("scale", "var"):
            return 1.0 + 0.3 * rng.uniform(size=shape)
        return 0.1 * rng.normal(size=shape)  # bias, mean

    abstract = models.abstract_variables(model, SIZE)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(fill(path, leaf), jnp.float32), abstract
    )


@functools.cache
def mixed_teachers():
    """(per-teacher (model, variables) in teacher order, ensemble, frozen pytree); two classes
    of labels, the biased head on teacher 1's backbone."""
    basic, t_vars, head = teacher_variables(2)
    bottleneck = tiny(2, 4, models.Bottleneck)
    b_vars = random_variables(bottleneck, 11)
    ens = distill.Ensemble(
        teachers=(basic, bottleneck, basic), group_sizes=(2, 1, 1), biased_backbone=(0, 1)
    )
    stack = distill.stack_variables
    frozen = {
        "teachers": (stack(t_vars[:2]), stack([b_vars]), stack([t_vars[2]])),
        "biased": head,
    }
    per_teacher = [(basic, t_vars[0]), (basic, t_vars[1]), (bottleneck, b_vars), (basic, t_vars[2])]
    return per_teacher, ens, frozen


def grad_capture() -> optax.GradientTransformation:
    """An 'optimiser' that leaves the parameters and keeps the gradients as its state."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


def _reference_forwards(student, student_variables, images, layers, tau):
    """Plain forwards of the mixed ensemble, each teacher on its own: (student logits and
    features (training mode), teacher logits [M, B, C], per-teacher features, per-sample
    AGRE weights [B, M] of the two-class closed form)."""
    per_teacher, _, frozen = mixed_teachers()
    s_logits, s_feats, _ = models.apply_with_features(
        student, student_variables, images, train=True, layers=layers
    )
    t_logits, t_feats = [], []
    for model, variables in per_teacher:
        logits, feats = models.apply_with_features(
            model, variables, images, layers=tuple(set(layers) | {"pooled"})
        )
        t_logits.append(logits)
        t_feats.append(feats)
    head = frozen["biased"]
    b_logits = t_feats[1]["pooled"] @ head["kernel"] + head["bias"]
    t_logits = jnp.stack(t_logits)
    g_t, g_b = weighting.kd_grads(jax.lax.stop_gradient(s_logits), t_logits, b_logits, tau)
    w, _ = weighting.agre_weights(g_t, g_b, gram=None, normalize_grads=True, empty_rows="uniform")
    return s_logits, s_feats, t_logits, t_feats, w


def _brute_force_feature_loss(kind, gammas, s_feats, adapters, t_feats, w):
    """sum_k sum_l gamma_l sum_i W_ik D_l(A_k(s_i), target_ik) / B in plain jnp."""

    def attention(x):
        a = jnp.mean(x**2, axis=-1).reshape(x.shape[0], -1)
        return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)  # 0 -> 0

    total = 0.0
    for k, idx in enumerate(MIXED_CLASSES):
        mass = w[:, idx].sum(axis=1)
        for name, gamma in gammas:
            s = s_feats[name]
            if kind == "mse":  # class k's 1x1 conv / Dense, by hand
                kernel = adapters[f"class_{k}"][name]["kernel"]
                s = s @ (kernel if name == "pooled" else kernel[0, 0])
            per_sample = (-1,) + (1,) * (s.ndim - 1)
            target = sum(w[:, t].reshape(per_sample) * t_feats[t][name] for t in idx)
            target = target / jnp.where(mass > 0, mass, 1.0).reshape(per_sample)
            if kind == "mse":
                d = jnp.mean((s - target) ** 2, axis=tuple(range(1, s.ndim)))
            else:
                d = jnp.mean((attention(s) - attention(target)) ** 2, axis=-1)
            total = total + gamma * jnp.sum(mass * d) / s.shape[0]
    return total


def _max_scaled_diff(got, want):
    """max over leaves of max|got - want| / max|want|."""
    return max(
        float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )


def mixed_step(kind, tx, **cfg_kwargs):
    per_teacher, ens, frozen = mixed_teachers()
    cfg = distill.DistillConfig(weighting="agre", gammas=MIXED_GAMMAS[kind], **cfg_kwargs)
    mdl = distill.create_models(tiny(2, 4), ens, cfg)
    assert distill.feature_classes(ens, cfg.feature_layers) == ((0, 2), (1,))
    state = distill.create_train_state(mdl, tx, jax.random.key(0), SIZE)
    _, _, _, _, _, batch = setup(2)
    step = distill.compile_step(mdl, cfg, tx, pmap=False)
    new_state, metrics = step(jax.tree.map(jnp.copy, state), frozen, batch, jax.random.key(3))
    return mdl, cfg, state, batch, new_state, metrics


def test_mixed_feature_shapes_match_brute_force():
    """A ResNet-50-like (Bottleneck) and ResNet-18-like (BasicBlock) mixed ensemble, 'mse' and
    'attention': the step's losses and gradients (student and adapters) equal a plain-jnp
    computation from each teacher's own forward, with per-sample AGRE weights (two classes:
    closed form) that leave one feature class without weight on some samples (measured:
    losses within 8e-8 relative, gradients within 1.4e-6 of each leaf's largest magnitude)."""
    tx = grad_capture()
    kinds = ("mse", "attention")
    runs = {kind: mixed_step(kind, tx, feature_loss=kind) for kind in kinds}
    mdl, cfg, state, batch, _, _ = runs["mse"]
    adapters = state.params["adapters"]
    assert set(adapters) == {"class_0", "class_1"}
    assert adapters["class_1"]["layer2"]["kernel"].shape == (1, 1, 8, 32)  # Bottleneck 4x
    assert runs["attention"][2].params["adapters"] == {}
    tau = cfg.temperature

    def total(student_params, adapter_params, kind):
        variables = {"params": student_params, "batch_stats": state.batch_stats}
        layers = tuple(n for n in models.LAYERS if n in dict(MIXED_GAMMAS[kind]))
        s_logits, s_feats, t_logits, t_feats, w = _reference_forwards(
            mdl.student, variables, batch["image"], layers, tau
        )
        log_ps = jax.nn.log_softmax(s_logits / tau)
        log_pt = jax.nn.log_softmax(t_logits / tau)
        kd = tau**2 * jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)  # [M, B]
        l_kd = jnp.sum(w.T * kd) / s_logits.shape[0]
        l_feat = _brute_force_feature_loss(
            kind, MIXED_GAMMAS[kind], s_feats, adapter_params, t_feats, w
        )
        return l_kd + l_feat, (l_kd, l_feat, w)

    @jax.jit
    def reference(student_params, adapter_params):
        grad_fn = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)
        return {kind: grad_fn(student_params, adapter_params, kind) for kind in kinds}

    want = reference(state.params["student"], adapters)
    worst = {}
    for kind in kinds:
        (want_loss, (l_kd, l_feat, w)), want_grads = want[kind]
        got, metrics = runs[kind][4].opt_state, runs[kind][5]  # the gradients, the metrics
        # The weights vary per sample and leave class 1 empty on some rows (W_i1 = 0).
        mass = np.asarray(w[:, MIXED_CLASSES[1]].sum(axis=1))
        assert (mass == 0).any() and (0 < mass).any() and (mass < 1).any(), mass
        assert float(l_feat) > 0.05 * float(want_loss), kind
        for name, value in [("feat_loss", l_feat), ("kd_loss", l_kd), ("loss", want_loss)]:
            np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=(kind, name))
        worst[kind] = _max_scaled_diff(got["student"], want_grads[0])
        if kind == "mse":
            worst["adapters"] = _max_scaled_diff(got["adapters"], want_grads[1])
    assert max(worst.values()) < 1e-5, worst


def test_mixed_feature_shapes_crd_has_a_head_stack_per_class():
    """CRD over the mixed ensemble: one teacher head stack per feature class (pooled widths 64
    and 128), embeddings combined with each teacher's own per-sample weight (measured: 6e-8
    relative to a plain computation)."""
    mdl, cfg, state, batch, _, metrics = mixed_step(
        "crd", optim.create_optimizer("sgd", 0.05, 100), feature_loss="crd", crd_dim=16
    )
    heads = state.params["adapters"]
    assert {k: v.shape for k, v in heads.items() if k != "student"} == {
        "teacher_kernel_0": (3, 64, 16),
        "teacher_bias_0": (3, 16),
        "teacher_kernel_1": (1, 128, 16),
        "teacher_bias_1": (1, 16),
    }

    @jax.jit
    def reference(state):
        variables = {"params": state.params["student"], "batch_stats": state.batch_stats}
        _, s_feats, _, t_feats, w = _reference_forwards(
            mdl.student, variables, batch["image"], ("pooled",), cfg.temperature
        )
        student = heads["student"]
        s_emb = s_feats["pooled"] @ student["kernel"] + student["bias"]
        target = 0.0
        for k, idx in enumerate(MIXED_CLASSES):
            for j, t in enumerate(idx):  # teacher t is row j of its class's stack
                emb = t_feats[t]["pooled"] @ heads[f"teacher_kernel_{k}"][j]
                emb = emb + heads[f"teacher_bias_{k}"][j]
                target = target + w[:, t, None] * emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
        crd = losses.crd_loss(s_emb, target, cfg.crd_temperature, sample_weight=w.sum(axis=1))
        return crd, w

    want, w = reference(state)
    assert np.ptp(np.asarray(w), axis=0).max() > 0.1  # per-sample weights: the order matters
    np.testing.assert_allclose(metrics["feat/pooled"], want, rtol=1e-5)


def test_mixed_feature_shapes_refusals():
    per_teacher, ens, frozen = mixed_teachers()
    cfg = distill.DistillConfig(feature_weighting="agre", gammas=(("layer3", 0.1),))
    with pytest.raises(ValueError, match="feature_weighting 'agre' needs teachers of equal"):
        distill.create_models(tiny(2, 4), ens, cfg)
    images = jnp.zeros((B, SIZE, SIZE, 3))
    forward = functools.partial(distill.ensemble_forward, ens, layers=("layer3",))
    with pytest.raises(ValueError, match="by_class=True"):
        jax.eval_shape(forward, frozen, images)
    _, feats, _, _ = jax.eval_shape(functools.partial(forward, by_class=True), frozen, images)
    assert [f["layer3"].shape for f in feats] == [(3, B, 2, 2, 32), (1, B, 2, 2, 64)]
    # Layers where the groups agree (here none: every layer's width differs) would be one
    # class; without feature layers the ensemble is one class.
    assert distill.feature_classes(ens, ()) == ((0, 1, 2),)


def test_class_feature_loss_against_per_sample_sums():
    """losses.class_feature_loss on random arrays against per-sample sums in numpy: per-class
    renormalised targets and W weights (rows of zero class weight included), and with one
    class `feature_loss` on the plain weighted average."""
    rng = np.random.default_rng(0)
    b, shapes, sizes = 6, [(4, 4, 8), (2, 2, 16)], [3, 2]
    s = [{"layer2": rng.normal(size=(b, *sh)).astype(np.float32)} for sh in shapes]
    t = [
        {"layer2": rng.normal(size=(m, b, *sh)).astype(np.float32)}
        for m, sh in zip(sizes, shapes, strict=True)
    ]
    w = rng.uniform(size=(b, 5))
    w[1, :3] = 0  # class 0 empty on sample 1
    w[2, 3:] = 0  # class 1 empty on sample 2
    w[3] = 0  # a dropped row
    w = (w / np.maximum(w.sum(axis=1, keepdims=True), 1e-30)).astype(np.float32)
    ws = [w[:, :3], w[:, 3:]]

    def attention(x):
        a = np.mean(x.astype(np.float64) ** 2, axis=-1).ravel()
        return a / np.linalg.norm(a)

    gammas = {"layer2": 0.7}
    for kind in ("mse", "attention"):
        want = 0.0
        for i in range(b):
            for k in range(2):
                mass = ws[k][i].sum(dtype=np.float64)
                if mass == 0:
                    continue
                target = np.einsum("m,m...->...", ws[k][i] / mass, t[k]["layer2"][:, i])
                x = s[k]["layer2"][i]
                if kind == "mse":
                    d = np.mean((x - target) ** 2)
                else:
                    d = np.mean((attention(x) - attention(target)) ** 2)
                want += 0.7 * mass * d / b
        got, per_layer = losses.class_feature_loss(s, t, ws, gammas, kind=kind)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=kind)
        np.testing.assert_allclose(0.7 * per_layer["layer2"], got, rtol=1e-6)
        # One class, rows summing to 1 or (a dropped row) 0: feature_loss of the average.
        w0 = ws[0] / np.maximum(ws[0].sum(axis=1, keepdims=True), 1e-30)
        one, _ = losses.class_feature_loss(s[:1], t[:1], [w0], gammas, kind=kind)
        avg = {"layer2": np.einsum("bm,mb...->b...", w0, t[0]["layer2"])}
        plain, _ = losses.feature_loss(s[0], avg, gammas, kind=kind, sample_weight=w0.sum(axis=1))
        np.testing.assert_allclose(one, plain, rtol=1e-6, err_msg=kind)
        grad = jax.grad(
            lambda x, kind=kind: losses.class_feature_loss(x, t, ws, gammas, kind=kind)[0]
        )(s)
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grad))
        # A class's empty rows get no gradient.
        assert not np.asarray(grad[0]["layer2"][1]).any() and np.asarray(grad[1]["layer2"][1]).any()


def test_equal_feature_shapes_across_groups_are_one_class():
    """ResNet-18 and ResNet-34 teachers (equal feature shapes): one feature class, the same
    adapters and parameters as a one-group ensemble; the same three teachers as groups of 2
    and 1 give the one-group ensemble's features, bit for bit, and so its step."""
    r18, r34 = (models.create(a, 10, width=8, small_input=True) for a in ("resnet18", "resnet34"))
    student = tiny(10, 4)
    tx = optim.create_optimizer("sgd", 0.05, 100)
    for kind, gammas in MIXED_GAMMAS.items():
        cfg = distill.DistillConfig(feature_loss=kind, gammas=gammas, crd_dim=16)
        two = distill.Ensemble(teachers=(r18, r34), group_sizes=(2, 1), biased_backbone=(0, 0))
        one = distill.Ensemble(teachers=(r18,), group_sizes=(3,), biased_backbone=(0, 0))
        assert distill.feature_classes(two, cfg.feature_layers) == ((0, 1),)
        mdl_two, mdl_one = (distill.create_models(student, e, cfg) for e in (two, one))
        assert mdl_two.adapters == mdl_one.adapters, kind
        params = [
            distill.create_train_state(m, tx, jax.random.key(0), SIZE).params["adapters"]
            for m in (mdl_two, mdl_one)
        ]
        chex.assert_trees_all_equal(*params)
    # The step's input: the same three teachers as one group of 3 and as groups of 2 and 1.
    mdl, frozen, cfg, tx, state, batch = setup(2, weighting="agre", gammas=MIXED_GAMMAS["mse"])
    t_model, t_vars, _ = teacher_variables(2)
    ens = distill.Ensemble(teachers=(t_model, t_model), group_sizes=(2, 1), biased_backbone=(0, 1))
    assert distill.create_models(mdl.student, ens, cfg).adapters == mdl.adapters
    stack = distill.stack_variables
    frozen_two = {"teachers": (stack(t_vars[:2]), stack(t_vars[2:])), "biased": frozen["biased"]}
    layers = cfg.feature_layers

    @jax.jit
    def forwards(frozen, frozen_two):
        want = distill.ensemble_forward(mdl.ensemble, frozen, batch["image"], layers)
        got = distill.ensemble_forward(ens, frozen_two, batch["image"], layers, by_class=True)
        return want, got

    want, got = forwards(frozen, frozen_two)
    assert len(got[1]) == 1  # one class
    chex.assert_trees_all_equal(want, (got[0], got[1][0], got[2], got[3]))
