"""The stages of one run, each with typed inputs and a small dataclass out.

    load_data(config)                          -> Dataset
    pretrain_stage(config, pdata, stage_dir)   -> Pretrained   (one backbone per architecture)
    teachers_stage(config, data, stage_dir)    -> Teachers     (ported, or ERM-trained once)
    dfr_stage(config, data, teachers, ...)     -> DFRHeads     (computed once per inputs)
    build_ensemble(config, data, teachers, ..) -> Ensemble     (DFR/ERM teachers, biased model)
    distill_stage(config, data, ensemble, ...) -> Student      (resumable, in the workdir)
    evaluate_stage(data, teachers, heads, ...) -> rows of the report

Every cached stage lives in a directory named by a key of its settings and of its inputs'
CONTENT: the prepared data's fingerprint, the digest of every ported checkpoint's variables,
the upstream stages' keys; never a path. A stage records its wall time when it is computed,
and a reused stage reports that recorded time.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agre_jax import (
    checkpoints,
    distill,
    distributed,
    evaluation,
    loop,
    models,
    optim,
    settings,
    teachers,
)
from agre_jax import workdir as wd
from agre_jax.data import device_input, pipeline
from agre_jax.errors import CheckpointError, ConfigError, WorkdirError

INPUTS_FILE = "inputs.json"  # in the distill directory: the key of what it was distilled from
PRETRAIN_DATASET = "pretrain_shapes"  # the pretraining task (agre_jax/data/pretrain_shapes.py)


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """How a stage's result was obtained: its wall time when computed (seconds), whether this
    run reused it, and where it lives; `parts`: the stages it is made of, when several (the
    teacher stage of each architecture group), each shared with other runs on its own."""

    seconds: float
    reused: bool
    directory: str = ""
    parts: tuple[StageRecord, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A prepared dataset in memory, with what every stage needs to read it.

    Attributes:
      name: the builder's full name (name/config/version).
      splits: {'train', 'validation', 'test'} -> SplitData.
      num_classes, num_groups: C and G.
      group_names: [G] names.
      train_counts: [G] training examples per group (the DFR-convention average's weights).
      image_size: model input side (px).
      eval_batch_size: evaluation batch.
      eval_transform: one of pipeline.EVAL_TRANSFORMS.
      dtype: compute dtype of the images.
      fingerprint: content digest of the prepared data (pipeline.fingerprint).
      device_cache: with data.device_augment, the training split's device_input.Cache:
        augmented training batches then hold its uint8 images and the augmentation
        parameters, which the compiled steps apply (device_input.augment); None: host path.
      shard: (process index, process count) whose share of each global batch the batches
        hold; (0, 1), every example, unless `sharded` (a multi-process distillation).
    """

    name: str
    splits: Mapping[str, pipeline.SplitData]
    num_classes: int
    num_groups: int
    group_names: tuple[str, ...]
    train_counts: tuple[int, ...]
    image_size: int
    eval_batch_size: int
    eval_transform: str
    dtype: Any
    fingerprint: str
    device_cache: Any = None
    shard: tuple[int, int] = (0, 1)

    def sharded(self) -> Dataset:
        """This dataset as this process's share of a multi-process run: its columns of each
        global batch, and evaluations that gather every process's predictions."""
        return dataclasses.replace(self, shard=(jax.process_index(), jax.process_count()))

    @property
    def key(self) -> dict[str, Any]:
        """What a stage computed on this data depends on (without augmentation: see
        `augmented_key`)."""
        return {
            "fingerprint": self.fingerprint,
            "image_size": self.image_size,
            "eval_transform": self.eval_transform,
            **({"device_input": self.device_cache.settings} if self.device_cache else {}),
        }

    def augmented_key(self, augment: bool) -> dict[str, Any]:
        """`key` for a stage that trains with `augment`: augmented training on a decoded split
        also names the host crop's version (pipeline._batch_fn; version 2 stopped filling edge
        lines with 0). Encoded splits' crop (Waterbirds, CelebA) did not change, and a stage
        that does not augment keeps its key."""
        if augment and self.splits["train"].encoding is None:
            return {**self.key, "augment": pipeline.AUGMENT_VERSION}
        return self.key

    def train_batches(
        self,
        *,
        batch_size: int,
        seed: int,
        epoch: int,
        start_step: int,
        augment: bool,
        num_devices: int | None = None,
        prefetch: int = 2,
    ) -> Iterator[dict[str, Any]]:
        """The batches of training epoch `epoch` from `start_step` on (pipeline.train_epoch)."""
        return pipeline.train_epoch(
            self.splits["train"],
            batch_size=batch_size,
            image_size=self.image_size,
            seed=seed,
            epoch=epoch,
            start_step=start_step,
            num_devices=num_devices,
            augment=augment,
            prefetch=prefetch,
            cache=self.device_cache,
            dtype=self.dtype,
            eval_transform=self.eval_transform,
            process_index=self.shard[0],
            process_count=self.shard[1],
        )

    def eval_batches(self, split: str) -> Iterator[dict[str, Any]]:
        """Every example of `split` once, with a mask (pipeline.eval_batches)."""
        return pipeline.eval_batches(
            self.splits[split],
            batch_size=self.eval_batch_size,
            image_size=self.image_size,
            dtype=self.dtype,
            prefetch=0,
            eval_transform=self.eval_transform,
            process_index=self.shard[0],
            process_count=self.shard[1],
        )

    def evaluate(self, logits_fn: Any, split: str) -> Any:
        """Group metrics of `logits_fn` (images -> [B, C] or [M, B, C]) on `split`."""
        return evaluation.evaluate(
            logits_fn,
            self.eval_batches(split),
            self.num_groups,
            self.train_counts,
            all_processes=self.shard[1] > 1,
        )

    def summarize(self, predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict:
        return evaluation.summarize(predictions, labels, groups, self.num_groups, self.train_counts)


def load_data(config: ml_collections.ConfigDict) -> Dataset:
    """Prepares the dataset (TFDS) and loads its splits into memory; checks the split sizes
    against the batch sizes. Raises DataError or ConfigError."""
    data = _prepare(config, config.data.name, config.data.builder, config.data.manual_dir)
    settings.check_splits(config, {s: d.num_examples for s, d in data.splits.items()})
    return data


def load_pretrain_data(config: ml_collections.ConfigDict) -> Dataset:
    """The pretraining task (`pretrain_shapes` with config.pretrain.builder's knobs), read as
    the downstream data is: same image size, evaluation transform and dtype. Raises ConfigError
    when its training split is smaller than pretrain.batch_size."""
    data = _prepare(config, PRETRAIN_DATASET, config.pretrain.builder, "")
    n, batch = data.splits["train"].num_examples, config.pretrain.batch_size
    if n < batch:
        raise ConfigError(
            f"pretrain.batch_size is {batch} but the training split of {data.name} has {n} "
            "examples; expected a batch no larger than the split (or a larger "
            "pretrain.builder.size)"
        )
    return data


def _prepare(config: ml_collections.ConfigDict, name: str, knobs: Any, manual_dir: str) -> Dataset:
    builder = pipeline.load_builder(
        name,
        data_dir=config.data.data_dir or None,
        manual_dir=manual_dir or None,
        config=dict(knobs) or None,
    )
    splits = {s: pipeline.load_split(builder, s) for s in ("train", "validation", "test")}
    info = builder.info
    return Dataset(
        name=info.full_name,
        splits=splits,
        num_classes=info.features["label"].num_classes,
        num_groups=info.features["group"].num_classes,
        group_names=tuple(pipeline.group_names(builder)),
        train_counts=tuple(int(c) for c in splits["train"].group_counts()),
        image_size=config.data.image_size,
        eval_batch_size=config.data.eval_batch_size,
        eval_transform=config.data.eval_transform,
        dtype=settings.dtype(config.dtype),
        fingerprint=pipeline.fingerprint(builder, splits),
        device_cache=(
            device_input.train_cache(builder, splits["train"], image_size=config.data.image_size)
            if config.data.device_augment
            else None
        ),
    )


def read_stage(directory: Path, read: Any) -> Any:
    """`read()` of a finished stage's files; a damaged stage is a WorkdirError naming it."""
    try:
        return read()
    except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
        raise WorkdirError(
            f"the finished stage {directory} is damaged ({type(e).__name__}: {e}); remove "
            "that directory and rerun to compute it again"
        ) from e


def done_on_primary(directory: Path) -> bool:
    """Whether the stage in `directory` is finished, as process 0 sees it, on every process:
    in a multi-process run every process then trains a data-parallel stage together, or every
    one reads it (a stage finished by another run meanwhile cannot split them)."""
    done = wd.is_done(directory)
    if jax.process_count() > 1:
        done = bool(distributed.allgather(np.asarray(done))[0])
    return done


def erm_pmap(config: ml_collections.ConfigDict, batch_key: str) -> bool:
    """Whether an ERM stage of batch `batch_key` trains data-parallel (train.pmap's layout)."""
    return settings.layout(config, batch_key=batch_key).pmap


# ---------------------------------------------------------------------------------------------
# Checkpoints read from disk (ported teachers, a ported biased model, init_from weights).


@dataclasses.dataclass(frozen=True, eq=False)
class Loaded:
    """Variables read from a `python -m convert` (or save_variables) directory.

    Attributes:
      path: the directory, for messages only.
      model: the ResNet its provenance describes (compute dtype of the run).
      variables: {'params', 'batch_stats'} float32 numpy trees.
      info: its provenance.json.
      digest: content digest of the variables (checkpoints.digest).
    """

    path: str
    model: models.ResNet
    variables: dict[str, Any]
    info: dict[str, Any]
    digest: str

    def describe(self) -> dict[str, Any]:
        """Architecture and identity, for logs and results.json."""
        options = self.info.get("model_options", {})
        return {
            "path": self.path,
            "arch": self.info.get("arch"),
            "num_classes": self.info.get("num_classes"),
            "width": options.get("width", 64),
            "small_input": options.get("small_input", False),
            "sha256_source": self.info.get("sha256", ""),
            "digest": self.digest,
        }


def model_from_provenance(info: Mapping[str, Any], compute_dtype: Any) -> models.ResNet:
    """The ResNet a checkpoint's provenance describes (arch, classes, width, stem)."""
    options = dict(info.get("model_options", {}))
    options.pop("num_classes", None)
    return models.create(info["arch"], info["num_classes"], dtype=compute_dtype, **options)


def load_checkpoint(path: str, key: str, image_size: int, compute_dtype: Any) -> Loaded:
    """Reads and checks a checkpoint directory; raises CheckpointError naming `key` and `path`."""
    try:
        variables, info = checkpoints.load_variables(path)
        if info.get("arch") not in models.ARCHS or not isinstance(info.get("num_classes"), int):
            raise ValueError(
                f"its provenance has arch {info.get('arch')!r} and num_classes "
                f"{info.get('num_classes')!r}; expected one of {models.ARCHS} and an integer"
            )
        model = model_from_provenance(info, compute_dtype)
        models.merge_params(models.abstract_variables(model, image_size), variables, source=path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        message = str(e) if path in str(e) else f"{path}: {e}"
        raise CheckpointError(f"{key}: {message}") from e
    return Loaded(path, model, variables, info, checkpoints.digest(variables))


def init_variables(
    loaded: Loaded,
    model: models.ResNet,
    rng: jax.Array,
    image_size: int,
    key: str,
    *,
    fresh_head: bool = False,
) -> dict[str, Any]:
    """`model`'s variables started from `loaded` (config *.init_from, or a pretrained
    backbone): every weight from the checkpoint, except a fresh head when `fresh_head` or when
    the checkpoint's class count differs (a backbone ported with --drop-head)."""
    differs = loaded.info.get("num_classes") != model.num_classes
    fresh = ("fc",) if fresh_head or differs else ()
    try:
        return models.merge_params(
            models.init(model, rng, image_size), loaded.variables, source=loaded.path, fresh=fresh
        )
    except ValueError as e:
        raise CheckpointError(f"{key}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Pretraining.


def pretrain_roles(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """The networks a run starts from pretrained weights, by role: 'teachers' (unless they are
    ported; 'teachers:<arch>' per architecture with teachers.archs of several), 'student' and
    'biased' (when biased.arch trains one), each {'arch', 'width', 'small_input'}."""
    roles = ("student",) if config.teachers.checkpoints else ("teachers", "student")
    out = {r: {k: config[r][k] for k in ("arch", "width", "small_input")} for r in roles}
    groups = settings.teacher_groups(config)
    if not config.teachers.checkpoints and len(groups) > 1:
        # Teachers of several architectures: one role per architecture, 'teachers:<arch>'.
        t = out.pop("teachers")
        out = {f"teachers:{arch}": {**t, "arch": arch} for arch, _ in groups} | out
    elif not config.teachers.checkpoints:  # teachers.archs of one architecture: that one
        out["teachers"]["arch"] = groups[0][0]
    if config.biased.arch:  # a trained biased model (biased_config)
        t = config.teachers
        out["biased"] = {"arch": config.biased.arch, "width": t.width, "small_input": t.small_input}
    return out


def pretrain_recipe(config: ml_collections.ConfigDict, arch: str) -> dict[str, Any]:
    """How the pretrain stage trains a network of `arch`: {'epochs', 'zero_init_residual'},
    from pretrain.per_arch.<arch> (epochs 0: pretrain.epochs; zero_init_residual: models.ResNet),
    neutral where a config has no such entry (as configs before it)."""
    cfg = config.pretrain
    own = cfg.get("per_arch", {}).get(arch, {})
    return {
        "epochs": own.get("epochs", 0) or cfg.epochs,
        "zero_init_residual": own.get("zero_init_residual", False) is True,
    }


def pretrain_keys(config: ml_collections.ConfigDict, pdata: Dataset) -> dict[str, str]:
    """Role -> content key of its pretrained network: the architecture, the pretraining
    settings as they apply to it (pretrain_recipe) and the pretraining data (its fingerprint,
    image size and transform). Roles with the same architecture share a key, hence one
    network. With per_arch's neutral values a network keeps the key it had before
    pretrain.per_arch existed."""
    settings_ = wd.config_dict(config)["pretrain"]
    for k in ("enabled", "per_arch"):
        settings_.pop(k, None)
    keys = {}
    for role, spec in pretrain_roles(config).items():
        recipe = pretrain_recipe(config, spec["arch"])
        model = {**spec, "zero_init_residual": True} if recipe["zero_init_residual"] else spec
        keys[role] = wd.key_of(
            {
                "model": model,
                "pretrain": {**settings_, "epochs": recipe["epochs"]},
                "data": pdata.augmented_key(config.pretrain.augment is True),
                "dtype": config.dtype,
            }
        )
    return keys


@dataclasses.dataclass(frozen=True, eq=False)
class Pretrained:
    """The pretrained networks of a run.

    Attributes:
      backbones: role ('teachers', 'student') -> the network trained on the pretraining task
        (its head is the task's; downstream networks take the backbone and a fresh head).
      members: role -> arch, width, path, digest, key, val_wga, val_acc, epoch (the report).
      record: how this stage was obtained (the networks' seconds summed; reused if all were).
    """

    backbones: dict[str, Loaded]
    members: dict[str, dict[str, Any]]
    record: StageRecord


def pretrain_stage(
    config: ml_collections.ConfigDict, pdata: Dataset, stage_dir: Path, keys: Mapping[str, str]
) -> Pretrained:
    """One network per architecture in `keys` trained on the pretraining task (resumable,
    through teachers.train_erm), cached in `<stage_dir>/pretrain-<key>/` and reused by any run
    or sweep with the same key."""
    cfg = config.pretrain
    specs = pretrain_roles(config)
    done: dict[str, tuple[Loaded, dict[str, Any], float, bool]] = {}
    for role, key in keys.items():
        if key in done:
            continue
        spec = specs[role]
        directory = stage_dir / f"pretrain-{key}"
        recipe = pretrain_recipe(config, spec["arch"])
        model = settings.model(ml_collections.ConfigDict(spec), pdata.num_classes, pdata.dtype)
        model = model.clone(zero_init_residual=recipe["zero_init_residual"])
        what = (
            f"{spec['arch']} width {spec['width']}{', small input' if spec['small_input'] else ''}"
            f"{', zero-initialised residual branches' if recipe['zero_init_residual'] else ''}"
        )
        reused = done_on_primary(directory)
        if reused:
            print(f"[pretrain] reusing {directory} ({what})")
        else:
            print(
                f"[pretrain] {what} on {pdata.name}: {pdata.splits['train'].num_examples} "
                f"training examples, {pdata.num_classes} classes, {recipe['epochs']} epochs"
            )
            start = time.time()
            erm_cfg = ml_collections.ConfigDict(
                {
                    "num": 1,
                    "seed": cfg.seed,
                    "epochs": recipe["epochs"],
                    "batch_size": cfg.batch_size,
                    "augment": cfg.augment,
                    "optimizer": cfg.optimizer,
                    "map": "unroll",
                }
            )
            (r,) = teachers.train_erm(
                cfg=erm_cfg,
                model=model,
                data=pdata,
                directory=directory,
                init=None,
                progress=config.progress,
                name="pretrain",
                keep="last",  # as ImageNet weights are: no selection on downstream-like groups
                pmap=erm_pmap(config, "pretrain.batch_size"),
            )
            # Process 0 writes the stage; the others then read it as process 0 does.
            with distributed.PrimaryFirst(f"the pretraining stage {directory}") as gate:
                if distributed.is_primary():
                    scores = _scores(model, r, pdata, "validation")
                    checkpoints.save_variables(
                        directory / "network",
                        {"params": r["params"], "batch_stats": r["batch_stats"]},
                        metadata={
                            "arch": spec["arch"],
                            "num_classes": pdata.num_classes,
                            "model_options": {
                                "width": spec["width"],
                                "small_input": spec["small_input"],
                            },
                            "dataset": pdata.name,
                            "val_acc": scores["avg_acc"],
                            "val_wga": scores["wga"],
                            "epoch": r["epoch"],
                            "selection": "last epoch",
                        },
                        force=True,
                    )
                    wd.mark_done(directory, {"seconds": round(time.time() - start, 1)})
                gate.release()
        loaded, seconds = read_stage(
            directory,
            lambda directory=directory: (
                _read_variables(directory / "network", pdata.dtype),
                wd.read_done(directory).get("seconds", 0.0),
            ),
        )
        member = {
            **{k: v for k, v in loaded.describe().items() if k != "sha256_source"},
            "key": key,
            **{k: loaded.info.get(k) for k in ("dataset", "val_wga", "val_acc", "epoch")},
            "seconds": seconds,
            "reused": reused,
        }
        done[key] = (loaded, member, seconds, reused)
    total = round(sum(v[2] for v in done.values()), 1)
    all_reused = all(v[3] for v in done.values())
    directories = ", ".join(sorted(str(stage_dir / f"pretrain-{k}") for k in done))
    return Pretrained(
        backbones={role: done[key][0] for role, key in keys.items()},
        members={role: done[key][1] for role, key in keys.items()},
        record=StageRecord(total, all_reused, directories),
    )


def _scores(
    model: models.ResNet, variables: Mapping[str, Any], data: Dataset, split: str
) -> dict[str, Any]:
    """Group metrics of one network on a split (evaluation.summarize)."""
    v = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    return data.evaluate(jax.jit(lambda x: model.apply(v, x, train=False)), split)


def _read_variables(path: Path, compute_dtype: Any) -> Loaded:
    """A checkpoint this package wrote (a stage's output), as Loaded."""
    variables, info = checkpoints.load_variables(path)
    model = model_from_provenance(info, compute_dtype)
    return Loaded(str(path), model, variables, info, checkpoints.digest(variables))


# ---------------------------------------------------------------------------------------------
# Teachers.


@dataclasses.dataclass(frozen=True, eq=False)
class Teachers:
    """The M ERM teachers, in groups of one architecture each (stacked by later stages).

    Attributes:
      models: one ResNet per group.
      group_sizes: teachers per group, in teacher order (sum M).
      variables: M {'params', 'batch_stats'} trees (ERM heads), group by group.
      members: per teacher, what it is: arch, width, source, digest (and val_wga, epoch when
        trained here).
      key: content key of the teachers (downstream stages key on it).
      source: 'ported' or 'trained'.
      record: how this stage was obtained.
    """

    models: tuple[models.ResNet, ...]
    group_sizes: tuple[int, ...]
    variables: list[dict[str, Any]]
    members: list[dict[str, Any]]
    key: str
    source: str
    record: StageRecord

    def groups(self) -> list[tuple[models.ResNet, list[dict[str, Any]]]]:
        """(model, its teachers' variables) per group."""
        out, start = [], 0
        for model, size in zip(self.models, self.group_sizes, strict=True):
            out.append((model, self.variables[start : start + size]))
            start += size
        return out

    def group_of(self, index: int) -> tuple[int, int]:
        """Teacher `index` (0..M-1) as (group, index within the group)."""
        for g, size in enumerate(self.group_sizes):
            if index < size:
                return g, index
            index -= size
        raise IndexError(f"teacher {index} of {sum(self.group_sizes)}")


def read_ported_teachers(config: ml_collections.ConfigDict, data: Dataset) -> list[Loaded]:
    """teachers.checkpoints read and checked against the data and each other."""
    loaded = [
        load_checkpoint(p, f"teachers.checkpoints[{i}]", data.image_size, data.dtype)
        for i, p in enumerate(config.teachers.checkpoints)
    ]
    for i, t in enumerate(loaded):
        if t.info["num_classes"] != data.num_classes:
            raise CheckpointError(
                f"teachers.checkpoints[{i}] ({t.path}) has {t.info['num_classes']} classes "
                f"but the dataset has {data.num_classes}"
            )
    kinds = [_stack_kind(t) for t in loaded]
    runs = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    if len(runs) != len(set(runs)):
        raise CheckpointError(
            "teachers.checkpoints of one architecture (and width, stem) must be listed together "
            f"to be stacked; got, in order: {[json.loads(k) for k in kinds]}: reorder "
            "teachers.checkpoints (and teachers.archs with them)"
        )
    got = tuple(t.info["arch"] for t in loaded)
    archs = tuple(config.teachers.get("archs", ()))
    if archs and archs != got:
        raise ConfigError(
            f"teachers.checkpoints hold {got} weights but teachers.archs is {archs}; expected "
            "the same architectures in the same order"
        )
    if not archs and len(set(got)) == 1 and got[0] != config.teachers.arch:
        raise ConfigError(
            f"teachers.checkpoints hold {got[0]} weights but teachers.arch is "
            f"{config.teachers.arch!r}; set --config.teachers.arch={got[0]} if that is intended"
        )
    if not archs and len(set(got)) > 1:
        raise ConfigError(
            f"teachers.checkpoints hold several architectures {got}; set "
            f'--config.teachers.archs="{got}" if that is intended'
        )
    return loaded


def _stack_kind(t: Loaded) -> str:
    """What teachers must share to be stacked in one group: architecture, width, stem."""
    return json.dumps([t.info["arch"], t.info.get("model_options", {})], sort_keys=True)


def group_models(ported: Sequence[Loaded]) -> tuple[models.ResNet, ...]:
    """One model per group of consecutive ported teachers that can be stacked."""
    return tuple(
        t.model
        for i, t in enumerate(ported)
        if i == 0 or _stack_kind(t) != _stack_kind(ported[i - 1])
    )


def teacher_group_config(config: ml_collections.ConfigDict, g: int) -> ml_collections.ConfigDict:
    """The config whose teachers are group `g` of settings.teacher_groups: its architecture
    and count, seed teachers.seed + (teachers before it), so that teacher m keeps seed
    teachers.seed + m; teachers.archs empty. With one group, the config itself up to
    teachers.arch (same stage keys as without teachers.archs)."""
    groups = settings.teacher_groups(config)
    c = config.copy_and_resolve_references()
    arch, num = groups[g]
    c.teachers.arch, c.teachers.num = arch, num
    c.teachers.seed = config.teachers.seed + sum(n for _, n in groups[:g])
    if "archs" in c.teachers:
        c.teachers.archs = ()
    return c


@dataclasses.dataclass(frozen=True)
class Keys:
    """The content keys of the cached stages, known before any of them runs.

    Attributes:
      teachers: the ported checkpoints' digests, or the ERM settings, init weights (or
        pretrained network's key) and data.
      dfr: the teachers' key, the DFR settings and the data.
      inputs: everything the student is distilled from (teachers, heads used, biased model)
        and where it starts (pretrained or ported weights).
      groups: with teachers of several architectures, each group's teacher-stage key (the
        teachers' key is made of them); empty otherwise.
    """

    teachers: str
    dfr: str
    inputs: str
    groups: tuple[str, ...] = ()


def stage_keys(
    config: ml_collections.ConfigDict,
    data: Dataset,
    *,
    ported: Sequence[Loaded] = (),
    init: Loaded | None = None,
    biased: Loaded | None = None,
    pretrained: Mapping[str, str] | None = None,
    student_init: Loaded | None = None,
    biased_stage: str = "",
) -> Keys:
    """The keys of every cached stage of this config on this data (no training needed).

    `pretrained` maps a role ('teachers', 'student') to the key of the pretrained network it
    starts from (pretrain_keys); `student_init` is a ported student.init_from checkpoint;
    `biased_stage` the teacher-stage key of a trained biased model (biased_config)."""
    pretrained = pretrained or {}
    groups = settings.teacher_groups(config)
    group_keys: tuple[str, ...] = ()
    if ported:
        teachers_key = wd.key_of([t.digest for t in ported])
    elif len(groups) > 1:  # one teacher stage per architecture group
        group_keys = tuple(
            stage_keys(
                teacher_group_config(config, g),
                data,
                pretrained=(
                    {"teachers": pretrained[f"teachers:{arch}"]}
                    if f"teachers:{arch}" in pretrained
                    else {}
                ),
            ).teachers
            for g, (arch, _) in enumerate(groups)
        )
        teachers_key = wd.key_of({"groups": list(group_keys)})
    else:
        # teachers.archs of one architecture is teachers.arch: the same stage.
        t = wd.config_dict(teacher_group_config(config, 0))["teachers"]
        for k in ("debiased", "map", "checkpoints", "init_from", "archs"):
            t.pop(k, None)
        what = {
            "data": data.augmented_key(t.get("augment") is True),
            "teachers": t,
            "init": init.digest if init else "",
            "dtype": config.dtype,
            # The checkpoint rule (teachers and DFR's C): trained before this rule, a stage
            # could hold other checkpoints, so its key differs.
            "selection": evaluation.SELECTION_RULE,
        }
        if "teachers" in pretrained:  # (absent otherwise: the keys of earlier runs stay valid)
            what["pretrain"] = pretrained["teachers"]
        teachers_key = wd.key_of(what)
    dfr_cfg = dataclasses.asdict(settings.dfr_config(config))
    dfr_key = wd.key_of({"teachers": teachers_key, "dfr": dfr_cfg, "data": data.key})
    what = {
        "teachers": teachers_key,
        "dfr": dfr_key,
        "debiased": settings.debiased_count(config),
        "biased": (
            biased.digest
            if biased
            else {"trained": biased_stage}
            if biased_stage
            else config.biased.index
        ),
        "data": data.augmented_key(config.train.augment is True),
    }
    # Where the student starts from (absent when from scratch: earlier keys stay valid).
    if "student" in pretrained:
        what["student_init"] = {"pretrain": pretrained["student"]}
    elif student_init is not None:
        what["student_init"] = {"digest": student_init.digest}
    inputs = wd.key_of(what)
    return Keys(teachers_key, dfr_key, inputs, group_keys)


def teachers_stage(
    config: ml_collections.ConfigDict,
    data: Dataset,
    stage_dir: Path,
    key: str,
    *,
    ported: Sequence[Loaded] = (),
    init: Loaded | None = None,
    group_keys: Sequence[str] = (),
    backbones: Mapping[str, Loaded] | None = None,
    label: str = "teachers",
) -> Teachers:
    """The ERM teachers: the ported ones, or M trained here once per key (resumable).
    `label`: the prefix of its log lines ('biased', 'deep ensemble' for the networks trained
    as a teacher stage for those roles).

    With teachers.archs of several architectures, each group is a teacher stage of its own
    (teacher_group_config, keyed by `group_keys` = Keys.groups, started from
    `backbones['teachers:<arch>']` when pretrained), combined in teacher order."""
    if ported:
        for t in ported:
            d = t.describe()
            print(
                f"[teachers] ported {d['arch']} (width {d['width']}, {d['num_classes']} "
                f"classes) from {d['path']}, digest {d['digest']}"
            )
        kinds = [_stack_kind(t) for t in ported]
        sizes = [len(list(run)) for _, run in itertools.groupby(kinds)]
        return Teachers(
            models=group_models(ported),
            group_sizes=tuple(sizes),
            variables=[t.variables for t in ported],
            members=[{**t.describe(), "source": "ported"} for t in ported],
            key=key,
            source="ported",
            record=StageRecord(0.0, True, ""),
        )
    groups = settings.teacher_groups(config)
    if len(groups) > 1:
        if len(group_keys) != len(groups):
            raise ValueError(f"need one stage key per teacher group {groups}; got {group_keys}")
        parts = []
        for g, (arch, num) in enumerate(groups):
            print(f"[{label}] group {g + 1}/{len(groups)}: {num} x {arch}")
            sub = teacher_group_config(config, g)
            b = (backbones or {}).get(f"teachers:{arch}")
            parts.append(teachers_stage(sub, data, stage_dir, group_keys[g], init=b, label=label))
        return Teachers(
            models=tuple(p.models[0] for p in parts),
            group_sizes=tuple(p.group_sizes[0] for p in parts),
            variables=[v for p in parts for v in p.variables],
            members=[m for p in parts for m in p.members],
            key=key,
            source="trained",
            record=StageRecord(
                round(sum(p.record.seconds for p in parts), 1),
                all(p.record.reused for p in parts),
                ", ".join(p.record.directory for p in parts),
                tuple(p.record for p in parts),
            ),
        )
    config = teacher_group_config(config, 0)  # teachers.archs of one architecture: its arch
    cfg = config.teachers
    model = settings.model(cfg, data.num_classes, data.dtype)
    directory = stage_dir / f"teachers-{key}"
    names = [f"erm_{m}" for m in range(cfg.num)]
    reused = done_on_primary(directory)
    if reused:
        print(f"[{label}] reusing {directory}")
        seconds = read_stage(directory, lambda: wd.read_done(directory).get("seconds", 0.0))
    else:
        start = time.time()
        results = teachers.train_erm(
            cfg=cfg,
            model=model,
            data=data,
            directory=directory,
            init=(
                None if init is None else lambda v, path=init.path: _graft(v, init.variables, path)
            ),
            progress=config.progress,
            name=label,
            pmap=erm_pmap(config, "teachers.batch_size"),
        )
        seconds = round(time.time() - start, 1)
        # Process 0 writes the stage; the others then read it as process 0 does.
        with distributed.PrimaryFirst(f"the teacher stage {directory}") as gate:
            if distributed.is_primary():
                for name, r in zip(names, results, strict=True):
                    checkpoints.save_variables(
                        directory / name,
                        {"params": r["params"], "batch_stats": r["batch_stats"]},
                        metadata={
                            "arch": cfg.arch,
                            "num_classes": data.num_classes,
                            "model_options": {"width": cfg.width, "small_input": cfg.small_input},
                            "val_wga": r["val_wga"],
                            "epoch": r["epoch"],
                            "selection": "best validation worst-group accuracy",
                        },
                        force=True,
                    )
                wd.mark_done(directory, {"teachers": names, "seconds": seconds})
            gate.release()
    variables, members = [], []
    for name in names:
        v, info = read_stage(
            directory, lambda name=name: checkpoints.load_variables(directory / name)
        )
        variables.append(v)
        members.append(
            {
                "arch": cfg.arch,
                "width": cfg.width,
                "small_input": cfg.small_input,
                "source": "trained",
                "path": str(directory / name),
                "val_wga": info.get("val_wga"),
                "epoch": info.get("epoch"),
            }
        )
    return Teachers(
        (model,),
        (len(variables),),
        variables,
        members,
        key,
        "trained",
        StageRecord(seconds, reused, str(directory)),
    )


def deep_ensemble_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config whose teachers are the student-size Deep Ensemble: the teachers' ERM settings
    (num, seed, epochs, batch size, augmentation, optimiser, map) with the student's
    architecture, width, stem and ported starting weights (the paper's Deep Ensemble baseline:
    a majority vote of M models of the student's capacity). Through `stage_keys` and
    `teachers_stage` it is a teacher stage like any other, cached on its content: when the
    teachers already have the student's architecture and start, it is theirs."""
    c = config.copy_and_resolve_references()
    for k in ("arch", "width", "small_input", "init_from"):
        c.teachers[k] = config.student[k]
    c.teachers.checkpoints = ()
    if "archs" in c.teachers:
        c.teachers.archs = ()
    return c


def biased_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config whose one teacher is the trained biased model of `biased.arch`: the
    teachers' ERM settings, width and stem, seed teachers.seed + teachers.num (one no teacher
    uses: with the teachers' architecture it is another network, not a copy of one), no
    ported weights (settings.validate refuses teachers.init_from with it)."""
    c = config.copy_and_resolve_references()
    c.teachers.arch = config.biased.arch
    c.teachers.num = 1
    c.teachers.seed = config.teachers.seed + config.teachers.num
    c.teachers.checkpoints = ()
    c.teachers.init_from = ""
    if "archs" in c.teachers:
        c.teachers.archs = ()
    return c


def trained_biased(t: Teachers) -> Loaded:
    """The trained biased model (a one-teacher stage of biased_config) as a Loaded model."""
    (variables,) = t.variables
    member = t.members[0]
    info = {
        "arch": member["arch"],
        "num_classes": t.models[0].num_classes,
        "model_options": {"width": member["width"], "small_input": member["small_input"]},
        "source": "trained",
        "val_wga": member.get("val_wga"),
        "epoch": member.get("epoch"),
    }
    return Loaded(member["path"], t.models[0], variables, info, checkpoints.digest(variables))


def _graft(fresh: dict, loaded: dict, path: str) -> dict:
    """A teacher's fresh variables with the init_from backbone grafted on (its own head)."""
    try:
        return models.merge_params(fresh, loaded, source=path, fresh=("fc",))
    except ValueError as e:
        raise CheckpointError(f"teachers.init_from: {e}") from e


# ---------------------------------------------------------------------------------------------
# DFR.


@dataclasses.dataclass(frozen=True, eq=False)
class DFRHeads:
    """DFR heads of every ERM teacher.

    Attributes:
      heads: M {'kernel': [D, C], 'bias': [C]} in raw feature space.
      info: M records of the selection (chosen C, selection-half WGA per C).
      key: content key (teachers' key, DFR settings, data).
      directory: the stage directory (it also caches the teachers' test logits).
      record: how this stage was obtained.
    """

    heads: list[dict[str, np.ndarray]]
    info: list[dict[str, Any]]
    key: str
    directory: Path
    record: StageRecord


def dfr_stage(
    config: ml_collections.ConfigDict, data: Dataset, t: Teachers, stage_dir: Path, key: str
) -> DFRHeads:
    """DFR heads of every ERM teacher, computed once per key (in a multi-process run by
    process 0 alone, on one device; the others wait, then read the stage it wrote)."""
    directory = stage_dir / f"dfr-{key}"
    with distributed.PrimaryFirst(f"the DFR stage {directory}") as gate:
        if wd.is_done(directory):  # (the others find the stage done)
            gate.release()
            m = len(t.variables)
            print(f"[dfr] reusing {directory}")

            def read():
                saved = np.load(directory / "heads.npz")
                heads = [
                    {"kernel": saved[f"kernel_{i}"], "bias": saved[f"bias_{i}"]} for i in range(m)
                ]
                return heads, wd.read_done(directory)

            heads, done = read_stage(directory, read)
            record = StageRecord(done.get("seconds", 0.0), True, str(directory))
            return DFRHeads(heads, done["info"], key, directory, record)
        out = _fit_dfr(config, data, t, directory, key)
        gate.release()
        return out


def _fit_dfr(
    config: ml_collections.ConfigDict, data: Dataset, t: Teachers, directory: Path, key: str
) -> DFRHeads:
    """dfr_stage's computation, written to `directory`."""
    dfr_cfg = settings.dfr_config(config)
    start = time.time()
    heads, infos = [], []
    for model, variables in t.groups():  # (teacher order: group by group)
        h, i = teachers.fit_dfr_heads(
            cfg=dfr_cfg,
            model=model,
            teacher_variables=variables,
            data=data,
            how=config.teachers.map,
        )
        heads, infos = heads + list(h), infos + list(i)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, h in enumerate(heads):
        arrays[f"kernel_{i}"], arrays[f"bias_{i}"] = h["kernel"], h["bias"]
    tmp = directory / ".heads.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.replace(directory / "heads.npz")
    seconds = round(time.time() - start, 1)
    wd.mark_done(directory, {"info": infos, "seconds": seconds})
    return DFRHeads(heads, infos, key, directory, StageRecord(seconds, False, str(directory)))


def with_head(variables: Mapping[str, Any], head: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A teacher's variables with its `fc` replaced by a DFR head."""
    params = dict(variables["params"])
    params["fc"] = {"kernel": jnp.asarray(head["kernel"]), "bias": jnp.asarray(head["bias"])}
    return {"params": params, "batch_stats": variables["batch_stats"]}


# ---------------------------------------------------------------------------------------------
# The frozen ensemble and the biased model.


@dataclasses.dataclass(frozen=True, eq=False)
class Ensemble:
    """What the student is distilled from.

    Attributes:
      ensemble: the step's static description (distill.Ensemble).
      frozen: {'teachers': (stacked variables,), 'biased': variables or head}.
      kinds: per teacher 'DFR' or 'ERM' (which head it distils with).
      biased: what the biased model is, for the report.
      key: content key of all of it (Keys.inputs: the distillation stage's input).
    """

    ensemble: distill.Ensemble
    frozen: dict[str, Any]
    kinds: list[str]
    biased: dict[str, Any]
    key: str


def build_ensemble(
    config: ml_collections.ConfigDict,
    t: Teachers,
    heads: DFRHeads,
    biased: Loaded | None,
    key: str,
) -> Ensemble:
    """The teachers with their DFR or ERM heads, and the biased model: the ERM version of
    teacher `biased.index` (sharing its backbone) or a ported checkpoint."""
    m = len(t.variables)
    debiased = settings.debiased_count(config)
    kinds = ["DFR" if i < debiased else "ERM" for i in range(m)]
    used = [
        with_head(v, h) if kind == "DFR" else v
        for v, h, kind in zip(t.variables, heads.heads, kinds, strict=True)
    ]
    if biased is not None:
        ens = distill.Ensemble(teachers=t.models, group_sizes=t.group_sizes, biased=biased.model)
        frozen_biased = biased.variables
        biased_info = {"source": biased.info.get("source", "ported"), **biased.describe()}
    else:
        index = config.biased.index
        ens = distill.Ensemble(
            teachers=t.models, group_sizes=t.group_sizes, biased_backbone=t.group_of(index)
        )
        frozen_biased = jax.tree.map(jnp.asarray, t.variables[index]["params"]["fc"])
        biased_info = {"source": f"ERM teacher {index}"}
    starts = np.cumsum((0, *t.group_sizes))
    frozen = {
        "teachers": tuple(
            distill.stack_variables(used[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)
        ),
        "biased": frozen_biased,
    }
    return Ensemble(ens, frozen, kinds, biased_info, key)


# ---------------------------------------------------------------------------------------------
# Distillation.


@dataclasses.dataclass(frozen=True, eq=False)
class Student:
    """The distilled student.

    Attributes:
      best: variables of the epoch with the best validation WGA.
      last: variables after the last epoch.
      val_wga: best validation WGA.
      epoch: its epoch (1-based).
      record: how this stage was obtained.
    """

    best: dict[str, Any]
    last: dict[str, Any]
    val_wga: float
    epoch: int
    record: StageRecord


def check_distill_inputs(directory: Path, key: str, overwrite: bool) -> None:
    """Refuses to resume or reuse a distillation made from other inputs (teachers re-converted
    at the same path, another data folder): raises WorkdirError, or with `overwrite` removes
    the stale stage."""
    path = directory / INPUTS_FILE
    if not directory.exists():
        return
    recorded = json.loads(path.read_text()).get("key") if path.exists() else None
    if recorded == key:
        return
    if not overwrite:
        raise WorkdirError(
            f"{directory} holds a student distilled from other inputs (teachers, DFR heads, "
            "biased model or data changed content, with the same config); use another "
            "--workdir, or pass --overwrite to distil again"
        )
    shutil.rmtree(directory)


def distill_stage(
    config: ml_collections.ConfigDict,
    data: Dataset,
    ens: Ensemble,
    directory: Path,
    run_layout: settings.Layout,
    student_init: dict[str, Any] | None,
) -> Student:
    """Trains (or resumes, or reuses) the student in `directory`."""
    student = settings.model(config.student, data.num_classes, data.dtype)
    dcfg = settings.distill_config(config)
    try:
        mdl = distill.create_models(student, ens.ensemble, dcfg)
    except ValueError as e:
        which = "student and teachers" if ens.ensemble.biased is None else "the models"
        raise ConfigError(f"{which} do not fit together: {e}") from e
    if wd.is_done(directory):
        print(f"[distill] reusing {directory}")
        best, last, done = read_stage(
            directory,
            lambda: (
                checkpoints.load_variables(directory / "student_best")[0],
                checkpoints.load_variables(directory / "student_last")[0],
                wd.read_done(directory),
            ),
        )
        record = StageRecord(done.get("seconds", 0.0), True, str(directory))
        return Student(best, last, done["val_wga"], done["epoch"], record)
    start = time.time()
    directory.mkdir(parents=True, exist_ok=True)
    wd.write_json(directory / INPUTS_FILE, {"key": ens.key})
    best, last, val_wga, epoch = _train_student(
        config, data, mdl, dcfg, ens.frozen, directory, run_layout, student_init
    )
    meta = {
        "arch": config.student.arch,
        "num_classes": data.num_classes,
        "model_options": {"width": config.student.width, "small_input": config.student.small_input},
    }
    checkpoints.save_variables(
        directory / "student_best",
        best,
        metadata={**meta, "val_wga": val_wga, "epoch": epoch},
        force=True,
    )
    checkpoints.save_variables(directory / "student_last", last, metadata=meta, force=True)
    seconds = round(time.time() - start, 1)
    wd.mark_done(directory, {"val_wga": val_wga, "epoch": epoch, "seconds": seconds})
    return Student(best, last, val_wga, epoch, StageRecord(seconds, False, str(directory)))


def _train_student(config, data, mdl, dcfg, frozen, directory, run_layout, student_init):
    """The distillation loop: (best variables, last variables, best val WGA, its epoch)."""
    tcfg = config.train
    use_pmap = run_layout.pmap
    if jax.process_count() > 1:  # each process feeds and evaluates its share (distributed.py)
        data = data.sharded()
    spe = pipeline.steps_per_epoch(data.splits["train"], tcfg.batch_size)
    tx = optim.from_config(tcfg.optimizer, epochs=tcfg.epochs, steps_per_epoch=spe)
    state = distill.create_train_state(
        mdl, tx, jax.random.key(config.seed), data.image_size, student_init
    )
    step_fn = distill.compile_step(mdl, dcfg, tx, pmap=use_pmap)
    base_rng = jax.random.key(config.seed + 1_000_003)
    replicate = distill.replicate  # laid out as the step's outputs: one trace, not two
    if use_pmap:
        frozen, state = replicate(frozen), replicate(state)
        hosts = f" in each of {jax.process_count()} processes" if jax.process_count() > 1 else ""
        print(
            f"[distill] pmap over {run_layout.devices} devices{hosts}, "
            f"{run_layout.per_device_batch} examples each"
        )
    unrep = flax.jax_utils.unreplicate if use_pmap else (lambda x: x)
    student_vars = lambda st: {"params": st.params["student"], "batch_stats": st.batch_stats}  # noqa: E731
    predict = jax.jit(lambda v, x: mdl.student.apply(v, x, train=False))
    first = student_vars(unrep(state))
    carry = {
        "state": state,
        # Copies: the step donates (and deletes) the state's buffers.
        "best_params": jax.tree.map(jnp.copy, first["params"]),
        "best_batch_stats": jax.tree.map(jnp.copy, first["batch_stats"]),
        "best_wga": jnp.asarray(-1.0, jnp.float32),
        "best_avg": jnp.asarray(-1.0, jnp.float32),
        "best_epoch": jnp.asarray(0, jnp.int32),
    }

    augment = device_input.compile_augment(data.image_size, data.dtype, pmap=use_pmap)

    def step(carry, batch, s):
        batch = augment(batch)  # a device batch (data.device_augment): crop, flip, normalise
        rng = jax.random.fold_in(base_rng, s)
        state, metrics = step_fn(carry["state"], frozen, batch, replicate(rng) if use_pmap else rng)
        return {**carry, "state": state}, metrics

    def batches(epoch, start):
        return data.train_batches(
            batch_size=tcfg.batch_size,
            seed=config.seed,
            epoch=epoch,
            start_step=start,
            augment=tcfg.augment,
            num_devices=run_layout.devices if use_pmap else None,
        )

    def evaluate(carry, epoch):
        variables = student_vars(unrep(carry["state"]))
        s = data.evaluate(functools.partial(predict, variables), "validation")
        if evaluation.improves(s["wga"], s["avg_acc"], carry["best_wga"], carry["best_avg"]):
            carry = {
                **carry,
                "best_params": jax.tree.map(jnp.copy, variables["params"]),
                "best_batch_stats": jax.tree.map(jnp.copy, variables["batch_stats"]),
                "best_wga": jnp.asarray(s["wga"], jnp.float32),
                "best_avg": jnp.asarray(s["avg_acc"], jnp.float32),
                "best_epoch": jnp.asarray(epoch + 1, jnp.int32),
            }
        return carry, {"val_wga": s["wga"], "val_avg": s["avg_acc"]}

    carry = loop.Loop(
        name="distill",
        directory=directory,
        epochs=tcfg.epochs,
        steps_per_epoch=spe,
        batches=batches,
        step=step,
        evaluate=evaluate,
        eval_every=tcfg.eval_every,
        checkpoint_every=tcfg.checkpoint_every,
        log_every=tcfg.log_every,
        summary=distill_summary,
        progress=config.progress,
        save_view=lambda c: {**c, "state": unrep(c["state"])},
        load_view=lambda c: {**c, "state": replicate(c["state"]) if use_pmap else c["state"]},
    ).run(carry)
    return (
        {"params": carry["best_params"], "batch_stats": carry["best_batch_stats"]},
        student_vars(unrep(carry["state"])),
        float(carry["best_wga"]),
        int(carry["best_epoch"]),
    )


def distill_summary(epoch: int, means: Mapping[str, float], ev: Mapping[str, Any]) -> str:
    """The one line printed after each distillation epoch."""
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


def mean_teacher_weights(directory: Path) -> dict[str, float]:
    """Mean over the epochs of each logged `weight/t`, `empty_rows` and `weight_entropy`."""
    path = directory / "metrics.jsonl"
    if not path.exists():
        return {}
    sums: dict[str, float] = {}
    count = 0
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") != "epoch":
            continue
        count += 1
        for k, v in r.items():
            if k.startswith("weight/") or k in ("empty_rows", "weight_entropy"):
                sums[k] = sums.get(k, 0.0) + v
    return {k: v / count for k, v in sums.items()} if count else {}


# ---------------------------------------------------------------------------------------------
# Evaluation.


def teacher_test_logits(data: Dataset, t: Teachers, heads: DFRHeads) -> dict[str, np.ndarray]:
    """Test logits [M, N, C] of every ERM and DFR teacher, with the examples' labels, groups
    and ids digest; cached in the DFR stage's directory (keyed on content)."""
    path = heads.directory / "test_logits.npz"
    if path.exists():
        return dict(np.load(path))
    parts, start = [], 0
    for model, variables in t.groups():
        h = heads.heads[start : start + len(variables)]
        start += len(variables)
        kernel = jnp.stack([jnp.asarray(x["kernel"]) for x in h])  # [M_g, D_g, C]
        bias = jnp.stack([jnp.asarray(x["bias"]) for x in h])  # [M_g, C]
        parts.append((model, distill.stack_variables(variables), kernel, bias))

    @jax.jit
    def both_heads(stacked, images):
        # One backbone forward for both: the DFR head sees the same pooled features as `fc`.
        out = []
        for (model, _, kernel, bias), group in zip(parts, stacked, strict=True):

            def one(v, model=model):
                logits, feats = models.apply_with_features(model, v, images, layers=("pooled",))
                return logits, feats["pooled"]

            erm, pooled = models.map_stacked(one, group, "unroll")  # [M_g, B, C], [M_g, B, D_g]
            dt = model.dtype  # as flax's Dense computes `fc`
            dfr = jnp.einsum("mbd,mdc->mbc", pooled.astype(dt), kernel.astype(dt)) + bias[
                :, None
            ].astype(dt)
            out.append(jnp.concatenate([erm, dfr.astype(jnp.float32)], axis=-1))
        return jnp.concatenate(out, axis=0)

    got = evaluation.collect(
        functools.partial(both_heads, tuple(p[1] for p in parts)), data.eval_batches("test")
    )
    c = data.num_classes
    out = {
        "erm": got["output"][..., :c],
        "dfr": got["output"][..., c:],
        "label": got["label"],
        "group": got["group"],
    }
    tmp = heads.directory / ".test_logits.tmp.npz"
    np.savez(tmp, **out)
    tmp.replace(path)
    return out


def _test_logits(data: Dataset, t: Teachers, heads: DFRHeads) -> dict[str, np.ndarray]:
    """teacher_test_logits, checked to be of this test split."""
    t_logits = teacher_test_logits(data, t, heads)
    test = data.splits["test"]
    labels, groups = t_logits["label"], t_logits["group"]
    if not (np.array_equal(labels, test.label) and np.array_equal(groups, test.group)):
        raise RuntimeError(
            f"cached teacher test logits in {heads.directory} are not of this test split "
            f"({labels.size} vs {test.num_examples} examples): stage keys missed an input"
        )
    return t_logits


def evaluate_stage(
    data: Dataset,
    t: Teachers,
    heads: DFRHeads,
    kinds: Sequence[str],
    student: Student,
    student_model: models.ResNet,
    deep_ensemble: tuple[Teachers, DFRHeads] | None = None,
    biased: Loaded | None = None,
) -> dict[str, dict[str, Any]]:
    """Test metrics of every ERM and DFR teacher, the ensembles, the student-size Deep
    Ensemble (majority votes of its ERM and of its DFR networks; when given), a separate
    (trained or ported) biased model when given, and the student, all on the same examples
    (checked)."""
    t_logits = _test_logits(data, t, heads)
    labels, groups = t_logits["label"], t_logits["group"]
    results: dict[str, dict] = {}
    for kind in ("ERM", "DFR"):
        for i, lg in enumerate(t_logits[kind.lower()]):
            results[f"{kind} teacher {i}"] = data.summarize(np.argmax(lg, -1), labels, groups)
    used = np.stack([t_logits[k.lower()][i] for i, k in enumerate(kinds)])
    composition = f"{kinds.count('DFR')} DFR + {kinds.count('ERM')} ERM"
    ens = evaluation.ensemble_predictions(used)
    results[f"ensemble ({composition}), avg logits"] = data.summarize(
        ens["avg_logits"], labels, groups
    )
    results[f"ensemble ({composition}), majority"] = data.summarize(ens["majority"], labels, groups)
    if deep_ensemble is not None:
        d_logits = _test_logits(data, *deep_ensemble)
        m = len(deep_ensemble[0].variables)
        for kind in ("ERM", "DFR"):
            votes = evaluation.ensemble_predictions(d_logits[kind.lower()])["majority"]
            results[f"Deep Ensemble (student size, {m} {kind}), majority"] = data.summarize(
                votes, labels, groups
            )
    if biased is not None:
        b = biased.describe()
        source = biased.info.get("source", "ported")
        name = f"biased model ({source} {b['arch']}, width {b['width']})"
        b_predict = jax.jit(lambda x: biased.model.apply(biased.variables, x, train=False))
        results[name] = data.evaluate(b_predict, "test")
    predict = jax.jit(lambda v, x: student_model.apply(v, x, train=False))
    for name, variables in (
        ("student (best val WGA)", student.best),
        ("student (last)", student.last),
    ):
        results[name] = data.evaluate(functools.partial(predict, variables), "test")
    ns = {r["n"] for r in results.values()}
    if ns != {data.splits["test"].num_examples}:
        raise RuntimeError(f"report rows were computed on different examples: n = {sorted(ns)}")
    return results
