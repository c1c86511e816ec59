"""The resumable loop: an interrupted and resumed stage writes the same metrics.jsonl records
(and TensorBoard points) as an uninterrupted one, 'time' and 'seconds' aside, reaches the same
parameters, reports its total training time, and names its last checkpoint on a non-finite
loss. A toy linear model with a pure-jnp step keeps each run well under a second."""

import json
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agre_jax import loop

EPOCHS, STEPS_PER_EPOCH, BATCH = 3, 8, 4
CHECKPOINT_EVERY, LOG_EVERY = 3, 2  # records of 1 and 2 steps; checkpoints mid-epoch and at ends
TOTAL = EPOCHS * STEPS_PER_EPOCH
_rng = np.random.default_rng(0)
X = _rng.normal(size=(STEPS_PER_EPOCH * BATCH, 3)).astype(np.float32)
Y = (X @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3).astype(np.float32)


class Interrupted(Exception):
    """Stands for a kill: raised by the step at a chosen global step."""


def init():
    return {
        "params": {"w": jnp.zeros(3), "b": jnp.zeros(())},
        "best_loss": jnp.asarray(jnp.inf),
    }


def batches(epoch, start):
    order = np.random.default_rng(epoch).permutation(len(X))
    for i in range(start, STEPS_PER_EPOCH):
        idx = order[i * BATCH : (i + 1) * BATCH]
        yield X[idx], Y[idx]


@jax.jit
def _update(carry, x, y):
    def loss_fn(p):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(carry["params"])
    params = jax.tree.map(lambda p, g: p - 0.05 * g, carry["params"], grads)
    metrics = {
        "loss": loss,
        "abs_err": jnp.abs(x @ params["w"] + params["b"] - y),
        "b": params["b"],
    }
    return {**carry, "params": params}, metrics


def make_step(fail_at=None, nan_at=None):
    def step(carry, batch, global_step):
        if global_step == fail_at:
            raise Interrupted(f"killed at step {global_step}")
        carry, metrics = _update(carry, *batch)
        if global_step == nan_at:
            metrics = {**metrics, "loss": metrics["loss"] * jnp.nan}
        return carry, metrics

    return step


def evaluate(carry, epoch):
    p = carry["params"]
    loss = jnp.mean((X @ p["w"] + p["b"] - Y) ** 2)
    best = jnp.minimum(carry["best_loss"], loss)
    return {**carry, "best_loss": best}, {"loss": float(loss), "best_loss": float(best)}


def run(directory, input_chunk=None, batches=batches, step=None, **step_kwargs):
    chunk = {} if input_chunk is None else {"input_chunk": input_chunk}
    stage = loop.Loop(
        name="toy",
        directory=directory,
        epochs=EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        batches=batches,
        step=step or make_step(**step_kwargs),
        evaluate=evaluate,
        eval_every=2,
        checkpoint_every=CHECKPOINT_EVERY,
        log_every=LOG_EVERY,
        progress=False,
        **chunk,
    )
    carry = stage.run(init())
    return stage, carry


def records(directory):
    lines = (directory / loop.METRICS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines]


def without_times(rs):
    return [{k: v for k, v in r.items() if k not in ("time", "seconds")} for r in rs]


def tensorboard_points(directory):
    """(tag, step, value) as TensorBoard shows them: event files in name order, the points
    at or after a restart's purge step (SessionLog.START) dropped."""
    from tensorboardX.proto import event_pb2

    points = []
    for path in sorted((directory / "tensorboard").glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            if event.session_log.status == event_pb2.SessionLog.START:
                points = [p for p in points if p[1] < event.step]
            points += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return sorted(p for p in points if p[0] != "epoch/seconds")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    stage, carry = run(directory)
    return directory, stage, carry, records(directory)


def assert_same_run(directory, stage, carry, reference):
    ref_dir, ref_stage, ref_carry, ref_records = reference
    got = records(directory)
    assert without_times(got) == without_times(ref_records)
    for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(ref_carry), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tensorboard_points(directory) == tensorboard_points(ref_dir)
    epoch_seconds = [r["seconds"] for r in got if r["kind"] == "epoch"]
    assert len(epoch_seconds) == EPOCHS
    assert stage.seconds == pytest.approx(sum(epoch_seconds))


def test_uninterrupted_records(reference):
    directory, stage, _, rs = reference
    kinds = [(r["kind"], r["step"]) for r in rs]
    assert len(set(kinds)) == len(kinds)
    assert [r["step"] for r in rs if r["kind"] == "epoch"] == [8, 16, 24]
    assert [r["epoch"] for r in rs if r["kind"] == "eval"] == [2, 3]
    train = [r for r in rs if r["kind"] == "train"]
    assert sum(r["steps"] for r in train) == TOTAL
    assert {r["steps"] for r in train} == {1, 2}
    assert stage.seconds == pytest.approx(sum(r["seconds"] for r in rs if r["kind"] == "epoch"))
    assert stage.seconds > 0


@pytest.mark.parametrize(
    "fail_at, resumes_from",
    [
        (14, 12),  # mid-epoch; records at steps 13-14 logged before the kill are redone
        (16, 16),  # the first step of epoch 3: resumes at the epoch boundary
        (2, 0),  # before the first checkpoint: starts over, over an old metrics.jsonl
    ],
)
def test_interrupted_and_resumed_run_matches(tmp_path, reference, fail_at, resumes_from, capsys):
    with pytest.raises(Interrupted):
        run(tmp_path, fail_at=fail_at)
    before = records(tmp_path)
    assert max(r["step"] for r in before) == (fail_at // LOG_EVERY) * LOG_EVERY
    with (tmp_path / loop.METRICS_FILE).open("a") as f:
        f.write('{"step": 99, "kind": "tra')  # a line cut by the kill
    stage, carry = run(tmp_path)
    if resumes_from:
        assert (
            f"resuming from the checkpoint at step {resumes_from}/{TOTAL}"
            in capsys.readouterr().out
        )
    assert_same_run(tmp_path, stage, carry, reference)
    # The records up to the checkpoint are kept as they were, and the resumed epoch's seconds
    # include those spent on it before the interruption.
    kept = [r for r in before if r["step"] <= resumes_from]
    assert records(tmp_path)[: len(kept)] == kept
    if resumes_from % STEPS_PER_EPOCH:
        done_before = [r["seconds"] for r in kept if r["kind"] == "train"][-1]
        epoch_end = -(-resumes_from // STEPS_PER_EPOCH) * STEPS_PER_EPOCH
        (resumed,) = [
            r for r in records(tmp_path) if r["kind"] == "epoch" and r["step"] == epoch_end
        ]
        assert resumed["seconds"] > done_before


def test_rerun_of_a_finished_stage_changes_nothing(tmp_path, reference):
    ref_dir, ref_stage, _, ref_records = reference
    directory = tmp_path / "copy"
    shutil.copytree(ref_dir, directory)
    stage, carry = run(directory, fail_at=0)  # trains no step
    assert records(directory) == ref_records
    assert stage.seconds == pytest.approx(ref_stage.seconds)
    assert_same_run(directory, stage, carry, reference)


def test_non_finite_loss_names_the_last_checkpoint(tmp_path):
    with pytest.raises(loop.NonFiniteLossError) as info:
        run(tmp_path / "late", nan_at=10)
    message = str(info.value)
    assert "at step 11" in message
    assert f"last good checkpoint is the one at step 9/{TOTAL}" in message
    assert str(tmp_path / "late" / "checkpoints" / "9") in message
    assert (tmp_path / "late" / "checkpoints" / "9").is_dir()

    with pytest.raises(loop.NonFiniteLossError) as info:
        run(tmp_path / "early", nan_at=1)
    assert f"No checkpoint has been saved yet (the first is due at step 3/{TOTAL})" in str(
        info.value
    )


def test_damaged_checkpoint_is_one_workdir_error(tmp_path):
    """A checkpoint damaged on disk (here: every data file overwritten) is refused with one
    message naming it and saying what to do, not orbax's tracebacks."""
    from agre_jax import errors

    with pytest.raises(Interrupted):
        run(tmp_path, fail_at=14)
    step_dir = tmp_path / "checkpoints" / "12"
    for f in step_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(errors.WorkdirError, match="cannot restore the toy checkpoint at step 12"):
        run(tmp_path)


def test_input_is_pulled_in_chunks_with_the_device_idle(tmp_path, reference):
    """input_chunk 3: batches are pulled three at a time, each chunk after the steps before
    it (CPU: tf.data's threads then never compete with XLA's); same run as pulling them one
    by one (input_chunk 0)."""
    events = []

    def logged(epoch, start):
        for i, batch in enumerate(batches(epoch, start)):
            events.append(("pull", epoch, start + i))
            yield batch

    def step(carry, batch, global_step):
        events.append(("step", global_step))
        return _update(carry, *batch)

    _, carry = run(tmp_path / "chunked", input_chunk=3, batches=logged, step=step)
    first_epoch = [e[0] for e in events[: 2 * STEPS_PER_EPOCH]]
    assert (
        first_epoch
        == ["pull"] * 3 + ["step"] * 3 + ["pull"] * 3 + ["step"] * 3 + ["pull"] * 2 + ["step"] * 2
    )
    assert without_times(records(tmp_path / "chunked")) == without_times(reference[3])
    jax.tree.map(np.testing.assert_array_equal, carry, reference[2])
    unchunked, carry0 = run(tmp_path / "one_by_one", input_chunk=0)
    assert unchunked.input_chunk == 0
    jax.tree.map(np.testing.assert_array_equal, carry0, reference[2])
