"""DFR last-layer retraining and the group-robust metrics."""

import numpy as np
import pytest

from agre_jax import dfr, evaluation


def spurious_features(n, aligned, seed):
    """2 classes x 2 attributes. Feature 0: the attribute (strong, clean), feature 1: the class
    (weaker, noisy), plus noise dimensions. `aligned` of the examples have attribute == class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = np.where(rng.random(n) < aligned, y, 1 - y)
    x = (
        np.concatenate(
            [
                3.0 * (2 * a[:, None] - 1) + 0.1 * rng.normal(size=(n, 1)),
                1.0 * (2 * y[:, None] - 1) + 0.5 * rng.normal(size=(n, 1)),
                rng.normal(size=(n, 6)),
            ],
            axis=1,
        ).astype(np.float32)
        + 5.0
    )
    return x, y, 2 * y + a


def test_summarize_conventions():
    pred = np.array([0, 0, 1, 1, 1, 0])
    label = np.array([0, 0, 1, 1, 0, 0])
    group = np.array([0, 0, 3, 3, 1, 1])
    s = evaluation.summarize(pred, label, group, 4, train_group_counts=[90, 5, 1, 4])
    assert s["group_acc"][0] == 1.0 and s["group_acc"][1] == 0.5 and s["group_acc"][3] == 1.0
    assert np.isnan(s["group_acc"][2]) and s["group_count"] == [2, 2, 0, 2]
    assert s["wga"] == 0.5 and s["worst_group"] == 1
    assert s["avg_acc"] == pytest.approx(5 / 6)
    # Weighted by training proportions over the groups present: (90 + 0.5 * 5 + 4) / 99.
    assert s["avg_acc_weighted"] == pytest.approx((90 + 2.5 + 4) / 99)
    assert s["gap"] == pytest.approx(s["avg_acc_weighted"] - 0.5)
    assert s["n"] == 6


def test_ensemble_predictions():
    logits = np.array(
        [[[2.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]], [[0.0, 0.5], [3.0, 0.0]]]
    )
    out = evaluation.ensemble_predictions(logits)
    np.testing.assert_array_equal(out["majority"], [1, 1])
    np.testing.assert_array_equal(out["avg_logits"], [0, 0])


def test_collect_logits_masks_padding_and_keeps_model_axis():
    batches = [
        {
            "image": np.ones((4, 1)),
            "mask": np.array([1, 1, 1, 1]),
            "label": np.arange(4),
            "group": np.arange(4),
        },
        {
            "image": np.ones((4, 1)),
            "mask": np.array([1, 0, 0, 0]),
            "label": np.arange(4),
            "group": np.arange(4),
        },
    ]
    out = evaluation.collect(lambda x: np.zeros((3, x.shape[0], 2)), batches)
    assert out["output"].shape == (3, 5, 2)
    np.testing.assert_array_equal(out["label"], [0, 1, 2, 3, 0])


def test_dfr_repairs_a_spurious_last_layer():
    x, y, g = spurious_features(600, aligned=0.5, seed=0)  # a balanced validation set
    train, select = dfr.split_halves(len(y), seed=0)
    head, info = dfr.fit(
        x[train],
        y[train],
        g[train],
        x[select],
        y[select],
        g[select],
        num_classes=2,
        num_groups=4,
        cfg=dfr.DFRConfig(steps=300, batch_size=64),
    )
    xt, yt, gt = spurious_features(2000, aligned=0.5, seed=1)
    pred = np.argmax(xt @ head["kernel"] + head["bias"], -1)
    s = evaluation.summarize(pred, yt, gt, 4, [1, 1, 1, 1])
    assert s["wga"] > 0.85, s
    assert info["c"] in dfr.DEFAULT_C_GRID and set(info["select_wga"]) == {
        str(c) for c in dfr.DEFAULT_C_GRID
    }
    # An ERM-like head that reads the attribute fails on the minority groups.
    erm_pred = (xt[:, 0] > 5.0).astype(int)
    assert evaluation.summarize(erm_pred, yt, gt, 4, [1, 1, 1, 1])["wga"] < 0.1


def test_dfr_config_validation_and_halves():
    with pytest.raises(ValueError, match="c_grid"):
        dfr.DFRConfig(c_grid=(0.0,))
    a, b = dfr.split_halves(11, seed=3)
    assert len(a) == 5 and len(b) == 6 and not set(a) & set(b)
    np.testing.assert_array_equal(dfr.split_halves(11, seed=3)[0], a)


def test_selection_breaks_wga_ties_by_the_average():
    """Higher WGA wins; equal WGA (in float32, as the carries store it) goes to the higher
    average; equal both keeps the earlier checkpoint. Elementwise over stacked teachers."""
    better = evaluation.improves
    assert bool(better(0.5, 0.1, 0.4, 0.9))
    assert not bool(better(0.4, 0.99, 0.5, 0.1))
    assert bool(better(0.0, 0.3, 0.0, 0.2))  # a WGA stuck at 0 still selects
    assert not bool(better(0.0, 0.2, 0.0, 0.2))
    # 0.6 from a Python float equals the float32 0.6 a carry holds: a tie, not a loss
    assert bool(better(0.6, 0.8, np.float32(0.6), np.float32(0.7)))
    np.testing.assert_array_equal(
        better(np.array([0.5, 0.5, 0.5]), np.array([0.7, 0.6, 0.9]), 0.5, 0.7),
        [False, False, True],
    )
