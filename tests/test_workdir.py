"""Workdir checks: `check_writable` (bad paths leave nothing behind) and `lock` (one run per
workdir, across processes, released when its holder dies)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agre_jax import errors, workdir

# Holds the lock of argv[1] until killed; imports agre_jax.workdir only (fast).
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from agre_jax import workdir
    with workdir.lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(120)
    """
)


def test_check_writable_accepts_a_new_directory_and_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    workdir.check_writable(target)
    workdir.check_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_check_writable_refuses_a_file(tmp_path):
    path = tmp_path / "results"
    path.write_text("x")
    with pytest.raises(errors.WorkdirError, match=r"is a file; expected a directory"):
        workdir.check_writable(path)
    with pytest.raises(errors.WorkdirError, match=r"cannot write to .*results/run \(.* is a file"):
        workdir.check_writable(path / "run")


def test_check_writable_refuses_a_place_root_cannot_write(tmp_path):
    # Root ignores permission bits; /proc and /sys refuse new files to everyone.
    for place in (Path("/proc"), Path("/sys")):
        path = place / "agre_jax_test" / "run"
        with pytest.raises(errors.WorkdirError, match=r"cannot write to .*expected a writable"):
            workdir.check_writable(path)
        assert not path.parent.exists()


def test_check_writable_refuses_a_broken_link(tmp_path):
    (tmp_path / "run").symlink_to(tmp_path / "missing")
    with pytest.raises(errors.WorkdirError, match="broken symbolic link"):
        workdir.check_writable(tmp_path / "run")


def test_lock_excludes_another_process_until_it_dies(tmp_path):
    directory = tmp_path / "work"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        recorded = json.loads((directory / workdir.LOCK_FILE).read_text())
        assert recorded["pid"] == holder.pid
        with pytest.raises(errors.WorkdirError) as info:
            with workdir.lock(directory):
                pytest.fail("got a lock that another process holds")
        message = str(info.value)
        assert message.startswith(f"{directory} is in use by another run (pid {holder.pid} on ")
        assert f"since {recorded['since']}: " in message
        assert str(directory) in message.split(": ", 1)[1]  # the holder's command line
        assert message.endswith("wait for it to finish or use another --workdir")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    # kill -9 releases it; the next holder records itself.
    with workdir.lock(directory):
        assert json.loads((directory / workdir.LOCK_FILE).read_text())["pid"] == os.getpid()
    with workdir.lock(directory):  # released when the context exits
        pass


def test_lock_is_not_reentrant(tmp_path):
    with workdir.lock(tmp_path), pytest.raises(errors.WorkdirError, match="in use"):
        with workdir.lock(tmp_path):
            pass


def test_configs_recorded_before_a_key_was_added_are_the_same_config(tmp_path):
    """A run recorded before configs/default.py gained a key of workdir.ADDED_KEYS is the same
    config while that key keeps its neutral value (for the run's workdir and for sweeps), and
    another config once it does not."""
    from agre_jax import sweep_runner
    from configs import tiny

    config = tiny.get_config()
    old = workdir.config_dict(config)
    del old["baselines"], old["distill"]["crd_dim"], old["biased"]["arch"]
    run = tmp_path / "run"
    run.mkdir()
    (run / workdir.CONFIG_FILE).write_text(json.dumps(old))
    assert workdir.config_differences(old, workdir.config_dict(config)) == []
    workdir.prepare(run, config, overwrite=False)  # accepted; the record gains the keys
    assert json.loads((run / workdir.CONFIG_FILE).read_text()) == workdir.config_dict(config)
    assert sweep_runner.status(sweep_runner.Run("v", 0, run, config)) == "resume"

    (run / workdir.CONFIG_FILE).write_text(json.dumps(old))
    config.baselines.deep_ensemble = True
    assert workdir.config_differences(old, workdir.config_dict(config)) == [
        "baselines.deep_ensemble"
    ]
    with pytest.raises(workdir.ConfigMismatchError, match="baselines.deep_ensemble"):
        workdir.prepare(run, config, overwrite=False)
    assert sweep_runner.status(sweep_runner.Run("v", 0, run, config)) == "changed"


def test_one_architecture_spelled_as_archs_is_the_same_config():
    """teachers.archs of one architecture is teachers.arch (the same stages): a run recorded
    either way is the same config; another architecture or a mixed list is not."""
    from configs import tiny

    config = tiny.get_config()
    plain = workdir.config_dict(config)
    m, arch = config.teachers.num, config.teachers.arch
    config.teachers.archs = (arch,) * m
    spelled = workdir.config_dict(config)
    assert workdir.config_differences(plain, spelled) == []
    assert workdir.config_differences(spelled, plain) == []
    other = "resnet34" if arch != "resnet34" else "resnet18"
    config.teachers.archs = (other,) * m
    assert workdir.config_differences(plain, workdir.config_dict(config)) == ["teachers.arch"]
    config.teachers.archs = (other,) + (arch,) * (m - 1)
    assert set(workdir.config_differences(plain, workdir.config_dict(config))) == {"teachers.archs"}


def test_per_arch_pretraining_keys_count_only_where_that_architecture_pretrains():
    """pretrain.per_arch.<arch> (recorded before it existed, or set otherwise) is no
    difference between configs that pretrain no <arch> network, and a difference where one
    does; ADDED_KEYS names every architecture's."""
    from agre_jax import models
    from configs import tiny

    assert {k.split(".")[2] for k in workdir.ADDED_KEYS if k.startswith("pretrain.")} == set(
        models.ARCHS
    )
    config = tiny.get_config()
    assert set(config.pretrain.per_arch) == set(models.ARCHS)
    config.pretrain.enabled = True
    old = workdir.config_dict(config)
    del old["pretrain"]["per_arch"]
    config.pretrain.per_arch.resnet50.epochs = 12
    config.pretrain.per_arch.resnet50.zero_init_residual = True
    assert workdir.config_differences(old, workdir.config_dict(config)) == []
    r50 = {"pretrain.per_arch.resnet50.epochs", "pretrain.per_arch.resnet50.zero_init_residual"}
    for key in ("teachers.arch", "student.arch", "biased.arch"):
        other = config.copy_and_resolve_references()
        section, name = key.split(".")
        other[section][name] = "resnet50"
        diff = workdir.config_differences(old, workdir.config_dict(other))
        assert set(diff) == {key, *r50}
    config.pretrain.enabled = False  # no pretraining: nothing pretrains a ResNet-50
    config.teachers.arch = "resnet50"
    recorded = workdir.config_dict(config)
    config.pretrain.per_arch.resnet50.epochs = 3
    assert workdir.config_differences(recorded, workdir.config_dict(config)) == []
