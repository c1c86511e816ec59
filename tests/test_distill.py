"""The distillation step: configuration checks, properties, pmap vs jit. (Its pure parts run
with and without jit in tests/test_weighting.py.)"""

import functools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agre_jax import distill, losses, models, optim, weighting

SIZE, B, M = 8, 8, 3


def tiny(num_classes, width):
    return models.ResNet(
        stage_sizes=(1, 1, 1, 1),
        block_cls=models.BasicBlock,
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
