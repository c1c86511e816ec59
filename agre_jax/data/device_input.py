"""The device input path: images decoded once into a uint8 cache, augmented on the device.

The host path (`pipeline.train_epoch`) decodes every JPEG on every pass: about 400 images/s on
2 cores at 224 px (benchmarks/input_pipeline.py), far below what one GPU trains on. Here the
host only gathers cached uint8 images and the per-example augmentation parameters of
`pipeline._augment_params` (a function of (seed, epoch)); `augment`, a pure jittable function,
computes the RandomResizedCrop windows, resamples, flips and normalises on the device (the
ERM teachers' compiled step calls it first; the distillation step is preceded by a compiled
call of it, `compile_augment`).

Images and windows are the host path's: the same example order, process columns and
parameters (`pipeline.train_epoch(..., cache=...)` shares that code), windows by a float32 port
of `pipeline._crop_window` on the ORIGINAL image size, and the host's bilinear formulas:

- decoded in-memory splits (the synthetic data): the cache is the split's own array, and the
  crop is `tf.image.crop_and_resize`'s (box corners on pixel centres), as `pipeline._batch_fn`
  does it: equal to the host's images up to float rounding. Both keep every sample inside
  the image (the host pads it with a copy of its edge, the device clamps the positions).
- encoded splits (JPEG/PNG: Waterbirds, CelebA): the host decodes the crop window and resizes
  it with `tf.image.resize` (half-pixel centres, no antialiasing). The cache holds every image
  decoded and resized once to a fixed `(Hc, Wc)` = (min(side, largest height), min(side,
  largest width)), `side = ceil(image_size / 0.7)` (320 at 224 px), bilinear with antialiasing,
  plus each original size; the device samples the window, mapped into the cache's pixels.
  Images of exactly the cache's size (a split whose images share one size within `side`, as
  CelebA's 178 x 218) are cached unresampled, and then the device output equals the host's up
  to float rounding (for JPEGs, but for the crop's edge columns, where libjpeg's cropped
  decode, the host's, differs from the full decode). Others are resampled twice (into the
  cache, then to the output) instead of once: a slight blur, no geometric offset (tested on
  linear ramps). Why `side`: every crop
  window spans at least 0.7 of each axis (its area fraction is >= 0.7 and neither side
  exceeds the image), so a window holds >= image_size cache pixels per axis: the device never
  upsamples where the host path would downsample.

The cache is `<directory>/<key>/` with `images.npy` (uint8 [n, Hc, Wc, 3], memory-mapped when
read), `sizes.npy` (int32 [n, 2], original height and width) and `cache.json`. The key is a
digest of the content and the settings: the data's fingerprint (`pipeline.fingerprint`), the
example count, `side`, the format version and TensorFlow's version (its JPEG decoder), never a
path. It is written under a temporary name and renamed when complete; a directory whose record
or arrays do not match what is expected is rebuilt, never read.

Public API:
  cache_side(image_size) -> int
  load_cache(data, *, fingerprint, directory, image_size, side=None) -> Cache
  train_cache(builder, split_data, *, image_size, split='train') -> Cache (in the TFDS data dir)
  crop_windows(height, width, area, log_ratio, offset) -> (y, x, h, w)
  augment(batch, image_size, dtype) -> batch
  compile_augment(image_size, dtype, *, pmap=False) -> batch -> batch
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from agre_jax.data import core, pipeline

FORMAT_VERSION = 1
CACHE_FILE = "cache.json"
# What a device batch carries besides the host batch's keys: the original image size (encoded
# splits only), the crop candidates and the flip, as `pipeline._augment_params` draws them.
PARAM_KEYS = ("size", "area", "log_ratio", "offset", "flip")
Batch = dict[str, Any]
_decode = pipeline._decode  # noqa: SLF001 -- the host path's decoder, shared


@dataclasses.dataclass(frozen=True, eq=False)
class Cache:
    """The uint8 images the device path gathers from, for one split.

    Attributes:
      images: uint8 [n, Hc, Wc, 3] (memory-mapped for an encoded split's cache; a decoded
        split's own images).
      sizes: int32 [n, 2], each original (height, width); None for a decoded split, whose
        images are the originals.
      path: the cache directory, None for a decoded split.
    """

    images: np.ndarray
    sizes: np.ndarray | None
    path: Path | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """What the device path's images depend on besides the data (for stage keys)."""
        shape = list(self.images.shape[1:3]) if self.sizes is not None else None
        return {"cache_shape": shape, "version": FORMAT_VERSION}

    def batches(
        self, data: pipeline.SplitData, columns: Mapping[str, np.ndarray]
    ) -> Iterator[Batch]:
        """numpy device batches for per-step columns [steps, b, ...] of `data` (gather, index,
        area, log_ratio, offset, flip): uint8 `image` [b, Hc, Wc, 3], `label`, `group`,
        `place`, `index`, the parameters and, for an encoded split, `size`. A gather of
        whole images: no tf.data (its copies cost 4x the gather itself, measured)."""
        for step, rows in enumerate(columns["gather"]):
            batch = {
                "image": np.take(self.images, rows, axis=0),
                "label": data.label[rows],
                "group": data.group[rows],
                "place": data.place[rows],
                **{k: columns[k][step] for k in ("index", "area", "log_ratio", "offset", "flip")},
            }
            if self.sizes is not None:
                batch["size"] = self.sizes[rows]
            yield batch


def cache_side(image_size: int) -> int:
    """Longest cached side for output side `image_size`: ceil(image_size / CROP_AREA[0]), the
    smallest side whose crop windows (>= 0.7 of each axis) hold >= image_size pixels."""
    return math.ceil(image_size / pipeline.CROP_AREA[0] - 1e-9)


def _cache_record(fingerprint: str, n: int, side: int) -> dict[str, Any]:
    return {
        "fingerprint": fingerprint,
        "num_examples": n,
        "side": side,
        "resize": "bilinear_antialias",
        "decoder": f"tensorflow {tf.__version__}",
        "version": FORMAT_VERSION,
    }


def _cache_key(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def load_cache(
    data: pipeline.SplitData,
    *,
    fingerprint: str,
    directory: str | os.PathLike,
    image_size: int,
    side: int | None = None,
) -> Cache:
    """The device-path cache of one split: read if present and valid, else built (once).

    A decoded split needs no file: its images are the cache. An encoded one is decoded,
    resized to fit `side` (see the module docstring) and written to `<directory>/<key>/`
    atomically; a directory there whose `cache.json` or arrays do not match is replaced.

    Args:
      data: the split (`pipeline.load_split`).
      fingerprint: the content digest of the data (`pipeline.fingerprint`); it keys the cache,
        so it must change whenever the split's content does.
      directory: where caches live (one subdirectory per key).
      image_size: the model's input side S.
      side: longest cached side (default `cache_side(image_size)`).

    Raises:
      DataError: if `directory` cannot be written.
    """
    if data.encoding is None:
        return Cache(images=data.images.numpy(), sizes=None)
    side = cache_side(image_size) if side is None else side
    record = _cache_record(fingerprint, data.num_examples, side)
    path = Path(directory) / _cache_key(record)
    cache = _read(path, record)
    if cache is not None:
        return cache
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise core.DataError(
            f"Cannot write the device-input cache under {path.parent} ({e}); expected a "
            "writable TFDS data dir (data.data_dir), or set data.device_augment=False."
        ) from e
    try:
        _build(data, tmp, record, side)
        if path.exists():  # damaged or mismatched: never read, replaced
            shutil.rmtree(path)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same cache first
            if _read(path, record) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cache = _read(path, record)
    if cache is None:
        raise core.DataError(f"The device-input cache {path} was written but does not read back.")
    return cache


def train_cache(
    builder: tfds.core.DatasetBuilder,
    split_data: pipeline.SplitData,
    *,
    image_size: int,
    split: str = "train",
) -> Cache:
    """`load_cache` of one split of a prepared builder, kept in the builder's data directory
    (`<data_path>/device_input/`) and keyed on `pipeline.fingerprint(builder, {split: ...})`."""
    return load_cache(
        split_data,
        fingerprint=pipeline.fingerprint(builder, {split: split_data}),
        directory=Path(builder.data_path) / "device_input",
        image_size=image_size,
    )


def _read(path: Path, record: Mapping[str, Any]) -> Cache | None:
    """The cache at `path` if its record is `record` and its arrays have the recorded shapes."""
    try:
        stored = json.loads((path / CACHE_FILE).read_text())
        if stored.get("record") != dict(record):
            return None
        images = np.load(path / "images.npy", mmap_mode="r")
        sizes = np.load(path / "sizes.npy")
    except (OSError, ValueError):  # missing, truncated, not JSON / not .npy
        return None
    n = record["num_examples"]
    if (
        images.dtype != np.uint8
        or images.shape != (n, *stored.get("shape", ()), 3)
        or sizes.dtype != np.int32
        or sizes.shape != (n, 2)
    ):
        return None
    return Cache(images=images, sizes=sizes, path=path)


def _build(data: pipeline.SplitData, out: Path, record: Mapping[str, Any], side: int) -> None:
    """Decodes every image of `data`, resizes it to the cache shape and writes the cache files
    into `out` (cache.json last)."""
    n = data.num_examples
    encoded = tf.data.Dataset.from_tensor_slices(data.images)

    def shape(x):
        if data.encoding == "jpeg":
            return tf.image.extract_jpeg_shape(x)[:2]
        return tf.shape(_decode(x, data.encoding))[:2]

    shapes = encoded.map(shape, num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
    sizes = np.concatenate(list(shapes.as_numpy_iterator())).astype(np.int32)
    hc, wc = (int(min(side, v)) for v in sizes.max(axis=0))
    print(
        f"[data] decoding {n} images once into the device-input cache {out.parent} "
        f"({hc} x {wc} px, {n * hc * wc * 3 / 2**30:.2f} GiB)"
    )

    def resize(x):
        image = _decode(x, data.encoding)
        h, w = tf.shape(image)[0], tf.shape(image)[1]

        def resampled():
            r = tf.image.resize(image, [hc, wc], method="bilinear", antialias=True)
            return tf.cast(tf.clip_by_value(tf.round(r), 0, 255), tf.uint8)

        same = tf.logical_and(tf.equal(h, hc), tf.equal(w, wc))
        return tf.ensure_shape(tf.cond(same, lambda: image, resampled), [hc, wc, 3])

    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False  # as pipeline._dataset: one parallel call per core
    resized = encoded.map(resize, num_parallel_calls=tf.data.AUTOTUNE).batch(256)
    images = np.lib.format.open_memmap(
        out / "images.npy", mode="w+", dtype=np.uint8, shape=(n, hc, wc, 3)
    )
    start = 0
    for chunk in resized.with_options(options).prefetch(2).as_numpy_iterator():
        images[start : start + len(chunk)] = chunk
        start += len(chunk)
    images.flush()
    del images
    np.save(out / "sizes.npy", sizes)
    info = {"record": dict(record), "shape": [hc, wc]}
    (out / CACHE_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    os.chmod(out, 0o755)  # mkdtemp's 0700: the data dir is meant to be shared


# --- on the device -------------------------------------------------------------------------------


def crop_windows(height, width, area, log_ratio, offset) -> tuple[jax.Array, ...]:
    """RandomResizedCrop windows (y, x, h, w) int32 [...], a float32 port of
    `pipeline._crop_window` (same operations, same order).

    Args:
      height, width: image sizes [...] (int or float).
      area: area fractions [..., T]; log_ratio: log aspect ratios (w / h) [..., T]: the T
        candidates, of which the first that fits is taken (else the whole image).
      offset: [..., 2] in [0, 1): the window's position among the free rows and columns.
    """
    height = jnp.asarray(height).astype(jnp.float32)
    width = jnp.asarray(width).astype(jnp.float32)
    target = area * (height * width)[..., None]
    ratio = jnp.exp(log_ratio)
    w = jnp.round(jnp.sqrt(target * ratio))
    h = jnp.round(jnp.sqrt(target / ratio))
    ok = (w <= width[..., None]) & (h <= height[..., None]) & (w > 0) & (h > 0)
    first = jnp.argmax(ok.astype(jnp.int32), axis=-1)[..., None]
    found = jnp.any(ok, axis=-1)
    w = jnp.where(found, jnp.take_along_axis(w, first, axis=-1)[..., 0], width)
    h = jnp.where(found, jnp.take_along_axis(h, first, axis=-1)[..., 0], height)
    y = jnp.floor(offset[..., 0] * (height - h + 1))
    x = jnp.floor(offset[..., 1] * (width - w + 1))
    return tuple(v.astype(jnp.int32) for v in (y, x, h, w))


def _div(a, b):
    """a / b as TensorFlow computes it: XLA rewrites a division by a constant into a
    multiplication by the rounded reciprocal, which moves sample positions by a rounding TF
    does not make. The barrier hides the constant."""
    return a / jax.lax.optimization_barrier(b)


def _resize_axis(start, length, size, cached: int, out: int):
    """Sample rows along one axis as `tf.image.resize` (bilinear, half-pixel centres) takes
    them from the window [start, start + length) of an axis of `size` original pixels, mapped
    into the `cached` pixels of the cache: (lower index, lerp [out]) with the window clamped
    as the host's crop does."""
    scale = _div(length.astype(jnp.float32), jnp.float32(out))
    q = (jnp.arange(out, dtype=jnp.float32) + 0.5) * scale - 0.5  # in the window, as TF
    q = jnp.clip(q, 0.0, (length - 1).astype(jnp.float32))
    q_floor = jnp.floor(q)
    # Unresampled cache: exactly TF's indices and lerps; else the position in the cache.
    p = (start.astype(jnp.float32) + q + 0.5) * _div(jnp.float32(cached), size.astype(jnp.float32))
    p = p - 0.5
    p = jnp.clip(p, 0.0, cached - 1.0)
    p_floor = jnp.floor(p)
    native = size == cached
    lower = jnp.where(native, start + q_floor.astype(jnp.int32), p_floor.astype(jnp.int32))
    lerp = jnp.where(native, q - q_floor, p - p_floor)
    return lower, lerp, jnp.ones(out, bool)


def _crop_and_resize_axis(start, length, size: int, out: int):
    """Sample rows along one axis as `pipeline._batch_fn` takes them with
    `tf.image.crop_and_resize` for the window [start, start + length - 1] of an axis of `size`
    pixels (box corners on pixel centres, of the axis padded to 2^k + 1 pixels: exact binary
    fractions): (lower index, lerp, inside [out]).

    Positions are clamped into the image: rounding can put the last one a hair past the last
    pixel, where the host reads its edge-replicating padding, the same value."""
    start = start.astype(jnp.float32)
    last = jnp.float32(size + pipeline._corner_pad(size) - 1)  # noqa: SLF001 -- the host's
    lo = _div(start, last)
    hi = _div(start + length.astype(jnp.float32) - 1, last)
    if out > 1:
        step = _div((hi - lo) * last, jnp.float32(out - 1))
        pos = lo * last + jnp.arange(out, dtype=jnp.float32) * step
    else:
        pos = jnp.full(out, 0.5 * (lo + hi) * last)
    pos = jnp.clip(pos, 0.0, jnp.float32(size - 1))
    lower = jnp.floor(pos)
    return lower.astype(jnp.int32), pos - lower, jnp.ones(out, bool)


def _sample(image, rows, cols) -> jax.Array:
    """Bilinear samples float32 [S, S', 3] of uint8 `image` [H, W, 3] at (lower, lerp, inside)
    rows and columns, combined as TF's kernels do (along x first, then y)."""
    (y0, ly, y_in), (x0, lx, x_in) = rows, cols
    height, width = image.shape[:2]
    y1, x1 = jnp.minimum(y0 + 1, height - 1), jnp.minimum(x0 + 1, width - 1)
    y0, x0 = jnp.clip(y0, 0, height - 1), jnp.clip(x0, 0, width - 1)
    top_rows, bottom_rows = image[y0], image[y1]

    def corner(r, c):
        return r[:, c].astype(jnp.float32)

    lx = lx[None, :, None]
    top = corner(top_rows, x0) + (corner(top_rows, x1) - corner(top_rows, x0)) * lx
    bottom = corner(bottom_rows, x0) + (corner(bottom_rows, x1) - corner(bottom_rows, x0)) * lx
    out = top + (bottom - top) * ly[:, None, None]
    return jnp.where(y_in[:, None, None] & x_in[None, :, None], out, 0.0)


def _augment_one(image, size, area, log_ratio, offset, flip, image_size: int, corners: bool):
    """One example: uint8 [Hc, Wc, 3] -> float32 [S, S, 3] in 0-255 (crop, resize, flip);
    `corners`: crop_and_resize's sampling (a decoded split), else tf.image.resize's."""
    cached_h, cached_w = image.shape[:2]
    height, width = size[0], size[1]
    y, x, h, w = crop_windows(height, width, area, log_ratio, offset)
    if corners:
        rows = _crop_and_resize_axis(y, h, cached_h, image_size)
        cols = _crop_and_resize_axis(x, w, cached_w, image_size)
    else:
        rows = _resize_axis(y, h, height, cached_h, image_size)
        cols = _resize_axis(x, w, width, cached_w, image_size)
    cols = jax.tree.map(lambda c: jnp.where(flip, c[::-1], c), cols)  # flipped output columns
    return _sample(image, rows, cols)


def is_device_batch(batch: Mapping[str, Any]) -> bool:
    """Whether `batch` is a device-path batch (uint8 images plus augmentation parameters)."""
    return "area" in batch


def augment(batch: Batch, image_size: int, dtype: Any) -> Batch:
    """A device batch -> the host path's training batch, on the device (pure, jittable).

    The batch's `image` is uint8 [..., Hc, Wc, 3] with parameters [...] (`flip`), [..., T]
    (`area`, `log_ratio`), [..., 2] (`offset`) and, for an encoded split's cache, `size`
    [..., 2] (each original height and width); any leading axes ([B], [M, B], [D, B / D]).
    Each image gets the window `crop_windows` picks on its original size, resampled to
    `image_size` bilinearly (without `size`: as `tf.image.crop_and_resize` on the image
    itself; with it: as `tf.image.resize` of the window, mapped into the cache), flipped where
    `flip`, then ImageNet-normalised as `pipeline._normalize` and cast to `dtype`.

    Returns:
      The batch without the parameters, `image` [..., S, S, 3] of `dtype`; any other batch
      (float images: the host path's) unchanged.
    """
    if not is_device_batch(batch):
        return batch
    images = batch["image"]
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    corners = "size" not in batch
    size = (
        jnp.broadcast_to(jnp.asarray(images.shape[-3:-1], jnp.int32), (flat.shape[0], 2))
        if corners
        else batch["size"].reshape(-1, 2)
    )
    params = [batch[k].reshape(flat.shape[0], *batch[k].shape[len(lead) :]) for k in PARAM_KEYS[1:]]
    one = functools.partial(_augment_one, image_size=image_size, corners=corners)
    pixels = jax.vmap(one)(flat, size, *params)
    mean = jnp.asarray(pipeline.MEAN_RGB, jnp.float32)
    std = jnp.asarray(pipeline.STDDEV_RGB, jnp.float32)
    normalised = _div(_div(pixels, jnp.float32(255.0)) - mean, std)
    out = {k: v for k, v in batch.items() if k not in PARAM_KEYS}
    out["image"] = normalised.astype(dtype).reshape(*lead, image_size, image_size, 3)
    return out


def compile_augment(image_size: int, dtype: Any, *, pmap: bool = False) -> Callable[[Batch], Batch]:
    """`augment` compiled on its own (jit, or pmap over a leading device axis), applied only
    to device batches: other batches are returned as they are, without a device call."""
    fn = functools.partial(augment, image_size=image_size, dtype=dtype)
    compiled = jax.pmap(fn) if pmap else jax.jit(fn)
    return lambda batch: compiled(batch) if is_device_batch(batch) else batch
