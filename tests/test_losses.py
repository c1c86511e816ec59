"""Losses against PyTorch computations of the same quantities on the same arrays."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agre_jax import losses


def _rand(seed, shape, scale=3.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


@pytest.mark.parametrize("tau", [1.0, 4.0, 10.0])
@pytest.mark.parametrize("classes", [2, 10])
def test_kd_loss_matches_torch_batchmean(tau, classes):
    zs, zt = _rand(0, (16, classes)), _rand(1, (16, classes))
    ours = jnp.mean(losses.kd_loss(jnp.asarray(zs), jnp.asarray(zt), tau))
    ref = (
        F.kl_div(
            F.log_softmax(torch.from_numpy(zs) / tau, -1),
            F.softmax(torch.from_numpy(zt) / tau, -1),
            reduction="batchmean",
        )
        * tau**2
    )
    np.testing.assert_allclose(float(ours), ref.item(), rtol=1e-5, atol=1e-6)


def test_kd_loss_broadcasts_over_teachers():
    zs, zt = _rand(0, (5, 3)), _rand(1, (4, 5, 3))
    per = losses.kd_loss(jnp.asarray(zs), jnp.asarray(zt), 4.0)
    chex.assert_shape(per, (4, 5))
    for m in range(4):
        np.testing.assert_allclose(per[m], losses.kd_loss(zs, zt[m], 4.0), rtol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_logit_grad_is_the_gradient(tau):
    zs, zt = _rand(2, (6, 10)), _rand(3, (6, 10))
    closed = losses.kd_logit_grad(jnp.asarray(zs), jnp.asarray(zt), tau)
    ts = torch.from_numpy(zs).requires_grad_()
    per_sample = (
        F.kl_div(
            F.log_softmax(ts / tau, -1),
            F.softmax(torch.from_numpy(zt) / tau, -1),
            reduction="none",
        ).sum(-1)
        * tau**2
    )
    per_sample.sum().backward()
    np.testing.assert_allclose(closed, ts.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_cross_entropy_matches_torch():
    z = _rand(4, (12, 7))
    y = np.random.default_rng(5).integers(0, 7, 12)
    ours = losses.cross_entropy(jnp.asarray(z), jnp.asarray(y))
    ref = F.cross_entropy(torch.from_numpy(z), torch.from_numpy(y), reduction="none")
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-6)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def test_feature_mse_matches_torch_with_pooling():
    s = {
        "layer2": _rand(6, (3, 8, 8, 5)),
        "layer3": _rand(7, (3, 4, 4, 6)),
        "pooled": _rand(8, (3, 9)),
    }
    t = {
        "layer2": _rand(9, (3, 4, 4, 5)),
        "layer3": _rand(10, (3, 4, 4, 6)),
        "pooled": _rand(11, (3, 9)),
    }
    gammas = {"layer2": 0.05, "layer3": 0.1, "pooled": 0.5, "layer4": 0.0}
    total, per_layer = losses.feature_loss(s, t, gammas)
    assert set(per_layer) == {"layer2", "layer3", "pooled"}
    ref = {
        "layer2": F.mse_loss(F.adaptive_avg_pool2d(_nchw(s["layer2"]), (4, 4)), _nchw(t["layer2"])),
        "layer3": F.mse_loss(_nchw(s["layer3"]), _nchw(t["layer3"])),
        "pooled": F.mse_loss(torch.from_numpy(s["pooled"]), torch.from_numpy(t["pooled"])),
    }
    for k, v in ref.items():
        np.testing.assert_allclose(float(per_layer[k]), v.item(), rtol=1e-5)
    expected = sum(gammas[k] * v.item() for k, v in ref.items())
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)


def test_attention_transfer_matches_torch():
    s, t = _rand(12, (4, 8, 8, 3)), _rand(13, (4, 4, 4, 7))
    total, per_layer = losses.feature_loss(
        {"layer1": s}, {"layer1": t}, {"layer1": 2.0}, kind="attention"
    )

    def at(x):  # Zagoruyko & Komodakis' reference implementation, NCHW
        return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))

    ref = (at(F.adaptive_avg_pool2d(_nchw(s), (4, 4))) - at(_nchw(t))).pow(2).mean()
    np.testing.assert_allclose(float(per_layer["layer1"]), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(float(total), 2.0 * ref.item(), rtol=1e-5)
    with pytest.raises(ValueError, match="spatial"):
        losses.feature_loss(
            {"pooled": s[:, 0, 0]}, {"pooled": t[:, 0, 0]}, {"pooled": 1.0}, kind="attention"
        )


def test_feature_dropout_masks_channels_on_both_sides():
    s, t = _rand(14, (2, 4, 4, 8)), _rand(15, (2, 4, 4, 8))
    rng = jax.random.key(0)
    total, per_layer = losses.feature_loss(
        {"layer2": s}, {"layer2": t}, {"layer2": 1.0}, dropout_rate=0.5, rng=rng
    )
    mask = np.asarray(losses._channel_mask(jax.random.fold_in(rng, 0), s.shape, 0.5))
    assert 0 < mask.sum() < mask.size  # some channels dropped, some kept
    d = np.broadcast_to(mask, s.shape) * (s - t) ** 2
    per_sample = d.sum(axis=(1, 2, 3)) / np.broadcast_to(mask, s.shape).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(float(per_layer["layer2"]), per_sample.mean(), rtol=1e-5)
    again, _ = losses.feature_loss(
        {"layer2": s}, {"layer2": t}, {"layer2": 1.0}, dropout_rate=0.5, rng=rng
    )
    assert float(again) == float(total)  # deterministic given the key
    plain, _ = losses.feature_loss({"layer2": s}, {"layer2": t}, {"layer2": 1.0})
    assert float(plain) != float(total)
    with pytest.raises(ValueError, match="rng"):
        losses.feature_loss({"layer2": s}, {"layer2": t}, {"layer2": 1.0}, dropout_rate=0.5)


def test_feature_loss_sample_weight_and_errors():
    s, t = _rand(16, (4, 6)), _rand(17, (4, 6))
    w = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
    total, _ = losses.feature_loss(
        {"pooled": s}, {"pooled": t}, {"pooled": 1.0}, sample_weight=jnp.asarray(w)
    )
    expected = (((s - t) ** 2).mean(-1) * w).sum() / 4
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="integer multiple"):
        losses.pool_to(jnp.zeros((1, 6, 6, 2)), (4, 4))
    for kind in ("cosine", "crd"):  # CRD's loss is crd_loss, on embeddings
        with pytest.raises(ValueError, match="unknown feature loss"):
            losses.feature_loss({}, {}, {}, kind=kind)


def _torch_crd(s, t, tau, keep=None):
    """CRD's two InfoNCE directions with in-batch negatives, on the kept rows only."""
    if keep is not None:
        s, t = s[keep], t[keep]
    zs, zt = F.normalize(s, dim=1), F.normalize(t, dim=1)
    logits = zs @ zt.T / tau
    target = torch.arange(len(zs))
    return F.cross_entropy(logits, target, reduction="sum") + F.cross_entropy(
        logits.T, target, reduction="sum"
    )


@pytest.mark.parametrize("drop", [False, True])
def test_crd_loss_matches_torch(drop):
    """Values and gradients; dropped rows (weight 0) are neither anchors nor negatives."""
    s, t, tau = _rand(0, (7, 5)), _rand(1, (7, 5)), 0.1
    w = np.ones(7, np.float32)
    if drop:
        w[[1, 4]] = 0
    ts, tt = torch.tensor(s, requires_grad=True), torch.tensor(t, requires_grad=True)
    ref = _torch_crd(ts, tt, tau, torch.from_numpy(w) > 0 if drop else None) / len(s)
    ref.backward()
    loss, (gs, gt) = jax.value_and_grad(
        lambda a, b: losses.crd_loss(a, b, tau, jnp.asarray(w) if drop else None), argnums=(0, 1)
    )(jnp.asarray(s), jnp.asarray(t))
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-5)
    np.testing.assert_allclose(gs, ts.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(gt, tt.grad.numpy(), atol=1e-5)
    if drop:
        assert not np.any(np.asarray(gs)[[1, 4]]) and not np.any(np.asarray(gt)[[1, 4]])
        # A dropped row's combined teacher embedding is zero (all its weights are 0): the
        # gradient through the normalisation stays finite.
        zero = jnp.asarray(t).at[1].set(0.0)
        grads = jax.grad(lambda b: losses.crd_loss(jnp.asarray(s), b, tau, jnp.asarray(w)))(zero)
        assert np.all(np.isfinite(grads)) and not np.any(np.asarray(grads)[1])


def test_crd_heads_and_weighted_teacher_embeddings_match_torch():
    """The step's CRD term (distill.py): student head, one head per teacher, each teacher's
    normalised embedding combined with per-sample teacher weights, then crd_loss; loss and
    head gradients against the same computation in PyTorch."""
    from agre_jax import models

    b, m, ds, dt, d, tau = 6, 3, 5, 7, 4, 0.07
    s_feat, t_feat = _rand(2, (b, ds)), _rand(3, (m, b, dt))
    w = np.random.default_rng(4).dirichlet(np.ones(m), size=b).astype(np.float32)
    heads = models.CRDHeads(embed_dim=d, num_teachers=m)
    params = heads.init(jax.random.key(0), jnp.asarray(s_feat), jnp.asarray(t_feat))["params"]

    def ours(p):
        s_emb, t_emb = heads.apply({"params": p}, jnp.asarray(s_feat), jnp.asarray(t_feat))
        target = jnp.einsum("bm,mbd->bd", jnp.asarray(w), losses.l2_normalize(t_emb))
        return losses.crd_loss(s_emb, target, tau)

    loss, grads = jax.value_and_grad(ours)(params)
    ks = torch.tensor(np.asarray(params["student"]["kernel"]), requires_grad=True)
    bs = torch.tensor(np.asarray(params["student"]["bias"]), requires_grad=True)
    kt = torch.tensor(np.asarray(params["teacher_kernel"]), requires_grad=True)
    bt = torch.tensor(np.asarray(params["teacher_bias"]), requires_grad=True)
    s_emb = torch.from_numpy(s_feat) @ ks + bs
    t_emb = [F.normalize(torch.from_numpy(t_feat[i]) @ kt[i] + bt[i], dim=1) for i in range(m)]
    target = sum(torch.from_numpy(w[:, i : i + 1]) * t_emb[i] for i in range(m))
    ref = _torch_crd(s_emb, target, tau) / b
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-5)
    for ours_g, torch_t in (
        (grads["student"]["kernel"], ks),
        (grads["student"]["bias"], bs),
        (grads["teacher_kernel"], kt),
        (grads["teacher_bias"], bt),
    ):
        np.testing.assert_allclose(ours_g, torch_t.grad.numpy(), atol=1e-5)
