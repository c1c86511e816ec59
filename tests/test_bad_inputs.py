"""Bad input, tried as a new user would: every case exits 2 with one message naming the key or
path, the value and what is expected, prints no traceback, and writes or destroys nothing.

main.py runs in this process (flag parsing included), so each case costs its check, not a
Python start-up; a few cases also run as real subprocesses.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from inprocess import run_main

from agre_jax import checkpoints, workdir

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/tiny.py"]


def snapshot(path: Path) -> dict:
    """Every file under path with its size and modification time (but the lock file, which
    a run takes in an existing workdir before reading its config record)."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != workdir.LOCK_FILE
    }


def assert_refused(code, err, message):
    assert code == 2, err[-3000:]
    assert message in err, err[-3000:]
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("error: ") == 1


# Config and flag mistakes: refused before anything touches the disk or the data.
CONFIG_CASES = [
    (["--config.train.epoch=3"], "unknown config key 'epoch' (Did you mean \"epochs\""),
    (["--config.distill.gammas.layer5=0.1"], "unknown config key 'layer5'"),
    (["--config.train.epochs=abc"], "--config.train.epochs=abc"),
    (["--nosuchflag"], "nosuchflag"),
    (["--config.distill.alpha=1.5"], "alpha must be in [0, 1], got 1.5"),
    (["--config.distill.gammas.layer2=-0.1"], "gammas must be >= 0"),
    (["--config.distill.weighting=ae_kd"], "unknown weighting 'ae_kd'"),
    (["--config.distill.temperature=0"], "temperature must be a finite number > 0"),
    (["--config.distill.grad_scope=middle"], "unknown grad_scope 'middle'"),
    (["--config.distill.empty_rows=skip"], "unknown empty_rows 'skip'"),
    (["--config.distill.gram=fast"], "unknown gram 'fast'"),
    (["--config.distill.feature_loss=cosine"], "unknown feature_loss 'cosine'"),
    (["--config.distill.feature_dropout=1.0"], "feature_dropout must be in [0, 1)"),
    (["--config.distill.chunk_size=0"], "chunk_size must be >= 1"),
    (["--config.distill.feature_loss=attention"], "attention transfer needs spatial layers"),
    (
        ["--config.distill.feature_loss=crd", "--config.distill.gammas.layer4=0.1"],
        "CRD contrasts pooled embeddings: set only gammas.pooled",
    ),
    (["--config.distill.crd_temperature=0"], "crd_temperature must be a finite number > 0"),
    (
        [
            "--config.distill.feature_weighting=agre",
            "--config.distill.gammas.layer3=0",
            "--config.distill.gammas.pooled=0",
        ],
        "feature_weighting 'agre' weights the feature loss: set a gamma > 0",
    ),
    (
        ["--config.distill.feature_weighting=agre", "--config.biased.arch=resnet50"],
        "student, teachers and biased model do not fit together: feature_weighting 'agre' "
        "compares the biased model's 'layer3' features with the teachers': widths 64 against 16",
    ),
    (["--config.teachers.debiased=7"], "teachers.debiased is 7"),
    (["--config.biased.index=5"], "biased.index is 5; expected 0..1"),
    (["--config.biased.arch=vgg"], "biased.arch is 'vgg'; expected '' or one of"),
    (["--config.teachers.num=0"], "teachers.num is 0"),
    (["--config.teachers.arch=resnet101"], "teachers.arch is 'resnet101'"),
    (["--config.student.arch=vgg"], "student.arch is 'vgg'"),
    (["--config.student.width=0"], "student.width is 0"),
    (["--config.teachers.map=pmap"], "teachers.map is 'pmap'"),
    (["--config.train.pmap=sometimes"], "train.pmap is 'sometimes'"),
    (
        ["--config.dtype=float16"],
        "dtype is 'float16'; expected one of ('float32', 'bfloat16', 'auto')",
    ),
    (["--config.data.image_size=0"], "data.image_size is 0"),
    (["--config.data.eval_batch_size=0"], "data.eval_batch_size is 0"),
    (["--config.data.eval_transform=stretch"], "data.eval_transform is 'stretch'"),
    (["--config.train.eval_every=0"], "train.eval_every is 0; expected an integer >= 1"),
    (["--config.train.checkpoint_every=0"], "train.checkpoint_every is 0"),
    (["--config.train.log_every=0"], "train.log_every is 0"),
    (["--config.teachers.epochs=0"], "teachers.epochs is 0"),
    (["--config.dfr.batch_size=0"], "dfr.batch_size is 0"),
    (["--config.dfr.c_grid=()"], "c_grid"),
    (["--config.dfr.learning_rate=-1"], "dfr.learning_rate is -1"),
    (["--config.train.optimizer.learning_rate=-0.1"], "train.optimizer.learning_rate is -0.1"),
    (["--config.train.optimizer.learning_rate=nan"], "train.optimizer.learning_rate is nan"),
    (["--config.teachers.optimizer.learning_rate=inf"], "teachers.optimizer.learning_rate is inf"),
    (["--config.train.optimizer.name=adam"], "train.optimizer.name is 'adam'"),
    (["--config.train.optimizer.schedule=linear"], "train.optimizer.schedule is 'linear'"),
    (["--config.train.optimizer.momentum=1.5"], "train.optimizer.momentum is 1.5"),
    (["--config.train.optimizer.weight_decay=-1"], "train.optimizer.weight_decay is -1"),
    (["--config.train.optimizer.warmup_epochs=9"], "train.optimizer.warmup_epochs is 9"),
    (["--config.train.pmap=always", "--config.train.batch_size=18"], "does not divide over"),
    (["extra_argument"], "unexpected arguments ['extra_argument']"),
    # Found by a fresh session trying the product as a new user:
    (["--config.seed=-1"], "seed is -1; expected an integer in [0, 2**31)"),
    (["--config.teachers.seed=99999999999999999999"], "teachers.seed is 99999999999999999999"),
    (["--config.distill.temperature=inf"], "temperature must be a finite number > 0"),
    (["--config.distill.gammas.layer3=inf"], "gammas must be >= 0 and finite"),
    (["--config.data.builder.size=-1.0"], "does not configure spurious_shapes (Bad knobs"),
    (["--config.data.name=colored_mnist"], "does not configure colored_mnist"),
    (["--config.data.data_dir=/etc/hostname"], "data.data_dir is '/etc/hostname', a file"),
]


@pytest.mark.parametrize("args, message", CONFIG_CASES, ids=lambda x: str(x)[:60])
def test_config_mistakes(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(ROOT)
    work = tmp_path / "w"
    code, _, err = run_main([*TINY, "--workdir", str(work), *args], capsys)
    assert_refused(code, err, message)
    assert not work.exists()


def test_config_mistakes_of_a_multi_process_run_come_before_it_joins(tmp_path, capsys, monkeypatch):
    """Refused before jax.distributed joins the processes: a peer that never comes would
    otherwise keep the user waiting distributed.initialization_timeout_s for the message."""
    from agre_jax import distributed

    def join(spec):
        raise AssertionError(f"joined ({spec}) before the config was checked")

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(distributed, "initialize", join)
    work = tmp_path / "w"
    args = ["--config.distributed.num_processes=2", "--config.distributed.process_id=1"]
    args += ["--config.distributed.coordinator=localhost:1", "--config.train.epochs=0"]
    code, _, err = run_main([*TINY, "--workdir", str(work), *args, "--config.dtype=bf16"], capsys)
    assert_refused(code, err, "train.epochs is 0")
    assert "dtype is 'bf16'" in err and not work.exists()


@pytest.mark.parametrize(
    "config, message",
    [
        ("configs/tiny.py:waterbird", "unknown dataset preset 'waterbird'"),
        ("configs/tyni.py", "No such file or directory: 'configs/tyni.py'"),
    ],
)
def test_config_file_mistakes(tmp_path, capsys, monkeypatch, config, message):
    monkeypatch.chdir(ROOT)
    code, _, err = run_main(["--config", config, "--workdir", str(tmp_path / "w")], capsys)
    assert_refused(code, err, message)


def test_broken_config_files(tmp_path):
    """In real processes: config_flags caches a loaded config module by name, so that a
    second config file loaded in one process can be mistaken for the first."""
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def get_config(:\n")
    no_get = tmp_path / "noget.py"
    no_get.write_text("X = 1\n")
    for path, message in (
        (syntax, "cannot load the config file: SyntaxError"),
        (no_get, "the config file defines no get_config()"),
    ):
        proc = subprocess.run(
            [sys.executable, "main.py", "--config", str(path), "--workdir", str(tmp_path / "w")],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert_refused(proc.returncode, proc.stderr, message)
    assert not (tmp_path / "w").exists()


def test_missing_config_flag(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, _, err = run_main([], capsys)
    assert_refused(code, err, "--config must have a value")


def test_help_exits_0_and_flag_errors_2_in_a_real_process():
    def run(*args):
        return subprocess.run(
            [sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True
        )

    assert run("--help").returncode == 0
    proc = run("--config", "configs/tiny.py", "--config.train.epoch=3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown config key 'epoch' (Did you mean \"epochs\"" in proc.stderr


# Data, checkpoint and workdir mistakes: found once the data is read, before any training.
def test_data_mistakes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    cases = [
        ([*TINY, "--config.data.name=nosuch"], "data.name is 'nosuch'"),
        ([*TINY, "--config.train.batch_size=100000"], "train.batch_size is 100000 but the"),
        ([*TINY, "--config.teachers.batch_size=100000"], "teachers.batch_size is 100000"),
        (
            [
                "--config=configs/tiny.py:waterbirds",
                f"--config.data.manual_dir={tmp_path / 'nowhere'}",
                f"--config.data.data_dir={tmp_path / 'tfds'}",
            ],
            "nowhere",
        ),
    ]
    for args, message in cases:
        work = tmp_path / "w"
        code, _, err = run_main([*args, "--workdir", str(work)], capsys)
        assert_refused(code, err, message)
        assert not work.exists()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A ported-looking teacher: a tiny ResNet-18 checkpoint of the tiny config's shape."""
    import jax

    from agre_jax import models

    model = models.create("resnet18", 2, width=4, small_input=True)
    variables = models.init(model, jax.random.key(0), 16)
    path = tmp_path_factory.mktemp("teachers") / "erm_0"
    checkpoints.save_variables(
        path,
        variables,
        metadata={
            "arch": "resnet18",
            "num_classes": 2,
            "model_options": {"width": 4, "small_input": True},
            "sha256": "0" * 64,
        },
    )
    return path


def test_checkpoint_mistakes(tmp_path, capsys, monkeypatch, teacher_dir):
    monkeypatch.chdir(ROOT)
    not_a_dir = tmp_path / "file.pt"
    not_a_dir.write_text("x")
    no_provenance = tmp_path / "no_provenance"
    no_provenance.mkdir()
    variables, info = checkpoints.load_variables(teacher_dir)
    three = tmp_path / "three_classes"
    variables3 = {
        "params": {
            **variables["params"],
            "fc": {"kernel": np.zeros((32, 3), np.float32), "bias": np.zeros(3, np.float32)},
        },
        "batch_stats": variables["batch_stats"],
    }
    checkpoints.save_variables(three, variables3, metadata={**info, "num_classes": 3})
    wrong_arch = tmp_path / "wrong_arch"
    checkpoints.save_variables(wrong_arch, variables, metadata={**info, "arch": "resnet34"})
    cases = [
        ([f"--config.teachers.checkpoints=('{tmp_path / 'nope'}',)"], "does not exist"),
        ([f"--config.teachers.checkpoints=('{not_a_dir}',)"], "is not a directory"),
        ([f"--config.teachers.checkpoints=('{no_provenance}',)"], "has no variables"),
        ([f"--config.teachers.checkpoints=('{three}',)"], "3 classes but the dataset has 2"),
        (
            ["--config.teachers.arch=resnet34", f"--config.teachers.checkpoints=('{wrong_arch}',)"],
            "do not fit",
        ),
        (
            [
                "--config.teachers.arch=resnet50",
                f"--config.teachers.checkpoints=('{teacher_dir}',)",
            ],
            "hold resnet18 weights but teachers.arch is 'resnet50'",
        ),
        ([f"--config.biased.checkpoint={tmp_path / 'nope'}"], "biased.checkpoint"),
        (  # a biased model to train, of features unlike the ported teachers'
            [
                f"--config.teachers.checkpoints=('{teacher_dir}',)",
                "--config.distill.feature_weighting=agre",
                "--config.biased.arch=resnet50",
            ],
            "biased model do not fit together: feature_weighting 'agre' compares the biased "
            "model's 'layer3' features with the teachers': widths 64 against 16",
        ),
        (  # ... or of the configured teachers' width, not the ported teachers'
            [
                f"--config.teachers.checkpoints=('{teacher_dir}',)",
                "--config.distill.feature_weighting=agre",
                "--config.biased.arch=resnet18",
                "--config.teachers.width=8",
            ],
            "widths 32 against 16",
        ),
        ([f"--config.student.init_from={not_a_dir}"], "student.init_from"),
        ([f"--config.teachers.init_from={no_provenance}"], "teachers.init_from"),
        (
            ["--config.pretrain.enabled=True", f"--config.student.init_from={teacher_dir}"],
            "pretrain.enabled is True and student.init_from",
        ),
    ]
    for args, message in cases:
        work = tmp_path / "w"
        code, _, err = run_main([*TINY, "--workdir", str(work), *args], capsys)
        assert_refused(code, err, message)
        assert not work.exists(), args


def test_workdir_mistakes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    code, _, err = run_main([*TINY, "--workdir", str(a_file)], capsys)
    assert_refused(code, err, f"{a_file} is a file")
    assert a_file.read_text() == "keep me"
    code, _, err = run_main([*TINY, "--workdir", "/proc/agre_jax_run"], capsys)
    assert_refused(code, err, "cannot write to /proc")
    code, _, err = run_main(
        [*TINY, "--workdir", str(tmp_path / "w"), "--config.stage_dir=/proc/x"], capsys
    )
    assert_refused(code, err, "cannot write to /proc")
    assert not (tmp_path / "w").exists()


def test_workdir_in_use(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    work = tmp_path / "w"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from agre_jax import workdir\n"
            f"with workdir.lock(Path({str(work)!r})):\n"
            "    print('locked', flush=True); time.sleep(60)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(work)
        code, _, err = run_main([*TINY, "--workdir", str(work)], capsys)
        assert_refused(code, err, f"is in use by another run (pid {holder.pid}")
        assert snapshot(work) == before
    finally:
        holder.kill()
        holder.wait()


def test_workdir_of_another_config_is_kept(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    work = tmp_path / "w"
    work.mkdir()
    import configs.tiny

    config = configs.tiny.get_config()
    config.distill.weighting = "aver"
    workdir.write_json(work / workdir.CONFIG_FILE, workdir.config_dict(config))
    (work / "results.json").write_text(json.dumps({"kept": True}))
    before = snapshot(work)
    code, _, err = run_main([*TINY, "--workdir", str(work)], capsys)
    assert_refused(code, err, "distill.weighting")
    assert snapshot(work) == before


def test_no_traceback_for_a_real_process_with_bad_data(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "main.py",
            *TINY,
            "--workdir",
            str(tmp_path / "w"),
            "--config.data.name=nosuch",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_full_disk_mid_run_is_one_line_saying_a_rerun_resumes(tmp_path, capsys, monkeypatch):
    """A storage fault during the run (here a full disk while writing a checkpoint) is not
    bad input: exit 1, one line naming the path and saying that a rerun resumes."""
    import errno

    from agre_jax import train

    monkeypatch.chdir(ROOT)
    target = tmp_path / "w" / "distill" / "checkpoints"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(train, "train_and_evaluate", full_disk)
    code, _, err = run_main([*TINY, "--workdir", str(tmp_path / "w")], capsys)
    assert code == 1 and "Traceback" not in err
    assert f"cannot write {target} (No space left on device)" in err
    assert "rerun the same command: it resumes from the last checkpoint" in err
