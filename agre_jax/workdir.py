"""Workdir bookkeeping: the recorded config, stage directories keyed by their settings, done
markers, atomic writes, a check that the workdir can be written and a lock against two runs in
one workdir. Nothing here deletes results except `--overwrite`."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from agre_jax import distributed, errors

CONFIG_FILE = "config.json"
DONE_FILE = "done.json"
# Keys that change how a run looks or where it runs, not what it computes.
_COSMETIC = ("progress", "distributed")
# What `--overwrite` removes: the run's own outputs (stages keyed by settings stay valid).
RUN_OUTPUTS = ("distill", "results.json", "results.md")
# Held (flock) by the run using a workdir; it records who holds it.
LOCK_FILE = ".lock"


class ConfigMismatchError(errors.WorkdirError):
    """The workdir was made with another config."""


def atomic_write_text(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename (mode 0644, not
    mkstemp's 0600: configs and reports are meant to be read by others). In a multi-process
    run only process 0 writes (agre_jax/distributed.py); the others' calls do nothing."""
    if not distributed.is_primary():
        return
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


# Config keys added after runs were recorded, each with the value that keeps those runs'
# behaviour: a recorded config without the key is the same config when the current value is
# this one (so that upgrading agre-jax does not make every finished run "another config").
# Add a key here whenever configs/default.py gains one that earlier runs behaved as.
ADDED_KEYS: dict[str, Any] = {
    "distill.aekd_cap": 0.6,  # AE-KD (only read by weighting='aekd', which came with it)
    "baselines.deep_ensemble": False,
    "distill.crd_dim": 128,  # CRD (only read by feature_loss='crd', which came with it)
    "distill.crd_temperature": 0.07,
    "biased.arch": "",
    "distill.feature_weighting": "shared",
    "teachers.archs": [],  # (config_dict lists tuples)
    "data.device_augment": False,
    **{
        f"pretrain.per_arch.{arch}.{k}": v
        for arch in ("resnet18", "resnet34", "resnet50")  # models.ARCHS
        for k, v in (("epochs", 0), ("zero_init_residual", False))
    },
}

# pretrain.per_arch.<arch>.* only change the pretraining of <arch>'s network: between two
# configs neither of which pretrains one, they are not differences (the same stages).
PER_ARCH_PREFIX = "pretrain.per_arch."


# Keys whose value may be a request that each run resolves on the machine it runs on, with
# the values it resolves to (settings.resolve_dtype): runs record the resolved value. A current
# config holding the request (a sweep's runs, resolved in their jobs, compared in the process
# that submits them) accepts any of those; a run's own config is resolved before it is
# recorded or compared (main.py, launch.run_one), so it compares resolved values.
RESOLVED_KEYS: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "dtype": ("auto", ("float32", "bfloat16")),
}


def config_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys where two config dicts (config_dict) differ, except keys of ADDED_KEYS that
    the recorded one lacks while the current one has their neutral value, and keys of
    RESOLVED_KEYS where the current one holds the request and the recorded one a value it
    resolves to. teachers.archs naming one architecture equals teachers.arch set to it
    (settings.validate has checked that it has teachers.num entries), and
    pretrain.per_arch.<arch> keys count only where either config pretrains an <arch>."""
    recorded, current = _one_architecture(recorded), _one_architecture(current)
    pretrained = _pretrained_archs(recorded) | _pretrained_archs(current)
    return [
        k
        for k in _diff(recorded, current)
        if not (k in ADDED_KEYS and _lacks(recorded, k) and _get(current, k) == ADDED_KEYS[k])
        and not _resolved(recorded, current, k)
        and not (
            k.startswith(PER_ARCH_PREFIX)
            and k[len(PER_ARCH_PREFIX) :].split(".")[0] not in pretrained
        )
    ]


def _pretrained_archs(data: Mapping[str, Any]) -> set[str]:
    """The architectures a config dict's pretrain stage trains: its teachers' (unless
    ported), student's and trained biased model's (stages.pretrain_roles)."""

    def section(name: str) -> Mapping[str, Any]:
        value = data.get(name)
        return value if isinstance(value, Mapping) else {}

    if section("pretrain").get("enabled") is not True:
        return set()
    t = section("teachers")
    archs = {section("student").get("arch"), section("biased").get("arch")}
    if not t.get("checkpoints"):
        archs |= set(t.get("archs") or [t.get("arch")])
    return {a for a in archs if isinstance(a, str) and a}


def _one_architecture(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """The config dict with teachers.archs of a single architecture spelled as teachers.arch
    (teachers.archs empty): the same teachers, the same stages (stages.stage_keys), so the
    same config."""
    t = data.get("teachers")
    archs = t.get("archs") if isinstance(t, Mapping) else None
    if not isinstance(archs, list) or not archs or len(set(map(str, archs))) != 1:
        return data
    return {**data, "teachers": {**t, "arch": archs[0], "archs": []}}


def _resolved(recorded: Mapping[str, Any], current: Mapping[str, Any], key: str) -> bool:
    if key not in RESOLVED_KEYS or _lacks(recorded, key) or _lacks(current, key):
        return False
    request, values = RESOLVED_KEYS[key]
    return _get(current, key) == request and _get(recorded, key) in values


def _lacks(data: Mapping[str, Any], dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return True
        data = data[part]
    return False


def _get(data: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
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
        diff = sorted(config_differences(recorded, current))
        if diff:
            if not overwrite:
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
    """Dotted leaf keys where a and b differ (a key present in one only counts; a section
    present in one only counts as each of its leaves)."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not all(x is None or isinstance(x, Mapping) for x in (a, b)):
            return [prefix.rstrip(".")]
        a, b = a or {}, b or {}
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


def check_writable(directory: Path) -> None:
    """Raises `errors.WorkdirError` unless `directory` is a directory that can be written or,
    when it does not exist yet, its nearest existing ancestor is one (so that it can be made).

    Writing is probed by creating and removing a temporary file (permission bits alone say
    nothing to root, nor about read-only file systems). Nothing is created: a bad path leaves
    nothing behind.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        what = "a file" if directory.is_file() else "not a directory"
        raise errors.WorkdirError(
            f"{directory} is {what}; expected a directory for the run's outputs"
        )
    if directory.is_symlink() and not directory.exists():
        raise errors.WorkdirError(
            f"{directory} is a broken symbolic link (to {os.readlink(directory)}); expected a "
            "directory for the run's outputs"
        )
    target = directory
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        reason = f"{target} is {'a file' if target.is_file() else 'not a directory'}"
        raise errors.WorkdirError(
            f"cannot write to {directory} ({reason}); expected a writable directory"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=target)
    except OSError as e:
        reason = e.strerror or os.strerror(e.errno or errno.EIO)
        if target != directory:
            reason += f" in {target}"
        raise errors.WorkdirError(
            f"cannot write to {directory} ({reason}); expected a writable directory"
        ) from e
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def lock(directory: Path) -> Iterator[None]:
    """Holds `directory/.lock` (an exclusive flock; the directory is made if needed) while the
    context runs, with the holder's pid, host, start time and command line written in it.

    Raises `errors.WorkdirError` at once when another run holds it. The lock goes with the
    process (flock is released when its descriptor closes, kill -9 included); the file stays.
    Not re-entrant: a second `lock` of the same directory inside the first fails too.
    In a multi-process run, process 0 holds it for all (the others do not take it).
    """
    if not distributed.is_primary():
        yield
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise errors.WorkdirError(
                f"{directory} is in use by another run ({_holder(path)}); wait for it to "
                "finish or use another --workdir"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        try:
            yield
        finally:
            # Cleared while still held: a stale holder is never named after this run.
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    """'pid P on HOST since TIME: COMMAND' from a lock file, as far as it can be read."""
    try:
        holder = json.loads(path.read_text())
        return (
            f"pid {holder['pid']} on {holder['host']} since {holder['since']}: {holder['command']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        # Taken a moment ago and not written yet, or not written by `lock`.
        return "holder not recorded yet"
