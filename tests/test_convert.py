"""Tests of convert/ (torchvision <-> Flax) and agre_jax.checkpoints.

Equivalence is checked against real torchvision models (random weights, no download) on the
same random batch; the command line is run as a subprocess, as a user would run it. Run with
`pytest -s` to see the measured differences.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import functools
import hashlib
import io
import json
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util
from safetensors.numpy import save_file as save_safetensors

import convert
from agre_jax import checkpoints, models
from convert import __main__ as cli
from convert.torch_resnet import fresh_head

REPO = Path(__file__).resolve().parents[1]
TORCH_LAYERS = ("layer1", "layer2", "layer3", "layer4", "avgpool")
ATOL = 1e-4


def _random_torch_resnet(arch: str, num_classes: int, seed: int = 0) -> torch.nn.Module:
    """A torchvision ResNet with random weights, BatchNorm statistics and affine params (eval).

    Running statistics come from one training-mode pass on random images (momentum 1), then
    are perturbed (mean + 0.1 std noise, var x U(0.8, 1.25)). BatchNorm scales are U(0.5, 1.5)
    and biases N(0, 0.2), except the last BatchNorm of each residual branch, scaled U(0.2, 0.6)
    as in trained networks. Why: with scale ~1 the residual stream of a random ResNet-50 grows
    to |x| ~ 15, where float32 rounding alone (either framework against float64) reaches 5e-4
    at layer4; at |x| ~ 7 both stay under 5e-5 of float64.
    """
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    gen = torch.Generator().manual_seed(seed + 1)
    last_bn = "bn3" if arch == "resnet50" else "bn2"
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                low, high = (0.2, 0.6) if name.endswith(last_bn) else (0.5, 1.5)
                module.weight.uniform_(low, high, generator=gen)
                module.bias.normal_(0.0, 0.2, generator=gen)
                module.momentum = 1.0
        model.fc.bias.normal_(0.0, 0.1, generator=gen)
        model.train()
        model(torch.randn(8, 3, 64, 64, generator=gen))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 0.1
                c = module.num_features
                std = module.running_var.sqrt()
                module.running_mean.add_(0.1 * std * torch.randn(c, generator=gen))
                module.running_var.mul_(torch.empty(c).uniform_(0.8, 1.25, generator=gen))
                module.num_batches_tracked.zero_()
    return model.eval()


def _torch_forward(model: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, dict]:
    """Logits [B, C] and {layer1..4: [B, h, w, c], pooled: [B, c]} (NHWC) from hooks."""
    captured = {}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().numpy())
        )
        for name in TORCH_LAYERS
    ]
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    features = {name: captured[name].transpose(0, 2, 3, 1) for name in TORCH_LAYERS[:4]}
    features["pooled"] = captured["avgpool"][:, :, 0, 0]
    return logits, features


def _numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _max_diffs(logits, features, ref_logits, ref_features) -> dict[str, float]:
    diffs = {"logits": float(np.max(np.abs(np.asarray(logits) - ref_logits)))}
    for name, ref in ref_features.items():
        chex.assert_shape(features[name], ref.shape)
        diffs[name] = float(np.max(np.abs(np.asarray(features[name]) - ref)))
    return diffs


def _report(label: str, diffs: dict[str, float]) -> None:
    print(f"\n[torch vs flax] {label}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


def _assert_trees_equal(a, b) -> None:
    """Same structure, shapes, dtypes and bits."""
    chex.assert_trees_all_equal_structs(a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)


# ------------------------------------------------------------------ equivalence with torchvision


@pytest.mark.parametrize("arch", models.ARCHS)
def test_eval_mode_matches_torchvision(arch, images, tmp_path):
    torch_model = _random_torch_resnet(arch, num_classes=3)
    path = tmp_path / f"{arch}.pt"
    torch.save(torch_model.state_dict(), path)
    ref_logits, ref_features = _torch_forward(torch_model, images)

    variables = convert.load_torch_resnet(path, arch, 3)
    model = models.create(arch, 3)
    logits, features = jax.jit(functools.partial(models.apply_with_features, model))(
        variables, images
    )
    diffs = _max_diffs(logits, features, ref_logits, ref_features)
    _report(f"{arch} eval", diffs)
    scale = max(float(np.max(np.abs(f))) for f in ref_features.values())
    print(f"[torch vs flax] {arch} eval: max |feature| {scale:.1f}")
    assert max(diffs.values()) < ATOL, diffs


def test_train_mode_matches_torchvision(images):
    arch = "resnet18"
    torch_model = _random_torch_resnet(arch, num_classes=3, seed=7)
    variables, _ = convert.convert_state_dict(_numpy_state_dict(torch_model), arch, 3)
    old = _numpy_state_dict(torch_model)

    counts = {}  # BatchNorm name -> values per channel in the batch (B * H * W)
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: counts.__setitem__(name, args[0].numel() // m.num_features)
        )
        for name, module in torch_model.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d)
    ]
    ref_logits, ref_features = _torch_forward(torch_model.train(), images)
    for hook in hooks:
        hook.remove()
    new = _numpy_state_dict(torch_model)

    model = models.create(arch, 3)
    apply_fn = functools.partial(models.apply_with_features, model, train=True)
    logits, features, batch_stats = jax.jit(apply_fn)(variables, images)
    diffs = _max_diffs(logits, features, ref_logits, ref_features)

    # The running statistics. Both frameworks weight the new batch by 0.1 (flax momentum 0.9),
    # and both accumulate the unbiased batch variance (n / (n - 1) times the biased one that
    # normalises the batch; models.TorchBatchNorm), where flax's own BatchNorm would give
    # 0.9 v + (torch - 0.9 v) * (n - 1) / n, with v the old value and n = B * H * W.
    ported = convert.to_torch_state_dict(
        {"params": variables["params"], "batch_stats": batch_stats}, arch
    )
    mean_diff = var_diff = var_rel = 0.0
    for name, n in counts.items():
        mean_diff = max(
            mean_diff,
            np.max(np.abs(ported[f"{name}.running_mean"].numpy() - new[f"{name}.running_mean"])),
        )
        v = old[f"{name}.running_var"]
        expected = new[f"{name}.running_var"]
        got = ported[f"{name}.running_var"].numpy()
        var_diff = max(var_diff, np.max(np.abs(got - expected)))
        var_rel = max(var_rel, np.max(np.abs(got - expected) / np.abs(expected)))
        # And the difference from flax's own update is really there (n is small enough).
        flax_own = 0.9 * v + (expected - 0.9 * v) * (n - 1) / n
        assert not np.allclose(got, flax_own, rtol=1e-7, atol=0)
    diffs.update(running_mean=float(mean_diff), running_var=float(var_diff))
    _report(f"{arch} train", {**diffs, "running_var (relative)": float(var_rel)})
    assert max(diffs.values()) < ATOL and var_rel < 1e-5, diffs


# ------------------------------------------------------------------------- round trip and API


def _random_variables(arch: str, num_classes: int, seed: int) -> dict:
    """A Flax variable tree of `arch` filled with random float32 numbers (var > 0)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for entry in convert.key_table(arch, num_classes).values():
        values = rng.normal(size=entry.shape).astype(np.float32)
        flat[entry.path] = np.abs(values) + 0.1 if entry.path[-1] == "var" else values
    return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("arch", models.ARCHS)
def test_round_trip_flax_torch_flax_is_exact(arch):
    variables = _random_variables(arch, num_classes=5, seed=1)
    state_dict = convert.to_torch_state_dict(variables, arch)

    torch_model = getattr(torchvision.models, arch)(num_classes=5)
    assert list(state_dict) == list(torch_model.state_dict())  # same keys, same order
    torch_model.load_state_dict(state_dict, strict=True)
    tracked = [v for k, v in state_dict.items() if k.endswith("num_batches_tracked")]
    assert tracked and all(t.dtype == torch.long and int(t) == 0 for t in tracked)

    back, dropped = convert.convert_state_dict(_numpy_state_dict(torch_model), arch, 5)
    _assert_trees_equal(back, variables)
    assert len(dropped) == len(tracked)


def test_to_torch_state_dict_rejects_other_trees():
    variables = _random_variables("resnet18", num_classes=2, seed=0)
    with pytest.raises(convert.ConversionError, match="shape mismatches"):
        convert.to_torch_state_dict(variables, "resnet50")
    with pytest.raises(convert.ConversionError, match="missing keys: layer1.2.conv1.weight"):
        convert.to_torch_state_dict(variables, "resnet34")  # more blocks, same widths
    del variables["batch_stats"]["bn1"]
    with pytest.raises(convert.ConversionError, match="missing keys: bn1.running_mean"):
        convert.to_torch_state_dict(variables, "resnet18")


def test_fresh_head():
    head = fresh_head(4, 512, seed=3)
    chex.assert_shape([head["kernel"], head["bias"]], [(512, 4), (4,)])
    chex.assert_type([head["kernel"], head["bias"]], np.float32)
    _assert_trees_equal(head, fresh_head(4, 512, seed=3))
    assert not np.array_equal(head["kernel"], fresh_head(4, 512, seed=4)["kernel"])
    # lecun normal: std 1 / sqrt(fan_in); flax's Dense initialises the bias at zero.
    assert 0.8 < head["kernel"].std() * np.sqrt(512) < 1.2
    np.testing.assert_array_equal(head["bias"], 0.0)


@pytest.fixture(scope="module")
def resnet18_state_dict() -> dict[str, torch.Tensor]:
    return _random_torch_resnet("resnet18", num_classes=2, seed=3).state_dict()


@pytest.mark.parametrize(
    "wrapper, prefix, suffix",
    [
        ("", "module.", ".pt"),
        ("model", "", ".pth"),
        ("state_dict", "module.", ".pt"),
        ("model_state_dict", "model.", ".pt"),
        ("state_dict", "backbone.", ".pth"),
        ("model", "module.model.", ".pt"),
    ],
)
def test_wrapped_and_prefixed_checkpoints(resnet18_state_dict, tmp_path, wrapper, prefix, suffix):
    expected, _ = convert.convert_state_dict(
        {k: v.numpy() for k, v in resnet18_state_dict.items()}, "resnet18", 2
    )
    obj = {prefix + k: v for k, v in resnet18_state_dict.items()}
    if wrapper:
        obj = {wrapper: obj, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}}
    path = tmp_path / f"checkpoint{suffix}"
    torch.save(obj, path)

    result = convert.convert_checkpoint(path, "resnet18", 2)
    _assert_trees_equal(result.variables, expected)
    assert (result.unwrapped, result.stripped_prefix, result.head) == (wrapper, prefix, "ported")


def test_safetensors_without_torch(resnet18_state_dict, tmp_path):
    arrays = {f"module.{k}": v.numpy() for k, v in resnet18_state_dict.items()}
    path = tmp_path / "weights.safetensors"
    save_safetensors(arrays, str(path))
    expected, _ = convert.convert_state_dict(
        {k: v.numpy() for k, v in resnet18_state_dict.items()}, "resnet18", 2
    )
    _assert_trees_equal(convert.load_torch_resnet(path, "resnet18", 2), expected)

    # In a fresh interpreter where torch cannot be imported at all.
    script = f"""
import sys
sys.modules["torch"] = None  # makes `import torch` fail
import numpy as np
import convert
from agre_jax import checkpoints
variables = convert.load_torch_resnet({str(path)!r}, "resnet18", 2)
checkpoints.save_variables({str(tmp_path / "out")!r}, variables, metadata={{}})
print(float(np.abs(variables["params"]["conv1"]["kernel"]).sum()))
"""
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert float(run.stdout) == pytest.approx(
        float(np.abs(expected["params"]["conv1"]["kernel"]).sum())
    )


# ------------------------------------------------------------------------------ command line


class _Evil:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _write_inputs(root: Path) -> dict[str, Path]:
    """Every checkpoint file the command-line tests read."""
    files = {}
    state_dict = _random_torch_resnet("resnet18", num_classes=2, seed=5).state_dict()
    files["good"] = root / "resnet18.pt"
    torch.save(state_dict, files["good"])
    files["imagenet"] = root / "resnet18_imagenet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), files["imagenet"])  # 1000 classes

    files["directory"] = root / "dfr"
    files["directory"].mkdir()
    for seed in (1, 2):
        sd = _random_torch_resnet("resnet18", num_classes=2, seed=10 + seed).state_dict()
        torch.save(sd, files["directory"] / f"erm_seed{seed}.pt")
    (files["directory"] / "README.txt").write_text("not a checkpoint, ignored\n")

    files["text"] = root / "notes.pt"
    files["text"].write_text("these are my notes, not a checkpoint\n" * 20)
    data = files["good"].read_bytes()
    files["truncated"] = root / "truncated.pt"
    files["truncated"].write_bytes(data[: len(data) // 2])
    safetensors_path = root / "full.safetensors"
    save_safetensors({k: v.numpy() for k, v in state_dict.items()}, str(safetensors_path))
    files["truncated_safetensors"] = root / "truncated.safetensors"
    files["truncated_safetensors"].write_bytes(safetensors_path.read_bytes()[:5000])
    files["not_state_dict"] = root / "list.pt"
    torch.save([torch.zeros(3), torch.ones(2)], files["not_state_dict"])

    files["marker"] = root / "MARKER"
    files["malicious_pickle"] = root / "evil_pickle.pt"
    with open(files["malicious_pickle"], "wb") as f:
        pickle.dump({"conv1.weight": _Evil(files["marker"])}, f, protocol=2)
    files["malicious_torch"] = root / "evil_torch.pt"
    torch.save({"model": {"conv1.weight": _Evil(files["marker"])}}, files["malicious_torch"])

    partial = dict(state_dict)
    for key in [k for k in partial if k.startswith("layer4.1.bn2.")]:
        del partial[key]
    files["missing_keys"] = root / "missing.pt"
    torch.save(partial, files["missing_keys"])
    files["unexpected_keys"] = root / "unexpected.pt"
    torch.save({**state_dict, "head.extra.weight": torch.zeros(4, 2)}, files["unexpected_keys"])

    files["bad_in_directory"] = root / "mixed"
    files["bad_in_directory"].mkdir()
    (files["bad_in_directory"] / "a_good.pt").write_bytes(data)
    (files["bad_in_directory"] / "b_bad.pt").write_text("not a checkpoint\n")
    return files


# name: (--src file key, --arch, --num-classes, extra flags, phrases expected on stderr)
BAD_INPUTS = {
    "missing_file": ("nonexistent", "resnet18", 2, [], ["does not exist"]),
    "text_file": ("text", "resnet18", 2, [], ["could not read", "not a checkpoint"]),
    "truncated": ("truncated", "resnet18", 2, [], ["could not read", "truncated"]),
    "truncated_safetensors": ("truncated_safetensors", "resnet18", 2, [], ["safetensors"]),
    "not_state_dict": ("not_state_dict", "resnet18", 2, [], ["holds a list, not a state_dict"]),
    "malicious_pickle": ("malicious_pickle", "resnet18", 2, [], ["refused to load", "posix"]),
    "malicious_torch": ("malicious_torch", "resnet18", 2, [], ["refused to load", "posix"]),
    "wrong_arch": (
        "good",
        "resnet50",
        2,
        [],
        ["look like a torchvision resnet18", "shape mismatches", "missing keys", "more)"],
    ),
    "missing_keys": ("missing_keys", "resnet18", 2, [], ["4 missing keys: layer4.1.bn2.weight"]),
    "unexpected_keys": (
        "unexpected_keys",
        "resnet18",
        2,
        [],
        ["1 unexpected keys: head.extra.weight [4, 2]"],
    ),
    "head_mismatch": ("imagenet", "resnet18", 2, [], ["1000-class head", "--drop-head"]),
    "unknown_arch": ("good", "resnet101", 2, [], ["unknown architecture 'resnet101'"]),
    "existing_dst": ("good", "resnet18", 2, [], ["already exists", "--force"]),
    "bad_in_directory": ("bad_in_directory", "resnet18", 2, [], ["b_bad.pt", "could not read"]),
}
GOOD_INPUTS = {
    "good": ("good", "resnet18", 2, []),
    "directory": ("directory", "resnet18", 2, []),
    "drop_head": ("imagenet", "resnet18", 2, ["--drop-head", "--seed", "5"]),
}


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "convert", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# Run as `python -m convert` subprocesses, in parallel (each start imports jax and torch, ~10 s
# of CPU): a conversion that succeeds and the bad input where a stray traceback or warning on
# stderr is most likely. The other cases call `convert.__main__.main` in this process: the same
# code after argument parsing, and an uncaught exception there fails the test.
SUBPROCESS_CASES = ("good", "malicious_pickle")


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict:
    """Input files, the arguments of every case, and the results of SUBPROCESS_CASES."""
    root = tmp_path_factory.mktemp("cli")
    files = _write_inputs(root)
    files["nonexistent"] = root / "nonexistent.pt"
    existing = root / "out" / "existing_dst"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("precious")

    cases = {}
    for name, (src, arch, num_classes, flags, *_) in {**BAD_INPUTS, **GOOD_INPUTS}.items():
        dst = root / "out" / name
        args = ["--arch", arch, "--num-classes", str(num_classes), "--src", str(files[src])]
        cases[name] = ([*args, "--dst", str(dst), *flags], dst)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_cli, *cases[name][0]) for name in SUBPROCESS_CASES}
        runs = {name: future.result() for name, future in futures.items()}
    for name in GOOD_INPUTS:  # the other conversions that succeed, in this process
        if name not in runs:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = cli.main(cases[name][0])
            runs[name] = subprocess.CompletedProcess(name, status, out.getvalue(), err.getvalue())
    return {"files": files, "cases": cases, "runs": runs}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_bad_input(cli_runs, case, capsys):
    args, dst = cli_runs["cases"][case]
    if case in cli_runs["runs"]:
        run = cli_runs["runs"][case]
    else:
        status = cli.main(args)
        out, err = capsys.readouterr()
        run = subprocess.CompletedProcess(args, status, out, err)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
    for phrase in BAD_INPUTS[case][-1]:
        assert phrase in run.stderr, run.stderr
    assert run.stdout == ""
    if case == "existing_dst":
        assert [p.name for p in dst.iterdir()] == ["keep.txt"]
        assert (dst / "keep.txt").read_text() == "precious"
    else:
        assert not dst.exists()
    assert not list(dst.parent.glob(".*tmp-*"))  # no temporary directory left behind
    assert not cli_runs["files"]["marker"].exists()  # the malicious pickles never ran


def test_malicious_pickle_would_run_code(cli_runs, tmp_path):
    """The trap of the malicious-pickle cases is real: plain unpickling runs the command."""
    marker = tmp_path / "CONTROL"
    pickle.loads(pickle.dumps({"conv1.weight": _Evil(marker)}, protocol=2))
    assert marker.exists()
    assert not cli_runs["files"]["marker"].exists()


def test_cli_converts_a_file(cli_runs):
    run, dst = cli_runs["runs"]["good"], cli_runs["cases"]["good"][1]
    assert run.returncode == 0, run.stderr
    src = cli_runs["files"]["good"]
    assert run.stdout.strip() == run.stdout.strip().splitlines()[0]  # one line
    assert f"{src} -> {dst}: resnet18" in run.stdout and "20 dropped keys" in run.stdout

    variables, metadata = checkpoints.load_variables(dst)
    _assert_trees_equal(variables, convert.load_torch_resnet(src, "resnet18", 2))
    assert metadata["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert metadata["source"] == str(src) and Path(metadata["source"]).is_absolute()
    assert metadata["arch"] == "resnet18" and metadata["num_classes"] == 2
    assert metadata["head"] == "ported" and metadata["format"] == convert.FORMAT_VERSION
    assert len(metadata["dropped_keys"]) == 20
    assert all(k.endswith(".num_batches_tracked") for k in metadata["dropped_keys"])
    assert datetime.datetime.fromisoformat(metadata["created"]).tzinfo is not None


def test_cli_converts_a_directory(cli_runs):
    run, dst = cli_runs["runs"]["directory"], cli_runs["cases"]["directory"][1]
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["erm_seed1", "erm_seed2"]
    assert len(run.stdout.strip().splitlines()) == 2
    for stem in ("erm_seed1", "erm_seed2"):
        src = cli_runs["files"]["directory"] / f"{stem}.pt"
        variables, metadata = checkpoints.load_variables(dst / stem)
        assert metadata["source"] == str(src)
        _assert_trees_equal(variables, convert.load_torch_resnet(src, "resnet18", 2))


def test_cli_drop_head(cli_runs):
    run, dst = cli_runs["runs"]["drop_head"], cli_runs["cases"]["drop_head"][1]
    assert run.returncode == 0, run.stderr
    assert "head fresh" in run.stdout and "22 dropped keys" in run.stdout
    variables, metadata = checkpoints.load_variables(dst)
    assert metadata["head"] == "fresh" and metadata["seed"] == 5
    assert {"fc.weight", "fc.bias"} <= set(metadata["dropped_keys"])
    _assert_trees_equal(variables["params"]["fc"], fresh_head(2, 512, seed=5))

    src = cli_runs["files"]["imagenet"]
    with pytest.raises(convert.ConversionError, match="1000-class head"):
        convert.load_torch_resnet(src, "resnet18", 2)
    imagenet = convert.load_torch_resnet(src, "resnet18", 1000)
    del imagenet["params"]["fc"], variables["params"]["fc"]
    _assert_trees_equal(variables, imagenet)  # the backbone is the file's


def test_cli_force_replaces_only_when_complete(cli_runs, tmp_path, capsys):
    src = cli_runs["files"]["good"]
    dst = tmp_path / "teacher"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    args = ["--arch", "resnet18", "--num-classes", "2", "--src", str(src), "--dst", str(dst)]
    assert cli.main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (dst / "old.txt").read_text() == "old"

    assert cli.main([*args, "--force"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["provenance.json", "variables"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]  # no leftovers
    checkpoints.load_variables(dst)


# ------------------------------------------------------------------------ agre_jax.checkpoints


@pytest.fixture(scope="module")
def small_variables() -> dict:
    return _random_variables("resnet18", num_classes=2, seed=4)


def test_checkpoints_round_trip(small_variables, tmp_path):
    metadata = {"arch": "resnet18", "dropped_keys": ["a"], "nested": {"x": 1}}
    checkpoints.save_variables(tmp_path / "a" / "b", small_variables, metadata=metadata)
    variables, loaded = checkpoints.load_variables(tmp_path / "a" / "b")
    _assert_trees_equal(variables, small_variables)
    assert loaded == metadata
    assert json.loads((tmp_path / "a" / "b" / "provenance.json").read_text()) == metadata
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b"]


def test_checkpoints_refuse_to_overwrite(small_variables, tmp_path):
    (tmp_path / "empty").mkdir()
    checkpoints.save_variables(tmp_path / "empty", small_variables, metadata={})  # empty: fine
    with pytest.raises(FileExistsError, match="not empty"):
        checkpoints.save_variables(tmp_path / "empty", small_variables, metadata={"v": 2})
    assert checkpoints.load_variables(tmp_path / "empty")[1] == {}
    checkpoints.save_variables(tmp_path / "empty", small_variables, metadata={"v": 2}, force=True)
    assert checkpoints.load_variables(tmp_path / "empty")[1] == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_checkpoints_failed_write_leaves_nothing(small_variables, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="JSON"):
        checkpoints.save_variables(tmp_path / "x", small_variables, metadata={"f": object()})
    with pytest.raises(ValueError, match="collections"):
        checkpoints.save_variables(tmp_path / "x", {"params": {}}, metadata={})
    checkpoints.save_variables(tmp_path / "y", small_variables, metadata={"v": 1})

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.ocp.StandardCheckpointer, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_variables(tmp_path / "x", small_variables, metadata={})
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_variables(tmp_path / "y", small_variables, metadata={}, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y"]
    assert checkpoints.load_variables(tmp_path / "y")[1] == {"v": 1}


def test_checkpoints_load_errors(small_variables, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoints.load_variables(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        checkpoints.load_variables(tmp_path / "file")
    checkpoints.save_variables(tmp_path / "ckpt", small_variables, metadata={})
    (tmp_path / "ckpt" / "provenance.json").write_text("{not json")
    with pytest.raises(ValueError, match="provenance.json"):
        checkpoints.load_variables(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "provenance.json").unlink()
    with pytest.raises(FileNotFoundError, match="no provenance.json"):
        checkpoints.load_variables(tmp_path / "ckpt")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "provenance.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no variables"):
        checkpoints.load_variables(tmp_path / "bare")
    (tmp_path / "bare" / "variables").mkdir()
    with pytest.raises(ValueError, match="orbax"):
        checkpoints.load_variables(tmp_path / "bare")
