"""Flax ResNets with torchvision semantics, captured intermediates and feature adapters.

The parameter tree mirrors torchvision's state_dict so that `convert/` is a plain key table:
`conv1`, `bn1`, `layer{k}/{i}/{conv1,bn1,conv2,bn2[,conv3,bn3],downsample_conv,downsample_bn}`,
`fc`. Inputs are NHWC. Padding is explicit and symmetric everywhere (torch pads (1, 1) on a
stride-2 3x3 conv where 'SAME' would pad (0, 1)).

BatchNorm is `TorchBatchNorm`: flax's, with torch's unbiased running variance.
`merge_params` grafts loaded weights onto initial variables, checking keys and shapes.

Intermediate activations come out through flax's `capture_intermediates` with a filter that
names only the five stages `layer1..layer4` and `pooled` (an unfiltered capture of a
ResNet-50 is hundreds of MB).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import normalization as _flax_norm
from jax import lax

LAYERS = ("layer1", "layer2", "layer3", "layer4", "pooled")
SPATIAL_LAYERS = LAYERS[:4]
ARCHS = ("resnet18", "resnet34", "resnet50")

# torch BatchNorm: momentum 0.1 weights the new batch; flax weights the running value.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's init


# Collection where TorchBatchNorm, in training mode and when it is mutable, puts the
# statistics it normalised the batch with ({mean, var}, the tree of 'batch_stats').
BATCH_MOMENTS = "batch_moments"


class TorchBatchNorm(nn.BatchNorm):
    """nn.BatchNorm whose running variance takes the unbiased batch variance, as torch's.

    In training mode the batch is normalised with its biased variance (as in flax and torch),
    but torch's `running_var` accumulates the unbiased one, n / (n - 1) times larger, with n
    the number of values reduced per channel (B * H * W, summed over the devices of
    `axis_name`). flax's biased one drifts towards (n - 1) / n of torch's: at layer4 of a
    ResNet-18 on 4 x 64 x 64 images (n = 16), 1.5 % lower after one step, 2.1 % after two,
    6 % in the limit. Everything else is flax's `nn.BatchNorm.__call__`, line for line with
    its (private) helpers: variables, eval mode, dtypes, the cross-replica mean. A subclass,
    so that code matching `nn.BatchNorm` (weighting's layerwise Gram) finds it; it does not
    call `super().__call__`, which `nn.intercept_methods` would see as a second call of the
    layer.

    The running statistics are therefore no longer the batch's own normalisation statistics,
    even with momentum 0. Code that needs those (to evaluate the model with this batch's
    statistics held fixed) makes the BATCH_MOMENTS collection mutable: training mode puts the
    mean and biased variance it normalised with there (after the cross-replica mean).

    Raises:
      ValueError: in training mode with a single value per channel (torch raises too: the
        unbiased variance is undefined).
    """

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        feature_axes = _flax_norm._canonicalize_axes(x.ndim, self.axis)
        reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
        feature_shape = [x.shape[ax] for ax in feature_axes]
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, feature_shape, stats_dtype)
        ra_var = self.variable("batch_stats", "var", jnp.ones, feature_shape, stats_dtype)

        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
            if not self.force_float32_reductions:
                mean, var = jnp.asarray(mean, self.param_dtype), jnp.asarray(var, self.param_dtype)
        else:
            initializing = self.is_initializing()  # no update, and no axis to reduce over
            mean, var = _flax_norm._compute_stats(
                x,
                reduction_axes,
                dtype=self.dtype,
                axis_name=None if initializing else self.axis_name,
                axis_index_groups=self.axis_index_groups,
                use_fast_variance=self.use_fast_variance,
                mask=mask,
                force_float32_reductions=self.force_float32_reductions,
            )
            if not initializing:
                n = _count_per_channel(self, x, reduction_axes, mask)
                unbiased = var * (n / jnp.maximum(n - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
                if self.is_mutable_collection(BATCH_MOMENTS):
                    self.put_variable(BATCH_MOMENTS, "mean", mean)
                    self.put_variable(BATCH_MOMENTS, "var", var)

        return _flax_norm._normalize(
            self,
            x,
            mean,
            var,
            reduction_axes,
            feature_axes,
            self.dtype,
            self.param_dtype,
            self.epsilon,
            self.use_bias,
            self.use_scale,
            self.bias_init,
            self.scale_init,
            self.force_float32_reductions,
        )


def _count_per_channel(
    bn: nn.BatchNorm, x: jax.Array, reduction_axes: tuple[int, ...], mask: jax.Array | None
) -> Any:
    """Values a BatchNorm reduces per channel, over all its devices: an int, or with a mask
    an array of the feature shape."""
    if bn.axis_name is None:
        replicas = 1
    elif bn.axis_index_groups is not None:
        replicas = len(bn.axis_index_groups[0])
    else:
        replicas = jax.lax.axis_size(bn.axis_name)
    if mask is None:
        n = replicas * int(np.prod([x.shape[i] for i in reduction_axes]))
        if n < 2:
            raise ValueError(
                f"BatchNorm {'/'.join(bn.path)} in training mode needs more than one value per "
                f"channel, got input shape {x.shape} on {replicas} device(s)"
            )
        return n
    n = jnp.sum(jnp.broadcast_to(mask, x.shape), axis=reduction_axes, dtype=jnp.float32)
    if bn.axis_name is not None:
        n = jax.lax.psum(n, bn.axis_name, axis_index_groups=bn.axis_index_groups)
    return n


# ---------------------------------------------------------------------------------------------
# Convolutions on small maps.

CONV_IMPLS = ("auto", "lax")
# Largest output map (Ho * Wo) that `conv_general_dilated` computes from shifted slices.
# XLA:CPU's convolution falls off a cliff when the map is as small as the kernel: a 3x3
# conv, stride 1, on a 2 x 2 x 512 map (layer4 of a ResNet at 64 px) took 730 ms forward and
# 840 ms forward + backward for a batch of 32 against 8.5 / 25 ms from slices (2-core CPU),
# and the stride-2 3x3 conv into a 2 x 2 map has the same cliff in its backward pass (835 ms
# against 26 ms at 512 channels). At 4 x 4 outputs both ways cost about the same.
SLICES_MAX_OUTPUT = 4
# Most input channels for which `conv_matmul_grad` computes the kernel gradient from one
# matrix of input patches (the stem); with more, it takes one matmul per kernel tap.
FEW_CHANNELS = 4
# Fewest multiply-adds (B * Ho * Wo * kh * kw * C * O) of a convolution's kernel gradient for
# which `conv_matmul_grad` computes it by matmuls. XLA:CPU computes it as a convolution whose
# contraction is the batch and the map, far below its forward's speed on large maps
# (benchmarks/conv_grad.py; ResNet at 224 px, B = 32, 2-core CPU, ms, lax / per-tap matmuls:
# layer1 3x3 64->64 on 56 x 56 792 / 277, layer2 3x3 on 28 x 28 866 / 148, 3x3 stride 2
# 56 -> 28 546 / 105, 1x1 stride 2 196 / 7; at 64 px layer1 25.5 / 12.9). Below the threshold
# the two are within about 20 % either way (32 px, width 8: 2.7 / 2.0, 1.8 / 2.0, 1.2 / 0.9
# ms), and lax's is kept, so that the width-8 default's arithmetic (at most 1.9e7 per
# convolution) is unchanged.
MATMUL_GRAD_MIN_MACS = 2**25
_NHWC = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


def _explicit(padding: Any, ndim: int) -> tuple[tuple[int, int], ...] | None:
    if isinstance(padding, str):
        return ((0, 0),) * ndim if padding == "VALID" else None
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_by_slices(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    precision: Any = None,
) -> jax.Array:
    """A 2-D convolution as shifted slices of the padded input and one dot_general.

    Equal to `lax.conv_general_dilated(x, kernel, strides, padding,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))` up to float summation order (tests check
    values and gradients against it). Each kernel tap (a, b) contributes the strided slice
    of the padded input it sees; the slices are concatenated on the channel axis
    ([B, Ho, Wo, T * C]) and contracted with the kernel's [T * C, O] rows in one matmul.
    Taps whose slice lies entirely in the padding are left out (they add zeros): a 3x3
    kernel on a 1 x 1 map is one tap. Cost: B * Ho * Wo * T * C * O multiply-adds, the
    convolution's own count, plus copies of the input that grow with T, hence only for small
    maps (`SLICES_MAX_OUTPUT`).

    Args:
      x: [B, H, W, C] input.
      kernel: [kh, kw, C, O].
      strides: (sh, sw).
      padding: ((top, bottom), (left, right)), explicit.
      precision: passed to the dot.

    Returns:
      [B, Ho, Wo, O] in x's dtype (promoted with the kernel's, as lax.conv).
    """
    taps, patches = _tap_patches(x, kernel.shape[:2], strides, padding)
    rows = jnp.concatenate([kernel[a, b] for a, b in taps], axis=0)  # [T * C, O]
    return lax.dot_general(patches, rows, (((3,), (0,)), ((), ())), precision=precision)


def _tap_slices(
    x: jax.Array,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
) -> tuple[list[tuple[int, int]], list[jax.Array]]:
    """(live taps (a, b), their [B, Ho, Wo, C] slices): for each kernel tap whose slice of the
    padded input is not all padding, that strided slice of the padded input."""
    chex.assert_rank(x, 4)
    _, h, w, _ = x.shape
    kh, kw = kernel_size
    (pt, pb), (pl, pr) = padding
    sh, sw = strides
    ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"kernel {tuple(kernel_size)} larger than padded input {x.shape[1:3]}")

    def live(start: int, step: int, count: int, lo: int, size: int) -> bool:
        # Does row (or column) start, start + step, ... of the padded input hit real input?
        return any(lo <= start + k * step < lo + size for k in range(count))

    taps = [
        (a, b)
        for a in range(kh)
        for b in range(kw)
        if live(a, sh, ho, pt, h) and live(b, sw, wo, pl, w)
    ]
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    cols = [
        xp[:, a : a + sh * (ho - 1) + 1 : sh, b : b + sw * (wo - 1) + 1 : sw, :] for a, b in taps
    ]
    return taps, cols


def _tap_patches(
    x: jax.Array,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
) -> tuple[list[tuple[int, int]], jax.Array]:
    """(live taps, [B, Ho, Wo, T * C]): `_tap_slices` concatenated on the channel axis."""
    taps, cols = _tap_slices(x, kernel_size, strides, padding)
    return taps, cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _lax_conv(x, kernel, strides, padding, precision):
    return lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=_NHWC, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_matmul_grad(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], ...],
    precision: Any = None,
) -> jax.Array:
    """`lax.conv`'s forward and input gradient, with the kernel gradient computed by matmuls
    of input slices and output cotangents: for at most FEW_CHANNELS input channels (the stem
    on RGB images) one matmul of all input patches ([T * C, B * Ho * Wo] x [B * Ho * Wo, O]),
    else one per kernel tap ([C, B * Ho * Wo] x [B * Ho * Wo, O] on the tap's strided slice
    of the padded input).

    XLA:CPU computes the kernel gradient as a convolution with the batch and the map as its
    contraction, slowly on large maps and for 3 input channels: the 7x7 stride-2 stem of a
    ResNet at 64 px, batch 32, took 168 ms forward + kernel gradient against 60 ms from
    patches (1250 against 650 ms at 224 px), and `MATMUL_GRAD_MIN_MACS` gives the other
    shapes. From patches the forward itself is slower (32 against 12 ms): hence lax forward,
    matmul kernel gradient. Same arguments as `conv_by_slices`; values are lax's, gradients
    equal lax's up to float summation order (tests/test_conv.py).
    """
    return _lax_conv(x, kernel, strides, padding, precision)


def _matmul_grad_fwd(x, kernel, strides, padding, precision):
    return _lax_conv(x, kernel, strides, padding, precision), (x, kernel)


def _matmul_grad_bwd(strides, padding, precision, residuals, dy):
    x, kernel = residuals
    # The input gradient as lax computes it (dead code, removed by XLA, for input images).
    _, vjp_x = jax.vjp(lambda x_: _lax_conv(x_, kernel, strides, padding, precision), x)
    (dx,) = vjp_x(dy)
    kh, kw, c, o = kernel.shape
    dy2 = dy.reshape(-1, o)
    contract = (((0,), (0,)), ((), ()))
    if c <= FEW_CHANNELS:
        taps, patches = _tap_patches(x, (kh, kw), strides, padding)
        rows = lax.dot_general(
            patches.reshape(-1, patches.shape[-1]), dy2, contract, precision=precision
        ).reshape(len(taps), c, o)
    else:
        taps, slices = _tap_slices(x, (kh, kw), strides, padding)
        rows = jnp.stack(
            [lax.dot_general(s.reshape(-1, c), dy2, contract, precision=precision) for s in slices]
        )
    if len(taps) == kh * kw:
        dk = rows.reshape(kernel.shape)
    else:  # taps wholly in the padding get no gradient
        dk = jnp.zeros(kernel.shape, rows.dtype)
        for t, (a, b) in enumerate(taps):
            dk = dk.at[a, b].set(rows[t])
    return dx, dk.astype(kernel.dtype)


conv_matmul_grad.defvjp(_matmul_grad_fwd, _matmul_grad_bwd)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """`lax.conv_general_dilated`, with two other paths for an NHWC/HWIO convolution without
    dilation or groups: a kernel larger than 1 x 1 with outputs of at most SLICES_MAX_OUTPUT
    positions is computed by `conv_by_slices`; one of at most FEW_CHANNELS input channels,
    or whose kernel gradient takes at least MATMUL_GRAD_MIN_MACS multiply-adds, by
    `conv_matmul_grad`. The path is chosen statically from the shapes. Given to flax's
    `nn.Conv` as its `conv_general_dilated`, so that parameters, initialisation and
    checkpoints stay nn.Conv's.
    """
    pads = _explicit(padding, lhs.ndim - 2)
    plain = (
        lhs.ndim == 4
        and pads is not None
        and dimension_numbers == _NHWC
        and feature_group_count == 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)) + tuple(rhs_dilation or (1, 1)))
        and not kwargs
    )
    if plain:
        (pt, pb), (pl, pr) = pads
        kh, kw, c, o = rhs.shape
        ho = (lhs.shape[1] + pt + pb - kh) // window_strides[0] + 1
        wo = (lhs.shape[2] + pl + pr - kw) // window_strides[1] + 1
        if kh * kw > 1 and 0 < ho * wo <= SLICES_MAX_OUTPUT:
            return conv_by_slices(lhs, rhs, window_strides, pads, precision)
        macs = lhs.shape[0] * ho * wo * kh * kw * c * o
        if (kh * kw > 1 and c <= FEW_CHANNELS) or macs >= MATMUL_GRAD_MIN_MACS:
            return conv_matmul_grad(lhs, rhs, tuple(window_strides), pads, precision)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        **kwargs,
    )


def _last_scale_init(zero: bool) -> Callable[..., jax.Array]:
    """The scale initialiser of a residual branch's last BatchNorm: zeros with
    zero_init_residual (each block starts as the identity), else flax's ones."""
    return nn.initializers.zeros if zero else nn.initializers.ones


class BasicBlock(nn.Module):
    """torchvision BasicBlock: two 3x3 convs, expansion 1."""

    planes: int
    strides: int
    downsample: bool
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    zero_init_residual: bool = False

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.conv(self.planes, (3, 3), self.strides, padding=((1, 1), (1, 1)), name="conv1")(
            x
        )
        out = nn.relu(self.norm(name="bn1")(out))
        out = self.conv(self.planes, (3, 3), 1, padding=((1, 1), (1, 1)), name="conv2")(out)
        out = self.norm(name="bn2", scale_init=_last_scale_init(self.zero_init_residual))(out)
        if self.downsample:
            x = self.conv(
                self.planes, (1, 1), self.strides, padding="VALID", name="downsample_conv"
            )(x)
            x = self.norm(name="downsample_bn")(x)
        return nn.relu(out + x)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (v1.5): 1x1, 3x3 carrying the stride, 1x1; expansion 4."""

    planes: int
    strides: int
    downsample: bool
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    zero_init_residual: bool = False

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.conv(self.planes, (1, 1), 1, padding="VALID", name="conv1")(x)
        out = nn.relu(self.norm(name="bn1")(out))
        out = self.conv(self.planes, (3, 3), self.strides, padding=((1, 1), (1, 1)), name="conv2")(
            out
        )
        out = nn.relu(self.norm(name="bn2")(out))
        out = self.conv(self.planes * 4, (1, 1), 1, padding="VALID", name="conv3")(out)
        out = self.norm(name="bn3", scale_init=_last_scale_init(self.zero_init_residual))(out)
        if self.downsample:
            x = self.conv(
                self.planes * 4, (1, 1), self.strides, padding="VALID", name="downsample_conv"
            )(x)
            x = self.norm(name="downsample_bn")(x)
        return nn.relu(out + x)


class Stage(nn.Module):
    """One `layerK` of torchvision: a sequence of blocks named '0', '1', ..."""

    block_cls: type[nn.Module]
    num_blocks: int
    planes: int
    strides: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_channels = self.planes * self.block_cls.expansion
        for i in range(self.num_blocks):
            strides = self.strides if i == 0 else 1
            downsample = i == 0 and (strides != 1 or x.shape[-1] != out_channels)
            x = self.block_cls(
                self.planes,
                strides,
                downsample,
                self.conv,
                self.norm,
                self.zero_init_residual,
                name=str(i),
            )(x)
        return x


class GlobalAvgPool(nn.Module):
    """Mean over H and W: [B, H, W, C] -> [B, C]. A module so that `pooled` can be captured."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.mean(x, axis=(1, 2))


class ResNet(nn.Module):
    """ResNet with torchvision semantics.

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      block_cls: BasicBlock or Bottleneck.
      num_classes: size of the `fc` head.
      width: channels of the stem and of layer1's blocks (64 in torchvision); stage k has
        `width * 2**(k-1)` planes.
      small_input: 3x3 stride-1 stem conv and no max-pool (for 32-64 px images).
      dtype: compute dtype (bfloat16 on GPUs); parameters stay float32 and logits are float32.
      bn_momentum: flax BatchNorm momentum (0.9 == torch's 0.1).
      bn_axis_name: pmap axis for cross-replica BatchNorm statistics; None outside pmap.
      conv_impl: 'auto' (convolutions into small maps from shifted slices, see
        `conv_general_dilated`) or 'lax' (always `lax.conv_general_dilated`). Same parameters
        and, up to float summation order, the same outputs.
      zero_init_residual: initialise the scale of each residual branch's last BatchNorm
        (bn2 of BasicBlock, bn3 of Bottleneck) to zero, so that every block starts as the
        identity (torchvision's `zero_init_residual`; Goyal et al. 2017, "Accurate, Large
        Minibatch SGD", section 5.1). Only the initial values change, not the parameters.
    """

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int
    width: int = 64
    small_input: bool = False
    dtype: Any = jnp.float32
    bn_momentum: float = BN_MOMENTUM
    bn_axis_name: str | None = None
    conv_impl: str = "auto"
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B, H, W, 3] images -> [B, num_classes] float32 logits."""
        chex.assert_rank(x, 4)
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"unknown conv_impl {self.conv_impl!r}; expected one of {CONV_IMPLS}")
        conv = functools.partial(
            nn.Conv,
            conv_general_dilated=conv_general_dilated if self.conv_impl == "auto" else None,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_CONV_INIT,
        )
        norm = functools.partial(
            TorchBatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            axis_name=self.bn_axis_name,
        )
        x = x.astype(self.dtype)
        if self.small_input:
            x = conv(self.width, (3, 3), 1, padding=((1, 1), (1, 1)), name="conv1")(x)
        else:
            x = conv(self.width, (7, 7), 2, padding=((3, 3), (3, 3)), name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        if not self.small_input:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for k, num_blocks in enumerate(self.stage_sizes):
            x = Stage(
                self.block_cls,
                num_blocks,
                self.width * 2**k,
                1 if k == 0 else 2,
                conv,
                norm,
                self.zero_init_residual,
                name=f"layer{k + 1}",
            )(x)
        x = GlobalAvgPool(name="pooled")(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="fc")(x)
        return x.astype(jnp.float32)


_SPECS: dict[str, tuple[tuple[int, ...], type[nn.Module]]] = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
}


def create(arch: str, num_classes: int, **options: Any) -> ResNet:
    """Builds a ResNet by name.

    Args:
      arch: one of ARCHS.
      num_classes: head size.
      **options: any other ResNet attribute (width, small_input, dtype, bn_axis_name, ...).
    """
    if arch not in _SPECS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    stage_sizes, block_cls = _SPECS[arch]
    return ResNet(stage_sizes=stage_sizes, block_cls=block_cls, num_classes=num_classes, **options)


def feature_channels(model: ResNet) -> dict[str, int]:
    """Channel count of each captured layer of `model` (pooled == layer4)."""
    expansion = model.block_cls.expansion
    channels = {f"layer{k + 1}": model.width * 2**k * expansion for k in range(4)}
    channels["pooled"] = channels["layer4"]
    return channels


def feature_strides(model: ResNet) -> dict[str, int]:
    """Downsampling factor of each spatial layer relative to the input side."""
    stem = 1 if model.small_input else 4
    return {f"layer{k + 1}": stem * 2**k for k in range(4)}


STACK_MAPS = ("unroll", "lax_map", "vmap")


def map_stacked(fn: Callable[[Any], Any], stacked: Any, how: str = "unroll") -> Any:
    """fn over the members of a pytree stacked on a leading axis: [M, ...] -> [M, ...].

    'unroll' traces fn once per member inside the same computation (M copies compiled; on a
    2-core CPU a training step in `lax.map` ran 22x slower than unrolled, a forward 1.3x),
    'lax_map' loops (compiles fn once), 'vmap' batches (convs become grouped convs).
    """
    if how == "vmap":
        return jax.vmap(fn)(stacked)
    if how == "lax_map":
        return jax.lax.map(fn, stacked)
    if how != "unroll":
        raise ValueError(f"unknown map {how!r}; expected one of {STACK_MAPS}")
    size = jax.tree.leaves(stacked)[0].shape[0]
    outs = [fn(jax.tree.map(lambda x, i=i: x[i], stacked)) for i in range(size)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


# XLA options of the one-off initialisation: without optimisation its compile takes 2.5 s
# instead of 14 s (ResNet-18, 2-core CPU, most of it the threefry kernels of ~60 parameter
# initialisers), at the same values up to float rounding (6e-8 measured).
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _init_fn(model: ResNet, image_size: int) -> Callable[[jax.Array], Any]:
    """rng -> model.init's variables for [1, image_size, image_size, 3] inputs."""

    def fn(rng):
        dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        return model.init(rng, dummy, train=False)

    return fn


@functools.lru_cache(maxsize=64)
def _compiled_init(model: ResNet, image_size: int, rng_type: Any) -> Any:
    compiled = jax.jit(_init_fn(model, image_size)).lower(rng_type)
    return compiled.compile(compiler_options=_INIT_COMPILER_OPTIONS)


def init(model: ResNet, rng: jax.Array, image_size: int) -> dict[str, Any]:
    """Initial variables {'params', 'batch_stats'} for [1, image_size, image_size, 3] inputs.

    Compiled once per (model, image size, key type) and reused: a run initialises M teachers
    and a student of often the same architecture. Under a trace (jit, eval_shape), plain
    `model.init`.
    """
    if isinstance(rng, jax.core.Tracer):
        return dict(_init_fn(model, image_size)(rng))
    rng_type = jax.ShapeDtypeStruct(rng.shape, rng.dtype)
    return dict(_compiled_init(model, image_size, rng_type)(rng))


def abstract_variables(model: ResNet, image_size: int) -> dict[str, Any]:
    """The shapes and dtypes of `init`'s variables ({'params', 'batch_stats'} of
    jax.ShapeDtypeStruct), traced without computing or allocating anything."""
    return dict(jax.eval_shape(_init_fn(model, image_size), jax.random.key(0)))


MAX_LISTED = 5  # keys listed per kind of problem in merge_params' error


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def merge_params(
    init: Mapping[str, Any], loaded: Mapping[str, Any], *, source: str, fresh: Sequence[str] = ()
) -> dict[str, Any]:
    """Grafts loaded (ported or pretrained) weights onto a model's initial variables.

    Every leaf of `init` is taken from `loaded`, except those of the top-level modules named in
    `fresh` (e.g. ('fc',) for a backbone whose head was dropped or has another number of
    classes), which keep their `init` values in every collection; whatever `loaded` holds under
    those modules is ignored. The inputs are not mutated and share no numpy array with the
    result (jax arrays, immutable, are passed through).

    `init` may hold jax.ShapeDtypeStruct leaves (see `abstract_variables`) to check `loaded`
    without allocating a model: the result is then `loaded` checked and cast (`fresh` needs
    real `init` values).

    Args:
      init: the model's variables, e.g. {'params': tree, 'batch_stats': tree} of
        `init(model, ...)` (nested mappings of arrays or ShapeDtypeStructs).
      loaded: the variables read from a checkpoint, same layout.
      source: the checkpoint's name (a path) for the error message.
      fresh: top-level module names (under each collection) whose variables come from `init`.

    Returns:
      A new variables dict of plain nested dicts with `init`'s structure; every leaf a numpy
      or jax array (as it came) of the dtype of the `init` leaf.

    Raises:
      ValueError: one message naming `source` and listing the keys missing from the checkpoint,
        its unexpected keys and the shape mismatches (checkpoint shape, model shape), the
        first MAX_LISTED of each with their count; or `fresh` names a module that `init` does
        not have, or has only as ShapeDtypeStructs.
    """
    want, got = _flatten(init), _flatten(loaded)
    fresh = frozenset(fresh)
    unknown = sorted(fresh - {path[1] for path in want if len(path) > 2})
    if unknown:
        raise ValueError(f"merge_params: fresh modules {unknown} are not in the model")

    def is_fresh(path: tuple[str, ...]) -> bool:  # (collection, module, ..., leaf)
        return len(path) > 2 and path[1] in fresh

    if any(is_fresh(p) and isinstance(x, jax.ShapeDtypeStruct) for p, x in want.items()):
        raise ValueError(f"merge_params: fresh modules {sorted(fresh)} need values, not shapes")

    missing = ["/".join(p) for p in want if p not in got and not is_fresh(p)]
    unexpected = ["/".join(p) for p in got if p not in want and not is_fresh(p)]
    mismatched = [
        f"{'/'.join(p)} {_shape_str(np.shape(got[p]))} in the checkpoint, "
        f"{_shape_str(x.shape)} in the model"
        for p, x in want.items()
        if p in got and not is_fresh(p) and np.shape(got[p]) != tuple(x.shape)
    ]
    if missing or unexpected or mismatched:
        kinds = (
            ("keys missing from the checkpoint", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        problems = "; ".join(_listing(items, what) for what, items in kinds if items)
        raise ValueError(f"the weights in {source} do not fit the model: {problems}")

    def leaf(path: tuple[str, ...], x: Any) -> Any:
        value = x if is_fresh(path) else got[path]
        if isinstance(value, jax.Array):
            return value if value.dtype == x.dtype else value.astype(x.dtype)
        return np.array(value, dtype=x.dtype)  # a copy: the result shares no mutable array

    return _unflatten({path: leaf(path, x) for path, x in want.items()})


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _listing(items: Sequence[str], what: str) -> str:
    """'7 unexpected keys (a, b, c, d, e, and 2 more)'."""
    more = f", and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{len(items)} {what} ({', '.join(items[:MAX_LISTED])}{more})"


def _check_layers(layers: Sequence[str]) -> tuple[str, ...]:
    unknown = [name for name in layers if name not in LAYERS]
    if unknown:
        raise ValueError(f"unknown feature layers {unknown}; expected a subset of {LAYERS}")
    return tuple(layers)


def _capture_filter(layers: tuple[str, ...]) -> Callable[[nn.Module, str], bool]:
    names = frozenset(layers)

    def keep(mdl: nn.Module, method_name: str) -> bool:
        # Only the top-level stages: blocks inside them have other names anyway.
        return method_name == "__call__" and mdl.name in names and len(mdl.scope.path) == 1

    return keep


def apply_with_features(
    model: ResNet,
    variables: Mapping[str, Any],
    images: jax.Array,
    *,
    train: bool = False,
    layers: Sequence[str] = LAYERS,
    moments: bool = False,
) -> tuple[Any, ...]:
    """Runs `model` and returns its logits and the requested captured layers.

    Args:
      model: a ResNet from `create`.
      variables: {'params', 'batch_stats'}.
      images: [B, H, W, 3].
      train: training mode (batch statistics, running averages updated).
      layers: any subset of LAYERS.
      moments: with `train`, also return the statistics every BatchNorm normalised this batch
        with (see TorchBatchNorm): evaluating the model with them as its 'batch_stats'
        reproduces this training-mode output.

    Returns:
      (logits [B, C] float32, {layer: [B, h, w, c] or [B, c]}), plus the new batch_stats
      when `train`, plus the batch's moments (the tree of batch_stats) when `moments`.
    """
    layers = _check_layers(layers)
    if moments and not train:
        raise ValueError("moments=True needs train=True (eval mode uses the running statistics)")
    mutable = ["batch_stats"] if train else []
    if moments:
        mutable.append(BATCH_MOMENTS)
    if layers:
        mutable.append("intermediates")
    out = model.apply(
        {"params": variables["params"], "batch_stats": variables["batch_stats"]},
        images,
        train=train,
        mutable=mutable or False,
        capture_intermediates=_capture_filter(layers) if layers else False,
    )
    logits, state = out if mutable else (out, {})
    captured = state.get("intermediates", {})
    features = {name: captured[name]["__call__"][0] for name in layers}
    chex.assert_rank(logits, 2)
    if moments:
        return logits, features, state["batch_stats"], state[BATCH_MOMENTS]
    if train:
        return logits, features, state["batch_stats"]
    return logits, features


class FeatureAdapters(nn.Module):
    """Maps student features to teacher widths: 1x1 conv (no bias) for spatial layers, Dense
    (no bias) for `pooled`, identity where the widths are already equal.

    Attributes:
      student_channels: {layer: student width}.
      teacher_channels: {layer: teacher width}; layers absent here get no adapter.
    """

    student_channels: Mapping[str, int]
    teacher_channels: Mapping[str, int]

    @nn.compact
    def __call__(self, features: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        out = {}
        for name, x in features.items():
            width = self.teacher_channels[name]
            chex.assert_axis_dimension(x, -1, self.student_channels[name])
            if width == self.student_channels[name]:
                out[name] = x
            elif name == "pooled":
                out[name] = nn.Dense(width, use_bias=False, name=name)(x)
            else:
                out[name] = nn.Conv(width, (1, 1), use_bias=False, name=name)(x)
        return out


class ClassAdapters(nn.Module):
    """One FeatureAdapters per feature class of an ensemble whose teacher groups differ in
    feature shape (e.g. ResNet-50 and ResNet-18 teachers; see `distill.feature_classes`).

    Class k's adapters map the student's features to that class's widths. The parameter tree
    is {'class_k': the FeatureAdapters tree of class k}; a class at the student's widths on
    every layer has no parameters and no key. (An ensemble of one feature class uses a plain
    FeatureAdapters, whose tree has no 'class_k' level.)

    Attributes:
      student_channels: {layer: student width}.
      teacher_channels: per class, {layer: that class's teacher width}.
    """

    student_channels: Mapping[str, int]
    teacher_channels: tuple[Mapping[str, int], ...]

    @nn.compact
    def __call__(self, features: Mapping[str, jax.Array]) -> tuple[dict[str, jax.Array], ...]:
        """{layer: [B, ..., Cs]} -> per class k, {layer: [B, ..., C_k]}."""
        return tuple(
            FeatureAdapters(self.student_channels, widths, name=f"class_{k}")(features)
            for k, widths in enumerate(self.teacher_channels)
        )


class CRDHeads(nn.Module):
    """CRD's embedding heads (Tian et al. 2020, their `Embed`: a linear map to `embed_dim`;
    the loss normalises): one for the student's pooled features and one per teacher.

    Parameters: 'student' (Dense Ds -> d) and, for one stack of M teachers of width Dt,
    'teacher_kernel' [M, Dt, d] and 'teacher_bias' [M, d]. Teachers of different pooled widths
    (feature classes, see `distill.feature_classes`) come as one stack per class k of M_k
    teachers of width Dt_k, with heads 'teacher_kernel_k' [M_k, Dt_k, d] and
    'teacher_bias_k' [M_k, d]; their embeddings share the space of dimension d.

    Attributes:
      embed_dim: d, the shared embedding width (CRD's feat_dim, 128).
      num_teachers: M for one stack, or (M_0, M_1, ...) for one stack per feature class; each
        teacher has its own head (their feature spaces are not aligned).
    """

    embed_dim: int
    num_teachers: int | tuple[int, ...]

    @nn.compact
    def __call__(
        self, student: jax.Array, teachers: jax.Array | Sequence[jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        """[B, Ds] student and [M, B, Dt] teachers' pooled features (or, per class k,
        [M_k, B, Dt_k]) -> ([B, d], [M, B, d]) (per-class stacks concatenated in class order,
        M = sum M_k)."""
        per_class = isinstance(self.num_teachers, tuple)
        stacks = tuple(teachers) if per_class else (teachers,)
        sizes = self.num_teachers if per_class else (self.num_teachers,)
        if len(stacks) != len(sizes):
            raise ValueError(f"CRDHeads of {len(sizes)} teacher stacks got {len(stacks)}")
        chex.assert_rank(student, 2)
        chex.assert_rank(list(stacks), 3)
        s = nn.Dense(self.embed_dim, name="student")(student.astype(jnp.float32))
        init = nn.initializers.lecun_normal()

        def stacked_init(k, shape):
            return jax.vmap(lambda kk: init(kk, shape[1:]))(jax.random.split(k, shape[0]))

        out = []
        for k, (x, m) in enumerate(zip(stacks, sizes, strict=True)):
            suffix = f"_{k}" if per_class else ""
            kernel = self.param(
                "teacher_kernel" + suffix, stacked_init, (m, x.shape[-1], self.embed_dim)
            )
            bias = self.param("teacher_bias" + suffix, nn.initializers.zeros, (m, self.embed_dim))
            out.append(jnp.einsum("mbd,mde->mbe", x.astype(jnp.float32), kernel) + bias[:, None])
        return s, jnp.concatenate(out, axis=0) if per_class else out[0]


def create_adapters(student: ResNet, teacher: ResNet, layers: Sequence[str]) -> FeatureAdapters:
    """Adapters from `student` to `teacher` widths for the given layers (gamma > 0 only)."""
    layers = _check_layers(layers)
    s, t = feature_channels(student), feature_channels(teacher)
    return FeatureAdapters(
        student_channels={k: s[k] for k in layers}, teacher_channels={k: t[k] for k in layers}
    )


def create_class_adapters(
    student: ResNet, teachers: Sequence[ResNet], layers: Sequence[str]
) -> ClassAdapters:
    """Adapters from `student` to each feature class's widths, `teachers[k]` a model of
    class k, for the given layers (gamma > 0 only)."""
    layers = _check_layers(layers)
    s = feature_channels(student)
    return ClassAdapters(
        student_channels={k: s[k] for k in layers},
        teacher_channels=tuple({k: feature_channels(t)[k] for k in layers} for t in teachers),
    )
