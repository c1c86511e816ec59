"""A resumable epoch/step training loop shared by every trained stage (ERM teachers, student).

The loop owns what makes a run reproducible and robust: orbax checkpoints of the whole carry
(train state and best-so-far) every `checkpoint_every` steps and at every epoch end, resume
from the latest one at the exact step (the data of epoch e depends on (seed, e) alone), a
finite-loss check before anything is saved, progress bars, a one-line summary per epoch, and
metrics to `metrics.jsonl` and TensorBoard event files. A resume is invisible in those: what
an interrupted attempt logged after its last checkpoint is dropped, and the resumed epoch's
means are rebuilt from its logged steps, so the records equal an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import itertools
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

from agre_jax import distributed, errors, workdir


class NonFiniteLossError(RuntimeError):
    """A stage produced a non-finite loss; the last good checkpoint is kept."""


METRICS_FILE = "metrics.jsonl"
# Per-record bookkeeping in `metrics.jsonl`, never step metrics: 'steps' (how many steps a
# 'train' record averages) and 'seconds' (of a 'train' record: seconds into its epoch; of an
# 'epoch' record: the epoch's seconds, including those before an interruption up to the
# checkpoint it resumed from).
_RESERVED = frozenset({"step", "kind", "time", "steps", "seconds", "epoch"})


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The (line, record) pairs of a metrics.jsonl, without lines cut by a crash or that are not
    records, and with the last record of each (kind, step) only (files written before resumes
    truncated them could hold a step twice)."""
    if not path.exists():
        return []
    parsed = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "kind" in record:
            parsed.append((line, record))
    last = {(r["kind"], r["step"]): i for i, (_, r) in enumerate(parsed)}
    return [(line, r) for i, (line, r) in enumerate(parsed) if last[(r["kind"], r["step"])] == i]


class MetricsWriter:
    """Writes records to `<dir>/metrics.jsonl` and scalars to TensorBoard event files.

    `resume_step` is the step of the checkpoint a run resumes from (0: none, a fresh start).
    With `write` False (a process other than 0 of a multi-process run) it reads the records and
    writes nothing.
    What was logged after it belongs to an interrupted attempt and is redone: the file is first
    rewritten (atomically) with the records up to it only, and TensorBoard is told to hide the
    points after it (`purge_step`). None appends to what is there. `records` holds the records
    kept.
    """

    def __init__(
        self,
        directory: Path,
        tensorboard: bool = True,
        resume_step: int | None = None,
        write: bool = True,
    ):
        path = directory / METRICS_FILE
        old = path.read_text() if path.exists() else ""
        last = math.inf if resume_step is None else resume_step
        kept = [(line, r) for line, r in read_records(path) if r["step"] <= last]
        self.records = [r for _, r in kept]
        self._jsonl = self._tb = None
        if not write:
            return
        directory.mkdir(parents=True, exist_ok=True)
        text = "".join(line + "\n" for line, _ in kept)
        if text != old:
            workdir.atomic_write_text(path, text)
        self._jsonl = open(path, "a")  # noqa: SIM115
        if tensorboard:
            import tensorboardX

            # tensorboardX names event files by the second and host, and opens them with 'wb':
            # the suffix keeps an attempt from truncating the file of an earlier one started in
            # the same second (and sorts attempts in order of their resume step).
            self._tb = tensorboardX.SummaryWriter(
                str(directory / "tensorboard"),
                purge_step=None if resume_step is None else resume_step + 1,
                filename_suffix=f".from{resume_step or 0:010d}",
            )

    def write(
        self,
        step: int,
        kind: str,
        values: Mapping[str, Any],
        bookkeeping: Mapping[str, Any] | None = None,
    ) -> None:
        """Appends a record {step, kind, time, **bookkeeping, **values}; `values` (not the
        bookkeeping) also go to TensorBoard as `kind/key`."""
        if self._jsonl is None:
            return
        record = {
            "step": int(step),
            "kind": kind,
            "time": time.time(),
            **_plain(bookkeeping or {}),
            **_plain(values),
        }
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
        if self._jsonl is not None:
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
class _EpochSoFar:
    """What an epoch accumulated before its current attempt (zero when it starts afresh)."""

    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    count: int = 0
    seconds: float = 0.0

    def add(self, means: Mapping[str, float], steps: int) -> None:
        # The one place where step means are summed, live and when rebuilt from metrics.jsonl:
        # same order, same arithmetic, so a resumed epoch's means are the same floats.
        for k, v in means.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * steps
        self.count += steps

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


@dataclasses.dataclass
class Loop:
    """One resumable training stage.

    Attributes:
      name: stage name, for messages ('teachers', 'distill').
      directory: holds `checkpoints/`, `metrics.jsonl` and `tensorboard/`.
      epochs, steps_per_epoch: the schedule.
      batches: (epoch, start_step) -> iterator over that epoch's batches from start_step on.
      step: (carry, batch, global_step) -> (carry, metrics with a scalar 'loss'; device values).
        Metric names must not be one of 'step', 'kind', 'time', 'steps', 'seconds', 'epoch'.
      evaluate: (carry, epoch) -> (carry, summary dict of Python values) at evaluation epochs;
        it may update a best-so-far inside the carry.
      eval_every: evaluate every this many epochs (and always after the last one).
      checkpoint_every: save every this many steps (and always at epoch ends).
      log_every: average step metrics over this many steps per record.
      summary: (epoch, train means, eval summary) -> one-line string.
      save_view, load_view: carry -> what is checkpointed, and back.
      input_chunk: on CPU, the batches are pulled `input_chunk` at a time while the device is
        idle, then stepped through (0: pulled one by one, overlapping the computation). On
        the 2-core CPU, tf.data's threads producing the next batch while XLA computed slowed
        the default's teacher step from 0.30 to 0.53 s, though producing the 5 teachers'
        batches alone takes 0.025 s a step: the threads of both compete for the cores.

    After `run`, `seconds` is the stage's training wall time: the sum of the 'seconds' of all
    its 'epoch' records, those written before an interruption included (the time an
    interrupted attempt spent after its last checkpoint is lost work and not counted).

    metrics.jsonl records (one JSON object a line, each with 'step', 'kind' and 'time'):
      'train': the means of the step metrics over the `steps` steps up to `step`, and
        `seconds` into the epoch;
      'eval': `epoch` (1-based) and the evaluation summary;
      'epoch': `epoch`, `seconds` and the means of the step metrics over the epoch.
    A resumed stage writes the same records as an uninterrupted one, 'time' and 'seconds'
    aside: the records after its checkpoint are dropped and the epoch in progress is rebuilt
    from its 'train' records.
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
    input_chunk: int = dataclasses.field(
        default_factory=lambda: 20 if jax.default_backend() == "cpu" else 0
    )
    # Set by `run`: the stage's training wall time in seconds (see above).
    seconds: float = dataclasses.field(default=0.0, init=False)
    # The step of the last checkpoint saved or restored (0: none yet).
    _saved: int = dataclasses.field(default=0, init=False, repr=False)

    def _manager(self) -> ocp.CheckpointManager:
        # Confined to this process: in a multi-process run process 0 saves, and every process
        # restores the same step on its own (agre_jax/distributed.py); orbax then leaves the
        # directory to us.
        single = jax.process_count() == 1
        if not single and distributed.is_primary():
            self._checkpoints().mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=2,
            create=single,
            enable_async_checkpointing=False,
            multiprocessing_options=distributed.orbax_options(),
        )
        return ocp.CheckpointManager(self._checkpoints().absolute(), options=options)

    def _checkpoints(self) -> Path:
        return self.directory / "checkpoints"

    def run(self, carry: Any) -> Any:
        """Runs (or resumes) the stage and returns the final carry; sets `self.seconds`."""
        total = self.epochs * self.steps_per_epoch
        if total < 1:
            raise ValueError(f"{self.name}: no training steps (epochs x steps_per_epoch = 0)")
        manager = self._manager()
        writer = None
        try:
            step = manager.latest_step() or 0
            if step:
                if jax.process_count() == 1:
                    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.save_view(carry))
                else:  # saved as numpy (see _save): restored as numpy, then put on the device
                    abstract = jax.device_get(self.save_view(carry))
                try:
                    saved = manager.restore(step, args=ocp.args.StandardRestore(abstract))
                    if jax.process_count() > 1:
                        saved = jax.device_put(saved)
                except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many types
                    raise errors.WorkdirError(
                        f"cannot restore the {self.name} checkpoint at step {step} in "
                        f"{self.directory / 'checkpoints' / str(step)} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); it is damaged: "
                        "delete that step's folder to resume from an earlier checkpoint, or "
                        "pass --overwrite to start the run's own stages again"
                    ) from e
                carry = self.load_view(saved)
                print(f"[{self.name}] resuming from the checkpoint at step {step}/{total}")
            self._saved = step
            # Only once the checkpoint is restored: the records after it are dropped.
            writer = MetricsWriter(self.directory, resume_step=step, write=distributed.is_primary())
            self.seconds = sum(
                float(r.get("seconds", 0.0)) for r in writer.records if r["kind"] == "epoch"
            )
            while step < total:
                epoch, start = divmod(step, self.steps_per_epoch)
                so_far = self._so_far(writer.records, epoch, step) if start else _EpochSoFar()
                carry, step = self._epoch(carry, epoch, start, step, so_far, manager, writer)
            return carry
        finally:
            if writer is not None:
                writer.close()
            manager.close()

    def _so_far(self, records, epoch: int, step: int) -> _EpochSoFar:
        """The partial sums of `epoch` up to the checkpoint at `step`, from its 'train'
        records (in the order they were accumulated)."""
        first = epoch * self.steps_per_epoch
        so_far = _EpochSoFar()
        previous = first
        for r in records:
            if r["kind"] != "train" or not first < r["step"] <= step:
                continue
            # Records written before 'steps' was logged: a record covers the steps since the
            # previous one.
            steps = int(r.get("steps", r["step"] - previous))
            so_far.add({k: v for k, v in r.items() if k not in _RESERVED}, steps)
            so_far.seconds = float(r.get("seconds", so_far.seconds))
            previous = r["step"]
        if so_far.count != step - first:
            print(
                f"[{self.name}] warning: {self.directory / METRICS_FILE} logs {so_far.count} of "
                f"the {step - first} steps of epoch {epoch + 1} before the checkpoint at step "
                f"{step}; that epoch's means cover the steps logged only"
            )
        return so_far

    def _epoch(self, carry, epoch, start, step, so_far, manager, writer):
        pending: list[tuple[int, Mapping[str, jax.Array]]] = []
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=start,
            desc=f"{self.name} epoch {epoch + 1}/{self.epochs}",
            leave=False,
            disable=not self.progress or not distributed.is_primary(),
            dynamic_ncols=True,
        )
        t0 = time.time() - so_far.seconds
        # `lambda: carry` reads the newest carry each time the feed waits for the device.
        batches = self._feed(
            self.batches(epoch, start), self.steps_per_epoch - start, lambda: carry
        )
        for batch in batches:
            carry, metrics = self.step(carry, batch, step)
            step += 1
            pending.append((step, metrics))
            bar.update(1)
            epoch_end = step % self.steps_per_epoch == 0
            if len(pending) >= self.log_every or epoch_end or step % self.checkpoint_every == 0:
                means = self._flush(pending, writer, time.time() - t0)
                bar.set_postfix(loss=f"{means['loss']:.4g}")
                so_far.add(means, len(pending))
                pending = []
            if epoch_end:
                break
            if step % self.checkpoint_every == 0:
                self._save(manager, step, carry)
        bar.close()
        if step % self.steps_per_epoch:
            raise RuntimeError(f"{self.name}: epoch {epoch} ended early at step {step}")
        summary = {}
        last = epoch + 1 == self.epochs
        if (epoch + 1) % self.eval_every == 0 or last:
            carry, summary = self.evaluate(carry, epoch)
            writer.write(step, "eval", {"epoch": epoch + 1, **summary})
        means = so_far.means()
        seconds = time.time() - t0
        # Written before the checkpoint that ends the epoch: every record up to a checkpoint's
        # step is in metrics.jsonl once that checkpoint exists.
        writer.write(step, "epoch", {"epoch": epoch + 1, "seconds": seconds, **means})
        self._save(manager, step, carry, force=True)
        self.seconds += seconds
        line = (
            self.summary(epoch, means, summary)
            if self.summary
            else f"loss {means.get('loss', float('nan')):.4f}"
        )
        print(f"[{self.name}] epoch {epoch + 1}/{self.epochs} ({seconds:.0f} s): {line}")
        return carry, step

    def _save(self, manager: ocp.CheckpointManager, step: int, carry: Any, force=False) -> None:
        """Checkpoints the carry at `step` (process 0 only in a multi-process run)."""
        if distributed.is_primary():
            view = self.save_view(carry)
            if jax.process_count() > 1:  # orbax refuses host-local jax.Arrays across processes
                view = jax.device_get(view)
            manager.save(step, args=ocp.args.StandardSave(view), force=force)
        self._saved = step

    def _feed(self, batches: Iterator[Any], count: int, carry: Callable[[], Any]) -> Iterator[Any]:
        """The first `count` of `batches`, pulled `input_chunk` at a time once the device has
        finished the steps dispatched so far (see `input_chunk`); unchanged when it is 0.
        Never pulls past `count`: running a tf.data iterator of the teachers' five streams
        to its end took minutes (the loop stops at the epoch's last step instead)."""
        if self.input_chunk <= 0:
            yield from itertools.islice(batches, count)
            return
        while count > 0:
            jax.block_until_ready(carry())
            chunk = list(itertools.islice(batches, min(self.input_chunk, count)))
            if not chunk:
                return
            count -= len(chunk)
            yield from chunk

    def _flush(self, pending, writer, seconds: float) -> dict[str, float]:
        """Fetches pending step metrics, stops on a non-finite loss, logs their mean."""
        values = jax.device_get([m for _, m in pending])
        for (step, _), m in zip(pending, values, strict=True):
            loss = np.asarray(m["loss"])
            if not np.all(np.isfinite(loss)):
                raise NonFiniteLossError(
                    f"stage '{self.name}': non-finite loss ({loss.tolist()}) at step {step}; "
                    f"stopped before saving it. {self._last_good()} Lower the learning rate, "
                    "or check the inputs and teachers."
                )
        reserved = sorted(_RESERVED.intersection(values[0]))
        if reserved:
            raise ValueError(
                f"stage '{self.name}': step metric names {reserved} are reserved for the "
                "records of metrics.jsonl; rename them"
            )
        means = {k: float(np.mean([np.mean(v[k]) for v in values])) for k in values[0]}
        writer.write(pending[-1][0], "train", means, {"steps": len(pending), "seconds": seconds})
        return means

    def _last_good(self) -> str:
        total = self.epochs * self.steps_per_epoch
        if self._saved:
            return (
                f"The last good checkpoint is the one at step {self._saved}/{total}, kept in "
                f"{self._checkpoints() / str(self._saved)}; a rerun resumes from it."
            )
        first = min(self.checkpoint_every, self.steps_per_epoch)
        return (
            f"No checkpoint has been saved yet (the first is due at step {first}/{total}); a "
            "rerun starts the stage over."
        )
