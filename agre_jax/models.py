"""Flax ResNets with torchvision semantics, captured intermediates and feature adapters.

The parameter tree mirrors torchvision's state_dict so that `convert/` is a plain key table:
`conv1`, `bn1`, `layer{k}/{i}/{conv1,bn1,conv2,bn2[,conv3,bn3],downsample_conv,downsample_bn}`,
`fc`. Inputs are NHWC. Padding is explicit and symmetric everywhere (torch pads (1, 1) on a
stride-2 3x3 conv where 'SAME' would pad (0, 1)).

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

LAYERS = ("layer1", "layer2", "layer3", "layer4", "pooled")
SPATIAL_LAYERS = LAYERS[:4]
ARCHS = ("resnet18", "resnet34", "resnet50")

# torch BatchNorm: momentum 0.1 weights the new batch; flax weights the running value.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's init


class BasicBlock(nn.Module):
    """torchvision BasicBlock: two 3x3 convs, expansion 1."""

    planes: int
    strides: int
    downsample: bool
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.conv(self.planes, (3, 3), self.strides, padding=((1, 1), (1, 1)), name="conv1")(
            x
        )
        out = nn.relu(self.norm(name="bn1")(out))
        out = self.conv(self.planes, (3, 3), 1, padding=((1, 1), (1, 1)), name="conv2")(out)
        out = self.norm(name="bn2")(out)
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
        out = self.norm(name="bn3")(out)
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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_channels = self.planes * self.block_cls.expansion
        for i in range(self.num_blocks):
            strides = self.strides if i == 0 else 1
            downsample = i == 0 and (strides != 1 or x.shape[-1] != out_channels)
            x = self.block_cls(self.planes, strides, downsample, self.conv, self.norm, name=str(i))(
                x
            )
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
    """

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int
    width: int = 64
    small_input: bool = False
    dtype: Any = jnp.float32
    bn_momentum: float = BN_MOMENTUM
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B, H, W, 3] images -> [B, num_classes] float32 logits."""
        chex.assert_rank(x, 4)
        conv = functools.partial(
            nn.Conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_CONV_INIT,
        )
        norm = functools.partial(
            nn.BatchNorm,
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


def init(model: ResNet, rng: jax.Array, image_size: int) -> dict[str, Any]:
    """Initial variables {'params', 'batch_stats'} for [1, image_size, image_size, 3] inputs."""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return dict(jax.jit(functools.partial(model.init, train=False))(rng, dummy))


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
) -> tuple[jax.Array, dict[str, jax.Array]] | tuple[jax.Array, dict[str, jax.Array], Any]:
    """Runs `model` and returns its logits and the requested captured layers.

    Args:
      model: a ResNet from `create`.
      variables: {'params', 'batch_stats'}.
      images: [B, H, W, 3].
      train: training mode (batch statistics, running averages updated).
      layers: any subset of LAYERS.

    Returns:
      (logits [B, C] float32, {layer: [B, h, w, c] or [B, c]}), plus the new batch_stats
      when `train`.
    """
    layers = _check_layers(layers)
    mutable = ["batch_stats"] if train else []
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


def create_adapters(student: ResNet, teacher: ResNet, layers: Sequence[str]) -> FeatureAdapters:
    """Adapters from `student` to `teacher` widths for the given layers (gamma > 0 only)."""
    layers = _check_layers(layers)
    s, t = feature_channels(student), feature_channels(teacher)
    return FeatureAdapters(
        student_channels={k: s[k] for k in layers}, teacher_channels={k: t[k] for k in layers}
    )
