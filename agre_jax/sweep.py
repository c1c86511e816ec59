"""Sweep definitions: many runs of one base config (variants x seeds), compared in a report.

A sweep is a config file too (`configs/sweeps/*.py`): the base config (dataset preset from the
file's argument) plus a `sweep` field that names the variants (dotted overrides and the labels
that drive the plots), the seeds and the baseline variant. Every variant x seed is its own
resumable run, `<dir>/runs/<variant>/seed<k>/`; teacher and DFR stages live in `<dir>/stages/`
and are trained once for all runs (`config.seed` seeds the student only).

This module only defines sweeps and their directory layout. `agre_jax.sweep_runner` runs them
(`train.train_and_evaluate` per run, skipping finished runs and going on past failed ones) and
`agre_jax.report` aggregates a sweep directory into tables and plots.

    python main.py --config configs/sweeps/methods.py[:waterbirds] --workdir runs/methods
    python main.py --config configs/sweeps/methods.py --config.sweep.seeds='(0,1)' \\
        --config.train.epochs=10        # overrides of the sweep and of the base config
    python -m agre_jax.report runs/methods   # the tables and plots again, without training

Config files import `define` and `variant`: this module imports only the standard library,
ml_collections and `agre_jax.errors` (no jax, no tensorflow, not even inside functions; a test
checks it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from agre_jax import errors

SPEC_FILE = "sweep.json"  # the sweep's definition, written when it starts
ERROR_FILE = "error.txt"  # in a run directory whose run failed: message and traceback
RUNS_DIR = "runs"
STAGES_DIR = "stages"
COMPILATION_CACHE = "compilation_cache"
# Label names that would clash with the report's own columns.
RESERVED_LABELS = ("variant", "n", "seeds", "failed", "status")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
_SCALARS = (str, int, float, bool)


class SweepError(errors.ConfigError):
    """A sweep that cannot run as defined, found before any training."""


def variant(name: str, overrides: Mapping[str, Any] | None = None, **labels: Any) -> dict:
    """One variant: a name (its directory), dotted-key overrides of the base config, and
    labels for the report and plots (e.g. method='AGRE-KD', gamma=0.25, debiased=1)."""
    return {"name": name, "overrides": dict(overrides or {}), "labels": labels}


def define(
    base: ml_collections.ConfigDict,
    *,
    name: str,
    title: str,
    variants: Sequence[Mapping[str, Any]],
    baseline: str,
    seeds: Sequence[int] = (0, 1, 2),
    description: str = "",
    base_name: str = "",
) -> ml_collections.ConfigDict:
    """The sweep config: `base` with a `sweep` field. Command-line overrides then reach both,
    e.g. `--config.sweep.seeds='(0,1)'` or `--config.train.epochs=10` (all runs)."""
    config = base.copy_and_resolve_references()
    config.sweep = ml_collections.ConfigDict(
        dict(
            name=name,  # short name, in plot titles
            title=title,  # one line: what the sweep compares
            description=description,
            base=base_name,  # the base config it was made from, for the record
            seeds=tuple(int(s) for s in seeds),  # config.seed of each run (the student's)
            baseline=baseline,  # the variant that deltas are computed against ('' = none)
            variants=tuple(dict(v) for v in variants),
            only="",  # comma-separated variant names to run now ('' = all); reports show all
            # Persist XLA compilations in <dir>/compilation_cache, so that runs after the first
            # skip most compile time (unless JAX_COMPILATION_CACHE_DIR already names one).
            compilation_cache=True,
        )
    )
    return config


def overrides_between(
    base: ml_collections.ConfigDict, other: ml_collections.ConfigDict
) -> dict[str, Any]:
    """The dotted-key leaves of `other` that differ from `base` (a variant from a config
    module, e.g. configs/multilayer_c.py against configs/default.py)."""
    a, b = _flatten(base.to_dict()), _flatten(other.to_dict())
    if set(b) - set(a):
        raise SweepError(f"keys not in the base config: {sorted(set(b) - set(a))}")
    return {k: v for k, v in b.items() if a[k] != v}


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def spec_of(config: ml_collections.ConfigDict, source: str = "") -> dict[str, Any]:
    """The sweep's definition as plain JSON data, checked; raises SweepError."""
    if "sweep" not in config:
        raise SweepError("the config has no `sweep` field")
    s = config.sweep
    variants = [_check_variant(v, i) for i, v in enumerate(s.get("variants", ()))]
    names = [v["name"] for v in variants]
    problems = []
    if not variants:
        problems.append("sweep.variants is empty")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"duplicate variant names {dupes}")
    seeds = list(s.get("seeds", ()))
    if not seeds or any(
        not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < 2**31 for x in seeds
    ):
        problems.append(
            f"sweep.seeds must be a non-empty tuple of integers in [0, 2**31), got {seeds}"
        )
    elif len(set(seeds)) != len(seeds):
        problems.append(f"sweep.seeds has duplicates: {seeds}")
    baseline = s.get("baseline", "")
    if baseline and baseline not in names:
        problems.append(f"sweep.baseline {baseline!r} is not a variant; variants: {names}")
    only = [n.strip() for n in s.get("only", "").split(",") if n.strip()]
    unknown = sorted(set(only) - set(names))
    if unknown:
        problems.append(f"sweep.only names unknown variants {unknown}; variants: {names}")
    if problems:
        raise SweepError("invalid sweep: " + "; ".join(problems))
    return {
        "name": s.get("name", "") or Path(source.split(":")[0]).stem or "sweep",
        "title": s.get("title", ""),
        "description": s.get("description", ""),
        "source": source,
        "base": s.get("base", ""),
        "dataset": config.data.name,
        "seeds": seeds,
        "baseline": baseline,
        "variants": variants,
        "only": only,
    }


def _check_variant(v: Any, index: int) -> dict[str, Any]:
    if not isinstance(v, Mapping) or "name" not in v:
        raise SweepError(f"sweep.variants[{index}] must be a dict with a name, got {v!r}")
    name = v["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise SweepError(
            f"variant name {name!r} must be a plain directory name (letters, digits, _ . + = -)"
        )
    extra = set(v) - {"name", "overrides", "labels"}
    if extra:
        raise SweepError(f"variant {name!r}: unknown fields {sorted(extra)}")
    overrides = dict(v.get("overrides") or {})
    labels = dict(v.get("labels") or {})
    for key in ("seed", "stage_dir"):
        if key in overrides:
            raise SweepError(f"variant {name!r}: {key} is set by the sweep, not by a variant")
    bad = {k: x for k, x in labels.items() if not isinstance(x, _SCALARS)}
    if bad or set(labels) & set(RESERVED_LABELS):
        raise SweepError(
            f"variant {name!r}: labels must be str/int/float/bool values with names other than "
            f"{RESERVED_LABELS}; got {labels}"
        )
    return {"name": name, "overrides": overrides, "labels": labels}


def run_dir(sweep_dir: str | Path, variant_name: str, seed: int) -> Path:
    """The directory of one variant x seed: `<sweep_dir>/runs/<variant>/seed<k>`."""
    return Path(sweep_dir) / RUNS_DIR / variant_name / f"seed{seed}"
