"""Sweeps as jobs (agre_jax/launch.py, `sweep.launcher`): launcher settings refused before any
job, job slots, the SLURM executor's sbatch options (a fake `srun` on PATH: no SLURM here),
the job scheduling (leaders first, a failed leader handing over) through submitit's in-process
'debug' executor, a killed local job (its run fails; the same command again reruns only it),
and one real tiny sweep with `launcher=local` in which a job is preempted (requeued by
submitit, it resumes from its checkpoint within the sweep), ending with the same report as
the inline launcher's.

Real SLURM (sbatch, arrays, requeue by scontrol) is not exercised: this machine has none."""

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import fakes
import jax
import pytest
import submitit
from absl import flags
from inprocess import main_module, run_main
from submitit.slurm import slurm as submitit_slurm
from test_sweep import SWEEP_CONFIGS, assert_png, fake_results

from agre_jax import launch, stages, sweep, sweep_runner, workdir
from configs import tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def jax_platforms_unchanged():
    """run_sweep with a job launcher puts JAX on the CPU in the submitting process when no
    backend has started yet (launch.leave_accelerators_to_jobs): start this session's backend
    first and restore the setting, so that later tests in this process keep their devices."""
    jax.devices()
    before = jax.config.jax_platforms
    yield
    jax.config.update("jax_platforms", before)


# ---------------------------------------------------------------- settings, before any job


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config.sweep.launcher=cluster"], "sweep.launcher is 'cluster'; expected one of"),
        (["--config.sweep.launcher=slurm"], "sweep.slurm.partition is not set"),
        (
            ["--config.sweep.launcher=slurm", "--config.sweep.slurm.partition=gpu"]
            + ["--config.sweep.slurm.additional_parameters={constraint: a100}"],
            "sweep.slurm.additional_parameters is not JSON",
        ),
        (
            ["--config.sweep.launcher=slurm", "--config.sweep.slurm.partition=gpu"]
            + ["--config.sweep.slurm.time_min=0"],
            "sweep.slurm.time_min must be an integer >= 1, got 0",
        ),
        (["--config.sweep.launcher=local", "--config.sweep.local.jobs=-1"], "local.jobs must be"),
    ],
)
def test_bad_launcher_settings_exit_2_before_any_job(tmp_path, capsys, flags, message):
    args = ["--config", "configs/sweeps/tiny.py", *flags, "--workdir", str(tmp_path / "s")]
    code, out, err = run_main(args, capsys)
    assert code == 2, out[-2000:] + err[-2000:]
    assert "error: invalid sweep: " in err and message in err
    assert not (tmp_path / "s").exists()  # nothing written, no job


def test_slurm_without_slurm_commands_exits_2_before_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    args = ["--config", "configs/sweeps/tiny.py", "--config.sweep.launcher=slurm"]
    args += ["--config.sweep.slurm.partition=gpu", "--workdir", str(tmp_path / "s")]
    code, out, err = run_main(args, capsys)
    assert code == 2, out[-2000:] + err[-2000:]
    assert "['sbatch', 'srun'] is not on PATH" in err and not (tmp_path / "s").exists()


def test_sbatch_options_the_launcher_sets_are_refused_before_anything(tmp_path, capsys):
    """sweep.slurm.additional_parameters may add sbatch options, not replace the launcher's
    own (submitit would let them override silently): exit 2 naming the setting to use."""
    options = '{"partition": "debug", "Time": 10, "gpus-per-node": 4, "constraint": "a100"}'
    args = ["--config", "configs/sweeps/tiny.py", "--config.sweep.launcher=slurm"]
    args += ["--config.sweep.slurm.partition=gpu", "--workdir", str(tmp_path / "s")]
    code, out, err = run_main([*args, f"--config.sweep.slurm.additional_parameters={options}"])
    assert code == 2, out[-2000:] + err[-2000:]
    for clash in (
        "'partition' is set by sweep.slurm.partition",
        "'Time' is set by sweep.slurm.time_min",
        "'gpus-per-node' is set by sweep.slurm.gpus_per_job",
    ):
        assert clash in err
    assert "'constraint' is set" not in err  # an option the launcher does not set
    assert not (tmp_path / "s").exists()
    c = sweep_config(**{"sweep.launcher": "slurm", "sweep.slurm.partition": "gpu"})
    slurm = sweep.launcher_of(c)["slurm"]
    for key in ("array", "job_name", "nodes", "signal", "output", "mem", "account", "qos"):
        with pytest.raises(sweep.SweepError, match=f"'{key}' is set by"):
            launch.check_slurm_options({**slurm, "additional_parameters": {key: "x"}})
    launch.check_slurm_options({**slurm, "additional_parameters": {"exclude": "n1", "nice": 5}})


def test_gpus_per_job_without_a_visible_gpu_is_ignored_with_one_line(monkeypatch, capsys):
    local = {"launcher": "local", "local": {"jobs": 0, "gpus_per_job": 1}}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU
    assert launch.check_machine(local) == [()]
    line = "[sweep] sweep.local.gpus_per_job=1 is ignored: no GPU is visible"
    assert line in capsys.readouterr().out
    assert launch.check_machine({**local, "local": {"jobs": 2, "gpus_per_job": 0}}) == [(), ()]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert launch.check_machine(local) == [(0,), (1,)]
    assert capsys.readouterr().out == ""  # said only when it is ignored


def test_a_sweep_run_resolves_dtype_auto_in_its_job(tmp_path):
    """A run's dtype='auto' becomes the job's backend's dtype where the job trains it
    (launch.run_one), and the process that submits the jobs (which may have no GPU) sees the
    recorded resolved run as the same run, finished."""
    config = tiny.get_config()
    config.dtype = "auto"
    fake = FakeTrainer()
    seen = []
    launch.run_one(config, tmp_path, False, lambda c, d, overwrite: seen.append(c) or fake(c, d))
    assert [c.dtype for c in seen] == ["float32"]  # this CPU
    assert json.loads((tmp_path / workdir.CONFIG_FILE).read_text())["dtype"] == "float32"
    assert sweep_runner.status(sweep_runner.Run("a", 0, tmp_path, config)) == "done"


def test_slurm_settings_from_the_command_line():
    """The README's SLURM flags, parsed as main.py parses them."""
    argv = [
        "main.py",
        "--config=configs/sweeps/tiny.py",
        "--config.sweep.launcher=slurm",
        "--config.sweep.slurm.partition=gpu",
        "--config.sweep.slurm.setup=('module load cuda', 'source ~/venv/bin/activate')",
        '--config.sweep.slurm.additional_parameters={"constraint": "a100", "nice": 10}',
        "--config.sweep.slurm.mem_gb=64",
    ]
    flag_values = flags.FlagValues()
    main_module.define_flags(flag_values, sys_argv=argv)
    main_module.parse_flags(argv, flag_values)
    s = sweep.launcher_of(flag_values.config)["slurm"]
    assert s["setup"] == ["module load cuda", "source ~/venv/bin/activate"]
    assert s["additional_parameters"] == {"constraint": "a100", "nice": 10}
    assert (s["partition"], s["mem_gb"]) == ("gpu", 64)


def sweep_config(**overrides):
    c = sweep.define(
        tiny.get_config(),
        name="t",
        title="test",
        variants=[
            sweep.variant("a", {"distill.weighting": "agre"}),
            sweep.variant("b", {"distill.weighting": "aver"}),
            sweep.variant("c", {"teachers.num": 3}),  # other teachers: its own stages
        ],
        baseline="a",
        seeds=(0, 1),
    )
    c.sweep.compilation_cache = False
    c.update_from_flattened_dict(overrides)
    return c


def test_launcher_settings_and_defaults():
    assert sweep.launcher_of(sweep_config()) == {"launcher": "inline"}
    local = sweep.launcher_of(sweep_config(**{"sweep.launcher": "local"}))
    assert local == {"launcher": "local", "local": {"jobs": 0, "gpus_per_job": 1}}
    s = sweep.launcher_of(
        sweep_config(
            **{
                "sweep.launcher": "slurm",
                "sweep.slurm.partition": "gpu",
                "sweep.slurm.setup": ("module load cuda",),
                "sweep.slurm.additional_parameters": '{"constraint": "a100", "exclusive": true}',
            }
        )
    )["slurm"]
    assert (
        s["partition"] == "gpu" and s["time_min"] == 24 * 60 and s["setup"] == ["module load cuda"]
    )
    assert s["additional_parameters"] == {"constraint": "a100", "exclusive": True}
    # A sweep config made before the launcher keys existed runs inline.
    old = sweep_config()
    with old.unlocked():
        for key in ("launcher", "local", "slurm"):
            del old.sweep[key]
    assert sweep.launcher_of(old) == {"launcher": "inline"}
    with pytest.raises(sweep.SweepError, match="additional_parameters is '\\[1\\]'"):
        sweep.launcher_of(
            sweep_config(
                **{
                    "sweep.launcher": "slurm",
                    "sweep.slurm.partition": "gpu",
                    "sweep.slurm.additional_parameters": "[1]",
                }
            )
        )


def test_local_slots():
    slots = launch.local_slots
    assert slots({"jobs": 0, "gpus_per_job": 1}, gpus=[]) == [()]  # CPU: one job at a time
    assert slots({"jobs": 3, "gpus_per_job": 1}, gpus=[]) == [(), (), ()]
    assert slots({"jobs": 0, "gpus_per_job": 1}, gpus=[0, 1, 2]) == [(0,), (1,), (2,)]
    assert slots({"jobs": 0, "gpus_per_job": 2}, gpus=[4, 5, 6, 7]) == [(4, 5), (6, 7)]
    assert slots({"jobs": 1, "gpus_per_job": 2}, gpus=[4, 5, 6, 7]) == [(4, 5)]
    assert slots({"jobs": 2, "gpus_per_job": 0}, gpus=[0, 1]) == [(), ()]
    with pytest.raises(sweep.SweepError, match="needs 6 GPUs; 4 visible"):
        slots({"jobs": 3, "gpus_per_job": 2}, gpus=[0, 1, 2, 3])
    with pytest.raises(sweep.SweepError, match="needs 2 GPUs; 1 visible"):
        slots({"jobs": 0, "gpus_per_job": 2}, gpus=[0])


def test_visible_gpus_from_the_environment(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert launch.visible_gpus() == [2, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launch.visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8d0f2a1c")
    with pytest.raises(sweep.SweepError, match="needs GPU indices"):
        launch.visible_gpus()


def test_local_launcher_refuses_more_gpus_than_visible_before_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    c = sweep_config(**{"sweep.launcher": "local", "sweep.local.gpus_per_job": 2})
    with pytest.raises(sweep.SweepError, match="needs 2 GPUs; 1 visible"):
        sweep_runner.run_sweep(c, tmp_path / "s", train_fn=FakeTrainer())
    assert not (tmp_path / "s").exists()


def test_stage_groups_ignore_only_the_students_keys():
    runs = sweep_runner.plan(sweep_config(), Path("/sweep"))
    groups = {(r.variant, r.seed): launch.stage_group(r.config) for r in runs}
    assert groups["a", 0] == groups["a", 1] == groups["b", 0] == groups["b", 1]
    assert groups["c", 0] == groups["c", 1] != groups["a", 0]


@pytest.mark.parametrize("name", SWEEP_CONFIGS)
def test_runs_of_one_stage_group_have_the_same_stage_keys(tmp_path, name):
    """The grouping's premise on every sweep config: runs that differ only in STUDENT_KEYS
    have the same teacher, DFR and teacher-group stage keys (given the same data)."""
    config = __import__(f"configs.sweeps.{name}", fromlist=["get_config"]).get_config(None)
    data = fakes.dataset_keys()
    keys = {}
    for run in sweep_runner.plan(config, tmp_path):
        k = stages.stage_keys(run.config, data)
        keys.setdefault(launch.stage_group(run.config), set()).add((k.teachers, k.dfr, k.groups))
    assert all(len(v) == 1 for v in keys.values()), keys


# ---------------------------------------------------------------- SLURM (no real SLURM)


def test_slurm_executor_parameters_and_sbatch_script(tmp_path, monkeypatch):
    """`make_executor` builds submitit's real SlurmExecutor (it only needs an `srun` on PATH,
    faked here) with the sweep's options; its sbatch script and array line are checked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    c = sweep_config(
        **{
            "sweep.launcher": "slurm",
            "sweep.slurm.partition": "gpu",
            "sweep.slurm.time_min": 90,
            "sweep.slurm.max_num_timeout": 5,
            "sweep.slurm.gpus_per_job": 2,
            "sweep.slurm.cpus_per_task": 4,
            "sweep.slurm.mem_gb": 32,
            "sweep.slurm.array_parallelism": 3,
            "sweep.slurm.account": "proj",
            "sweep.slurm.qos": "high",
            "sweep.slurm.setup": ("module load cuda",),
            "sweep.slurm.additional_parameters": '{"constraint": "a100"}',
        }
    )
    executor = launch.make_executor(sweep.launcher_of(c), tmp_path / "jobs", "sweep-t")
    inner = executor._executor  # submitit's SlurmExecutor
    assert isinstance(inner, submitit.SlurmExecutor) and inner.max_num_timeout == 5
    p = inner.parameters
    assert (p["partition"], p["time"], p["gpus_per_node"], p["cpus_per_task"]) == ("gpu", 90, 2, 4)
    assert (p["mem"], p["account"], p["qos"], p["job_name"]) == ("32GB", "proj", "high", "sweep-t")
    assert (p["nodes"], p["ntasks_per_node"], p["array_parallelism"]) == (1, 1, 3)
    script = submitit_slurm._make_sbatch_string(
        command="python -m job", folder=inner.folder, map_count=5, **p
    )
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --time=90",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=32GB",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --array=0-4%3",  # five followers, three at once
        "#SBATCH --signal=USR2@90",  # the preemption / time-out signal RunJob checkpoints on
        "module load cuda",
    ):
        assert line in script.splitlines(), line
    # Without mem_gb / account / qos / setup / options: none of those lines.
    plain = sweep_config(**{"sweep.launcher": "slurm", "sweep.slurm.partition": "cpu"})
    p = launch.make_executor(sweep.launcher_of(plain), tmp_path / "j2", "x")._executor.parameters
    assert not {"mem", "account", "qos", "setup", "additional_parameters"} & set(p)


def test_run_job_requeues_the_same_run_without_overwrite(tmp_path):
    job = launch.RunJob(tiny.get_config(), tmp_path, True, FakeTrainer(), "")
    requeued = job.checkpoint()
    assert isinstance(requeued, submitit.helpers.DelayedSubmission)
    assert requeued.function.overwrite is False and requeued.function.directory == tmp_path
    assert isinstance(job, submitit.helpers.Checkpointable)
    assert cloudpickle.loads(cloudpickle.dumps(job)).directory == tmp_path  # as submitit pickles


class FakeTrainer:
    """Writes a run's config and a results.json; fails where told; records calls."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, config, run_dir, overwrite=False):
        run_dir = Path(run_dir)
        self.calls.append((run_dir.parent.name, config.seed))
        workdir.prepare(run_dir, config, overwrite)
        if (run_dir.parent.name, config.seed) in self.fail:
            raise RuntimeError(f"no luck for seed {config.seed}")
        workdir.write_json(run_dir / "results.json", fake_results(config.seed, 0.5))


def test_jobs_run_leaders_first_one_at_a_time(tmp_path, monkeypatch, capsys):
    """The slurm launcher's scheduling with submitit's 'debug' executor (jobs run in this
    process): a and b share stages, c has its own. Leaders a/0 then c/0 run alone; a/0 fails,
    so b/0 leads; then the rest as one batch (a SLURM array). A second call skips them all."""
    monkeypatch.setitem(launch.CLUSTER, "slurm", "debug")
    c = sweep_config(**{"sweep.launcher": "slurm", "sweep.slurm.partition": "gpu"})
    fake = FakeTrainer(fail={("a", 0)})
    out = sweep_runner.run_sweep(c, tmp_path, train_fn=fake)
    assert fake.calls[:3] == [("a", 0), ("b", 0), ("c", 0)]  # the leaders, one at a time
    assert sorted(fake.calls[3:]) == [("a", 1), ("b", 1), ("c", 1)]
    assert out["exit_code"] == 1 and [o["status"] for o in out["outcomes"]] == [
        "failed",
        "done",
        "done",
        "done",
        "done",
        "done",
    ]
    text = capsys.readouterr().out
    assert "6 runs as slurm jobs" in text and "2 group(s) of runs sharing stages" in text
    error = (tmp_path / "runs" / "a" / "seed0" / sweep.ERROR_FILE).read_text()
    assert error.startswith("RuntimeError: no luck for seed 0") and "Traceback" in error
    assert "`a` seed 0: RuntimeError: no luck" in (tmp_path / "results.md").read_text()

    fake = FakeTrainer()
    out = sweep_runner.run_sweep(c, tmp_path, train_fn=fake)
    assert fake.calls == [("a", 0)] and out["exit_code"] == 0  # only the failed run again
    assert [r["n"] for r in out["rows"]] == [2, 2, 2]


# ---------------------------------------------------------------- a real tiny local sweep


def csv_values(root):
    """results.csv without its timing columns."""
    rows = csv.DictReader(io.StringIO((root / "results.csv").read_text()))
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def summary_values(root):
    """summary.json without timings and run directories."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if "seconds" not in k and k != "dir"}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(json.loads((root / "summary.json").read_text()))


def signal_after_first_checkpoint(run_dir, signum, record):
    """Waits for the run's first student checkpoint, then sends `signum` to the process
    holding the run directory's lock (the job running it); records (pid, step)."""
    checkpoints = run_dir / "distill" / "checkpoints"
    deadline = time.time() + 900
    while time.time() < deadline:
        steps = [p.name for p in checkpoints.glob("*") if p.name.isdigit()]
        if steps:
            holder = json.loads((run_dir / workdir.LOCK_FILE).read_text())
            os.kill(holder["pid"], signum)
            record.append((holder["pid"], min(map(int, steps))))
            return
        time.sleep(0.05)


def job_logs(out):
    """{(variant, seed): [log path of each job of that run]} from the sweep's output."""
    logs = {}
    for v, s, path in re.findall(
        r"run \d+/\d+: (\w+) seed (\d+) \(\w+\) -> job \S+, log (\S+)", out
    ):
        logs.setdefault((v, int(s)), []).append(Path(path))
    return logs


class KillOnce:
    """A fake trainer for real local jobs (pickled by value: the jobs cannot import this test
    module): writes a run's config and the given results.json; the run `kill` SIGKILLs its own
    job on its first attempt (a marker file tells the attempts apart)."""

    def __init__(self, results, kill, marker):
        self.results, self.kill, self.marker = results, kill, marker

    def __call__(self, config, run_dir, overwrite=False):
        run_dir = Path(run_dir)
        workdir.prepare(run_dir, config, overwrite)
        if (run_dir.parent.name, config.seed) == self.kill and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        workdir.write_json(run_dir / "results.json", self.results[config.seed])


def test_a_killed_local_job_fails_its_run_and_the_same_command_resumes_it(tmp_path, capsys):
    """Real local jobs (processes) with a fake trainer: a/1's job is killed (SIGKILL), so the
    sweep ends with exit 1 and a/1's error.txt; the same call again runs only a/1."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        c = sweep_config(**{"sweep.launcher": "local", "sweep.only": "a"})
        results = {seed: fake_results(seed, 0.5 + 0.1 * seed) for seed in (0, 1)}
        fake = KillOnce(results, ("a", 1), tmp_path / "killed")
        out = sweep_runner.run_sweep(c, tmp_path / "s", train_fn=fake)
        assert (tmp_path / "killed").exists()
        assert out["exit_code"] == 1
        assert [(o["variant"], o["seed"], o["status"]) for o in out["outcomes"]] == [
            ("a", 0, "done"),
            ("a", 1, "failed"),
        ]
        error = (tmp_path / "s" / "runs" / "a" / "seed1" / sweep.ERROR_FILE).read_text()
        assert error.startswith("UncompletedJobError: job ") and "ended without finishing" in error
        text = capsys.readouterr().out
        assert "[sweep] run 2/2: a seed 1: failed: UncompletedJobError" in text

        out = sweep_runner.run_sweep(c, tmp_path / "s", train_fn=fake)
        assert out["exit_code"] == 0
        assert [o["status"] for o in out["outcomes"]] == ["skipped", "done"]
        assert not (tmp_path / "s" / "runs" / "a" / "seed1" / sweep.ERROR_FILE).exists()
        assert [r["n"] for r in out["rows"]] == [2, 0, 0]
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def check_inline_sweep(sweep_dir: Path, out: str) -> None:
    """The inline tiny sweep (main.py in this process, 2 variants x 2 seeds): one teacher and
    one DFR stage for all runs, each run's results.json, the report (markdown, CSV, plots)."""
    assert len(list((sweep_dir / "stages").glob("teachers-*"))) == 1  # trained once
    assert len(list((sweep_dir / "stages").glob("dfr-*"))) == 1
    assert out.count("[teachers] reusing") == 3
    for v in ("agre", "aver"):
        for seed in (0, 1):
            r = json.loads((sweep_dir / "runs" / v / f"seed{seed}" / "results.json").read_text())
            assert r["seed"] == seed and r["config"]["distill"]["weighting"] == v
    md = (sweep_dir / "results.md").read_text()
    assert "Runs finished 4 of 4" in md and "Seeds: 0, 1" in md
    assert "Shared stages, computed once for all runs (not in s/run): data " in md
    assert ", teachers " in md and ", dfr " in md
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"[sweep] report: {sweep_dir / 'results.md'} (and results.csv")
    rows = list(csv.DictReader(io.StringIO((sweep_dir / "results.csv").read_text())))
    assert sorted(r["variant"] for r in rows) == ["agre", "aver"]
    assert {r["n"] for r in rows} == {"2"} and all(r["wga_mean_pct"] != "" for r in rows)
    plots = sorted(p.name for p in (sweep_dir / "plots").glob("*.png"))
    assert plots == ["group_acc_best.png", "teacher_weights.png", "wga_by_variant.png"]
    for p in plots:
        assert_png(sweep_dir / "plots" / p)


def test_local_sweep_with_a_preempted_job_matches_inline(tmp_path, capsys):
    """configs/sweeps/tiny.py (2 variants x 2 seeds, 1 student epoch, no feature losses), run
    inline (the reference; it trains the shared stages; its report checked, and a second call
    skips every finished run), then with launcher=local, two jobs at
    once, on the same stages: the leader agre/0 runs alone, then aver/0 and agre/1 together.
    agre/1 is preempted (SIGUSR2 after its first student checkpoint): submitit requeues the
    job, which resumes from that checkpoint within the sweep. The report equals the inline
    one (timings aside)."""
    local, inline = tmp_path / "local", tmp_path / "inline"
    common = [
        "--config",
        "configs/sweeps/tiny.py",
        "--config.train.epochs=1",
        "--config.train.checkpoint_every=3",
        "--config.distill.gammas.layer3=0.0",
        "--config.distill.gammas.pooled=0.0",
        f"--config.stage_dir={inline / 'stages'}",
    ]
    code, out, err = run_main([*common, "--workdir", str(inline)], capsys)
    assert code == 0, out[-3000:] + err[-3000:]
    check_inline_sweep(inline, out)
    code, out, err = run_main([*common, "--workdir", str(inline)], capsys)
    assert code == 0, err[-3000:]
    assert out.count("finished earlier, skipped") == 4

    preempted = []
    watcher = threading.Thread(
        target=signal_after_first_checkpoint,
        args=(local / "runs" / "agre" / "seed1", signal.SIGUSR2, preempted),
        daemon=True,
    )
    watcher.start()
    args = [*common, "--config.sweep.launcher=local", "--config.sweep.local.jobs=2"]
    code, out, err = run_main([*args, "--workdir", str(local)], capsys)
    assert preempted, out[-3000:] + err[-3000:]
    assert code == 0, out[-3000:] + err[-3000:]
    lines = out.splitlines()
    starts = [i for i, line in enumerate(lines) if "-> job" in line]
    assert len(starts) == 4  # one job per run; the requeue is the same job
    assert starts[0] < lines.index("[sweep] run 1/4: agre seed 0: done") < starts[1]
    assert lines[starts[1]].startswith("[sweep] run 2/4: aver seed 0 (new) -> job")
    assert starts[2] == starts[1] + 1  # aver/0 and agre/1 at once
    assert lines[starts[2]].startswith("[sweep] run 3/4: agre seed 1 (new) -> job")
    assert "[sweep] run 3/4: agre seed 1: done" in lines
    (log,) = job_logs(out)["agre", 1]
    assert "this job is preempted" in log.with_suffix(".err").read_text()
    resumed = re.search(r"\[distill\] resuming from the checkpoint at step (\d+)/", log.read_text())
    assert resumed and int(resumed.group(1)) >= preempted[0][1]

    assert csv_values(local) == csv_values(inline)
    assert summary_values(local) == summary_values(inline)
    assert all(r["n"] == 2 for r in summary_values(local)["rows"])


def test_importing_the_launcher_keeps_the_logging_handlers():
    """submitit's first import runs logging.config.dictConfig, which closes every installed
    handler; absl's then closed its stream (pytest's capture: `pytest tests/test_main.py`
    alone crashed with 'I/O operation on closed file'). launch imports it without that
    set-up; submitit's logger still gets its handlers. A fresh interpreter: this one has
    submitit imported already."""
    code = """
import io, logging, sys
bound = sys.stderr = io.StringIO()  # absl's handler binds the stderr of its import
from absl import logging as absl_logging
handlers = list(logging.getLogger().handlers)
sys.stderr = io.StringIO()  # a redirected stderr while the launcher is first imported
from agre_jax import launch
assert not bound.closed, "absl's stream was closed"
assert logging.getLogger().handlers == handlers, logging.getLogger().handlers
assert len(logging.getLogger("submitit").handlers) == 2
print("ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
