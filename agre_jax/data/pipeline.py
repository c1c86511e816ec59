"""Input pipeline: deterministic, resumable tf.data batches from the TFDS builders.

A split is read once into memory (`load_split`): decoded uint8 images when they have a static
shape and fit in `max_decoded_bytes` (the synthetic data, Colored MNIST), else the encoded
JPEG/PNG bytes (Waterbirds, CelebA), decoded per example on every pass.

Training is organised in epochs of `steps_per_epoch = num_examples // global_batch` steps (the
remainder is dropped). The order of epoch e (a permutation, or a group-balanced draw) and all
augmentation randomness (crop boxes, flips) are drawn in numpy from (seed, e) alone, per position
in the epoch, before TensorFlow sees them; TF then applies them deterministically. So
`train_epoch(..., start_step=k)` yields exactly the batches k, k+1, ... of the uninterrupted
epoch, and the batches do not depend on the number of processes or devices.

Public API:
  load_builder(name, *, data_dir, manual_dir=None, config=None) -> tfds builder (prepared)
  load_split(builder, split='train') -> SplitData (cached in memory per prepared split)
  steps_per_epoch(num_examples, batch_size) -> int
  split_halves(groups, seed) -> (first_half, second_half) indices, stratified by group
  train_epoch(source, *, batch_size, image_size, seed, epoch, start_step=0, ...,
              eval_transform='resize_crop') -> batches
  eval_batches(source, *, batch_size, image_size, split='test', ...,
               eval_transform='resize_crop') -> batches with `mask`

Batches are dicts: `image` [B, S, S, 3] float32 or bfloat16, ImageNet-normalised; `label`,
`group`, `place` and `index` (the example's position in the split) int32 [B]; eval batches add
`mask` float32 [B] (1 real, 0 padding; padding has index -1). With `num_devices=D` every array is
[D, B / D, ...] for pmap. `batch_size` is always the global batch over all processes: process p
of P receives columns [p * B / P, (p + 1) * B / P) of every global batch.

The device path (`train_epoch(..., cache=...)`, agre_jax/data/device_input.py) yields the
same examples with uint8 images from a decode-once cache plus the augmentation parameters; the
compiled step applies them (`device_input.augment`).

Augmentation (training): RandomResizedCrop (area 0.7-1.0, aspect ratio 3/4-4/3, 10 tries, else
the whole image) to `image_size`, bilinear, plus horizontal flip with probability 1/2. Decoded
splits resample with `tf.image.crop_and_resize` (window corners on pixel centres) from images
padded with a copy of their edge, so every sample reads inside the image (positions clamped);
encoded ones decode the window and resize it with `tf.image.resize` (half-pixel centres).
Evaluation (and `augment=False`), `eval_transform`: 'resize_crop' (default, torchvision's ImageNet
recipe) resizes the shorter side to round(image_size * 256 / 224), 'square_resize_crop' (DFR's and
group_DRO's recipe, `Resize((256, 256))` at 224 px) resizes to that square; both bilinear,
antialiased, then the central `image_size` square. Both follow torchvision's size and offset
rounding (tested against torchvision).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from agre_jax.data import core, folder

try:  # TF must never take the accelerator from JAX.
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # already initialised, or no GPU support
    pass

MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)
CROP_AREA = (0.7, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10
EVAL_RESIZE_RATIO = 256 / 224
# Version of the training augmentation of decoded in-memory splits (`_batch_fn`), part of the
# data's stage key (stages.Dataset.key): results trained on other versions are not reused.
# 2: images padded with a copy of their edge before crop_and_resize (`_corner_pad`). Version 1
# let float rounding put the last sample of windows ending at the last row or column past
# it, and crop_and_resize filled that output line with 0: 3.6 % of crops at 32 -> 32 px,
# 27 % at 32 -> 24 px, none measured at 28 or 224 px.
AUGMENT_VERSION = 2
# Evaluation transforms (also training without augmentation), see `_eval_resize`.
EVAL_TRANSFORMS = ("resize_crop", "square_resize_crop")
_CACHE_SIZE = 8
_PARAMS = ("gather", "area", "log_ratio", "offset", "flip")  # inputs of the image transform
_SPLIT_CACHE: collections.OrderedDict = collections.OrderedDict()
_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # SplitData -> sha256
Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class SplitData:
    """One split in memory.

    Attributes:
      images: tf.Tensor, uint8 [n, H, W, 3] if `encoding` is None, else string [n] of
        `encoding` ('jpeg' or 'png') bytes.
      label, place, group: int32 [n].
      ids: object [n] of example ids (traceability).
      num_groups: number of groups (the `group` ClassLabel's size).
      encoding: None for decoded images, else the file format of `images`.
    """

    images: tf.Tensor
    label: np.ndarray
    place: np.ndarray
    group: np.ndarray
    ids: np.ndarray
    num_groups: int
    encoding: str | None

    @property
    def num_examples(self) -> int:
        return int(self.label.shape[0])

    def group_counts(self) -> np.ndarray:
        """Examples per group [num_groups] (int64)."""
        return np.bincount(self.group, minlength=self.num_groups)


def _canonical_config(builder_cls: type, config: Any) -> Any:
    """Map a knob dict or a config equal to a registered one onto that registered config."""
    registered = list(getattr(builder_cls, "BUILDER_CONFIGS", []) or [])
    if config is None or isinstance(config, str) or not registered:
        return config
    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    config_cls = type(registered[0])
    if not isinstance(config, tfds.core.BuilderConfig):  # a dict or an ml_collections ConfigDict
        config = config_cls(**dict(config))

    def knobs(c):
        return {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name not in base}

    for r in registered:
        if type(r) is type(config) and knobs(r) == knobs(config):
            return r.name
    return config


class _DropTfdsLogs(logging.Filter):
    """Drops TFDS' absl log records below ERROR (custom-config and missing-info warnings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "tensorflow_datasets" not in record.pathname


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
    """TFDS without its output: no progress bars, no 'Downloading and preparing dataset ...'
    lines (printed on stdout, which is swallowed while preparing), no warnings below ERROR.

    Everything is restored on exit. TensorFlow's C++ log lines are not affected: they obey
    TF_CPP_MIN_LOG_LEVEL, read when TensorFlow is first imported.
    """
    absl_logger = logging.getLogger("absl")
    log_filter = _DropTfdsLogs()
    progress = getattr(tqdm_utils, "_active", True)  # no public getter
    absl_logger.addFilter(log_filter)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(progress)
        absl_logger.removeFilter(log_filter)


def load_builder(
    name: str,
    *,
    data_dir: str | None,
    manual_dir: str | None = None,
    config: str | tfds.core.BuilderConfig | Mapping[str, Any] | None = None,
) -> tfds.core.DatasetBuilder:
    """The builder `name` in `data_dir`, prepared first if needed, without TFDS output.

    A folder builder (`waterbirds`, `celeba_groups`) records the folder it was prepared from and
    a digest of its contents (`info.metadata['source_folder']`, `['source_digest']`). When such
    a builder is already prepared and `manual_dir` is given, the digest of `manual_dir` must
    match: the same contents at another path are fine, other contents are refused.

    Args:
      name: 'spurious_shapes', 'waterbirds', 'celeba_groups', 'colored_mnist' or any TFDS name.
      data_dir: TFDS data directory (None: TFDS' default, ~/tensorflow_datasets).
      manual_dir: folder with the manually downloaded files (default
        `<data_dir>/downloads/manual`).
      config: a config name, a BuilderConfig, or a dict of knobs for the builder's config class
        (e.g. {'size': 0.5, 'side': 64} for spurious_shapes); knobs equal to a registered
        config's select that config.

    Raises:
      DataError: if a manual dataset is missing or malformed (nothing is left prepared), or if
        `data_dir` holds it prepared from a folder whose contents differ from `manual_dir`'s
        (or prepared by older code, without a record of its source).
    """
    with quiet_tfds():
        config = _canonical_config(tfds.builder_cls(name), config)
        builder = tfds.builder(name, data_dir=data_dir, config=config)
        if not builder.is_prepared():
            download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
            with contextlib.redirect_stdout(io.StringIO()):
                builder.download_and_prepare(download_config=download_config)
        elif manual_dir is not None and isinstance(builder, folder.FolderBuilder):
            _check_source(builder, manual_dir)
    return builder


def _check_source(builder: folder.FolderBuilder, manual_dir: str) -> None:
    """Raises DataError unless `manual_dir` has the contents `builder` was prepared from."""
    metadata = builder.info.metadata or {}
    recorded = metadata.get(folder.SOURCE_FOLDER)
    fix = (
        f"use another data.data_dir, or remove {builder.data_path} to prepare it again from "
        f"{manual_dir}."
    )
    if recorded is None or folder.SOURCE_DIGEST not in metadata:
        raise core.DataError(
            f"The data_dir already holds {builder.name} prepared by an older version of this "
            f"code, with no source record (metadata '{folder.SOURCE_FOLDER}' and "
            f"'{folder.SOURCE_DIGEST}'), so it cannot be checked against manual_dir "
            f"{manual_dir}: {fix}"
        )
    try:
        current = type(builder).source_record(manual_dir)
    except core.DataError as e:
        raise core.DataError(
            f"The data_dir already holds {builder.name} prepared from {recorded}, and manual_dir "
            f"{manual_dir} cannot be checked against it ({e.args[0].splitlines()[0]}): set "
            f"data.manual_dir to the folder it was prepared from, or leave it empty to use the "
            f"prepared data as it is."
        ) from e
    if current[folder.SOURCE_DIGEST] != metadata[folder.SOURCE_DIGEST]:
        raise core.DataError(
            f"The data_dir already holds {builder.name} prepared from {recorded}, and "
            f"{manual_dir} has different contents (label files or image file names and sizes); "
            f"{fix}"
        )


def _config_knobs(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
    """The builder config's own fields (not its name or description), {} without a config."""
    config = builder.builder_config
    if config is None:
        return {}
    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}  # name, description, ...
    fields = dataclasses.fields(config)
    return {f.name: getattr(config, f.name) for f in fields if f.name not in base}


def _split_digest(data: SplitData) -> bytes:
    """sha256 of one split's content: labels, places, groups, ids and the image data."""
    cached = _DIGESTS.get(data)
    if cached is not None:
        return cached
    h = hashlib.sha256()

    def add(tag: str, payload: bytes) -> None:
        h.update(f"{tag} {len(payload)}\n".encode())
        h.update(payload)

    for tag, array in (("label", data.label), ("place", data.place), ("group", data.group)):
        add(tag, np.ascontiguousarray(array, dtype="<i4").tobytes())
    add("num_groups", str(data.num_groups).encode())
    add("ids", "\n".join(data.ids).encode())  # ids hold no newline (file names, indices)
    add("encoding", str(data.encoding).encode())
    images = data.images.numpy()
    if data.encoding is None:
        add("shape", str(images.shape).encode())
        add("images", np.ascontiguousarray(images).tobytes())
    else:
        for encoded in images:
            add("image", encoded)
    _DIGESTS[data] = digest = h.digest()
    return digest


def fingerprint(builder: tfds.core.DatasetBuilder, splits: Mapping[str, SplitData]) -> str:
    """A digest (16 hex characters of a sha256) that identifies prepared data by content.

    It covers the builder's name, version and config knobs and, for every split of `splits`
    (in name order), its name, label, place and group arrays, ids and image data (decoded
    pixels, or each example's encoded bytes). It does not depend on `data_dir`, `manual_dir` or
    any other path: the same data prepared twice gives the same fingerprint. Each split's
    digest is computed once per `SplitData` object (about 0.1 s for the synthetic default).
    """
    h = hashlib.sha256()
    head = {
        "name": builder.name,
        "version": str(builder.version),
        "config": _config_knobs(builder),
    }
    h.update(json.dumps(head, sort_keys=True, default=repr).encode())
    for name in sorted(splits):
        h.update(f"\nsplit {name}\n".encode())
        h.update(_split_digest(splits[name]))
    return h.hexdigest()[:16]


def load_split(
    builder: tfds.core.DatasetBuilder, split: str = "train", *, max_decoded_bytes: int = 2**30
) -> SplitData:
    """Reads a prepared split (TFDS slicing such as 'validation[:50%]' works) into memory.

    Decoded images are kept when the image feature has a static shape and the split fits in
    `max_decoded_bytes`; otherwise the encoded bytes. Cached per (prepared data path, split).
    """
    key = (str(builder.data_path), split, max_decoded_bytes)
    if key in _SPLIT_CACHE:
        _SPLIT_CACHE.move_to_end(key)
        return _SPLIT_CACHE[key]
    feature = builder.info.features["image"]
    n = builder.info.splits[split].num_examples
    shape = feature.shape
    decode = None not in shape and n * math.prod(shape) <= max_decoded_bytes
    decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
    columns = collections.defaultdict(list)
    with quiet_tfds():
        ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
        for batch in tfds.as_numpy(ds.batch(1024)):
            for k in ("image", "label", "place", "group", "id"):
                columns[k].append(batch[k])
    if not columns:
        raise core.DataError(f"Split {split!r} of {builder.info.full_name} is empty.")
    images = np.concatenate(columns["image"])
    data = SplitData(
        images=tf.constant(images),
        label=np.concatenate(columns["label"]).astype(np.int32),
        place=np.concatenate(columns["place"]).astype(np.int32),
        group=np.concatenate(columns["group"]).astype(np.int32),
        ids=np.array([i.decode() for i in np.concatenate(columns["id"])], dtype=object),
        num_groups=builder.info.features["group"].num_classes,
        encoding=None if decode else feature.encoding_format or "png",
    )
    _SPLIT_CACHE[key] = data
    while len(_SPLIT_CACHE) > _CACHE_SIZE:
        _SPLIT_CACHE.popitem(last=False)
    return data


def _as_split(source: SplitData | tfds.core.DatasetBuilder, split: str) -> SplitData:
    return source if isinstance(source, SplitData) else load_split(source, split)


def steps_per_epoch(num_examples: int | SplitData, batch_size: int) -> int:
    """Steps per epoch, num_examples // batch_size (global batch; the remainder is dropped)."""
    if isinstance(num_examples, SplitData):
        num_examples = num_examples.num_examples
    return int(num_examples) // batch_size


def split_halves(groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of examples into two halves, stratified by group.

    Each group's examples are shuffled with (seed) and the first floor(n_g / 2) go to the first
    half (DFR: last-layer training), the rest to the second (DFR: model selection).

    Args:
      groups: int [n], the group of each example of the split.
    Returns:
      Two sorted int64 index arrays that partition range(n).
    """
    rng = np.random.default_rng([seed, 7])
    first, second = [], []
    for g in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == g))
        first.append(members[: members.size // 2])
        second.append(members[members.size // 2 :])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def epoch_order(
    groups: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    balanced: bool = False,
    indices: np.ndarray | None = None,
) -> np.ndarray:
    """Example indices [steps_per_epoch * batch_size] of epoch `epoch`, a function of (seed, epoch).

    Plain: a permutation of `indices` (default all), truncated to whole batches. Balanced: for
    every position a group drawn uniformly among the groups present, then an example of that
    group uniformly (with replacement).
    """
    pool = np.arange(groups.shape[0]) if indices is None else np.asarray(indices, np.int64)
    n = steps_per_epoch(pool.size, batch_size) * batch_size
    if n == 0:
        raise ValueError(f"{pool.size} examples make no batch of {batch_size}.")
    rng = np.random.default_rng([seed, epoch, 0])
    if not balanced:
        return rng.permutation(pool)[:n]
    pool_groups = groups[pool]
    present, sizes = np.unique(pool_groups, return_counts=True)
    members = pool[np.argsort(pool_groups, kind="stable")]  # grouped by group id, in order
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    which = rng.integers(0, present.size, n)
    offset = np.floor(rng.random(n) * sizes[which]).astype(np.int64)
    return members[starts[which] + offset]


def _augment_params(n: int, seed: int, epoch: int) -> dict[str, np.ndarray]:
    """Per-position crop candidates and flips of an epoch: area, log_ratio [n, T], offset [n, 2]."""
    rng = np.random.default_rng([seed, epoch, 1])
    log_ratio = np.log(CROP_RATIO)
    return {
        "area": rng.uniform(*CROP_AREA, (n, CROP_TRIES)).astype(np.float32),
        "log_ratio": rng.uniform(*log_ratio, (n, CROP_TRIES)).astype(np.float32),
        "offset": rng.random((n, 2)).astype(np.float32),
        "flip": rng.random(n) < 0.5,
    }


def _crop_window(height, width, area, log_ratio, offset):
    """RandomResizedCrop window (y, x, h, w) as int32, for height/width [...] and params [..., T].

    The first of the T candidates (area fraction, log aspect ratio) that fits is taken; if none
    fits, the whole image.
    """
    height = tf.cast(height, tf.float32)
    width = tf.cast(width, tf.float32)
    target = area * (height * width)[..., None]
    ratio = tf.exp(log_ratio)
    w = tf.round(tf.sqrt(target * ratio))
    h = tf.round(tf.sqrt(target / ratio))
    ok = (w <= width[..., None]) & (h <= height[..., None]) & (w > 0) & (h > 0)
    first = tf.argmax(tf.cast(ok, tf.int32), axis=-1)
    found = tf.reduce_any(ok, axis=-1)
    w = tf.where(found, tf.gather(w, first, batch_dims=len(w.shape) - 1), width)
    h = tf.where(found, tf.gather(h, first, batch_dims=len(h.shape) - 1), height)
    y = tf.floor(offset[..., 0] * (height - h + 1))
    x = tf.floor(offset[..., 1] * (width - w + 1))
    return tuple(tf.cast(v, tf.int32) for v in (y, x, h, w))


def _corner_pad(size: int) -> int:
    """Pixels `_batch_fn` appends to an image axis of `size` pixels (>= 1) before
    `tf.image.crop_and_resize`: the padded axis has 2^k + 1 pixels, 2^k the smallest power of
    two >= size (32 -> 1, 28 -> 5, 224 -> 33), so box coordinates pixel / 2^k are exact and
    every sample of a window inside the image, rounding included, lies inside the padded
    image (at most the first appended pixel, a copy of the edge, is read)."""
    return (1 << (size - 1).bit_length()) + 1 - size


def _normalize(images: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """uint8/float [..., 3] in 0-255 -> ImageNet-normalised `dtype`."""
    images = tf.cast(images, tf.float32) / 255.0
    images = (images - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)
    return tf.cast(images, dtype)


def _eval_resize(images: tf.Tensor, image_size: int, transform: str = "resize_crop") -> tf.Tensor:
    """The evaluation transform of [..., H, W, 3] (before normalisation), as torchvision does it.

    With R = round(image_size * 256 / 224): 'resize_crop' resizes the shorter side to R, the
    longer to floor(R * long / short) (torchvision's `Resize(R)`); 'square_resize_crop' resizes to
    R x R (`Resize((R, R))`, the DFR / group_DRO recipe). Both resample bilinearly with
    antialiasing, then take the central `image_size` square (`CenterCrop`: offsets
    round((R - image_size) / 2), half to even).
    """
    shape = tf.shape(images)
    height, width = shape[-3], shape[-2]
    target = round(image_size * EVAL_RESIZE_RATIO)
    if transform == "square_resize_crop":
        new_h = new_w = tf.constant(target, tf.int32)
    else:
        short, long = tf.minimum(height, width), tf.maximum(height, width)
        # int(target * long / short) in float64, exactly as Python computes it.
        scaled = tf.cast(long, tf.float64) * target / tf.cast(short, tf.float64)
        new_long = tf.cast(tf.floor(scaled), tf.int32)
        new_h = tf.where(height <= width, target, new_long)
        new_w = tf.where(height <= width, new_long, target)
    images = tf.image.resize(images, [new_h, new_w], method="bilinear", antialias=True)

    def offset(size):
        return tf.cast(tf.round(tf.cast(size - image_size, tf.float64) / 2), tf.int32)

    top, left = offset(new_h), offset(new_w)
    images = images[..., top : top + image_size, left : left + image_size, :]
    return tf.ensure_shape(images, [*images.shape[:-3], image_size, image_size, 3])


def _check_eval_transform(eval_transform: str) -> None:
    if eval_transform not in EVAL_TRANSFORMS:
        raise ValueError(
            f"Unknown eval_transform {eval_transform!r}: expected one of {EVAL_TRANSFORMS}."
        )


def _decode(data: tf.Tensor, encoding: str) -> tf.Tensor:
    if encoding == "jpeg":
        return tf.io.decode_jpeg(data, channels=3)
    return tf.io.decode_image(data, channels=3, expand_animations=False)


def _example_fn(
    data: SplitData, image_size: int, augment: bool, dtype: tf.DType, eval_transform: str
):
    """Per-example transform of encoded images: element dict -> image [S, S, 3] of `dtype`."""

    def fn(el):
        encoded = tf.gather(data.images, el["gather"])
        if not augment:
            image = _eval_resize(_decode(encoded, data.encoding), image_size, eval_transform)
        else:
            if data.encoding == "jpeg":
                shape = tf.image.extract_jpeg_shape(encoded)
            else:
                decoded = _decode(encoded, data.encoding)
                shape = tf.shape(decoded)
            y, x, h, w = _crop_window(shape[0], shape[1], el["area"], el["log_ratio"], el["offset"])
            if data.encoding == "jpeg":
                image = tf.image.decode_and_crop_jpeg(encoded, tf.stack([y, x, h, w]), channels=3)
            else:
                image = decoded[y : y + h, x : x + w]
            image = tf.image.resize(image, [image_size, image_size], method="bilinear")
            image = tf.cond(el["flip"], lambda: tf.reverse(image, axis=[1]), lambda: image)
        return _normalize(image, dtype)

    return fn


def _batch_fn(
    data: SplitData, image_size: int, augment: bool, dtype: tf.DType, eval_transform: str
):
    """Whole-batch transform of decoded images (static shape): batch dict -> image [B, S, S, 3].

    Training windows are resampled by `tf.image.crop_and_resize` (corners on pixel centres)
    from the images padded by `_corner_pad` rows and columns, the first a copy of the edge: the
    values of a bilinear crop whose sample positions are clamped into the image
    (AUGMENT_VERSION 2).
    """
    height, width = data.images.shape[1:3]

    def fn(el):
        images = tf.gather(data.images, el["gather"])
        if not augment:
            return _normalize(_eval_resize(images, image_size, eval_transform), dtype)
        b = tf.shape(el["gather"])[0]
        y, x, h, w = _crop_window(
            tf.fill([b], height), tf.fill([b], width), el["area"], el["log_ratio"], el["offset"]
        )
        # crop_and_resize maps box coordinate t to pixel t * (size - 1) (pixel centres) and
        # fills an output line whose sample lies past the last pixel with 0. The images get
        # `_corner_pad` rows and columns at the end, the first a copy of the edge (`padded - 1`
        # a power of two: the boxes are exact binary fractions): float rounding can put the
        # last sample of a window ending at the last pixel a hair past it, never past that
        # copy, and there it reads the edge value, as if clamped into the image.
        pad_h, pad_w = _corner_pad(height), _corner_pad(width)
        last_h, last_w = height + pad_h - 1, width + pad_w - 1
        y, x, h, w = (tf.cast(v, tf.float32) for v in (y, x, h, w))
        boxes = tf.stack(
            [y / last_h, x / last_w, (y + h - 1) / last_h, (x + w - 1) / last_w], axis=1
        )
        # A copy of the last row and column, then zeros, never read (tf.pad's SYMMETRIC mode
        # took 8x longer at 224 px); uint8 in, float32 out: no cast of the whole images.
        images = tf.concat([images, images[:, -1:]], axis=1)
        images = tf.concat([images, images[:, :, -1:]], axis=2)
        images = tf.pad(images, [[0, 0], [0, pad_h - 1], [0, pad_w - 1], [0, 0]])
        images = tf.image.crop_and_resize(images, boxes, tf.range(b), [image_size, image_size])
        images = tf.where(el["flip"][:, None, None, None], tf.reverse(images, axis=[2]), images)
        return _normalize(images, dtype)

    return fn


def _dataset(
    data: SplitData,
    columns: dict[str, np.ndarray],
    image_size: int,
    augment: bool,
    dtype,
    eval_transform: str,
) -> tf.data.Dataset:
    """Per-batch columns [steps, b, ...] -> tf.data of batch dicts (image, label, group, ...)."""
    dtype = tf.as_dtype(np.dtype(dtype))
    gather = columns["gather"]
    labels = {
        "label": data.label[gather],
        "group": data.group[gather],
        "place": data.place[gather],
        **{k: v for k, v in columns.items() if k in ("index", "mask")},
    }
    params = {k: v for k, v in columns.items() if k in _PARAMS}
    ds = tf.data.Dataset.from_tensor_slices((params, labels))
    if data.encoding is None:
        fn = _batch_fn(data, image_size, augment, dtype, eval_transform)
        ds = ds.map(lambda p, lab: {"image": fn(p), **lab}, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        fn = _example_fn(data, image_size, augment, dtype, eval_transform)
        b = gather.shape[1]
        ds = ds.unbatch().map(
            lambda p, lab: {"image": fn(p), **lab}, num_parallel_calls=tf.data.AUTOTUNE
        )
        ds = ds.batch(b, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    # No autotuning: deleting an iterator whose autotune thread was running blocked the main
    # thread for 2-70 s at every epoch end of the default run (RootDataset::~Iterator waiting
    # on its thread). Parallel maps then use one call per core.
    options.autotune.enabled = False
    return ds.with_options(options).prefetch(2)


def _process_columns(
    arrays: dict[str, np.ndarray], batch_size: int, process_index: int, process_count: int
) -> dict[str, np.ndarray]:
    """[steps * B, ...] -> this process's columns of each global batch, [steps, B / P, ...]."""
    b = batch_size // process_count
    cols = slice(process_index * b, (process_index + 1) * b)
    return {k: v.reshape(-1, batch_size, *v.shape[1:])[:, cols] for k, v in arrays.items()}


def _check_batch(batch_size: int, num_devices: int | None, process_count: int) -> None:
    shards = process_count * (num_devices or 1)
    if batch_size <= 0 or batch_size % shards:
        raise ValueError(
            f"Global batch size {batch_size} must be a positive multiple of processes x devices "
            f"= {process_count} x {num_devices or 1}."
        )


def _to_layout(ds: tf.data.Dataset, num_devices: int | None, prefetch: int) -> Iterator[Batch]:
    """numpy batches, reshaped to [D, B / D, ...] for pmap, then prefetched to the device(s)."""
    # as_numpy_iterator copies out of TF's buffers (tfds.as_numpy does not): JAX must not alias
    # memory that TF owns (device_put of such views deadlocked the next TF iterator here).
    return _place(ds.as_numpy_iterator(), num_devices, prefetch)


def _place(it: Iterator[Batch], num_devices: int | None, prefetch: int) -> Iterator[Batch]:
    """`_to_layout` of an iterator of numpy batches."""
    if num_devices is not None:
        it = (
            jax.tree_util.tree_map(lambda x: x.reshape(num_devices, -1, *x.shape[1:]), b)
            for b in it
        )
    if prefetch <= 0:
        return iter(it)
    if num_devices is not None:
        from flax import jax_utils

        devices = jax.local_devices()[:num_devices]
        return jax_utils.prefetch_to_device(it, prefetch, devices=devices)
    return _prefetch_jit(it, prefetch)


def _prefetch_jit(it: Iterator[Batch], size: int) -> Iterator[Batch]:
    queue = collections.deque()

    def enqueue(n):
        for batch in itertools.islice(it, n):
            queue.append(jax.device_put(batch))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return index, count


def train_epoch(
    source: SplitData | tfds.core.DatasetBuilder,
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
    num_devices: int | None = None,
    balanced: bool = False,
    augment: bool = True,
    eval_transform: str = "resize_crop",
    dtype: Any = np.float32,
    split: str = "train",
    indices: np.ndarray | None = None,
    prefetch: int = 2,
    process_index: int | None = None,
    process_count: int | None = None,
    cache: Any = None,
) -> Iterator[Batch]:
    """The batches of training epoch `epoch`, from step `start_step` on.

    Args:
      source: a `SplitData`, or a prepared builder (its `split` is loaded, and cached).
      batch_size: global batch size B over all processes and devices.
      image_size: output side S.
      seed, epoch: the batches depend on these alone (seed >= 0).
      start_step: first step to yield, in [0, steps_per_epoch].
      num_devices: None for [B/P, ...] (jit); D for [D, B/(P*D), ...] (pmap).
      balanced: group-balanced sampling (uniform group, then uniform member, with replacement).
      augment: RandomResizedCrop + flip; False gives the evaluation transform.
      eval_transform: the evaluation transform, one of `EVAL_TRANSFORMS`: 'resize_crop'
        (torchvision's ImageNet recipe: shorter side to S * 256/224, centre crop S) or
        'square_resize_crop' (DFR / group_DRO: resize to a square of side S * 256/224, centre
        crop S). Used when `augment` is False.
      dtype: image dtype (np.float32 or jnp.bfloat16).
      indices: restrict the epoch to these example indices of the split.
      prefetch: batches kept ahead on the device(s); 0 yields numpy arrays.
      process_index, process_count: default to JAX's.
      cache: a `device_input.Cache` of this split: with `augment`, the batches are the device
        path's (same examples, same parameters): uint8 `image` [.., Hc, Wc, 3] and the
        augmentation parameters, for `device_input.augment` to finish on the device.
    Yields:
      dicts with image [.., S, S, 3] and label, group, place int32.
    """
    _check_eval_transform(eval_transform)
    data = _as_split(source, split)
    p_index, p_count = _processes(process_index, process_count)
    _check_batch(batch_size, num_devices, p_count)
    order = epoch_order(
        data.group,
        batch_size=batch_size,
        seed=seed,
        epoch=epoch,
        balanced=balanced,
        indices=indices,
    )
    steps = order.size // batch_size
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} outside [0, {steps}].")
    order = order.astype(np.int32)
    arrays = {"gather": order, "index": order, **_augment_params(order.size, seed, epoch)}
    arrays = {k: v[start_step * batch_size :] for k, v in arrays.items()}
    if start_step == steps:
        return iter(())
    columns = _process_columns(arrays, batch_size, p_index, p_count)
    if cache is not None and augment:
        return _place(cache.batches(data, columns), num_devices, prefetch)
    ds = _dataset(data, columns, image_size, augment, dtype, eval_transform)
    return _to_layout(ds, num_devices, prefetch)


def eval_batches(
    source: SplitData | tfds.core.DatasetBuilder,
    *,
    batch_size: int,
    image_size: int,
    split: str = "test",
    num_devices: int | None = None,
    eval_transform: str = "resize_crop",
    dtype: Any = np.float32,
    indices: np.ndarray | None = None,
    prefetch: int = 2,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Batch]:
    """Every example of the split (or of `indices`) exactly once, in order, with a `mask`.

    The last global batch is padded to `batch_size` (static shapes) with mask 0 and index -1.
    Across processes the examples are dealt as in `train_epoch`, so every process gets the
    same number of batches. Arguments as in `train_epoch`.
    """
    _check_eval_transform(eval_transform)
    data = _as_split(source, split)
    p_index, p_count = _processes(process_index, process_count)
    _check_batch(batch_size, num_devices, p_count)
    order = np.arange(data.num_examples) if indices is None else np.asarray(indices)
    padded = -(-order.size // batch_size) * batch_size
    real = np.arange(padded) < order.size
    order = np.resize(order, padded)  # repeats the start; masked out below
    arrays = {
        "gather": np.where(real, order, 0).astype(np.int32),
        "index": np.where(real, order, -1).astype(np.int32),
        "mask": real.astype(np.float32),
    }
    columns = _process_columns(arrays, batch_size, p_index, p_count)
    ds = _dataset(data, columns, image_size, False, dtype, eval_transform)
    return _to_layout(ds, num_devices, prefetch)


def group_names(source: tfds.core.DatasetBuilder) -> Sequence[str]:
    """Names of the groups of a builder, in group-id order (for reports)."""
    return source.info.features["group"].names
