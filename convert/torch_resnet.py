"""torchvision ResNet checkpoints <-> agre_jax Flax variables, by an explicit key table.

    torchvision                                  Flax ({collection}/{path})
    conv1.weight            [O, I, kh, kw]       params/conv1/kernel        [kh, kw, I, O]
    bn1.weight, bn1.bias    [C]                  params/bn1/scale, params/bn1/bias
    bn1.running_mean/var    [C]                  batch_stats/bn1/mean, batch_stats/bn1/var
    bn1.num_batches_tracked []                   dropped (listed in dropped_keys)
    layerK.i.convJ, layerK.i.bnJ                 layerK/i/convJ, layerK/i/bnJ (as above)
    layerK.i.downsample.0   (conv)               layerK/i/downsample_conv
    layerK.i.downsample.1   (batch norm)         layerK/i/downsample_bn
    fc.weight [out, in], fc.bias [out]           params/fc/kernel [in, out], params/fc/bias

The table is built for the requested architecture from the shapes of a freshly initialised
model (`jax.eval_shape` of `models.init`, nothing is computed), so every key of the Flax tree
has exactly one torchvision name and the check against the model lists missing keys,
unexpected keys and shape mismatches by their torchvision names.

torch is imported only inside the functions that read `.pt`/`.pth` files or build torch
tensors: `.safetensors` files convert with numpy alone.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from agre_jax import models

FORMAT_VERSION = 1
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")  # tried in this order
PREFIXES = ("module.", "model.", "backbone.")  # DataParallel, Lightning, SSL wrappers
HEAD_KEYS = ("fc.weight", "fc.bias")
MAX_LISTED = 8  # keys listed per category in an error message

# Flax module and leaf names that differ from torchvision's.
_MODULE_TO_TORCH = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# torchvision's state_dict order, for `to_torch_state_dict` (jax sorts dict keys).
_TORCH_RANK = {
    **{name: i for i, name in enumerate(("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"))},
    **{f"layer{k}": 10 + k for k in range(1, 5)},
    "downsample": 20,
    "fc": 30,
    **{name: i for i, name in enumerate(("weight", "bias", "running_mean", "running_var"))},
    "num_batches_tracked": 4,
}


class ConversionError(Exception):
    """A checkpoint or variable tree that cannot be converted.

    The message is one paragraph for the user: what was wrong, with which file, and what to do.
    """


class _Entry(NamedTuple):
    """One row of the key table."""

    path: tuple[str, ...]  # (collection, *module path, leaf)
    shape: tuple[int, ...]  # Flax shape
    torch_shape: tuple[int, ...]  # torchvision shape


@dataclasses.dataclass(frozen=True)
class Converted:
    """A converted checkpoint and where it came from.

    Attributes:
      variables: {'params', 'batch_stats'} of float32 numpy arrays.
      source: absolute path of the file read.
      sha256: hex digest of that file.
      arch, num_classes: the model the variables are for (`models.create(arch, num_classes)`).
      dropped_keys: torchvision keys read but not kept (num_batches_tracked, a dropped head).
      head: 'ported' (fc from the file) or 'fresh' (initialised with `seed`).
      seed: PRNG seed of a fresh head.
      unwrapped: the wrapper key the state_dict was found under ('' for a bare state_dict).
      stripped_prefix: key prefix removed from every key ('' if none).
    """

    variables: dict[str, Any]
    source: str
    sha256: str
    arch: str
    num_classes: int
    dropped_keys: list[str]
    head: str
    seed: int
    unwrapped: str = ""
    stripped_prefix: str = ""

    def metadata(self) -> dict[str, Any]:
        """The provenance record written next to the variables."""
        return {
            "format": FORMAT_VERSION,
            "converter": "convert.torch_resnet",
            "source": self.source,
            "sha256": self.sha256,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "model_options": {},  # models.create defaults: width 64, standard stem
            "dropped_keys": list(self.dropped_keys),
            "head": self.head,
            "seed": self.seed,
            "unwrapped": self.unwrapped,
            "stripped_prefix": self.stripped_prefix,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }

    def max_abs_param(self) -> float:
        """max |x| over the params (not the batch statistics)."""
        leaves = jax.tree.leaves(self.variables["params"])
        return float(max(np.max(np.abs(x)) for x in leaves))


def _shape_str(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _listing(items: list[str], what: str) -> str:
    """'3 missing keys: a, b, c' with at most MAX_LISTED shown."""
    shown = ", ".join(items[:MAX_LISTED])
    more = f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return f"{len(items)} {what}: {shown}{more}"


def _problems(mismatched: list[str], missing: list[str], unexpected: list[str]) -> str:
    """'2 shape mismatches: ...; 1 missing keys: ...' for the non-empty categories."""
    problems = [
        _listing(mismatched, "shape mismatches") if mismatched else "",
        _listing(missing, "missing keys") if missing else "",
        _listing(unexpected, "unexpected keys") if unexpected else "",
    ]
    return "; ".join(p for p in problems if p)


def _check_model(arch: str, num_classes: int) -> None:
    if arch not in models.ARCHS:
        raise ConversionError(
            f"unknown architecture {arch!r}: the converter supports {', '.join(models.ARCHS)} "
            "(torchvision's ResNets with the standard stem and width 64)."
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConversionError(
            f"the number of classes must be a positive integer, got {num_classes}"
        )


def torch_key(path: tuple[str, ...]) -> str:
    """torchvision name of a Flax leaf: ('params', 'layer1', '0', 'downsample_conv', 'kernel')
    -> 'layer1.0.downsample.0.weight'."""
    collection, *modules, leaf = path
    names = [_MODULE_TO_TORCH.get(m, m) for m in modules]
    return ".".join([*names, _LEAF_TO_TORCH[(collection, leaf)]])


def _to_torch_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    """Flax layout -> torchvision layout (conv HWIO -> OIHW, dense [in, out] -> [out, in])."""
    if path[-1] == "kernel":
        return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
    return array


def _to_flax_layout(path: tuple[str, ...], array: np.ndarray, ndim: int) -> np.ndarray | None:
    """torchvision layout -> Flax layout; None if `array` has the wrong rank."""
    if array.ndim != ndim:
        return None
    if path[-1] == "kernel":
        return array.transpose(2, 3, 1, 0) if ndim == 4 else array.T
    return array


def key_table(arch: str, num_classes: int) -> dict[str, _Entry]:
    """{torchvision key: entry} for `models.create(arch, num_classes)`, in torchvision's order.

    Shapes come from `jax.eval_shape` of the model's init (traced, not run).
    """
    _check_model(arch, num_classes)
    return dict(_key_table(arch, num_classes))


@functools.lru_cache(maxsize=16)
def _key_table(arch: str, num_classes: int) -> dict[str, _Entry]:
    model = models.create(arch, num_classes)
    # 32 px is the smallest input for which every stage has a non-empty spatial map.
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
    )
    table = {}
    for path, leaf in traverse_util.flatten_dict(dict(shapes)).items():
        shape = tuple(leaf.shape)
        torch_shape = _to_torch_layout(path, np.broadcast_to(np.float32(0), shape)).shape
        table[torch_key(path)] = _Entry(path, shape, tuple(torch_shape))
    order = lambda key: [int(p) if p.isdigit() else _TORCH_RANK[p] for p in key.split(".")]
    return {key: table[key] for key in sorted(table, key=order)}


def _guess_arch(keys: Iterable[str]) -> str | None:
    """The torchvision ResNet a set of keys looks like, from the blocks in layer3."""
    keys = set(keys)
    if "layer1.0.conv1.weight" not in keys:
        return None
    blocks = {m.group(1) for k in keys if (m := re.match(r"layer3\.(\d+)\.", k))}
    bottleneck = "layer1.0.conv3.weight" in keys
    names = {
        (False, 2): "resnet18",
        (False, 6): "resnet34",
        (True, 6): "resnet50",
        (True, 23): "resnet101",
        (True, 36): "resnet152",
    }
    return names.get((bottleneck, len(blocks)))


class _Head(nn.Module):
    """The ResNet's `fc` alone: same scope path, so the same init as in `models.init`."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes, param_dtype=jnp.float32, name="fc")(x)


def fresh_head(num_classes: int, in_features: int, seed: int) -> dict[str, np.ndarray]:
    """{'kernel': [in, out], 'bias': [out]}: equal to the `fc` of `models.init` with
    `jax.random.key(seed)` (flax derives a submodule's key from its path)."""
    head = _Head(num_classes).init(jax.random.key(seed), jnp.zeros((1, in_features), jnp.float32))
    return jax.tree.map(np.asarray, dict(head["params"]["fc"]))


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    arch: str,
    num_classes: int,
    *,
    drop_head: bool = False,
    seed: int = 0,
    source: str = "the state_dict",
) -> tuple[dict[str, Any], list[str]]:
    """Maps a torchvision state_dict (numpy arrays, prefixes already stripped) to Flax.

    Args:
      state_dict: {torchvision key: array in torch layout}.
      arch, num_classes: the target `models.create(arch, num_classes)`.
      drop_head: ignore the file's `fc` and initialise a fresh one from `seed`.
      seed: PRNG seed of a fresh head.
      source: how to name the input in error messages.

    Returns:
      ({'params', 'batch_stats'} of float32 numpy arrays, dropped torchvision keys).

    Raises:
      ConversionError: missing or unexpected keys, shape mismatches (another architecture), or
        a head whose size is not `num_classes` without `drop_head`.
    """
    table = key_table(arch, num_classes)
    flat, dropped, unexpected, mismatched = {}, [], [], {}
    for key, value in state_dict.items():
        value = np.asarray(value)
        module = key.rpartition(".")[0]
        if key.endswith(".num_batches_tracked") and f"{module}.running_mean" in table:
            dropped.append(key)
            continue
        if drop_head and key in HEAD_KEYS:
            dropped.append(key)
            continue
        entry = table.get(key)
        if entry is None:
            unexpected.append(f"{key} {_shape_str(value.shape)}")
            continue
        array = _to_flax_layout(entry.path, value, len(entry.shape))
        if array is None or array.shape != entry.shape:
            expected = _shape_str(entry.torch_shape)
            mismatched[key] = f"{key} {_shape_str(value.shape)} (expected {expected})"
            continue
        flat[entry.path] = np.array(array, dtype=np.float32, order="C")  # a copy
    wanted = [k for k in table if not (drop_head and k in HEAD_KEYS)]
    missing = [k for k in wanted if k not in state_dict]

    fc = state_dict.get("fc.weight")
    head_only = (
        not drop_head
        and mismatched
        and not (missing or unexpected)
        and set(mismatched) <= set(HEAD_KEYS)
        and np.ndim(fc) == 2
        and fc.shape[1] == table["fc.weight"].torch_shape[1]
    )
    if head_only:
        raise ConversionError(
            f"{source} has a {fc.shape[0]}-class head (fc.weight {_shape_str(fc.shape)}) but "
            f"{num_classes} classes were asked for. Pass --drop-head (drop_head=True) to keep "
            f"the backbone and initialise a fresh {num_classes}-class head, or ask for "
            f"--num-classes {fc.shape[0]}."
        )
    if missing or unexpected or mismatched:
        guess = _guess_arch(state_dict)
        looks = f" (its keys look like a torchvision {guess})" if guess and guess != arch else ""
        raise ConversionError(
            f"{source} does not match torchvision's {arch} with {num_classes} classes{looks}: "
            f"{_problems(list(mismatched.values()), missing, unexpected)}. Check --arch (one of "
            f"{', '.join(models.ARCHS)}) and that the file is a torchvision ResNet state_dict."
        )

    if drop_head:
        in_features = table["fc.weight"].shape[0]
        for leaf, value in fresh_head(num_classes, in_features, seed).items():
            flat[("params", "fc", leaf)] = value
    return traverse_util.unflatten_dict(flat), dropped


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(error: BaseException) -> str:
    """A short, single-line description of an exception from a reader."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # ANSI colours in torch's messages
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # torch's weights_only refusal names the culprit on a line of its own.
    culprit = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln]
    detail = (culprit or lines or [""])[0].split(". ")[0].rstrip(".")
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def _load_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            f"reading {path} needs PyTorch, which is not installed: install it "
            "(pip install 'agre-jax[convert]') or convert the file to .safetensors elsewhere."
        ) from e
    import pickle

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # not a refused import: a damaged or foreign pickle
            raise ConversionError(
                f"could not read {path} as a PyTorch checkpoint ({_first_line(e)}); the file may "
                "be truncated or corrupted, or not a checkpoint at all: expected a file written by "
                "torch.save holding a state_dict."
            ) from e
        raise ConversionError(
            f"refused to load {path}: torch.load(weights_only=True) found objects other than "
            f"tensors and plain containers ({_first_line(e)}). Loading it fully would run code "
            "from the file, so it was not executed. If you trust the file, load it in PyTorch "
            "and re-save only the weights, e.g. torch.save(model.state_dict(), 'weights.pt')."
        ) from e
    except Exception as e:
        raise ConversionError(
            f"could not read {path} as a PyTorch checkpoint ({_first_line(e)}); the file may be "
            "truncated or corrupted, or not a checkpoint at all."
        ) from e


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as e:
        raise ConversionError(
            f"could not read {path} as a safetensors file ({_first_line(e)}); the file may be "
            "truncated or corrupted, or not a safetensors file."
        ) from e


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")  # imported already if the file was a torch file
    return isinstance(value, np.ndarray) or (torch is not None and isinstance(value, torch.Tensor))


def read_state_dict(path: str | Path) -> tuple[dict[str, np.ndarray], str, str]:
    """Reads a checkpoint file as a flat state_dict of numpy arrays.

    Accepts `.safetensors` (numpy only) and anything `torch.load(weights_only=True)` reads: a
    bare state_dict or one under 'state_dict', 'model_state_dict' or 'model', with keys
    optionally prefixed by 'module.', 'model.' or 'backbone.'.

    Returns:
      (state_dict, wrapper key or '', stripped prefix or '').
    """
    path = Path(path).absolute()
    if not path.exists():
        raise ConversionError(f"{path} does not exist.")
    if not path.is_file():
        raise ConversionError(f"{path} is not a file; expected a checkpoint file.")
    if path.suffix == ".safetensors":
        obj = _load_safetensors(path)
    else:
        obj = _load_torch(path)

    unwrapped = []
    while isinstance(obj, Mapping) and not any(_is_tensor(v) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        unwrapped.append(key)
        obj = obj[key]
    if not isinstance(obj, Mapping) or not obj:
        what = "an empty mapping" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise ConversionError(
            f"{path} holds {what}, not a state_dict; expected a mapping of parameter names to "
            f"tensors, bare or under one of the keys {', '.join(WRAPPER_KEYS)}."
        )
    others = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not _is_tensor(v)]
    if others:
        raise ConversionError(
            f"{path} is not a plain state_dict: {_listing(others, 'entries are not tensors')}. "
            f"Expected a mapping of parameter names to tensors, bare or under one of the keys "
            f"{', '.join(WRAPPER_KEYS)}."
        )

    keys = [str(k) for k in obj]
    stripped = ""
    while prefix := next((p for p in PREFIXES if all(k.startswith(p) for k in keys)), None):
        keys = [k[len(prefix) :] for k in keys]
        stripped += prefix
    arrays = {}
    for key, value in zip(keys, obj.values(), strict=True):
        if not isinstance(value, np.ndarray):  # a torch tensor
            value = value.detach().cpu()
            value = value.float() if value.is_floating_point() else value
            value = value.numpy()
        arrays[key] = value
    return arrays, ".".join(unwrapped), stripped


def convert_checkpoint(
    path: str | Path, arch: str, num_classes: int, *, drop_head: bool = False, seed: int = 0
) -> Converted:
    """Reads and converts one checkpoint file; see `read_state_dict` and `convert_state_dict`.

    Raises:
      ConversionError: with a one-paragraph explanation, for any input that cannot be converted.
    """
    _check_model(arch, num_classes)
    path = Path(path).absolute()
    state_dict, unwrapped, stripped = read_state_dict(path)
    variables, dropped = convert_state_dict(
        state_dict, arch, num_classes, drop_head=drop_head, seed=seed, source=str(path)
    )
    return Converted(
        variables=variables,
        source=str(path),
        sha256=_sha256(path),
        arch=arch,
        num_classes=num_classes,
        dropped_keys=dropped,
        head="fresh" if drop_head else "ported",
        seed=seed,
        unwrapped=unwrapped,
        stripped_prefix=stripped,
    )


def load_torch_resnet(
    path: str | Path, arch: str, num_classes: int, *, drop_head: bool = False, seed: int = 0
) -> dict[str, Any]:
    """Flax variables {'params', 'batch_stats'} (float32 numpy) of a torchvision ResNet file.

    Args:
      path: `.pt`/`.pth` (read with `torch.load(weights_only=True)`) or `.safetensors`.
      arch: 'resnet18', 'resnet34' or 'resnet50'; the model is `models.create(arch,
        num_classes)` with default options.
      num_classes: the head size.
      drop_head: keep the backbone only and initialise a fresh `num_classes` head (e.g. from
        torchvision's 1000-class ImageNet files).
      seed: PRNG seed of a fresh head.

    Raises:
      ConversionError: with a one-paragraph explanation, for any input that cannot be converted.
    """
    return convert_checkpoint(path, arch, num_classes, drop_head=drop_head, seed=seed).variables


def to_torch_state_dict(variables: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """torchvision state_dict of Flax ResNet variables, for `load_state_dict(strict=True)`.

    Args:
      variables: {'params', 'batch_stats'} of `models.create(arch, num_classes)` with default
        options; num_classes is read from `fc`.
      arch: 'resnet18', 'resnet34' or 'resnet50'.

    Returns:
      {torchvision key: float32 torch.Tensor} in torchvision's order, with every
      `num_batches_tracked` set to 0 (int64).
    """
    import torch

    try:
        num_classes = int(np.shape(variables["params"]["fc"]["kernel"])[-1])
        flat = traverse_util.flatten_dict(
            {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        )
    except (KeyError, TypeError, IndexError) as e:
        raise ConversionError(
            f"expected Flax variables {{'params', 'batch_stats'}} of a ResNet with an 'fc' "
            f"head; could not read {e}."
        ) from e
    table = key_table(arch, num_classes)
    paths = {entry.path: key for key, entry in table.items()}
    missing = [key for key, entry in table.items() if entry.path not in flat]
    unexpected = ["/".join(p) for p in flat if p not in paths]
    mismatched = [
        f"{'/'.join(p)} {_shape_str(np.shape(v))} (expected {_shape_str(table[paths[p]].shape)})"
        for p, v in flat.items()
        if p in paths and tuple(np.shape(v)) != table[paths[p]].shape
    ]
    if missing or unexpected or mismatched:
        raise ConversionError(
            f"the variables do not match torchvision's {arch} with {num_classes} classes "
            "(only models.create defaults, width 64 and the standard stem, have a torchvision "
            f"counterpart): {_problems(mismatched, missing, unexpected)}."
        )
    state_dict = {}
    for key, entry in table.items():
        array = _to_torch_layout(entry.path, np.asarray(flat[entry.path], dtype=np.float32))
        state_dict[key] = torch.from_numpy(np.array(array, order="C", copy=True))
        if key.endswith(".running_var"):
            tracked = key.replace(".running_var", ".num_batches_tracked")
            state_dict[tracked] = torch.tensor(0, dtype=torch.long)
    return state_dict
