"""Shared pieces of the dataset builders: the error type, features, group counts, PNG encoding.

Every builder yields examples with the same features:

- `image`: uint8 [H, W, 3] (PNG for generated data, the original JPEG bytes for files);
- `label`: the class y (ClassLabel);
- `place`: the spurious attribute a (ClassLabel);
- `group`: g = num_places * y + a (ClassLabel with num_classes * num_places names);
- `id`: a string that traces the example back to its source (file name or generated index).

Group counts per split are stored in `info.metadata['group_counts'][split]` (a
`tfds.core.MetadataDict`, saved as `metadata.json` beside the prepared data) and read back
with `group_counts(builder_or_info, split)`.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from agre_jax import errors

SPLITS = ("train", "validation", "test")
# Fixed integer codes of the splits, used to derive per-split random seeds.
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}


class DataError(errors.UserError):
    """A dataset's files are missing or malformed; the message names the expected layout."""


def group_names(class_names: Sequence[str], place_names: Sequence[str]) -> list[str]:
    """Names of groups g = len(place_names) * y + a, as '<class>_<place>'."""
    return [f"{c}_{p}" for c in class_names for p in place_names]


def make_features(
    image: tfds.features.Image, class_names: Sequence[str], place_names: Sequence[str]
) -> tfds.features.FeaturesDict:
    """The common FeaturesDict (image, label, place, group, id)."""
    return tfds.features.FeaturesDict(
        {
            "image": image,
            "label": tfds.features.ClassLabel(names=list(class_names)),
            "place": tfds.features.ClassLabel(names=list(place_names)),
            "group": tfds.features.ClassLabel(names=group_names(class_names, place_names)),
            "id": tfds.features.Text(),
        }
    )


def config_name(readable: str, knobs: Mapping[str, Any]) -> str:
    """A generated builder config's name: `readable` plus a hash of all its knobs (JSON data),
    so that each variant is prepared in its own directory."""
    digest = hashlib.sha1(json.dumps(dict(knobs), sort_keys=True).encode()).hexdigest()[:10]
    return f"{readable}_{digest}"


def count_groups(groups: np.ndarray, num_groups: int) -> list[int]:
    """Group histogram [num_groups] of an int array of group ids, as a JSON-friendly list."""
    return np.bincount(np.asarray(groups, np.int64), minlength=num_groups).tolist()


def describe_counts(counts: Mapping[str, Sequence[int]], names: Sequence[str]) -> str:
    """One line per split: 'train: landbird_land 3498, ...' (for descriptions and reports)."""
    lines = []
    for split, c in counts.items():
        nonzero = ", ".join(f"{n} {int(k)}" for n, k in zip(names, c, strict=True))
        lines.append(f"{split} ({int(sum(c))}): {nonzero}")
    return "\n".join(lines)


def describe_count_range(counts: Mapping[str, Sequence[int]]) -> str:
    """Per-group counts in brief, for datasets with many groups:
    'train min 0, max 199, 80 empty; validation min 15, max 15'."""
    parts = []
    for split, c in counts.items():
        c = np.asarray(c, np.int64)
        empty = int(np.sum(c == 0))
        text = f"{split} min {int(c.min())}, max {int(c.max())}"
        parts.append(text + (f", {empty} empty" if empty else ""))
    return "; ".join(parts)


def group_counts(builder_or_info: Any, split: str) -> np.ndarray:
    """Examples per group [num_groups] (int64) of a prepared split, from `info.metadata`.

    Args:
      builder_or_info: a `tfds.core.DatasetBuilder` or its `tfds.core.DatasetInfo`.
      split: 'train', 'validation' or 'test' (whole splits only, not slices).
    """
    info = getattr(builder_or_info, "info", builder_or_info)
    metadata = info.metadata or {}
    counts = metadata.get("group_counts", {})
    if split not in counts:
        raise KeyError(
            f"No group counts for split {split!r} of {info.full_name}: the metadata has "
            f"{sorted(counts)}. Is the dataset prepared?"
        )
    return np.asarray(counts[split], np.int64)


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG encoding of a uint8 [H, W, 3] array (pixels are exact, bytes depend on zlib)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # noisy pixels: speed
    return buf.getvalue()


def generate_examples(arrays: Mapping[str, np.ndarray], split: str) -> Iterator[tuple[int, dict]]:
    """A generated split's TFDS examples (key, features) from its arrays: image uint8
    [n, H, W, 3] (stored as PNG), label, place, group [n]."""
    for i in range(arrays["group"].size):
        yield (
            i,
            {
                "image": png_bytes(arrays["image"][i]),
                "label": int(arrays["label"][i]),
                "place": int(arrays["place"][i]),
                "group": int(arrays["group"][i]),
                "id": f"{split}_{i:05d}",
            },
        )


def image_bytes(path: str, fmt: str = "JPEG") -> bytes:
    """The file's bytes if it is a readable `fmt` image, else re-encoded to `fmt`.

    Raises:
      DataError: if the file is not a readable image.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as im:  # parses the header only (no full decode)
            if im.format == fmt:
                return data
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format=fmt, quality=95)
            return buf.getvalue()
    except (OSError, ValueError) as e:
        raise DataError(f"Unreadable image file {path}: {e}") from e
