"""Workdir bookkeeping: the recorded config, stage directories keyed by their settings, done
markers and atomic writes. Nothing here deletes results except `--overwrite`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

CONFIG_FILE = "config.json"
DONE_FILE = "done.json"
# Keys that change how a run looks, not what it computes.
_COSMETIC = ("progress",)
# What `--overwrite` removes: the run's own outputs (stages keyed by settings stay valid).
RUN_OUTPUTS = ("distill", "results.json", "results.md")


class ConfigMismatchError(ValueError):
    """The workdir was made with another config."""


def atomic_write_text(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename (mode 0644, not
    mkstemp's 0600: configs and reports are meant to be read by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(
        path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"
    )


def _json_default(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON data, without cosmetic keys."""
    data = json.loads(config.to_json_best_effort(sort_keys=True))
    for key in _COSMETIC:
        data.pop(key, None)
    return data


def key_of(data: Any) -> str:
    """A short stable hash of JSON data (stage directory names)."""
    blob = json.dumps(data, sort_keys=True, default=_json_default).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def prepare(workdir: Path, config: ml_collections.ConfigDict, overwrite: bool) -> None:
    """Records the config in a new workdir, accepts the same config again (resume / reuse),
    and refuses another one unless `overwrite`, which removes the run's own outputs."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_FILE
    current = config_dict(config)
    if path.exists():
        try:
            recorded = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigMismatchError(f"{path} is not valid JSON ({e}); pass --overwrite") from e
        if recorded != current:
            if not overwrite:
                diff = sorted(_diff(recorded, current))
                raise ConfigMismatchError(
                    f"the workdir {workdir} was made with another config (differences: "
                    f"{', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}). Use another "
                    "--workdir, or pass --overwrite to replace this run's results (teacher and "
                    "DFR stages keyed by their own settings are kept)."
                )
            for name in RUN_OUTPUTS:
                target = workdir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    write_json(path, current)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def is_done(directory: Path) -> bool:
    return (directory / DONE_FILE).exists()


def read_done(directory: Path) -> dict[str, Any]:
    return json.loads((directory / DONE_FILE).read_text())


def mark_done(directory: Path, info: Mapping[str, Any]) -> None:
    """Marks a stage complete (written last, atomically: a stage without it is redone)."""
    write_json(directory / DONE_FILE, dict(info))
