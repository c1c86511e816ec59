"""`waterbirds`: Waterbirds (Sagawa et al. 2019) from a manually downloaded folder.

Class y: landbird (0) / waterbird (1); attribute a = `place`: land (0) / water (1);
group g = 2 * y + a. Splits from the `split` column of `metadata.csv` (0 train, 1 validation,
2 test). Images are stored as the original JPEG bytes (files that are not JPEG are re-encoded).
The metadata is validated in full (columns, integer values, split codes, every image file)
before any example is written; a file that turns out unreadable while writing raises
`DataError` too, and TFDS leaves no prepared-looking dataset behind.
"""

from __future__ import annotations

import csv
import os

import tensorflow_datasets as tfds

from agre_jax.data import core, folder

CLASS_NAMES = ("landbird", "waterbird")
PLACE_NAMES = ("land", "water")
FOLDER_NAMES = ("waterbird_complete95_forest2water2", "waterbirds_v1.0")
REQUIRED_COLUMNS = ("img_filename", "y", "split", "place")
SPLIT_OF_CODE = {0: "train", 1: "validation", 2: "test"}
DESCRIPTION = __doc__.split("\n\n")[1]

LAYOUT = """\
<manual_dir>/ is either the dataset folder itself or a parent of a folder named
waterbird_complete95_forest2water2/ or waterbirds_v1.0/; the dataset folder holds
  metadata.csv   columns img_filename,y,split,place (others ignored); y in {0,1}
                 (landbird, waterbird), place in {0,1} (land, water), split in {0,1,2}
                 (train, validation, test)
  <img_filename> the JPEG files, e.g. 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download one of
  https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz  (original), or
  WILDS' waterbirds_v1.0, a tar.gz served at
  https://worksheets.codalab.org/rest/bundles/0x505056d5cdea4e4eaa0e242cbfe2daa4/contents/blob/
  (the URL `wilds.get_dataset('waterbirds', download=True)` uses),
extract it, and pass its folder (or the folder that contains it) as manual_dir (default:
<data_dir>/downloads/manual/). Expected layout:
{LAYOUT}"""


def _error(message: str) -> core.DataError:
    return Waterbirds.error(message)


def find_root(manual_dir: os.PathLike | str) -> str:
    """The dataset folder: `manual_dir` itself or its child named as in `FOLDER_NAMES`."""
    return Waterbirds.find_root(manual_dir)


def read_metadata(root: str) -> dict[str, list[dict]]:
    """Validated rows per split: {'train': [{'path', 'id', 'label', 'place', 'group'}, ...]}.

    Raises:
      DataError: naming the first offending row or file (and how many more there are).
    """
    path = os.path.join(root, "metadata.csv")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise _error(f"Cannot read {path}: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise _error(f"{path} lacks columns {missing} (has {list(columns)}).")
    out = {s: [] for s in core.SPLITS}
    missing_files = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        try:
            y, code, place = (int(row[c]) for c in ("y", "split", "place"))
        except (TypeError, ValueError) as e:
            raise _error(f"{path} line {line}: non-integer y/split/place in {row}.") from e
        if y not in (0, 1) or place not in (0, 1):
            raise _error(f"{path} line {line}: y and place must be 0 or 1, got {row}.")
        if code not in SPLIT_OF_CODE:
            raise _error(f"{path} line {line}: unknown split code {code} (expected 0, 1, 2).")
        if not row["img_filename"]:
            raise _error(f"{path} line {line}: empty img_filename in {row}.")
        image_path = os.path.join(root, row["img_filename"])
        if not os.path.isfile(image_path):
            missing_files.append(image_path)
        out[SPLIT_OF_CODE[code]].append(
            folder.example_row(image_path, row["img_filename"], y, place)
        )
    return folder.check_rows(out, missing_files, _error, f"{path} has no rows")


class Waterbirds(folder.FolderBuilder):
    """Waterbirds: bird type (class) vs background (spurious attribute)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    TITLE = "Waterbirds"
    DESCRIPTION = DESCRIPTION
    HOMEPAGE = "https://github.com/kohpangwei/group_DRO"
    LAYOUT = LAYOUT
    FOLDER_NAMES = FOLDER_NAMES
    ROOT_FILE = "metadata.csv"
    CLASS_NAMES = CLASS_NAMES
    PLACE_NAMES = PLACE_NAMES

    @classmethod
    def is_root(cls, path: str) -> bool:
        return os.path.isfile(os.path.join(path, "metadata.csv"))

    @classmethod
    def read_rows(cls, root: str) -> dict[str, list[dict]]:
        return read_metadata(root)

    @classmethod
    def label_files(cls, root: str) -> list[str]:
        return [os.path.join(root, "metadata.csv")]
