"""The pretraining stage (issue 12): the balanced `pretrain_shapes` task, a stage keyed on
content and reused, its backbone grafted onto teachers and student with fresh heads, and the
config error when pretraining and ported init_from weights are both asked for."""

import dataclasses

import jax
import numpy as np
import pytest

from agre_jax import errors, models, settings, stages, train
from agre_jax.data import pretrain_shapes
from configs import tiny


def pretrain_config(tmp_path):
    """tiny with pretraining on: 48 training examples at 16 px, one epoch."""
    config = tiny.get_config()
    config.data.data_dir = str(tmp_path / "tfds")
    config.pretrain.enabled = True
    config.pretrain.builder.update(dict(size=1, eval_size=1, side=16))
    config.pretrain.epochs = 1
    config.pretrain.batch_size = 16
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The pretrain stage of the tiny config, computed once: (config, pdata, stage_dir, out)."""
    tmp = tmp_path_factory.mktemp("pretrain")
    config = pretrain_config(tmp)
    pdata = stages.load_pretrain_data(config)
    stage_dir = tmp / "stages"
    out = stages.pretrain_stage(config, pdata, stage_dir, stages.pretrain_keys(config, pdata))
    return config, pdata, stage_dir, out


def test_pretrain_shapes_is_balanced_and_deterministic():
    config = pretrain_shapes.PretrainShapesConfig(size=2, eval_size=1, side=16)
    a = pretrain_shapes.split_arrays(config, "train")
    num_groups = len(pretrain_shapes.CLASS_NAMES) * len(pretrain_shapes.TEXTURE_NAMES)
    assert np.bincount(a["group"], minlength=num_groups).tolist() == [2] * num_groups
    assert np.array_equal(a["group"], 4 * a["label"] + a["place"])
    assert a["image"].shape == (2 * num_groups, 16, 16, 3)
    again = pretrain_shapes.split_arrays(config, "train")
    assert np.array_equal(again["image"], a["image"])
    other = pretrain_shapes.split_arrays(dataclasses.replace(config, name="", seed=1), "train")
    assert not np.array_equal(other["image"], a["image"])
    # Every shape is drawn: its coverage is mostly inside the image and not empty.
    labels = np.arange(len(pretrain_shapes.CLASS_NAMES))
    cover = pretrain_shapes._shape_coverage(np.random.default_rng(0), labels, 32, (0.3, 0.3))
    assert np.all(cover.sum(axis=(1, 2)) > 20)


def test_stage_is_keyed_on_content_and_reused(trained, capsys):
    config, pdata, stage_dir, first = trained
    keys = stages.pretrain_keys(config, pdata)
    assert keys["teachers"] == keys["student"]  # same architecture: one network
    assert first.backbones["teachers"] is first.backbones["student"]
    assert not first.record.reused and first.record.seconds > 0
    assert first.members["student"]["num_classes"] == len(pretrain_shapes.CLASS_NAMES)
    assert 0 <= first.members["student"]["val_acc"] <= 1
    # A rerun reuses the stage and reports the time it took.
    again = stages.pretrain_stage(config, pdata, stage_dir, keys)
    assert "[pretrain] reusing" in capsys.readouterr().out
    assert again.record.reused and again.record.seconds == first.record.seconds
    assert again.backbones["student"].digest == first.backbones["student"].digest
    # Any pretraining knob or the data's content changes the key; the switch does not.
    for key, value in (
        ("builder.size", 2),
        ("epochs", 2),
        ("optimizer.learning_rate", 0.01),
        ("seed", 1),
    ):
        changed = pretrain_config(stage_dir)
        *path, last = key.split(".")
        target = changed.pretrain
        for p in path:
            target = target[p]
        target[last] = value
        assert stages.pretrain_keys(changed, pdata)["student"] != keys["student"], key
    other_data = dataclasses.replace(pdata, fingerprint="0" * 16)
    assert stages.pretrain_keys(config, other_data)["student"] != keys["student"]
    wider = pretrain_config(stage_dir)
    wider.student.width = 8  # another architecture: its own network
    split = stages.pretrain_keys(wider, pdata)
    assert split["teachers"] == keys["teachers"] and split["student"] != keys["student"]


def test_downstream_keys_follow_the_pretrained_network(trained):
    config, pdata, _, _ = trained
    data = stages.load_data(config)
    keys = stages.pretrain_keys(config, pdata)
    with_pretrain = stages.stage_keys(config, data, pretrained=keys)
    without = stages.stage_keys(config, data)
    other = stages.stage_keys(config, data, pretrained={k: "other" for k in keys})
    assert len({with_pretrain.teachers, without.teachers, other.teachers}) == 3
    assert len({with_pretrain.inputs, without.inputs, other.inputs}) == 3
    # Teachers of two architectures: one pretrained network per architecture, shared with
    # the student's where it is the same; each group's stage key follows its own network.
    mixed = config.copy_and_resolve_references()
    mixed.teachers.archs = ("resnet18", "resnet34")
    roles = stages.pretrain_keys(mixed, pdata)
    assert set(roles) == {"teachers:resnet18", "teachers:resnet34", "student"}
    assert roles["teachers:resnet18"] == roles["student"] == keys["teachers"]
    assert roles["teachers:resnet34"] != keys["teachers"]
    groups = stages.stage_keys(mixed, data, pretrained=roles).groups
    moved = stages.stage_keys(mixed, data, pretrained={**roles, "teachers:resnet34": "x"}).groups
    assert groups[0] == moved[0] and groups[1] != moved[1]
    mixed.teachers.archs = ("resnet34", "resnet34")  # one architecture: it, not teachers.arch
    assert stages.pretrain_roles(mixed)["teachers"]["arch"] == "resnet34"


def test_per_arch_recipe_is_keyed_into_its_architecture_only(trained):
    """pretrain.per_arch.<arch> applies to (and is keyed into) that architecture's network
    only, and with its neutral values (or without the section, as configs had it before) a
    network's key is what it was."""
    config, pdata, _, _ = trained
    config = config.copy_and_resolve_references()
    config.teachers.arch = "resnet50"
    config.pretrain.per_arch.resnet50.epochs = 0
    config.pretrain.per_arch.resnet50.zero_init_residual = False
    neutral = stages.pretrain_keys(config, pdata)
    plain = {"epochs": config.pretrain.epochs, "zero_init_residual": False}
    assert stages.pretrain_recipe(config, "resnet50") == plain
    config.pretrain.per_arch.resnet50.epochs = 3
    config.pretrain.per_arch.resnet50.zero_init_residual = True
    assert stages.pretrain_recipe(config, "resnet50") == {"epochs": 3, "zero_init_residual": True}
    assert stages.pretrain_recipe(config, "resnet34") == plain
    keys = stages.pretrain_keys(config, pdata)
    assert keys["student"] == neutral["student"]  # the ResNet-18's
    assert keys["teachers"] != neutral["teachers"]
    config.pretrain.per_arch.resnet50.zero_init_residual = False
    assert stages.pretrain_keys(config, pdata)["teachers"] not in {
        keys["teachers"],
        neutral["teachers"],
    }
    config.pretrain.per_arch.resnet18.epochs = 2  # the student's network alone moves
    moved = stages.pretrain_keys(config, pdata)
    assert moved["student"] != neutral["student"] and moved["teachers"] != neutral["teachers"]
    with config.unlocked():
        del config.pretrain["per_arch"]
    assert stages.pretrain_keys(config, pdata) == neutral


def test_graft_keeps_the_backbone_and_starts_fresh_heads(trained):
    config, pdata, _, out = trained
    loaded = out.backbones["student"]
    rng = jax.random.key(3)
    for num_classes in (2, len(pretrain_shapes.CLASS_NAMES)):  # even with the task's classes
        model = settings.model(config.student, num_classes, pdata.dtype)
        fresh = models.init(model, rng, pdata.image_size)
        for grafted in (
            stages.init_variables(
                loaded, model, rng, pdata.image_size, "pretrain", fresh_head=True
            ),
            stages._graft(fresh, loaded.variables, loaded.path),  # the teachers' path
        ):
            flat = jax.tree_util.tree_flatten_with_path(grafted)[0]
            assert flat
            for path, leaf in flat:
                names = [p.key for p in path]
                expected = fresh if names[1] == "fc" else loaded.variables
                for n in names:
                    expected = expected[n]
                np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected), str(names))


@pytest.mark.parametrize("key", ["teachers.init_from", "student.init_from"])
def test_pretrain_with_init_from_is_a_config_error(tmp_path, key):
    config = pretrain_config(tmp_path)
    section, name = key.split(".")
    config[section][name] = str(tmp_path / "ported")
    with pytest.raises(errors.ConfigError, match=f"pretrain.enabled is True and {key}"):
        settings.validate(config)
    with pytest.raises(errors.ConfigError, match="one way to start"):
        train.train_and_evaluate(config, tmp_path / "work")
    assert not (tmp_path / "work").exists()  # before any work
