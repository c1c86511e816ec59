"""Sweeps: many runs of one base config, as a product (tables with error bars, plots).

A sweep is a config file too (`configs/sweeps/*.py`): the base config (dataset preset from the
file's argument) plus a `sweep` field that names the variants (dotted overrides and the labels
that drive the plots), the seeds and the baseline variant. Every variant x seed is its own
resumable run, `<dir>/runs/<variant>/seed<k>/`, made by `train.train_and_evaluate` in this
process; teacher and DFR stages live in `<dir>/stages/` and are trained once for all runs
(`config.seed` seeds the student only). Finished runs with an unchanged config are skipped, a
failed run leaves `error.txt` and the others go on; `report.write_report` then aggregates.

    python main.py --config configs/sweeps/methods.py[:waterbirds] --workdir runs/methods
    python main.py --config configs/sweeps/methods.py --config.sweep.seeds='(0,1)' \\
        --config.train.epochs=10        # overrides of the sweep and of the base config
    python -m agre_jax.report runs/methods   # the tables and plots again, without training

This module's top level imports only ml_collections: config files import `define`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

SPEC_FILE = "sweep.json"  # the sweep's definition, written when it starts
ERROR_FILE = "error.txt"  # in a run directory whose run failed: message and traceback
RUNS_DIR = "runs"
STAGES_DIR = "stages"
COMPILATION_CACHE = "compilation_cache"
# Label names that would clash with the report's own columns.
RESERVED_LABELS = ("variant", "n", "seeds", "failed", "status")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
_SCALARS = (str, int, float, bool)


class SweepError(ValueError):
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
    if not seeds or any(not isinstance(x, int) or isinstance(x, bool) for x in seeds):
        problems.append(f"sweep.seeds must be a non-empty tuple of integers, got {seeds}")
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


@dataclasses.dataclass(frozen=True)
class Run:
    """One variant x seed: its directory and its complete config."""

    variant: str
    seed: int
    directory: Path
    config: ml_collections.ConfigDict


def run_dir(sweep_dir: str | Path, variant_name: str, seed: int) -> Path:
    return Path(sweep_dir) / RUNS_DIR / variant_name / f"seed{seed}"


def plan(config: ml_collections.ConfigDict, sweep_dir: str | Path) -> list[Run]:
    """Every run of the sweep (seed-major, so that a table of all variants fills in early),
    each config built and validated; raises SweepError."""
    from agre_jax import train

    spec = spec_of(config)
    base = config.copy_and_resolve_references()
    with base.unlocked():
        del base["sweep"]
    stage_dir = base.stage_dir or str(Path(sweep_dir) / STAGES_DIR)
    selected = [v for v in spec["variants"] if not spec["only"] or v["name"] in spec["only"]]
    runs = []
    for v in selected:
        cfg = base.copy_and_resolve_references()
        cfg.lock()
        try:
            cfg.update_from_flattened_dict(v["overrides"])
        except (KeyError, TypeError, ValueError) as e:
            raise SweepError(f"variant {v['name']!r}: bad override: {e}") from e
        cfg.stage_dir = stage_dir
        try:
            train.validate(cfg)
        except train.ConfigError as e:
            raise SweepError(f"variant {v['name']!r}: {e}") from e
        for seed in spec["seeds"]:
            run_cfg = cfg.copy_and_resolve_references()
            run_cfg.seed = seed
            run_cfg.lock()
            runs.append(Run(v["name"], seed, run_dir(sweep_dir, v["name"], seed), run_cfg))
    return sorted(runs, key=lambda r: spec["seeds"].index(r.seed))


def status(run: Run) -> str:
    """'done' (results with this config and no error.txt), 'resume' (same config, unfinished
    or failed), 'new', or 'changed' (the directory holds another config)."""
    from agre_jax import workdir

    path = run.directory / workdir.CONFIG_FILE
    if not path.exists():
        return "new"
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError:
        return "changed"
    if recorded != workdir.config_dict(run.config):
        return "changed"
    finished = (run.directory / "results.json").exists() and not (
        run.directory / ERROR_FILE
    ).exists()
    return "done" if finished else "resume"


def run_sweep(
    config: ml_collections.ConfigDict,
    sweep_dir: str | Path,
    overwrite: bool = False,
    source: str = "",
    train_fn: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) every run of the sweep and writes its report.

    Args:
      config: a sweep config (see `define`).
      sweep_dir: the sweep's directory.
      overwrite: rerun runs whose directory holds another config (else SweepError).
      source: the config file argument, for the report.
      train_fn: `(config, run_dir, overwrite=) -> report`; default `train.train_and_evaluate`.

    Returns:
      The report (`report.write_report`) plus 'outcomes' (this invocation's runs: variant,
      seed, status, error) and 'exit_code': 0 if every run finished, 2 if a run failed on bad
      input (config, data, workdir), else 1.
    """
    from agre_jax import report, train, workdir
    from agre_jax.data import core

    train_fn = train_fn or train.train_and_evaluate
    sweep_dir = Path(sweep_dir)
    spec = spec_of(config, source)
    runs = plan(config, sweep_dir)
    states = [status(r) for r in runs]
    changed = [r for r, s in zip(runs, states, strict=True) if s == "changed"]
    if changed and not overwrite:
        names = ", ".join(f"{r.variant}/seed{r.seed}" for r in changed[:6])
        raise SweepError(
            f"{len(changed)} run(s) in {sweep_dir / RUNS_DIR} were made with another config "
            f"({names}{' ...' if len(changed) > 6 else ''}). Use another --workdir, or pass "
            "--overwrite to rerun them (shared teacher and DFR stages are kept)."
        )
    workdir.write_json(sweep_dir / SPEC_FILE, {**spec, "config": workdir.config_dict(config)})
    if config.sweep.get("compilation_cache", True):
        _use_compilation_cache(sweep_dir / COMPILATION_CACHE)
    bad_input = (train.ConfigError, core.DataError, workdir.ConfigMismatchError)
    outcomes = []
    for i, (run, state) in enumerate(zip(runs, states, strict=True)):
        tag = f"[sweep] run {i + 1}/{len(runs)}: {run.variant} seed {run.seed}"
        if state == "done":
            print(f"{tag}: finished earlier, skipped")
            outcomes.append({"variant": run.variant, "seed": run.seed, "status": "skipped"})
            continue
        print(f"{tag} ({state}) -> {run.directory}")
        error_file = run.directory / ERROR_FILE
        error_file.unlink(missing_ok=True)
        outcome = {"variant": run.variant, "seed": run.seed, "status": "done"}
        try:
            train_fn(run.config, run.directory, overwrite=state == "changed")
        except Exception as e:  # noqa: BLE001 -- one failed run must not stop the sweep
            message = f"{type(e).__name__}: {e}"
            workdir.atomic_write_text(error_file, f"{message}\n\n{traceback.format_exc()}")
            print(f"{tag} failed: {message} (traceback in {error_file})", file=sys.stderr)
            outcome.update(status="failed", error=message, bad_input=isinstance(e, bad_input))
        outcomes.append(outcome)
        try:  # the tables so far (cheap); a report problem must not stop the training
            report.write_report(sweep_dir, plots=False)
        except Exception as e:  # noqa: BLE001
            print(f"[sweep] warning: could not write the report yet: {e}", file=sys.stderr)
    result = report.write_report(sweep_dir)
    failed = [o for o in outcomes if o["status"] == "failed"]
    exit_code = 2 if any(o["bad_input"] for o in failed) else 1 if failed else 0
    if failed:
        print(
            f"error: {len(failed)} of {len(runs)} runs failed; see {sweep_dir / 'results.md'}",
            file=sys.stderr,
        )
    return {**result, "outcomes": outcomes, "exit_code": exit_code}


def _use_compilation_cache(path: Path) -> None:
    """Turns on JAX's persistent compilation cache in `path`, unless one is configured. Every
    run builds its jitted functions anew, but seeds and most variants compile to the same
    programs: measured on the tiny sweep, runs after the first went from ~30 s to ~15 s."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(path))
