"""Sweep reports from run directories alone: tables with error bars and plots.

    python -m agre_jax.report SWEEP_DIR [--no-plots]

reads `SWEEP_DIR/sweep.json` (the sweep's definition; without it the variants and seeds are
taken from the `runs/<variant>/seed<k>/` directories) and every run's `results.json`,
`error.txt` and `distill/metrics.jsonl`, and writes into SWEEP_DIR:

- `results.md`: one row per variant, mean +- sample std (ddof 1) over the seeds that finished
  of the selected student's test WGA and both averages, per-group accuracies, n, the delta
  of mean WGA to the baseline variant, the paired WGA difference to the baseline over the
  seeds both finished with its 95 % Student-t interval (see `paired_difference`) and the
  seconds of the run's own stages, sorted by WGA; the shared stages' seconds (once); failed
  and missing runs; the teachers.
- `results.csv`: the same rows (labels as columns, values in %), one per variant.
- `summary.json`: all of it as data, including every run's status and error.
- `plots/*.png`: only those the sweep's labels allow (see `make_plots`).

Costs: a run's results.json gives `stages` = {name: {seconds, reused}} (or, from older runs,
only `seconds` = {name: seconds}). Distillation and evaluation are the run's own (per-variant
columns, mean over seeds); data, pretraining, teachers and DFR are shared by the runs of a
stage and are reported once for the sweep (see `shared_seconds`), not charged to the run that
computed them.

This module imports `sweep` (definitions) and `workdir`, never the runner or the training.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from agre_jax import sweep, workdir

STUDENT = "student (best val WGA)"  # the model a sweep compares (results.json['test'] key)
METRICS = ("wga", "avg_acc_weighted", "avg_acc")  # as named in results.json
METRIC_TITLES = {"wga": "WGA", "avg_acc_weighted": "avg (train-weighted)", "avg_acc": "avg (plain)"}
# Numeric labels that get a WGA-vs-label line plot, and their axis titles.
LINE_LABELS = {
    "gamma": "feature-distillation weight γ",
    "alpha": "α (weight of the KD loss; 1 − α goes to the labels)",
    "tau": "distillation temperature τ",
    "debiased": "debiased (DFR) teachers in the ensemble",
}
LINE_TITLES = {
    "gamma": "Student WGA vs the feature-distillation weight γ",
    "alpha": "Student WGA vs α, the weight of distillation against labels",
    "tau": "Student WGA vs the distillation temperature τ",
    "debiased": "Student WGA vs the number of debiased teachers (cf. AGRE-KD paper, Fig. 3)",
}
AGRE_WEIGHTINGS = ("agre", "agre_batch")
MAX_WEIGHT_PANELS = 12
WGA_AXIS = "worst-group test accuracy (%)"
# Stages in results.json: a run's own, and those shared by the runs of one stage directory.
OWN_STAGES = ("distill", "evaluate")
SHARED_STAGES = ("data", "pretrain", "teachers", "dfr", "biased", "deep_ensemble")
CONFIDENCE = 0.95  # of the paired intervals against the baseline


@dataclasses.dataclass
class RunRecord:
    """What one run directory holds."""

    variant: str
    seed: int
    directory: Path
    status: str  # 'done', 'failed' or 'missing'
    results: dict[str, Any] | None = None
    error: str = ""


def load_spec(sweep_dir: str | Path) -> dict[str, Any]:
    """The sweep's definition, or one inferred from `runs/<variant>/seed<k>/` directories."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / sweep.SPEC_FILE
    if path.exists():
        return json.loads(path.read_text())
    runs = sweep_dir / sweep.RUNS_DIR
    variants = sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
    if not variants:
        raise FileNotFoundError(f"{sweep_dir} holds neither {sweep.SPEC_FILE} nor runs/*/seed*/")
    seeds = sorted(
        {
            int(p.name[4:])
            for v in variants
            for p in (runs / v).iterdir()
            if p.name.startswith("seed") and p.name[4:].isdigit()
        }
    )
    return {
        "name": sweep_dir.name,
        "title": "",
        "description": "",
        "source": "",
        "base": "",
        "dataset": "",
        "seeds": seeds,
        "baseline": "",
        "variants": [{"name": v, "overrides": {}, "labels": {}} for v in variants],
    }


def load_run(variant: str, seed: int, directory: Path) -> RunRecord:
    """A run's status: 'failed' (error.txt, or unreadable results), 'done' or 'missing'."""
    record = RunRecord(variant, seed, directory, "missing")
    error, results = directory / sweep.ERROR_FILE, directory / "results.json"
    if error.exists():
        record.status = "failed"
        record.error = (error.read_text().splitlines() or ["(empty error.txt)"])[0]
    elif results.exists():
        try:
            record.results = json.loads(results.read_text())
            record.results["test"][STUDENT]  # noqa: B018 -- the key the report needs
            record.status = "done"
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            record.status, record.results = "failed", None
            record.error = f"unreadable results.json ({type(e).__name__}: {e})"
    return record


def load_runs(sweep_dir: str | Path, spec: Mapping[str, Any]) -> list[RunRecord]:
    return [
        load_run(v["name"], seed, sweep.run_dir(sweep_dir, v["name"], seed))
        for v in spec["variants"]
        for seed in spec["seeds"]
    ]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1); NaN where undefined (n = 0, or std at
    n = 1)."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def paired_difference(
    values: Mapping[int, float], baseline: Mapping[int, float], confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """The paired difference of a variant to the baseline over the seeds both have.

    `values` and `baseline` map seed -> metric (in %, e.g. test WGA); only seeds present in
    both with a finite value in both are used, in ascending order. With d_s = values[s] -
    baseline[s] on those n seeds (percentage points), returns

    - `n`: the number of shared seeds, `seeds`: them (sorted);
    - `mean`: mean of d (variant minus baseline), NaN when n = 0;
    - `std`: sample standard deviation of d (ddof 1), NaN when n < 2;
    - `lo`, `hi`: the two-sided paired Student-t interval mean -+ t_{(1+c)/2, n-1} * std /
      sqrt(n), NaN when n < 2 (a zero std gives lo = hi = mean);
    - `confidence`: c.

    Pairing on the seed removes what the seed shares across variants (initialisation and data
    order) from the comparison; the interval assumes the per-seed differences are independent
    and roughly normal. Source: the paired-sample t interval of any statistics text (e.g.
    Rice, Mathematical Statistics and Data Analysis, 3rd ed., Sec. 11.3, comparing paired
    samples); on comparing training runs over shared seeds see Bouthillier et al.,
    "Accounting for variance in machine learning benchmarks" (MLSys 2021) and Dror et al.,
    "The hitchhiker's guide to testing statistical significance in natural language
    processing" (ACL 2018). Raises ValueError unless 0 < confidence < 1; otherwise never
    raises (no shared seed gives n = 0 and NaNs).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    seeds = sorted(
        s
        for s in values.keys() & baseline.keys()
        if math.isfinite(values[s]) and math.isfinite(baseline[s])
    )
    d = np.array([values[s] - baseline[s] for s in seeds], np.float64)
    mean, std = mean_std(d)
    lo = hi = math.nan
    if d.size > 1:
        half = float(stats.t.ppf((1.0 + confidence) / 2.0, d.size - 1)) * std / math.sqrt(d.size)
        lo, hi = mean - half, mean + half
    return {
        "n": len(seeds),
        "seeds": seeds,
        "mean": mean,
        "std": std,
        "lo": lo,
        "hi": hi,
        "confidence": confidence,
    }


def resolved(paired: Mapping[str, Any] | None) -> bool:
    """Whether a paired interval excludes 0 (false where it is undefined)."""
    if not paired or not math.isfinite(paired["lo"]) or not math.isfinite(paired["hi"]):
        return False
    return paired["lo"] > 0 or paired["hi"] < 0


def _nanmean(rows: Sequence[Sequence[float]]) -> list[float]:
    x = np.asarray(rows, np.float64)
    ok = np.isfinite(x)
    sums, counts = np.where(ok, x, 0.0).sum(0), ok.sum(0)
    return [float(s / c) if c else math.nan for s, c in zip(sums, counts, strict=True)]


def aggregate(spec: Mapping[str, Any], runs: Sequence[RunRecord]) -> dict[str, Any]:
    """The report as data (percent values): rows sorted by mean WGA, failures, teachers.

    Each row's `delta_wga` is its mean WGA minus the baseline's (each over its own finished
    seeds); `paired` is {metric: `paired_difference` against the baseline over the seeds both
    finished} for every metric in METRICS, or None for the baseline itself and when the sweep
    names no baseline."""
    done = [r for r in runs if r.status == "done"]
    first = done[0].results if done else {}
    group_names = list(first.get("group_names", []))
    rows = []
    for order, v in enumerate(spec["variants"]):
        mine = [r for r in runs if r.variant == v["name"]]
        ok = [r for r in mine if r.status == "done"]
        students = [r.results["test"][STUDENT] for r in ok]
        row: dict[str, Any] = {
            "variant": v["name"],
            "order": order,  # in the sweep's definition: plots keep it (colours, series)
            "labels": dict(v["labels"]),
            "n": len(ok),
            "seeds": [r.seed for r in ok],
            "failed": sum(r.status == "failed" for r in mine),
            "weighting": _get(ok[0].results, "config", "distill", "weighting") if ok else "",
        }
        for m in METRICS:
            values = [100 * s[m] for s in students]
            row[m] = dict(zip(("mean", "std"), mean_std(values), strict=True), values=values)
        per_group = [[100 * a for a in s["group_acc"]] for s in students]
        row["group_acc"] = _nanmean(per_group) if students else [math.nan] * len(group_names)
        row["group_acc_std"] = [mean_std(g)[1] for g in zip(*per_group, strict=True)] or [
            math.nan
        ] * len(group_names)
        row["kinds"] = list(ok[0].results.get("teachers", {}).get("kinds", [])) if ok else []
        row["seconds"] = own_seconds([r.results for r in ok])
        rows.append(row)
    by_name = {r["variant"]: r for r in rows}
    base = by_name.get(spec.get("baseline") or "")
    for row in rows:
        row["delta_wga"] = (
            row["wga"]["mean"] - base["wga"]["mean"] if base and base["n"] else math.nan
        )
        row["paired"] = (
            None
            if base is None or row is base
            else {
                m: paired_difference(_by_seed(row, m), _by_seed(base, m), CONFIDENCE)
                for m in METRICS
            }
        )
    rows.sort(key=lambda r: (r["n"] == 0, -_finite(r["wga"]["mean"], -1.0), r["variant"]))
    return {
        "name": spec["name"],
        "title": spec.get("title", ""),
        "description": spec.get("description", ""),
        "source": spec.get("source", ""),
        "base": spec.get("base", ""),
        "dataset": first.get("dataset") or spec.get("dataset", ""),
        "group_names": group_names,
        "train_group_counts": list(first.get("train_group_counts", [])),
        "selection": first.get("selection", ""),
        "model": STUDENT,
        "seeds": list(spec["seeds"]),
        "baseline": spec.get("baseline", ""),
        "label_names": _label_names(spec),
        "rows": rows,
        "runs": [
            {
                "variant": r.variant,
                "seed": r.seed,
                "status": r.status,
                "dir": str(r.directory),
                **({"error": r.error} if r.error else {}),
            }
            for r in runs
        ],
        "teachers": teacher_rows(done),
        "shared_seconds": shared_seconds(done),
    }


def _by_seed(row: Mapping[str, Any], metric: str) -> dict[int, float]:
    return dict(zip(row["seeds"], row[metric]["values"], strict=True))


def _get(data: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        data = data.get(key, {}) if isinstance(data, Mapping) else {}
    return data if data != {} else None


def _finite(x: float, default: float) -> float:
    return x if math.isfinite(x) else default


def _label_names(spec: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for v in spec["variants"]:
        names += [k for k in v["labels"] if k not in names]
    return names


def stage_seconds(results: Mapping[str, Any]) -> dict[str, tuple[float, bool]]:
    """{stage: (seconds, reused)} from a run's results.json. `stages` = {name: {'seconds',
    'reused', optionally 'directory'}}, where reused means an earlier run computed the stage
    and the seconds are what it took then; older results have only `seconds` = {name:
    seconds, 'total': ...}: every stage then counts as not reused (a reusing run recorded its
    short loading time)."""
    stages = results.get("stages")
    if isinstance(stages, Mapping):
        return {
            name: (float(x["seconds"]), bool(x.get("reused", False)))
            for name, x in stages.items()
            if isinstance(x, Mapping) and _is_number(x.get("seconds"))
        }
    seconds = results.get("seconds")
    if not isinstance(seconds, Mapping):
        return {}
    return {k: (float(v), False) for k, v in seconds.items() if k != "total" and _is_number(v)}


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def own_seconds(results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """A variant's cost: the mean over its finished seeds of each own stage's seconds (over the
    seeds that recorded it), and 'run', their sum (NaN unless every own stage is known)."""
    times = [stage_seconds(r) for r in results]
    out = {s: mean_std([t[s][0] for t in times if s in t])[0] for s in OWN_STAGES}
    known = all(math.isfinite(out[s]) for s in OWN_STAGES)
    out["run"] = sum(out[s] for s in OWN_STAGES) if known else math.nan
    return out


def _stage_identity(results: Mapping[str, Any], stage: str) -> str:
    """Which computation of a shared stage a run used: its `stages[stage]['directory']` when
    results.json records one, else the teachers' source (teachers and DFR) or the dataset."""
    record = _get(results, "stages", stage)
    if isinstance(record, Mapping) and record.get("directory"):
        return str(record["directory"])
    if stage == "data":
        return str(results.get("dataset", ""))
    return str(_get(results, "teachers", "source") or "")


def _stage_parts(results: Mapping[str, Any], stage: str) -> list[tuple[str, tuple[float, bool]]]:
    """[(identity, (seconds, reused))] of a shared stage in one run: one per pretrained network
    when results.json lists their own seconds (a run may pretrain several, shared with other
    runs one by one), one per part when its record has parts (the teacher stage of each
    architecture group), else the stage's record."""
    parts = _get(results, "stages", stage, "parts")
    if isinstance(parts, list) and parts:
        return [
            (str(p.get("directory", "")), (float(p["seconds"]), bool(p.get("reused"))))
            for p in parts
            if isinstance(p, Mapping) and _is_number(p.get("seconds"))
        ]
    members = results.get("pretrain") if stage == "pretrain" else None
    if isinstance(members, Mapping) and members:
        parts = {
            str(m.get("key", m.get("path"))): (float(m["seconds"]), bool(m.get("reused")))
            for m in members.values()
            if isinstance(m, Mapping) and _is_number(m.get("seconds"))
        }
        if len(parts) == len({str(m.get("key", m.get("path"))) for m in members.values()}):
            return list(parts.items())
    t = stage_seconds(results).get(stage)
    return [] if t is None else [(_stage_identity(results, stage), t)]


def shared_seconds(done: Sequence[RunRecord]) -> dict[str, dict[str, Any]]:
    """The shared stages' seconds, counted once per stage directory: from the run that
    computed it (the longest if several did, e.g. data loaded by every run), else the time
    recorded by the runs that reused it. {stage: {'seconds': sum over the stage's
    directories, 'stages': how many, 'earlier': how many were computed before every run
    here}}; stages that no run recorded are left out."""
    out: dict[str, dict[str, Any]] = {}
    for stage in SHARED_STAGES:
        groups: dict[str, list[tuple[float, bool]]] = {}
        for r in done:
            for identity, t in _stage_parts(r.results, stage):
                groups.setdefault(identity, []).append(t)
        if not groups:
            continue
        total, earlier = 0.0, 0
        for records in groups.values():
            computed = [s for s, reused in records if not reused]
            total += max(computed or [s for s, _ in records])
            earlier += not computed
        out[stage] = {"seconds": total, "stages": len(groups), "earlier": earlier}
    return out


def teacher_rows(done: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Test metrics (%) of every teacher, their means and the ensembles, once per teacher
    stage (runs of one stage evaluate the same teachers)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in done:
        source = Path(str(r.results.get("teachers", {}).get("source", ""))).name
        tests = r.results["test"]
        for kind in ("ERM", "DFR"):
            members = [m for k, m in tests.items() if k.startswith(f"{kind} teacher ")]
            for k, m in tests.items():
                if k.startswith(f"{kind} teacher "):
                    rows.setdefault((source, k), _teacher_row(source, k, [m]))
            if members:
                name = f"{kind} teachers, mean of {len(members)} (± std over teachers)"
                rows.setdefault((source, name), _teacher_row(source, name, members))
        for k, m in tests.items():
            if k.startswith(("ensemble", "Deep Ensemble")):
                rows.setdefault((source, k), _teacher_row(source, k, [m]))
    return list(rows.values())


def _teacher_row(source: str, model: str, members: Sequence[Mapping[str, Any]]) -> dict:
    row: dict[str, Any] = {"stage": source, "model": model, "n": len(members)}
    for m in METRICS:
        mean, std = mean_std([100 * x[m] for x in members])
        row[m] = {"mean": mean, "std": std}
    row["group_acc"] = _nanmean([[100 * a for a in x["group_acc"]] for x in members])
    return row


# ---------------------------------------------------------------- tables


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.1f}"


def _pm(stat: Mapping[str, float]) -> str:
    if not math.isfinite(stat["mean"]):
        return "-"
    return f"{stat['mean']:.1f} ± {_pct(stat['std'])}"


def _paired_cell(paired: Mapping[str, Any] | None) -> str:
    """`+1.2 [-0.3, +2.7] (n=5)`, bold when the interval excludes 0; `-` without shared
    seeds; the interval `[-, -]` when n = 1."""
    if not paired or not paired["n"]:
        return "-"
    interval = (
        f"[{paired['lo']:+.1f}, {paired['hi']:+.1f}]"
        if math.isfinite(paired["lo"]) and math.isfinite(paired["hi"])
        else "[-, -]"
    )
    cell = f"{paired['mean']:+.1f} {interval} (n={paired['n']})"
    return f"**{cell}**" if resolved(paired) else cell


def _secs(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.1f}"


def shared_line(agg: Mapping[str, Any]) -> str:
    """One line: every shared stage's seconds, counted once for the sweep ('' if none)."""
    parts = []
    for stage, x in agg.get("shared_seconds", {}).items():
        if x["seconds"] == 0 and x["earlier"] == x["stages"]:
            continue  # e.g. ported teachers: nothing was computed
        notes = [f"{x['stages']} stage directories"] if x["stages"] > 1 else []
        if x["earlier"]:
            notes.append(
                "computed by an earlier run"
                if x["stages"] == 1
                else f"{x['earlier']} computed by earlier runs"
            )
        parts.append(
            f"{stage} {_secs(x['seconds'])} s" + (f" ({', '.join(notes)})" if notes else "")
        )
    if not parts:
        return ""
    return "Shared stages, computed once for all runs (not in s/run): " + ", ".join(parts) + "."


def _label(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _failures(agg: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    runs = agg["runs"]
    return [r for r in runs if r["status"] == "failed"], [
        r for r in runs if r["status"] == "missing"
    ]


def to_markdown(agg: Mapping[str, Any]) -> str:
    """results.md: header (dataset, selection, seeds), the variant table, failures, teachers
    and plots."""
    seeds = ", ".join(map(str, agg["seeds"]))
    failed, missing = _failures(agg)
    total = len(agg["runs"])
    lines = [f"# Sweep `{agg['name']}`" + (f": {agg['title']}" if agg["title"] else ""), ""]
    if agg["description"]:
        lines += [agg["description"], ""]
    groups = ", ".join(agg["group_names"]) or "-"
    source = f"`{agg['source']}`" if agg["source"] else f"`{agg['name']}`"
    lines += [
        f"- Dataset: `{agg['dataset'] or '?'}` (groups: {groups}).",
        f"- Sweep config: {source}" + (f" (base `{agg['base']}`)." if agg["base"] else "."),
        f"- Model: `{agg['model']}`: {agg['selection'] or 'selected by validation WGA'}; "
        "metrics on the test split.",
        f"- Seeds: {seeds} (`config.seed`: the student's initialisation and data order; the "
        f"teachers are shared). Runs finished {total - len(failed) - len(missing)} of {total}, "
        f"failed {len(failed)}, not run {len(missing)}.",
        "- Values: test accuracy in %, mean ± sample std (ddof 1) over the seeds that finished "
        "(n; ± - when n = 1). avg (plain): accuracy over all test examples; avg "
        "(train-weighted): group accuracies weighted by the training group proportions (DFR "
        "convention)."
        + (
            f" Δ WGA: mean WGA minus that of `{agg['baseline']}`, in points (each mean over "
            "its own seeds). paired Δ WGA: mean over the seeds that both finished of the "
            f"per-seed WGA difference to `{agg['baseline']}`, with its two-sided "
            f"{100 * CONFIDENCE:g} % Student-t interval (n - 1 degrees of freedom; [-, -] when "
            "n = 1) and n, the shared seeds; **bold**: resolved, the interval excludes 0."
            if agg["baseline"]
            else ""
        )
        + " s/run: wall-clock seconds of a run's own stages (distillation and evaluation), "
        "mean over its seeds; the stages shared by all runs are listed once below the table.",
        "",
    ]
    labels = agg["label_names"]
    head = ["variant", *labels, "WGA", "Δ WGA", f"paired Δ WGA [{100 * CONFIDENCE:g}% CI]"]
    head += ["avg (train-weighted)", "avg (plain)"]
    head += [f"acc {g}" for g in agg["group_names"]] + ["n", "s/run"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in agg["rows"]:
        if not row["n"]:
            continue
        delta = (
            "—"
            if row["variant"] == agg["baseline"]
            else ("-" if not math.isfinite(row["delta_wga"]) else f"{row['delta_wga']:+.1f}")
        )
        cells = [f"`{row['variant']}`", *(_label(row["labels"].get(k, "")) for k in labels)]
        paired = "—" if row["variant"] == agg["baseline"] else _paired_cell(_paired(row, "wga"))
        cells += [_pm(row["wga"]), delta, paired]
        cells += [_pm(row["avg_acc_weighted"]), _pm(row["avg_acc"])]
        cells += [_pct(a) for a in row["group_acc"]] + [str(row["n"])]
        cells.append(_secs(row["seconds"]["run"]))
        lines.append("| " + " | ".join(cells) + " |")
    if not any(row["n"] for row in agg["rows"]):
        lines.append("| (no run has finished yet) |" + " |" * (len(head) - 1))
    if shared_line(agg):
        lines += ["", shared_line(agg)]
    lines += _paired_table(agg) + _per_seed_table(agg)
    if failed:
        lines += ["", f"**Failed runs** ({len(failed)}; message and traceback in error.txt):"]
        lines += [
            f"- `{r['variant']}` seed {r['seed']}: {r['error']} (`{r['dir']}`)" for r in failed
        ]
    if missing:
        lines += ["", f"**Runs not run (yet)** ({len(missing)}):"]
        by_variant: dict[str, list[str]] = {}
        for r in missing:
            by_variant.setdefault(r["variant"], []).append(str(r["seed"]))
        lines += [
            f"- `{v}` seed{'s' if len(s) > 1 else ''} {', '.join(s)}" for v, s in by_variant.items()
        ]
    if agg["teachers"]:
        stages = sorted({t["stage"] for t in agg["teachers"]})
        lines += [
            "",
            "## Teachers (test, %)",
            "",
            f"Teacher stage{'s' if len(stages) > 1 else ''}: "
            + ", ".join(f"`{s}`" for s in stages)
            + ". Ensembles combine the teachers each variant distils from.",
            "",
        ]
        head = ["model", "WGA", "avg (train-weighted)", "avg (plain)"]
        head += [f"acc {g}" for g in agg["group_names"]]
        head += ["teacher stage"] if len(stages) > 1 else []
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for t in agg["teachers"]:
            fmt = _pm if t["n"] > 1 else lambda s: _pct(s["mean"])
            cells = [t["model"], *(fmt(t[m]) for m in METRICS)]
            cells += [_pct(a) for a in t["group_acc"]]
            cells += [f"`{t['stage']}`"] if len(stages) > 1 else []
            lines.append("| " + " | ".join(cells) + " |")
    if agg.get("plots"):
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in agg["plots"]]
    return "\n".join(lines) + "\n"


def _paired_table(agg: Mapping[str, Any]) -> list[str]:
    """Markdown lines: every metric's paired difference to the baseline (empty without one)."""
    rows = [r for r in agg["rows"] if r["n"] and r["variant"] != agg["baseline"]]
    if not agg["baseline"] or not rows:
        return []
    head = ["variant", *(f"paired Δ {METRIC_TITLES[m]}" for m in METRICS)]
    lines = [
        "",
        f"## Paired differences to `{agg['baseline']}` (test, points)",
        "",
        f"Mean over the seeds both finished of (variant - baseline) with its "
        f"{100 * CONFIDENCE:g} % Student-t interval; bold: the interval excludes 0.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        cells = [f"`{row['variant']}`", *(_paired_cell(_paired(row, m)) for m in METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _per_seed_table(agg: Mapping[str, Any]) -> list[str]:
    """Markdown lines: each finished run's test WGA and plain average, by seed."""
    rows = [r for r in agg["rows"] if r["n"]]
    seeds = sorted({s for r in rows for s in r["seeds"]})
    if not rows:
        return []
    head = ["variant", *(f"seed {s}" for s in seeds)]
    lines = [
        "",
        "## Per-seed test WGA / avg (plain), %",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in sorted(rows, key=lambda r: r["order"]):
        by_seed = {
            s: (w, a)
            for s, w, a in zip(
                row["seeds"], row["wga"]["values"], row["avg_acc"]["values"], strict=True
            )
        }
        cells = [f"`{row['variant']}`"] + [
            f"{by_seed[s][0]:.1f} / {by_seed[s][1]:.1f}" if s in by_seed else "-" for s in seeds
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _paired(row: Mapping[str, Any], metric: str) -> dict[str, Any] | None:
    return (row.get("paired") or {}).get(metric)


def csv_rows(agg: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """results.csv as (field names, rows): one row per variant (also those with n = 0, whose
    values are empty), values in %; `paired_delta_wga`, `paired_lo`, `paired_hi`, `paired_n`:
    the paired WGA difference to the baseline and its Student-t interval over the `paired_n`
    shared seeds (empty for the baseline and where undefined; see `paired_difference`);
    `seconds_<stage>_mean`: the run's own stages (distill, evaluate, and 'run', their sum),
    mean over seeds. The shared stages, counted once, are in results.md and summary.json
    ('shared_seconds')."""
    fields = ["variant", *agg["label_names"], "n", "seeds", "failed"]
    paired_fields = ["paired_delta_wga", "paired_lo", "paired_hi", "paired_n"]
    for m in METRICS:
        fields += [f"{m}_mean_pct", f"{m}_std_pct"]
        fields += ["delta_wga_pct", *paired_fields] if m == "wga" else []
    fields += [f"acc_{g}_mean_pct" for g in agg["group_names"]]
    fields += [f"seconds_{s}_mean" for s in (*OWN_STAGES, "run")]
    out = []
    for row in agg["rows"]:
        r: dict[str, Any] = {"variant": row["variant"], **row["labels"]}
        r.update(n=row["n"], seeds=" ".join(map(str, row["seeds"])), failed=row["failed"])
        for m in METRICS:
            r[f"{m}_mean_pct"], r[f"{m}_std_pct"] = row[m]["mean"], row[m]["std"]
        r["delta_wga_pct"] = row["delta_wga"]
        paired = _paired(row, "wga")
        if paired:
            r.update(
                paired_delta_wga=paired["mean"],
                paired_lo=paired["lo"],
                paired_hi=paired["hi"],
                paired_n=paired["n"],
            )
        for g, a in zip(agg["group_names"], row["group_acc"], strict=True):
            r[f"acc_{g}_mean_pct"] = a
        for s in (*OWN_STAGES, "run"):
            r[f"seconds_{s}_mean"] = row["seconds"][s]
        out.append({k: _csv_value(r.get(k, "")) for k in fields})
    return fields, out


def _csv_value(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 4) if math.isfinite(x) else ""
    return x


def to_csv(agg: Mapping[str, Any]) -> str:
    fields, rows = csv_rows(agg)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# ---------------------------------------------------------------- plots


def make_plots(
    agg: Mapping[str, Any], runs: Sequence[RunRecord], out_dir: str | Path
) -> list[Path]:
    """Writes the plots the sweep's labels allow and returns their paths:

    - `wga_by_variant.png`: every variant's WGA (mean ± std), baseline highlighted; always.
    - `wga_vs_<label>.png` for label gamma, alpha, tau, debiased (the paper's Fig. 3): WGA vs
      the label, one line per value of the other labels (e.g. method); with >= 2 x values.
    - `methods_by_gamma.png`: WGA bars per gamma, one per method (labels method and gamma,
      >= 2 methods).
    - `teacher_weights.png`: each teacher's mean weight over training in one run (lowest seed)
      of every AGRE(-batch) variant, DFR and ERM teachers told apart; needs metrics.jsonl.
    - `group_acc_best.png`: per-group accuracy of the best variant next to its teachers.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    rows = [r for r in agg["rows"] if r["n"]]
    if not rows:
        return []
    written = [_plot_by_variant(agg, rows, out_dir / "wga_by_variant.png")]
    for label in LINE_LABELS:
        path = _plot_vs_label(agg, rows, label, out_dir / f"wga_vs_{label}.png")
        written += [path] if path else []
    path = _plot_methods_by_gamma(agg, rows, out_dir / "methods_by_gamma.png")
    written += [path] if path else []
    path = _plot_teacher_weights(agg, rows, runs, out_dir / "teacher_weights.png")
    written += [path] if path else []
    written.append(_plot_group_acc(agg, rows[0], runs, out_dir / "group_acc_best.png"))
    return written


def _subtitle(agg: Mapping[str, Any], rows: Sequence[Mapping[str, Any]] = ()) -> str:
    """Dataset, sweep config and, given the plotted rows, how many seeds each point has."""
    dataset = (agg["dataset"] or "?").split("/")[0]
    line = f"{dataset} · sweep {agg['source'] or agg['name']}"
    ns = sorted({r["n"] for r in rows})
    if not ns:
        return line
    n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    return f"{line} · mean ± std over n = {n} seed{'s' * (ns[-1] > 1)}"


def _figure(title: str, subtitle: str, nrows: int = 1, ncols: int = 1, size=(7.5, 4.8)):
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=10)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _err(std: float) -> float:
    return std if math.isfinite(std) else 0.0


def _plot_by_variant(agg, rows, path: Path) -> Path:
    height = max(2.8, 1.2 + 0.35 * len(rows))
    fig, axes = _figure(
        "Student worst-group accuracy by variant (best on top)",
        _subtitle(agg, rows),
        size=(7.5, height),
    )
    ax = axes[0, 0]
    ordered = rows[::-1]
    y = np.arange(len(ordered))
    colors = ["tab:orange" if r["variant"] == agg["baseline"] else "tab:blue" for r in ordered]
    ax.barh(
        y,
        [r["wga"]["mean"] for r in ordered],
        xerr=[_err(r["wga"]["std"]) for r in ordered],
        color=colors,
        capsize=3,
    )
    for yi, r in zip(y, ordered, strict=True):
        end = r["wga"]["mean"] + _err(r["wga"]["std"])
        ax.text(end + 1, yi, f"{r['wga']['mean']:.1f}", va="center", fontsize=8)
    ax.set_yticks(y, [f"{r['variant']} (n={r['n']})" for r in ordered])
    ax.set_xlabel(WGA_AXIS)
    ax.set_xlim(0, 100)
    if agg["baseline"] in {r["variant"] for r in rows}:
        from matplotlib.patches import Patch

        ax.legend(
            handles=[Patch(color="tab:orange", label=f"baseline ({agg['baseline']})")],
            loc="lower right",
            fontsize=8,
        )
    return _save(fig, path)


def _series(rows, x_label: str) -> dict[str, list[tuple[float, Mapping]]]:
    out: dict[str, list[tuple[float, Mapping]]] = {}
    for r in sorted(rows, key=lambda r: r["order"]):
        x = r["labels"].get(x_label)
        if isinstance(x, bool) or not isinstance(x, int | float):
            continue
        others = [(k, v) for k, v in r["labels"].items() if k != x_label]
        name = ", ".join(_label(v) if k == "method" else f"{k}={_label(v)}" for k, v in others)
        out.setdefault(name or "student", []).append((float(x), r))
    return out


def _plot_vs_label(agg, rows, label: str, path: Path) -> Path | None:
    series = _series(rows, label)
    xs = {x for points in series.values() for x, _ in points}
    if len(xs) < 2:
        return None
    used = [r for points in series.values() for _, r in points]
    fig, axes = _figure(LINE_TITLES[label], _subtitle(agg, used))
    ax = axes[0, 0]
    for name, points in series.items():
        points = sorted(points, key=lambda p: p[0])
        ax.errorbar(
            [x for x, _ in points],
            [r["wga"]["mean"] for _, r in points],
            yerr=[_err(r["wga"]["std"]) for _, r in points],
            marker="o",
            capsize=3,
            label=name,
        )
    ax.set_xlabel(
        LINE_LABELS[label] + (f" (of {_num_teachers(used)})" if label == "debiased" else "")
    )
    ax.set_ylabel(WGA_AXIS)
    if label == "debiased":
        ax.set_xticks(sorted(xs))
    ax.grid(alpha=0.3)
    others = dict.fromkeys(k for r in used for k in r["labels"] if k != label)
    ax.legend(fontsize=8, title=", ".join(others) or None)
    return _save(fig, path)


def _num_teachers(rows) -> str:
    ms = {len(r.get("kinds", [])) for r in rows} - {0}
    return str(ms.pop()) if len(ms) == 1 else "M"


def _plot_methods_by_gamma(agg, rows, path: Path) -> Path | None:
    cells: dict[tuple[str, float], Mapping] = {}
    for r in sorted(rows, key=lambda r: r["order"]):
        m, g = r["labels"].get("method"), r["labels"].get("gamma")
        if m is not None and isinstance(g, int | float) and not isinstance(g, bool):
            cells.setdefault((str(m), float(g)), r)
    methods = list(dict.fromkeys(m for m, _ in cells))
    gammas = sorted({g for _, g in cells})
    if len(methods) < 2:
        return None
    fig, axes = _figure(
        "Student WGA per feature-distillation weight γ, by method",
        _subtitle(agg, list(cells.values())),
    )
    ax = axes[0, 0]
    width = 0.8 / len(methods)
    x = np.arange(len(gammas))
    for i, m in enumerate(methods):
        rs = [cells.get((m, g)) for g in gammas]
        ax.bar(
            x + (i - (len(methods) - 1) / 2) * width,
            [r["wga"]["mean"] if r else math.nan for r in rs],
            width,
            yerr=[_err(r["wga"]["std"]) if r else 0.0 for r in rs],
            capsize=3,
            label=m,
        )
    ax.set_xticks(x, [_label(g) for g in gammas])
    ax.set_xlabel(LINE_LABELS["gamma"])
    ax.set_ylabel(WGA_AXIS)
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, title="method")
    return _save(fig, path)


def read_metrics(path: Path, kind: str = "train") -> list[dict[str, Any]]:
    """Records of one kind from a metrics.jsonl, the last one per step (a resumed run appends
    again from its checkpoint)."""
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if record.get("kind") == kind:
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def _plot_teacher_weights(agg, rows, runs, path: Path) -> Path | None:
    panels = []
    for row in rows:
        if row["weighting"] not in AGRE_WEIGHTINGS:
            continue
        done = sorted(
            (r for r in runs if r.variant == row["variant"] and r.status == "done"),
            key=lambda r: r.seed,
        )
        run = done[0]
        records = read_metrics(run.directory / "distill" / "metrics.jsonl")
        if records and any(k.startswith("weight/") for k in records[0]):
            epochs = read_metrics(run.directory / "distill" / "metrics.jsonl", "epoch")
            panels.append((row, run, records, epochs))
    if not panels:
        return None
    panels = panels[:MAX_WEIGHT_PANELS]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _figure(
        "AGRE teacher weights during distillation (batch mean per logged step)",
        _subtitle(agg) + " · one run per variant (lowest seed)",
        nrows,
        ncols,
        size=(max(7.5, 4.2 * ncols), 1.2 + 2.9 * nrows),
    )
    import matplotlib as mpl

    for ax, (row, run, records, epochs) in zip(axes.flat, panels, strict=False):
        kinds = list(run.results.get("teachers", {}).get("kinds", []))
        m = sum(k.startswith("weight/") for k in records[0])
        kinds = kinds if len(kinds) == m else ["?"] * m
        spe = epochs[0]["step"] / epochs[0]["epoch"] if epochs else None
        steps = np.array([r["step"] for r in records], np.float64)
        x = steps / spe if spe else steps
        n_dfr, n_erm = kinds.count("DFR"), kinds.count("ERM")
        for t, kind in enumerate(kinds):
            shade = 0.45 + 0.5 * (t + 1) / (m + 1)
            color = (mpl.colormaps["Reds"] if kind == "ERM" else mpl.colormaps["Blues"])(shade)
            ax.plot(
                x,
                [r.get(f"weight/{t}", math.nan) for r in records],
                color=color,
                linestyle="--" if kind == "ERM" else "-",
                linewidth=1.4,
            )
        ax.axhline(1 / m, color="gray", linestyle=":", linewidth=1)
        ax.set_title(f"{row['variant']} (seed {run.seed}): {n_dfr} DFR + {n_erm} ERM", fontsize=9)
        ax.set_xlabel("epoch" if spe else "training step")
        ax.set_ylabel("mean weight (fraction)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    from matplotlib.lines import Line2D

    fig.legend(
        handles=[
            Line2D([], [], color=mpl.colormaps["Blues"](0.8), label="DFR (debiased) teacher"),
            Line2D([], [], color=mpl.colormaps["Reds"](0.8), ls="--", label="ERM (biased) teacher"),
            Line2D([], [], color="gray", ls=":", label="uniform 1/M (AVER)"),
        ],
        loc="outside lower center",
        ncols=3,
        fontsize=8,
    )
    return _save(fig, path)


def _plot_group_acc(agg, row, runs, path: Path) -> Path:
    groups = agg["group_names"] or [f"group {g}" for g in range(len(row["group_acc"]))]
    first = min(
        (r for r in runs if r.variant == row["variant"] and r.status == "done"),
        key=lambda r: r.seed,
    )
    tests = first.results["test"]
    bars = [(f"student {row['variant']} (n={row['n']})", row["group_acc"], row["group_acc_std"])]
    ens = [k for k in tests if k.startswith("ensemble") and k.endswith("avg logits")]
    if ens:
        bars.append((ens[0], [100 * a for a in tests[ens[0]]["group_acc"]], None))
    for kind in ("DFR", "ERM"):
        members = [m for k, m in tests.items() if k.startswith(f"{kind} teacher ")]
        if members:
            acc = _nanmean([[100 * a for a in m["group_acc"]] for m in members])
            bars.append((f"{kind} teachers (mean of {len(members)})", acc, None))
    fig, axes = _figure(
        f"Per-group test accuracy of the best variant `{row['variant']}` and its teachers",
        _subtitle(agg, [row]),
        size=(max(7.5, 1.6 * len(groups) + 3), 5.4),
    )
    ax = axes[0, 0]
    width = 0.8 / len(bars)
    x = np.arange(len(groups))
    for i, (name, acc, err) in enumerate(bars):
        ax.bar(
            x + (i - (len(bars) - 1) / 2) * width,
            acc,
            width,
            yerr=[_err(e) for e in err] if err else None,
            capsize=3,
            label=name,
        )
    counts = agg["train_group_counts"]
    ticks = [f"{g}\n({counts[i]} train)" if i < len(counts) else g for i, g in enumerate(groups)]
    ax.set_xticks(x, ticks, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------- files


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def write_report(sweep_dir: str | Path, plots: bool = True) -> dict[str, Any]:
    """Aggregates a sweep directory and writes results.md, results.csv, summary.json and
    (with `plots`) plots/*.png; returns the aggregate."""
    sweep_dir = Path(sweep_dir)
    spec = load_spec(sweep_dir)
    runs = load_runs(sweep_dir, spec)
    agg = aggregate(spec, runs)
    if plots:
        written = make_plots(agg, runs, sweep_dir / "plots")
        agg["plots"] = [str(p.relative_to(sweep_dir)) for p in written]
    workdir.atomic_write_text(sweep_dir / "results.md", to_markdown(agg))
    workdir.atomic_write_text(sweep_dir / "results.csv", to_csv(agg))
    workdir.write_json(sweep_dir / "summary.json", _json_safe(agg))
    return agg


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agre_jax.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sweep_dir", help="the --workdir of a sweep")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    try:
        agg = write_report(args.sweep_dir, plots=not args.no_plots)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(agg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
