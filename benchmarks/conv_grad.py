"""Kernel gradient of one convolution: XLA's (lax.conv's transpose) against the matmuls of
models.conv_matmul_grad, per shape, with the forward for scale.

    python benchmarks/conv_grad.py                     # the ResNets' shapes at 224, 64 and 32 px
    python benchmarks/conv_grad.py --case 32,56,64,64,3,1 --case 32,28,128,256,1,2

A case is `batch,side,in_channels,out_channels,kernel,stride` (padding kernel // 2, NHWC). Each
time is the median of `--repeats` jitted calls on this machine, in ms; `max rel diff` is the
largest difference of the matmul gradient from lax's, relative to lax's largest magnitude.
`routed` says whether `models.conv_general_dilated` sends that convolution to conv_matmul_grad
(threshold models.MATMUL_GRAD_MIN_MACS on the kernel gradient's multiply-adds, or at most
models.FEW_CHANNELS input channels).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agre_jax import models  # noqa: E402

DEFAULT_CASES = (
    # 224 px, ImageNet stem, width 64 (ResNet-18 student): layer1..4, strided convs, the stem.
    "32,56,64,64,3,1",
    "32,28,128,128,3,1",
    "32,14,256,256,3,1",
    "32,7,512,512,3,1",
    "32,56,64,128,3,2",
    "32,56,64,128,1,2",
    "32,224,3,64,7,2",
    # 64 px, width 64.
    "32,16,64,64,3,1",
    "32,8,128,128,3,1",
    "32,4,256,256,3,1",
    "32,16,64,128,1,2",
    # The synthetic default: 32 px, small-input stem, width 8 (kept on lax).
    "32,32,8,8,3,1",
    "32,16,16,16,3,1",
    "32,8,32,32,3,1",
    "32,32,8,16,1,2",
)


def _median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def kernel_grad(conv):
    def fn(x, kernel, dy):
        _, vjp = jax.vjp(lambda k: conv(x, k), kernel)
        return vjp(dy)[0]

    return jax.jit(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", action="append", help="batch,side,in,out,kernel,stride")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; medians of {args.repeats}")
    print(
        "| batch | map | in -> out | kernel | stride | routed | lax ms | matmul ms | lax / matmul "
        "| forward ms | max rel diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in args.case or DEFAULT_CASES:
        b, side, c, o, k, s = (int(v) for v in case.split(","))
        pad = ((k // 2, k // 2),) * 2
        x = jax.random.normal(jax.random.key(0), (b, side, side, c))
        kernel = 0.1 * jax.random.normal(jax.random.key(1), (k, k, c, o))

        def plain(x, kernel, s=s, pad=pad):
            return lax.conv_general_dilated(x, kernel, (s, s), pad, dimension_numbers=models._NHWC)

        def matmul(x, kernel, s=s, pad=pad):
            return models.conv_matmul_grad(x, kernel, (s, s), pad)

        dy = jax.random.normal(jax.random.key(2), jax.eval_shape(plain, x, kernel).shape)
        ref, ours = kernel_grad(plain), kernel_grad(matmul)
        want = ref(x, kernel, dy)
        diff = float(jnp.max(jnp.abs(ours(x, kernel, dy) - want)) / jnp.max(jnp.abs(want)))
        t_lax = _median_ms(ref, x, kernel, dy, repeats=args.repeats)
        t_mm = _median_ms(ours, x, kernel, dy, repeats=args.repeats)
        t_fwd = _median_ms(jax.jit(plain), x, kernel, repeats=args.repeats)
        route = jax.make_jaxpr(
            lambda x, kernel, s=s, pad=pad: models.conv_general_dilated(
                x, kernel, (s, s), pad, dimension_numbers=models._NHWC
            )
        )(x, kernel)
        routed = any(str(e.primitive) == "custom_vjp_call" for e in route.eqns)
        print(
            f"| {b} | {side} x {side} | {c} -> {o} | {k} x {k} | {s} | {'yes' if routed else 'no'} "
            f"| {t_lax:.1f} | {t_mm:.1f} | {t_lax / t_mm:.2f} | {t_fwd:.1f} | {diff:.0e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
