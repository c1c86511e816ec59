"""Command line: convert torchvision ResNet checkpoints to agre_jax variables directories.

    python -m convert --arch resnet50 --num-classes 2 --src erm_seed1.pt --dst teachers/erm1
    python -m convert --arch resnet50 --num-classes 2 --src dfr_checkpoints/ --dst teachers/
    python -m convert --arch resnet18 --num-classes 2 --src resnet18-f37072fd.pth \
        --dst students/init --drop-head

A directory `--src` converts every .pt / .pth / .safetensors file in it to DST/<file stem>/.
Every input is read and checked before anything is written; a bad input prints one paragraph
on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from agre_jax import checkpoints, models
from convert.torch_resnet import (
    CHECKPOINT_SUFFIXES,
    ConversionError,
    Converted,
    convert_checkpoint,
)

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert torchvision ResNet checkpoints (.pt, .pth, .safetensors) to "
        "agre_jax variables directories (orbax variables/ + provenance.json).",
    )
    parser.add_argument("--arch", required=True, help=f"one of {', '.join(models.ARCHS)}")
    parser.add_argument("--num-classes", required=True, type=int, help="size of the head")
    parser.add_argument(
        "--src", required=True, help="a checkpoint file, or a directory of checkpoint files"
    )
    parser.add_argument(
        "--dst", required=True, help="output directory (for a directory --src: its parent)"
    )
    parser.add_argument(
        "--drop-head",
        action="store_true",
        help="ignore the file's fc layer and initialise a fresh --num-classes head",
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of a fresh head")
    parser.add_argument(
        "--force", action="store_true", help="replace existing non-empty output directories"
    )
    return parser


def _jobs(src: Path, dst: Path) -> list[tuple[Path, Path]]:
    """(checkpoint file, output directory) pairs for a file or a directory `src`."""
    if not src.exists():
        raise ConversionError(f"--src {src} does not exist.")
    if not src.is_dir():
        return [(src, dst)]
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if not files:
        raise ConversionError(
            f"--src {src} is a directory without checkpoint files; expected files ending in "
            f"{', '.join(CHECKPOINT_SUFFIXES)}."
        )
    stems = [p.stem for p in files]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise ConversionError(
            f"--src {src} holds several checkpoints with the same stem ({', '.join(clashes)}), "
            "which would be written to the same DST/<stem>; move one of them away."
        )
    return [(p, dst / p.stem) for p in files]


def _check_destination(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--dst {out} exists and is not a directory.")
    if not force and out.is_dir() and any(out.iterdir()):
        raise ConversionError(
            f"the output directory {out} already exists and is not empty; nothing was written. "
            "Pass --force to replace it."
        )


def run(args: argparse.Namespace, report: Callable[[str], None] = print) -> None:
    """Converts every input, then writes them all, reporting one line per file written."""
    src, dst = Path(args.src).absolute(), Path(args.dst).absolute()
    jobs = _jobs(src, dst)
    for _, out in jobs:
        _check_destination(out, args.force)
    converted: list[tuple[Converted, Path]] = [
        (
            convert_checkpoint(
                path, args.arch, args.num_classes, drop_head=args.drop_head, seed=args.seed
            ),
            out,
        )
        for path, out in jobs
    ]
    for result, out in converted:
        checkpoints.save_variables(
            out, result.variables, metadata=result.metadata(), force=args.force
        )
        report(
            f"{result.source} -> {out}: {result.arch}, {result.num_classes} classes "
            f"(head {result.head}), max |param| {result.max_abs_param():.4g}, "
            f"{len(result.dropped_keys)} dropped keys"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0, or 2 for bad input)."""
    args = _parser().parse_args(argv)
    try:
        run(args, report=functools.partial(print, flush=True))
    except (ConversionError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    # Conversion is a little host work: never take (or wait for) an accelerator for it.
    jax.config.update("jax_platforms", "cpu")
    sys.exit(main())
