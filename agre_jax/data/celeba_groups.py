"""`celeba_groups`: CelebA with class Blond_Hair and spurious attribute Male (Sagawa et al. 2019).

Class y: not_blond (0) / blond (1); attribute a = `place`: female (0) / male (1);
group g = 2 * y + a. Official splits from `list_eval_partition` (0 train, 1 validation, 2 test).
Named `celeba_groups` because TFDS has its own `celeb_a`. Reads the standard folder from
`manual_dir`, with the attribute and partition files either in the original text format or in
Kaggle's CSV format; everything is validated before any example is written. Images are stored
as the original JPEG bytes.
"""

from __future__ import annotations

import csv
import os

import tensorflow_datasets as tfds

from agre_jax.data import core, folder

CLASS_NAMES = ("not_blond", "blond")
PLACE_NAMES = ("female", "male")
FOLDER_NAMES = ("celeba", "CelebA")
SPLIT_OF_CODE = {0: "train", 1: "validation", 2: "test"}
DESCRIPTION = __doc__.split("\n\n")[1]
_ANNOTATION_DIRS = ("", "Anno", "Eval")  # the original archive keeps the lists in Anno/, Eval/
_IMAGE_DIRS = (
    "img_align_celeba/img_align_celeba",  # Kaggle's zip nests the folder
    "img_align_celeba",
    "Img/img_align_celeba",
)

LAYOUT = """\
<manual_dir>/ is the CelebA folder itself or a parent of a folder named celeba/ or CelebA/;
the CelebA folder holds (the two lists may also sit in Anno/ and Eval/)
  img_align_celeba/           000001.jpg ... 202599.jpg (also img_align_celeba/img_align_celeba/
                              as in Kaggle's zip, or Img/img_align_celeba/)
  list_attr_celeba.txt        line 1: the count, line 2: the 40 attribute names, then
                              '<file> v1 v2 ...' with values -1/1; or list_attr_celeba.csv
                              (Kaggle: header image_id,5_o_Clock_Shadow,...; values -1/1)
  list_eval_partition.txt     '<file> <0|1|2>' (train, validation, test); or
                              list_eval_partition.csv (header image_id,partition)
Used attributes: Blond_Hair (class) and Male (spurious attribute).
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download CelebA's aligned images and lists from
https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive: Img/img_align_celeba.zip,
Anno/list_attr_celeba.txt, Eval/list_eval_partition.txt) or Kaggle's 'celeba-dataset'
(https://www.kaggle.com/datasets/jessicali9530/celeba-dataset), extract, and pass the folder
as manual_dir (default: <data_dir>/downloads/manual/). Expected layout:
{LAYOUT}"""


def _error(message: str) -> core.DataError:
    return CelebaGroups.error(message)


def _find_file(root: str, stem: str) -> str | None:
    for d in _ANNOTATION_DIRS:
        for ext in (".txt", ".csv"):
            path = os.path.join(root, d, stem + ext)
            if os.path.isfile(path):
                return path
    return None


def find_root(manual_dir: os.PathLike | str) -> str:
    """The CelebA folder: `manual_dir` itself or its child named as in `FOLDER_NAMES`."""
    return CelebaGroups.find_root(manual_dir)


def _read_table(path: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(attribute names, [(line number, [file, v1, v2, ...])]) of a txt or csv list."""
    with open(path, newline="") as f:
        if path.endswith(".csv"):
            lines = [(i, row) for i, row in enumerate(csv.reader(f), start=1) if row]
            return lines[0][1][1:], lines[1:]
        lines = [(i, line.split()) for i, line in enumerate(f, start=1)]
    lines = [(i, row) for i, row in lines if row]
    if path.endswith("list_attr_celeba.txt"):  # count line, then the names
        return lines[1][1] if len(lines) > 1 else [], lines[2:]
    return [], lines


def read_annotations(root: str) -> dict[str, list[dict]]:
    """Validated rows per split: {'train': [{'path', 'id', 'label', 'place', 'group'}, ...]}.

    Raises:
      DataError: naming the first offending file or line.
    """
    attr_path = _find_file(root, "list_attr_celeba")
    part_path = _find_file(root, "list_eval_partition")
    image_dir = next(
        (os.path.join(root, d) for d in _IMAGE_DIRS if os.path.isdir(os.path.join(root, d))), None
    )
    if part_path is None:
        raise _error(f"No list_eval_partition.txt/.csv in {root}.")
    if image_dir is None:
        raise _error(f"No img_align_celeba/ folder in {root}.")
    try:
        names, attr_rows = _read_table(attr_path)
        _, part_rows = _read_table(part_path)
    except (OSError, UnicodeDecodeError, csv.Error, IndexError) as e:
        raise _error(f"Cannot read {attr_path} / {part_path}: {e}") from e
    try:
        blond_col, male_col = 1 + names.index("Blond_Hair"), 1 + names.index("Male")
    except ValueError as e:
        raise _error(f"{attr_path} lacks the Blond_Hair or Male column (has {names}).") from e

    partition = {}
    for line, row in part_rows:
        if len(row) != 2 or row[1] not in ("0", "1", "2"):
            raise _error(f"{part_path} line {line}: expected '<file> <0|1|2>', got {row}.")
        partition[row[0]] = int(row[1])

    files = set(os.listdir(image_dir))
    out = {s: [] for s in core.SPLITS}
    missing = []
    for line, row in attr_rows:
        if len(row) != len(names) + 1:
            raise _error(f"{attr_path} line {line}: expected {len(names) + 1} fields, got {row}.")
        values = (row[blond_col], row[male_col])
        if any(v not in ("-1", "0", "1") for v in values):
            raise _error(f"{attr_path} line {line}: attribute values must be -1/1, got {row}.")
        name = row[0]
        if name not in partition:
            raise _error(f"{part_path} has no partition for {name} ({attr_path} line {line}).")
        if name not in files:
            missing.append(os.path.join(image_dir, name))
        y, a = (int(v == "1") for v in values)
        out[SPLIT_OF_CODE[partition[name]]].append(
            folder.example_row(os.path.join(image_dir, name), name, y, a)
        )
    return folder.check_rows(out, missing, _error, f"{attr_path} and {part_path} give no images")


class CelebaGroups(folder.FolderBuilder):
    """CelebA: Blond_Hair (class) vs Male (spurious attribute)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    TITLE = "CelebA"
    DESCRIPTION = DESCRIPTION
    HOMEPAGE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
    LAYOUT = LAYOUT
    FOLDER_NAMES = FOLDER_NAMES
    ROOT_FILE = "list_attr_celeba.txt/.csv"
    CLASS_NAMES = CLASS_NAMES
    PLACE_NAMES = PLACE_NAMES

    @classmethod
    def is_root(cls, path: str) -> bool:
        return _find_file(path, "list_attr_celeba") is not None

    @classmethod
    def read_rows(cls, root: str) -> dict[str, list[dict]]:
        return read_annotations(root)

    @classmethod
    def label_files(cls, root: str) -> list[str]:
        found = (_find_file(root, s) for s in ("list_attr_celeba", "list_eval_partition"))
        return [p for p in found if p is not None]
