"""Where the time of a training step goes: per-layer and per-op tables from an XLA profile.

    python benchmarks/profile_step.py                       # the default config's shapes
    python benchmarks/profile_step.py --preset 64 --what distill
    python benchmarks/profile_step.py --preset 224 --steps 2 --top 15

Builds the step of `--what` for one preset's shapes, compiles it, times `--steps` calls
(median wall time), then records `--trace-steps` more with `jax.profiler` and reads the trace
back (`jax.profiler.ProfileData`). Every executed XLA op (a thunk: a fusion, a convolution, a
dot, a copy, ...) is mapped to the JAX source op it came from through the `op_name` metadata
of the compiled HLO, which carries the step's named scopes (teachers, student, weighting,
loss, optimizer), the flax module path (`layer4/0/conv1`) and whether the op belongs to the
backward pass (`transpose(...)`). It prints three tables:

  1. by part of the step and pass (forward / backward);
  2. by layer (stem, layer1..4, head) and op kind (conv, dot, other);
  3. the top ops, with their output shapes.

Op times are summed over XLA:CPU's worker threads, so their total may exceed the wall time;
the header gives both. Presets:
  default   configs/multilayer_c.py as it is (32 px, 5 ResNet-18 teachers of width 8, ...);
  64, 224   that config at 64 or 224 px with 5 ResNet-50 teachers -> ResNet-18, width 64,
            the ImageNet stem (the paper's shapes; issue 13's reference table).
`--what`: `distill` (the distillation step, jit on one device), `teachers` (one ERM step of
the M stacked teachers), `student` (ResNet-18 forward + backward in training mode).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

try:  # before TensorFlow (imported by agre_jax.settings): the other order segfaults
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:
    pass

from agre_jax import distill, models, optim, settings, teachers  # noqa: E402
from configs import multilayer_c  # noqa: E402

PRESETS = {
    "default": {},
    "64": dict(image_size=64, teacher_arch="resnet50", width=64, small_input=False),
    "224": dict(image_size=224, teacher_arch="resnet50", width=64, small_input=False),
}
WHAT = ("distill", "teachers", "student")
_SKIP = re.compile(r"^(end: |ThreadpoolListener|ThunkExecutor|Thread|PjRt|Execute|CommonPjRt)")


def config_for(preset: str, weighting: str | None) -> Any:
    c = multilayer_c.get_config()
    p = PRESETS[preset]
    if p:
        c.data.image_size = p["image_size"]
        c.teachers.arch = p["teacher_arch"]
        for block in (c.teachers, c.student):
            block.width = p["width"]
            block.small_input = p["small_input"]
    if weighting:
        c.distill.weighting = weighting
    return c


def build(
    c: Any, what: str, num_classes: int, conv_impl: str = "auto"
) -> tuple[Any, tuple[Any, ...]]:
    """(jitted step, its arguments) for the config's shapes, on random data."""
    size, dtype = c.data.image_size, settings.dtype(c.dtype)
    teacher = settings.model(c.teachers, num_classes, dtype).clone(conv_impl=conv_impl)
    student = settings.model(c.student, num_classes, dtype).clone(conv_impl=conv_impl)
    m, b = c.teachers.num, c.train.batch_size
    key = jax.random.key(0)
    images = jax.random.normal(key, (b, size, size, 3))
    labels = jnp.arange(b) % num_classes
    if what == "student":

        def fwd_bwd(params, batch_stats, images, labels):
            def loss_fn(p):
                logits, new = student.apply(
                    {"params": p, "batch_stats": batch_stats},
                    images,
                    train=True,
                    mutable=["batch_stats"],
                )
                return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(b), labels]), new

            return jax.grad(loss_fn, has_aux=True)(params)

        v = models.init(student, key, size)
        return jax.jit(fwd_bwd), (v["params"], v["batch_stats"], images, labels)
    t_vars = [models.init(teacher, jax.random.key(1 + t), size) for t in range(m)]
    if what == "teachers":
        tx = optim.create_optimizer("sgd", 1e-3, 1000)
        stacked = distill.stack_variables(t_vars)
        state = teachers.ModelState(
            stacked["params"], stacked["batch_stats"], jax.vmap(tx.init)(stacked["params"])
        )
        step = jax.jit(functools.partial(teachers.erm_step, model=teacher, tx=tx, how="unroll"))
        batch = {"image": jnp.stack([images] * m), "label": jnp.stack([labels] * m)}
        return step, ({"state": state}, batch)
    cfg = settings.distill_config(c)
    ens = distill.Ensemble(teachers=(teacher,), group_sizes=(m,), biased_backbone=(0, 0))
    frozen = {
        "teachers": (distill.stack_variables(t_vars),),
        "biased": jax.tree.map(lambda x: -x, t_vars[0]["params"]["fc"]),
    }
    mdl = distill.create_models(student, ens, cfg)
    tx = optim.create_optimizer("sgd", 1e-3, 1000)
    state = distill.create_train_state(mdl, tx, jax.random.key(9), size)
    step = distill.compile_step(mdl, cfg, tx, pmap=False)
    return step, (state, frozen, {"image": images, "label": labels}, key)


def op_sources(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """HLO instruction name -> (op_name metadata, output shape, opcode), for every instruction
    of the compiled module. A fusion takes its called computation's root opcode, and the
    metadata of its root or, when XLA's passes dropped that (convolutions rewritten for
    XNNPACK), of its operands, a backward one first (a weight gradient's operands are a
    forward activation and a backward cotangent)."""
    meta: dict[str, tuple[str, str, str]] = {}
    calls: dict[str, str] = {}
    operands: dict[str, list[str]] = {}
    roots: dict[str, tuple[str, str]] = {}  # computation -> (op_name, opcode) of its root
    computation = ""
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            computation = head.group(1)
            continue
        m = re.match(r"^\s*(ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(([^)]*)\)", line)
        if not m:
            continue
        name, shape, opcode = m.group(2), m.group(3), m.group(4)
        op = re.search(r'op_name="([^"]*)"', line)
        meta[name] = (op.group(1) if op else "", shape, opcode)
        operands[name] = re.findall(r"%([\w.\-]+)", m.group(5))
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if called:
            calls[name] = called.group(1)
        if m.group(1):
            roots[computation] = (op.group(1) if op else "", opcode)
    for name, comp in calls.items():
        op_name, shape, _ = meta[name]
        root_op, root_code = roots.get(comp, ("", "fusion"))
        meta[name] = (op_name or root_op, shape, root_code)
    for name, (op_name, shape, code) in meta.items():
        if op_name:
            continue
        found = [meta[o][0] for o in operands.get(name, ()) if o in meta and meta[o][0]]
        found.sort(key=lambda n: "transpose(" not in n)
        if found:
            meta[name] = (found[0], shape, code)
    return meta


def classify(op_name: str, opcode: str) -> tuple[str, str, str, str]:
    """(part, pass, layer, kind) of an op from its op_name metadata and (root) opcode."""
    parts = op_name.split("/")
    backward = "transpose(" in op_name
    known = ("teachers", "student", "weighting", "loss", "optimizer", "teacher")
    part = next((p for p in parts if p in known), "other")
    layer = next((p for p in parts if re.fullmatch(r"layer\d", p)), "")
    if not layer:
        if any(p in ("conv1", "bn1") for p in parts[:4]) or (
            "conv1" in parts and "layer" not in op_name
        ):
            layer = "stem"
        elif "fc" in parts or "pooled" in parts:
            layer = "head"
        elif "adapters" in op_name or any(p.startswith("FeatureAdapters") for p in parts):
            layer = "adapters"
        else:
            layer = "-"
    if opcode == "convolution":
        kind = "conv"
    elif opcode == "dot":
        kind = "dot"
    elif opcode in ("copy", "transpose"):
        kind = "copy/transpose"
    else:
        kind = "elementwise/reduce"
    return part, "bwd" if backward else "fwd", layer, kind


def profile(
    step: Any, args: tuple[Any, ...], steps: int, trace_steps: int, carry: bool
) -> dict[str, Any]:
    """Compiles and times `step(*args)`; with `carry` its first output replaces its first
    argument at each call (a step that donates its state)."""
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0

    def call(args):
        out = jax.block_until_ready(compiled(*args))
        return (out[0], *args[1:]) if carry else args

    args = call(args)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        args = call(args)
        times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(trace_steps):
            args = call(args)
        jax.profiler.stop_trace()
        files = sorted(Path(tmp).rglob("*.xplane.pb"))
        data = jax.profiler.ProfileData.from_file(str(files[-1]))
    sources = op_sources(compiled.as_text())
    per_op: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            for ev in line.events:
                if ev.name in sources and not _SKIP.match(ev.name):
                    per_op[ev.name] += ev.duration_ns / 1e9 / trace_steps
    return dict(
        compile_s=compile_s,
        step_s=statistics.median(times),
        per_op=per_op,
        sources=sources,
    )


def torch_student_seconds(c: Any, num_classes: int, steps: int, threads: int) -> float:
    """Median seconds of the same student forward + backward (training mode, cross-entropy)
    in PyTorch on `threads` threads, from the same initial weights (benchmarks/step.py's
    torchvision port)."""
    import step as step_bench  # benchmarks/step.py
    import torch

    torch.set_num_threads(threads)
    student = settings.model(c.student, num_classes, jnp.float32)
    size, b = c.data.image_size, c.train.batch_size
    net = step_bench.torch_model(student, models.init(student, jax.random.key(0), size)).train()
    images = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(b) % num_classes
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(images), labels).backward()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _table(title: str, rows: list[tuple], total: float, step_s: float, headers: tuple) -> None:
    print(f"\n**{title}**\n")
    print("| " + " | ".join(headers) + " | ms / step | % of op time |")
    print("|" + "---|" * (len(headers) + 2))
    for *keys, secs in rows:
        print(f"| {' | '.join(keys)} | {1e3 * secs:.1f} | {100 * secs / total:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="default", choices=list(PRESETS))
    parser.add_argument("--what", nargs="+", default=list(WHAT), choices=WHAT)
    parser.add_argument("--weighting", default=None, help="override distill.weighting")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--conv-impl", default="auto", choices=models.CONV_IMPLS)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--trace-steps", type=int, default=2, help="profiled steps")
    parser.add_argument("--top", type=int, default=20, help="rows of the top-ops table")
    parser.add_argument(
        "--compare-torch",
        action="store_true",
        help="time the same `student` forward + backward in PyTorch (threads: the cores)",
    )
    args = parser.parse_args()
    c = config_for(args.preset, args.weighting)
    print(
        f"# {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}; "
        f"preset {args.preset}: {c.data.image_size} px, {c.teachers.num} x {c.teachers.arch} "
        f"-> {c.student.arch}, width {c.teachers.width}/{c.student.width}, small_input "
        f"{c.teachers.small_input}, batch {c.train.batch_size}, weighting "
        f"{c.distill.weighting}, {args.classes} classes, conv_impl {args.conv_impl}"
    )
    for what in args.what:
        step, step_args = build(c, what, args.classes, args.conv_impl)
        r = profile(step, step_args, args.steps, args.trace_steps, carry=what != "student")
        total = sum(r["per_op"].values())
        print(
            f"\n## {what}: step {r['step_s']:.3f} s (median of {args.steps}), compile "
            f"{r['compile_s']:.1f} s, op time {total:.3f} s / step (summed over threads)"
        )
        if args.compare_torch and what == "student":
            threads = len(os.sched_getaffinity(0))
            t = torch_student_seconds(c, args.classes, args.steps, threads)
            print(
                f"PyTorch ({threads} threads), same forward + backward: {t:.3f} s; ours / "
                f"torch {r['step_s'] / t:.2f}"
            )
        by_part: dict[tuple, float] = collections.defaultdict(float)
        by_layer: dict[tuple, float] = collections.defaultdict(float)
        tops = []
        for name, secs in r["per_op"].items():
            op_name, shape, opcode = r["sources"][name]
            part, pas, layer, kind = classify(op_name, opcode)
            by_part[(part, pas)] += secs
            by_layer[(layer, kind)] += secs
            tops.append((name, shape, part, pas, layer, op_name.split("/")[-1], secs))
        _table(
            f"{what}: by part and pass",
            sorted(((*k, v) for k, v in by_part.items()), key=lambda x: -x[-1]),
            total,
            r["step_s"],
            ("part", "pass"),
        )
        _table(
            f"{what}: by layer and op kind",
            sorted(((*k, v) for k, v in by_layer.items()), key=lambda x: -x[-1]),
            total,
            r["step_s"],
            ("layer", "kind"),
        )
        tops.sort(key=lambda x: -x[-1])
        _table(
            f"{what}: top {args.top} ops",
            [t for t in tops[: args.top]],
            total,
            r["step_s"],
            ("op", "output", "part", "pass", "layer", "source"),
        )


if __name__ == "__main__":
    main()
