"""ERM teacher training data-parallel (teachers.train_erm(pmap=True)): an epoch over the 4 fake
CPU devices (conftest.py) against the same epoch on one device, on the same global batches.

Gradients and BatchNorm statistics are means over the global batch in both, so the stacked
teachers' parameters and running statistics differ by float summation order only: measured
2.4e-7 at most (parameters and BatchNorm statistics, 2 teachers, 2 steps of 16 examples).
"""

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from agre_jax import models, stages, teachers
from agre_jax.data import pipeline
from configs import tiny

SIDE, GROUPS = 8, 4


def _split(n: int, seed: int) -> pipeline.SplitData:
    """n random 8 x 8 images whose label is readable from their mean colour."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n).astype(np.int32)
    place = rng.integers(0, 2, n).astype(np.int32)
    images = rng.integers(0, 128, (n, SIDE, SIDE, 3)) + 100 * label[:, None, None, None]
    return pipeline.SplitData(
        images=tf.constant(images.astype(np.uint8)), label=label, place=place,
        group=(2 * label + place).astype(np.int32), ids=np.array([str(i) for i in range(n)]),
        num_groups=GROUPS, encoding=None,
    )  # fmt: skip


def _dataset() -> stages.Dataset:
    splits = {"train": _split(32, 0), "validation": _split(16, 1), "test": _split(16, 2)}
    return stages.Dataset(
        name="random", splits=splits, num_classes=2, num_groups=GROUPS,
        group_names=tuple(str(g) for g in range(GROUPS)),
        train_counts=tuple(int(c) for c in splits["train"].group_counts()),
        image_size=SIDE, eval_batch_size=16, eval_transform="resize_crop", dtype=np.float32,
        fingerprint="random",
    )  # fmt: skip


def test_pmapped_epoch_equals_one_device(tmp_path, capsys):
    assert jax.local_device_count() == 4
    data = _dataset()
    model = models.ResNet(
        stage_sizes=(1, 1, 1, 1), block_cls=models.BasicBlock, num_classes=2, width=4,
        small_input=True,
    )  # fmt: skip
    cfg = ml_collections.ConfigDict(
        dict(
            num=2, seed=3, epochs=1, batch_size=16, augment=False, map="vmap",
            optimizer={**tiny.get_config().teachers.optimizer, "learning_rate": 0.1},
        )
    )  # fmt: skip
    kw = dict(cfg=cfg, model=model, data=data, init=None, progress=False)
    one = teachers.train_erm(directory=tmp_path / "one", **kw)
    four = teachers.train_erm(directory=tmp_path / "four", pmap=True, **kw)
    assert "[teachers] pmap over 4 devices, 4 examples each" in capsys.readouterr().out
    fresh = models.init(model, jax.random.key(cfg.seed), SIDE)
    for a, b in zip(one, four, strict=True):
        assert (a["val_wga"], a["epoch"]) == (b["val_wga"], b["epoch"])
        for key in ("params", "batch_stats"):
            diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a[key], b[key])
            assert max(jax.tree.leaves(diffs)) < 1e-5, diffs
    # The steps changed the weights and statistics (what was compared is not the start).
    moved = jax.tree.map(
        lambda x, y: float(np.max(np.abs(x - y))), one[0]["params"], fresh["params"]
    )
    assert min(jax.tree.leaves(moved)) > 1e-3
    stats = jax.tree.map(
        lambda x, y: float(np.max(np.abs(x - y))), one[0]["batch_stats"], fresh["batch_stats"]
    )
    assert min(jax.tree.leaves(stats)) > 1e-3


def test_erm_batches_must_split_over_the_devices():
    """The ERM stages follow train.pmap's layout with their own batch sizes: a batch that does
    not divide over the devices is a config error naming it, before any training."""
    from agre_jax import errors, settings

    config = tiny.get_config()
    config.train.pmap = "always"
    config.teachers.batch_size = 18
    config.pretrain.enabled = True
    config.pretrain.batch_size = 10
    with pytest.raises(errors.ConfigError) as e:
        settings.validate(config)
    assert "teachers.batch_size is 18, which does not divide over the 4 devices" in str(e.value)
    assert "pretrain.batch_size is 10" in str(e.value)
    assert settings.layout(config, batch_key="teachers.batch_size", devices=2).pmap
    config.train.pmap = "never"  # one device: any batch
    config.pretrain.enabled = False
    settings.validate(config)
    # Ported teachers train nothing (unless a Deep Ensemble or a biased model is trained).
    config.train.pmap = "always"
    config.teachers.checkpoints = ("/somewhere",)
    assert settings.erm_batch_keys(config) == ()
    config.baselines.deep_ensemble = True
    assert settings.erm_batch_keys(config) == ("teachers.batch_size",)
