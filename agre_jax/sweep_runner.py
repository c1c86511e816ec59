"""Running a sweep (defined in `agre_jax.sweep`): every variant x seed, in this process or as
jobs.

Each run is `train.train_and_evaluate(config, <dir>/runs/<variant>/seed<k>)`; teacher and DFR
stages live in `<dir>/stages/` and are trained once for all runs. Finished runs with an
unchanged config are skipped, unfinished or failed ones resume, a failed run leaves
`error.txt` and the others go on; `report.write_report` then aggregates the directory.
`sweep.launcher` 'inline' runs them here one after another; 'local' and 'slurm' submit one
job per run (`agre_jax.launch`, shared stages computed by one job first).

    python main.py --config configs/sweeps/methods.py --workdir runs/methods
    python main.py --config configs/sweeps/methods.py --config.sweep.launcher=local

Import graph: this module imports `sweep` (definitions), `launch`, `report`, `settings` and
`train`; none of them imports it back.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections

from agre_jax import errors, launch, report, settings, sweep, train, workdir
from agre_jax.launch import Run
from agre_jax.sweep import SweepError

__all__ = ["Run", "plan", "report_location", "run_sweep", "status"]


def plan(config: ml_collections.ConfigDict, sweep_dir: str | Path) -> list[Run]:
    """Every run of the sweep (seed-major, so that a table of all variants fills in early),
    each config built and validated (`settings.validate`); raises SweepError."""
    spec = sweep.spec_of(config)
    base = config.copy_and_resolve_references()
    with base.unlocked():
        del base["sweep"]
    stage_dir = base.stage_dir or str(Path(sweep_dir) / sweep.STAGES_DIR)
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
            settings.validate(cfg)
        except errors.ConfigError as e:
            raise SweepError(f"variant {v['name']!r}: {e}") from e
        for seed in spec["seeds"]:
            run_cfg = cfg.copy_and_resolve_references()
            run_cfg.seed = seed
            run_cfg.lock()
            runs.append(Run(v["name"], seed, sweep.run_dir(sweep_dir, v["name"], seed), run_cfg))
    return sorted(runs, key=lambda r: spec["seeds"].index(r.seed))


def status(run: Run) -> str:
    """'done' (results with this config and no error.txt), 'resume' (same config, unfinished
    or failed), 'new', or 'changed' (the directory holds another config)."""
    path = run.directory / workdir.CONFIG_FILE
    if not path.exists():
        return "new"
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError:
        return "changed"
    if not isinstance(recorded, dict) or workdir.config_differences(
        recorded, workdir.config_dict(run.config)
    ):
        return "changed"
    finished = (run.directory / "results.json").exists() and not (
        run.directory / sweep.ERROR_FILE
    ).exists()
    return "done" if finished else "resume"


def run_sweep(
    config: ml_collections.ConfigDict,
    sweep_dir: str | Path,
    overwrite: bool = False,
    source: str = "",
    train_fn: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) every run of the sweep and writes its report: in this process, or
    as jobs (`sweep.launcher` 'local' or 'slurm', `launch.run_jobs`).

    Args:
      config: a sweep config (see `sweep.define`).
      sweep_dir: the sweep's directory.
      overwrite: rerun runs whose directory holds another config (else SweepError).
      source: the config file argument, for the report.
      train_fn: `(config, run_dir, overwrite=) -> report`; default `train.train_and_evaluate`
        (picklable with the job launchers: it runs in the jobs).

    Returns:
      The report (`report.write_report`) plus 'outcomes' (this invocation's runs: variant,
      seed, status, error) and 'exit_code': 0 if every run finished, 2 if a run failed on bad
      input (an `errors.UserError`: config, data, workdir, checkpoint), else 1.

    Raises:
      SweepError: the sweep, its launcher settings or one of its run configs is invalid, or
        runs were made with another config and `overwrite` is false, or the machine lacks
        what the launcher needs (GPUs, SLURM's commands); nothing has run then.
    """
    sweep_dir = Path(sweep_dir)
    spec = sweep.spec_of(config, source)
    launcher = sweep.launcher_of(config)
    launch.leave_accelerators_to_jobs(launcher)
    runs = plan(config, sweep_dir)
    states = [status(r) for r in runs]
    changed = [r for r, s in zip(runs, states, strict=True) if s == "changed"]
    if changed and not overwrite:
        names = ", ".join(f"{r.variant}/seed{r.seed}" for r in changed[:6])
        raise SweepError(
            f"{len(changed)} run(s) in {sweep_dir / sweep.RUNS_DIR} were made with another "
            f"config ({names}{' ...' if len(changed) > 6 else ''}). Use another --workdir, or "
            "pass --overwrite to rerun them (shared teacher and DFR stages are kept)."
        )
    slots = launch.check_machine(launcher)  # the local GPUs, SLURM's commands
    workdir.write_json(sweep_dir / sweep.SPEC_FILE, {**spec, "config": workdir.config_dict(config)})
    train_fn = train_fn or train.train_and_evaluate
    cache = (
        sweep_dir / sweep.COMPILATION_CACHE if config.sweep.get("compilation_cache", True) else None
    )
    if launcher["launcher"] != "inline":
        outcomes = launch.run_jobs(
            runs,
            states,
            sweep_dir,
            launcher,
            train_fn,
            slots=slots,
            name=f"sweep-{spec['name']}",
            compilation_cache=str(cache.absolute()) if cache else "",
            after_each=lambda: _report_so_far(sweep_dir),
        )
    else:
        if cache:
            _use_compilation_cache(cache)
        outcomes = []
        for i, (run, state) in enumerate(zip(runs, states, strict=True)):
            tag = f"[sweep] run {i + 1}/{len(runs)}: {run.variant} seed {run.seed}"
            if state == "done":
                print(f"{tag}: finished earlier, skipped")
                outcomes.append({"variant": run.variant, "seed": run.seed, "status": "skipped"})
                continue
            print(f"{tag} ({state}) -> {run.directory}")
            outcome = launch.run_one(run.config, run.directory, state == "changed", train_fn)
            outcomes.append({"variant": run.variant, "seed": run.seed, **outcome})
            _report_so_far(sweep_dir)
    result = report.write_report(sweep_dir)
    failed = [o for o in outcomes if o["status"] == "failed"]
    if any(o["bad_input"] for o in failed):
        exit_code = errors.EXIT_BAD_INPUT
    else:
        exit_code = 1 if failed else 0
    if failed:
        print(
            f"error: {len(failed)} of {len(runs)} runs failed; see {sweep_dir / 'results.md'}",
            file=sys.stderr,
        )
    print(report_location(sweep_dir, result.get("plots", ())))
    return {**result, "outcomes": outcomes, "exit_code": exit_code}


def _report_so_far(sweep_dir: Path) -> None:
    """The tables so far (cheap); a report problem must not stop the training."""
    try:
        report.write_report(sweep_dir, plots=False)
    except Exception as e:  # noqa: BLE001
        print(f"[sweep] warning: could not write the report yet: {e}", file=sys.stderr)


def report_location(sweep_dir: Path, plots: Any = ()) -> str:
    """The sweep's last line: where its report is."""
    n = len(plots)
    pictures = f"plots/ ({n} plot{'s' * (n != 1)})" if n else "no plots yet"
    return (
        f"[sweep] report: {sweep_dir / 'results.md'} (and results.csv, summary.json, "
        f"{pictures}, in {sweep_dir})"
    )


def _use_compilation_cache(path: Path) -> None:
    """Turns on JAX's persistent compilation cache in `path`, unless one is configured. Every
    run builds its jitted functions anew, but seeds and most variants compile to the same
    programs: measured on the tiny sweep, runs after the first went from ~30 s to ~15 s."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(path))
