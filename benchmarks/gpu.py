"""The distillation step of configuration C at the paper's shapes, on an accelerator (prints a
table, row by row).

    python benchmarks/gpu.py                    # on a device machine: every row, ~8 minutes
    python benchmarks/gpu.py --timeout-s 300    # stop starting rows after 5 minutes
    python benchmarks/gpu.py --quick            # tiny shapes: a smoke test on a CPU

On the project's device machine (one H200) run it with the device tool as
`python benchmarks/gpu.py` (timeout_s 600): it needs no TensorFlow and no ml_collections,
which that image lacks (it reads no config file and no dataset: tests/test_gpu_benchmark.py
runs it with both hidden, and checks its configuration C against configs/multilayer_c.py).

What it measures: configuration C (configs/multilayer_c.py: MSE feature distillation through
adapters on layer2, layer3 and layer4 with gammas 0.05, 0.1 and 0.25), 224 px in-memory random
batches of 128, five ResNet-50 teachers and a ResNet-18 student of width 64 with the ImageNet
stem, the paper's optimiser (SGD momentum 0.9, lr 1e-3, weight decay 1e-4), built and timed by
benchmarks/step.py (`build`, `time_ours`). Rows cross float32 / bfloat16 compute (`dtype`),
one device (jit) / pmap over every local device, and AVER / AGRE-KD (full scope) with two
classes (the closed form) and ten classes (per-sample Gram matrices, layerwise). Each row runs
in its own process, so that its peak device memory (`peak_bytes_in_use` of
`device.memory_stats()`, the largest over the local devices; '-' where the backend keeps none,
as the CPU) is its own, and a row that fails (out of memory, say) leaves the others running.

Columns: compile s (lowering and compiling the step), step s (median of --steps timed steps
after one warm-up), images/s (the global batch over the step time), 30 epochs (the implied
compute of 30 Waterbirds epochs: 4,795 training images, 37 steps of 128 per epoch; compile
and evaluation not included), peak GiB (device) and plan GiB (XLA's planned arguments, outputs
and temporaries of the compiled step, per device), step / aver (against the two-class AVER row
of the same dtype and step: AVER's cost depends on the class count through the `fc` head
alone).

The target it reports against: configuration C, 30 Waterbirds epochs in at most 2 minutes of
compute on one H100-class GPU (a T4 takes 45-60 minutes).

Rows run most important first: bfloat16 with jit (AVER and AGRE-KD, two classes, then AGRE-KD
with ten), then float32 with jit, then both dtypes under pmap. Each row is printed as soon as
it is measured; once --timeout-s has passed no row starts, the row running then is stopped,
and the rows left are listed as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Configuration C (configs/multilayer_c.py), kept here because this script reads no config
# file (ml_collections is not on the GPU image); tests/test_gpu_benchmark.py checks these
# and step.py's defaults (chunk size, teacher map, agre_batch's BatchNorm, optimiser) against
# the config.
GAMMAS = (0.05, 0.1, 0.25)  # layer2, layer3, layer4
GAMMA_POOLED = 0.0
WATERBIRDS_TRAIN = 4795  # training images
EPOCHS = 30
TARGET_S = 120.0  # 30 epochs of configuration C on one H100-class GPU
T4_REFERENCE = "45-60 min"
MIN_ROW_S = 5.0  # a row does not start with less of the budget left

METHOD_NAMES = {"aver": "AVER", "agre/full": "AGRE-KD"}


@dataclasses.dataclass(frozen=True)
class Sizes:
    image_size: int
    batch: int
    teachers: int
    width: int
    teacher_arch: str = "resnet50"
    student_arch: str = "resnet18"
    steps: int = 10


FULL = Sizes(image_size=224, batch=128, teachers=5, width=64)
QUICK = Sizes(image_size=32, batch=8, teachers=2, width=8, steps=2)  # ResNet-50 teachers too


@dataclasses.dataclass(frozen=True)
class Row:
    dtype: str  # 'float32' or 'bfloat16'
    mode: str  # 'jit' or 'pmap'
    method: str  # a key of benchmarks/step.py's METHODS
    classes: int


def _rows() -> tuple[Row, ...]:
    """Every row, most important first (see the module doc)."""
    return tuple(
        Row(dtype, mode, method, classes)
        for mode in ("jit", "pmap")
        for dtype in ("bfloat16", "float32")
        for method, classes in (("aver", 2), ("agre/full", 2), ("agre/full", 10))
    )


ROWS = _rows()
HEADER = (
    "#", "dtype", "step", "method", "classes", "compile s", "step s", "images/s", "30 epochs",
    "peak GiB (device)", "plan GiB", "step / aver",
)  # fmt: skip


# --- one row, in its own process --------------------------------------------------------------


def step_argv(row: Row, sizes: Sizes, steps: int) -> list[str]:
    """benchmarks/step.py's command line for `row` at `sizes`."""
    return [
        "--classes", str(row.classes), "--methods", row.method,
        "--teachers", str(sizes.teachers), "--teacher-arch", sizes.teacher_arch,
        "--student-arch", sizes.student_arch, "--batch", str(sizes.batch),
        "--image-size", str(sizes.image_size), "--width", str(sizes.width),
        "--dtype", row.dtype, "--gammas", *map(str, GAMMAS),
        "--gamma-pooled", str(GAMMA_POOLED), "--steps", str(steps),
    ]  # fmt: skip


def measure(row: Row, sizes: Sizes, steps: int) -> dict[str, Any]:
    """Builds and times one row in this process (benchmarks/step.py); returns its numbers and
    the device's."""
    # benchmarks/step.py by its directory (no package named `benchmarks` can shadow it), and
    # the repository for agre_jax and convert where the project is not installed.
    sys.path[:0] = [str(REPO / "benchmarks"), str(REPO)]
    import jax
    import step

    args = step.parse_args(step_argv(row, sizes, steps))
    setup = step.build(args, row.classes, sizes.image_size, row.method)
    out = step.time_ours(setup, args.steps, pmap=row.mode == "pmap")
    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s] if all(stats) else []
    return dict(
        out,
        device_peak_gb=max(peaks) / 2**30 if peaks and None not in peaks else None,
        devices=jax.local_device_count() if row.mode == "pmap" else 1,
        device_kind=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        local_devices=jax.local_device_count(),
        jax=jax.__version__,
    )


# --- the table, in the parent process (which never starts a backend) --------------------------


def run_row(index: int, quick: bool, steps: int, timeout_s: float) -> dict[str, Any]:
    """Row `index` in a child process: its numbers, or {'status': why not}."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--row",
        str(index),
        "--steps",
        str(steps),
    ]
    cmd += ["--quick"] if quick else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"stopped at the time budget (after {timeout_s:.0f} s)"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    lines = [x.strip() for x in (proc.stderr + proc.stdout).splitlines() if x.strip()]
    last = lines[-1][:300] if lines else "no output"
    return {"status": f"failed (exit {proc.returncode}): {last}"}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def epochs_s(step_s: float, batch: int) -> float:
    """Compute seconds of EPOCHS Waterbirds epochs at `step_s` per global batch of `batch`
    (the remainder of each epoch dropped, as agre_jax/data/pipeline.py's steps_per_epoch)."""
    return EPOCHS * (WATERBIRDS_TRAIN // batch) * step_s


def _cells(i: int, row: Row, r: dict[str, Any], sizes: Sizes, base: dict | None) -> list[str]:
    head = [str(i + 1), row.dtype, row.mode, METHOD_NAMES[row.method], str(row.classes)]
    if "status" in r:
        return head + [r["status"]] + [""] * (len(HEADER) - len(head) - 1)
    if row.mode == "pmap":
        head[2] = f"pmap x{r['devices']}"
    peak = r["device_peak_gb"]
    ratio = f"{r['step_s'] / base['step_s']:.2f}" if base and "step_s" in base else "-"
    return head + [
        f"{r['compile_s']:.1f}",
        f"{r['step_s']:.4f}",
        f"{sizes.batch / r['step_s']:.1f}",
        _duration(epochs_s(r["step_s"], sizes.batch)),
        "-" if peak is None else f"{peak:.3g}",
        f"{r['peak_gb']:.3g}",
        ratio,
    ]


def _base(results: dict[int, dict], row: Row) -> dict | None:
    """The two-class AVER row of `row`'s dtype and step (None before it is measured)."""
    for j, other in enumerate(ROWS):
        if (other.dtype, other.mode, other.method, other.classes) == (
            row.dtype,
            row.mode,
            "aver",
            2,
        ):
            return results.get(j)
    return None


def _print_row(cells: Sequence[str]) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


def run_table(
    quick: bool, steps: int, timeout_s: float, rows: Sequence[int] = ()
) -> dict[int, dict]:
    """Every row (or the 1-based `rows` only) within the budget, each printed as it comes;
    returns them by index."""
    sizes = QUICK if quick else FULL
    start = time.monotonic()
    print(
        f"# configuration C (gammas layer2/3/4 {GAMMAS}), {sizes.teachers} x "
        f"{sizes.teacher_arch} -> {sizes.student_arch}, width {sizes.width}, ImageNet stem, "
        f"{sizes.image_size} px, batch {sizes.batch}, {steps} timed steps; "
        f"{'--quick sizes, ' if quick else ''}budget {timeout_s:.0f} s",
        flush=True,
    )
    results: dict[int, dict] = {}
    header_done, started = False, False
    for i, row in enumerate(ROWS):
        left = timeout_s - (time.monotonic() - start)
        if rows and i + 1 not in rows:
            r = {"status": "not selected (--rows)"}
        elif left >= MIN_ROW_S or (not started and timeout_s >= MIN_ROW_S):
            # With a budget of at least MIN_ROW_S the first row starts whatever the clock took
            # since `start` (a budget of exactly MIN_ROW_S used to measure nothing).
            started = True
            r = run_row(i, quick, steps, max(left, MIN_ROW_S))
        else:
            r = {"status": "skipped (time budget spent)"}
        results[i] = r
        if not header_done and "device_kind" in r:
            print(
                f"# {r['device_kind']} ({r['backend']}) x{r['local_devices']}, jax {r['jax']}",
                flush=True,
            )
        if not header_done:
            _print_row(HEADER)
            print("|" + "---|" * len(HEADER), flush=True)
            header_done = True
        _print_row(_cells(i, row, r, sizes, _base(results, row)))
    done = {i: r for i, r in results.items() if "step_s" in r}
    print(
        f"# {len(done)} of {len(ROWS)} rows measured in {time.monotonic() - start:.0f} s",
        flush=True,
    )
    if done:
        i = min(done, key=lambda j: done[j]["step_s"])
        best = epochs_s(done[i]["step_s"], sizes.batch)
        verdict = (
            "quick sizes: not comparable"
            if quick
            else ("meets it" if best <= TARGET_S else "misses it")
        )
        print(
            f"# fastest: row {i + 1} ({ROWS[i].dtype}, {ROWS[i].mode}, "
            f"{METHOD_NAMES[ROWS[i].method]}, {ROWS[i].classes} classes), 30 Waterbirds epochs "
            f"in {_duration(best)} of compute; target {_duration(TARGET_S)} on one H100-class "
            f"GPU (T4: {T4_REFERENCE}): {verdict}",
            flush=True,
        )
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),  # the first paragraph
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke test)")
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=450.0,
        help=(
            "time budget in seconds, at least MIN_ROW_S (5): no row starts after it, the one "
            "running is stopped (default 450)"
        ),
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row")
    parser.add_argument(
        "--rows", type=int, nargs="+", default=(), help="measure these rows only (1-based)"
    )
    parser.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)  # a child
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = (QUICK if args.quick else FULL).steps
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if not (math.isfinite(args.timeout_s) and args.timeout_s >= MIN_ROW_S):
        parser.error(
            f"--timeout-s is {args.timeout_s:g}; expected seconds >= {MIN_ROW_S:g} (a row does "
            f"not start with less than {MIN_ROW_S:g} s of the budget left, so a smaller budget "
            "measures nothing)"
        )
    if any(not 1 <= r <= len(ROWS) for r in args.rows):
        parser.error(f"--rows must be in 1..{len(ROWS)}")
    if args.row is not None and not 0 <= args.row < len(ROWS):
        parser.error(f"--row must be in 0..{len(ROWS) - 1}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.row is not None:
        result = measure(ROWS[args.row], QUICK if args.quick else FULL, args.steps)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results = run_table(args.quick, args.steps, args.timeout_s, args.rows)
    return 0 if any("step_s" in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
