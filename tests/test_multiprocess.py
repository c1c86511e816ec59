"""Multi-process runs (agre_jax/distributed.py) through the real main.py: processes on
localhost, CPU collectives over gloo, against one process of the same global batch.

The reference is 1 process x 4 devices. The same config then runs as 2 processes x 2 devices
with stages of its own: it trains its ERM teachers data-parallel over the 4 devices of both
processes (compared with the reference's teachers), process 0 fits the DFR heads, and it is
killed mid-distillation and rerun: a resumed run equals an uninterrupted one (checkpoints hold
the exact state and the batches depend on (seed, epoch) alone; tests/test_main.py checks that
in one process), so the rerun's student is compared with the reference's, which checks the
multi-process teachers, distillation and resume in one run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from agre_jax import checkpoints, distributed
from configs import tiny

ROOT = Path(__file__).resolve().parents[1]
# The tiny config: 2 teachers, 7 steps of 32 examples each; 30 distillation steps, a
# checkpoint every 5. The processes' all-reduces (gloo) sum in another order than one
# process's: the networks differ by float rounding. Measured: teachers 6.0e-7 and 4.8e-7;
# students 9.5e-7 (distilled from those teachers; 7e-7 from the same teachers).
ARGS = ["--config", "configs/tiny.py", "--config.progress=False"]
HEARTBEAT_S = 10


def _env(devices: int) -> dict[str, str]:
    """The test session's environment (its XLA options and compilation cache, conftest.py)
    with `devices` CPU devices per process, unbuffered output."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return {
        **os.environ,
        "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",  # a killed process's output up to its end
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir: Path, stages: Path, processes: int, devices: int) -> list[subprocess.Popen]:
    """`processes` main.py processes of one run, each with `devices` CPU devices; their
    output goes to files (`<workdir>.p<k>.out` / `.err`: pipes could fill and block one)."""
    port = _free_port()
    procs = []
    for p in range(processes):
        extra = []
        if processes > 1:
            extra = [
                f"--config.distributed.num_processes={processes}",
                f"--config.distributed.process_id={p}",
                f"--config.distributed.coordinator=localhost:{port}",
                f"--config.distributed.heartbeat_timeout_s={HEARTBEAT_S}",
            ]
        with open(f"{workdir}.p{p}.out", "w") as out, open(f"{workdir}.p{p}.err", "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "main.py", *ARGS, f"--workdir={workdir}"]
                + [f"--config.stage_dir={stages}", *extra],
                cwd=ROOT,
                env=_env(devices),
                stdout=out,
                stderr=err,
            )
        proc.logs = (Path(f"{workdir}.p{p}.out"), Path(f"{workdir}.p{p}.err"))
        procs.append(proc)
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 900) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process, once it has ended."""
    codes = [p.wait(timeout) for p in procs]
    return [
        (c, p.logs[0].read_text(), p.logs[1].read_text()) for c, p in zip(codes, procs, strict=True)
    ]


def _student(workdir: Path, which: str = "student_last") -> dict:
    return checkpoints.load_variables(workdir / "distill" / which)[0]


def _assert_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
    print(f"max abs difference {max(jax.tree.leaves(diffs)):.2g}")
    assert max(jax.tree.leaves(diffs)) <= atol, diffs


def test_two_processes_killed_and_resumed_equal_one_process(tmp_path):
    root = tmp_path
    ((code, out, err),) = _finish(_start(root / "one", root / "stages", 1, 4))
    assert code == 0, err[-3000:]
    assert "[teachers] pmap over 4 devices, 8 examples each" in out

    workdir = root / "two"
    procs = _start(workdir, root / "stages2", 2, 2)
    first = workdir / "distill" / "checkpoints" / "5"
    deadline = time.time() + 600
    while not first.exists():
        assert time.time() < deadline and procs[0].poll() is None, procs[0].logs[1].read_text()
        time.sleep(0.05)
    # Stop process 1 at once (process 0 then waits in the next collective), then kill it.
    procs[1].send_signal(signal.SIGSTOP)
    procs[1].kill()
    killed_at = time.time()
    code, _, err = _finish(procs[:1], timeout=120)[0]
    elapsed = time.time() - killed_at
    procs[1].wait()
    assert code != 0
    assert elapsed < 60, elapsed
    assert "another task died" in err or "unhealthy" in err, err[-2000:]
    assert not (workdir / "results.json").exists()
    # The killed attempt trained the teachers data-parallel over both processes, and they are
    # the one process's (process 1 fed its half of each batch, 8 examples per device).
    out0 = procs[0].logs[0].read_text()
    assert "[teachers] pmap over 2 devices in each of 2 processes, 8 examples each" in out0
    names = sorted(p.relative_to(root / "stages") for p in root.glob("stages/teachers-*/erm_*"))
    assert len(names) == 2
    for name in names:
        got, info = checkpoints.load_variables(root / "stages2" / name)
        want, want_info = checkpoints.load_variables(root / "stages" / name)
        _assert_close(got, want)
        assert info["epoch"] == want_info["epoch"] and info["val_wga"] == want_info["val_wga"]

    results = _finish(_start(workdir, root / "stages2", 2, 2))
    for p, (code, _, err) in enumerate(results):
        assert code == 0, f"process {p}: {err[-3000:]}"
    out0, out1 = results[0][1], results[1][1]
    assert "[distill] pmap over 2 devices in each of 2 processes, 4 examples each" in out0
    assert "[teachers] reusing" in out0 and "| student (best val WGA) |" in out0
    assert "[distill] resuming from the checkpoint at step" in out0
    assert out1 == ""  # process 0 prints (and writes) for the run
    for which in ("student_last", "student_best"):
        _assert_close(_student(workdir, which), _student(root / "one", which), atol=2e-6)
    one = json.loads((root / "one" / "results.json").read_text())
    two = json.loads((workdir / "results.json").read_text())
    for name in ("student (best val WGA)", "student (last)"):
        assert two["test"][name] == one["test"][name]
    # One writer: one record per step in the metrics, one TensorBoard file per attempt.
    records = [json.loads(line) for line in (workdir / "distill/metrics.jsonl").open()]
    keys = [(r["kind"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)) and max(k[1] for k in keys) == 30
    assert len(list((workdir / "distill/tensorboard").iterdir())) == 2


def _config(**distributed_keys):
    c = tiny.get_config()
    c.distributed.update(distributed_keys)
    return c


def test_spec_from_config_and_launcher():
    assert distributed.spec(_config(), environ={}) is None  # one process
    assert distributed.spec(_config(num_processes=1), environ={"SLURM_NTASKS": "4"}) is None
    s = distributed.spec(_config(num_processes=2, process_id=1, coordinator="h:123"), environ={})
    assert (s.coordinator, s.num_processes, s.process_id) == ("h:123", 2, 1)
    # 'auto' under a launcher of several tasks: jax.distributed reads the launcher's variables.
    s = distributed.spec(_config(), environ={"SLURM_NTASKS": "2"})
    assert (s.coordinator, s.num_processes, s.process_id) == ("", 0, -1)
    assert distributed.spec(_config(), environ={"SLURM_NTASKS": "1"}) is None
    assert distributed.spec(_config(), environ={"SLURM_NTASKS": "two"}) is None


@pytest.mark.parametrize(
    "keys, message",
    [
        (dict(num_processes=-1), "distributed.num_processes is -1"),
        (dict(num_processes=2, process_id=2, coordinator="h:1"), "distributed.process_id is 2"),
        (dict(num_processes=2, process_id=0), "distributed.coordinator is ''"),
        (dict(num_processes=2, process_id=0, coordinator="host"), "expected 'host:port'"),
        (dict(heartbeat_timeout_s=0), "distributed.heartbeat_timeout_s is 0"),
        (dict(initialization_timeout_s=10**11), "expected seconds in 1..604800"),
        (dict(num_processes=2, process_id=0, coordinator="h:99999"), "port 1-65535"),
        (dict(num_processes=2, process_id=0, coordinator=":1234"), "expected 'host:port'"),
        (dict(process_id=1, coordinator="h:1"), "but distributed.num_processes is 0"),
        (dict(num_processes=1, process_id=0), "but distributed.num_processes is 1"),
    ],
)
def test_bad_distributed_config(keys, message):
    from agre_jax import errors

    with pytest.raises(errors.ConfigError, match=message):
        distributed.spec(_config(**keys), environ={})


def test_a_process_with_another_config_is_refused(monkeypatch):
    """Process 0 publishes its config in the coordination store; another process compares its
    own with the run's identity rules (distributed.* may differ, anything else may not)."""
    from agre_jax import errors, workdir

    store: dict[str, str] = {}

    class Client:
        def key_value_set(self, key, value):
            store[key] = value

        def blocking_key_value_get(self, key, timeout_ms):
            return store[key]

    monkeypatch.setattr(distributed, "_client", Client)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    ours = tiny.get_config()
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    distributed.check_same_config(workdir.config_dict(ours), workdir.config_differences)
    assert "agre_jax/config" in store
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    same = tiny.get_config()
    same.distributed.process_id = 1
    distributed.check_same_config(workdir.config_dict(same), workdir.config_differences)
    other = tiny.get_config()
    other.distill.alpha = ours.distill.alpha + 1.0
    with pytest.raises(errors.ConfigError, match=r"process 1 .*another config.*alpha"):
        distributed.check_same_config(workdir.config_dict(other), workdir.config_differences)
