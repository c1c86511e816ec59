"""The run layer in process (as flax's examples/imagenet train_test.py): train_and_evaluate on
the tiny config, each compiled step traced once, reuse that keeps the recorded stage times,
and stage keys that follow content, not paths."""

import dataclasses
import functools
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
    distillation step runs under pmap here (4 fake devices): its state is replicated as the
    step lays out its outputs (distill.replicate), or the second call would trace again."""
    work = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setattr(distill, "distill_step", chex.assert_max_traces(distill.distill_step, n=1))
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


def test_deep_ensemble_and_trained_biased_model(run, tmp_path, capsys):
    """baselines.deep_ensemble: M ERM networks of the student's architecture (width 8 here,
    the teachers' 4), trained as a teacher stage, with DFR heads; their majority votes in the
    report, equal to votes recomputed from the saved networks. With the teachers' own
    architecture the stage is theirs (same keys). In the same run, biased.arch: the biased
    model is one ERM ResNet-34 trained as a teacher stage, and a distillation input."""
    import jax
    import numpy as np

    from agre_jax import checkpoints, evaluation, settings

    work, _ = run
    config = small_config()
    config.stage_dir = str(work / "stages")  # the fixture's teachers and DFR heads: reused
    config.student.width = 8
    config.baselines.deep_ensemble = True
    config.biased.arch = "resnet34"
    report = train.train_and_evaluate(config, tmp_path / "w")
    out = capsys.readouterr().out
    assert "[deep ensemble] 2 ERM networks of the student's architecture (resnet18, width 8)" in out
    assert "[biased] one ERM network of resnet34 (width 4) as the biased model" in out
    assert "[biased] epoch 1/" in out and "[deep ensemble] epoch 1/" in out  # their own lines
    biased = report["models"]["biased"]
    assert (biased["source"], biased["arch"], biased["width"]) == ("trained", "resnet34", 4)
    assert not report["stages"]["biased"]["reused"]
    assert Path(biased["path"]).parent == Path(report["stages"]["biased"]["directory"])
    assert report["test"]["biased model (trained resnet34, width 4)"]["n"] > 0
    assert (
        report["stages"]["teachers"]["reused"] and not report["stages"]["deep_ensemble"]["reused"]
    )
    directory = Path(report["stages"]["deep_ensemble"]["directory"])
    data = stages.load_data(config)
    model = settings.model(config.student, data.num_classes, data.dtype)
    predict = jax.jit(lambda v, x: model.apply(v, x, train=False))
    logits = []
    for m in range(2):
        variables, info = checkpoints.load_variables(directory / f"erm_{m}")
        assert info["model_options"]["width"] == 8
        got = evaluation.collect(functools.partial(predict, variables), data.eval_batches("test"))
        logits.append(got["output"])
    test = data.splits["test"]
    votes = evaluation.ensemble_predictions(np.stack(logits))["majority"]
    want = data.summarize(votes, test.label, test.group)
    got = report["test"]["Deep Ensemble (student size, 2 ERM), majority"]
    assert got["wga"] == want["wga"] and got["avg_acc"] == want["avg_acc"]
    assert "Deep Ensemble (student size, 2 DFR), majority" in report["test"]

    same = small_config()
    keys = stages.stage_keys(same, data)
    de_keys = stages.stage_keys(stages.deep_ensemble_config(same), data)
    assert (de_keys.teachers, de_keys.dfr) == (keys.teachers, keys.dfr)
    # The trained biased model is an input of the student, keyed on its stage.
    with_biased = stages.stage_keys(same, data, biased_stage="abc")
    assert with_biased.teachers == keys.teachers and with_biased.inputs != keys.inputs


def test_teachers_of_two_architectures(run, capsys, tmp_path):
    """teachers.archs = (resnet18, resnet18, resnet50): each architecture a teacher stage of
    its own (the ResNet-18 pair is the plain two-teacher config's stage: the fixture's,
    reused), DFR heads of both widths, test rows in teacher order, and feature distillation
    with adapters per group. The networks then as ported checkpoints: read in groups, refused
    out of order."""
    import jax
    import numpy as np

    from agre_jax import settings

    work, _ = run
    config = small_config()
    config.stage_dir = str(work / "stages")
    config.teachers.num = 3
    config.teachers.archs = ("resnet18", "resnet18", "resnet50")
    report = train.train_and_evaluate(config, tmp_path / "w")
    out = capsys.readouterr().out
    assert "[teachers] group 1/2: 2 x resnet18\n[teachers] reusing" in out
    assert "[teachers] group 2/2: 1 x resnet50" in out
    parts = report["stages"]["teachers"]["parts"]  # each group's stage, for sweep costs
    assert [p["reused"] for p in parts] == [True, False]
    members = report["models"]["teachers"]
    assert [m["arch"] for m in members] == ["resnet18", "resnet18", "resnet50"]
    table = (tmp_path / "w" / "results.md").read_text()  # rows name their architecture
    assert "| ERM teacher 1 (resnet18) |" in table and "| DFR teacher 2 (resnet50) |" in table
    assert "ERM teacher 2" in report["test"]  # results.json keeps the plain names
    data = stages.load_data(config)
    keys = stages.stage_keys(config, data)
    assert keys.groups[0] == stages.stage_keys(small_config(), data).teachers
    single = small_config()
    single.teachers.arch, single.teachers.num, single.teachers.seed = "resnet50", 1, 2
    assert keys.groups[1] == stages.stage_keys(single, data).teachers  # teacher m: seed + m
    # Each group's last teacher's test row, recomputed from its own checkpoint.
    heads = np.load(Path(report["stages"]["dfr"]["directory"]) / "heads.npz")
    assert [heads[f"kernel_{i}"].shape[0] for i in range(3)] == [32, 32, 128]  # pooled widths
    paths = [m["path"] for m in members]
    for i in (1, 2):
        loaded = stages.load_checkpoint(paths[i], "t", data.image_size, data.dtype)
        erm = data.evaluate(
            jax.jit(lambda x, ld=loaded: ld.model.apply(ld.variables, x, train=False)), "test"
        )
        assert erm["wga"] == report["test"][f"ERM teacher {i}"]["wga"]
        assert erm["avg_acc"] == report["test"][f"ERM teacher {i}"]["avg_acc"]
    # Ported: two of the same networks.
    config = small_config()
    config.teachers.checkpoints = (paths[1], paths[2])
    with pytest.raises(errors.ConfigError, match="several architectures"):
        stages.read_ported_teachers(config, data)
    config.teachers.archs = ("resnet50", "resnet18")
    with pytest.raises(errors.ConfigError, match="in the same order"):
        stages.read_ported_teachers(config, data)
    config.teachers.archs = ("resnet18", "resnet50")
    ported = stages.read_ported_teachers(config, data)
    t = stages.teachers_stage(config, data, tmp_path, "k", ported=ported)
    assert t.group_sizes == (1, 1) and [m.block_cls for m in t.models] == [
        m.block_cls for m in settings.teacher_models(config, 2, data.dtype)
    ]
    config.teachers.checkpoints = (paths[1], paths[2], paths[1])
    config.teachers.archs = ()
    with pytest.raises(errors.CheckpointError, match="listed together"):
        stages.read_ported_teachers(config, data)
