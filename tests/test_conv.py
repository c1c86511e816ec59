"""The convolution paths of models.conv_general_dilated (conv_by_slices for small maps,
conv_matmul_grad for the stem and large kernel gradients) against `lax.conv_general_dilated`:
values and gradients, for every convolution the ResNets route to them, and whole ResNets with
conv_impl 'auto' against 'lax'."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from agre_jax import models

TOL = 1e-5  # relative to the largest magnitude of the reference


def _close(actual, expected, what: str, tol: float = TOL) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.abs(expected).max()), 1e-30)
    err = float(np.abs(actual - expected).max()) / scale
    assert actual.shape == expected.shape, what
    assert err <= tol, f"{what}: max error {err:.2e} of the reference's magnitude"


def _routed_convs() -> dict[str, set[tuple]]:
    """{path: {(input shape, kernel shape, strides, padding)}} of every convolution that
    ResNet-18/50 route to conv_by_slices ('slices') or conv_matmul_grad ('matmul_grad') at
    16, 32, 64 and 224 px, with either stem, batch 32 and width 64 (ResNet-34's convolutions
    have ResNet-18's shapes: more blocks of the same stages; at width 8 only the stems take
    conv_matmul_grad, as at 64)."""
    seen: dict[str, set[tuple]] = {"slices": set(), "matmul_grad": set()}
    real = {"slices": models.conv_by_slices, "matmul_grad": models.conv_matmul_grad}

    def recorder(path):
        def record(x, kernel, strides, padding, precision=None):
            seen[path].add((x.shape[1:], kernel.shape, tuple(strides), tuple(map(tuple, padding))))
            return real[path](x, kernel, strides, padding, precision)

        return record

    models.conv_by_slices = recorder("slices")
    models.conv_matmul_grad = recorder("matmul_grad")
    try:
        for arch in ("resnet18", "resnet50"):
            for small in (False, True):
                model = models.create(arch, 2, width=64, small_input=small)
                for size in (16, 32, 64, 224):
                    jax.eval_shape(
                        functools.partial(model.init, train=False),
                        jax.random.key(0),
                        jax.ShapeDtypeStruct((32, size, size, 3), jnp.float32),
                    )
    finally:
        models.conv_by_slices = real["slices"]
        models.conv_matmul_grad = real["matmul_grad"]
    return seen


_ROUTES = _routed_convs()
ROUTED = sorted(_ROUTES["slices"])


def _matmul_grad_cases() -> list[tuple]:
    """The matmul-gradient path's cases, channels aside (the test sets them: the path depends
    on them only through FEW_CHANNELS): per kernel, stride, padding and kind, the largest map
    routed there, and for the stems also the smallest (taps wholly in the padding)."""
    maps: dict[tuple, set] = {}
    for shape, kernel, strides, padding in _ROUTES["matmul_grad"]:
        key = (kernel[:2], strides, padding, shape[2] <= models.FEW_CHANNELS)
        maps.setdefault(key, set()).add(shape[:2])
    cases = set()
    for key, hws in maps.items():
        cases |= {(max(hws), *key), (min(hws), *key) if key[-1] else (max(hws), *key)}
    return sorted(cases)


MATMUL_GRAD = _matmul_grad_cases()


def test_the_resnets_route_their_small_map_convs():
    # At 64 px with the ImageNet stem layer4 is 2 x 2: its 3x3 convs (stride 1 on 2 x 2 and
    # stride 2 from 4 x 4) are routed; 1x1 convs never are.
    kernels = {(k[:2], s) for _, k, s, _ in ROUTED}
    assert ((3, 3), (1, 1)) in kernels and ((3, 3), (2, 2)) in kernels
    assert all(k[:2] != (1, 1) for _, k, _, _ in ROUTED)
    assert len(ROUTED) >= 6
    # The stems on RGB images (7x7 stride 2 and the small-input 3x3) take the matmul-gradient
    # path, as do the 3x3 and 1x1 convolutions on large maps at width 64 (224 px: 56 x 56).
    routed = _ROUTES["matmul_grad"]
    stems = {(k[:2], s) for x, k, s, _ in routed if x[-1] <= models.FEW_CHANNELS}
    assert stems == {((7, 7), (2, 2)), ((3, 3), (1, 1))}
    assert {x[-1] for x, *_ in routed} > {3, 64, 128, 256}
    assert ((56, 56, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1))) in routed
    assert any(k[:2] == (1, 1) and s == (2, 2) for _, k, s, _ in routed)


def test_the_width8_default_keeps_lax_kernel_gradients():
    """configs/default.py's synthetic networks (ResNet-18, width 8, small-input stem, 32 px,
    batch 32): only the stem takes conv_matmul_grad, so its arithmetic is unchanged."""
    seen = []
    real = models.conv_matmul_grad

    def record(x, kernel, *args):
        seen.append(x.shape)
        return real(x, kernel, *args)

    models.conv_matmul_grad = record
    try:
        model = models.create("resnet18", 2, width=8, small_input=True)
        jax.eval_shape(
            functools.partial(model.init, train=False),
            jax.random.key(0),
            jax.ShapeDtypeStruct((32, 32, 32, 3), jnp.float32),
        )
    finally:
        models.conv_matmul_grad = real
    assert seen == [(32, 32, 32, 3)]


def _lax(strides, padding):
    return functools.partial(
        lax.conv_general_dilated,
        window_strides=strides,
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


@pytest.mark.parametrize(
    "case", MATMUL_GRAD, ids=lambda c: f"in{c[0]}_k{c[1]}_s{c[2]}_p{c[3]}_few{c[4]}"
)
def test_conv_matmul_grad_equals_lax_conv(case):
    """The convolution shapes the ResNets route there (16 to 224 px), batch 2, with 3 input
    channels (the stem's patches) or 8 (one matmul per tap): values and both gradients,
    inside jit and under vmap (per-sample gradients, gram='vmap')."""
    (h, w), (kh, kw), strides, padding, few = case
    c = 3 if few else 8
    x = jax.random.normal(jax.random.key(0), (2, h, w, c))
    kernel = jax.random.normal(jax.random.key(1), (kh, kw, c, 5))
    ref = _lax(strides, padding)
    ours = jax.jit(functools.partial(models.conv_matmul_grad, strides=strides, padding=padding))
    expected, vjp_ref = jax.vjp(lambda a, b: ref(a, b), x, kernel)
    actual, vjp_ours = jax.vjp(ours, x, kernel)
    _close(actual, expected, "values")
    cot = jax.random.normal(jax.random.key(2), expected.shape)
    for name, a, e in zip(("d input", "d kernel"), vjp_ours(cot), vjp_ref(cot), strict=True):
        _close(a, e, name)

    def per_sample(conv):
        return jax.vmap(
            jax.grad(lambda k, xi: jnp.sum(conv(xi[None], k) * cot[:1])), in_axes=(None, 0)
        )(kernel, x)

    _close(per_sample(ours), per_sample(lambda a, b: ref(a, b)), "per-sample d kernel")


@pytest.mark.parametrize("case", ROUTED, ids=lambda c: f"in{c[0]}_k{c[1]}_s{c[2]}_p{c[3]}")
def test_conv_by_slices_equals_lax_conv(case):
    """Values and both gradients, on every convolution shape the ResNets route (channels cut
    to 8 / 12 to keep it quick: the path does not depend on them)."""
    in_shape, kernel_shape, strides, padding = case
    (h, w, _), (kh, kw, _, _) = in_shape, kernel_shape
    x = jax.random.normal(jax.random.key(0), (3, h, w, 8))
    kernel = jax.random.normal(jax.random.key(1), (kh, kw, 8, 12))
    cot_key = jax.random.key(2)

    def ref(x, k):
        return lax.conv_general_dilated(
            x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def ours(x, k):
        return models.conv_by_slices(x, k, strides, padding)

    expected, vjp_ref = jax.vjp(ref, x, kernel)
    actual, vjp_ours = jax.vjp(ours, x, kernel)
    _close(actual, expected, "values")
    cot = jax.random.normal(cot_key, expected.shape)
    for name, a, e in zip(("d input", "d kernel"), vjp_ours(cot), vjp_ref(cot), strict=True):
        _close(a, e, name)


@pytest.mark.parametrize(
    "h, k, stride, pad",
    [(1, 3, 1, 1), (2, 3, 1, 1), (2, 3, 2, 1), (3, 3, 2, 1), (2, 2, 1, 0), (4, 7, 2, 3)],
)
def test_conv_by_slices_other_shapes(h, k, stride, pad):
    """Shapes beyond the ResNets': odd maps, even kernels, a 7x7 stem on a tiny image, and
    taps wholly in the padding (left out), for conv_by_slices and conv_matmul_grad."""
    x = jax.random.normal(jax.random.key(3), (2, h, h + 1, 5))
    kernel = jax.random.normal(jax.random.key(4), (k, k, 5, 7))
    padding = ((pad, pad), (pad, pad))
    expected = lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    _close(models.conv_by_slices(x, kernel, (stride, stride), padding), expected, "values")
    grad = jax.grad(lambda k_: jnp.sum(models.conv_by_slices(x, k_, (stride,) * 2, padding) ** 2))
    grad_ref = jax.grad(
        lambda k_: jnp.sum(
            lax.conv_general_dilated(
                x, k_, (stride,) * 2, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            ** 2
        )
    )
    _close(grad(kernel), grad_ref(kernel), "d kernel")
    strides = (stride, stride)
    for c in (3, 5):  # conv_matmul_grad's patches (few channels) and per-tap matmuls
        xc, kc = x[..., :c], kernel[:, :, :c]
        grad = jax.grad(
            lambda k_, xc=xc: jnp.sum(models.conv_matmul_grad(xc, k_, strides, padding) ** 2)
        )
        ref = jax.grad(
            lambda k_, xc=xc: jnp.sum(
                lax.conv_general_dilated(
                    xc, k_, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
                )
                ** 2
            )
        )
        _close(grad(kc), ref(kc), f"conv_matmul_grad d kernel, {c} channels")


def _primitives(fn, *args) -> set[str]:
    return {str(e.primitive) for e in jax.make_jaxpr(fn)(*args).eqns}


def test_path_is_chosen_from_the_shapes():
    conv = functools.partial(
        models.conv_general_dilated,
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)),
    )
    kernel = jnp.zeros((3, 3, 8, 8))
    assert _primitives(conv, jnp.zeros((1, 2, 2, 8)), kernel) & {"dot_general"}
    assert "conv_general_dilated" not in _primitives(conv, jnp.zeros((1, 2, 2, 8)), kernel)
    assert "conv_general_dilated" in _primitives(conv, jnp.zeros((1, 8, 8, 8)), kernel)
    few = _primitives(conv, jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 3, 8)))
    assert "custom_vjp_call" in few and "conv_general_dilated" not in few
    # A large kernel gradient (here 56 x 56 x 64, 3x3, batch 32) takes matmuls, a 1x1 one too.
    big = jnp.zeros((32, 56, 56, 64))
    for k in (3, 1):
        prims = _primitives(conv, big, jnp.zeros((k, k, 64, 64)))
        assert "custom_vjp_call" in prims and "conv_general_dilated" not in prims
    # Small 1x1 kernels and grouped convs keep lax's convolution.
    assert "conv_general_dilated" in _primitives(
        conv, jnp.zeros((1, 2, 2, 8)), jnp.zeros((1, 1, 8, 8))
    )
    grouped = functools.partial(conv, feature_group_count=2)
    assert "conv_general_dilated" in _primitives(
        grouped, jnp.zeros((1, 2, 2, 8)), jnp.zeros((3, 3, 4, 8))
    )


@pytest.mark.parametrize("block", [models.BasicBlock, models.Bottleneck])
def test_resnet_auto_equals_lax(block, monkeypatch):
    """A whole ResNet at 64 px (layer4 on 2 x 2 maps): logits, captured features and every
    parameter gradient of conv_impl 'auto' equal 'lax''s; same parameter tree. Two blocks per
    stage: ResNet-18 itself, and with Bottleneck blocks every convolution shape of ResNet-50
    (whose later blocks in a stage repeat the second's). Computed in float64, where the two
    summation orders agree to ~1e-14 (in float32 the gradients of the 50-layer network differ
    by rounding, up to ~3e-5 of their magnitude). Every convolution that conv_by_slices does
    not take takes conv_matmul_grad's kernel gradient here (its threshold set to 0; at these
    sizes only the stem would)."""
    monkeypatch.setattr(models, "MATMUL_GRAD_MIN_MACS", 0)
    auto = models.ResNet(stage_sizes=(2, 2, 2, 2), block_cls=block, num_classes=3, width=4)
    plain = auto.clone(conv_impl="lax")
    variables = models.init(auto, jax.random.key(0), 64)
    assert jax.tree.structure(variables) == jax.tree.structure(models.abstract_variables(plain, 64))
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables)
        images = jax.random.normal(jax.random.key(1), (4, 64, 64, 3), jnp.float64)

        def run(model):
            model = model.clone(dtype=jnp.float64)

            def loss(params):
                logits, feats = models.apply_with_features(
                    model, {"params": params, "batch_stats": variables["batch_stats"]}, images
                )
                return jnp.sum(jnp.sin(logits)), (logits, feats)

            return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])

        (g_auto, (l_auto, f_auto)), (g_lax, (l_lax, f_lax)) = run(auto), run(plain)
    for name in models.LAYERS:
        assert f_auto[name].dtype == jnp.float64
        _close(f_auto[name], f_lax[name], name, tol=1e-10)
    # Logits leave the network as float32 (one rounding: a last-bit difference at most).
    _close(l_auto, l_lax, "logits", tol=1e-6)
    for (path, a), e in zip(
        jax.tree_util.tree_leaves_with_path(g_auto), jax.tree.leaves(g_lax), strict=True
    ):
        _close(a, e, jax.tree_util.keystr(path), tol=1e-6)


def test_unknown_conv_impl():
    model = models.create("resnet18", 2, width=4, conv_impl="fast")
    with pytest.raises(ValueError, match="unknown conv_impl 'fast'"):
        models.abstract_variables(model, 16)
