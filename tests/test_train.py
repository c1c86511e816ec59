"""The run layer in process (as flax's examples/imagenet train_test.py): train_and_evaluate on
the tiny config, each compiled step traced once, reuse that keeps the recorded stage times,
and stage keys that follow content, not paths."""

import dataclasses
import json
from pathlib import Path

import chex
import pytest

from agre_jax import distill, errors, stages, teachers, train
from configs import tiny

ROOT = Path(__file__).resolve().parents[1]


def small_config():
    config = tiny.get_config()
    # Two teacher epochs: the carry that the first evaluation updates must not make the
    # step compile again (a weak-typed best WGA did: 30 s on the default).
    config.teachers.epochs = 2
    config.train.epochs = 1
    config.dfr.steps = 10
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One in-process tiny run with every compiled step limited to its first compilation. The
    distillation step runs under pmap here (4 fake devices), and jax.pmap traces a function
    twice when it first compiles it (measured with jax 0.10.2: a counting function under
    pmap, 3 calls, 2 traces; under jit, 1), so a recompilation is a third trace."""
    work = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setattr(distill, "distill_step", chex.assert_max_traces(distill.distill_step, n=2))
    mp.setattr(teachers, "erm_step", chex.assert_max_traces(teachers.erm_step, n=1))
    try:
        report = train.train_and_evaluate(small_config(), work)
    finally:
        mp.undo()
        chex.clear_trace_counter()
    return work, report


def test_train_and_evaluate_smoke(run):
    work, report = run
    assert report["test"]["student (best val WGA)"]["n"] == report["test"]["ERM teacher 0"]["n"]
    assert set(report["stages"]) == {"data", "teachers", "dfr", "distill", "evaluate"}
    assert not any(s["reused"] for s in report["stages"].values())
    assert report["models"]["teachers"][0]["arch"] == "resnet18"
    assert report["data_fingerprint"]
    saved = json.loads((work / "results.json").read_text())
    assert saved["test"] == json.loads(json.dumps(report["test"]))
    assert not (work / ".lock").read_text()  # released


def test_rerun_reuses_every_stage_and_keeps_its_times(run, capsys):
    work, first = run
    again = train.train_and_evaluate(small_config(), work)
    out = capsys.readouterr().out
    for stage in ("teachers", "dfr", "distill"):
        assert f"[{stage}] reusing" in out
        assert again["stages"][stage]["reused"]
        assert again["stages"][stage]["seconds"] == first["stages"][stage]["seconds"]
    assert again["test"] == first["test"]


def test_stage_keys_follow_content(run):
    work, _ = run
    config = small_config()
    data = stages.load_data(config)
    keys = stages.stage_keys(config, data)
    other = dataclasses.replace(data, fingerprint="0" * 16)
    assert stages.stage_keys(config, other).teachers != keys.teachers
    config.data.data_dir = str(work / "elsewhere")  # a path alone changes no key
    assert stages.stage_keys(config, data) == keys
    config.teachers.debiased = 1  # which heads distil: the student's inputs only
    changed = stages.stage_keys(config, data)
    assert changed.teachers == keys.teachers and changed.inputs != keys.inputs


def test_stale_distillation_is_refused_then_replaced(tmp_path):
    directory = tmp_path / "distill"
    directory.mkdir()
    (directory / stages.INPUTS_FILE).write_text(json.dumps({"key": "old"}))
    stages.check_distill_inputs(directory, "old", overwrite=False)
    with pytest.raises(errors.WorkdirError, match="distilled from other inputs"):
        stages.check_distill_inputs(directory, "new", overwrite=False)
    assert directory.exists()
    stages.check_distill_inputs(directory, "new", overwrite=True)
    assert not directory.exists()


def test_damaged_stage_is_one_workdir_error(run, tmp_path):
    """A finished stage whose files were damaged is refused naming it, before any training."""
    import shutil

    work, _ = run
    stage_dir = tmp_path / "stages"
    shutil.copytree(work / "stages", stage_dir)
    (next(stage_dir.glob("dfr-*")) / "heads.npz").write_bytes(b"garbage")
    config = small_config()
    config.stage_dir = str(stage_dir)
    with pytest.raises(errors.WorkdirError, match="is damaged"):
        train.train_and_evaluate(config, tmp_path / "w")


def test_same_config_and_seeds_give_bitwise_identical_runs(run, tmp_path):
    """Determinism on one machine (issue 12): a second run of the same config and seeds, in a
    fresh workdir with its own stages, trains the same teachers and student bit for bit and
    reports the same numbers. (Across machines, float rounding differs: see the README.)"""
    import numpy as np
    from flax import traverse_util

    from agre_jax import checkpoints

    work, first = run
    second = train.train_and_evaluate(small_config(), tmp_path / "again")
    assert second["test"] == first["test"]
    assert not any(s["reused"] for s in second["stages"].values())

    def arrays(directory):
        variables, _ = checkpoints.load_variables(directory)
        return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}

    teachers = sorted(str(p.relative_to(work)) for p in work.glob("stages/teachers-*/erm_*"))
    assert teachers
    for path in ("distill/student_best", "distill/student_last", *teachers):
        x, y = arrays(work / path), arrays(tmp_path / "again" / path)
        assert x.keys() == y.keys(), path
        for k in x:
            assert x[k].tobytes() == y[k].tobytes(), f"{path}: {k} differs"
