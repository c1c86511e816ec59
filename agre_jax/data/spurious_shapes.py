"""`spurious_shapes`: the embedded synthetic spurious-correlation benchmark (no files needed).

The class y is a foreground shape: an ellipse (0, 'ellipse') or a plus-shaped cross (1, 'cross')
of equal area, at a random position, scale and rotation, with a random colour, drawn over a
background texture that is the spurious attribute a: 'land' (0, noisy green and brown blobs) or
'water' (1, blue wavy stripes). Group g = 2 * y + a, in Waterbirds' order: ellipse_land,
ellipse_water, cross_land, cross_water. The background is much easier to learn than the shape.

Group sizes follow Waterbirds' counts (`WATERBIRDS_COUNTS`), scaled by `size` (each group
rounded, at least 2). `minority_scale` multiplies the two train minority groups (ellipse on water,
cross on land) to make the correlation weaker (> 1) or stronger (< 1). The core feature's
difficulty is set by `scale_range`, `fg_opacity` and `noise_std`.

Generation is vectorised numpy and deterministic: split s uses generators seeded with
(seed, code(s), ...), so a split's pixels do not depend on which other splits are generated or in
which order. Images are stored losslessly as PNG.

Configs: `default` (the knobs' defaults) is registered; any other knob values make a config with
`SpuriousShapesConfig(size=..., ...)`, whose name is derived from the knobs (so each variant is
cached in its own directory).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from agre_jax.data import core, drawing

CLASS_NAMES = ("ellipse", "cross")
PLACE_NAMES = ("land", "water")
# Waterbirds' group counts (landbird-land, landbird-water, waterbird-land, waterbird-water).
WATERBIRDS_COUNTS = {
    "train": (3498, 184, 56, 1057),
    "validation": (467, 466, 133, 133),
    "test": (2255, 2255, 642, 642),
}
_MINORITY_TRAIN_GROUPS = (1, 2)
_CROSS_ARM = 0.3  # half-width of a cross arm / its half-length.
_ELLIPSE_ASPECT = 0.7  # minor / major semi-axis.
# Ellipse major semi-axis / cross half-length for equal areas: pi a (0.7 a) = 8 r w - 4 w^2.
_ELLIPSE_MAJOR = float(np.sqrt((8 * _CROSS_ARM - 4 * _CROSS_ARM**2) / (np.pi * _ELLIPSE_ASPECT)))
_KNOBS = (
    "size",
    "side",
    "seed",
    "minority_scale",
    "scale_range",
    "fg_opacity",
    "noise_std",
)


@dataclasses.dataclass(eq=False)
class SpuriousShapesConfig(tfds.core.BuilderConfig):
    """Knobs of the synthetic benchmark; `name` is derived from them when left empty.

    Attributes:
      size: fraction of Waterbirds' per-group counts (each group rounded, at least 2).
      side: image side in pixels.
      seed: generation seed.
      minority_scale: factor on the train minority groups (1 = Waterbirds' 184 and 56).
      scale_range: (min, max) shape half-length as a fraction of `side`.
      fg_opacity: opacity of the shape over the background (lower = harder).
      noise_std: std of the per-pixel Gaussian noise, in 0-255 units.
    """

    name: str = ""
    size: float = 1.0
    side: int = 32
    seed: int = 0
    minority_scale: float = 1.0
    scale_range: tuple[float, float] = (0.22, 0.36)
    fg_opacity: float = 1.0
    noise_std: float = 10.0

    def __post_init__(self):
        self.scale_range = tuple(float(s) for s in self.scale_range)
        if not 0 < self.scale_range[0] <= self.scale_range[1] < 0.5:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi < 0.5, got {self.scale_range}")
        if self.size <= 0 or self.side < 8 or self.minority_scale < 0:
            raise ValueError(
                f"Bad knobs: size {self.size}, side {self.side}, "
                f"minority_scale {self.minority_scale}"
            )
        if not self.name:
            self.name = config_name(self)
        if not self.description:
            counts = split_group_counts(self)
            self.description = f"knobs {knobs(self)}\n" + core.describe_counts(
                counts, core.group_names(CLASS_NAMES, PLACE_NAMES)
            )


def knobs(config: SpuriousShapesConfig) -> dict:
    """The numeric knobs of a config, as a plain dict."""
    out = {k: getattr(config, k) for k in _KNOBS}
    out["scale_range"] = list(out["scale_range"])
    return out


def config_name(config: SpuriousShapesConfig) -> str:
    """Deterministic name: readable size and side plus a hash of all the knobs."""
    size = f"{config.size:g}".replace(".", "p")
    return core.config_name(f"size{size}_px{config.side}", knobs(config))


def split_group_counts(config: SpuriousShapesConfig) -> dict[str, list[int]]:
    """Examples per group for each split, from Waterbirds' counts and the knobs."""
    out = {}
    for split, counts in WATERBIRDS_COUNTS.items():
        scaled = []
        for g, c in enumerate(counts):
            factor = config.size
            if split == "train" and g in _MINORITY_TRAIN_GROUPS:
                factor *= config.minority_scale
            scaled.append(max(2, int(round(c * factor))))
        out[split] = scaled
    return out


def _land(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    """Noisy green and brown blobs, float [n, side, side, 3] in 0-255."""
    mix = drawing.blob_mix(rng, n, side)
    green = rng.uniform((30, 95, 15), (80, 155, 55), (n, 1, 1, 3))
    brown = rng.uniform((100, 65, 25), (150, 100, 55), (n, 1, 1, 3))
    return green * (1 - mix) + brown * mix


def _water(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    """Blue wavy stripes, float [n, side, side, 3] in 0-255."""
    mix = drawing.wave_mix(rng, n, side)
    dark = rng.uniform((10, 35, 110), (40, 80, 165), (n, 1, 1, 3))
    light = rng.uniform((80, 140, 200), (140, 200, 250), (n, 1, 1, 3))
    return dark * (1 - mix) + light * mix


def _shape_coverage(
    rng: np.random.Generator, labels: np.ndarray, side: int, scale_range: tuple[float, float]
) -> np.ndarray:
    """Antialiased coverage [n, side, side] in [0, 1] of an ellipse (0) or a cross (1)."""
    n = labels.shape[0]
    r = rng.uniform(*scale_range, n) * side  # cross half-length
    u, v = drawing.placed_frames(rng, n, side, r * np.where(labels == 0, _ELLIPSE_MAJOR, 1.0))
    r = r[:, None, None]
    d = np.empty_like(u)
    e, c = labels == 0, labels == 1
    # Ellipse: first-order signed distance f / |grad f| of f = (u/a)^2 + (v/b)^2 - 1.
    a, b = _ELLIPSE_MAJOR * r[e], _ELLIPSE_MAJOR * _ELLIPSE_ASPECT * r[e]
    f = (u[e] / a) ** 2 + (v[e] / b) ** 2 - 1
    d[e] = f / (2 * np.sqrt((u[e] / a**2) ** 2 + (v[e] / b**2) ** 2) + 1e-6)
    # Cross: exact signed distance of the union of two boxes (half-sizes r x w and w x r).
    au, av, rc = np.abs(u[c]), np.abs(v[c]), r[c]
    w = _CROSS_ARM * rc
    d[c] = np.minimum(drawing.box_sdf(au - rc, av - w), drawing.box_sdf(au - w, av - rc))
    return drawing.coverage(d)


def render(
    rng: np.random.Generator,
    labels: np.ndarray,
    places: np.ndarray,
    config: SpuriousShapesConfig,
) -> np.ndarray:
    """Images uint8 [n, side, side, 3] for classes `labels` [n] on backgrounds `places` [n]."""
    n, side = labels.shape[0], config.side
    water = places == 1
    background = np.empty((n, side, side, 3))
    background[~water] = _land(rng, int(n - water.sum()), side)
    background[water] = _water(rng, int(water.sum()), side)
    colour = drawing.random_colours(rng, n)
    alpha = config.fg_opacity * _shape_coverage(rng, labels, side, config.scale_range)[..., None]
    image = background * (1 - alpha) + colour[:, None, None, :] * alpha
    return drawing.finish(image, rng, config.noise_std)


def split_arrays(config: SpuriousShapesConfig, split: str) -> dict[str, np.ndarray]:
    """The whole split as arrays: image [n, side, side, 3] uint8, label, place, group [n]."""
    return drawing.render_split(
        config.seed,
        core.SPLIT_CODES[split],
        split_group_counts(config)[split],
        len(PLACE_NAMES),
        config.side,
        lambda rng, labels, places: render(rng, labels, places, config),
    )


class SpuriousShapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic spurious correlation: shape = class, background texture = attribute."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [SpuriousShapesConfig(name="default", description="Default knobs.")]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        counts = split_group_counts(config)
        return self.dataset_info_from_configs(
            description=__doc__.split("\n\n")[1]
            + f"\n\nKnobs: {knobs(config)}\nGroup counts:\n"
            + core.describe_counts(counts, core.group_names(CLASS_NAMES, PLACE_NAMES)),
            features=core.make_features(
                tfds.features.Image(shape=(config.side, config.side, 3), encoding_format="png"),
                CLASS_NAMES,
                PLACE_NAMES,
            ),
            metadata=tfds.core.MetadataDict(group_counts=counts, knobs=knobs(config)),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in core.SPLITS}

    def _generate_examples(self, split: str):
        return core.generate_examples(split_arrays(self.builder_config, split), split)
