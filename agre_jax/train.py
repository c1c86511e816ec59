"""One run, end to end: data, teachers (ERM or ported), DFR, biased model, distillation,
group-robust evaluation and the report. `train_and_evaluate(config, workdir)` is what
`main.py` calls.

Every stage is resumable. Teacher and DFR stages live in `<stage_dir>/<name>-<hash of their
settings>/` and are reused by any later run that names the same settings; the student's
stage is `<workdir>/distill/`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import platform
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agre_jax import checkpoints, distill, evaluation, loop, models, teachers, workdir
from agre_jax.data import core, pipeline

SELECTION = "student checkpoint selected by worst-group accuracy on the validation split"


class ConfigError(ValueError):
    """A configuration that cannot run, found before any training."""


def _dtype(name: str) -> Any:
    if name not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype must be 'float32' or 'bfloat16', got {name!r}")
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def distill_config(config: ml_collections.ConfigDict) -> distill.DistillConfig:
    """config.distill as the step's validated static config."""
    d = config.distill
    try:
        return distill.DistillConfig(
            temperature=d.temperature,
            alpha=d.alpha,
            weighting=d.weighting,
            grad_scope=d.grad_scope,
            normalize_grads=d.normalize_grads,
            empty_rows=d.empty_rows,
            gram=d.gram,
            chunk_size=d.chunk_size,
            batch_min_weight=d.batch_min_weight,
            gammas=tuple((k, float(v)) for k, v in sorted(d.gammas.items()) if float(v) != 0.0),
            feature_loss=d.feature_loss,
            feature_dropout=d.feature_dropout,
            teacher_map=config.teachers.map,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks what can be checked without data or models; raises ConfigError."""
    distill_config(config)
    _dtype(config.dtype)
    t = config.teachers
    m = len(t.checkpoints) if t.checkpoints else t.num
    problems = []
    if m < 1:
        problems.append(f"teachers.num must be >= 1, got {m}")
    if not -1 <= t.debiased <= m:
        problems.append(f"teachers.debiased must be -1 (all) or in [0, {m}], got {t.debiased}")
    if not config.biased.checkpoint and not 0 <= config.biased.index < m:
        problems.append(f"biased.index must be in [0, {m}), got {config.biased.index}")
    for name, value in (
        ("teachers.epochs", t.epochs),
        ("train.epochs", config.train.epochs),
        ("teachers.batch_size", t.batch_size),
        ("train.batch_size", config.train.batch_size),
        ("data.eval_batch_size", config.data.eval_batch_size),
        ("data.image_size", config.data.image_size),
    ):
        if value < 1:
            problems.append(f"{name} must be >= 1, got {value}")
    for arch in (t.arch, config.student.arch):
        if arch not in models.ARCHS:
            problems.append(f"unknown arch {arch!r}; expected one of {models.ARCHS}")
    if config.train.pmap not in ("auto", "always", "never"):
        problems.append(f"train.pmap must be 'auto', 'always' or 'never', got {config.train.pmap}")
    if t.map not in distill.TEACHER_MAPS:
        problems.append(f"teachers.map must be one of {distill.TEACHER_MAPS}, got {t.map!r}")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def load_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Prepares the dataset (TFDS) and loads its splits into memory."""
    builder_cfg = dict(config.data.builder) or None
    builder = pipeline.load_builder(
        config.data.name,
        data_dir=config.data.data_dir or None,
        manual_dir=config.data.manual_dir or None,
        config=builder_cfg,
    )
    info = builder.info
    return {
        "builder": builder,
        "train": pipeline.load_split(builder, "train"),
        "validation": pipeline.load_split(builder, "validation"),
        "test": pipeline.load_split(builder, "test"),
        "num_classes": info.features["label"].num_classes,
        "num_groups": info.features["group"].num_classes,
        "group_names": list(pipeline.group_names(builder)),
        "train_counts": [int(c) for c in core.group_counts(builder, "train")],
        "image_size": config.data.image_size,
        "eval_batch_size": config.data.eval_batch_size,
        "dtype": _dtype(config.dtype),
        "name": info.full_name,
    }


def _model(cfg: ml_collections.ConfigDict, num_classes: int, dtype: Any) -> models.ResNet:
    return models.create(
        cfg.arch, num_classes, width=cfg.width, small_input=cfg.small_input, dtype=dtype
    )


def _stage_keys(config: ml_collections.ConfigDict) -> dict[str, str]:
    data = {
        k: v
        for k, v in workdir.config_dict(config)["data"].items()
        if k not in ("data_dir", "manual_dir", "eval_batch_size")
    }
    t = {
        k: v
        for k, v in workdir.config_dict(config)["teachers"].items()
        if k not in ("debiased", "map")
    }
    base = {"data": data, "teachers": t, "dtype": config.dtype}
    return {
        "teachers": workdir.key_of(base),
        "dfr": workdir.key_of({**base, "dfr": workdir.config_dict(config)["dfr"]}),
    }


def _load_init(path: str, model: models.ResNet, image_size: int, role: str) -> dict[str, Any]:
    try:
        variables, info = checkpoints.load_variables(path)
        fresh_head = info.get("num_classes") != model.num_classes
        if fresh_head:  # a backbone ported with --drop-head for another head size
            init = models.init(model, jax.random.key(0), image_size)
            variables = {
                "params": {**variables["params"], "fc": init["params"]["fc"]},
                "batch_stats": variables["batch_stats"],
            }
        teachers.check_variables(model, variables, path, image_size)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{role}.init_from: {e}") from e
    return variables


def teacher_stage(config, data, stage_dir: Path) -> tuple[models.ResNet, list[dict], dict]:
    """ERM teachers (trained once per settings) or ported ones: (model, variables, info)."""
    t = config.teachers
    if t.checkpoints:
        try:
            model, variables, infos = teachers.load_ported(list(t.checkpoints), data["num_classes"])
        except (OSError, ValueError) as e:
            raise ConfigError(f"teachers.checkpoints: {e}") from e
        if infos[0]["arch"] != t.arch:
            raise ConfigError(
                f"teachers.checkpoints hold {infos[0]['arch']} weights but teachers.arch is "
                f"{t.arch!r}; set --config.teachers.arch={infos[0]['arch']} if that is intended"
            )
        model = model.clone(dtype=data["dtype"])
        return model, variables, {"source": "ported", "provenance": infos}
    model = _model(t, data["num_classes"], data["dtype"])
    directory = stage_dir / f"teachers-{_stage_keys(config)['teachers']}"
    names = [f"erm_{m}" for m in range(t.num)]
    if not workdir.is_done(directory):
        init = (
            _load_init(t.init_from, model, data["image_size"], "teachers") if t.init_from else None
        )
        results = teachers.train_erm(
            cfg=t,
            model=model,
            data=data,
            directory=directory,
            seed=t.seed,
            init_variables=init,
            progress=config.progress,
        )
        for name, r in zip(names, results, strict=True):
            checkpoints.save_variables(
                directory / name,
                {"params": r["params"], "batch_stats": r["batch_stats"]},
                metadata={
                    "arch": t.arch,
                    "num_classes": data["num_classes"],
                    "model_options": {"width": t.width, "small_input": t.small_input},
                    "val_wga": r["val_wga"],
                    "epoch": r["epoch"],
                    "selection": "best validation worst-group accuracy",
                },
                force=True,
            )
        workdir.mark_done(directory, {"teachers": names})
    else:
        print(f"[teachers] reusing {directory}")
    variables, infos = [], []
    for name in names:
        v, info = checkpoints.load_variables(directory / name)
        variables.append(v)
        infos.append(info)
    return model, variables, {"source": str(directory), "provenance": infos}


def dfr_stage(config, data, stage_dir: Path, model, erm_variables) -> tuple[list, list, Path]:
    """DFR heads of every ERM teacher (computed once per settings)."""
    directory = stage_dir / f"dfr-{_stage_keys(config)['dfr']}"
    if config.teachers.checkpoints:  # ported teachers: key on their contents too
        shas = [i.get("sha256", "") for i in _provenance_list(config)]
        directory = stage_dir / f"dfr-{workdir.key_of([_stage_keys(config)['dfr'], shas])}"
    if workdir.is_done(directory):
        print(f"[dfr] reusing {directory}")
        saved = np.load(directory / "heads.npz")
        m = len(erm_variables)
        heads = [{"kernel": saved[f"kernel_{i}"], "bias": saved[f"bias_{i}"]} for i in range(m)]
        return heads, workdir.read_done(directory)["info"], directory
    heads, infos = teachers.fit_dfr_heads(
        cfg=config.dfr,
        model=model,
        teacher_variables=erm_variables,
        data=data,
        seed=config.teachers.seed,
        how=config.teachers.map,
    )
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, h in enumerate(heads):
        arrays[f"kernel_{i}"], arrays[f"bias_{i}"] = h["kernel"], h["bias"]
    tmp = directory / ".heads.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.replace(directory / "heads.npz")
    workdir.mark_done(directory, {"info": infos})
    return heads, infos, directory


def _provenance_list(config) -> list[dict]:
    return [
        json.loads((Path(p) / checkpoints.PROVENANCE).read_text())
        for p in config.teachers.checkpoints
    ]


def _with_head(variables: dict, head: dict) -> dict:
    params = dict(variables["params"])
    params["fc"] = {"kernel": jnp.asarray(head["kernel"]), "bias": jnp.asarray(head["bias"])}
    return {"params": params, "batch_stats": variables["batch_stats"]}


def distill_stage(config, data, run_dir: Path, mdl: distill.Models, frozen, student_init):
    """Trains the student; returns (best variables, last variables, best val WGA, epoch)."""
    dcfg = distill_config(config)
    tcfg = config.train
    n_dev = jax.local_device_count()
    use_pmap = tcfg.pmap == "always" or (tcfg.pmap == "auto" and n_dev > 1)
    if use_pmap and tcfg.batch_size % n_dev:
        raise ConfigError(
            f"train.batch_size {tcfg.batch_size} is not divisible by the {n_dev} devices; "
            "change it or set train.pmap='never'"
        )
    spe = pipeline.steps_per_epoch(data["train"], tcfg.batch_size)
    if spe < 1:
        raise ConfigError(f"train.batch_size {tcfg.batch_size} exceeds the training set")
    tx = teachers.create_optimizer(tcfg.optimizer, tcfg.epochs * spe, spe)
    state = distill.create_train_state(
        mdl, tx, jax.random.key(config.seed), data["image_size"], student_init
    )
    step_fn = distill.compile_step(mdl, dcfg, tx, pmap=use_pmap)
    base_rng = jax.random.key(config.seed + 1_000_003)
    replicate = flax.jax_utils.replicate
    if use_pmap:
        frozen = replicate(frozen)
        state = replicate(state)
    carry = {
        "state": state,
        "best_params": jax.tree.map(jnp.copy, _unrep(state, use_pmap).params["student"]),
        "best_batch_stats": jax.tree.map(jnp.copy, _unrep(state, use_pmap).batch_stats),
        "best_wga": jnp.asarray(-1.0),
        "best_epoch": jnp.asarray(0),
    }
    predict = jax.jit(lambda v, x: mdl.student.apply(v, x, train=False))

    def step(carry, batch, s):
        rng = jax.random.fold_in(base_rng, s)
        if use_pmap:
            rng = replicate(rng)
        state, metrics = step_fn(carry["state"], frozen, batch, rng)
        return {**carry, "state": state}, metrics

    def batches(epoch, start):
        return pipeline.train_epoch(
            data["train"],
            batch_size=tcfg.batch_size,
            image_size=data["image_size"],
            seed=config.seed,
            epoch=epoch,
            start_step=start,
            num_devices=n_dev if use_pmap else None,
            augment=tcfg.augment,
            dtype=data["dtype"],
        )

    def evaluate(carry, epoch):
        st = _unrep(carry["state"], use_pmap)
        variables = {"params": st.params["student"], "batch_stats": st.batch_stats}
        s = _summary_of(functools.partial(predict, variables), data, "validation")
        better = s["wga"] > float(carry["best_wga"])
        if better:
            carry = {
                **carry,
                # Copies: the next step donates (and deletes) the state's buffers.
                "best_params": jax.tree.map(jnp.copy, variables["params"]),
                "best_batch_stats": jax.tree.map(jnp.copy, variables["batch_stats"]),
                "best_wga": jnp.asarray(s["wga"]),
                "best_epoch": jnp.asarray(epoch + 1),
            }
        return carry, {"val_wga": s["wga"], "val_avg": s["avg_acc"]}

    def summary(epoch, means, ev):
        weights = " ".join(f"{means[k]:.2f}" for k in sorted(means) if k.startswith("weight/"))
        line = f"loss {means['loss']:.4f} (kd {means['kd_loss']:.4f}"
        if "feat_loss" in means:
            line += f", feat {means['feat_loss']:.4f}"
        line += f") acc {100 * means['accuracy']:.1f} | teacher weights {weights}"
        if "empty_rows" in means:
            line += f" | empty rows {100 * means['empty_rows']:.1f}%"
        if ev:
            line += f" | val WGA {100 * ev['val_wga']:.1f} avg {100 * ev['val_avg']:.1f}"
        return line

    def save_view(c):
        return {**c, "state": _unrep(c["state"], use_pmap)}

    def load_view(c):
        return {**c, "state": replicate(c["state"]) if use_pmap else c["state"]}

    if use_pmap:
        print(f"[distill] pmap over {n_dev} devices, {tcfg.batch_size // n_dev} per device")
    carry = loop.Loop(
        name="distill",
        directory=run_dir,
        epochs=tcfg.epochs,
        steps_per_epoch=spe,
        batches=batches,
        step=step,
        evaluate=evaluate,
        eval_every=tcfg.eval_every,
        checkpoint_every=tcfg.checkpoint_every,
        log_every=tcfg.log_every,
        summary=summary,
        progress=config.progress,
        save_view=save_view,
        load_view=load_view,
    ).run(carry)
    last = _unrep(carry["state"], use_pmap)
    return (
        {"params": carry["best_params"], "batch_stats": carry["best_batch_stats"]},
        {"params": last.params["student"], "batch_stats": last.batch_stats},
        float(carry["best_wga"]),
        int(carry["best_epoch"]),
    )


def _unrep(state, use_pmap: bool):
    return flax.jax_utils.unreplicate(state) if use_pmap else state


def _summary_of(logits_fn, data, split: str) -> dict[str, Any]:
    out = evaluation.collect(logits_fn, teachers.eval_batches(data, split))
    return evaluation.summarize(
        np.argmax(out["output"], -1),
        out["label"],
        out["group"],
        data["num_groups"],
        data["train_counts"],
    )


def mean_teacher_weights(run_dir: Path) -> dict[str, float]:
    """Mean of each logged distillation metric `weight/t` and `empty_rows` over all steps."""
    sums: dict[str, float] = {}
    count = 0
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") != "epoch":
            continue
        count += 1
        for k, v in r.items():
            if k.startswith("weight/") or k in ("empty_rows", "weight_entropy"):
                sums[k] = sums.get(k, 0.0) + v
    return {k: v / count for k, v in sums.items()} if count else {}


def versions() -> dict[str, str]:
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
    return out


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir_path: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """Runs (or resumes) every stage and writes results.json and results.md in the workdir."""
    t0 = time.time()
    validate(config)
    run_dir = Path(workdir_path)
    workdir.prepare(run_dir, config, overwrite)
    stage_dir = Path(config.stage_dir) if config.stage_dir else run_dir / "stages"
    times: dict[str, float] = {}

    def timed(name, fn, *args):
        start = time.time()
        out = fn(*args)
        times[name] = round(time.time() - start, 1)
        return out

    data = timed("data", load_data, config)
    print(
        f"[data] {data['name']}: train {data['train'].num_examples}, validation "
        f"{data['validation'].num_examples}, test {data['test'].num_examples}; train groups "
        f"{dict(zip(data['group_names'], data['train_counts'], strict=True))}"
    )
    t_model, erm_vars, t_info = timed("teachers", teacher_stage, config, data, stage_dir)
    m = len(erm_vars)
    debiased = m if config.teachers.debiased < 0 else config.teachers.debiased
    # DFR heads are fitted even when no teacher uses them: the report shows the DFR teachers.
    heads, dfr_info, dfr_dir = timed("dfr", dfr_stage, config, data, stage_dir, t_model, erm_vars)
    dfr_vars = [_with_head(v, h) for v, h in zip(erm_vars, heads, strict=True)]
    used = [dfr_vars[i] if i < debiased else erm_vars[i] for i in range(m)]
    kinds = ["DFR" if i < debiased else "ERM" for i in range(m)]

    # The biased model: the ERM version of a teacher (sharing its backbone), or a ported one.
    student = _model(config.student, data["num_classes"], data["dtype"])
    if config.biased.checkpoint:
        try:
            b_vars, b_info = checkpoints.load_variables(config.biased.checkpoint)
            b_model = teachers.model_from_provenance(b_info).clone(dtype=data["dtype"])
            teachers.check_variables(b_model, b_vars, config.biased.checkpoint, 32)
        except (OSError, ValueError) as e:
            raise ConfigError(f"biased.checkpoint: {e}") from e
        ens = distill.Ensemble(teachers=(t_model,), group_sizes=(m,), biased=b_model)
        frozen_biased = b_vars
    else:
        ens = distill.Ensemble(
            teachers=(t_model,), group_sizes=(m,), biased_backbone=(0, config.biased.index)
        )
        frozen_biased = jax.tree.map(jnp.asarray, erm_vars[config.biased.index]["params"]["fc"])
    frozen = {"teachers": (distill.stack_variables(used),), "biased": frozen_biased}
    try:
        mdl = distill.create_models(student, ens, distill_config(config))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    student_init = (
        _load_init(config.student.init_from, student, data["image_size"], "student")
        if config.student.init_from
        else None
    )

    distill_dir = run_dir / "distill"
    if workdir.is_done(distill_dir):
        print(f"[distill] reusing {distill_dir}")
        best, _ = checkpoints.load_variables(distill_dir / "student_best")
        last, _ = checkpoints.load_variables(distill_dir / "student_last")
        done = workdir.read_done(distill_dir)
        best_wga, best_epoch = done["val_wga"], done["epoch"]
    else:
        best, last, best_wga, best_epoch = timed(
            "distill", distill_stage, config, data, distill_dir, mdl, frozen, student_init
        )
        meta = {
            "arch": config.student.arch,
            "num_classes": data["num_classes"],
            "model_options": {
                "width": config.student.width,
                "small_input": config.student.small_input,
            },
        }
        checkpoints.save_variables(
            distill_dir / "student_best",
            best,
            metadata={**meta, "val_wga": best_wga, "epoch": best_epoch},
            force=True,
        )
        checkpoints.save_variables(distill_dir / "student_last", last, metadata=meta, force=True)
        workdir.mark_done(distill_dir, {"val_wga": best_wga, "epoch": best_epoch})

    start = time.time()
    t_logits = teacher_test_logits(data, t_model, erm_vars, dfr_vars, dfr_dir)
    results = evaluate_all(data, t_logits, kinds, student, best, last)
    times["evaluate"] = round(time.time() - start, 1)
    times["total"] = round(time.time() - t0, 1)
    report = {
        "dataset": data["name"],
        "group_names": data["group_names"],
        "train_group_counts": data["train_counts"],
        "selection": SELECTION,
        "averages": {
            "avg_acc": "plain accuracy over the test examples",
            "avg_acc_weighted": "group accuracies weighted by training group proportions (DFR)",
            "gap": "avg_acc_weighted - wga",
        },
        "student_best": {"val_wga": best_wga, "epoch": best_epoch},
        "teachers": {
            "kinds": kinds,
            "source": t_info["source"],
            "erm_val_wga": [i.get("val_wga") for i in t_info["provenance"]],
            "dfr": dfr_info,
        },
        "distill_weights": mean_teacher_weights(distill_dir),
        "test": results,
        "seconds": times,
        "seed": config.seed,
        "config": workdir.config_dict(config),
        "versions": versions(),
    }
    table = evaluation.format_table(
        results,
        data["group_names"],
        title=f"{data['name']}, test split; {SELECTION}; weighting {config.distill.weighting}",
    )
    lines = [table, "", "Stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in times.items())]
    if report["distill_weights"]:
        lines.append(
            "Mean teacher weights over training: "
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(report["distill_weights"].items()))
        )
    text = "\n".join(lines)
    print("\n" + text)
    workdir.write_json(run_dir / "results.json", report)
    workdir.atomic_write_text(run_dir / "results.md", text + "\n")
    return report


def teacher_test_logits(data, t_model, erm_vars, dfr_vars, cache: Path) -> dict[str, np.ndarray]:
    """Test logits of every ERM and DFR teacher, [M, N, C] each, computed once per DFR stage
    (sweeps evaluate many students against the same teachers)."""
    path = cache / "test_logits.npz"
    if path.exists():
        return dict(np.load(path))
    logits_fn = teachers.stacked_logits_fn(t_model, "unroll")
    out = {}
    for name, variables in (("erm", erm_vars), ("dfr", dfr_vars)):
        got = evaluation.collect(
            functools.partial(logits_fn, distill.stack_variables(variables)),
            teachers.eval_batches(data, "test"),
        )
        out[name], out["label"], out["group"] = got["output"], got["label"], got["group"]
    tmp = cache / ".test_logits.tmp.npz"
    np.savez(tmp, **out)
    tmp.replace(path)
    return out


def evaluate_all(data, teacher_logits, kinds, student, best, last) -> dict[str, dict]:
    """Test metrics of every ERM and DFR teacher, the ensemble and the student."""
    labels, groups = teacher_logits["label"], teacher_logits["group"]

    def summ(pred):
        return evaluation.summarize(pred, labels, groups, data["num_groups"], data["train_counts"])

    results: dict[str, dict] = {}
    for kind in ("ERM", "DFR"):
        for i, lg in enumerate(teacher_logits[kind.lower()]):
            results[f"{kind} teacher {i}"] = summ(np.argmax(lg, -1))
    used_logits = np.stack([teacher_logits[k.lower()][i] for i, k in enumerate(kinds)])
    composition = f"{kinds.count('DFR')} DFR + {kinds.count('ERM')} ERM"
    ens = evaluation.ensemble_predictions(used_logits)
    results[f"ensemble ({composition}), avg logits"] = summ(ens["avg_logits"])
    results[f"ensemble ({composition}), majority"] = summ(ens["majority"])
    predict = jax.jit(lambda v, x: student.apply(v, x, train=False))
    for name, variables in (("student (best val WGA)", best), ("student (last)", last)):
        results[name] = _summary_of(functools.partial(predict, variables), data, "test")
    return results
