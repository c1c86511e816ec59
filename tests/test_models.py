"""Tests of agre_jax.models: shapes, dtypes, the parameter tree, features and adapters.

Most checks trace with `jax.eval_shape` (nothing compiled). Where numbers are needed, the
variables are random numbers of the right shapes: compiling `models.init` itself takes ~11 s
per model on a 2-core CPU (its random initialisers), `apply` of a small model ~1 s. Numerical
equivalence with torchvision is in test_convert.py.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agre_jax import models

BATCH = 2


def _image_spec(size: int, batch: int = BATCH) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)


def _variable_shapes(model: models.ResNet, size: int = 32) -> dict:
    init = functools.partial(model.init, train=False)
    return jax.eval_shape(init, jax.random.key(0), _image_spec(size, batch=1))


def _random_variables(model: models.ResNet, seed: int = 0) -> dict:
    """Variables of `model` with random values: He-scaled kernels, BN stats near (0, 1)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, size=leaf.shape).astype(np.float32)
        return (0.1 * rng.normal(size=leaf.shape)).astype(np.float32)

    return dict(jax.tree_util.tree_map_with_path(fill, _variable_shapes(model)))


def _features_spec(model, size, layers=models.LAYERS, train=False):
    apply_fn = functools.partial(models.apply_with_features, model, train=train, layers=layers)
    return jax.eval_shape(apply_fn, _variable_shapes(model), _image_spec(size))


# side: 64 px input; standard stem /4, then /2 per stage after layer1.
EXPECTED = {
    "resnet18": {"layer1": (16, 64), "layer2": (8, 128), "layer3": (4, 256), "layer4": (2, 512)},
    "resnet34": {"layer1": (16, 64), "layer2": (8, 128), "layer3": (4, 256), "layer4": (2, 512)},
    "resnet50": {
        "layer1": (16, 256),
        "layer2": (8, 512),
        "layer3": (4, 1024),
        "layer4": (2, 2048),
    },
}


@pytest.mark.parametrize("arch", models.ARCHS)
def test_captured_features_shapes_and_dtypes(arch):
    model = models.create(arch, num_classes=3)
    logits, features = _features_spec(model, 64)
    chex.assert_shape(logits, (BATCH, 3))
    chex.assert_type(logits, jnp.float32)
    assert set(features) == set(models.LAYERS)
    for name, (side, channels) in EXPECTED[arch].items():
        chex.assert_shape(features[name], (BATCH, side, side, channels))
        assert models.feature_channels(model)[name] == channels
        assert models.feature_strides(model)[name] == 64 // side
    chex.assert_shape(features["pooled"], (BATCH, EXPECTED[arch]["layer4"][1]))
    chex.assert_type(list(features.values()), jnp.float32)


# Leaves of torchvision's state_dict minus its num_batches_tracked (one per BatchNorm).
TORCHVISION_LEAVES = {"resnet18": 122 - 20, "resnet34": 218 - 36, "resnet50": 320 - 53}


@pytest.mark.parametrize("arch", models.ARCHS)
def test_parameter_tree_mirrors_torchvision(arch):
    variables = _variable_shapes(models.create(arch, num_classes=7))
    params = variables["params"]
    assert set(variables) == {"params", "batch_stats"}
    assert set(params) == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}
    assert len(jax.tree.leaves(variables)) == TORCHVISION_LEAVES[arch]
    chex.assert_shape(params["conv1"]["kernel"], (7, 7, 3, 64))
    chex.assert_shape(
        params["fc"]["kernel"], (models.feature_channels(models.create(arch, 7))["pooled"], 7)
    )
    blocks = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}[arch]
    for k, n in enumerate(blocks):
        assert set(params[f"layer{k + 1}"]) == {str(i) for i in range(n)}
    # Projection shortcuts where torchvision has them: every stage's first block, except
    # layer1 of the BasicBlock nets (64 -> 64 channels, stride 1).
    for k in range(1, 5):
        first = params[f"layer{k}"]["0"]
        has_projection = arch == "resnet50" or k > 1
        assert ("downsample_conv" in first) == has_projection
        assert ("downsample_bn" in first) == has_projection
        assert "downsample_conv" not in params[f"layer{k}"]["1"]
    bn = variables["batch_stats"]["layer1"]["0"]["bn1"]
    assert set(bn) == {"mean", "var"}
    assert set(params["layer1"]["0"]["bn1"]) == {"scale", "bias"}
    conv_names = {"conv1", "conv2", "conv3"} if arch == "resnet50" else {"conv1", "conv2"}
    assert conv_names <= set(params["layer2"]["1"])


def test_width_and_small_input_stem():
    model = models.create("resnet18", num_classes=10, width=16, small_input=True)
    shapes = _variable_shapes(model)
    chex.assert_shape(shapes["params"]["conv1"]["kernel"], (3, 3, 3, 16))  # 3x3, stride 1
    logits, features = _features_spec(model, 32)
    chex.assert_shape(logits, (BATCH, 10))
    chex.assert_shape(
        [features[f"layer{k}"] for k in range(1, 5)] + [features["pooled"]],
        [(BATCH, 32, 32, 16), (BATCH, 16, 16, 32), (BATCH, 8, 8, 64), (BATCH, 4, 4, 128)]
        + [(BATCH, 128)],
    )
    assert models.feature_strides(model) == {"layer1": 1, "layer2": 2, "layer3": 4, "layer4": 8}
    assert models.feature_channels(model) == {
        "layer1": 16,
        "layer2": 32,
        "layer3": 64,
        "layer4": 128,
        "pooled": 128,
    }

    wide = models.create("resnet50", num_classes=2, width=16)  # standard stem, narrow
    chex.assert_shape(_variable_shapes(wide)["params"]["conv1"]["kernel"], (7, 7, 3, 16))
    _, features = _features_spec(wide, 64)
    chex.assert_shape(features["layer1"], (BATCH, 16, 16, 64))
    chex.assert_shape(features["layer4"], (BATCH, 2, 2, 512))


def test_bfloat16_compute_keeps_float32_params_and_logits():
    kwargs = dict(num_classes=3, width=8, small_input=True)
    model = models.create("resnet18", dtype=jnp.bfloat16, **kwargs)
    shapes = _variable_shapes(model)
    chex.assert_type(jax.tree.leaves(shapes), jnp.float32)

    variables = _random_variables(model)
    images = np.random.default_rng(1).normal(size=(BATCH, 32, 32, 3)).astype(np.float32)
    logits, features = jax.jit(functools.partial(models.apply_with_features, model))(
        variables, images
    )
    chex.assert_type(logits, jnp.float32)
    chex.assert_type([features[f"layer{k}"] for k in range(1, 5)], jnp.bfloat16)
    chex.assert_tree_all_finite(logits)

    reference = models.create("resnet18", **kwargs)  # same variables, float32 compute
    ref_logits = models.apply_with_features(reference, variables, images, layers=())[0]
    np.testing.assert_allclose(logits, ref_logits, rtol=0.1, atol=0.1)


def test_train_mode_returns_new_batch_stats():
    model = models.create("resnet18", num_classes=3, width=8, small_input=True)
    variables = _random_variables(model)
    images = np.random.default_rng(2).normal(size=(4, 32, 32, 3)).astype(np.float32)
    apply_fn = functools.partial(models.apply_with_features, model, train=True)
    logits, features, batch_stats = jax.jit(apply_fn)(variables, images)
    chex.assert_shape(logits, (4, 3))
    assert set(features) == set(models.LAYERS)
    chex.assert_trees_all_equal_shapes_and_dtypes(batch_stats, variables["batch_stats"])
    for new, old in zip(
        jax.tree.leaves(batch_stats), jax.tree.leaves(variables["batch_stats"]), strict=True
    ):
        assert not np.allclose(new, old)

    # The stem's BatchNorm: running = 0.9 running + 0.1 batch (torch's momentum 0.1), with
    # the unbiased batch variance in the running variance, as torch.
    kernel = variables["params"]["conv1"]["kernel"]
    dimensions = ("NHWC", "HWIO", "NHWC")
    conv1 = jax.lax.conv_general_dilated(
        images, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dimensions
    )
    old = variables["batch_stats"]["bn1"]
    new = batch_stats["bn1"]
    np.testing.assert_allclose(
        new["mean"], 0.9 * old["mean"] + 0.1 * conv1.mean((0, 1, 2)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        new["var"], 0.9 * old["var"] + 0.1 * conv1.var((0, 1, 2), ddof=1), rtol=1e-5, atol=1e-6
    )

    out = models.apply_with_features(model, variables, images, layers=())
    assert len(out) == 2 and out[1] == {}  # eval mode: no batch_stats


def test_layer_subsets_and_unknown_layers():
    model = models.create("resnet18", num_classes=2, width=8, small_input=True)
    _, features = _features_spec(model, 32, layers=("layer2", "pooled"))
    assert set(features) == {"layer2", "pooled"}
    _, features, _ = _features_spec(model, 32, layers=(), train=True)
    assert features == {}
    variables = _variable_shapes(model)
    with pytest.raises(ValueError, match="layer5"):
        models.apply_with_features(model, variables, jnp.zeros((1, 32, 32, 3)), layers=["layer5"])
    with pytest.raises(ValueError, match="fc"):
        models.create_adapters(model, model, ["layer1", "fc"])
    with pytest.raises(ValueError, match="unknown arch"):
        models.create("resnet101", 2)
    with pytest.raises(ValueError, match="num_classes"):
        models.create("resnet18", 0)


def test_feature_adapters():
    student = models.create("resnet18", num_classes=2, width=16, small_input=True)
    teacher = models.create("resnet50", num_classes=2)
    layers = ("layer1", "layer3", "pooled")
    adapters = models.create_adapters(student, teacher, layers)
    _, student_features = _features_spec(student, 32, layers=layers)
    features = {k: jnp.zeros(v.shape, v.dtype) for k, v in student_features.items()}

    variables = jax.eval_shape(adapters.init, jax.random.key(0), features)
    params = variables["params"]
    assert set(params) == set(layers)
    assert all(set(p) == {"kernel"} for p in params.values())  # no biases
    chex.assert_shape(params["layer1"]["kernel"], (1, 1, 16, 256))  # 1x1 conv
    chex.assert_shape(params["layer3"]["kernel"], (1, 1, 64, 1024))
    chex.assert_shape(params["pooled"]["kernel"], (128, 2048))  # Dense
    out = jax.eval_shape(adapters.apply, variables, features)
    chex.assert_shape(
        [out["layer1"], out["layer3"], out["pooled"]],
        [(BATCH, 32, 32, 256), (BATCH, 8, 8, 1024), (BATCH, 2048)],
    )

    # Equal widths: identity, no parameters at all.
    same = models.create_adapters(student, models.create("resnet34", 2, width=16), layers)
    features = {
        k: jnp.asarray(np.random.default_rng(0).normal(size=v.shape)) for k, v in features.items()
    }
    variables = same.init(jax.random.key(0), features)
    assert jax.tree.leaves(variables) == []
    out = same.apply(variables, features)
    chex.assert_trees_all_equal(out, features)


# ------------------------------------------------------------------------------ merge_params


def _tiny(num_classes: int = 3) -> models.ResNet:
    return models.create("resnet18", num_classes=num_classes, width=4, small_input=True)


def test_abstract_variables():
    model = _tiny()
    shapes = models.abstract_variables(model, 32)
    assert set(shapes) == {"params", "batch_stats"}
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, _variable_shapes(model))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))


def test_merge_params_grafts_every_leaf():
    model = _tiny()
    init = _random_variables(model, seed=0)
    loaded = jax.tree.map(lambda x: x.astype(np.float64), _random_variables(model, seed=1))
    merged = models.merge_params(init, loaded, source="ckpt.pt")
    chex.assert_trees_all_equal_structs(merged, init)
    assert type(merged) is dict and type(merged["params"]["layer1"]["0"]) is dict
    chex.assert_type(jax.tree.leaves(merged), np.float32)  # cast to the model's dtype
    chex.assert_trees_all_equal(merged, jax.tree.map(lambda x: x.astype(np.float32), loaded))
    # jax arrays stay jax arrays (no host round trip).
    on_device = models.merge_params(init, jax.tree.map(jnp.asarray, init), source="x")
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(on_device))


def test_merge_params_fresh_head_keeps_init():
    init = _random_variables(_tiny(3), seed=0)
    other_head = _random_variables(_tiny(5), seed=1)  # a 5-class head: shapes differ
    merged = models.merge_params(init, other_head, source="ckpt.pt", fresh=("fc",))
    chex.assert_trees_all_equal(merged["params"]["fc"], init["params"]["fc"])
    chex.assert_trees_all_equal(merged["params"]["layer2"], other_head["params"]["layer2"])
    chex.assert_trees_all_equal(merged["batch_stats"], other_head["batch_stats"])
    # A backbone-only checkpoint (head dropped): nothing missing.
    backbone = {"params": {k: v for k, v in other_head["params"].items() if k != "fc"}}
    backbone["batch_stats"] = other_head["batch_stats"]
    merged = models.merge_params(init, backbone, source="ckpt.pt", fresh=("fc",))
    chex.assert_trees_all_equal(merged["params"]["fc"], init["params"]["fc"])
    # Fresh BatchNorms take their statistics from init too.
    merged = models.merge_params(init, other_head, source="ckpt.pt", fresh=("fc", "bn1"))
    chex.assert_trees_all_equal(merged["batch_stats"]["bn1"], init["batch_stats"]["bn1"])
    with pytest.raises(ValueError, match="head"):
        models.merge_params(init, other_head, source="ckpt.pt", fresh=("head",))


def test_merge_params_names_every_problem():
    model = _tiny()
    init = _random_variables(model, seed=0)
    loaded = _random_variables(model, seed=1)
    del loaded["params"]["layer1"]["0"]["conv1"]["kernel"]
    del loaded["batch_stats"]["bn1"]  # mean and var: 3 missing in all
    loaded["params"]["extra"] = {f"w{i}": np.zeros(2, np.float32) for i in range(7)}
    loaded["params"]["fc"]["kernel"] = np.zeros((32, 5), np.float32)
    with pytest.raises(ValueError) as error:
        models.merge_params(init, loaded, source="/ckpts/teacher0.pt")
    message = str(error.value)
    assert message.startswith("the weights in /ckpts/teacher0.pt do not fit the model: ")
    assert "3 keys missing from the checkpoint (" in message
    for key in ("params/layer1/0/conv1/kernel", "batch_stats/bn1/mean", "batch_stats/bn1/var"):
        assert key in message
    # Cut to the first 5 with the total count.
    assert "7 unexpected keys (params/extra/w0, " in message and "and 2 more)" in message
    assert "params/extra/w5" not in message
    assert "1 shape mismatches (params/fc/kernel [32, 5] in the checkpoint, [32, 3]" in message

    # One kind at a time: only that kind is named.
    only = _random_variables(model, seed=1)
    only["params"]["fc"]["bias"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"model: 1 shape mismatches \(params/fc/bias \[4\]"):
        models.merge_params(init, only, source="x")


def test_merge_params_does_not_mutate_its_inputs():
    model = _tiny()
    init = _random_variables(model, seed=0)
    loaded = _random_variables(model, seed=1)
    loaded["params"]["fc"]["kernel"] = np.zeros((32, 7), np.float32)
    before_init, before_loaded = jax.tree.map(np.copy, (init, loaded))
    merged = models.merge_params(init, loaded, source="x", fresh=("fc",))
    merged["params"]["conv1"]["kernel"] = None
    merged["params"]["fc"]["kernel"][...] = 0  # a copy of init's
    merged["params"]["layer1"]["0"]["bn1"]["scale"][...] = 0  # a copy of loaded's
    chex.assert_trees_all_equal((init, loaded), (before_init, before_loaded))
    assert set(loaded["params"]) == set(before_loaded["params"])


def test_merge_params_checks_against_shapes():
    model = _tiny()
    shapes = models.abstract_variables(model, 32)
    loaded = jax.tree.map(lambda x: x.astype(np.float64), _random_variables(model, seed=1))
    merged = models.merge_params(shapes, loaded, source="x")
    chex.assert_type(jax.tree.leaves(merged), np.float32)
    chex.assert_trees_all_close(merged, loaded)
    del loaded["params"]["fc"]
    with pytest.raises(ValueError, match="2 keys missing from the checkpoint"):
        models.merge_params(shapes, loaded, source="x")
    with pytest.raises(ValueError, match="need values, not shapes"):
        models.merge_params(shapes, loaded, source="x", fresh=("fc",))


def test_init_compiles_once_and_equals_flax_init():
    """models.init (compiled without XLA optimisation, cached per model and size) gives
    flax's `model.init` values up to float rounding, and a second key reuses the compile."""
    model = models.create("resnet18", 2, width=4, small_input=True)
    models._compiled_init.cache_clear()
    ours = models.init(model, jax.random.key(3), 16)
    again = models.init(model, jax.random.key(4), 16)
    assert models._compiled_init.cache_info().misses == 1
    assert models._compiled_init.cache_info().hits == 1
    dummy = jnp.zeros((1, 16, 16, 3), jnp.float32)
    flax_init = jax.jit(functools.partial(model.init, train=False))
    chex.assert_trees_all_close(ours, dict(flax_init(jax.random.key(3), dummy)), atol=1e-6)
    chex.assert_trees_all_close(again, dict(flax_init(jax.random.key(4), dummy)), atol=1e-6)
    # Under a trace it is plain flax init (no compile of its own).
    shapes = jax.eval_shape(lambda: models.init(model, jax.random.key(0), 16))
    assert jax.tree.structure(shapes) == jax.tree.structure(ours)


@pytest.mark.parametrize("block", [models.BasicBlock, models.Bottleneck])
def test_zero_init_residual_zeroes_only_the_last_scale_of_each_branch(block):
    """zero_init_residual changes the initial values of bn2 (BasicBlock) / bn3 (Bottleneck)
    scales to zero and nothing else (same tree, same other values), so that a block without
    downsampling maps its input to itself."""
    kwargs = dict(stage_sizes=(2, 1, 1, 1), block_cls=block, num_classes=3, width=2)
    plain = models.ResNet(**kwargs, small_input=True)
    zero = plain.clone(zero_init_residual=True)
    a, b = models.init(plain, jax.random.key(0), 8), models.init(zero, jax.random.key(0), 8)
    last = "bn3" if block is models.Bottleneck else "bn2"
    expected = jax.tree.map_with_path(
        lambda path, x: (
            jnp.zeros_like(x)
            if any(getattr(k, "key", None) == last for k in path) and path[-1].key == "scale"
            else x
        ),
        a,
    )
    chex.assert_trees_all_equal(b, expected)
    assert float(jnp.abs(a["params"]["layer1"]["1"][last]["scale"]).sum()) > 0
    # Block layer1/1 (no downsampling) is the identity on its (non-negative) input.
    _, state = zero.apply(
        b, jnp.ones((2, 8, 8, 3)), capture_intermediates=True, mutable=["intermediates"]
    )
    inner = state["intermediates"]["layer1"]
    assert "0" in inner and "1" in inner
    chex.assert_trees_all_close(inner["1"]["__call__"][0], inner["0"]["__call__"][0])
    other = jax.tree.map(lambda x: x + 0.5, b)  # with non-zero scales it is not
    _, state = zero.apply(
        other, jnp.ones((2, 8, 8, 3)), capture_intermediates=True, mutable=["intermediates"]
    )
    inner = state["intermediates"]["layer1"]
    assert not np.allclose(inner["1"]["__call__"][0], inner["0"]["__call__"][0])
