"""The conventions the AGRE-KD paper leaves open, measured on a ResNet-18 student (prints a table).

    python benchmarks/conventions.py                     # width 8 (the default's) and 64
    python benchmarks/conventions.py --width 64 --classes 10 --batch 6 12   # cost ~ B^2

Kenfack et al. (TMLR 2025, Eq. 5) define W_t(x_i) = 1 - cos(grad l_t^i, grad l_b^i) and leave
three things open. agre-jax's choices, and what they change here:

1. **Without normalisation** (`normalize_grads=False`, the paper's Table 6 ablation) the raw
   weight is 1 - g_t^T K_i g_b, with K_i the per-sample Gram matrix (NTK) of the student's
   logits. Its entries are large, so most raw weights are negative: agre-jax clips them at 0
   (then normalises the row; rows whose teachers are all clipped are 'empty'). Columns:
   `ntk diag` = median of trace(K_i) / C, `raw < 0` = fraction of raw weights below 0.
2. **Dropped rows** (`empty_rows=drop`) have weight 0 for every teacher, and the KD loss is
   still divided by the batch size B (the loss of a batch with dropped rows is smaller, not
   renormalised). A convention, nothing to measure.
3. **BatchNorm statistics in per-sample gradients.** In training mode every sample's logits
   depend on the whole batch through the batch's BatchNorm statistics. agre-jax's per-sample
   gradients hold the statistics fixed at the batch's (`distill.distill_step`'s logit_fn).
   With two classes and normalised gradients this is exact: every KD logit gradient is a
   multiple of (1, -1), so the cosine is the sign of the product of the multiples whatever the
   Jacobian. With more classes it is not: `|dW| max / mean` compare the normalised weights
   with statistics fixed against weights from per-sample gradients through the statistics
   (sample i's logit cotangents pulled back through the whole batch's training-mode
   forward). `agre_batch` follows the earlier PyTorch code and goes through
   the statistics by default (`distill.batch_bn`).

The student is at its initialisation (seeded), images are standard normal, and the teacher
and biased logits are the student's plus N(0, 2^2) noise (as tests/test_weighting.py), with
M = 3 teachers and tau = 4. Both conventions go through the same arithmetic: the per-sample
Gram matrices K_i = J_i J_i^T from explicit per-sample Jacobians (C backward passes of the
batch per sample), then cosines g_t^T K_i g_b / (|g_t|_K |g_b|_K) in float64; not the
library's Gram path.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from agre_jax import losses, models

TAU = 4.0
M = 3


def per_sample_gram(model, variables, images, mode: str) -> np.ndarray:
    """[B, C, C] float64: K_i = J_i J_i^T with J_i = d z_i / d theta [C, P], sample i's logits
    in the whole batch's training-mode forward, BatchNorm statistics 'through' (differentiated)
    or 'fixed' (held at the batch's). Each row of J_i is one backward pass of the batch."""
    b, c = images.shape[0], model.num_classes

    def train_logits(p):
        out = models.apply_with_features(
            model, {**variables, "params": p}, images, train=True, layers=(), moments=True
        )
        return out[0], out[3]

    @jax.jit
    def gram(params):
        logits, pull, moments = jax.vjp(train_logits, params, has_aux=True)
        if mode == "fixed":

            def fixed(p):
                return model.apply({"params": p, "batch_stats": moments}, images, train=False)

            _, pull = jax.vjp(fixed, params)

        def k_i(i):
            cots = jax.nn.one_hot(i, b)[None, :, None] * jnp.eye(c)[:, None, :]  # [C, B, C]

            def row(cot):
                return jnp.concatenate([x.ravel() for x in jax.tree.leaves(pull(cot)[0])])

            jac = jax.lax.map(row, cots)  # [C, P]
            return jac @ jac.T

        return logits, jax.lax.map(k_i, jnp.arange(b))

    logits, k = gram(variables["params"])
    return np.asarray(logits), np.asarray(k, np.float64)


def weights(g: np.ndarray, k: np.ndarray, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """g [M + 1, B, C] KD logit gradients (teachers, then the biased model), K [B, C, C] ->
    (row-normalised weights [B, M] with empty rows uniform, raw 1 - dot or 1 - cos [B, M])."""
    dots = np.einsum("mbc,bcd,bd->bm", g[:-1], k, g[-1])
    if normalize:
        sq = np.einsum("rbc,bcd,rbd->rb", g, k, g)
        dots = dots / np.sqrt(sq[:-1].T * sq[-1][:, None])
    raw = 1.0 - dots
    clipped = np.maximum(raw, 0.0)
    sums = clipped.sum(axis=1, keepdims=True)
    empty = sums < 1e-6  # weighting.EMPTY_ROW_EPS
    w = np.where(empty, 1.0 / clipped.shape[1], clipped / np.where(empty, 1.0, sums))
    return w, raw


def measure(width: int, classes: int, batch: int, size: int, seed: int) -> dict[str, float]:
    model = models.create("resnet18", classes, width=width, small_input=True)
    variables = models.init(model, jax.random.key(seed), size)
    k_img, k_ref = jax.random.split(jax.random.key(seed + 1000))
    images = jax.random.normal(k_img, (batch, size, size, 3))
    s_logits, k_fixed = per_sample_gram(model, variables, images, "fixed")
    _, k_through = per_sample_gram(model, variables, images, "through")
    refs = s_logits[None] + 2.0 * np.asarray(jax.random.normal(k_ref, (M + 1, batch, classes)))
    g = np.asarray(losses.kd_logit_grad(jnp.asarray(s_logits), refs, TAU), np.float64)
    w_fixed, _ = weights(g, k_fixed, True)
    w_through, _ = weights(g, k_through, True)
    _, raw = weights(g, k_fixed, False)
    dw = np.abs(w_through - w_fixed)
    return {
        "ntk_diag": float(np.median(np.trace(k_fixed, axis1=1, axis2=2) / classes)),
        "raw_neg": float(np.mean(raw < 0)),
        "dw_max": float(dw.max()),
        "dw_mean": float(dw.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--batch", type=int, nargs="+", default=[6])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2, help="student initialisations")
    args = parser.parse_args()
    print(
        f"ResNet-18 student at init, {args.image_size} px, M = {M} teachers, tau {TAU:g}; "
        f"max over {args.seeds} seeds ({jax.devices()[0].platform})"
    )
    head = "| width | classes | B | ntk diag (median) | raw < 0 | |dW| max | |dW| mean | s |"
    print(head)
    print("|---" * 8 + "|")
    for width in args.width:
        for classes in args.classes:
            for batch in args.batch:
                t0 = time.perf_counter()
                rows = [
                    measure(width, classes, batch, args.image_size, s) for s in range(args.seeds)
                ]
                worst = {k: max(r[k] for r in rows) for k in rows[0]}
                print(
                    f"| {width} | {classes} | {batch} | {worst['ntk_diag']:.3g} | "
                    f"{worst['raw_neg']:.2f} | {worst['dw_max']:.3g} | {worst['dw_mean']:.3g} | "
                    f"{time.perf_counter() - t0:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
