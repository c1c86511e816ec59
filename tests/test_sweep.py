"""Sweeps and their reports: aggregation, costs and plots on fabricated run directories, the
sweep runner with a fake trainer (skips, failures, changed configs), every sweep config on
every dataset preset, the import graph (no cycle; sweep definitions without jax or
tensorflow), and main.py refusing a bad sweep in a real process. The tiny real sweep through
main.py is tests/test_sweep_launcher.py's reference (inline) run, checked there."""

import ast
import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import fakes
import ml_collections
import pytest

from agre_jax import errors, report, settings, stages, sweep, sweep_runner, train, workdir
from configs import tiny

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["ellipse_land", "ellipse_water", "cross_land", "cross_water"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SWEEP_CONFIGS = sorted(p.stem for p in (ROOT / "configs" / "sweeps").glob("[a-z]*.py"))


def main_rows(md: str) -> list[str]:
    """The variant rows of results.md's first table (the paired and per-seed tables follow)."""
    first = md.split("\n## ")[0]
    return [line for line in first.splitlines() if line.startswith("| `")]


def metrics(wga, group_acc=None):
    acc = group_acc or [0.9, 0.8, wga + 0.05, wga]
    return {
        "group_acc": acc,
        "group_count": [100, 100, 30, 30],
        "wga": wga,
        "worst_group": 3,
        "avg_acc": wga + 0.2,
        "avg_acc_weighted": wga + 0.3,
        "gap": 0.3,
        "n": 260,
    }


def fake_results(
    seed, wga, kinds=("DFR", "ERM"), weighting="agre", seconds=None, stages=None, pretrain=None
):
    test = {}
    for i in range(len(kinds)):
        test[f"ERM teacher {i}"] = metrics(0.1 + 0.1 * i)
    for i in range(len(kinds)):
        test[f"DFR teacher {i}"] = metrics(0.6 + 0.1 * i)
    comp = f"{kinds.count('DFR')} DFR + {kinds.count('ERM')} ERM"
    test[f"ensemble ({comp}), avg logits"] = metrics(0.5)
    test[f"ensemble ({comp}), majority"] = metrics(0.4)
    test[report.STUDENT] = metrics(wga)
    test["student (last)"] = metrics(wga - 0.1)
    return {
        "dataset": "spurious_shapes/fake/1.0.0",
        "group_names": GROUPS,
        "train_group_counts": [3000, 150, 50, 1000],
        "selection": train.SELECTION,
        "teachers": {"kinds": list(kinds), "source": "/sweep/stages/teachers-0123abcd"},
        "test": test,
        "seconds": seconds or {"total": 10.0},
        **({"stages": stages} if stages else {}),
        **({"pretrain": pretrain} if pretrain else {}),
        "seed": seed,
        "config": {"distill": {"weighting": weighting}},
    }


def write_run(root, variant, seed, results=None, error=None, m=2, steps=(5, 10, 15, 20)):
    d = sweep.run_dir(root, variant, seed)
    d.mkdir(parents=True, exist_ok=True)
    if error:
        (d / sweep.ERROR_FILE).write_text(f"{error}\n\nTraceback (most recent call last): ...\n")
    if results:
        (d / "results.json").write_text(json.dumps(results))
        (d / "distill").mkdir(exist_ok=True)
        lines = []
        for s in steps:
            w = [0.7 - 0.1 * s / 20] + [(0.3 + 0.1 * s / 20) / (m - 1)] * (m - 1)
            lines.append({"step": s, "kind": "train", **{f"weight/{t}": w[t] for t in range(m)}})
            if s % 10 == 0:
                lines.append({"step": s, "kind": "epoch", "epoch": s // 10, "loss": 1.0})
        (d / "distill" / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")


def spec(variants, seeds=(0, 1, 2), baseline="a"):
    return {
        "name": "fake",
        "title": "a fabricated sweep",
        "description": "",
        "source": "configs/sweeps/fake.py",
        "base": "configs/default.py",
        "dataset": "spurious_shapes",
        "seeds": list(seeds),
        "baseline": baseline,
        "variants": [
            {"name": n, "overrides": {}, "labels": labels} for n, labels in variants.items()
        ],
    }


def write_spec(root, s):
    root.mkdir(parents=True, exist_ok=True)
    (root / sweep.SPEC_FILE).write_text(json.dumps(s))


def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path


# ---------------------------------------------------------------- aggregation


def test_mean_std_uses_sample_std_and_tolerates_small_n():
    assert all(math.isnan(x) for x in report.mean_std([]))
    mean, std = report.mean_std([80.0])
    assert mean == 80.0 and math.isnan(std)
    mean, std = report.mean_std([80.0, 82.0, 84.0])
    assert mean == pytest.approx(82.0) and std == pytest.approx(2.0)  # ddof 1


def test_paired_difference_by_hand():
    """Differences (2, 1, 3, -1) on seeds 0-3 (seed 9 only in the baseline): mean 1.25, sample
    sd over n - 1 = 3, interval mean -+ t_{0.975, 3} sd / sqrt(4)."""
    variant = {0: 80.0, 1: 82.0, 2: 85.0, 3: 79.0}
    baseline = {0: 78.0, 1: 81.0, 2: 82.0, 3: 80.0, 9: 50.0}
    p = report.paired_difference(variant, baseline)
    sd = math.sqrt((0.75**2 + 0.25**2 + 1.75**2 + 2.25**2) / 3)
    t = 3.182446305284263  # t_{0.975, 3}, from a table (not computed here)
    assert p["n"] == 4 and p["seeds"] == [0, 1, 2, 3] and p["confidence"] == 0.95
    assert p["mean"] == pytest.approx(1.25, abs=1e-12) and p["std"] == pytest.approx(sd)
    assert p["lo"] == pytest.approx(1.25 - t * sd / 2, abs=1e-9)
    assert p["hi"] == pytest.approx(1.25 + t * sd / 2, abs=1e-9)
    assert not report.resolved(p)  # the interval holds 0

    one = report.paired_difference({0: 80.0, 1: 82.0}, {1: 79.0, 2: 70.0})  # n = 1
    assert one["n"] == 1 and one["mean"] == 3.0
    assert all(math.isnan(one[k]) for k in ("std", "lo", "hi")) and not report.resolved(one)
    none = report.paired_difference({0: 80.0}, {1: 79.0})
    assert none["n"] == 0 and all(math.isnan(none[k]) for k in ("mean", "std", "lo", "hi"))

    # Non-finite values drop their seed, on either side: the hand example again.
    dirty = report.paired_difference(
        {**variant, 4: math.nan, 5: 90.0}, {**baseline, 4: 70.0, 5: math.inf}
    )
    assert dirty["seeds"] == [0, 1, 2, 3]
    assert (dirty["lo"], dirty["hi"]) == pytest.approx((p["lo"], p["hi"]), abs=1e-12)

    same = report.paired_difference({0: 81.0, 1: 82.0}, {0: 80.0, 1: 81.0})  # sd 0
    assert same["lo"] == same["hi"] == 1.0 and report.resolved(same)
    with pytest.raises(ValueError, match="confidence"):
        report.paired_difference(variant, baseline, confidence=95)


@pytest.fixture
def fabricated(tmp_path):
    """a (baseline): 3 seeds; b: 2 done + 1 failed; c: 1 done (n = 1) + 2 missing; d: none."""
    root = tmp_path / "sweep"
    write_spec(root, spec({"a": {"method": "AGRE-KD"}, "b": {"method": "AVER"}, "c": {}, "d": {}}))
    for seed, wga in enumerate((0.80, 0.82, 0.84)):
        write_run(root, "a", seed, fake_results(seed, wga))
    write_run(root, "b", 0, fake_results(0, 0.70, weighting="aver"))
    write_run(root, "b", 1, fake_results(1, 0.74, weighting="aver"))
    write_run(root, "b", 2, error="RuntimeError: boom")
    write_run(root, "c", 0, fake_results(0, 0.90))
    return root


def test_aggregate_means_std_delta_failures(fabricated):
    s = report.load_spec(fabricated)
    runs = report.load_runs(fabricated, s)
    agg = report.aggregate(s, runs)
    rows = {r["variant"]: r for r in agg["rows"]}
    assert [r["variant"] for r in agg["rows"]] == ["c", "a", "b", "d"]  # by WGA, n = 0 last
    a, b, c, d = rows["a"], rows["b"], rows["c"], rows["d"]
    assert a["n"] == 3 and a["wga"]["mean"] == pytest.approx(82.0)
    assert a["wga"]["std"] == pytest.approx(2.0)
    assert a["avg_acc_weighted"]["mean"] == pytest.approx(112.0)  # fabricated: wga + 30
    assert a["group_acc"] == pytest.approx([90.0, 80.0, 87.0, 82.0])
    assert a["delta_wga"] == 0.0 and b["delta_wga"] == pytest.approx(-10.0)
    assert b["n"] == 2 and b["failed"] == 1 and b["seeds"] == [0, 1]
    assert c["n"] == 1 and math.isnan(c["wga"]["std"]) and c["delta_wga"] == pytest.approx(8.0)
    assert d["n"] == 0 and math.isnan(d["wga"]["mean"]) and math.isnan(d["delta_wga"])
    status = {(r["variant"], r["seed"]): r["status"] for r in agg["runs"]}
    assert status[("b", 2)] == "failed" and status[("c", 1)] == "missing"
    assert [r["error"] for r in agg["runs"] if r["status"] == "failed"] == ["RuntimeError: boom"]
    names = [t["model"] for t in agg["teachers"]]
    assert "ERM teacher 0" in names and "DFR teachers, mean of 2 (± std over teachers)" in names
    assert len(names) == len(set(names))  # one teacher stage: each model once


def test_report_files(fabricated):
    agg = report.write_report(fabricated, plots=False)
    md = (fabricated / "results.md").read_text()
    assert "spurious_shapes/fake/1.0.0" in md and "Seeds: 0, 1, 2" in md
    assert train.SELECTION in md and "Δ WGA" in md and "ddof 1" in md
    table = main_rows(md)
    assert [line.split("|")[1].strip() for line in table] == ["`c`", "`a`", "`b`"]
    assert "90.0 ± -" in table[0] and "82.0 ± 2.0" in table[1] and "| —" in table[1]
    assert "**Failed runs** (1" in md and "`b` seed 2: RuntimeError: boom" in md
    assert "`c` seeds 1, 2" in md and "`d` seeds 0, 1, 2" in md  # not run, one line each
    assert "## Teachers" in md and "ensemble (1 DFR + 1 ERM), avg logits" in md
    rows = list(csv.DictReader(io.StringIO((fabricated / "results.csv").read_text())))
    assert [r["variant"] for r in rows] == ["c", "a", "b", "d"]
    assert rows[0]["wga_std_pct"] == "" and rows[1]["wga_std_pct"] == "2.0"
    assert rows[2]["delta_wga_pct"] == "-10.0" and rows[3]["n"] == "0"
    assert rows[1]["method"] == "AGRE-KD" and rows[1]["acc_cross_water_mean_pct"] == "82.0"
    summary = json.loads((fabricated / "summary.json").read_text())  # strict JSON: no NaN
    assert summary["rows"][3]["wga"]["mean"] is None
    assert agg["label_names"] == ["method"]


def test_paired_column_and_csv(fabricated):
    """b vs a on seeds 0, 1: WGA 70 - 80 and 74 - 82 -> mean -9, sd sqrt(2), half-width
    t_{0.975, 1} sqrt(2) / sqrt(2) = 12.7062...; c vs a on seed 0 only: +10 (the unpaired
    delta is +8), no interval."""
    agg = report.write_report(fabricated, plots=False)
    rows = {r["variant"]: r for r in agg["rows"]}
    assert rows["a"]["paired"] is None  # the baseline
    b = rows["b"]["paired"]["wga"]
    t1 = 12.706204736174698  # t_{0.975, 1}, from a table
    assert b["n"] == 2 and b["seeds"] == [0, 1] and b["mean"] == pytest.approx(-9.0)
    assert (b["lo"], b["hi"]) == pytest.approx((-9.0 - t1, -9.0 + t1), abs=1e-9)
    assert rows["b"]["paired"]["avg_acc"]["mean"] == pytest.approx(-9.0)  # wga + 20
    assert rows["c"]["paired"]["wga"]["n"] == 1 and rows["d"]["paired"]["wga"]["n"] == 0

    md = (fabricated / "results.md").read_text()
    assert "| Δ WGA | paired Δ WGA [95% CI] |" in md
    assert "paired Δ WGA: mean over the seeds that both finished" in md
    assert "95 % Student-t interval" in md and "resolved, the interval excludes 0" in md
    table = {line.split("|")[1].strip(): line for line in main_rows(md)}
    assert "| +8.0 | +10.0 [-, -] (n=1) |" in table["`c`"]
    assert "| — | — |" in table["`a`"]
    assert "| -10.0 | -9.0 [-21.7, +3.7] (n=2) |" in table["`b`"]  # not resolved: no bold
    assert "**" not in "".join(table.values())
    # Every metric paired (avg = WGA + 20 in the fixture), and the per-seed values.
    paired_table = md.split("## Paired differences to `a` (test, points)")[1].split("##")[0]
    assert (
        "| `b` | -9.0 [-21.7, +3.7] (n=2) | -9.0 [-21.7, +3.7] (n=2) | -9.0 [-21.7, +3.7] (n=2) |"
        in paired_table
    )
    per_seed = md.split("## Per-seed test WGA / avg (plain), %")[1]
    assert "| `b` | 70.0 / 90.0 | 74.0 / 94.0 |" in per_seed

    by_variant = {
        r["variant"]: r
        for r in csv.DictReader(io.StringIO((fabricated / "results.csv").read_text()))
    }
    cols = ("paired_delta_wga", "paired_lo", "paired_hi", "paired_n")
    assert [by_variant["b"][k] for k in cols] == ["-9.0", "-21.7062", "3.7062", "2"]
    assert [by_variant["c"][k] for k in cols] == ["10.0", "", "", "1"]
    assert [by_variant["a"][k] for k in cols] == ["", "", "", ""]
    assert [by_variant["d"][k] for k in cols] == ["", "", "", "0"]
    summary = json.loads((fabricated / "summary.json").read_text())
    assert summary["rows"][0]["paired"]["wga"]["lo"] is None  # c: NaN -> null


def test_paired_interval_resolves_what_seed_noise_hides(tmp_path):
    """Seeds spread the baseline over 20 points, but b beats it by 2-4 on every seed: paired
    mean 3, sd 1, 3 seeds -> 3 -+ 4.302652729911275 / sqrt(3): resolved, shown in bold."""
    root = tmp_path / "sweep"
    write_spec(root, spec({"a": {}, "b": {}}))
    for seed, (wa, wb) in enumerate(((0.70, 0.72), (0.80, 0.83), (0.90, 0.94))):
        write_run(root, "a", seed, fake_results(seed, wa))
        write_run(root, "b", seed, fake_results(seed, wb))
    agg = report.write_report(root, plots=False)
    b = next(r for r in agg["rows"] if r["variant"] == "b")
    assert b["wga"]["std"] > 10 and report.resolved(b["paired"]["wga"])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2}, from a table
    assert b["paired"]["wga"]["lo"] == pytest.approx(3.0 - half, abs=1e-9)
    md = (root / "results.md").read_text()
    assert "| +3.0 | **+3.0 [+0.5, +5.5] (n=3)** |" in md


def stage_times(data, teachers, dfr, distill, evaluate, reused=()):
    """results.json['stages'] (the new form); `reused` names the stages an earlier run made."""
    times = dict(data=data, teachers=teachers, dfr=dfr, distill=distill, evaluate=evaluate)
    return {k: {"seconds": v, "reused": k in reused} for k, v in times.items()}


def cost_sweep(root, results_of):
    """Variants a (baseline) and b, seeds 0 and 1; results_of(variant, seed) -> results."""
    write_spec(root, spec({"a": {}, "b": {}}, seeds=(0, 1)))
    for v, seed in (("a", 0), ("b", 0), ("a", 1), ("b", 1)):
        write_run(root, v, seed, results_of(v, seed))
    return report.write_report(root, plots=False)


def test_costs_charge_shared_stages_once_not_to_the_first_variant(tmp_path):
    """New results.json form: a/0 ran first and trained the teachers (262 s) and DFR (15 s);
    the other runs reused them (and recorded those times) but loaded the data themselves.
    Variant b's seed 0 resumed after its distillation (reused: its recorded time counts)."""
    times = {
        ("a", 0): stage_times(3.0, 262.0, 15.0, 40.0, 5.0),
        ("b", 0): stage_times(2.0, 262.0, 15.0, 20.0, 4.0, reused=("teachers", "dfr", "distill")),
        ("a", 1): stage_times(2.5, 262.0, 15.0, 44.0, 7.0, reused=("teachers", "dfr")),
        ("b", 1): stage_times(2.0, 262.0, 15.0, 30.0, 4.0, reused=("teachers", "dfr")),
    }
    old_seconds = {"teachers": 999.0, "total": 999.0}  # ignored when 'stages' is there
    agg = cost_sweep(
        tmp_path,
        lambda v, seed: fake_results(
            seed, 0.8 - 0.1 * (v == "b"), seconds=old_seconds, stages=times[v, seed]
        ),
    )
    rows = {r["variant"]: r for r in agg["rows"]}
    assert rows["a"]["seconds"] == pytest.approx({"distill": 42.0, "evaluate": 6.0, "run": 48.0})
    assert rows["b"]["seconds"] == pytest.approx({"distill": 25.0, "evaluate": 4.0, "run": 29.0})
    assert agg["shared_seconds"] == {
        "data": {"seconds": 3.0, "stages": 1, "earlier": 0},  # once: the longest load
        "teachers": {"seconds": 262.0, "stages": 1, "earlier": 0},
        "dfr": {"seconds": 15.0, "stages": 1, "earlier": 0},
    }
    md = (tmp_path / "results.md").read_text()
    assert "| n | s/run |" in md and "s/run: wall-clock seconds of a run's own stages" in md
    table = {line.split("|")[1].strip(): line for line in main_rows(md)}
    assert table["`a`"].endswith("| 2 | 48 |") and table["`b`"].endswith("| 2 | 29 |")
    shared = (
        "Shared stages, computed once for all runs (not in s/run): "
        "data 3.0 s, teachers 262 s, dfr 15 s."
    )
    assert shared in md.splitlines()
    rows = {r["variant"]: r for r in csv.DictReader(io.StringIO(report.to_csv(agg)))}
    assert "seconds_mean" not in rows["a"]  # the old column charged a/0 with the teachers
    assert rows["a"]["seconds_run_mean"] == "48.0" and rows["a"]["seconds_distill_mean"] == "42.0"
    assert rows["b"]["seconds_evaluate_mean"] == "4.0" and rows["b"]["seconds_run_mean"] == "29.0"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["shared_seconds"]["teachers"]["seconds"] == 262.0


def test_costs_count_each_pretrained_network_once(tmp_path):
    """Variant b pretrains a second network (a trained biased model's architecture) beside the
    one a uses: the pretrain stage's seconds are counted per network, not per combination."""

    def results_of(v, seed):
        first = seed == 0
        members = {"teachers": {"key": "A", "seconds": 100.0, "reused": not (first and v == "a")}}
        members["student"] = members["teachers"]
        if v == "b":
            members["biased"] = {"key": "C", "seconds": 50.0, "reused": not first}
        combined = sum({m["key"]: m["seconds"] for m in members.values()}.values())
        times = stage_times(1.0, 262.0, 15.0, 40.0, 5.0, reused=("teachers", "dfr"))
        times["pretrain"] = {"seconds": combined, "reused": False, "directory": "A, C"}
        return fake_results(seed, 0.8, stages=times, pretrain=members)

    agg = cost_sweep(tmp_path, results_of)
    assert agg["shared_seconds"]["pretrain"] == {"seconds": 150.0, "stages": 2, "earlier": 0}


def test_costs_count_each_teacher_group_stage_once(tmp_path):
    """teachers.archs: variant a's teachers are groups A + B, b's are A + C (A shared, computed
    by a): each group's stage is counted once, not per combination."""

    def results_of(v, seed):
        first = seed == 0
        a = {"seconds": 100.0, "reused": not (first and v == "a"), "directory": "A"}
        other = {"seconds": 50.0 if v == "a" else 70.0, "reused": not first}
        other["directory"] = "B" if v == "a" else "C"
        times = stage_times(1.0, 0.0, 15.0, 40.0, 5.0, reused=("dfr",))
        times["teachers"] = {
            "seconds": a["seconds"] + other["seconds"],
            "reused": a["reused"] and other["reused"],
            "directory": f"A, {other['directory']}",
            "parts": [a, other],
        }
        return fake_results(seed, 0.8, stages=times)

    agg = cost_sweep(tmp_path, results_of)
    assert agg["shared_seconds"]["teachers"] == {"seconds": 220.0, "stages": 3, "earlier": 0}


def test_costs_of_stages_computed_before_every_run_and_of_two_teacher_stages(tmp_path):
    """Variant b names other teachers than a: two teacher (and DFR) stages, each counted once
    (told apart by the stage's 'directory' when recorded, else by the teachers' source).
    Seed 0 of each variant trained its teachers (100 s and 200 s); every run reused its DFR
    stage (made by a run that failed, or by another sweep): its recorded time, once each.
    Ported teachers (0 s, reused) would not be listed."""

    def results_of(v, seed):
        reused = ("dfr",) if seed == 0 else ("dfr", "teachers")
        teachers = 200.0 if v == "b" else 100.0
        times = stage_times(1.0, teachers, 15.0, 10.0, 2.0, reused=reused)
        times["teachers"]["directory"] = f"/sweep/stages/teachers-{v}"
        r = fake_results(seed, 0.7, stages=times)
        r["teachers"]["source"] = f"/sweep/stages/teachers-{v}"  # for the DFR stages
        return r

    agg = cost_sweep(tmp_path, results_of)
    assert agg["shared_seconds"] == {
        "data": {"seconds": 1.0, "stages": 1, "earlier": 0},
        "teachers": {"seconds": 300.0, "stages": 2, "earlier": 0},
        "dfr": {"seconds": 30.0, "stages": 2, "earlier": 2},
    }
    line = report.shared_line(agg)
    assert "teachers 300 s (2 stage directories)" in line
    assert "dfr 30 s (2 stage directories, 2 computed by earlier runs)" in line
    agg["shared_seconds"]["teachers"] = {"seconds": 0.0, "stages": 1, "earlier": 1}  # ported
    assert report.shared_line(agg) == (
        "Shared stages, computed once for all runs (not in s/run): data 1.0 s, "
        "dfr 30 s (2 stage directories, 2 computed by earlier runs)."
    )


def test_costs_from_old_results_without_stages(tmp_path):
    """Old results.json (only 'seconds'): data, teachers and DFR are shared, the max over the
    runs (a reusing run recorded its loading time); a run that reused its distillation has
    no 'distill' entry: the mean is over the seeds that have one."""
    seconds = {
        ("a", 0): dict(data=3.0, teachers=262.0, dfr=15.0, distill=40.0, evaluate=5.0),
        ("b", 0): dict(data=2.0, teachers=0.5, dfr=0.1, evaluate=4.0),
        ("a", 1): dict(data=2.5, teachers=0.4, dfr=0.1, distill=44.0, evaluate=7.0),
        ("b", 1): dict(data=2.0, teachers=0.5, dfr=0.2, distill=30.0, evaluate=4.0),
    }
    agg = cost_sweep(
        tmp_path,
        lambda v, seed: fake_results(seed, 0.7, seconds={**seconds[v, seed], "total": 330.0}),
    )
    rows = {r["variant"]: r for r in agg["rows"]}
    assert rows["a"]["seconds"] == pytest.approx({"distill": 42.0, "evaluate": 6.0, "run": 48.0})
    assert rows["b"]["seconds"] == pytest.approx({"distill": 30.0, "evaluate": 4.0, "run": 34.0})
    assert {k: v["seconds"] for k, v in agg["shared_seconds"].items()} == {
        "data": 3.0,
        "teachers": 262.0,
        "dfr": 15.0,
    }
    assert "data 3.0 s, teachers 262 s, dfr 15 s." in (tmp_path / "results.md").read_text()
    # Results with no times at all: no costs, and no line.
    agg = cost_sweep(tmp_path / "none", lambda v, seed: fake_results(seed, 0.7, seconds={}))
    assert math.isnan(agg["rows"][0]["seconds"]["run"]) and agg["shared_seconds"] == {}
    assert "Shared stages" not in (tmp_path / "none" / "results.md").read_text()


def test_plots_follow_the_labels(tmp_path):
    root = tmp_path / "sweep"
    variants = {}
    for method, w in (("AGRE-KD", "agre"), ("AVER", "aver")):
        for gamma in (0.0, 0.25, 0.5):
            variants[f"{w}_g{gamma:g}"] = {"method": method, "gamma": gamma}
    for d in (1, 3):
        variants[f"agre_d{d}"] = {"method": "AGRE-KD", "debiased": d}
    write_spec(root, spec(variants, seeds=(0, 1), baseline="agre_g0"))
    for i, name in enumerate(variants):
        kinds = ("DFR", "ERM", "ERM") if name == "agre_d1" else ("DFR", "DFR", "ERM")
        weighting = "aver" if name.startswith("aver") else "agre"
        for seed in (0, 1):
            r = fake_results(seed, 0.5 + 0.02 * i + 0.01 * seed, kinds, weighting)
            write_run(root, name, seed, r, m=3)
    agg = report.write_report(root)
    names = sorted(Path(p).name for p in agg["plots"])
    assert names == [
        "group_acc_best.png",
        "methods_by_gamma.png",
        "teacher_weights.png",
        "wga_by_variant.png",
        "wga_vs_debiased.png",
        "wga_vs_gamma.png",
    ]
    for p in agg["plots"]:
        assert_png(root / p)
    assert "![wga_vs_gamma](plots/wga_vs_gamma.png)" in (root / "results.md").read_text()


def test_plots_without_labels_and_report_cli(tmp_path, capsys):
    """No labels: only the by-variant and per-group plots (no weights: AVER runs); no
    sweep.json: variants and seeds from the directories; `python -m agre_jax.report`."""
    root = tmp_path / "sweep"
    for name in ("x", "y"):
        write_run(root, name, 0, fake_results(0, 0.6, weighting="aver"))
    assert report.main([str(root)]) == 0
    assert "| `x` |" in capsys.readouterr().out
    assert sorted(p.name for p in (root / "plots").iterdir()) == [
        "group_acc_best.png",
        "wga_by_variant.png",
    ]
    assert report.main([str(tmp_path / "nothing")]) == 2


# ---------------------------------------------------------------- sweep definition and runner


def tiny_sweep(**overrides):
    c = sweep.define(
        tiny.get_config(),
        name="t",
        title="test",
        variants=[
            sweep.variant("a", {"distill.weighting": "agre"}, method="AGRE-KD"),
            sweep.variant("b", {"distill.weighting": "aver", "train.epochs": 1}, method="AVER"),
        ],
        baseline="a",
        seeds=(0, 1),
    )
    c.sweep.compilation_cache = False  # a global JAX setting: not from inside pytest
    c.update_from_flattened_dict(overrides)
    return c


def test_plan_applies_overrides_seeds_and_shared_stage_dir(tmp_path):
    runs = sweep_runner.plan(tiny_sweep(), tmp_path)
    assert [(r.variant, r.seed) for r in runs] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    b1 = runs[3]
    assert b1.directory == tmp_path / "runs" / "b" / "seed1"
    assert b1.config.seed == 1 and b1.config.train.epochs == 1
    assert b1.config.distill.weighting == "aver" and "sweep" not in b1.config
    assert {r.config.stage_dir for r in runs} == {str(tmp_path / "stages")}
    only = sweep_runner.plan(tiny_sweep(**{"sweep.only": "b", "sweep.seeds": (3,)}), tmp_path)
    assert [(r.variant, r.seed) for r in only] == [("b", 3)]


@pytest.mark.parametrize(
    "variant, message",
    [
        ({"name": "a", "overrides": {"distill.nope": 1}}, "bad override"),
        ({"name": "a", "overrides": {"distill.weighting": 3}}, "bad override"),
        ({"name": "a", "overrides": {"distill.weighting": "nope"}}, "unknown weighting"),
        ({"name": "a", "overrides": {"seed": 3}}, "set by the sweep"),
        ({"name": "a/b"}, "plain directory name"),
        ({"name": "a", "labels": {"n": 1}}, "labels must be"),
    ],
)
def test_bad_variants_are_refused(tmp_path, variant, message):
    c = tiny_sweep()
    c.sweep.variants = (variant,)
    c.sweep.baseline = ""
    with pytest.raises(sweep.SweepError, match=message):
        sweep_runner.plan(c, tmp_path)


def test_bad_sweep_fields_are_refused(tmp_path):
    for overrides, message in (
        ({"sweep.baseline": "zzz"}, "baseline"),
        ({"sweep.seeds": (1, 1)}, "duplicates"),
        ({"sweep.seeds": ()}, "non-empty"),
        ({"sweep.seeds": (-1,)}, r"integers in \[0, 2\*\*31\), got \[-1\]"),
        ({"sweep.only": "a,zzz"}, "unknown variants"),
    ):
        with pytest.raises(sweep.SweepError, match=message):
            sweep_runner.plan(tiny_sweep(**overrides), tmp_path)
    c = tiny_sweep()
    c.sweep.variants = c.sweep.variants + (c.sweep.variants[0],)
    with pytest.raises(sweep.SweepError, match="duplicate variant names"):
        sweep_runner.plan(c, tmp_path)


@pytest.mark.parametrize("name", SWEEP_CONFIGS)
@pytest.mark.parametrize("preset", [None, "waterbirds", "celeba"])
def test_sweep_configs_plan_on_every_preset(tmp_path, name, preset):
    module = __import__(f"configs.sweeps.{name}", fromlist=["get_config"])
    config = module.get_config(preset)
    runs = sweep_runner.plan(config, tmp_path)  # builds and validates every run config
    s = sweep.spec_of(config)
    assert len(runs) == len(s["variants"]) * len(s["seeds"])
    assert s["baseline"] in {v["name"] for v in s["variants"]}
    if name != "tiny":
        assert s["seeds"] == [0, 1, 2]
    # Sweeping the student's seed keeps the teacher and DFR stages shared: one data config,
    # and one pair of stage keys given that data (stage_keys reads only `data.key`), per
    # ensemble size (configs/sweeps/ensemble_size.py trains one teacher stage per size).
    assert {json.dumps(r.config.data.to_dict(), sort_keys=True) for r in runs} == {
        json.dumps(config.data.to_dict(), sort_keys=True)
    }
    data = fakes.dataset_keys()
    keys = {(k.teachers, k.dfr) for k in (stages.stage_keys(r.config, data) for r in runs)}
    ensembles = {(r.config.teachers.num, settings.teacher_groups(r.config)) for r in runs}
    assert len(keys) == len(ensembles)  # (configs/sweeps/teacher_archs.py: one per ensemble)


class FakeTrainer:
    """Writes a run's config and results.json; fails where told."""

    def __init__(self, fail=None, error=RuntimeError):
        self.calls, self.fail, self.error = [], set(fail or ()), error

    def __call__(self, config, run_dir, overwrite=False):
        run_dir = Path(run_dir)
        self.calls.append((run_dir.parent.name, config.seed, overwrite))
        workdir.prepare(run_dir, config, overwrite)
        if (run_dir.parent.name, config.seed) in self.fail:
            raise self.error(f"no luck for seed {config.seed}")
        r = fake_results(config.seed, 0.5 + 0.1 * config.seed, weighting=config.distill.weighting)
        workdir.write_json(run_dir / "results.json", r)
        return r


def test_run_sweep_skips_finished_runs_and_continues_past_failures(tmp_path, capsys):
    fake = FakeTrainer(fail={("b", 1)})
    out = sweep_runner.run_sweep(tiny_sweep(), tmp_path, source="tests/x.py", train_fn=fake)
    assert len(fake.calls) == 4 and out["exit_code"] == 1
    # The sweep ends by saying where its report is.
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == (
        f"[sweep] report: {tmp_path / 'results.md'} (and results.csv, summary.json, "
        f"plots/ ({len(out['plots'])} plots), in {tmp_path})"
    )
    error = (tmp_path / "runs" / "b" / "seed1" / sweep.ERROR_FILE).read_text()
    assert error.startswith("RuntimeError: no luck for seed 1") and "Traceback" in error
    assert [o["status"] for o in out["outcomes"]] == ["done", "done", "done", "failed"]
    md = (tmp_path / "results.md").read_text()
    assert "`b` seed 1: RuntimeError: no luck for seed 1" in md and "`tests/x.py`" in md
    assert json.loads((tmp_path / sweep.SPEC_FILE).read_text())["seeds"] == [0, 1]
    assert (tmp_path / "plots" / "wga_by_variant.png").exists()

    fake = FakeTrainer()  # again: only the failed run runs, and succeeds
    out = sweep_runner.run_sweep(tiny_sweep(), tmp_path, train_fn=fake)
    assert fake.calls == [("b", 1, False)] and out["exit_code"] == 0
    assert not (tmp_path / "runs" / "b" / "seed1" / sweep.ERROR_FILE).exists()
    assert [r["n"] for r in out["rows"]] == [2, 2]

    # A changed base config is refused before anything runs, or rerun with overwrite.
    changed = tiny_sweep(**{"distill.temperature": 2.0})
    with pytest.raises(sweep.SweepError, match="another config"):
        sweep_runner.run_sweep(changed, tmp_path, train_fn=fake)
    fake = FakeTrainer()
    out = sweep_runner.run_sweep(changed, tmp_path, overwrite=True, train_fn=fake)
    assert sorted(fake.calls) == [(v, s, True) for v in "ab" for s in (0, 1)]


@pytest.mark.parametrize(
    "error, code",
    [
        (errors.ConfigError, 2),
        (errors.WorkdirError, 2),
        (workdir.ConfigMismatchError, 2),
        (errors.UserError, 2),
        (ValueError, 1),  # a bug, not bad input
    ],
)
def test_run_sweep_bad_input_exit_code(tmp_path, error, code):
    """A run that fails on an errors.UserError (bad input) makes the sweep exit with 2."""
    fake = FakeTrainer(fail={("a", 0)}, error=error)
    out = sweep_runner.run_sweep(tiny_sweep(**{"sweep.seeds": (0,)}), tmp_path, train_fn=fake)
    assert out["exit_code"] == code and len(fake.calls) == 2


def test_overrides_between():
    from configs import default, multilayer_c

    diff = sweep.overrides_between(default.get_config(), multilayer_c.get_config())
    assert diff == {
        "distill.gammas.layer2": 0.05,
        "distill.gammas.layer3": 0.1,
        "distill.gammas.layer4": 0.25,
    }
    other = ml_collections.ConfigDict({"zzz": 1})
    with pytest.raises(sweep.SweepError):
        sweep.overrides_between(default.get_config(), other)


# ---------------------------------------------------------------- import graph


def import_graph(root=ROOT):
    """{module: the agre_jax modules it imports}, for agre_jax/*.py and agre_jax/data/*.py,
    counting imports anywhere in a module (inside functions too). `from P import x` imports
    module P.x when there is one, else P."""
    files = sorted((root / "agre_jax").glob("*.py")) + sorted((root / "agre_jax/data").glob("*.py"))
    names = {}
    for f in files:
        parts = f.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in names.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in names else base)
        graph[name] = {t for t in targets if t in names and t != name}
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_import_graph_has_no_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    graph = import_graph()
    assert {"agre_jax.sweep", "agre_jax.report", "agre_jax.data.core"} <= set(graph)
    assert {"agre_jax.sweep", "agre_jax.report", "agre_jax.train"} <= graph["agre_jax.sweep_runner"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # Definitions need only errors; the report never reaches the runner or the training.
    assert reachable(graph, "agre_jax.sweep") <= {"agre_jax.errors"}
    assert not reachable(graph, "agre_jax.report") & {"agre_jax.sweep_runner", "agre_jax.train"}


def test_import_graph_counts_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "agre_jax"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("from . import core\n")
    (pkg / "data" / "core.py").write_text("def f():\n    from agre_jax import a\n")
    (pkg / "a.py").write_text("import agre_jax.data.core\nfrom agre_jax.data import DataError\n")
    graph = import_graph(tmp_path)
    assert graph == {
        "agre_jax": set(),
        "agre_jax.a": {"agre_jax.data.core", "agre_jax.data"},
        "agre_jax.data": {"agre_jax.data.core"},
        "agre_jax.data.core": {"agre_jax.a"},
    }
    assert find_cycle(graph) == ["agre_jax.a", "agre_jax.data", "agre_jax.data.core", "agre_jax.a"]


def test_sweep_definitions_and_sweep_configs_import_neither_jax_nor_tensorflow():
    """Config files import agre_jax.sweep: loading and building every configs/sweeps/*.py
    must not pull in jax or tensorflow (seconds of imports, and TF hides GPUs)."""
    code = (
        "import importlib, sys\n"
        "import agre_jax.sweep\n"
        f"for name in {SWEEP_CONFIGS!r}:\n"
        "    importlib.import_module(f'configs.sweeps.{name}').get_config(None)\n"
        "heavy = ('jax', 'jaxlib', 'flax', 'tensorflow', 'tensorflow_datasets', 'torch')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
    assert len(SWEEP_CONFIGS) >= 9


# ---------------------------------------------------------------- end to end


def main(*args):
    return subprocess.run(
        [sys.executable, "main.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=900,
    )


def test_main_rejects_a_bad_sweep(tmp_path):
    proc = main(
        "--config",
        "configs/sweeps/tiny.py",
        "--config.sweep.baseline=nope",
        "--workdir",
        str(tmp_path),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: invalid sweep: sweep.baseline 'nope' is not a variant" in proc.stderr
