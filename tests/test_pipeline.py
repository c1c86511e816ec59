"""Input pipeline: layouts, dtypes, determinism, resume, evaluation coverage, balanced sampling,
evaluation transforms (against torchvision), fingerprints, quiet preparation."""

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core.utils import tqdm_utils
from test_data import FAKE_COUNTS, make_waterbirds
from torchvision import transforms as T

from agre_jax import data
from agre_jax.data import pipeline

tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """spurious_shapes at size 0.02: train 97 (groups 70/4/2/21), validation 24, test 116."""
    data_dir = str(tmp_path_factory.mktemp("shapes"))
    return pipeline.load_builder("spurious_shapes", data_dir=data_dir, config={"size": 0.02})


@pytest.fixture(scope="module")
def birds(tmp_path_factory):
    """The fake Waterbirds folder (small JPEGs of 20 x 16 px): train 10, validation 7, test 8."""
    root = tmp_path_factory.mktemp("birds")
    make_waterbirds(str(root / "manual"))
    return pipeline.load_builder(
        "waterbirds", data_dir=str(root / "tfds"), manual_dir=str(root / "manual")
    )


def train(source, **kw):
    kw = {"batch_size": 16, "image_size": 32, "seed": 3, "epoch": 0, "prefetch": 0, **kw}
    return list(pipeline.train_epoch(source, **kw))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def assert_batches_differ(a, b):
    assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))


def test_train_layouts_and_dtypes(shapes):
    split = pipeline.load_split(shapes, "train")
    assert pipeline.steps_per_epoch(split, 16) == 6
    jit = train(shapes)
    assert len(jit) == 6
    b = jit[0]
    assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
    for k in ("label", "group", "place", "index"):
        assert b[k].shape == (16,) and b[k].dtype == np.int32
    np.testing.assert_array_equal(b["group"], 2 * b["label"] + b["place"])
    np.testing.assert_array_equal(b["label"], split.label[b["index"]])
    # Normalised: roughly zero-mean, unit-scale pixels.
    assert abs(float(b["image"].mean())) < 1.5 and 0.3 < float(b["image"].std()) < 2

    pmap = train(shapes, num_devices=4, prefetch=2)
    assert len(pmap) == 6
    p = pmap[0]
    assert isinstance(p["image"], jax.Array) and len(p["image"].devices()) == 4
    assert p["image"].shape == (4, 4, 32, 32, 3) and p["label"].shape == (4, 4)
    np.testing.assert_array_equal(np.asarray(p["image"]).reshape(16, 32, 32, 3), b["image"])

    on_device = train(shapes, prefetch=2)
    assert isinstance(on_device[0]["image"], jax.Array)
    np.testing.assert_array_equal(np.asarray(on_device[-1]["image"]), jit[-1]["image"])

    bf16 = train(shapes, dtype=jnp.bfloat16, image_size=24)
    assert bf16[0]["image"].dtype == jnp.bfloat16 and bf16[0]["image"].shape == (16, 24, 24, 3)
    f32 = train(shapes, image_size=24)
    np.testing.assert_allclose(
        bf16[0]["image"].astype(np.float32), f32[0]["image"], rtol=1e-2, atol=1e-2
    )


def test_train_deterministic_per_seed_and_epoch(shapes):
    first = train(shapes)
    assert_batches_equal(first, train(shapes))
    assert_batches_differ(first, train(shapes, epoch=1))
    assert_batches_differ(first, train(shapes, seed=4))
    # The order is a permutation of distinct examples within an epoch.
    index = np.concatenate([b["index"] for b in first])
    assert index.size == 96 and np.unique(index).size == 96


@pytest.mark.parametrize("start_step", [1, 4, 6])
def test_train_resume_mid_epoch(shapes, start_step):
    full = train(shapes, epoch=2)
    assert_batches_equal(train(shapes, epoch=2, start_step=start_step), full[start_step:])


def test_train_process_sharding(shapes):
    full = train(shapes)
    parts = [train(shapes, process_index=p, process_count=2) for p in (0, 1)]
    for step, b in enumerate(full):
        for k in b:
            joined = np.concatenate([parts[0][step][k], parts[1][step][k]])
            np.testing.assert_array_equal(joined, b[k])
    pmap = train(shapes, process_index=1, process_count=2, num_devices=4)
    assert pmap[0]["image"].shape == (4, 2, 32, 32, 3)
    with pytest.raises(ValueError, match="multiple of processes x devices"):
        train(shapes, batch_size=12, process_count=2, num_devices=4)


def test_train_augmentation_is_identity_for_a_full_crop(shapes, monkeypatch):
    split = pipeline.load_split(shapes, "train")

    def params(n, seed, epoch):
        return {
            "area": np.ones((n, 10), np.float32),
            "log_ratio": np.zeros((n, 10), np.float32),
            "offset": np.zeros((n, 2), np.float32),
            "flip": np.arange(n) % 2 == 1,
        }

    monkeypatch.setattr(pipeline, "_augment_params", params)
    b = train(shapes)[0]
    raw = split.images.numpy()[b["index"]].astype(np.float32) / 255
    expected = (raw - np.array(pipeline.MEAN_RGB)) / np.array(pipeline.STDDEV_RGB)
    expected[1::2] = expected[1::2, :, ::-1]
    np.testing.assert_allclose(b["image"], expected, atol=1e-5)


def _clamped_crops(images, y, x, h, w, size):
    """Reference RandomResizedCrop resampling in float64: bilinear samples of uint8 `images`
    [N, H, W, 3] at crop_and_resize's positions for the windows (y, x, h, w) [N] (corners on
    pixel centres: y + i * (h - 1) / (size - 1)), clamped into the image -> [N, S, S, 3]."""

    def axis(start, length, n):
        pos = start + np.arange(size) * (length - 1) / (size - 1)
        pos = np.clip(pos, 0, n - 1)
        lower = np.floor(pos).astype(int)
        return lower, np.minimum(lower + 1, n - 1), pos - lower

    out = []
    for image, *window in zip(images.astype(np.float64), y, x, h, w, strict=True):
        y0, y1, ly = axis(window[0], window[2], image.shape[0])
        x0, x1, lx = axis(window[1], window[3], image.shape[1])
        rows = image[y0] + (image[y1] - image[y0]) * ly[:, None, None]
        out.append(rows[:, x0] + (rows[:, x1] - rows[:, x0]) * lx[None, :, None])
    return np.stack(out)


@pytest.mark.parametrize(("side", "image_size"), [(32, 24), (32, 32), (28, 28)])
def test_train_crops_at_the_image_edge_sample_inside_it(monkeypatch, side, image_size):
    """Windows ending at the last row and column of 32 px images: crop_and_resize's last
    sample, a float hair past the last pixel, filled its whole output line with 0 (27 % of
    random windows at 32 -> 24 px, 3.6 % at 32 -> 32) before the images were edge-padded.
    The augmented images equal a float64 clamped bilinear crop, up to float rounding (also at
    28 px, padded by 5 to 33: only the first padded pixel may be read)."""
    n = 32
    images = np.random.default_rng(0).integers(1, 256, (n, side, side, 3), dtype=np.uint8)
    split = pipeline.SplitData(
        images=tf.constant(images), label=np.zeros(n, np.int32), place=np.zeros(n, np.int32),
        group=np.zeros(n, np.int32), ids=np.arange(n).astype(str).astype(object),
        num_groups=1, encoding=None,
    )  # fmt: skip
    area = np.linspace(0.7, 1.0, n, dtype=np.float32)
    log_ratio = np.linspace(0.28, -0.28, n, dtype=np.float32)  # tall to wide, then none fits
    params = {
        "area": np.repeat(area[:, None], 10, 1),
        "log_ratio": np.repeat(log_ratio[:, None], 10, 1),
        "offset": np.full((n, 2), 0.9999, np.float32),  # the last free row and column
        "flip": np.zeros(n, bool),
    }
    monkeypatch.setattr(pipeline, "_augment_params", lambda *_: params)
    y, x, h, w = (
        np.asarray(v) for v in pipeline._crop_window(side, side, *list(params.values())[:3])
    )
    assert (y + h == side).all() and (x + w == side).all() and len(set(h)) > 5
    batch = train(split, batch_size=n, image_size=image_size)[0]
    pixels = batch["image"] * np.array(pipeline.STDDEV_RGB) + np.array(pipeline.MEAN_RGB)
    expected = _clamped_crops(images[batch["index"]], y, x, h, w, image_size)
    np.testing.assert_allclose(pixels * 255, expected, atol=1e-3)


def test_crop_window():
    # 10 x 10 image: candidate 1 (area 1, ratio 2) does not fit; candidate 2 is 9 x 9.
    y, x, h, w = pipeline._crop_window(
        np.float32(10), np.float32(10), np.float32([1.0, 0.81]),
        np.float32([np.log(2), 0.0]), np.float32([0.99, 0.0]),
    )  # fmt: skip
    assert (int(y), int(x), int(h), int(w)) == (1, 0, 9, 9)
    y, x, h, w = pipeline._crop_window(  # nothing fits: the whole image
        np.float32(10), np.float32(10), np.float32([1.0]), np.float32([1.0]), np.float32([0.5, 0.5])
    )
    assert (int(y), int(x), int(h), int(w)) == (0, 0, 10, 10)


@pytest.mark.parametrize("num_devices", [None, 4])
def test_eval_covers_every_example_once(shapes, num_devices):
    split = pipeline.load_split(shapes, "test")
    batches = list(
        pipeline.eval_batches(
            shapes, split="test", batch_size=32, image_size=32, num_devices=num_devices, prefetch=0
        )
    )
    assert len(batches) == 4  # 116 examples -> 3 full batches + 20 padded with 12
    flat = {
        k: np.concatenate(
            [
                np.asarray(b[k]).reshape(-1, *b[k].shape[(2 if num_devices else 1) :])
                for b in batches
            ]
        )
        for k in batches[0]
    }  # noqa: E501
    if num_devices:
        assert batches[0]["image"].shape == (4, 8, 32, 32, 3) and batches[0]["mask"].shape == (4, 8)
    real = flat["mask"] == 1
    assert real.sum() == 116 and flat["mask"].dtype == np.float32
    np.testing.assert_array_equal(flat["index"][real], np.arange(116))
    assert np.all(flat["index"][~real] == -1)
    np.testing.assert_array_equal(flat["label"][real], split.label)
    np.testing.assert_array_equal(flat["group"][real], split.group)


def test_eval_processes_and_subsets(shapes):
    def run(**kw):
        kw = {"split": "validation", "batch_size": 8, "image_size": 16, "prefetch": 0, **kw}
        return list(pipeline.eval_batches(shapes, **kw))

    parts = [run(process_index=p, process_count=2) for p in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 3
    index = np.concatenate([b["index"][b["mask"] == 1] for part in parts for b in part])
    np.testing.assert_array_equal(np.sort(index), np.arange(24))
    subset = np.array([3, 5, 7, 11, 20])
    got = run(indices=subset)
    assert len(got) == 1 and got[0]["mask"].sum() == 5
    np.testing.assert_array_equal(got[0]["index"][:5], subset)


def test_no_augmentation_matches_eval(shapes):
    batches = train(shapes, augment=False, split="validation", batch_size=8)
    assert len(batches) == 3
    evals = list(
        pipeline.eval_batches(
            shapes, split="validation", batch_size=8, image_size=32, prefetch=0,
            indices=np.concatenate([b["index"] for b in batches]),
        )
    )  # fmt: skip
    for b, e in zip(batches, evals, strict=True):
        np.testing.assert_array_equal(b["image"], e["image"])


def test_balanced_sampling(shapes):
    split = pipeline.load_split(shapes, "train")
    for epoch in range(2):  # the pipeline follows epoch_order
        got = np.concatenate([b["index"] for b in train(shapes, balanced=True, epoch=epoch)])
        order = pipeline.epoch_order(split.group, batch_size=16, seed=3, epoch=epoch, balanced=True)
        np.testing.assert_array_equal(got, order)
    counts = np.zeros(4)
    for epoch in range(300):  # 300 epochs x 96 draws: about 7200 per group
        order = pipeline.epoch_order(split.group, batch_size=16, seed=3, epoch=epoch, balanced=True)
        counts += np.bincount(split.group[order], minlength=4)
    # Plain sampling would give cross_land 2 % of the draws.
    np.testing.assert_allclose(counts / counts.sum(), 0.25, atol=0.01)
    assert_batches_equal(train(shapes, balanced=True), train(shapes, balanced=True))
    full = train(shapes, balanced=True, epoch=5)
    assert_batches_equal(train(shapes, balanced=True, epoch=5, start_step=3), full[3:])


def test_split_halves_and_index_subsets(shapes):
    val = pipeline.load_split(shapes, "validation")
    first, second = pipeline.split_halves(val.group, seed=0)
    np.testing.assert_array_equal(np.sort(np.concatenate([first, second])), np.arange(24))
    # Stratified: each group (9, 9, 3, 3) split as evenly as possible.
    np.testing.assert_array_equal(np.bincount(val.group[first], minlength=4), [4, 4, 1, 1])
    again = pipeline.split_halves(val.group, seed=0)
    np.testing.assert_array_equal(first, again[0])
    assert not np.array_equal(first, pipeline.split_halves(val.group, seed=1)[0])
    batches = train(val, batch_size=4, indices=first, balanced=True)
    assert len(batches) == pipeline.steps_per_epoch(first.size, 4) == 2
    assert set(np.concatenate([b["index"] for b in batches])) <= set(first)
    with pytest.raises(ValueError, match="make no batch"):
        train(val, batch_size=64)


def test_group_counts_helper(shapes):
    for split in ("train", "validation", "test"):
        np.testing.assert_array_equal(
            data.group_counts(shapes, split), pipeline.load_split(shapes, split).group_counts()
        )
    with pytest.raises(KeyError, match="validation\\[:50%\\]"):
        data.group_counts(shapes.info, "validation[:50%]")


def test_jpeg_pipeline(birds):
    split = pipeline.load_split(birds, "train")
    assert split.encoding == "jpeg" and split.num_examples == sum(FAKE_COUNTS["train"])
    kw = {"batch_size": 4, "image_size": 16, "seed": 1}
    full = train(birds, **kw)
    assert len(full) == 2 and full[0]["image"].shape == (4, 16, 16, 3)
    assert_batches_equal(full, train(birds, **kw))
    assert_batches_equal(train(birds, start_step=1, **kw), full[1:])
    assert_batches_differ(full, train(birds, epoch=1, **kw))
    pmap = train(birds, num_devices=4, dtype=jnp.bfloat16, **kw)
    assert pmap[0]["image"].shape == (4, 1, 16, 16, 3) and pmap[0]["image"].dtype == jnp.bfloat16
    evals = list(
        pipeline.eval_batches(birds, split="test", batch_size=4, image_size=16, prefetch=0)
    )
    assert len(evals) == 2 and sum(float(b["mask"].sum()) for b in evals) == 8
    assert np.all(np.isfinite(np.concatenate([b["image"] for b in evals])))


def test_jpeg_flip(birds, monkeypatch):
    def params(flip):
        def fn(n, seed, epoch):
            return {
                "area": np.full((n, 10), 0.8, np.float32),
                "log_ratio": np.zeros((n, 10), np.float32),
                "offset": np.full((n, 2), 0.5, np.float32),
                "flip": np.full(n, flip),
            }

        return fn

    kw = {"batch_size": 4, "image_size": 16}
    monkeypatch.setattr(pipeline, "_augment_params", params(False))
    plain = train(birds, **kw)[0]["image"]
    monkeypatch.setattr(pipeline, "_augment_params", params(True))
    flipped = train(birds, **kw)[0]["image"]
    np.testing.assert_allclose(flipped, plain[:, :, ::-1], atol=1e-6)


# --- evaluation transforms against torchvision --------------------------------------------------


def _photo(height, width, seed=0):
    """A smooth random colour field (bicubic-upsampled noise), like a photo's low frequencies."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def _one_example(images, encoding):
    zeros = np.zeros(1, np.int32)
    return pipeline.SplitData(
        images=tf.constant(images), label=zeros, place=zeros, group=zeros,
        ids=np.array(["x"], object), num_groups=4, encoding=encoding,
    )  # fmt: skip


def _pixels(batch):
    """An eval batch's first image back in 0-255 (normalisation undone)."""
    image = np.asarray(batch["image"][0], np.float64)
    return (image * np.array(pipeline.STDDEV_RGB) + np.array(pipeline.MEAN_RGB)) * 255


def _ours(source, eval_transform, image_size=224):
    kw = {"batch_size": 1, "image_size": image_size, "prefetch": 0}
    return _pixels(next(pipeline.eval_batches(source, eval_transform=eval_transform, **kw)))


TORCHVISION_RECIPES = {
    "resize_crop": lambda: T.Compose([T.Resize(256), T.CenterCrop(224)]),
    "square_resize_crop": lambda: T.Compose([T.Resize((256, 256)), T.CenterCrop(224)]),
}


# 375 x 500: landscape. 203 x 200: portrait where torchvision's rounding matters: the long side
# is int(256 * 203 / 200) = 259 (259.84 rounds to 260) and the crop offset round(35 / 2) = 18
# (half to even; floor gives 17).
@pytest.mark.parametrize("height, width", [(375, 500), (203, 200)])
@pytest.mark.parametrize("eval_transform", pipeline.EVAL_TRANSFORMS)
def test_eval_transform_matches_torchvision(height, width, eval_transform):
    buf = io.BytesIO()
    Image.fromarray(_photo(height, width)).save(buf, format="JPEG", quality=95)
    jpeg = buf.getvalue()
    # The same decoded pixels for both (TF's and PIL's JPEG decoders differ by a few levels).
    decoded = tf.io.decode_jpeg(jpeg, channels=3).numpy()
    expected = np.asarray(TORCHVISION_RECIPES[eval_transform]()(Image.fromarray(decoded)), float)
    assert expected.shape == (224, 224, 3)
    for source in (_one_example([jpeg], "jpeg"), _one_example(decoded[None], None)):
        got = _ours(source, eval_transform)
        diff = np.abs(got - expected)
        # Measured: max 1.0, mean 0.3 (TF's and PIL's antialiased bilinear kernels round
        # differently). A crop one pixel off gives a mean of about 5.
        assert diff.max() < 2 and diff.mean() < 0.6, (diff.max(), diff.mean())


def test_eval_transforms_differ_and_apply_without_augmentation():
    photo = _photo(375, 500)
    source = _one_example(photo[None], None)
    crop, square = (_ours(source, t) for t in pipeline.EVAL_TRANSFORMS)
    assert np.abs(crop - square).mean() > 20  # measured: 56
    # Training without augmentation uses the same transform.
    kw = {"batch_size": 1, "image_size": 224, "seed": 0, "epoch": 0, "prefetch": 0}
    for t, expected in zip(pipeline.EVAL_TRANSFORMS, (crop, square), strict=True):
        batch = next(pipeline.train_epoch(source, augment=False, eval_transform=t, **kw))
        np.testing.assert_allclose(_pixels(batch), expected, atol=1e-3)
    with pytest.raises(ValueError, match="Unknown eval_transform 'square'"):
        _ours(source, "square")
    with pytest.raises(ValueError, match="Unknown eval_transform"):
        next(pipeline.train_epoch(source, eval_transform="resize", **kw))


# --- fingerprint -------------------------------------------------------------------------------


def _splits(builder):
    return {s: pipeline.load_split(builder, s) for s in ("train", "validation", "test")}


def test_fingerprint_by_content(shapes, birds, tmp_path):
    first = pipeline.fingerprint(shapes, _splits(shapes))
    assert len(first) == 16 and int(first, 16) >= 0
    # The same data prepared in another data_dir.
    again = pipeline.load_builder(
        "spurious_shapes", data_dir=str(tmp_path / "other"), config={"size": 0.02}
    )
    assert again.data_path != shapes.data_path
    assert pipeline.fingerprint(again, _splits(again)) == first
    # Another config: other knobs, other data.
    seed1 = pipeline.load_builder(
        "spurious_shapes", data_dir=str(tmp_path / "other"), config={"size": 0.02, "seed": 1}
    )
    assert pipeline.fingerprint(seed1, _splits(seed1)) != first
    # One label, one pixel, or the set of splits changed.
    splits = _splits(shapes)
    label = splits["test"].label.copy()
    label[5] = 1 - label[5]
    relabelled = {**splits, "test": dataclasses.replace(splits["test"], label=label)}
    assert pipeline.fingerprint(shapes, relabelled) != first
    pixels = splits["train"].images.numpy().copy()
    pixels[3, 2, 1, 0] ^= 1
    repainted = {
        **splits,
        "train": dataclasses.replace(splits["train"], images=tf.constant(pixels)),
    }
    assert pipeline.fingerprint(shapes, repainted) != first
    assert pipeline.fingerprint(shapes, {"test": splits["test"]}) != first
    # Encoded images (JPEG bytes): also by content, and one byte changes it.
    birds_print = pipeline.fingerprint(birds, _splits(birds))
    root = tmp_path / "birds"
    make_waterbirds(str(root / "manual"))
    birds_again = pipeline.load_builder(
        "waterbirds", data_dir=str(root / "tfds"), manual_dir=str(root / "manual")
    )
    assert pipeline.fingerprint(birds_again, _splits(birds_again)) == birds_print
    test = _splits(birds)["test"]
    jpegs = test.images.numpy().copy()
    jpegs[0] = jpegs[0][:-1] + bytes([jpegs[0][-1] ^ 1])
    changed = {**_splits(birds), "test": dataclasses.replace(test, images=tf.constant(jpegs))}
    assert pipeline.fingerprint(birds, changed) != birds_print


# --- quiet preparation -------------------------------------------------------------------------


def test_load_builder_prints_nothing(tmp_path, capfd):
    """No progress bars, 'Downloading and preparing' lines or TFDS warnings, bars restored."""
    tfds.enable_progress_bar()  # this module disables them; a user may not
    try:
        capfd.readouterr()
        builder = pipeline.load_builder(
            "spurious_shapes", data_dir=str(tmp_path), config={"size": 0.02, "seed": 2}
        )
        pipeline.load_split(builder, "validation")
        out, err = capfd.readouterr()
        assert (out, err) == ("", "")
        assert tqdm_utils._active  # restored after preparation
    finally:
        tfds.disable_progress_bar()
