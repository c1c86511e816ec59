"""main.py end to end on configs/tiny.py, in this process (tests/inprocess.py): the report,
stage reuse, another config in the same workdir, refused ported teachers and a non-finite
loss; and in real processes, killed mid-stage and mid-save, then resumed to identical
results (the exit status of real processes: tests/test_bad_inputs.py). Config and data mistakes are
tests/test_bad_inputs.py's (in process; a real process's exit status there too)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from inprocess import run_main

from agre_jax import checkpoints

ROOT = Path(__file__).resolve().parents[1]
# 2 teacher epochs so that the teacher stage has a checkpoint before its end.
TINY = ["--config", "configs/tiny.py", "--config.teachers.epochs=2"]

KILLER = textwrap.dedent(
    """
    # Runs main.py, SIGKILLing itself inside one stage: before step KILL_AT ('step'), or in
    # the middle of the KILL_AT-th checkpoint save, after writing, before its commit ('save').
    import os, runpy, signal, sys
    sys.path.insert(0, os.getcwd())  # the repository root, as for main.py itself
    from agre_jax import loop
    from orbax.checkpoint._src.path import atomicity

    stage, at, mode = os.environ["KILL_STAGE"], int(os.environ["KILL_AT"]), os.environ["KILL_MODE"]
    run = loop.Loop.run

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def patched(self, carry):
        if self.name == stage and mode == "step":
            step = self.step

            def killing(c, b, s):
                if s == at:
                    die()
                return step(c, b, s)

            self.step = killing
        if self.name == stage and mode == "save":
            finalize, saves = atomicity.AtomicRenameTemporaryPath.finalize, []

            async def killing_finalize(tmp):
                saves.append(tmp)
                if len(saves) == at:
                    die()
                return await finalize(tmp)

            atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize
        return run(self, carry)

    loop.Loop.run = patched
    sys.argv = ["main.py"] + sys.argv[1:]
    runpy.run_path("main.py", run_name="__main__")
    """
)


def main(*args, env=None, script="main.py"):
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny run, in this process: (workdir, stdout)."""
    work = tmp_path_factory.mktemp("reference")
    code, out, err = run_main([*TINY, "--workdir", str(work)])
    assert code == 0, out[-3000:] + err[-3000:]
    return work, out


def test_report_files_and_structure(reference):
    work, stdout = reference
    report = json.loads((work / "results.json").read_text())
    names = set(report["test"])
    assert {
        "ERM teacher 0",
        "ERM teacher 1",
        "DFR teacher 0",
        "DFR teacher 1",
        "student (best val WGA)",
        "student (last)",
    } <= names
    assert any(n.startswith("ensemble") and n.endswith("avg logits") for n in names)
    assert any(n.startswith("ensemble") and n.endswith("majority") for n in names)
    for row in report["test"].values():
        assert len(row["group_acc"]) == 4 and 0.0 <= row["wga"] <= row["avg_acc"] + 1e-9
        assert row["n"] == sum(row["group_count"])
    assert report["selection"].startswith("student checkpoint selected by worst-group")
    assert set(report["seconds"]) >= {"data", "teachers", "dfr", "distill", "evaluate", "total"}
    assert report["versions"]["jax"] and report["config"]["distill"]["weighting"] == "agre"
    assert report["teachers"]["kinds"] == ["DFR", "DFR"]
    assert "weight/0" in report["distill_weights"] and "empty_rows" in report["distill_weights"]
    table = (work / "results.md").read_text()
    assert "| student (best val WGA) |" in table and "avg (train-weighted)" in table
    assert "| student (best val WGA) |" in stdout  # the table is printed
    assert "[distill] epoch 2/2" in stdout  # one summary line per epoch
    records = [
        json.loads(x) for x in (work / "distill" / "metrics.jsonl").read_text().split("\n") if x
    ]
    assert {"train", "epoch", "eval"} <= {r["kind"] for r in records}
    assert list((work / "distill" / "tensorboard").iterdir())  # TensorBoard event files
    assert (work / "config.json").exists()


def test_same_config_reuses_every_stage(reference, capsys):
    """The same config again, given as dtype='auto' (float32 on this CPU, resolved by main.py
    before the run is identified): the same run and stages, nothing recomputed."""
    work, _ = reference
    before = json.loads((work / "results.json").read_text())
    code, out, err = run_main([*TINY, "--workdir", str(work), "--config.dtype=auto"], capsys)
    assert code == 0, err[-3000:]
    for stage in ("teachers", "dfr", "distill"):
        assert f"[{stage}] reusing" in out
    after = json.loads((work / "results.json").read_text())
    assert after["test"] == before["test"]
    assert after["config"]["dtype"] == "float32"


def test_other_config_is_refused_then_overwritten(reference, tmp_path, capsys):
    work, _ = reference
    code, _, err = run_main(
        [*TINY, "--config.distill.weighting=aver", "--workdir", str(work)], capsys
    )
    assert code == 2 and "another config" in err
    assert "distill.weighting" in err and "Traceback" not in err
    assert (work / "results.json").exists()  # nothing was removed
    # --overwrite replaces the run's outputs but keeps (and reuses) the teacher stages.
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(work), str(copy)], check=True)
    args = ["--config.distill.weighting=aver", "--workdir", str(copy), "--overwrite"]
    code, out, err = run_main([*TINY, *args, "--config.train.epochs=1"], capsys)
    assert code == 0, err[-3000:]
    assert "[teachers] reusing" in out and "[distill] reusing" not in out
    assert (
        json.loads((copy / "results.json").read_text())["config"]["distill"]["weighting"] == "aver"
    )


def test_ported_teachers_of_another_arch_or_classes_are_refused(reference, tmp_path, capsys):
    work, _ = reference
    teacher = next((work / "stages").glob("teachers-*")) / "erm_0"
    code, _, err = run_main(
        [
            *TINY,
            "--workdir",
            str(tmp_path / "a"),
            "--config.teachers.arch=resnet50",
            f"--config.teachers.checkpoints=('{teacher}',)",
        ],
        capsys,
    )
    assert code == 2 and "resnet18" in err and "resnet50" in err
    info = json.loads((teacher / checkpoints.PROVENANCE).read_text())
    variables, _ = checkpoints.load_variables(teacher)
    variables["params"]["fc"] = {
        "kernel": np.zeros((variables["params"]["fc"]["kernel"].shape[0], 3), np.float32),
        "bias": np.zeros(3, np.float32),
    }
    bad = tmp_path / "bad_teacher"
    checkpoints.save_variables(bad, variables, metadata={**info, "num_classes": 3})
    code, _, err = run_main(
        [*TINY, "--workdir", str(tmp_path / "b"), f"--config.teachers.checkpoints=('{bad}',)"],
        capsys,
    )
    assert code == 2 and "3 classes but the dataset has 2" in err
    wrong = tmp_path / "wrong_arch"
    checkpoints.save_variables(
        wrong, checkpoints.load_variables(teacher)[0], metadata={**info, "arch": "resnet34"}
    )
    code, _, err = run_main(
        [
            *TINY,
            "--workdir",
            str(tmp_path / "c"),
            "--config.teachers.arch=resnet34",
            f"--config.teachers.checkpoints=('{wrong}',)",
        ],
        capsys,
    )
    assert code == 2 and "do not fit" in err and "Traceback" not in err


def test_non_finite_loss_stops_with_the_stage_and_step(reference, tmp_path, capsys):
    work, _ = reference
    code, _, err = run_main(
        [
            *TINY,
            "--workdir",
            str(tmp_path / "w"),
            "--config.train.optimizer.learning_rate=1e30",
            f"--config.stage_dir={work / 'stages'}",
        ],
        capsys,
    )
    assert code == 1, err[-2000:]
    assert "stage 'distill': non-finite loss" in err and "at step" in err
    assert "Traceback" not in err


def test_killed_runs_resume_to_identical_results(reference, tmp_path, capsys):
    ref, _ = reference
    work = tmp_path / "killed"
    (tmp_path / "killer.py").write_text(KILLER)
    script = str(tmp_path / "killer.py")
    args = (*TINY, "--workdir", str(work))
    # Teacher stage: 7 steps per epoch, checkpoint at the end of epoch 1; die at step 10.
    proc = main(
        *args, script=script, env={"KILL_STAGE": "teachers", "KILL_AT": "10", "KILL_MODE": "step"}
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    # Distillation: 15 steps per epoch, checkpoints every 5; die in the middle of writing the
    # checkpoint of step 20 (two atomic renames per save: the 7th), after its files, before
    # its commit: the checkpoint of step 15 must survive intact.
    proc = main(
        *args, script=script, env={"KILL_STAGE": "distill", "KILL_AT": "7", "KILL_MODE": "save"}
    )
    assert (
        proc.returncode == -9 and "[teachers] resuming from the checkpoint at step 7" in proc.stdout
    )
    code, out, err = run_main(list(args), capsys)  # the rest, in this process
    assert code == 0, err[-3000:]
    assert "[distill] resuming from the checkpoint at step 15" in out
    # Also the determinism test (issue 12): the same config and seeds, in another process and
    # workdir, give bitwise-identical teachers and students.
    teachers = sorted(str(p.relative_to(ref)) for p in ref.glob("stages/teachers-*/erm_*"))
    assert teachers
    for name in ("distill/student_best", "distill/student_last", *teachers):
        got, _ = checkpoints.load_variables(work / name)
        want, _ = checkpoints.load_variables(ref / name)
        for a, b in zip(_leaves(got), _leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
    # Resume is invisible: every number of results.json and metrics.jsonl, wall times aside.
    got, want = (json.loads((w / "results.json").read_text()) for w in (work, ref))
    assert _numbers(got) == _numbers(want)
    got, want = (_records(w / "distill" / "metrics.jsonl") for w in (work, ref))
    assert got == want and len(got) == len({(r["kind"], r["step"]) for r in got})


WALL_TIMES = ("seconds", "stages", "wall_seconds", "time", "versions")


def _numbers(report):
    """results.json without wall times and paths (the two runs live in different dirs)."""
    out = {k: v for k, v in report.items() if k not in WALL_TIMES}
    for m in out["models"]["teachers"]:
        m.pop("path", None)
    return out


def _records(path):
    records = [json.loads(x) for x in path.read_text().splitlines() if x]
    return [{k: v for k, v in r.items() if k not in WALL_TIMES} for r in records]


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_reports_are_readable_by_others(reference):
    work, _ = reference
    for name in ("config.json", "results.json", "results.md"):
        assert (work / name).stat().st_mode & 0o777 == 0o644, name
