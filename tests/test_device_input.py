"""The device input path (agre_jax/data/device_input.py): its augmentation against the host
path's on the same examples and parameters, its layouts, the decode-once cache (built once,
reused, rebuilt when content or settings change, never read stale) and the config switch.

Tolerances, in 0-255 levels (differences of normalised images times 255 * std):
- crop windows: equal (a float32 port of the same operations).
- decoded splits, and encoded ones whose images have the cache's size (not resampled into it):
  1e-3 levels, float rounding (XLA fuses multiply-adds that TF rounds twice), everywhere:
  both keep every sample inside the image (the host pads the edge, the device clamps). One
  documented exception: libjpeg's cropped decode (`decode_and_crop_jpeg`, the host's) differs
  from the full decode (the cache's) in the crop's first and last columns (chroma upsampling
  at the crop edge).
- images larger than the cache: resampled twice (to the cache with antialiasing, then to the
  output) where the host resamples once without antialiasing. On linear ramps, which both
  preserve, the mean signed difference measures any geometric offset: < 0.02 levels per image
  (a 0.1 px shift gives about 0.03). On smooth photos the differences are the resampling's:
  mean < 1 level, max < 12 levels (measured 0.33 and 3.8 at 224 px).
"""

import dataclasses
import io
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from test_data import make_waterbirds

from agre_jax import errors, settings, stages
from agre_jax.data import device_input, pipeline
from configs import tiny

tfds.disable_progress_bar()

LEVELS = np.array(pipeline.STDDEV_RGB, np.float64) * 255  # one normalised unit, in levels


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """spurious_shapes at size 0.02 (32 px, decoded in memory): train 97."""
    data_dir = str(tmp_path_factory.mktemp("shapes"))
    return pipeline.load_builder("spurious_shapes", data_dir=data_dir, config={"size": 0.02})


def _photo(height, width, seed):
    """A smooth random colour field (bicubic-upsampled noise), like a photo's low frequencies."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def _ramp(height, width, seed):
    """A linear ramp per channel (slopes up to 0.6 levels per pixel), which bilinear and
    antialiased resampling reproduce away from the borders."""
    rng = np.random.default_rng(seed)
    sy, sx = rng.uniform(-0.6, 0.6, (2, 3))
    y, x = np.mgrid[:height, :width]
    values = 128 + sy * (y[..., None] - height / 2) + sx * (x[..., None] - width / 2)
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def _split(sizes, fmt, make=_photo, seed=0):
    """An in-memory encoded split (`fmt` 'PNG' or 'JPEG') of images of `sizes` (h, w)."""
    encoded = []
    for i, (h, w) in enumerate(sizes):
        buf = io.BytesIO()
        Image.fromarray(make(int(h), int(w), seed + i)).save(buf, format=fmt, quality=95)
        encoded.append(buf.getvalue())
    n = len(sizes)
    return pipeline.SplitData(
        images=tf.constant(encoded), label=np.arange(n, dtype=np.int32) % 2,
        place=np.zeros(n, np.int32), group=np.arange(n, dtype=np.int32) % 2,
        ids=np.array([str(i) for i in range(n)], object), num_groups=4, encoding=fmt.lower(),
    )  # fmt: skip


def _both(split, cache, image_size, epochs=(0, 1), **kw):
    """(host batches, device batches augmented by jitted `augment`) of the same epochs."""
    kw = {"batch_size": 8, "image_size": image_size, "seed": 1, "prefetch": 0, **kw}
    fn = jax.jit(lambda b: device_input.augment(b, image_size, np.float32))
    host, device = [], []
    for epoch in epochs:
        host += list(pipeline.train_epoch(split, epoch=epoch, **kw))
        device += [fn(b) for b in pipeline.train_epoch(split, epoch=epoch, cache=cache, **kw)]
    return host, device


def _diff(host, device):
    """Signed differences (device - host) in levels, [N, S, S, 3]; other keys equal."""
    for h, d in zip(host, device, strict=True):
        assert h.keys() == d.keys()
        for k in h.keys() - {"image"}:
            np.testing.assert_array_equal(np.asarray(d[k]), h[k], err_msg=k)
    images = [(np.asarray(d["image"]) - h["image"]) for h, d in zip(host, device, strict=True)]
    return np.concatenate(images).astype(np.float64) * LEVELS


def test_crop_windows_equal_the_host_windows():
    n = 20_000
    params = pipeline._augment_params(n, seed=5, epoch=2)
    rng = np.random.default_rng(0)
    height, width = rng.integers(1, 700, (2, n)).astype(np.int32)
    args = (params["area"], params["log_ratio"], params["offset"])
    host = pipeline._crop_window(tf.constant(height), tf.constant(width), *args)
    device = jax.jit(device_input.crop_windows)(height, width, *args)
    for name, h, d in zip("yxhw", host, device, strict=True):
        np.testing.assert_array_equal(np.asarray(d), h.numpy(), err_msg=name)


def test_decoded_split_matches_the_host(shapes):
    split = pipeline.load_split(shapes, "train")
    cache = device_input.load_cache(split, fingerprint="-", directory="unused", image_size=24)
    assert cache.path is None and cache.sizes is None  # the split's own images, no file
    host, device = _both(split, cache, 24, batch_size=16)
    batch = pipeline.train_epoch(split, seed=1, epoch=0, batch_size=16, image_size=24,
                                 prefetch=0, cache=cache)  # fmt: skip
    raw = next(batch)
    assert raw["image"].dtype == np.uint8 and raw["image"].shape == (16, 32, 32, 3)
    assert "size" not in raw and raw["flip"].any() and not raw["flip"].all()
    # Everywhere, the windows ending at the last row or column included (at 32 -> 24 px TF's
    # rounding put their last sample past it in 27 % of windows before the host's edge padding).
    assert np.abs(_diff(host, device)).max() < 1e-3


def test_encoded_split_at_the_cache_size_matches_the_host(tmp_path):
    """PNG images of the cache's size: the host's decode, crop and resize, up to rounding;
    in pmap layouts and per process as the host path."""
    split = _split([(50, 40)] * 16, "PNG")
    cache = device_input.load_cache(
        split, fingerprint="a", directory=tmp_path, image_size=32, side=64
    )
    assert cache.images.shape == (16, 50, 40, 3) and cache.sizes.tolist() == [[50, 40]] * 16
    host, device = _both(split, cache, 32, epochs=(0, 1, 2))
    assert np.abs(_diff(host, device)).max() < 1e-3

    kw = {"batch_size": 8, "image_size": 32, "seed": 1, "epoch": 0, "cache": cache}
    pmap = next(pipeline.train_epoch(split, num_devices=4, **kw))
    assert pmap["image"].shape == (4, 2, 50, 40, 3) and len(pmap["image"].devices()) == 4
    out = device_input.compile_augment(32, jnp.bfloat16, pmap=True)(pmap)
    assert out["image"].shape == (4, 2, 32, 32, 3) and out["image"].dtype == jnp.bfloat16
    assert out.keys() == host[0].keys()
    np.testing.assert_allclose(
        np.asarray(out["image"], np.float32).reshape(8, 32, 32, 3), host[0]["image"], atol=0.02
    )
    halves = [
        next(pipeline.train_epoch(split, prefetch=0, process_index=p, process_count=2, **kw))
        for p in (0, 1)
    ]
    full = next(pipeline.train_epoch(split, prefetch=0, **kw))
    for k in full:
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), full[k], err_msg=k)


def test_jpeg_differs_only_in_the_crop_edge_columns(tmp_path):
    split = _split([(50, 40)] * 16, "JPEG")
    cache = device_input.load_cache(
        split, fingerprint="b", directory=tmp_path, image_size=32, side=64
    )
    host, device = _both(split, cache, 32)
    diff = np.abs(_diff(host, device))
    assert diff[:, :, 1:-1].max() < 1e-3
    assert 0 < diff[:, :, [0, -1]].max() < 32


def test_resized_cache_geometry_and_photos(tmp_path):
    """Images larger than the cache (side ceil(64 / 0.7) = 92) and of varied sizes."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(70, 160, (16, 2))
    assert device_input.cache_side(64) == 92 and device_input.cache_side(224) == 320
    ramps = _split(sizes, "PNG", _ramp)
    cache = device_input.load_cache(ramps, fingerprint="c", directory=tmp_path, image_size=64)
    assert cache.images.shape == (16, 92, 92, 3)
    np.testing.assert_array_equal(cache.sizes, sizes)
    diff = _diff(*_both(ramps, cache, 64))[:, 3:-3, 3:-3]  # away from the window's borders
    assert np.abs(diff.mean(axis=(1, 2, 3))).max() < 0.02
    assert np.abs(diff).max() < 1.5

    photos = _split(sizes, "JPEG", _photo)
    cache = device_input.load_cache(photos, fingerprint="d", directory=tmp_path, image_size=64)
    diff = np.abs(_diff(*_both(photos, cache, 64)))
    assert diff.mean() < 1 and diff.max() < 12


def test_augment_leaves_host_batches_and_keeps_leading_axes():
    host = {"image": jnp.zeros((2, 8, 8, 3)), "label": jnp.zeros(2, jnp.int32)}
    assert device_input.augment(host, 8, jnp.float32) is host
    assert device_input.compile_augment(8, jnp.float32)(host) is host
    params = pipeline._augment_params(6, seed=0, epoch=0)
    batch = {k: v.reshape(2, 3, *v.shape[1:]) for k, v in params.items()}
    batch["image"] = np.random.default_rng(0).integers(0, 256, (2, 3, 12, 10, 3), np.uint8)
    batch["label"] = np.zeros((2, 3), np.int32)
    out = jax.jit(lambda b: device_input.augment(b, 8, jnp.bfloat16))(batch)
    assert set(out) == {"image", "label"}
    assert out["image"].shape == (2, 3, 8, 8, 3) and out["image"].dtype == jnp.bfloat16
    flat = {k: v.reshape(6, *v.shape[2:]) for k, v in batch.items()}
    once = jax.jit(lambda b: device_input.augment(b, 8, jnp.bfloat16))(flat)
    np.testing.assert_array_equal(out["image"].reshape(6, 8, 8, 3), once["image"])


def test_stage_keys_name_the_host_augmentation_of_decoded_splits():
    """Stages trained augmented on decoded splits with the crop before AUGMENT_VERSION 2 (edge
    lines filled with 0) are not reused; stages that do not augment, and encoded splits, whose
    crop did not change, keep their keys."""
    encoded = _split([(4, 4)] * 2, "PNG")
    decoded = dataclasses.replace(encoded, images=tf.zeros((2, 4, 4, 3), tf.uint8), encoding=None)
    data = stages.Dataset(
        name="d", splits={"train": decoded}, num_classes=2, num_groups=4,
        group_names=("0", "1", "2", "3"), train_counts=(1, 1, 0, 0), image_size=4,
        eval_batch_size=2, eval_transform="resize_crop", dtype=np.float32, fingerprint="f",
    )  # fmt: skip
    assert data.augmented_key(True) == {**data.key, "augment": pipeline.AUGMENT_VERSION}
    assert pipeline.AUGMENT_VERSION == 2 and data.augmented_key(False) == data.key
    other = dataclasses.replace(data, splits={"train": encoded})
    assert other.augmented_key(True) == other.key == data.key
    config = tiny.get_config()
    config.teachers.augment, config.train.augment = True, False
    keys, keys_other = stages.stage_keys(config, data), stages.stage_keys(config, other)
    assert keys.teachers != keys_other.teachers  # augmented teachers: re-keyed
    config.teachers.augment = False
    keys, keys_other = stages.stage_keys(config, data), stages.stage_keys(config, other)
    assert keys == keys_other  # nothing augmented: the keys of before the fix
    config.train.augment = True
    assert stages.stage_keys(config, data).inputs != stages.stage_keys(config, other).inputs


# --- the cache ------------------------------------------------------------------------------


def _files(path):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(path).iterdir()}


def test_cache_is_built_once_then_reused(tmp_path, capsys):
    split = _split([(30, 40), (44, 20), (36, 36)], "JPEG")
    first = device_input.load_cache(split, fingerprint="f", directory=tmp_path, image_size=28)
    assert capsys.readouterr().out.count("decoding 3 images") == 1
    assert first.path.parent == tmp_path and first.images.shape == (3, 40, 40, 3)
    for i in range(3):  # none of them 40 x 40: each resampled
        decoded = tf.image.decode_jpeg(split.images[i], channels=3)
        expected = tf.image.resize(decoded, [40, 40], antialias=True)
        expected = tf.cast(tf.clip_by_value(tf.round(expected), 0, 255), tf.uint8).numpy()
        np.testing.assert_array_equal(first.images[i], expected)
    before = _files(first.path)
    again = device_input.load_cache(split, fingerprint="f", directory=tmp_path, image_size=28)
    assert again.path == first.path and _files(again.path) == before
    assert "decoding" not in capsys.readouterr().out
    np.testing.assert_array_equal(again.images, first.images)
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary left


def test_cache_follows_content_and_settings(tmp_path):
    split = _split([(50, 40)] * 4, "PNG")
    base = device_input.load_cache(split, fingerprint="g", directory=tmp_path, image_size=32)
    other = device_input.load_cache(split, fingerprint="h", directory=tmp_path, image_size=32)
    side = device_input.load_cache(split, fingerprint="g", directory=tmp_path, image_size=20)
    assert len({base.path, other.path, side.path}) == 3
    assert base.images.shape[1:3] == (46, 40) and side.images.shape[1:3] == (29, 29)
    # The same content at another path shares the key.
    elsewhere = device_input.load_cache(split, fingerprint="g", directory=tmp_path / "x",
                                        image_size=32)  # fmt: skip
    assert elsewhere.path.name == base.path.name

    # In a TFDS data dir, keyed on pipeline.fingerprint: other images, another cache.
    make_waterbirds(str(tmp_path / "manual"))
    builder = pipeline.load_builder(
        "waterbirds", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual")
    )
    train = pipeline.load_split(builder, "train")
    cache = device_input.train_cache(builder, train, image_size=16)
    assert cache.path.parent == Path(builder.data_path) / "device_input"
    assert device_input.train_cache(builder, train, image_size=16).path == cache.path
    changed = _split([(20, 16)] * train.num_examples, "JPEG", seed=7)
    changed = pipeline.SplitData(**{**vars(train), "images": changed.images})
    assert pipeline.fingerprint(builder, {"train": changed}) != pipeline.fingerprint(
        builder, {"train": train}
    )
    fresh = device_input.train_cache(builder, changed, image_size=16)
    assert fresh.path != cache.path and not np.array_equal(fresh.images, cache.images)


@pytest.mark.parametrize("damage", ["record", "truncated", "missing"])
def test_damaged_cache_is_rebuilt_never_read(tmp_path, capsys, damage):
    split = _split([(50, 40)] * 4, "PNG")
    good = device_input.load_cache(split, fingerprint="k", directory=tmp_path, image_size=32)
    expected = np.array(good.images)
    if damage == "record":  # a record for other content under this key
        info = json.loads((good.path / device_input.CACHE_FILE).read_text())
        info["record"]["fingerprint"] = "other"
        (good.path / device_input.CACHE_FILE).write_text(json.dumps(info))
        np.save(good.path / "images.npy", np.zeros_like(expected))  # its pixels
    elif damage == "truncated":
        data = (good.path / "images.npy").read_bytes()
        (good.path / "images.npy").write_bytes(data[: len(data) // 2])
    else:
        os.remove(good.path / "sizes.npy")
    os.makedirs(tmp_path / f".{good.path.name}.crashed")  # a build that never finished
    capsys.readouterr()
    again = device_input.load_cache(split, fingerprint="k", directory=tmp_path, image_size=32)
    assert "decoding 4 images" in capsys.readouterr().out
    assert again.path == good.path
    np.testing.assert_array_equal(again.images, expected)


def test_unwritable_cache_directory_is_a_data_error(tmp_path):
    (tmp_path / "file").write_text("")
    split = _split([(20, 16)] * 2, "PNG")
    with pytest.raises(device_input.core.DataError, match="device-input cache"):
        device_input.load_cache(split, fingerprint="m", directory=tmp_path / "file", image_size=8)


# --- the config switch ----------------------------------------------------------------------


def test_config_switch_is_validated():
    """Bad values are ConfigErrors (main.py: one message, exit status 2), before any data."""
    bad = tiny.get_config()
    with bad.unlocked():  # as a config file may set it (the field is typed bool)
        del bad.data["device_augment"]
        bad.data.device_augment = "yes"
    with pytest.raises(errors.ConfigError, match="data.device_augment is 'yes'; expected True"):
        settings.validate(bad)
    config = tiny.get_config()
    config.data.device_augment = True  # the tiny config trains nothing augmented
    with pytest.raises(errors.ConfigError, match="no trained network uses augmentation"):
        settings.validate(config)
    config.train.augment = True
    settings.validate(config)


def test_tiny_run_trains_on_device_batches(tmp_path, monkeypatch):
    """The run layer: ERM teachers and the student (pmap over 4 fake devices) train from
    device batches, each compiled step augmenting them."""
    from agre_jax import train

    traced = []

    def counting(batch, image_size, dtype):
        traced.append(device_input.is_device_batch(batch))
        return augment(batch, image_size, dtype)

    augment = device_input.augment
    monkeypatch.setattr(device_input, "augment", counting)
    config = tiny.get_config()
    config.teachers.augment = config.train.augment = True
    config.data.device_augment = True
    config.train.epochs = 1
    config.dfr.steps = 10
    report = train.train_and_evaluate(config, tmp_path / "run")
    assert traced.count(True) == 2  # the teachers' step and the student's, each traced once
    assert report["test"]["student (best val WGA)"]["n"] > 0
    # Stages trained on device batches are keyed apart from the host path's.
    data = stages.load_data(config)
    assert data.key["device_input"] == {"cache_shape": None, "version": 1}
    config.data.device_augment = False
    assert "device_input" not in stages.load_data(config).key
