"""Config validation (agre_jax/settings.py): defaults declared once, every problem named, the
optimisers built from their config blocks."""

import dataclasses
import importlib
import math
from pathlib import Path

import pytest

from agre_jax import dfr, distill, errors, optim, settings
from configs import default, multilayer_c, tiny


def test_dataclass_defaults_agree_with_the_config():
    """configs/default.py declares every default once: the math layer's dataclasses, built
    from their blocks by field name, equal their own defaults (the paper's preset: the
    synthetic one shrinks counts on purpose)."""
    config = default.get_config("waterbirds")
    built = settings.distill_config(config)
    assert built == distill.DistillConfig()
    fields = {f.name for f in dataclasses.fields(distill.DistillConfig)}
    assert set(config.distill.keys()) == fields - {"teacher_map"}
    assert settings.dfr_config(config) == dfr.DFRConfig(seed=config.teachers.seed)
    assert set(config.dfr.keys()) == {f.name for f in dataclasses.fields(dfr.DFRConfig)} - {"seed"}


@pytest.mark.parametrize("preset", ["synthetic", "waterbirds", "celeba", "cmnist"])
def test_presets_validate(preset):
    layout = settings.validate(default.get_config(preset))
    assert layout.devices * layout.per_device_batch == default.get_config(preset).train.batch_size


def test_cmnist_preset_aligned_ratio_is_a_builder_knob():
    config = multilayer_c.get_config("cmnist")
    assert config.data.name == "colored_mnist"
    assert dict(config.data.builder) == {"source": "embedded", "aligned_ratio": 0.995}
    for ratio in (0.99, 0.98, 0.95):  # --config.data.builder.aligned_ratio=...
        config.data.builder.aligned_ratio = ratio
        settings.validate(config)
    config.data.builder.aligned_ratio = 1.5
    with pytest.raises(errors.ConfigError, match="aligned_ratio 1.5"):
        settings.validate(config)
    config.data.builder.aligned_ratio = 0.995
    config.data.builder.source = "mnist"
    with pytest.raises(errors.ConfigError, match="source 'mnist'"):
        settings.validate(config)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.optimizer.learning_rate", float("nan"), "train.optimizer.learning_rate is nan"),
        ("train.optimizer.learning_rate", -1.0, "expected a finite number > 0"),
        ("teachers.optimizer.name", "adam", "teachers.optimizer.name is 'adam'"),
        ("train.optimizer.momentum", 1.0, "train.optimizer.momentum"),
        ("train.optimizer.warmup_epochs", 50, "train.optimizer.warmup_epochs"),
        ("train.eval_every", 0, "train.eval_every is 0"),
        ("dfr.c_grid", (), "c_grid"),
        ("dfr.learning_rate", math.inf, "dfr.learning_rate is inf"),
        ("dtype", "float16", "dtype is 'float16'"),
        ("train.pmap", "sometimes", "train.pmap is 'sometimes'"),
        ("pretrain.per_arch.resnet34.epochs", -1, "pretrain.per_arch.resnet34.epochs is -1"),
        ("pretrain.per_arch.resnet50.zero_init_residual", None, "zero_init_residual is None"),
    ],
)
def test_validate_names_key_value_and_expectation(key, value, message):
    config = tiny.get_config()
    with config.unlocked():
        section, *rest = key.split(".")
        target = config
        for part in key.split(".")[:-1]:
            target = target[part]
        target[key.split(".")[-1]] = value
    with pytest.raises(errors.ConfigError, match="invalid config") as e:
        settings.validate(config)
    assert message in str(e.value)


def test_validate_lists_every_problem_at_once():
    config = tiny.get_config()
    config.train.eval_every = 0
    config.distill.alpha = 2.0
    with pytest.raises(errors.ConfigError) as e:
        settings.validate(config)
    assert "train.eval_every" in str(e.value) and "alpha must be in" in str(e.value)


def test_layout_needs_a_batch_divisible_by_the_devices():
    config = tiny.get_config()
    config.train.pmap = "always"
    config.train.batch_size = 18
    with pytest.raises(errors.ConfigError, match="does not divide over the 4 devices"):
        settings.layout(config, devices=4)
    config.train.batch_size = 16
    assert settings.layout(config, devices=4) == settings.Layout(4, True, 4)
    config.train.pmap = "never"
    assert settings.layout(config, devices=4) == settings.Layout(1, False, 16)


def test_layout_over_several_processes():
    config = tiny.get_config()
    config.train.batch_size = 16
    # 2 processes x 2 local devices: pmap over the local ones, the batch over all 4.
    assert settings.layout(config, devices=2, processes=2) == settings.Layout(2, True, 4)
    # one device per process still runs under pmap (its collectives span the processes)
    assert settings.layout(config, devices=1, processes=2) == settings.Layout(1, True, 8)
    config.train.batch_size = 12
    with pytest.raises(errors.ConfigError, match="the 2 devices x 4 processes") as e:
        settings.layout(config, devices=2, processes=4)
    assert "never" not in str(e.value)  # refused with several processes: not suggested
    with pytest.raises(errors.ConfigError, match=r"device count, or train.pmap='never'$"):
        settings.layout(config, devices=8, processes=1)
    config.train.batch_size = 16
    config.train.pmap = "never"
    with pytest.raises(errors.ConfigError, match="has 2 processes"):
        settings.layout(config, devices=2, processes=2)


def test_split_sizes_against_batches():
    config = tiny.get_config()
    with pytest.raises(errors.ConfigError, match="train.batch_size is 16 but the training split"):
        settings.check_splits(config, {"train": 10, "validation": 10, "test": 10})
    settings.check_splits(config, {"train": 32, "validation": 10, "test": 10})


def test_optimizer_from_config_block():
    block = default.get_config().train.optimizer
    assert optim.check_config(block, "train.optimizer", 30) == []
    tx = optim.from_config(block, epochs=2, steps_per_epoch=5)
    assert tx.init({"w": 0.0}) is not None


def test_aekd_cap_must_admit_weights_summing_to_one():
    config = tiny.get_config()  # 2 teachers
    config.distill.weighting = "aekd"
    config.distill.aekd_cap = 0.4
    with pytest.raises(errors.ConfigError, match=r"aekd_cap is 0.4; AE-KD needs cap \* teachers"):
        settings.validate(config)
    config.distill.aekd_cap = 1.5
    with pytest.raises(errors.ConfigError, match=r"aekd_cap must be in \(0, 1\]"):
        settings.validate(config)
    config.distill.aekd_cap = 0.5
    settings.validate(config)


CONFIGS = sorted(p.stem for p in Path(default.__file__).parent.glob("[a-z]*.py"))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("preset", default.DATASETS)
def test_every_named_config_validates_on_every_preset(name, preset):
    config = importlib.import_module(f"configs.{name}").get_config(preset)
    settings.validate(config)


def test_onehot_and_self_distill_configs():
    assert importlib.import_module("configs.onehot").get_config().distill.alpha == 0.0
    for preset in default.DATASETS:
        c = importlib.import_module("configs.self_distill").get_config(preset)
        assert (c.student.arch, c.student.width, c.student.small_input) == (
            c.teachers.arch,
            c.teachers.width,
            c.teachers.small_input,
        )


@pytest.mark.parametrize(
    "archs, extra, message",
    [
        (("resnet18", "resnet99"), {}, "teachers.archs has ['resnet99']"),
        (("resnet18",), {}, "1 entries but teachers.num gives 2"),
        (("resnet18", "resnet34", "resnet18"), {"num": 3}, "listed together"),
        (("resnet18", "resnet34"), {"init_from": "/ported/r18"}, "one starting checkpoint"),
    ],
)
def test_teacher_archs_are_checked(archs, extra, message):
    config = tiny.get_config()
    config.teachers.archs = archs
    config.teachers.update(extra)
    with pytest.raises(errors.ConfigError, match="invalid config") as e:
        settings.validate(config)
    assert message in str(e.value)


def test_teacher_groups():
    config = tiny.get_config()
    assert settings.teacher_groups(config) == (("resnet18", 2),)
    config.teachers.num = 3
    config.teachers.archs = ("resnet50", "resnet50", "resnet18")
    assert settings.teacher_groups(config) == (("resnet50", 2), ("resnet18", 1))
    settings.validate(config)  # tiny's features (layer3, pooled): adapters per group
    assert [m.num_classes for m in settings.teacher_models(config, 3, "float32")] == [3, 3]
    ported = tiny.get_config()  # ported: grouped by architecture, width and stem once read
    ported.teachers.checkpoints = ("/r18_w4", "/r50", "/r18_w8")
    ported.teachers.archs = ("resnet18", "resnet50", "resnet18")
    settings.validate(ported)
    config.distill.feature_weighting = "agre"  # one set of adapters: not across two widths
    with pytest.raises(errors.ConfigError, match="student and teachers do not fit together"):
        settings.validate(config)
