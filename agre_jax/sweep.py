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
    python main.py --config configs/sweeps/methods.py --config.sweep.launcher=slurm \\
        --config.sweep.slurm.partition=gpu       # each run a SLURM job (agre_jax/launch.py)

`sweep.launcher` says where the runs run: 'inline' (one after another in this process),
'local' (one submitit job per run on this machine, `sweep.local.*`) or 'slurm' (one job per
run, `sweep.slurm.*`); `launcher_of` checks those keys.

Config files import `define` and `variant`: this module imports only the standard library,
ml_collections and `agre_jax.errors` (no jax, no tensorflow, not even inside functions; a test
checks it).
"""

from __future__ import annotations

import json
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
LAUNCHERS = ("inline", "local", "slurm")
LOCAL_DEFAULTS: dict[str, Any] = dict(
    jobs=0,  # jobs at once: 0 = one per `gpus_per_job` visible GPUs, or 1 without GPUs
    gpus_per_job=1,  # each job's CUDA_VISIBLE_DEVICES (0: jobs without a GPU)
)
SLURM_DEFAULTS: dict[str, Any] = dict(
    partition="",  # required with launcher='slurm'
    time_min=24 * 60,  # each job's time limit; a timed-out job is requeued and resumes ...
    max_num_timeout=3,  # ... that many times at most
    gpus_per_job=1,
    cpus_per_task=8,
    mem_gb=0,  # 0 = the partition's default
    array_parallelism=8,  # jobs of one array running at once
    account="",  # '' = SLURM's default
    qos="",
    setup=(),  # shell lines run before each job, e.g. ('module load cuda',)
    additional_parameters="",  # more sbatch options, a JSON object: '{"constraint": "a100"}'
)
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
            # Where runs run: 'inline' (in this process, one after another), 'local' (one job
            # per run on this machine) or 'slurm' (one job per run); see agre_jax/launch.py.
            launcher="inline",
            local=ml_collections.ConfigDict(LOCAL_DEFAULTS),
            slurm=ml_collections.ConfigDict(SLURM_DEFAULTS),
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
    try:
        launcher_of(config)
    except SweepError as e:
        problems.append(str(e))
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


def launcher_of(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The sweep's launcher settings, checked: {'launcher': name, 'local': {...}} or
    {'launcher': 'slurm', 'slurm': {...}} (additional_parameters parsed into a dict), or
    {'launcher': 'inline'}. Sweep configs made before these keys existed run inline.

    Raises:
      SweepError: an unknown launcher, or a bad value of its `sweep.local.*` /
        `sweep.slurm.*` keys (e.g. no partition for slurm); every problem in one message.
    """
    s = config.sweep
    launcher = s.get("launcher", "inline")
    if launcher not in LAUNCHERS:
        raise SweepError(f"sweep.launcher is {launcher!r}; expected one of {LAUNCHERS}")
    if launcher == "inline":
        return {"launcher": launcher}
    section = s.get(launcher, None)
    values = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else {}
    problems: list[str] = []

    def integer(key: str, low: int) -> None:
        x = values.get(key)
        if not isinstance(x, int) or isinstance(x, bool) or x < low:
            problems.append(f"sweep.{launcher}.{key} must be an integer >= {low}, got {x!r}")

    if launcher == "local":
        values = {**LOCAL_DEFAULTS, **values}
        integer("jobs", 0)
        integer("gpus_per_job", 0)
    else:
        values = {**SLURM_DEFAULTS, **values}
        if not isinstance(values["partition"], str) or not values["partition"].strip():
            problems.append(
                "sweep.slurm.partition is not set; expected the SLURM partition to submit to, "
                "e.g. --config.sweep.slurm.partition=gpu"
            )
        for key, low in (("time_min", 1), ("max_num_timeout", 0), ("gpus_per_job", 0)):
            integer(key, low)
        for key, low in (("cpus_per_task", 1), ("mem_gb", 0), ("array_parallelism", 1)):
            integer(key, low)
        for key in ("account", "qos"):
            if not isinstance(values[key], str):
                problems.append(f"sweep.slurm.{key} must be a string, got {values[key]!r}")
        setup = values["setup"]
        if not isinstance(setup, tuple | list) or not all(isinstance(x, str) for x in setup):
            problems.append(f"sweep.slurm.setup must be a tuple of shell lines, got {setup!r}")
        values["setup"] = list(setup) if isinstance(setup, tuple | list) else setup
        values["additional_parameters"] = _sbatch_options(values["additional_parameters"], problems)
    if problems:
        raise SweepError("; ".join(problems))
    return {"launcher": launcher, launcher: values}


def _sbatch_options(text: Any, problems: list[str]) -> dict[str, Any]:
    """sweep.slurm.additional_parameters: '' or a JSON object of sbatch options."""
    if text == "":
        return {}
    expected = (
        "expected a JSON object of sbatch options with string, integer or true values, e.g. "
        '\'{"constraint": "a100", "exclusive": true}\''
    )
    try:
        options = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError as e:
        problems.append(f"sweep.slurm.additional_parameters is not JSON ({e}); {expected}")
        return {}
    if not isinstance(options, dict) or not all(
        isinstance(v, str | int) and (v is True or not isinstance(v, bool))
        for v in options.values()
    ):
        problems.append(f"sweep.slurm.additional_parameters is {text!r}; {expected}")
        return {}
    return options


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
