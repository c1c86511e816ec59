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

from agre_jax.data import core

CLASS_NAMES = ("landbird", "waterbird")
PLACE_NAMES = ("land", "water")
FOLDER_NAMES = ("waterbird_complete95_forest2water2", "waterbirds_v1.0")
REQUIRED_COLUMNS = ("img_filename", "y", "split", "place")
SPLIT_OF_CODE = {0: "train", 1: "validation", 2: "test"}

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
    return core.DataError(f"{message}\nExpected layout:\n{LAYOUT}")


def find_root(manual_dir: os.PathLike | str) -> str:
    """The dataset folder: `manual_dir` itself or its child named as in `FOLDER_NAMES`."""
    manual_dir = os.fspath(manual_dir)
    candidates = [manual_dir] + [os.path.join(manual_dir, n) for n in FOLDER_NAMES]
    for c in candidates:
        if os.path.isfile(os.path.join(c, "metadata.csv")):
            return c
    if not os.path.isdir(manual_dir):
        raise _error(f"Waterbirds folder {manual_dir} does not exist.")
    raise _error(f"No metadata.csv found in any of {candidates}.")


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
            {
                "path": image_path,
                "id": row["img_filename"],
                "label": y,
                "place": place,
                "group": 2 * y + place,
            }
        )
    if missing_files:
        raise _error(f"Missing image file {missing_files[0]} (and {len(missing_files) - 1} more).")
    empty = [s for s, r in out.items() if not r]
    if empty:
        raise _error(f"{path} has no rows for split(s) {empty}.")
    return out


class Waterbirds(tfds.core.GeneratorBasedBuilder):
    """Waterbirds: bird type (class) vs background (spurious attribute)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__.split("\n\n")[1]
            + "\nGroup counts per split: info.metadata['group_counts'].",
            features=core.make_features(
                tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                CLASS_NAMES,
                PLACE_NAMES,
            ),
            metadata=tfds.core.MetadataDict(),
            homepage="https://github.com/kohpangwei/group_DRO",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError as e:  # TFDS' message for a missing or empty folder
            raise _error(f"Waterbirds folder missing: {e}") from e
        rows = read_metadata(find_root(manual_dir))
        self.info.metadata["group_counts"] = {
            s: core.count_groups([r["group"] for r in rows[s]], 4) for s in core.SPLITS
        }
        return {s: self._generate_examples(rows[s]) for s in core.SPLITS}

    def _generate_examples(self, rows: list[dict]):
        for i, r in enumerate(rows):
            example = {k: r[k] for k in ("id", "label", "place", "group")}
            yield i, {"image": core.image_bytes(r["path"]), **example}
