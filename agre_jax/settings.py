"""A run's config, checked and turned into the static objects the stages use.

`validate(config)` needs neither data nor disk: it builds the DistillConfig, the DFR settings,
both optimisers, the models and adapters and the device layout, and raises one
`errors.ConfigError` listing every problem (key, value, what is expected). `check_splits`
does the same against the loaded dataset's split sizes, before any training.

The dataclasses of the math layer (`distill.DistillConfig`, `dfr.DFRConfig`) are built from
their config blocks by field name, so that `configs/default.py` declares every default once
(tests/test_settings.py checks that the dataclasses' defaults agree with it).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from agre_jax import dfr, distill, models, optim
from agre_jax.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# config.dtype 'auto': bfloat16 on these JAX backends, float32 on the others (the CPU).
AUTO_DTYPE = "auto"
BF16_BACKENDS = ("gpu", "tpu")
PMAP_MODES = ("auto", "always", "never")
DATASETS = ("spurious_shapes", "waterbirds", "celeba_groups", "colored_mnist")  # agre_jax.data
# Every key that must be an integer >= 1, with what it counts.
POSITIVE_INTS = (
    "teachers.epochs",
    "teachers.batch_size",
    "train.epochs",
    "train.batch_size",
    "train.eval_every",
    "train.checkpoint_every",
    "train.log_every",
    "data.eval_batch_size",
    "data.image_size",
    "dfr.steps",
    "dfr.batch_size",
    "pretrain.epochs",
    "pretrain.batch_size",
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a trained stage's step (the student's; the ERM networks' with their own batch) is
    spread over devices.

    Attributes:
      devices: local devices used (1 without pmap).
      pmap: whether the step runs under pmap.
      per_device_batch: the stage's batch size / (devices x processes).
    """

    devices: int
    pmap: bool
    per_device_batch: int


def dtype_name(name: str, backend: str | None = None) -> str:
    """The concrete compute dtype name of a config's `dtype`: 'float32' and 'bfloat16' as
    they are; 'auto' is 'bfloat16' on a GPU or TPU backend and 'float32' on the CPU.

    Args:
      name: config.dtype.
      backend: the JAX backend that 'auto' is for (default `jax.default_backend()`, which
        starts JAX's backend; read for 'auto' only).

    Raises:
      ConfigError: an unknown name.
    """
    if name == AUTO_DTYPE:
        backend = jax.default_backend() if backend is None else backend
        return "bfloat16" if backend in BF16_BACKENDS else "float32"
    if name not in DTYPES:
        raise ConfigError(f"dtype is {name!r}; expected one of {(*DTYPES, AUTO_DTYPE)}")
    return name


def dtype(name: str) -> Any:
    """The compute dtype of a config's `dtype` name (`dtype_name`); raises ConfigError."""
    return DTYPES[dtype_name(name)]


def resolve_dtype(
    config: ml_collections.ConfigDict, backend: str | None = None
) -> ml_collections.ConfigDict:
    """`config` with dtype 'auto' replaced by its concrete name on `backend` (`dtype_name`;
    default this process's), in a copy; `config` itself for any other value (`validate`
    checks those).

    Done once where a run starts (main.py; `launch.run_one` for a sweep's runs, in the job),
    so that what identifies a run (its recorded config, its stage keys, the config compared
    across processes) holds 'float32' or 'bfloat16': an 'auto' run on the CPU is a float32
    run, with the same stages and workdir.
    """
    if config.dtype != AUTO_DTYPE:
        return config
    resolved = config.copy_and_resolve_references()
    resolved.dtype = dtype_name(AUTO_DTYPE, backend)
    return resolved


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def _from_block(cls: type, block: Mapping[str, Any], **fixed: Any) -> Any:
    """`cls(**fields)` with each dataclass field read from the config block of the same name,
    except those given in `fixed`."""
    names = [f.name for f in dataclasses.fields(cls)]
    values = {n: block[n] for n in names if n not in fixed and n in block}
    try:
        return cls(**values, **fixed)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e


def distill_config(config: ml_collections.ConfigDict) -> distill.DistillConfig:
    """config.distill (and teachers.map) as the step's validated static config."""
    d = config.distill
    gammas = tuple((k, float(v)) for k, v in sorted(d.gammas.items()) if float(v) != 0.0)
    return _from_block(distill.DistillConfig, d, gammas=gammas, teacher_map=config.teachers.map)


def dfr_config(config: ml_collections.ConfigDict) -> dfr.DFRConfig:
    """config.dfr as DFR's settings; DFR's halves are seeded by teachers.seed."""
    try:
        c_grid = tuple(float(c) for c in config.dfr.c_grid)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"dfr.c_grid is {config.dfr.c_grid!r}; expected a tuple of numbers > 0"
        ) from e
    return _from_block(dfr.DFRConfig, config.dfr, c_grid=c_grid, seed=config.teachers.seed)


def layout(
    config: ml_collections.ConfigDict,
    devices: int | None = None,
    processes: int | None = None,
    batch_key: str = "train.batch_size",
) -> Layout:
    """The device layout of the step whose global batch is `batch_key` (the student's, or
    'teachers.batch_size' / 'pretrain.batch_size' of the ERM stages, which follow train.pmap
    too); raises ConfigError when the batch does not split.

    `devices` (default: the local device count) is per process; with several `processes`
    (default: jax.process_count()) the step always runs under pmap over all their devices."""
    mode = config.train.pmap
    if mode not in PMAP_MODES:
        raise ConfigError(f"train.pmap is {mode!r}; expected one of {PMAP_MODES}")
    n = jax.local_device_count() if devices is None else devices
    p = jax.process_count() if processes is None else processes
    if p > 1 and mode == "never":
        raise ConfigError(
            f"train.pmap is 'never', but the run has {p} processes; a multi-process run "
            "distils under pmap: use 'auto' or 'always'"
        )
    use_pmap = mode == "always" or (mode == "auto" and n * p > 1)
    n = n if use_pmap else 1
    batch = _get(config, batch_key)
    if batch % (n * p):
        where = f"{n} devices" + (f" x {p} processes" if p > 1 else "")
        hint = "" if p > 1 else ", or train.pmap='never'"  # several processes need pmap
        raise ConfigError(
            f"{batch_key} is {batch}, which does not divide over the {where} of "
            f"train.pmap; use a multiple of the device count{hint}"
        )
    return Layout(devices=n, pmap=use_pmap, per_device_batch=batch // (n * p))


def model(block: ml_collections.ConfigDict, num_classes: int, compute_dtype: Any) -> Any:
    """The ResNet of a config block (config.teachers / config.student)."""
    return models.create(
        block.arch,
        num_classes,
        width=block.width,
        small_input=block.small_input,
        dtype=compute_dtype,
    )


def trained_biased_model(
    config: ml_collections.ConfigDict, num_classes: int, compute_dtype: Any
) -> Any:
    """The ResNet of biased.arch that its stage trains, at the teachers' width and stem."""
    t = config.teachers
    return models.create(
        config.biased.arch,
        num_classes,
        width=t.width,
        small_input=t.small_input,
        dtype=compute_dtype,
    )


def num_teachers(config: ml_collections.ConfigDict) -> int:
    """M: the ported checkpoints' count, else teachers.num."""
    t = config.teachers
    return len(t.checkpoints) if t.checkpoints else t.num


def teacher_groups(config: ml_collections.ConfigDict) -> tuple[tuple[str, int], ...]:
    """The trained teachers' architecture groups, ((arch, count), ...) in teacher order:
    teachers.archs (one entry per teacher, each architecture's teachers listed together), or
    ((teachers.arch, teachers.num),) when it is empty. Each group is trained stacked, as one
    teacher stage (stages.teacher_group_config)."""
    t = config.teachers
    archs = tuple(t.get("archs", ())) or (t.arch,) * t.num
    groups: list[tuple[str, int]] = []
    for arch in archs:
        if groups and groups[-1][0] == arch:
            groups[-1] = (arch, groups[-1][1] + 1)
        else:
            groups.append((arch, 1))
    return tuple(groups)


def _archs_problems(config: ml_collections.ConfigDict) -> list[str]:
    """teachers.archs: known architectures, one per teacher, each architecture's together."""
    t = config.teachers
    archs = t.get("archs", ())
    if not archs:
        return []
    if isinstance(archs, str) or not all(isinstance(a, str) for a in archs):
        return [f"teachers.archs is {archs!r}; expected a tuple of architecture names"]
    unknown = sorted({a for a in archs if a not in models.ARCHS})
    if unknown:
        return [f"teachers.archs has {unknown}; expected names among {models.ARCHS}"]
    m = len(t.checkpoints) if t.checkpoints else t.num
    if len(archs) != m:
        what = "teachers.checkpoints" if t.checkpoints else "teachers.num"
        return [
            f"teachers.archs has {len(archs)} entries but {what} gives {m} teachers; expected "
            "one architecture per teacher"
        ]
    seen = [arch for arch, _ in teacher_groups(config)]
    if t.checkpoints:
        # Ported: grouped by architecture, width and stem once read (read_ported_teachers).
        return []
    if len(seen) != len(set(seen)):
        return [
            f"teachers.archs is {tuple(archs)}; expected each architecture's teachers listed "
            "together (each group is trained stacked), e.g. "
            f"{tuple(sorted(archs, key=seen.index))}"
        ]
    problems = []
    if len(seen) > 1 and t.init_from:
        problems.append(
            f"teachers.init_from is {t.init_from!r} with teachers of several architectures "
            f"{tuple(seen)}; expected one starting checkpoint per architecture: use the "
            "pretrain stage (pretrain.enabled) or ported teachers.checkpoints"
        )
    return problems


def debiased_count(config: ml_collections.ConfigDict) -> int:
    """How many of the M teachers use their DFR head."""
    m = num_teachers(config)
    return m if config.teachers.debiased < 0 else config.teachers.debiased


def _scalar_problems(config: ml_collections.ConfigDict) -> list[str]:
    problems = []
    for key in POSITIVE_INTS:
        value = _get(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{key} is {value!r}; expected an integer >= 1")
    for key in ("seed", "teachers.seed", "pretrain.seed"):
        value = _get(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
            problems.append(f"{key} is {value!r}; expected an integer in [0, 2**31)")
    t = config.teachers
    m = num_teachers(config)
    if m < 1:
        problems.append(f"teachers.num is {m}; expected >= 1 (or teachers.checkpoints)")
    if not -1 <= t.debiased <= m:
        problems.append(f"teachers.debiased is {t.debiased}; expected -1 (all) or 0..{m}")
    if not config.biased.checkpoint and not 0 <= config.biased.index < m:
        problems.append(f"biased.index is {config.biased.index}; expected 0..{m - 1}")
    arch = config.biased.arch
    if arch not in ("", *models.ARCHS):
        problems.append(f"biased.arch is {arch!r}; expected '' or one of {models.ARCHS}")
    elif arch and config.biased.checkpoint:
        problems.append(
            f"biased.arch is {arch!r} and biased.checkpoint is {config.biased.checkpoint!r}; "
            "expected one of them (a trained or a ported biased model)"
        )
    elif arch and config.teachers.init_from:
        problems.append(
            f"biased.arch is {arch!r} with teachers.init_from set; a trained biased model "
            "starts from the pretrain stage or from scratch: give a ported biased.checkpoint"
        )
    for key in ("teachers.arch", "student.arch"):
        if _get(config, key) not in models.ARCHS:
            problems.append(f"{key} is {_get(config, key)!r}; expected one of {models.ARCHS}")
    for key in ("teachers.width", "student.width"):
        value = _get(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{key} is {value!r}; expected an integer >= 1")
    cap = config.distill.get("aekd_cap", 0.6)
    if config.distill.weighting == "aekd" and m >= 1 and isinstance(cap, int | float):
        if cap * m < 1 - 1e-9:
            problems.append(
                f"distill.aekd_cap is {cap!r}; AE-KD needs cap * teachers >= 1, here "
                f"{m} teachers: expected a cap in [{1 / m:.4g}, 1]"
            )
    if t.map not in distill.TEACHER_MAPS:
        problems.append(f"teachers.map is {t.map!r}; expected one of {distill.TEACHER_MAPS}")
    lr = config.dfr.learning_rate
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        problems.append(f"dfr.learning_rate is {lr!r}; expected a finite number > 0")
    for key, epochs in (
        ("teachers.optimizer", t.epochs),
        ("train.optimizer", config.train.epochs),
        ("pretrain.optimizer", _fewest_pretrain_epochs(config)),
    ):
        epochs = epochs if isinstance(epochs, int) and epochs >= 1 else 0
        problems += optim.check_config(_get(config, key), key, epochs)
    deep = config.baselines.deep_ensemble
    if not isinstance(deep, bool):
        problems.append(f"baselines.deep_ensemble is {deep!r}; expected True or False")
    return problems + _archs_problems(config) + _pretrain_problems(config)


def _fewest_pretrain_epochs(config: ml_collections.ConfigDict) -> Any:
    """pretrain.epochs, or the fewest of pretrain.per_arch's epochs when fewer (and set): the
    pretraining optimizer's warm-up must fit in each."""
    epochs = config.pretrain.epochs
    if not isinstance(epochs, int):
        return epochs
    for own in config.pretrain.get("per_arch", {}).values():
        other = own.get("epochs", 0)
        if isinstance(other, int) and not isinstance(other, bool) and other >= 1:
            epochs = min(epochs, other)
    return epochs


def _pretrain_problems(config: ml_collections.ConfigDict) -> list[str]:
    """pretrain.enabled is a bool, and excludes ported starting weights (one way to start);
    pretrain.per_arch names architectures, each with epochs an integer >= 0 and
    zero_init_residual a bool."""
    problems = []
    per_arch = config.pretrain.get("per_arch", {})
    unknown = sorted(set(per_arch) - set(models.ARCHS))
    if unknown:
        problems.append(
            f"pretrain.per_arch has {unknown}; expected architectures among {models.ARCHS}"
        )
    for arch, own in per_arch.items():
        epochs, zero = own.get("epochs", 0), own.get("zero_init_residual", False)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            problems.append(
                f"pretrain.per_arch.{arch}.epochs is {epochs!r}; expected an integer >= 0 (0: "
                "pretrain.epochs)"
            )
        if not isinstance(zero, bool):
            problems.append(
                f"pretrain.per_arch.{arch}.zero_init_residual is {zero!r}; expected True or False"
            )
    enabled = config.pretrain.enabled
    if not isinstance(enabled, bool):
        return [*problems, f"pretrain.enabled is {enabled!r}; expected True or False"]
    if not enabled:
        return problems
    return problems + [
        f"pretrain.enabled is True and {key} is {_get(config, key)!r}; expected one way to "
        f"start: pretraining or ported weights (set {key}='' to start from the pretrain stage, "
        "or --config.pretrain.enabled=False to start from the ported weights)"
        for key in ("teachers.init_from", "student.init_from")
        if _get(config, key)
    ]


def _data_problems(config: ml_collections.ConfigDict) -> list[str]:
    import tensorflow_datasets as tfds

    from agre_jax.data import pipeline  # importing the package registers its builders

    problems = []
    if config.data.eval_transform not in pipeline.EVAL_TRANSFORMS:
        problems.append(
            f"data.eval_transform is {config.data.eval_transform!r}; expected one of "
            f"{pipeline.EVAL_TRANSFORMS}"
        )
    if config.pretrain.enabled is True:
        knobs = dict(config.pretrain.builder) or None
        try:
            pipeline._canonical_config(tfds.builder_cls("pretrain_shapes"), knobs)  # noqa: SLF001
        except (TypeError, ValueError) as e:
            problems.append(
                f"pretrain.builder is {knobs}, which does not configure pretrain_shapes ({e}); "
                "expected knobs of agre_jax/data/pretrain_shapes.py's PretrainShapesConfig"
            )
    try:
        builder_cls = tfds.builder_cls(config.data.name)
    except Exception:  # noqa: BLE001 -- tfds raises its own not-found types
        return problems + [
            f"data.name is {config.data.name!r}; expected one of {DATASETS} or another TFDS dataset"
        ]
    knobs = dict(config.data.builder) or None
    try:  # builds the builder config, which checks its knobs
        pipeline._canonical_config(builder_cls, knobs)  # noqa: SLF001
    except (TypeError, ValueError) as e:
        problems.append(
            f"data.builder is {knobs}, which does not configure {config.data.name} ({e}); "
            "expected the knobs of that dataset's builder config"
        )
    data_dir = config.data.data_dir
    if data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
        problems.append(f"data.data_dir is {data_dir!r}, a file; expected a directory")
    return problems + _device_augment_problems(config)


def _device_augment_problems(config: ml_collections.ConfigDict) -> list[str]:
    """data.device_augment is a bool, and True only where some network trains augmented."""
    value = config.data.device_augment
    if not isinstance(value, bool):
        return [f"data.device_augment is {value!r}; expected True or False"]
    augmented = (
        config.train.augment is True
        or (config.teachers.augment is True and not config.teachers.checkpoints)
        or (config.pretrain.enabled is True and config.pretrain.augment is True)
    )
    if value and not augmented:
        return [
            "data.device_augment is True, but no trained network uses augmentation "
            "(train.augment, teachers.augment of ERM-trained teachers, pretrain.augment of an "
            "enabled pretraining are all off); the device path only feeds augmented training: "
            "expected one of them True, or data.device_augment=False"
        ]
    return []


def validate(config: ml_collections.ConfigDict, before_join: bool = False) -> Layout | None:
    """Checks everything that needs neither data nor disk and builds the static objects.

    Args:
      before_join: check all but the device layout, which needs the devices of every
        process, and start no JAX backend: what main.py checks before the processes of a
        multi-process run join (`jax.distributed.initialize` must come before any backend).

    Returns:
      The device layout of the student's step (None with `before_join`).

    Raises:
      ConfigError: one message listing every problem found, each naming the key, its value
        and what is expected.
    """
    problems = _scalar_problems(config) + _data_problems(config)
    built = []
    for build in (
        # 'auto' checked as on the CPU: the models' shapes do not depend on the dtype, and
        # resolving it would start JAX's backend.
        lambda: DTYPES[dtype_name(config.dtype, backend="cpu")],
        lambda: distill_config(config),
        lambda: dfr_config(config),
        *(() if before_join else (lambda: layout(config),)),
    ):
        try:
            built.append(build())
        except ConfigError as e:
            problems.append(str(e))
    if len(built) == 4:  # the ERM stages' batches split as the student's (train.pmap's mode)
        for key in erm_batch_keys(config):
            try:
                layout(config, batch_key=key)
            except ConfigError as e:
                problems.append(str(e))
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    compute_dtype, dcfg = built[:2]
    run_layout = None if before_join else built[3]
    # The models and adapters, with a placeholder class count (checked against the data later).
    student = model(config.student, 2, compute_dtype)
    # A ported biased.checkpoint is checked once its files are read.
    biased = trained_biased_model(config, 2, compute_dtype) if config.biased.arch else None
    if not config.teachers.checkpoints:  # ported teachers are checked once their files are read
        check_models(student, teacher_models(config, 2, compute_dtype), dcfg, biased)
    return run_layout


def erm_batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The batch keys of the ERM stages this config trains: 'teachers.batch_size' (the
    teachers unless ported, a trained biased model, the Deep Ensemble) and
    'pretrain.batch_size' when pretraining is on."""
    trains = (
        not config.teachers.checkpoints
        or bool(config.biased.arch)
        or bool(config.baselines.deep_ensemble)
    )
    return (("teachers.batch_size",) if trains else ()) + (
        ("pretrain.batch_size",) if config.pretrain.enabled else ()
    )


def teacher_models(
    config: ml_collections.ConfigDict, num_classes: int, compute_dtype: Any
) -> tuple[Any, ...]:
    """One ResNet per trained teacher group (teacher_groups), teachers.width and stem."""
    t = config.teachers
    return tuple(
        models.create(
            arch, num_classes, width=t.width, small_input=t.small_input, dtype=compute_dtype
        )
        for arch, _ in teacher_groups(config)
    )


def check_models(
    student: Any, teachers: Sequence[Any], dcfg: distill.DistillConfig, biased: Any = None
) -> None:
    """The student, adapters, teacher groups (one model each) and (when separate) biased
    model fit together for the configured feature layers; raises ConfigError."""
    c = teachers[0].num_classes
    ensemble = distill.Ensemble(
        teachers=tuple(t.clone(num_classes=c) for t in teachers),
        group_sizes=(1,) * len(teachers),
        biased=None if biased is None else biased.clone(num_classes=c),
        biased_backbone=(0, 0) if biased is None else None,
    )
    try:
        distill.create_models(student.clone(num_classes=c), ensemble, dcfg)
    except ValueError as e:
        which = (
            "student, teachers and biased model" if biased is not None else "student and teachers"
        )
        raise ConfigError(f"{which} do not fit together: {e}") from e


def check_splits(config: ml_collections.ConfigDict, sizes: Mapping[str, int]) -> None:
    """The dataset's split sizes against the batch sizes; raises ConfigError.

    Args:
      sizes: examples per split ('train', 'validation', 'test').
    """
    problems = []
    name = config.data.name
    for key in ("train.batch_size", "teachers.batch_size"):
        if key == "teachers.batch_size" and config.teachers.checkpoints:
            continue
        batch = _get(config, key)
        if sizes["train"] < batch:
            problems.append(
                f"{key} is {batch} but the training split of {name} has {sizes['train']} "
                "examples; expected a batch no larger than the split"
            )
    if sizes["validation"] < 2:
        problems.append(
            f"the validation split of {name} has {sizes['validation']} examples; DFR and model "
            "selection need at least 2"
        )
    if sizes["test"] < 1:
        problems.append(f"the test split of {name} is empty")
    if problems:
        raise ConfigError("the dataset does not fit the config: " + "; ".join(problems))
