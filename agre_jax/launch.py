"""Sweep runs as jobs: the 'local' and 'slurm' launchers of `sweep.launcher`, through submitit.

Each variant x seed of a sweep is one submitit job running `train.train_and_evaluate(config,
<dir>/runs/<variant>/seed<k>)` (`RunJob`). With 'local' the jobs are processes on this machine,
`sweep.local.jobs` at once, each with its own `sweep.local.gpus_per_job` GPUs
(CUDA_VISIBLE_DEVICES); on a machine without a visible GPU `gpus_per_job` is ignored (one line
says so) and the jobs run on the CPU. With 'slurm' they are sbatch jobs (`sweep.slurm.*`), the
parallel ones one job array; `sweep.slurm.additional_parameters` adds sbatch options but may
not set one that the launcher sets itself (`SLURM_OWN_OPTIONS`). This process submits them,
waits, and writes the report as they finish.

A run's `dtype='auto'` is resolved in the process that trains it (`run_one`, in the job), on
the backend the job has, not in this process, which may have no GPU (a SLURM login node) or
be kept on the CPU (`leave_accelerators_to_jobs`).

Preemption and time limits: `RunJob` is a `submitit.helpers.Checkpointable`. On the signal that
precedes a preemption or a time-out (SIGUSR2), submitit requeues the same job (at most
`sweep.slurm.max_num_timeout` times for time-outs), and the requeued job resumes the run from
its own checkpoints (every run is resumable). A job that dies otherwise (killed, node lost)
leaves the run unfinished and its `error.txt`; running the sweep command again resumes it,
skips finished runs and rewrites the report from every finished run.

Shared stages, leaders first: a sweep's runs share its teacher, DFR and pretraining stages
(and the prepared data set) in <dir>/stages/, written in place while they are computed; two
jobs computing one stage at once would write the same files. So the runs are grouped by
their config without the keys only the student's stage reads (`STUDENT_KEYS`): the runs of a
group need the same stages. One run per group, its leader, runs first, one job at a time,
leaders of different groups one after another too (groups can share a stage: one teacher
group of two, a pretrained network); a failed leader hands over to its group's next run.
Then every other run only reads finished stages, and those run in parallel. The price: a
sweep takes at least its leaders' time in a row (one group in a methods sweep, one per
ensemble in configs/sweeps/ensemble_size.py).

Only this process writes the report (`report.write_report`) and the sweep's files; each job
writes only its own run directory (its error.txt included).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections

from agre_jax import errors, sweep, workdir
from agre_jax.settings import resolve_dtype


def _import_submitit() -> Any:
    """submitit, imported without its logging set-up: on first import it calls
    `logging.config.dictConfig`, which removes and closes every handler already installed,
    and absl's handler then closes its stream whenever that is not the current sys.stderr
    (a redirected or captured stderr: pytest's capture was closed under the test suite). Its
    logger gets the same two handlers here instead (every record to stdout, warnings also to
    stderr); SUBMITIT_LOG_LEVEL, when set, is submitit's own as before."""
    if "submitit" in sys.modules or os.environ.get("SUBMITIT_LOG_LEVEL") is not None:
        import submitit

        return submitit
    os.environ["SUBMITIT_LOG_LEVEL"] = "NOCONFIG"
    try:
        import submitit
    finally:
        del os.environ["SUBMITIT_LOG_LEVEL"]  # the jobs' environment: submitit's default
    formatter = logging.Formatter("%(name)s %(levelname)s (%(asctime)s) - %(message)s")
    logger = logging.getLogger("submitit")
    logger.setLevel(logging.INFO)
    for stream, level in ((sys.stdout, logging.DEBUG), (sys.stderr, logging.WARNING)):
        handler = logging.StreamHandler(stream)
        handler.setLevel(level)
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return submitit


submitit = _import_submitit()

JOBS_DIR = "jobs"  # in the sweep directory: submitit's pickles and each job's log
# Keys read by the student's (distillation) stage only, never by a shared stage: runs that
# differ only here need the same teacher, DFR and pretraining stages.
STUDENT_KEYS = ("seed", "distill", "train", "progress")
LOCAL_TIMEOUT_MIN = 365 * 24 * 60  # local jobs have no time limit
POLL_S = {"local": 1.0, "slurm": 30.0}  # how often the job states are read
# submitit's executor of each launcher ('debug' runs jobs in this process: tests).
CLUSTER = {"local": "local", "slurm": "slurm"}
# sbatch options that the slurm launcher sets itself (`make_executor`, and submitit for the
# job's logs and requeue signal), with where each comes from: `sweep.slurm.additional_parameters`
# may not set them (submitit would let it override them silently). Keys as sbatch's long
# options with '_' for '-'.
SLURM_OWN_OPTIONS = {
    "partition": "sweep.slurm.partition",
    "time": "sweep.slurm.time_min",
    "gpus_per_node": "sweep.slurm.gpus_per_job",
    "gpus": "sweep.slurm.gpus_per_job",
    "gpus_per_task": "sweep.slurm.gpus_per_job",
    "cpus_per_task": "sweep.slurm.cpus_per_task",
    "mem": "sweep.slurm.mem_gb",
    "account": "sweep.slurm.account",
    "qos": "sweep.slurm.qos",
    "array": "sweep.slurm.array_parallelism",
    "job_name": "the sweep's name (agre-jax sets it)",
    "nodes": "agre-jax (one node per job: a sweep's run is one process)",
    "ntasks": "agre-jax (one task per job: a sweep's run is one process)",
    "ntasks_per_node": "agre-jax (one task per job: a sweep's run is one process)",
    "output": "submitit (the job's log, DIR/jobs/)",
    "error": "submitit (the job's log, DIR/jobs/)",
    "open_mode": "submitit (the job's log, DIR/jobs/)",
    "signal": "submitit (the signal before a time-out that requeues the job)",
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One variant x seed (made by `sweep_runner.plan`): its directory and complete config."""

    variant: str
    seed: int
    directory: Path
    config: ml_collections.ConfigDict


def run_one(
    config: ml_collections.ConfigDict,
    run_dir: Path,
    overwrite: bool,
    train_fn: Callable[..., Any],
) -> dict[str, Any]:
    """`train_fn(config, run_dir, overwrite=overwrite)`: runs (or resumes) one run. A failure
    is written to `<run_dir>/error.txt` (message and traceback) and returned, never raised, so
    that the other runs go on.

    Returns:
      {'status': 'done'} or {'status': 'failed', 'error': one line, 'bad_input': whether it
      was an `errors.UserError` (config, data, workdir, checkpoint)}.
    """
    error_file = Path(run_dir) / sweep.ERROR_FILE
    error_file.unlink(missing_ok=True)
    try:
        # 'auto' becomes this process's dtype here, so that the run's recorded config and
        # stage keys hold the resolved name (the same stages as a run given it by name).
        train_fn(resolve_dtype(config), run_dir, overwrite=overwrite)
    except Exception as e:  # noqa: BLE001 -- one failed run must not stop the sweep
        message = f"{type(e).__name__}: {e}"
        workdir.atomic_write_text(error_file, f"{message}\n\n{traceback.format_exc()}")
        print(f"run {run_dir} failed: {message} (traceback in {error_file})", file=sys.stderr)
        return {"status": "failed", "error": message, "bad_input": isinstance(e, errors.UserError)}
    return {"status": "done"}


@dataclasses.dataclass(frozen=True)
class RunJob(submitit.helpers.Checkpointable):
    """One run as a submitit job (pickled to the job with its config).

    Attributes:
      config: the run's complete config.
      directory: the run directory.
      overwrite: replace the run's outputs made with another config (first attempt only).
      train_fn: `(config, run_dir, overwrite=)`, e.g. `train.train_and_evaluate`.
      compilation_cache: JAX's persistent compilation cache directory for the job ('' none).
    """

    config: ml_collections.ConfigDict
    directory: Path
    overwrite: bool
    train_fn: Callable[..., Any]
    compilation_cache: str = ""

    def __call__(self) -> dict[str, Any]:
        """`run_one` in the job; its outcome is the job's result."""
        if self.compilation_cache and not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", self.compilation_cache)
        return run_one(self.config, self.directory, self.overwrite, self.train_fn)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """What submitit requeues after a preemption or time-out: the same run, which resumes
        from its own checkpoints; never `overwrite` again (that would drop them)."""
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self, overwrite=False))


def stage_group(config: ml_collections.ConfigDict) -> str:
    """A key shared by runs that need the same shared stages: a hash of the run config
    without `STUDENT_KEYS` (conservative: any other difference makes another group)."""
    data = workdir.config_dict(config)
    for key in STUDENT_KEYS:
        data.pop(key, None)
    return workdir.key_of(data)


def leave_accelerators_to_jobs(settings: dict[str, Any]) -> None:
    """In the process that submits jobs: JAX on the CPU only (the run configs are validated
    here, which starts a JAX backend), so that it holds no GPU memory that local jobs need.
    Unless JAX_PLATFORMS / jax_platforms is set, or the launcher is 'inline'."""
    if settings["launcher"] != "inline" and not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")


def visible_gpus() -> list[int]:
    """The GPU indices jobs can be given: CUDA_VISIBLE_DEVICES's entries when it is set,
    else those `nvidia-smi -L` lists, else none. Raises SweepError for entries that are not
    indices (UUIDs): submitit's local executor takes indices."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        entries = [x.strip() for x in env.split(",") if x.strip()]
        if entries and entries[0] == "-1":
            return []
        if not all(x.isdigit() for x in entries):
            raise sweep.SweepError(
                f"CUDA_VISIBLE_DEVICES is {env!r}; the local launcher needs GPU indices "
                "(e.g. 0,1,2,3) to give each job its own"
            )
        return [int(x) for x in entries]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return list(range(sum(line.startswith("GPU ") for line in out.splitlines())))


def local_slots(local: dict[str, Any], gpus: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """The local launcher's job slots, each the GPU indices of the job that runs in it.

    Args:
      local: `sweep.launcher_of(config)['local']` (jobs, gpus_per_job).
      gpus: the visible GPUs (default `visible_gpus()`).

    Returns:
      Without GPUs (or gpus_per_job 0): `jobs` (0 means 1) slots of no GPU. With GPUs: one slot
      per `gpus_per_job` of them, or `jobs` slots when given.

    Raises:
      SweepError: more GPUs asked for than are visible.
    """
    gpus = visible_gpus() if gpus is None else list(gpus)
    jobs, per_job = local["jobs"], local["gpus_per_job"]
    if not gpus or per_job == 0:
        return [()] * (jobs or 1)
    available = len(gpus) // per_job
    if available == 0 or jobs > available:
        raise sweep.SweepError(
            f"sweep.local.jobs={jobs} x sweep.local.gpus_per_job={per_job} needs "
            f"{max(jobs, 1) * per_job} GPUs; {len(gpus)} visible ({gpus}). Lower them, or set "
            "sweep.local.gpus_per_job=0 for jobs without a GPU"
        )
    n = jobs or available
    return [tuple(gpus[i * per_job : (i + 1) * per_job]) for i in range(n)]


def check_machine(settings: dict[str, Any]) -> list[tuple[int, ...]] | None:
    """What a launcher needs from this machine, checked before anything is written: the local
    launcher's job slots (`local_slots`, returned), SLURM's `sbatch` and `srun` for 'slurm'.

    Raises:
      SweepError: more GPUs asked for than are visible, or no SLURM commands.
    """
    launcher = settings["launcher"]
    if launcher == "local":
        gpus = visible_gpus()
        slots = local_slots(settings["local"], gpus)
        per_job = settings["local"]["gpus_per_job"]
        if per_job > 0 and not gpus:
            print(
                f"[sweep] sweep.local.gpus_per_job={per_job} is ignored: no GPU is visible "
                "(CUDA_VISIBLE_DEVICES, nvidia-smi); the jobs run on the CPU, "
                f"{len(slots)} at a time (sweep.local.jobs)"
            )
        return slots
    if launcher == "slurm":
        check_slurm_options(settings["slurm"])
    if launcher == "slurm" and CLUSTER["slurm"] == "slurm":
        missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
        if missing:
            raise sweep.SweepError(
                f"sweep.launcher='slurm' submits with SLURM's sbatch and srun, but {missing} "
                "is not on PATH; run the sweep on a SLURM login node, or use "
                "--config.sweep.launcher=local or inline"
            )
    return None


def check_slurm_options(slurm: dict[str, Any]) -> None:
    """`sweep.slurm.additional_parameters` sets none of the sbatch options the launcher sets
    (`SLURM_OWN_OPTIONS`; names compared with '-' as '_', case-insensitively).

    Args:
      slurm: `sweep.launcher_of(config)['slurm']` (additional_parameters parsed).

    Raises:
      SweepError: a colliding option, named with the setting to use instead.
    """
    clashes = [
        (key, SLURM_OWN_OPTIONS[key.replace("-", "_").lower()])
        for key in slurm["additional_parameters"]
        if key.replace("-", "_").lower() in SLURM_OWN_OPTIONS
    ]
    if clashes:
        listed = "; ".join(f"{key!r} is set by {where}" for key, where in clashes)
        raise sweep.SweepError(
            f"sweep.slurm.additional_parameters sets sbatch options that the slurm launcher "
            f"sets itself ({listed}); expected only other options (e.g. constraint, exclude, "
            "nice, mail_type): remove them, and use the sweep.slurm.* setting named instead"
        )


def make_executor(settings: dict[str, Any], folder: Path, name: str) -> submitit.Executor:
    """The submitit executor of a 'local' or 'slurm' launcher (`sweep.launcher_of`), writing
    its pickles and logs in `folder`.

    slurm: `submitit.AutoExecutor(folder, cluster='slurm')` with one task on one node per job
    and `sweep.slurm.*` as sbatch options (partition, time, GPUs, CPUs, memory, account,
    QoS, array parallelism, setup lines, additional options).
    """
    launcher = settings["launcher"]
    cluster = CLUSTER[launcher]
    if launcher == "local":
        if cluster == "local":
            executor = submitit.LocalExecutor(folder)
            executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
            return executor
        return submitit.AutoExecutor(folder, cluster=cluster)
    s = settings["slurm"]
    check_slurm_options(s)
    executor = submitit.AutoExecutor(
        folder, cluster=cluster, slurm_max_num_timeout=s["max_num_timeout"]
    )
    optional = {
        "slurm_account": s["account"],
        "slurm_qos": s["qos"],
        "slurm_setup": s["setup"],
        "slurm_additional_parameters": s["additional_parameters"],
    }
    executor.update_parameters(
        name=name,
        timeout_min=s["time_min"],
        nodes=1,
        tasks_per_node=1,
        gpus_per_node=s["gpus_per_job"],
        cpus_per_task=s["cpus_per_task"],
        **({"mem_gb": s["mem_gb"]} if s["mem_gb"] else {}),
        slurm_partition=s["partition"],
        slurm_array_parallelism=s["array_parallelism"],
        **{k: v for k, v in optional.items() if v},
    )
    return executor


def run_jobs(
    runs: Sequence[Run],
    states: Sequence[str],
    sweep_dir: Path,
    settings: dict[str, Any],
    train_fn: Callable[..., Any],
    *,
    slots: Sequence[tuple[int, ...]] | None = None,
    name: str = "sweep",
    compilation_cache: str = "",
    after_each: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Runs the unfinished runs as jobs, leaders first (see the module docstring).

    Args:
      runs: every run of the sweep, in plan order.
      states: `sweep_runner.status` of each ('done' runs are skipped, 'changed' ones rerun with
        overwrite).
      sweep_dir: the sweep's directory; submitit's files go to `<sweep_dir>/jobs/`.
      settings: `sweep.launcher_of(config)` of a 'local' or 'slurm' launcher.
      train_fn: `(config, run_dir, overwrite=)`, run in the jobs (pickled with cloudpickle).
      slots: the local launcher's job slots (`local_slots`; None: found here).
      name: the jobs' name (SLURM job name).
      compilation_cache: JAX compilation cache directory for the jobs ('' = none set).
      after_each: called here after each finished job (the report so far).

    Returns:
      One outcome per run, in plan order: variant, seed, status ('skipped', 'done', 'failed'),
      and for failed runs 'error' and 'bad_input'.

    Raises:
      SweepError: the local launcher asks for more GPUs than are visible (before any job).
    """
    launcher = settings["launcher"]
    if launcher == "local" and slots is None:
        slots = local_slots(settings["local"])
    slots = list(slots) if launcher == "local" else None
    folder = Path(sweep_dir) / JOBS_DIR
    jobs = _Jobs(
        executor=make_executor(settings, folder, name),
        slots=slots,
        poll_s=0.0 if CLUSTER[launcher] == "debug" else POLL_S[launcher],
        runs=list(runs),
        make_job=lambda run, state: RunJob(
            run.config, run.directory, state == "changed", train_fn, compilation_cache
        ),
        after_each=after_each,
    )
    groups: dict[str, list[tuple[Run, str]]] = {}
    for run, state in zip(runs, states, strict=True):
        if state == "done":
            jobs.finish(run, {"status": "skipped"}, "finished earlier, skipped")
        else:
            groups.setdefault(stage_group(run.config), []).append((run, state))
    if groups:
        print(
            f"[sweep] {sum(map(len, groups.values()))} runs as {launcher} jobs ({folder}), "
            f"{len(groups)} group(s) of runs sharing stages: one run of each first, one at a "
            "time (it computes the shared stages), then the others"
            + (f", {len(slots)} at a time" if slots is not None else ", as one job array")
        )
    followers: list[tuple[Run, str]] = []
    for members in groups.values():
        while members:
            leader = members.pop(0)
            jobs.run([leader], at_once=1)
            if jobs.outcomes[leader[0].variant, leader[0].seed]["status"] == "done":
                followers += members
                break
    jobs.run(followers, at_once=None)
    return [jobs.outcomes[k] for k in ((r.variant, r.seed) for r in runs) if k in jobs.outcomes]


class _Jobs:
    """Submits runs as jobs and waits for them; keeps their outcomes."""

    def __init__(
        self,
        executor: submitit.Executor,
        slots: list[tuple[int, ...]] | None,
        poll_s: float,
        runs: list[Run],
        make_job: Callable[[Run, str], RunJob],
        after_each: Callable[[], None] | None,
    ):
        self.executor, self.slots, self.poll_s = executor, slots, poll_s
        self.runs, self.make_job, self.after_each = runs, make_job, after_each
        self.index = {(r.variant, r.seed): i for i, r in enumerate(runs)}
        self.outcomes: dict[tuple[str, int], dict[str, Any]] = {}  # by (variant, seed)

    def tag(self, run: Run) -> str:
        i = self.index[run.variant, run.seed]
        return f"[sweep] run {i + 1}/{len(self.runs)}: {run.variant} seed {run.seed}"

    def finish(self, run: Run, outcome: dict[str, Any], what: str = "") -> None:
        self.outcomes[run.variant, run.seed] = {"variant": run.variant, "seed": run.seed, **outcome}
        what = what or outcome["status"] + (f": {outcome['error']}" if "error" in outcome else "")
        print(f"{self.tag(run)}: {what}")

    def run(self, items: list[tuple[Run, str]], at_once: int | None) -> None:
        """Submits `items` ((run, state)) and waits for all of them. Local: one job per free
        slot (at most `at_once`), with that slot's GPUs. SLURM: at most `at_once` jobs, or
        all at once (None) as one array that SLURM runs array_parallelism at a time."""
        queue = list(items)
        free = list(range(len(self.slots))) if self.slots is not None else None
        if free is not None and at_once is not None:
            free = free[:at_once]
        running: list[tuple[Run, Any, int | None]] = []  # (run, job, slot)
        while queue or running:
            if free is None and queue:
                batch, queue = queue[: at_once or len(queue)], queue[at_once or len(queue) :]
                with self.executor.batch():
                    submitted = [self.executor.submit(self.make_job(*item)) for item in batch]
                for (run, state), job in zip(batch, submitted, strict=True):
                    print(f"{self.tag(run)} ({state}) -> job {job.job_id}, log {job.paths.stdout}")
                    running.append((run, job, None))
            while free and queue:
                slot = free.pop(0)
                run, state = queue.pop(0)
                gpus = self.slots[slot]
                if isinstance(self.executor, submitit.LocalExecutor):
                    self.executor.update_parameters(visible_gpus=gpus, gpus_per_node=len(gpus))
                job = self.executor.submit(self.make_job(run, state))
                on = f" on GPU {','.join(map(str, gpus))}" if gpus else ""
                print(f"{self.tag(run)} ({state}) -> job {job.job_id}{on}, log {job.paths.stdout}")
                running.append((run, job, slot))
            finished = [entry for entry in running if entry[1].done()]
            if not finished:
                time.sleep(self.poll_s)
                continue
            running = [e for e in running if not any(e is f for f in finished)]
            for run, job, slot in finished:
                if slot is not None:
                    free.append(slot)
                self.finish(run, _outcome(run, job))
                if self.after_each is not None:
                    self.after_each()


def _outcome(run: Run, job: Any) -> dict[str, Any]:
    """The job's result (`run_one`'s outcome), or a failure when the job ended without one
    (killed, cancelled, out of requeues), then written to the run's error.txt."""
    try:
        return job.result()
    except Exception as e:  # noqa: BLE001 -- submitit's UncompletedJobError, FailedJobError
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        message = (
            f"{type(e).__name__}: job {job.job_id} ended without finishing the run ({first}); "
            f"its log: {job.paths.stdout}, {job.paths.stderr}"
        )
        workdir.atomic_write_text(run.directory / sweep.ERROR_FILE, f"{message}\n\n{e}\n")
        return {"status": "failed", "error": message, "bad_input": False}
