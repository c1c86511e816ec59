"""One run, end to end: `train_and_evaluate(config, workdir)` is what `main.py` calls.

It reads in one pass: check every input, then the stages (agre_jax/stages.py) in order, then
the report. Pretraining, teacher and DFR stages live in `<stage_dir>/<name>-<key>/` (key: their
settings and their inputs' content) and are reused by any run with the same key; the
student's stage is `<workdir>/distill/`.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from agre_jax import distributed, errors, evaluation, settings, stages
from agre_jax import workdir as wd
from agre_jax.data import core

MAX_LISTED_GROUPS = 8  # the [data] line lists train groups up to this many, else a range
SELECTION = f"student checkpoint {evaluation.SELECTION}"
AVERAGES = {
    "avg_acc": "plain accuracy over the test examples",
    "avg_acc_weighted": "group accuracies weighted by training group proportions (DFR)",
    "gap": "avg_acc_weighted - wga",
}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """Runs (or resumes) every stage and writes results.json and results.md in `workdir`.

    Raises:
      errors.UserError: bad input (config, data, checkpoints, workdir), before any training.
      loop.NonFiniteLossError: a stage diverged; its last good checkpoint is kept.
    """
    start = time.time()
    config = settings.resolve_dtype(config)  # 'auto' -> this backend's dtype (done by main too)
    run_layout = settings.validate(config)
    run_dir = Path(workdir)
    stage_dir = Path(config.stage_dir) if config.stage_dir else run_dir / "stages"
    for key, path in (("--workdir", run_dir), ("config.stage_dir", stage_dir)):
        try:
            wd.check_writable(path)
        except errors.WorkdirError as e:
            raise errors.WorkdirError(f"{key}: {e}") from e
    created = not run_dir.exists()
    try:
        # In a multi-process run the other processes wait here until process 0 has prepared
        # the data and checked every input, then read them (agre_jax/distributed.py); the
        # trained stages then run on every process together.
        with wd.lock(run_dir), distributed.PrimaryFirst("the data and the inputs") as gate:
            return _run(config, run_dir, stage_dir, run_layout, overwrite, start, gate)
    except errors.UserError:
        if (
            created
            and distributed.is_primary()
            and {p.name for p in run_dir.iterdir()} <= {".lock"}
        ):
            shutil.rmtree(run_dir)  # bad input leaves nothing behind
        raise


def _run(config, run_dir: Path, stage_dir: Path, run_layout, overwrite: bool, start: float, gate):
    # Every input, read and checked before any training.
    t0 = time.time()
    data = stages.load_data(config)
    pdata = stages.load_pretrain_data(config) if config.pretrain.enabled else None
    data_seconds = round(time.time() - t0, 1)  # both datasets (prepared on first use)
    ported = stages.read_ported_teachers(config, data) if config.teachers.checkpoints else []
    t_init = _optional(config.teachers.init_from, "teachers.init_from", data)
    s_init = _optional(config.student.init_from, "student.init_from", data)
    biased = _optional(config.biased.checkpoint, "biased.checkpoint", data)
    pretrain_keys = stages.pretrain_keys(config, pdata) if pdata else {}
    if ported or biased is not None:  # settings.validate checked the other cases
        groups = (
            stages.group_models(ported)
            if ported
            else settings.teacher_models(config, 2, data.dtype)
        )
        c = groups[0].num_classes
        b_model = None if biased is None else biased.model
        if config.biased.arch:  # trained by its stage at the configured teachers' width
            b_model = settings.trained_biased_model(config, c, data.dtype)
        settings.check_models(
            settings.model(config.student, c, data.dtype),
            groups,
            settings.distill_config(config),
            b_model,
        )
    b_config = b_keys = None
    if config.biased.arch:
        b_config = stages.biased_config(config)
        b_pretrained = {"teachers": pretrain_keys["biased"]} if pretrain_keys else {}
        b_keys = stages.stage_keys(b_config, data, pretrained=b_pretrained)
    keys = stages.stage_keys(
        config,
        data,
        ported=ported,
        init=t_init,
        biased=biased,
        pretrained=pretrain_keys,
        student_init=s_init,
        biased_stage=b_keys.teachers if b_keys else "",
    )
    de_config = de_keys = None
    if config.baselines.deep_ensemble:
        de_config = stages.deep_ensemble_config(config)
        de_pretrained = {"teachers": pretrain_keys["student"]} if pretrain_keys else {}
        de_keys = stages.stage_keys(de_config, data, init=s_init, pretrained=de_pretrained)
    wd.prepare(run_dir, config, overwrite)
    distill_dir = run_dir / "distill"
    stages.check_distill_inputs(distill_dir, keys.inputs, overwrite)
    sizes = ", ".join(f"{s} {d.num_examples}" for s, d in data.splits.items())
    if data.num_groups <= MAX_LISTED_GROUPS:
        groups = f"train groups {dict(zip(data.group_names, data.train_counts, strict=True))}"
    else:  # e.g. Colored MNIST's 100: the range per split, where small groups show
        counts = {s: d.group_counts() for s, d in data.splits.items()}
        groups = f"examples per group ({data.num_groups}): {core.describe_count_range(counts)}"
    print(f"[data] {data.name}: {sizes}; {groups}")
    # Every input is checked and on disk: the other processes join from here. The ERM stages
    # (pretraining, teachers, biased model, Deep Ensemble) train data-parallel on every process
    # and the distillation too; process 0 alone fits the DFR heads (the others read them).
    gate.release()

    pretrained, de_init = None, s_init
    if pdata is not None:
        # Ported weights (init_from) and pretraining exclude each other (settings.validate).
        pretrained = stages.pretrain_stage(config, pdata, stage_dir, pretrain_keys)
        t_init = pretrained.backbones.get("teachers")
        s_init = de_init = pretrained.backbones["student"]
    teachers = stages.teachers_stage(
        config,
        data,
        stage_dir,
        keys.teachers,
        ported=ported,
        init=t_init,
        group_keys=keys.groups,
        backbones=pretrained.backbones if pretrained else None,
    )
    # DFR heads are fitted even when no teacher uses them: the report shows the DFR teachers.
    heads = stages.dfr_stage(config, data, teachers, stage_dir, keys.dfr)
    b_record = None
    if b_config is not None:
        print(
            f"[biased] one ERM network of {config.biased.arch} (width {config.teachers.width}) "
            "as the biased model: a teacher stage"
        )
        b_init = pretrained.backbones.get("biased") if pretrained else None
        trained = stages.teachers_stage(
            b_config, data, stage_dir, b_keys.teachers, init=b_init, label="biased"
        )
        biased, b_record = stages.trained_biased(trained), trained.record
    ens = stages.build_ensemble(config, teachers, heads, biased, keys.inputs)
    deep = None
    if de_config is not None:
        print(
            f"[deep ensemble] {config.teachers.num} ERM networks of the student's architecture "
            f"({config.student.arch}, width {config.student.width}) with DFR heads: a teacher "
            "stage"
        )
        if (de_keys.teachers, de_keys.dfr) == (keys.teachers, keys.dfr):
            deep = (teachers, heads)  # the teachers' own stages: nothing to read again
        else:
            d_teachers = stages.teachers_stage(
                de_config, data, stage_dir, de_keys.teachers, init=de_init, label="deep ensemble"
            )
            d_heads = stages.dfr_stage(de_config, data, d_teachers, stage_dir, de_keys.dfr)
            deep = (d_teachers, d_heads)
    student_model = settings.model(config.student, data.num_classes, data.dtype)
    init = None
    if s_init is not None:
        init = stages.init_variables(
            s_init,
            student_model,
            jax.random.key(config.seed),
            data.image_size,
            "pretrain" if pretrained else "student.init_from",
            fresh_head=pretrained is not None,
        )
    student = stages.distill_stage(config, data, ens, distill_dir, run_layout, init)
    # Process 0 evaluates and reports; the others wait for it, so that every process of the
    # run leaves together (jax.distributed's shutdown waits for all).
    with distributed.PrimaryFirst("the evaluation and the report") as last:
        if not distributed.is_primary():
            return {}
        t0 = time.time()
        results = stages.evaluate_stage(
            data, teachers, heads, ens.kinds, student, student_model, deep, biased
        )
        records = {
            "data": stages.StageRecord(data_seconds, False),
            **({"pretrain": pretrained.record} if pretrained else {}),
            "teachers": teachers.record,
            "dfr": heads.record,
            **({"biased": b_record} if b_record else {}),
            **({"deep_ensemble": _deep_record(deep, de_keys, keys)} if deep else {}),
            "distill": student.record,
            "evaluate": stages.StageRecord(round(time.time() - t0, 1), False),
        }
        report = write_report(
            config,
            run_dir,
            data,
            teachers,
            heads,
            ens,
            student,
            results,
            records,
            start,
            pretrained,
        )
        last.release()
        return report


def _deep_record(deep, de_keys: stages.Keys, keys: stages.Keys) -> stages.StageRecord:
    """The Deep Ensemble's teacher and DFR stages as one record (seconds summed, reused if
    both were); no seconds when they are the teachers' own stages (same keys)."""
    t, heads = deep[0].record, deep[1].record
    if (de_keys.teachers, de_keys.dfr) == (keys.teachers, keys.dfr):
        return stages.StageRecord(0.0, True, t.directory)
    return stages.StageRecord(
        round(t.seconds + heads.seconds, 1), t.reused and heads.reused, t.directory
    )


def _stage_record(r: stages.StageRecord) -> dict[str, Any]:
    """A stage's record in results.json (with its parts' own records when it has parts)."""
    out = {"seconds": r.seconds, "reused": r.reused, "directory": r.directory}
    if r.parts:
        out["parts"] = [_stage_record(p) for p in r.parts]
    return out


def _optional(path: str, key: str, data: stages.Dataset) -> stages.Loaded | None:
    return stages.load_checkpoint(path, key, data.image_size, data.dtype) if path else None


def write_report(
    config, run_dir, data, teachers, heads, ens, student, results, records, start, pretrained=None
):
    """results.json (every number, the settings used, versions) and results.md (the table)."""
    seconds = {name: r.seconds for name, r in records.items()}
    seconds["total"] = round(sum(seconds.values()), 1)
    report = {
        "dataset": data.name,
        "data_fingerprint": data.fingerprint,
        "group_names": list(data.group_names),
        "train_group_counts": list(data.train_counts),
        "selection": SELECTION,
        "averages": AVERAGES,
        "student_best": {"val_wga": student.val_wga, "epoch": student.epoch},
        "models": {
            "teachers": teachers.members,
            "biased": ens.biased,
            "student": {
                "arch": config.student.arch,
                "width": config.student.width,
                "small_input": config.student.small_input,
                "init_from": config.student.init_from,
            },
        },
        "teachers": {
            "kinds": ens.kinds,
            "source": teachers.source,
            "erm_val_wga": [m.get("val_wga") for m in teachers.members],
            "dfr": heads.info,
        },
        "pretrain": pretrained.members if pretrained else {},
        "distill_weights": stages.mean_teacher_weights(run_dir / "distill"),
        "test": results,
        "seconds": seconds,
        "stages": {name: _stage_record(r) for name, r in records.items()},
        "wall_seconds": round(time.time() - start, 1),
        "seed": config.seed,
        "config": wd.config_dict(config),
        "versions": versions(),
    }
    table = evaluation.format_table(
        _with_teacher_archs(results, teachers.members),
        data.group_names,
        title=f"{data.name}, test split; {SELECTION}; weighting {config.distill.weighting}",
    )
    times = ", ".join(
        f"{k} {v}{' (reused)' if k in records and records[k].reused else ''}"
        for k, v in seconds.items()
    )
    lines = [table, "", f"Stage wall times (s): {times}"]
    if report["distill_weights"]:
        lines.append(
            "Mean teacher weights over training: "
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(report["distill_weights"].items()))
        )
    text = "\n".join(lines)
    print("\n" + text)
    wd.write_json(run_dir / "results.json", report)
    wd.atomic_write_text(run_dir / "results.md", text + "\n")
    return report


def _with_teacher_archs(results: dict[str, dict], members: list[dict[str, Any]]) -> dict[str, dict]:
    """results.md's rows: with teachers of several architectures, each "ERM/DFR teacher i" row
    names its architecture (results.json keeps the plain names)."""
    archs = [m.get("arch", "") for m in members]
    if len(set(archs)) < 2:
        return results
    out = {}
    for name, row in results.items():
        kind, _, index = name.partition(" teacher ")
        if kind in ("ERM", "DFR") and index.isdigit() and int(index) < len(archs):
            name = f"{name} ({archs[int(index)]})"
        out[name] = row
    return out


def versions() -> dict[str, str]:
    """Python, platform, package versions and devices, for the record."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in (
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "orbax-checkpoint",
        "tensorflow-datasets",
        "chex",
        "ml-collections",
    ):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    out["devices"] = f"{jax.local_device_count()} x {jax.devices()[0].device_kind}"
    if jax.process_count() > 1:
        out["devices"] += f" in each of {jax.process_count()} processes"
    return out
