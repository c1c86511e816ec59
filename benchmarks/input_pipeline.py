"""Images per second of the input pipeline (training with augmentation, and evaluation).

Two sources: the embedded `spurious_shapes` default at 32 px (decoded images cached in memory),
and a fake Waterbirds-like folder of random 256-400 px JPEGs read at 224 px (decoded per example,
`decode_and_crop_jpeg`). Each row is timed over full epochs after one warm-up epoch; batches are
consumed as numpy (no device transfer). 'eval square' is the DFR / group_DRO evaluation transform
(`eval_transform='square_resize_crop'`). Also prints the time of `pipeline.fingerprint` of each
source (all three splits, in memory).

The device path (`data.device_augment`, agre_jax/data/device_input.py) has two rows: 'device:
host' is what the host does per batch (gather cached uint8 images and the augmentation
parameters), 'device: +augment' adds the jitted `device_input.augment` (crop, resize, flip,
normalise) run here on the CPU, where a GPU would run it inside the step. The time to build
the cache (decode and resize every training image once) is printed first.

  python benchmarks/input_pipeline.py [--data_dir DIR] [--num_jpegs 400] [--epochs 3]
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time

import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from agre_jax.data import device_input, pipeline


def fake_waterbirds(root: str, num: int, seed: int = 0) -> None:
    """A Waterbirds-like folder: metadata.csv and `num` JPEGs of random size 256-400 px."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num):
        h, w = rng.integers(256, 401, 2)
        # Smooth colour fields plus noise: closer to photos' JPEG size than white noise.
        coarse = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), np.int16)
        image = np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
        name = f"{i % 200:03d}.Bird/img_{i:05d}.jpg"
        os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
        Image.fromarray(image).save(os.path.join(root, name), quality=90)
        split = 0 if i < int(0.8 * num) else (1 if i < int(0.9 * num) else 2)
        rows.append({"img_filename": name, "y": i % 2, "split": split, "place": (i // 2) % 2})
    with open(os.path.join(root, "metadata.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["img_filename", "y", "split", "place"])
        writer.writeheader()
        writer.writerows(rows)


def throughput(make_iter, epochs: int) -> float:
    """Images per second over `epochs` passes, after one warm-up pass."""
    for _ in make_iter(0):
        pass
    n, start = 0, time.perf_counter()
    for e in range(1, epochs + 1):
        for batch in make_iter(e):
            n += batch["label"].size
    return n / (time.perf_counter() - start)


def augmented(batches, image_size: int):
    """`batches` (device path) through the jitted device augmentation, waited for."""
    fn = jax.jit(lambda b: device_input.augment(b, image_size, np.float32))
    for batch in batches:
        out = fn(batch)
        out["image"].block_until_ready()
        yield out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: a temp dir)")
    parser.add_argument("--num_jpegs", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    tfds.disable_progress_bar()
    tmp = tempfile.mkdtemp(prefix="agre_bench_")
    data_dir = args.data_dir or os.path.join(tmp, "tfds")

    start = time.perf_counter()
    shapes = pipeline.load_builder("spurious_shapes", data_dir=data_dir)
    print(
        f"spurious_shapes default ready in {time.perf_counter() - start:.1f} s "
        f"(includes generation if it was not prepared)"
    )
    manual = os.path.join(tmp, "waterbirds_fake")
    fake_waterbirds(manual, args.num_jpegs)
    birds = pipeline.load_builder(
        "waterbirds", data_dir=os.path.join(tmp, "tfds_fake"), manual_dir=manual
    )

    for name, builder in (("spurious_shapes", shapes), ("fake waterbirds", birds)):
        splits = {s: pipeline.load_split(builder, s) for s in ("train", "validation", "test")}
        start = time.perf_counter()
        fingerprint = pipeline.fingerprint(builder, splits)
        print(f"{name} fingerprint {fingerprint} in {time.perf_counter() - start:.3f} s")

    rows = []
    for name, builder, size, batch in (
        ("spurious_shapes 32px", shapes, 32, 64),
        ("fake waterbirds JPEG", birds, 224, 32),
    ):
        split = pipeline.load_split(builder, "train")
        common = {"batch_size": batch, "image_size": size, "prefetch": 0}
        start = time.perf_counter()
        cache = device_input.train_cache(builder, split, image_size=size)
        print(
            f"{name}: device-input cache {tuple(cache.images.shape)} ready in "
            f"{time.perf_counter() - start:.1f} s"
        )
        for mode, fn in (
            ("train (augment)", lambda e, s=split, c=common: pipeline.train_epoch(
                s, seed=0, epoch=e, **c)),
            ("train balanced", lambda e, s=split, c=common: pipeline.train_epoch(
                s, seed=0, epoch=e, balanced=True, **c)),
            ("eval", lambda e, s=split, c=common: pipeline.eval_batches(s, **c)),
            ("eval square", lambda e, s=split, c=common: pipeline.eval_batches(
                s, eval_transform="square_resize_crop", **c)),
            ("device: host", lambda e, s=split, c=common, k=cache: pipeline.train_epoch(
                s, seed=0, epoch=e, cache=k, **c)),
            ("device: +augment", lambda e, s=split, c=common, k=cache: augmented(
                pipeline.train_epoch(s, seed=0, epoch=e, cache=k, **c), c["image_size"])),
        ):  # fmt: skip
            rows.append((name, split.num_examples, size, batch, mode, throughput(fn, args.epochs)))

    print(f"\n{'source':22} {'n':>6} {'px':>4} {'batch':>5} {'mode':16} {'img/s':>8}")
    for name, n, size, batch, mode, rate in rows:
        print(f"{name:22} {n:6d} {size:4d} {batch:5d} {mode:16} {rate:8.0f}")


if __name__ == "__main__":
    main()
