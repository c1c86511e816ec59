"""One run over several processes (hosts) with `jax.distributed`: who starts it, who writes,
and how the processes meet.

The design, in one place:
- `initialize(config)` (main.py, before JAX touches a device) starts `jax.distributed` when
  `distributed.num_processes` > 1, or when it is 0 ('auto') and SLURM or Open MPI launched
  several tasks (`SLURM_NTASKS`, `OMPI_COMM_WORLD_SIZE`); else nothing happens and the run is
  the one-process run it always was. On CPU the collectives go over gloo.
- Process 0 (the *primary*) alone prepares the data and checks every input, and alone fits
  the DFR heads (small, one device): the others wait in `PrimaryFirst` until it has, then read
  the same data and finished stages from the shared directories. A failure of process 0 there
  is passed to the others, which stop with its message.
- The trained stages span every device of every process: pretraining, the ERM teachers (and
  the trained biased model and Deep Ensemble) and the distillation run under `pmap` over the
  local devices, with their collectives (gradients, BatchNorm statistics, AGRE-KD's batch
  means) over the global batch. Each process feeds its own columns of each global batch
  (`Dataset.sharded`), and validation gathers every process's predictions (`allgather_rows`)
  before the group metrics, so every process keeps the same best weights. Whether such a
  stage is done already is process 0's answer (`stages.done_on_primary`): all train it or all
  read it; process 0 writes it and the others read it back after a `PrimaryFirst`.
- Only process 0 writes: files (`workdir.atomic_write_text`, `checkpoints.save_variables`),
  orbax checkpoints, metrics, TensorBoard events, progress bars and stdout. Every orbax object
  is confined to its own process (`orbax_options`), so no checkpoint waits for a peer.
- A process that dies stops the others: JAX's coordination service misses its heartbeats
  for `distributed.heartbeat_timeout_s` and terminates them with a message naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from agre_jax import errors

# Launchers whose environment says how many tasks make up the job (jax.distributed reads the
# rest of the cluster's description from them).
_LAUNCHER_SIZES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
_MAX_TIMEOUT_S = 7 * 24 * 3600  # JAX takes time-outs as 32-bit milliseconds
# How long a process waits for process 0's own sections (data preparation, DFR).
_WAIT_MS = 7 * 24 * 3600 * 1000


class DistributedError(RuntimeError):
    """Another process of the run failed; this one stops with its message."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """How to join a multi-process run (`jax.distributed.initialize`'s arguments).

    Attributes:
      coordinator: 'host:port' of process 0's coordination service ('' = from the launcher).
      num_processes: processes in the run (0 = from the launcher).
      process_id: this process's index (-1 = from the launcher).
      initialization_timeout_s: how long to wait for every process to join (s).
      heartbeat_timeout_s: after how long without a heartbeat a process counts as dead (s).
    """

    coordinator: str
    num_processes: int
    process_id: int
    initialization_timeout_s: int
    heartbeat_timeout_s: int


def spec(
    config: ml_collections.ConfigDict, environ: Mapping[str, str] | None = None
) -> Spec | None:
    """The multi-process settings of `config.distributed`, or None for a one-process run.

    Raises:
      errors.ConfigError: a value that cannot start a run (names the key and what is expected).
    """
    environ = os.environ if environ is None else environ
    d = config.distributed
    n, pid, coordinator = int(d.num_processes), int(d.process_id), str(d.coordinator)
    problems = []
    if n < 0:
        problems.append(f"distributed.num_processes is {n}; expected 0 (auto) or >= 1")
    if n > 1 and not 0 <= pid < n:
        problems.append(f"distributed.process_id is {pid}; expected 0..{n - 1}")
    host, _, port = coordinator.rpartition(":")
    if n > 1 and not (host.strip() == host != "" and port.isdigit() and 1 <= int(port) <= 65535):
        problems.append(
            f"distributed.coordinator is {coordinator!r}; expected 'host:port' of process 0 "
            "(port 1-65535)"
        )
    if n in (0, 1) and (pid != -1 or coordinator):
        problems.append(
            f"distributed.process_id ({pid}) / coordinator ({coordinator!r}) are set but "
            f"distributed.num_processes is {n}; set num_processes to the number of processes "
            "(or leave all three at their defaults)"
        )
    for key in ("initialization_timeout_s", "heartbeat_timeout_s"):
        if not 1 <= int(d[key]) <= _MAX_TIMEOUT_S:
            problems.append(
                f"distributed.{key} is {d[key]}; expected seconds in 1..{_MAX_TIMEOUT_S}"
            )
    if problems:
        raise errors.ConfigError("invalid config: " + "; ".join(problems))
    launched = any(_tasks(environ.get(k, "")) > 1 for k in _LAUNCHER_SIZES)
    if n == 1 or (n == 0 and not launched):
        return None
    return Spec(
        coordinator=coordinator if n > 1 else "",
        num_processes=n,
        process_id=pid if n > 1 else -1,
        initialization_timeout_s=int(d.initialization_timeout_s),
        heartbeat_timeout_s=int(d.heartbeat_timeout_s),
    )


def _tasks(value: str) -> int:
    """A launcher's task count from its environment variable (1 when unset or not a number)."""
    return int(value) if value.strip().isdigit() else 1


def initialize(s: Spec | None) -> None:
    """Joins the multi-process run `s` (no-op for None). Call it before any JAX computation.

    Raises:
      errors.ConfigError: the launcher's environment does not describe the cluster (e.g.
        SLURM_NTASKS > 1 outside `srun`).

    A coordinator that never answers makes JAX abort the process (exit status 134) after
    `initialization_timeout_s`, with its own message; that cannot be caught here.
    """
    if s is None:
        return
    explicit = s.num_processes > 1
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=s.coordinator if explicit else None,
            num_processes=s.num_processes if explicit else None,
            process_id=s.process_id if explicit else None,
            initialization_timeout=s.initialization_timeout_s,
            heartbeat_timeout_seconds=s.heartbeat_timeout_s,
        )
    except ValueError as e:  # auto-detection found no cluster description
        tasks = {k: os.environ[k] for k in _LAUNCHER_SIZES if k in os.environ}
        raise errors.ConfigError(
            f"cannot start a multi-process run from the launcher's environment {tasks} ({e}); "
            "launch every process with srun / mpirun, or set distributed.num_processes, "
            "process_id and coordinator, or distributed.num_processes=1 for one process"
        ) from e


def check_same_config(config: Mapping[str, Any], differences: Callable[[Any, Any], Any]) -> None:
    """Process 0 publishes its config; the others compare theirs (one process: nothing).

    Args:
      config: this process's config as JSON-compatible data (`workdir.config_dict`).
      differences: `(theirs, ours) -> names of the settings that differ` (the run's identity
        rules, `workdir.config_differences`; passed in so this module imports no workdir).

    Raises:
      errors.ConfigError: this process was started with another config than process 0.
    """
    if jax.process_count() == 1:
        return
    client, key = _client(), "agre_jax/config"
    config_json = json.dumps(config, sort_keys=True)
    if is_primary():
        client.key_value_set(key, config_json)
        return
    theirs = json.loads(client.blocking_key_value_get(key, 600_000))
    diff = differences(theirs, json.loads(config_json))
    if diff:
        raise errors.ConfigError(
            f"process {jax.process_index()} was started with another config than process 0 "
            f"(differences: {', '.join(sorted(diff)[:8])}); start every process with the same "
            "arguments but distributed.process_id"
        )


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; always true in one process)."""
    return jax.process_index() == 0


def orbax_options() -> Any:
    """orbax MultiprocessingOptions confining a checkpointer to this process: it writes and
    reads alone, with no barrier on the others (only process 0 saves; see the module doc)."""
    import orbax.checkpoint as ocp

    if jax.process_count() == 1:
        return ocp.options.MultiprocessingOptions()
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def _client() -> Any:
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialised")
    return client


class PrimaryFirst:
    """Process 0 runs a section before the others (which then only read what it wrote).

        with PrimaryFirst("the teacher stages") as gate:   # others wait here
            ...                                            # process 0: compute and write
            gate.release()                                 # the others may go on
            ...                                            # every process

    In one process it does nothing. If process 0 leaves the block by an exception before
    `release`, the others raise DistributedError with its message. Every process must enter
    the gates of a run in the same order (their keys are numbered).
    """

    _count = 0

    def __init__(self, what: str):
        self.what = what
        self._released = False
        PrimaryFirst._count += 1
        self._key = f"agre_jax/primary_first/{PrimaryFirst._count}"

    def __enter__(self) -> PrimaryFirst:
        if jax.process_count() > 1 and not is_primary():
            status = _client().blocking_key_value_get(self._key, _WAIT_MS)
            if status != "ok":
                raise DistributedError(
                    f"process 0 failed while preparing {self.what}: {status}; fix that and "
                    "rerun every process"
                )
            self._released = True
        return self

    def release(self) -> None:
        """Process 0: the section is complete on disk; lets the others go on."""
        if self._released:
            return
        self._released = True
        if jax.process_count() > 1 and is_primary():
            _client().key_value_set(self._key, "ok")

    def __exit__(self, kind, value, tb) -> None:
        if not self._released and jax.process_count() > 1 and is_primary():
            self._released = True
            message = f"{kind.__name__}: {value}" if kind else "it left without finishing"
            _client().key_value_set(self._key, message.splitlines()[0][:500] or kind.__name__)


def allgather(tree: Any) -> Any:
    """Every process's copy of `tree` (numpy leaves of equal shapes on every process), stacked
    on a new leading process axis [P, ...] in process order; [1, ...] in one process."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(x)[None], tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree))
