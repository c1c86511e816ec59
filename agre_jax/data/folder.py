"""The shared base of the builders that read a manually downloaded folder (Waterbirds, CelebA).

A subclass names its layout and supplies two class methods: `read_rows(root)` (validated rows per
split, each {'path', 'id', 'label', 'place', 'group'}) and `label_files(root)` (its metadata and
label files). The base finds the dataset folder in `manual_dir`, writes the examples (the images'
JPEG bytes), and records in `info.metadata`, beside `group_counts`:

- `source_folder`: the absolute path of the dataset folder it was prepared from;
- `source_digest`: `source_digest(...)` of that folder, a sha256 over the bytes of its label
  files and the sorted (relative path, size) of its image files. It costs one stat per file and
  no image read, so `pipeline.load_builder` recomputes it to check that a given manual_dir is the
  folder the prepared data came from.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence

import tensorflow_datasets as tfds

from agre_jax.data import core

SOURCE_FOLDER = "source_folder"
SOURCE_DIGEST = "source_digest"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def find_root(
    manual_dir: os.PathLike | str,
    folder_names: Sequence[str],
    is_root: Callable[[str], bool],
    title: str,
    wanted: str,
    error: Callable[[str], core.DataError],
) -> str:
    """The dataset folder: `manual_dir` itself or its child named as in `folder_names`."""
    manual_dir = os.fspath(manual_dir)
    candidates = [manual_dir] + [os.path.join(manual_dir, n) for n in folder_names]
    for c in candidates:
        if is_root(c):
            return c
    if not os.path.isdir(manual_dir):
        raise error(f"{title} folder {manual_dir} does not exist.")
    raise error(f"No {wanted} found in any of {candidates}.")


def example_row(path: str, example_id: str, label: int, place: int) -> dict:
    """One validated row: {'path', 'id', 'label', 'place', 'group'} with group 2 * label + place."""
    return {
        "path": path,
        "id": example_id,
        "label": label,
        "place": place,
        "group": 2 * label + place,
    }


def check_rows(
    rows: dict[str, list[dict]],
    missing: Sequence[str],
    error: Callable[[str], core.DataError],
    no_rows: str,
) -> dict[str, list[dict]]:
    """`rows` if no image file is missing and no split is empty, else DataError.

    `no_rows` starts the empty-split message: '<no_rows> for split(s) [...].'
    """
    if missing:
        raise error(f"Missing image file {missing[0]} (and {len(missing) - 1} more).")
    empty = [s for s, r in rows.items() if not r]
    if empty:
        raise error(f"{no_rows} for split(s) {empty}.")
    return rows


def source_digest(root: str, label_files: Sequence[str]) -> str:
    """sha256 (hex) of a dataset folder: its label files' bytes, then its image files' sizes.

    Image files are the files below `root` whose names end in `IMAGE_EXTENSIONS`; each adds its
    path relative to `root` (with '/') and its size, in sorted order. Only `stat` is called on
    them. The result does not depend on where the folder is.
    """
    h = hashlib.sha256()
    for path in sorted(label_files, key=lambda p: os.path.relpath(p, root)):
        with open(path, "rb") as f:
            content = f.read()
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        h.update(f"label_file {rel} {len(content)}\n".encode())
        h.update(content)
    images = []
    stack = [""]  # folders relative to root, '' or ending in '/'
    while stack:
        rel_folder = stack.pop()
        with os.scandir(os.path.join(root, rel_folder)) as entries:
            for e in entries:
                if e.is_dir():
                    stack.append(f"{rel_folder}{e.name}/")
                elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                    images.append((rel_folder + e.name, e.stat().st_size))
    images.sort()
    h.update("".join(f"image {rel} {size}\n" for rel, size in images).encode())
    return h.hexdigest()


class FolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A dataset read from a manually downloaded folder (see the module docstring)."""

    # Set by subclasses (with VERSION, RELEASE_NOTES and MANUAL_DOWNLOAD_INSTRUCTIONS).
    TITLE: str  # the dataset's name in messages, e.g. 'Waterbirds'
    DESCRIPTION: str
    HOMEPAGE: str
    LAYOUT: str
    FOLDER_NAMES: Sequence[str]
    ROOT_FILE: str  # what marks the dataset folder, in messages: 'metadata.csv'
    CLASS_NAMES: Sequence[str]
    PLACE_NAMES: Sequence[str]

    @classmethod
    def error(cls, message: str) -> core.DataError:
        return core.DataError(f"{message}\nExpected layout:\n{cls.LAYOUT}")

    @classmethod
    def is_root(cls, path: str) -> bool:
        """Whether `path` is the dataset folder itself."""
        raise NotImplementedError

    @classmethod
    def read_rows(cls, root: str) -> dict[str, list[dict]]:
        """Validated rows per split: {'train': [{'path', 'id', 'label', 'place', 'group'}]}."""
        raise NotImplementedError

    @classmethod
    def label_files(cls, root: str) -> list[str]:
        """The metadata and label files of the dataset folder (read in full by the digest)."""
        raise NotImplementedError

    @classmethod
    def find_root(cls, manual_dir: os.PathLike | str) -> str:
        return find_root(
            manual_dir, cls.FOLDER_NAMES, cls.is_root, cls.TITLE, cls.ROOT_FILE, cls.error
        )

    @classmethod
    def source_record(cls, manual_dir: os.PathLike | str) -> dict[str, str]:
        """{SOURCE_FOLDER: absolute dataset folder, SOURCE_DIGEST: its digest} of `manual_dir`.

        Raises:
          DataError: if `manual_dir` holds no dataset folder.
        """
        root = os.path.abspath(cls.find_root(manual_dir))
        return {SOURCE_FOLDER: root, SOURCE_DIGEST: source_digest(root, cls.label_files(root))}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=self.DESCRIPTION
            + "\nGroup counts per split: info.metadata['group_counts'].",
            features=core.make_features(
                tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                self.CLASS_NAMES,
                self.PLACE_NAMES,
            ),
            metadata=tfds.core.MetadataDict(),
            homepage=self.HOMEPAGE,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError as e:  # TFDS' message for a missing or empty folder
            raise self.error(f"{self.TITLE} folder missing: {e}") from e
        root = self.find_root(manual_dir)
        rows = self.read_rows(root)
        self.info.metadata["group_counts"] = {
            s: core.count_groups([r["group"] for r in rows[s]], 4) for s in core.SPLITS
        }
        self.info.metadata.update(self.source_record(root))
        return {s: self._generate_examples(rows[s]) for s in core.SPLITS}

    def _generate_examples(self, rows: list[dict]):
        for i, r in enumerate(rows):
            example = {k: r[k] for k in ("id", "label", "place", "group")}
            yield i, {"image": core.image_bytes(r["path"]), **example}
