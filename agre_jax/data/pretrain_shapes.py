"""`pretrain_shapes`: a generic, balanced shape-recognition task to pretrain backbones on (no
files needed), the offline analogue of ImageNet pretraining.

The class y is one of 12 simple shapes (`CLASS_NAMES`: disk, square, bar, triangle, hexagram,
ring, half disk, crescent, L, T, frame, diamond), at a random position, scale and rotation, in a
random colour, over a background texture t of 4 kinds (`TEXTURE_NAMES`: plain, blobs, stripes,
checker), each in two random colours. Every (shape, texture) combination has the same number
of examples in every split, and colours, positions and sizes are drawn independently of both:
nothing in it pairs a shape with a background, and neither the downstream benchmark's shapes
(ellipse, plus-shaped cross) nor its green/brown and blue backgrounds are classes here. The
texture is stored as `place`, and group g = 4 * y + t, so the report's per-group accuracies
say which combinations a network finds hard.

`size` is the number of training examples per combination (validation and test have
`eval_size`); `side` the image side (the downstream's, 32 px by default). Generation is
vectorised numpy (agre_jax/data/drawing.py, shared with `spurious_shapes`) and deterministic
per split, as `spurious_shapes`: split s uses generators seeded with (seed, code(s), ...).
Images are stored losslessly as PNG.

Configs: `default` is registered; other knob values make a `PretrainShapesConfig(...)` named
after its knobs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from agre_jax.data import core, drawing

CLASS_NAMES = (
    "disk",
    "square",
    "bar",
    "triangle",
    "hexagram",
    "ring",
    "half_disk",
    "crescent",
    "l_shape",
    "t_shape",
    "frame",
    "diamond",
)
TEXTURE_NAMES = ("plain", "blobs", "stripes", "checker")
_KNOBS = ("size", "eval_size", "side", "seed", "scale_range", "noise_std")
_TRIANGLE = drawing.regular_polygon(3)
_DIAMOND = np.array([[0.0, -1.0], [0.55, 0.0], [0.0, 1.0], [-0.55, 0.0]])


@dataclasses.dataclass(eq=False)
class PretrainShapesConfig(tfds.core.BuilderConfig):
    """Knobs of the pretraining task; `name` is derived from them when left empty.

    Attributes:
      size: training examples per (shape, texture) combination (48 combinations).
      eval_size: validation and test examples per combination.
      side: image side in pixels.
      seed: generation seed.
      scale_range: (min, max) radius of the disk a shape fits in, as a fraction of `side`.
      noise_std: std of the per-pixel Gaussian noise, in 0-255 units.
    """

    name: str = ""
    size: int = 200
    eval_size: int = 10
    side: int = 32
    seed: int = 0
    scale_range: tuple[float, float] = (0.25, 0.45)
    noise_std: float = 10.0

    def __post_init__(self):
        self.scale_range = tuple(float(s) for s in self.scale_range)
        if not 0 < self.scale_range[0] <= self.scale_range[1] <= 0.5:
            raise ValueError(
                f"scale_range must satisfy 0 < lo <= hi <= 0.5, got {self.scale_range}"
            )
        for key in ("size", "eval_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Bad knobs: {key} is {value!r}; expected an integer >= 1")
        if self.side < 8 or self.noise_std < 0:
            raise ValueError(f"Bad knobs: side {self.side}, noise_std {self.noise_std}")
        if not self.name:
            self.name = core.config_name(f"size{self.size}_px{self.side}", knobs(self))
        if not self.description:
            self.description = f"knobs {knobs(self)}"


def knobs(config: PretrainShapesConfig) -> dict:
    """The numeric knobs of a config, as a plain dict."""
    out = {k: getattr(config, k) for k in _KNOBS}
    out["scale_range"] = list(out["scale_range"])
    return out


def split_group_counts(config: PretrainShapesConfig) -> dict[str, list[int]]:
    """Examples per group (shape, texture) for each split: all equal."""
    groups = len(CLASS_NAMES) * len(TEXTURE_NAMES)
    return {
        split: [config.size if split == "train" else config.eval_size] * groups
        for split in core.SPLITS
    }


def _shape_distance(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (in units of the shape's radius, negative inside) of shape `label` at
    points (u, v) of its own frame; every shape fits in the unit disk."""
    name = CLASS_NAMES[label]
    au, av = np.abs(u), np.abs(v)
    if name == "disk":
        return np.hypot(u, v) - 0.85
    if name == "square":
        return drawing.box_sdf(au - 0.65, av - 0.65)
    if name == "bar":
        return drawing.box_sdf(au - 0.95, av - 0.3)
    if name == "triangle":
        return drawing.polygon_sdf(u, v, _TRIANGLE)
    if name == "hexagram":
        return np.minimum(
            drawing.polygon_sdf(u, v, _TRIANGLE), drawing.polygon_sdf(u, -v, _TRIANGLE)
        )
    if name == "ring":
        return np.abs(np.hypot(u, v) - 0.7) - 0.2
    if name == "half_disk":
        return np.maximum(np.hypot(u, v - 0.35) - 0.9, v - 0.35)
    if name == "crescent":
        return np.maximum(np.hypot(u, v) - 0.85, 0.65 - np.hypot(u - 0.45, v))
    if name == "l_shape":
        return np.minimum(
            drawing.box_sdf(np.abs(u + 0.4) - 0.25, av - 0.75),
            drawing.box_sdf(np.abs(u - 0.1) - 0.55, np.abs(v - 0.5) - 0.25),
        )
    if name == "t_shape":
        return np.minimum(
            drawing.box_sdf(au - 0.7, np.abs(v + 0.5) - 0.25),
            drawing.box_sdf(au - 0.25, np.abs(v - 0.1) - 0.65),
        )
    if name == "frame":
        return np.maximum(
            drawing.box_sdf(au - 0.7, av - 0.7), -drawing.box_sdf(au - 0.38, av - 0.38)
        )
    if name == "diamond":
        return drawing.polygon_sdf(u, v, _DIAMOND)
    raise ValueError(f"unknown shape {label}")


def _shape_coverage(
    rng: np.random.Generator, labels: np.ndarray, side: int, scale_range: tuple[float, float]
) -> np.ndarray:
    """Antialiased coverage [n, side, side] in [0, 1] of the shapes `labels` [n]."""
    n = labels.shape[0]
    radius = rng.uniform(*scale_range, n) * side
    u, v = drawing.placed_frames(rng, n, side, radius)
    r = radius[:, None, None]
    d = np.empty_like(u)
    for k in np.unique(labels):
        sel = labels == k
        d[sel] = _shape_distance(int(k), u[sel] / r[sel], v[sel] / r[sel]) * r[sel]
    return drawing.coverage(d)


def _background(rng: np.random.Generator, textures: np.ndarray, side: int) -> np.ndarray:
    """Backgrounds float [n, side, side, 3] in 0-255: texture t in two random colours."""
    n = textures.shape[0]
    mix = np.zeros((n, side, side, 1))
    for t, fn in ((1, drawing.blob_mix), (2, drawing.wave_mix), (3, drawing.checker_mix)):
        sel = textures == t
        mix[sel] = fn(rng, int(sel.sum()), side)
    first = drawing.random_colours(rng, n)[:, None, None, :]
    second = drawing.random_colours(rng, n)[:, None, None, :]
    return first * (1 - mix) + second * mix


def render(
    rng: np.random.Generator, labels: np.ndarray, textures: np.ndarray, config: PretrainShapesConfig
) -> np.ndarray:
    """Images uint8 [n, side, side, 3] of shapes `labels` [n] over textures `textures` [n]."""
    background = _background(rng, textures, config.side)
    colour = drawing.random_colours(rng, labels.shape[0])[:, None, None, :]
    alpha = _shape_coverage(rng, labels, config.side, config.scale_range)[..., None]
    return drawing.finish(background * (1 - alpha) + colour * alpha, rng, config.noise_std)


def split_arrays(config: PretrainShapesConfig, split: str) -> dict[str, np.ndarray]:
    """The whole split as arrays: image [n, side, side, 3] uint8, label, place, group [n]."""
    return drawing.render_split(
        config.seed,
        core.SPLIT_CODES[split],
        split_group_counts(config)[split],
        len(TEXTURE_NAMES),
        config.side,
        lambda rng, labels, textures: render(rng, labels, textures, config),
    )


class PretrainShapes(tfds.core.GeneratorBasedBuilder):
    """Generic balanced shape classification (12 shapes x 4 textures) for pretraining."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [PretrainShapesConfig(name="default", description="Default knobs.")]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        counts = split_group_counts(config)
        return self.dataset_info_from_configs(
            description=__doc__.split("\n\n")[1] + f"\n\nKnobs: {knobs(config)}",
            features=core.make_features(
                tfds.features.Image(shape=(config.side, config.side, 3), encoding_format="png"),
                CLASS_NAMES,
                TEXTURE_NAMES,
            ),
            metadata=tfds.core.MetadataDict(group_counts=counts, knobs=knobs(config)),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in core.SPLITS}

    def _generate_examples(self, split: str):
        return core.generate_examples(split_arrays(self.builder_config, split), split)
