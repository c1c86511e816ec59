"""Model variables on disk: an orbax tree plus a provenance record, written atomically.

Layout of a variables directory:

    DIR/variables/         orbax checkpoint of {'params': ..., 'batch_stats': ...} (float32)
    DIR/provenance.json    where the variables came from (any JSON-serialisable dict)

`save_variables` writes everything into a hidden sibling `.{name}.tmp-XXXX` and renames it
into place at the end, so an interrupted or failed write never leaves a half-written DIR.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from agre_jax import distributed

COLLECTIONS = ("params", "batch_stats")
VARIABLES = "variables"
PROVENANCE = "provenance.json"


def _is_nonempty(path: Path) -> bool:
    """True for a file (or link) or a directory with entries."""
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


def _as_float32_tree(variables: Mapping[str, Any]) -> dict[str, Any]:
    keys = set(variables)
    if keys != set(COLLECTIONS):
        raise ValueError(
            f"variables must have exactly the collections {list(COLLECTIONS)}; got {sorted(keys)}"
        )
    return {
        name: jax.tree.map(lambda x: np.asarray(x, dtype=np.float32), dict(variables[name]))
        for name in COLLECTIONS
    }


def save_variables(
    directory: str | os.PathLike,
    variables: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any],
    force: bool = False,
) -> None:
    """Writes `variables` and `metadata` to `directory`, atomically.

    Args:
      directory: destination; its parent is created if needed.
      variables: {'params': tree, 'batch_stats': tree}; stored as float32 numpy arrays.
      metadata: JSON-serialisable provenance, written to `provenance.json`.
      force: replace an existing non-empty `directory` (only once the new one is complete).

    Raises:
      FileExistsError: `directory` exists and is not empty, and not `force`.
      ValueError: `variables` lacks a collection or has others; `metadata` is not JSON.
    """
    if not distributed.is_primary():  # a multi-process run: process 0 writes for all
        return
    directory = Path(directory).absolute()
    if not force and _is_nonempty(directory):
        raise FileExistsError(
            f"{directory} already exists and is not empty; refusing to overwrite it "
            "(pass force=True, or --force on the command line, to replace it)"
        )
    tree = _as_float32_tree(variables)
    try:
        provenance = json.dumps(dict(metadata), indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata for {directory} is not JSON-serialisable: {e}") from e

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    old = None
    try:
        with ocp.StandardCheckpointer(
            multiprocessing_options=distributed.orbax_options()
        ) as checkpointer:
            checkpointer.save(tmp / VARIABLES, tree)
        with open(tmp / PROVENANCE, "w") as f:
            f.write(provenance + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if _is_nonempty(directory):
            if not force:  # appeared while we were writing
                raise FileExistsError(f"{directory} appeared while it was being written")
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / "previous")
        elif directory.is_dir():
            directory.rmdir()  # an empty directory: rename would succeed, but be explicit
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not directory.exists():
            os.replace(old / "previous", directory)  # put the previous one back
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_variables(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a directory written by `save_variables`.

    Returns:
      ({'params': tree, 'batch_stats': tree} of float32 numpy arrays, metadata dict).

    Raises:
      FileNotFoundError: the directory, its `variables/` or its `provenance.json` is missing.
      ValueError: the path is not a directory, or its contents cannot be read.
    """
    directory = Path(directory).absolute()
    expected = f"a directory written by save_variables, holding {VARIABLES}/ and {PROVENANCE}"
    if not directory.exists():
        raise FileNotFoundError(f"{directory} does not exist; expected {expected}")
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory; expected {expected}")
    for name in (VARIABLES, PROVENANCE):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory} has no {name}; expected {expected}")
    try:
        metadata = json.loads((directory / PROVENANCE).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {directory / PROVENANCE} as JSON: {e}") from e
    if not isinstance(metadata, dict):
        raise ValueError(f"{directory / PROVENANCE} holds a {type(metadata).__name__}, not a dict")
    try:
        with ocp.StandardCheckpointer(
            multiprocessing_options=distributed.orbax_options()
        ) as checkpointer:
            tree = checkpointer.restore(directory / VARIABLES)
    except Exception as e:
        raise ValueError(
            f"cannot read the orbax checkpoint {directory / VARIABLES}: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(tree, Mapping) or set(tree) != set(COLLECTIONS):
        found = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
        raise ValueError(
            f"{directory / VARIABLES} holds {found}; expected the collections {list(COLLECTIONS)}"
        )
    variables = {name: jax.tree.map(np.asarray, dict(tree[name])) for name in COLLECTIONS}
    return variables, metadata


def digest(variables: Mapping[str, Any]) -> str:
    """A content digest of variables (sha256, 16 hex): every leaf's path, dtype, shape and
    bytes. Stages key on it, never on the directory a checkpoint came from, so that a
    re-converted or edited checkpoint at the same path is never mistaken for the old one."""
    h = hashlib.sha256()
    for path, leaf in sorted(
        jax.tree_util.tree_leaves_with_path(dict(variables)),
        key=lambda kv: jax.tree_util.keystr(kv[0]),
    ):
        array = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()[:16]
