"""`colored_mnist`: Colored MNIST as in AGRE-KD (following Nam et al. 2020, LfF).

Class y: the digit (10 classes). Attribute a = `place`: the colour index (10 values); group
g = 10 * y + a (100 groups). Ten fixed RGB means (`COLORS`, one per digit); each example's colour
is Gaussian around its colour mean (std `color_std`, LfF's 'severity 4' = 0.005 by default),
clipped to [0, 1] and multiplied into the grey digit (black background).

- train: MNIST train's first 90 % (54,000 images). In each class, (1 - aligned_ratio) * n
  examples (rounded half up), chosen at random, are bias-conflicting (a uniformly random
  *other* colour); the rest get their digit's colour.
- validation: MNIST train's last 10 % (6,000 images), unbiased (colour uniform over all ten).
- test: MNIST test (10,000 images), unbiased.

Configs: aligned_99_5, aligned_99, aligned_98, aligned_95 (the paper's four bias-aligned
ratios). Needs TFDS' `mnist` prepared in the same data_dir (run
`tfds.builder('mnist', data_dir=...).download_and_prepare()` once where there is internet).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from agre_jax.data import core

CLASS_NAMES = tuple(f"digit{i}" for i in range(10))
PLACE_NAMES = (
    "red",
    "green",
    "blue",
    "yellow",
    "magenta",
    "cyan",
    "orange",
    "purple",
    "olive",
    "grey",
)
# Colour means in [0, 1], one per digit; fixed across all experiments.
COLORS = np.array(
    [
        [0.90, 0.10, 0.10],
        [0.10, 0.75, 0.15],
        [0.15, 0.30, 0.95],
        [0.95, 0.85, 0.10],
        [0.85, 0.15, 0.85],
        [0.10, 0.85, 0.85],
        [0.95, 0.55, 0.10],
        [0.50, 0.25, 0.80],
        [0.50, 0.55, 0.10],
        [0.60, 0.60, 0.60],
    ]
)
VALIDATION_FRACTION = 0.1  # the last 10 % of MNIST train


@dataclasses.dataclass(eq=False)
class ColoredMnistConfig(tfds.core.BuilderConfig):
    """Knobs; `name` is derived from them when left empty.

    Attributes:
      aligned_ratio: fraction of bias-aligned train examples (in each class).
      color_std: std of the Gaussian colour around its mean (colours in [0, 1]).
      seed: generation seed.
    """

    name: str = ""
    aligned_ratio: float = 0.995
    color_std: float = 0.005
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.aligned_ratio <= 1 or self.color_std < 0:
            raise ValueError(
                f"Bad knobs: aligned_ratio {self.aligned_ratio}, color_std {self.color_std}"
            )
        if not self.name:
            name = f"aligned{self.aligned_ratio:g}_std{self.color_std:g}_seed{self.seed}"
            self.name = name.replace(".", "p").replace("-", "m")


def load_mnist(data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """TFDS' prepared `mnist`: {'train'|'test': (images uint8 [n, 28, 28], labels int [n])}.

    Raises:
      DataError: if `mnist` is not prepared in `data_dir`.
    """
    try:
        splits = tfds.load("mnist", split=["train", "test"], data_dir=data_dir, download=False)
    except (AssertionError, ValueError, OSError) as e:
        raise core.DataError(
            f"colored_mnist needs TFDS' mnist prepared in {data_dir} (run "
            f"tfds.builder('mnist', data_dir=...).download_and_prepare() once): {e}"
        ) from e
    out = {}
    for name, ds in zip(("train", "test"), splits, strict=True):
        batches = list(tfds.as_numpy(ds.batch(10_000)))
        images = np.concatenate([b["image"] for b in batches])[..., 0]
        out[name] = (images, np.concatenate([b["label"] for b in batches]).astype(np.int64))
    return out


def colour_indices(
    labels: np.ndarray, aligned_ratio: float | None, rng: np.random.Generator
) -> np.ndarray:
    """Colour index [n] per example: biased (exact conflict count per class) or uniform (None)."""
    if aligned_ratio is None:
        return rng.integers(0, 10, labels.shape[0])
    colours = labels.copy()
    for c in range(10):
        members = np.flatnonzero(labels == c)
        n_conflict = int(np.floor(round((1 - aligned_ratio) * members.size, 6) + 0.5))
        chosen = rng.permutation(members)[:n_conflict]
        colours[chosen] = (c + rng.integers(1, 10, n_conflict)) % 10  # uniform other colour
    return colours


def colorize(
    digits: np.ndarray, colours: np.ndarray, color_std: float, rng: np.random.Generator
) -> np.ndarray:
    """uint8 [n, 28, 28, 3]: grey digits [n, 28, 28] times a Gaussian colour around COLORS[a]."""
    rgb = np.clip(COLORS[colours] + rng.normal(0, color_std, (colours.size, 3)), 0, 1)
    image = digits[..., None].astype(np.float64) * rgb[:, None, None, :]
    return np.round(image).astype(np.uint8)


def split_arrays(
    config: ColoredMnistConfig, mnist: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, dict[str, np.ndarray]]:
    """All three splits as arrays: {split: {'image', 'label', 'place', 'group', 'source_index'}}."""
    train_images, train_labels = mnist["train"]
    n_train = train_labels.size - int(round(VALIDATION_FRACTION * train_labels.size))
    test_images, test_labels = mnist["test"]
    sources = {
        "train": (train_images[:n_train], train_labels[:n_train], np.arange(n_train)),
        "validation": (
            train_images[n_train:],
            train_labels[n_train:],
            np.arange(n_train, train_labels.size),
        ),
        "test": (test_images, test_labels, np.arange(test_labels.size)),
    }
    out = {}
    for split, (images, labels, index) in sources.items():
        rng = np.random.default_rng([config.seed, core.SPLIT_CODES[split]])
        ratio = config.aligned_ratio if split == "train" else None
        colours = colour_indices(labels, ratio, rng)
        out[split] = {
            "image": colorize(images, colours, config.color_std, rng),
            "label": labels,
            "place": colours,
            "group": 10 * labels + colours,
            "source_index": index,
        }
    return out


class ColoredMnist(tfds.core.GeneratorBasedBuilder):
    """Colored MNIST: digit (class) vs colour (spurious attribute)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        ColoredMnistConfig(name=f"aligned_{r}", aligned_ratio=float(r.replace("_", ".")) / 100)
        for r in ("99_5", "99", "98", "95")
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return self.dataset_info_from_configs(
            description=__doc__.split("\n\n")[1]
            + f"\n\nBias-aligned train ratio {config.aligned_ratio}, colour std "
            f"{config.color_std}. Group counts per split: info.metadata['group_counts'].",
            features=core.make_features(
                tfds.features.Image(shape=(28, 28, 3), encoding_format="png"),
                CLASS_NAMES,
                PLACE_NAMES,
            ),
            metadata=tfds.core.MetadataDict(),
            homepage="https://arxiv.org/abs/2411.14984",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # built from TFDS' mnist
        arrays = split_arrays(self.builder_config, load_mnist(str(self.data_dir_root)))
        self.info.metadata["group_counts"] = {
            s: core.count_groups(a["group"], 100) for s, a in arrays.items()
        }
        return {s: self._generate_examples(s, a) for s, a in arrays.items()}

    def _generate_examples(self, split: str, arrays: dict[str, np.ndarray]):
        mnist_split = "test" if split == "test" else "train"
        for i in range(arrays["group"].size):
            yield (
                i,
                {
                    "image": core.png_bytes(arrays["image"][i]),
                    "label": int(arrays["label"][i]),
                    "place": int(arrays["place"][i]),
                    "group": int(arrays["group"][i]),
                    "id": f"mnist_{mnist_split}_{int(arrays['source_index'][i]):05d}",
                },
            )
