"""Benchmark of the distillation step per weighting method (prints a table).

    python benchmarks/step.py --classes 2 10 --image-size 64 --batch 32 --teachers 5

For M teachers (ResNet-50 by default), a ResNet-18 student and one batch: compile time,
median step time over `--steps` timed steps (after one warm-up), XLA's planned peak memory
of the compiled step (arguments + outputs + temporaries, from `memory_analysis`), and the
ratios to the `aver` step. In-memory random batches: the input pipeline is not measured here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from agre_jax import distill, models, optim

METHODS = {
    "aver": dict(weighting="aver"),
    "random": dict(weighting="random"),
    "agre/last_layer": dict(weighting="agre", grad_scope="last_layer"),
    "agre/full": dict(weighting="agre", grad_scope="full", gram="layerwise"),
    "agre/full-vmap": dict(weighting="agre", grad_scope="full", gram="vmap"),
    "agre_batch": dict(weighting="agre_batch", grad_scope="full"),
}


def _peak_bytes(compiled) -> float:
    mem = compiled.memory_analysis()
    if mem is None:
        return float("nan")
    return (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )


def bench(args, num_classes: int, name: str, overrides: dict) -> dict:
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    opts = dict(width=args.width, small_input=args.small_input, dtype=dtype)
    teacher = models.create(args.teacher_arch, num_classes, **opts)
    student = models.create(args.student_arch, num_classes, **opts)
    rng = jax.random.key(0)
    t_vars = [models.init(teacher, rng, args.image_size)] * args.teachers
    ens = distill.Ensemble(
        teachers=(teacher,), group_sizes=(args.teachers,), biased_backbone=(0, 0)
    )
    frozen = {
        "teachers": (distill.stack_variables(t_vars),),
        "biased": jax.tree.map(lambda x: -x, t_vars[0]["params"]["fc"]),
    }
    gammas = tuple(
        (k, g) for k, g in zip(("layer2", "layer3", "layer4"), args.gammas, strict=True) if g > 0
    )
    cfg = distill.DistillConfig(
        chunk_size=args.chunk_size, teacher_map=args.teacher_map, gammas=gammas, **overrides
    )
    mdl = distill.create_models(student, ens, cfg)
    tx = optim.create_optimizer("sgd", 1e-3, 1000)
    state = distill.create_train_state(mdl, tx, jax.random.key(1), args.image_size)
    images = jax.random.normal(jax.random.key(2), (args.batch, args.image_size, args.image_size, 3))
    batch = {"image": images, "label": jnp.arange(args.batch) % num_classes}
    step = distill.compile_step(mdl, cfg, tx, pmap=False)
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, frozen, batch, rng)
    jax.block_until_ready(metrics)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch, jax.random.fold_in(rng, i))
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return dict(
        classes=num_classes,
        method=name,
        compile_s=compile_s,
        step_s=statistics.median(times),
        peak_gb=_peak_bytes(compiled) / 2**30,
        loss=float(metrics["loss"]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--teachers", type=int, default=5)
    parser.add_argument("--teacher-arch", default="resnet50")
    parser.add_argument("--student-arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--small-input", action="store_true")
    parser.add_argument("--chunk-size", type=int, default=distill.DistillConfig.chunk_size)
    parser.add_argument("--teacher-map", default="unroll", choices=distill.TEACHER_MAPS)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--gammas",
        type=float,
        nargs=3,
        default=[0.0, 0.0, 0.0],
        metavar=("G2", "G3", "G4"),
        help="feature gammas on layer2/3/4",
    )
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(
        f"# {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}; "
        f"{args.teachers} x {args.teacher_arch} -> {args.student_arch}, batch {args.batch}, "
        f"{args.image_size} px, width {args.width}, {args.dtype}, chunk {args.chunk_size}, "
        f"teacher_map {args.teacher_map}, gammas {args.gammas}"
    )
    rows = []
    for c in args.classes:
        for name in args.methods:
            rows.append(bench(args, c, name, METHODS[name]))
            r = rows[-1]
            print(f"  done c={c} {name}: {r['step_s']:.3f} s", flush=True)
    print(
        "| classes | method | compile s | step s (median) | peak GiB | step / aver | peak / aver |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(
            (b for b in rows if b["classes"] == r["classes"] and b["method"] == "aver"), None
        )
        ratio = f"{r['step_s'] / base['step_s']:.2f}" if base else "-"
        mem_ratio = f"{r['peak_gb'] / base['peak_gb']:.2f}" if base else "-"
        print(
            f"| {r['classes']} | {r['method']} | {r['compile_s']:.1f} | {r['step_s']:.3f} | "
            f"{r['peak_gb']:.2f} | {ratio} | {mem_ratio} |"
        )
    assert all(np.isfinite(r["loss"]) for r in rows)


if __name__ == "__main__":
    main()
