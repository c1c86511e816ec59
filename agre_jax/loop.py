"""A resumable epoch/step training loop shared by every trained stage (ERM teachers, student).

The loop owns what makes a run reproducible and robust: orbax checkpoints of the whole carry
(train state and best-so-far) every `checkpoint_every` steps and at every epoch end, resume
from the latest one at the exact step (the data of epoch e depends on (seed, e) alone), a
finite-loss check before anything is saved, progress bars, a one-line summary per epoch, and
metrics to `metrics.jsonl` and TensorBoard event files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm


class NonFiniteLossError(RuntimeError):
    """A stage produced a non-finite loss; the last good checkpoint is kept."""


class MetricsWriter:
    """Appends records to `<dir>/metrics.jsonl` and scalars to TensorBoard event files."""

    def __init__(self, directory: Path, tensorboard: bool = True):
        directory.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(directory / "metrics.jsonl", "a")  # noqa: SIM115
        self._tb = None
        if tensorboard:
            import tensorboardX

            self._tb = tensorboardX.SummaryWriter(str(directory / "tensorboard"))

    def write(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
        record = {"step": int(step), "kind": kind, "time": time.time(), **_plain(values)}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float | np.floating | np.integer) and math.isfinite(
                    float(value)
                ):
                    self._tb.add_scalar(f"{kind}/{key}", float(value), int(step))
            self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out[key] = _plain(value)
        elif isinstance(value, list | tuple):
            out[key] = [v.item() if hasattr(v, "item") else v for v in value]
        else:
            out[key] = value.item() if hasattr(value, "item") else value
    return out


@dataclasses.dataclass
class Loop:
    """One resumable training stage.

    Attributes:
      name: stage name, for messages ('teachers', 'distill').
      directory: holds `checkpoints/`, `metrics.jsonl` and `tensorboard/`.
      epochs, steps_per_epoch: the schedule.
      batches: (epoch, start_step) -> iterator over that epoch's batches from start_step on.
      step: (carry, batch, global_step) -> (carry, metrics with a scalar 'loss'; device values).
      evaluate: (carry, epoch) -> (carry, summary dict of Python values) at evaluation epochs;
        it may update a best-so-far inside the carry.
      eval_every: evaluate every this many epochs (and always after the last one).
      checkpoint_every: save every this many steps (and always at epoch ends).
      log_every: average step metrics over this many steps per record.
      summary: (epoch, train means, eval summary) -> one-line string.
      save_view, load_view: carry -> what is checkpointed, and back.
    """

    name: str
    directory: Path
    epochs: int
    steps_per_epoch: int
    batches: Callable[[int, int], Iterator[Any]]
    step: Callable[[Any, Any, int], tuple[Any, Mapping[str, jax.Array]]]
    evaluate: Callable[[Any, int], tuple[Any, dict[str, Any]]]
    eval_every: int = 1
    checkpoint_every: int = 200
    log_every: int = 20
    summary: Callable[[int, Mapping[str, float], Mapping[str, Any]], str] | None = None
    progress: bool = True
    # How the carry is checkpointed, e.g. without the device axis of a pmap-replicated state.
    save_view: Callable[[Any], Any] = lambda carry: carry
    load_view: Callable[[Any], Any] = lambda saved: saved

    def _manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=2, create=True, enable_async_checkpointing=False
        )
        return ocp.CheckpointManager((self.directory / "checkpoints").absolute(), options=options)

    def run(self, carry: Any) -> Any:
        """Runs (or resumes) the stage and returns the final carry."""
        total = self.epochs * self.steps_per_epoch
        if total < 1:
            raise ValueError(f"{self.name}: no training steps (epochs x steps_per_epoch = 0)")
        manager = self._manager()
        writer = MetricsWriter(self.directory)
        try:
            step = manager.latest_step() or 0
            if step:
                abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.save_view(carry))
                saved = manager.restore(step, args=ocp.args.StandardRestore(abstract))
                carry = self.load_view(saved)
                print(f"[{self.name}] resuming from the checkpoint at step {step}/{total}")
            while step < total:
                epoch, start = divmod(step, self.steps_per_epoch)
                carry, step = self._epoch(carry, epoch, start, step, manager, writer)
            return carry
        finally:
            writer.close()
            manager.close()

    def _epoch(self, carry, epoch, start, step, manager, writer):
        pending: list[tuple[int, Mapping[str, jax.Array]]] = []
        epoch_sums: dict[str, float] = {}
        epoch_count = 0
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=start,
            desc=f"{self.name} epoch {epoch + 1}/{self.epochs}",
            leave=False,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        t0 = time.time()
        for batch in self.batches(epoch, start):
            carry, metrics = self.step(carry, batch, step)
            step += 1
            pending.append((step, metrics))
            bar.update(1)
            epoch_end = step % self.steps_per_epoch == 0
            if len(pending) >= self.log_every or epoch_end or step % self.checkpoint_every == 0:
                means = self._flush(pending, writer)
                bar.set_postfix(loss=f"{means['loss']:.4g}")
                for k, v in means.items():
                    epoch_sums[k] = epoch_sums.get(k, 0.0) + v * len(pending)
                epoch_count += len(pending)
                pending = []
            if epoch_end:
                break
            if step % self.checkpoint_every == 0:
                manager.save(step, args=ocp.args.StandardSave(self.save_view(carry)))
        bar.close()
        if step % self.steps_per_epoch:
            raise RuntimeError(f"{self.name}: epoch {epoch} ended early at step {step}")
        summary = {}
        last = epoch + 1 == self.epochs
        if (epoch + 1) % self.eval_every == 0 or last:
            carry, summary = self.evaluate(carry, epoch)
            writer.write(step, "eval", {"epoch": epoch + 1, **summary})
        manager.save(step, args=ocp.args.StandardSave(self.save_view(carry)), force=True)
        means = {k: v / max(epoch_count, 1) for k, v in epoch_sums.items()}
        writer.write(step, "epoch", {"epoch": epoch + 1, "seconds": time.time() - t0, **means})
        line = (
            self.summary(epoch, means, summary)
            if self.summary
            else f"loss {means.get('loss', float('nan')):.4f}"
        )
        print(f"[{self.name}] epoch {epoch + 1}/{self.epochs} ({time.time() - t0:.0f} s): {line}")
        return carry, step

    def _flush(self, pending, writer) -> dict[str, float]:
        """Fetches pending step metrics, stops on a non-finite loss, logs their mean."""
        values = jax.device_get([m for _, m in pending])
        for (step, _), m in zip(pending, values, strict=True):
            loss = np.asarray(m["loss"])
            if not np.all(np.isfinite(loss)):
                raise NonFiniteLossError(
                    f"stage '{self.name}': non-finite loss ({loss.tolist()}) at step {step}; "
                    "stopped before saving it. The last good checkpoint is kept in "
                    f"{self.directory / 'checkpoints'}. Lower the learning rate, or check the "
                    "inputs and teachers."
                )
        means = {k: float(np.mean([np.mean(v[k]) for v in values])) for k in values[0]}
        writer.write(pending[-1][0], "train", means)
        return means
