"""Tests of models.TorchBatchNorm: torch's running statistics (unbiased running variance).

Against torch.nn.BatchNorm2d alone, under pmap against one device on the whole batch, and in
a whole ResNet-18 against torchvision's in training mode. Run with `pytest -s` to see the
measured differences.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from test_models import _random_variables  # He-scaled kernels, BN stats near (0, 1)

import convert
from agre_jax import models

C = 5


def _bn(**kwargs) -> models.TorchBatchNorm:
    return models.TorchBatchNorm(momentum=0.9, epsilon=1e-5, **kwargs)


def _variables(seed: int = 0) -> dict:
    """Non-trivial scale, bias and running statistics for C channels."""
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "scale": rng.uniform(0.5, 1.5, C).astype(np.float32),
            "bias": rng.normal(size=C).astype(np.float32),
        },
        "batch_stats": {
            "mean": rng.normal(size=C).astype(np.float32),
            "var": rng.uniform(0.5, 2.0, C).astype(np.float32),
        },
    }


def _torch_bn(variables: dict) -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(C, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(variables["params"]["scale"]))
        bn.bias.copy_(torch.from_numpy(variables["params"]["bias"]))
        bn.running_mean.copy_(torch.from_numpy(variables["batch_stats"]["mean"]))
        bn.running_var.copy_(torch.from_numpy(variables["batch_stats"]["var"]))
    return bn


def _images(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """NHWC values with a non-zero mean and channel-dependent spread."""
    rng = np.random.default_rng(seed)
    return (2.0 + rng.normal(size=shape) * np.linspace(0.5, 3.0, shape[-1])).astype(np.float32)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_is_a_flax_batchnorm_with_the_same_variables():
    x = jnp.zeros((2, 3, 3, C))
    ours = jax.eval_shape(_bn(use_running_average=True).init, jax.random.key(0), x)
    flax_ = jax.eval_shape(nn.BatchNorm(use_running_average=True).init, jax.random.key(0), x)
    assert issubclass(models.TorchBatchNorm, nn.BatchNorm)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), ours) == jax.tree.map(
        lambda s: (s.shape, s.dtype), flax_
    )


def test_matches_torch_batchnorm2d():
    """Two training steps (outputs and running statistics), then eval mode, against torch."""
    variables = _variables()
    bn_torch = _torch_bn(variables).train()
    batch_stats = variables["batch_stats"]
    train = jax.jit(functools.partial(_bn().apply, use_running_average=False, mutable=True))
    for step in range(2):
        x = _images((4, 3, 2, C), seed=step)  # n = 24 values per channel
        y, state = train({"params": variables["params"], "batch_stats": batch_stats}, x)
        batch_stats = state["batch_stats"]
        with torch.no_grad():
            ref = bn_torch(_nchw(x)).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(batch_stats["mean"], bn_torch.running_mean, rtol=1e-5)
        np.testing.assert_allclose(batch_stats["var"], bn_torch.running_var, rtol=1e-5)
        # Not flax's biased update: the difference is the n / (n - 1) of 24 values.
        flax_stats = nn.BatchNorm(momentum=0.9).apply(
            variables, x, use_running_average=False, mutable=True
        )[1]["batch_stats"]
        if step == 0:
            biased = flax_stats["var"] - 0.9 * variables["batch_stats"]["var"]
            np.testing.assert_allclose(
                batch_stats["var"] - 0.9 * variables["batch_stats"]["var"],
                biased * 24 / 23,
                rtol=1e-5,
            )

    x = _images((3, 2, 2, C), seed=5)
    y = _bn(use_running_average=True).apply(
        {"params": variables["params"], "batch_stats": batch_stats}, x
    )
    with torch.no_grad():
        ref = bn_torch.eval()(_nchw(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_float32_statistics():
    """dtype=bfloat16: bfloat16 output, float32 statistics of the bfloat16 input, as torch's
    statistics of the same (rounded) values."""
    variables = _variables(1)
    x = jnp.asarray(_images((4, 3, 3, C), seed=2), jnp.bfloat16)
    y, state = _bn(dtype=jnp.bfloat16).apply(
        variables, x, use_running_average=False, mutable=["batch_stats"]
    )
    assert y.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state))
    bn_torch = _torch_bn(variables).train()
    with torch.no_grad():
        ref = bn_torch(_nchw(np.asarray(x, np.float32))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(state["batch_stats"]["var"], bn_torch.running_var, rtol=1e-5)
    np.testing.assert_allclose(state["batch_stats"]["mean"], bn_torch.running_mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2e-2, atol=2e-2)


def test_pmap_uses_the_global_count():
    """Cross-replica statistics: n is the count over all devices (4 x 2 x 3 x 3 = 72, not
    18), the same as one device on the concatenated batch."""
    devices = jax.local_device_count()
    assert devices == 4, "tests/conftest.py sets 4 fake CPU devices"
    variables = _variables(2)
    x = _images((devices * 2, 3, 3, C), seed=3)
    apply_fn = functools.partial(
        _bn(axis_name="batch").apply, use_running_average=False, mutable=["batch_stats"]
    )
    y, state = jax.pmap(apply_fn, axis_name="batch", in_axes=(None, 0))(
        variables, x.reshape(devices, 2, 3, 3, C)
    )
    ref_y, ref_state = _bn().apply(variables, x, use_running_average=False, mutable=True)
    np.testing.assert_allclose(y.reshape(x.shape), ref_y, rtol=1e-5, atol=1e-5)
    for d in range(devices):
        for k in ("mean", "var"):
            np.testing.assert_allclose(
                state["batch_stats"][k][d], ref_state["batch_stats"][k], rtol=1e-5
            )


def test_mask_counts_only_masked_values():
    variables = _variables(3)
    x = _images((6, 2, 2, C), seed=4)
    mask = np.zeros((6, 1, 1, 1), bool)
    mask[:4] = True
    _, state = _bn().apply(
        variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"]
    )
    _, ref = _bn().apply(variables, x[:4], use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(state["batch_stats"]["var"], ref["batch_stats"]["var"], rtol=1e-5)


def test_one_value_per_channel_is_refused():
    x = jnp.ones((1, 1, 1, C))
    with pytest.raises(ValueError, match="more than one value per channel"):
        _bn().apply(_variables(), x, use_running_average=False, mutable=["batch_stats"])
    _bn().apply(_variables(), x, use_running_average=True)  # eval mode is fine


def test_moments_reproduce_the_training_mode_output():
    """The statistics a training-mode pass normalised with, held fixed in eval mode, give the
    same logits; the running variance (momentum 0) is not them, but n / (n - 1) times them."""
    model = models.create("resnet18", 10, width=4, small_input=True)
    variables = _random_variables(model)
    images = _images((6, 8, 8, 3), seed=6)  # layer4 is 1 x 1: n = 6
    logits, _, batch_stats, moments = models.apply_with_features(
        model.clone(bn_momentum=0.0), variables, images, train=True, layers=(), moments=True
    )
    fixed = model.apply({"params": variables["params"], "batch_stats": moments}, images)
    np.testing.assert_allclose(fixed, logits, atol=1e-5)
    running = model.apply({"params": variables["params"], "batch_stats": batch_stats}, images)
    assert np.max(np.abs(running - logits)) > 1e-2  # the running statistics would not do
    last = moments["layer4"]["1"]["bn2"]
    # Momentum 0: the running mean is the batch mean, the running variance n / (n - 1) times
    # the variance the batch was normalised with (n = 6 at layer4).
    np.testing.assert_array_equal(batch_stats["layer4"]["1"]["bn2"]["mean"], last["mean"])
    np.testing.assert_allclose(
        batch_stats["layer4"]["1"]["bn2"]["var"], last["var"] * 6 / 5, rtol=1e-6
    )
    with pytest.raises(ValueError, match="moments=True needs train=True"):
        models.apply_with_features(model, variables, images, moments=True)


def test_resnet18_running_statistics_match_torchvision():
    """torchvision's resnet18 (random weights) and ours with its ported weights, two
    training-mode passes on 4 x 64 x 64 images: every running_mean and running_var agrees."""
    torch.manual_seed(0)
    torch_model = torchvision.models.resnet18(num_classes=3).train()
    state_dict = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
    variables, _ = convert.convert_state_dict(state_dict, "resnet18", 3)
    model = models.create("resnet18", 3)
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    batch_stats = variables["batch_stats"]
    for step in range(2):
        images = _images((4, 64, 64, 3), seed=10 + step)
        logits, state = train({"params": variables["params"], "batch_stats": batch_stats}, images)
        batch_stats = state["batch_stats"]
        with torch.no_grad():
            ref_logits = torch_model(_nchw(images)).numpy()
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)

    ported = convert.to_torch_state_dict(
        {"params": variables["params"], "batch_stats": batch_stats}, "resnet18"
    )
    ref = torch_model.state_dict()
    worst = {}
    for key in ported:
        if key.endswith(("running_mean", "running_var")):
            got, want = ported[key].numpy(), ref[key].numpy()
            kind = key.rpartition(".")[2]
            rel = float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-3)))
            worst[kind] = max(worst.get(kind, 0.0), rel)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=key)
    print(f"\n[torch vs flax] resnet18 two train steps, max relative: {worst}")
