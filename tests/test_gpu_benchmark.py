"""benchmarks/gpu.py: its configuration C is configs/multilayer_c.py's, and `--quick` runs
every row of its table with TensorFlow and ml_collections hidden (the GPU image has neither),
each row in its own process, as on the device machine."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import multilayer_c

REPO = Path(__file__).resolve().parents[1]
HIDDEN = ("tensorflow", "tensorflow_datasets", "ml_collections")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"{name}_benchmark", REPO / f"benchmarks/{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu = _load("gpu")
step = _load("step")


def test_configuration_c_is_the_config_files():
    """The constants gpu.py keeps (it reads no config file) and step.py's defaults it relies
    on are configs/multilayer_c.py's at the Waterbirds preset."""
    config = multilayer_c.get_config("waterbirds")
    gammas = config.distill.gammas
    assert gpu.GAMMAS == (gammas.layer2, gammas.layer3, gammas.layer4)
    assert gpu.GAMMA_POOLED == gammas.pooled and gammas.layer1 == 0
    args = step.parse_args(gpu.step_argv(gpu.ROWS[0], gpu.FULL, 1))
    assert args.chunk_size == config.distill.chunk_size
    assert args.teacher_map == config.teachers.map
    assert args.batch_bn == config.distill.batch_bn
    assert (args.teacher_arch, args.student_arch) == (config.teachers.arch, config.student.arch)
    assert args.teachers == config.teachers.num and args.width == config.student.width
    assert not args.small_input and not config.student.small_input
    assert args.image_size == [config.data.image_size]
    opt = config.train.optimizer
    assert (opt.name, opt.learning_rate, opt.momentum, opt.weight_decay) == (
        "sgd",
        step.LEARNING_RATE,
        step.MOMENTUM,
        step.WEIGHT_DECAY,
    )
    for row in gpu.ROWS:
        cfg = step.METHODS[row.method]
        assert cfg["weighting"] in ("aver", "agre")
        assert cfg["weighting"] == "aver" or (cfg["grad_scope"], cfg["gram"]) == (
            "full",
            config.distill.gram,
        )
    assert gpu.epochs_s(1.0, 128) == 30 * 37  # 4,795 // 128 steps per epoch


@pytest.fixture
def hidden_env(tmp_path):
    """The environment of a process (and of its children) where HIDDEN cannot be imported."""
    for name in HIDDEN:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} is hidden')\n")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path}


def _run(env, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu.py"), "--quick", *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=3000,
    )


def _table(stdout: str) -> dict[int, list[str]]:
    """{row number: its cells} of the printed table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


# A jit and a pmap row, bf16 and float32, AVER and AGRE-KD with 10 classes (the layerwise
# Gram): every kind of row, at a sixth of the whole table's time (the table lists the rest).
MEASURED = (1, 12)


def test_quick_rows_without_tensorflow(hidden_env):
    check = subprocess.run(
        [sys.executable, "-c", "import tensorflow"], env=hidden_env, capture_output=True
    )
    assert check.returncode != 0, "the test's hiding of TensorFlow does not work"
    rows = [str(r) for r in MEASURED]
    proc = _run(hidden_env, "--timeout-s", "2400", "--rows", *rows)  # however loaded the CPU
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = _table(proc.stdout)
    assert sorted(table) == list(range(1, len(gpu.ROWS) + 1))
    header = list(gpu.HEADER)
    for number, row in enumerate(gpu.ROWS, start=1):
        cells = dict(zip(header, table[number], strict=True))
        assert cells["dtype"] == row.dtype and cells["classes"] == str(row.classes)
        assert cells["step"].startswith(row.mode)
        assert cells["method"] == gpu.METHOD_NAMES[row.method]
        if number not in MEASURED:
            assert "not selected (--rows)" in table[number], cells
            continue
        assert float(cells["step s"]) > 0 and float(cells["images/s"]) > 0, cells
        assert cells["peak GiB (device)"] == "-"  # the CPU keeps no memory statistics
        assert float(cells["plan GiB"]) > 0
    assert {gpu.ROWS[r - 1].mode for r in MEASURED} == {"jit", "pmap"}
    assert {gpu.ROWS[r - 1].dtype for r in MEASURED} == {"bfloat16", "float32"}
    assert f"{len(MEASURED)} of {len(gpu.ROWS)} rows measured" in proc.stdout
    assert "quick sizes: not comparable" in proc.stdout


def test_spent_budget_skips_every_row(capsys):
    """A budget spent before a row starts (less than MIN_ROW_S left) lists the rows left as
    skipped; the table's parent process starts no row and no backend."""
    results = gpu.run_table(quick=True, steps=1, timeout_s=gpu.MIN_ROW_S - 1)
    out = capsys.readouterr().out
    table = _table(out)
    assert sorted(table) == list(range(1, len(gpu.ROWS) + 1))
    assert all("skipped (time budget spent)" in cells for cells in table.values())
    assert f"0 of {len(gpu.ROWS)} rows measured" in out
    assert not any("step_s" in r for r in results.values())


@pytest.mark.parametrize("value", ["0", "-1", "4.9", "nan", "inf"])
def test_a_budget_too_small_to_measure_a_row_is_refused(capsys, value):
    with pytest.raises(SystemExit) as e:
        gpu.parse_args(["--quick", "--timeout-s", value])
    assert e.value.code == 2
    assert f"--timeout-s is {float(value):g}; expected seconds >= 5" in capsys.readouterr().err
    assert gpu.parse_args(["--timeout-s", "5"]).timeout_s == 5.0
