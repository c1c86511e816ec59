"""Benchmark of the distillation step per weighting method (prints a table).

    python benchmarks/step.py --classes 2 10 --image-size 64 --batch 32 --teachers 5
    python benchmarks/step.py --compare-torch --methods aver agre_batch --image-size 32 64 224

For M teachers (ResNet-50 by default), a ResNet-18 student and one batch: compile time,
median step time over `--steps` timed steps (after one warm-up), XLA's planned peak memory
of the compiled step (arguments + outputs + temporaries, from `memory_analysis`), and the
ratios to the `aver` step. In-memory random batches: the input pipeline is not measured here.
`--image-size` takes one or more sizes.

`--compare-torch` times, right after each of our steps, a PyTorch reference step of the same
work on the CPU (`TorchReference`): M frozen teachers and a separate frozen biased model of the
teacher architecture in eval mode, the student in train mode, alpha = 1 weighted KD plus
`--gamma-pooled` times the MSE between the student's pooled features (through a bias-free
linear adapter when the widths differ) and the weighted mean of the teachers', `backward` and
one SGD step (momentum 0.9, weight decay 1e-4). `agre_batch` adds M + 1 `autograd.grad`
passes through the student for the batch-mean gradients: through the training-mode graph, so
also through the batch's BatchNorm statistics, as the earlier PyTorch code (`--batch-bn
through`, the default), or through an extra eval-mode forward that holds them fixed (`fixed`);
`--batch-bn` sets both sides (our `distill.batch_bn`).
Only `aver` and `agre_batch` have a reference. Our side then uses the same separate biased
model and the `pooled` feature loss. Both sides start from the same weights (ours, ported to
torchvision modules) and the same batch, so their first-step losses must agree (the teachers
are copies of one initialisation, so `agre_batch`'s weights are uniform on both sides at the
first step whatever `--batch-bn`); the run fails otherwise. torch runs with
`--torch-threads` threads (default: the cores this process may use, as XLA's CPU client).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from agre_jax import distill, models, optim, weighting
from convert.torch_resnet import torch_key

if TYPE_CHECKING:
    import torch

METHODS = {
    "aver": dict(weighting="aver"),
    "random": dict(weighting="random"),
    "agre/last_layer": dict(weighting="agre", grad_scope="last_layer"),
    "agre/full": dict(weighting="agre", grad_scope="full", gram="layerwise"),
    "agre/full-vmap": dict(weighting="agre", grad_scope="full", gram="vmap"),
    "agre_batch": dict(weighting="agre_batch", grad_scope="full"),
    "aekd": dict(weighting="aekd"),
    # per-sample AGRE on the KD and per-layer AGRE on the feature targets (needs feature gammas)
    "agre/full+feature_agre": dict(
        weighting="agre", grad_scope="full", gram="layerwise", feature_weighting="agre"
    ),
}
FEATURE_METHODS = ("agre/full+feature_agre",)  # the methods that need a feature loss
TORCH_METHODS = ("aver", "agre_batch")  # the methods TorchReference implements
GAMMA_POOLED_TORCH = 0.25  # default --gamma-pooled with --compare-torch
LEARNING_RATE = 1e-3
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4  # optim.create_optimizer's default
LOSS_RTOL = 1e-3  # first-step losses of ours and of the reference, same weights and batch


def _peak_bytes(compiled) -> float:
    mem = compiled.memory_analysis()
    if mem is None:
        return float("nan")
    return (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )


@dataclasses.dataclass
class Setup:
    """One row's distillation step: static parts and initial inputs."""

    mdl: distill.Models
    cfg: distill.DistillConfig
    tx: optax.GradientTransformation
    state: distill.TrainState
    frozen: dict[str, Any]
    batch: dict[str, jax.Array]
    rng: jax.Array


def build(
    args: argparse.Namespace,
    num_classes: int,
    image_size: int,
    method: str,
    *,
    distinct_teachers: bool = False,
) -> Setup:
    """Models, config, optimiser, initial state, frozen variables and batch of one row.

    With `args.compare_torch` the biased model is a separate model of the teacher
    architecture (as in the reference); otherwise it shares teacher 0's backbone with a
    negated head. The M teachers are copies of one initialisation unless `distinct_teachers`.
    """
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    opts = dict(
        width=args.width, small_input=args.small_input, dtype=dtype, conv_impl=args.conv_impl
    )
    teacher = models.create(args.teacher_arch, num_classes, **opts)
    student = models.create(args.student_arch, num_classes, **opts)
    rng = jax.random.key(0)
    if distinct_teachers:
        keys = [jax.random.fold_in(rng, m) for m in range(args.teachers)]
        t_vars = [models.init(teacher, k, image_size) for k in keys]
    else:
        t_vars = [models.init(teacher, rng, image_size)] * args.teachers
    frozen: dict[str, Any] = {"teachers": (distill.stack_variables(t_vars),)}
    if args.compare_torch:
        ens = distill.Ensemble(teachers=(teacher,), group_sizes=(args.teachers,), biased=teacher)
        frozen["biased"] = models.init(teacher, jax.random.key(3), image_size)
    else:
        ens = distill.Ensemble(
            teachers=(teacher,), group_sizes=(args.teachers,), biased_backbone=(0, 0)
        )
        frozen["biased"] = jax.tree.map(lambda x: -x, t_vars[0]["params"]["fc"])
    gammas = tuple(
        (k, g)
        for k, g in zip(
            ("layer2", "layer3", "layer4", "pooled"), [*args.gammas, args.gamma_pooled], strict=True
        )
        if g > 0
    )
    cfg = distill.DistillConfig(
        chunk_size=args.chunk_size,
        teacher_map=args.teacher_map,
        gammas=gammas,
        batch_bn=args.batch_bn,
        **METHODS[method],
    )
    mdl = distill.create_models(student, ens, cfg)
    tx = optim.create_optimizer(
        "sgd", LEARNING_RATE, 1000, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    state = distill.create_train_state(mdl, tx, jax.random.key(1), image_size)
    images = jax.random.normal(jax.random.key(2), (args.batch, image_size, image_size, 3))
    batch = {"image": images, "label": jnp.arange(args.batch) % num_classes}
    return Setup(mdl, cfg, tx, state, frozen, batch, rng)


def time_ours(setup: Setup, steps: int, *, pmap: bool = False) -> dict[str, float]:
    """Compiles and runs our step: compile time, median of `steps` timed steps after one
    warm-up, planned peak memory, first-step loss. Consumes `setup.state` (donated).

    With `pmap` the step runs as a run's does over every local device
    (agre_jax/stages.py's distillation): state and frozen variables replicated, the batch
    split into [devices, B / devices, ...], the step's key replicated at every step (timed);
    the planned peak memory is then per device, as XLA reports it."""
    step = distill.compile_step(setup.mdl, setup.cfg, setup.tx, pmap=pmap)
    state, frozen, batch, rng = setup.state, setup.frozen, setup.batch, setup.rng
    key = distill.replicate if pmap else (lambda k: k)
    if pmap:
        n = jax.local_device_count()
        state, frozen = distill.replicate(state), distill.replicate(frozen)
        batch = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch, key(rng)).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, frozen, batch, key(rng))
    first_loss = _scalar(metrics["loss"])
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch, key(jax.random.fold_in(rng, i)))
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return dict(
        compile_s=compile_s,
        step_s=statistics.median(times),
        peak_gb=_peak_bytes(compiled) / 2**30,
        first_loss=first_loss,
        loss=_scalar(metrics["loss"]),
    )


def _scalar(x: jax.Array) -> float:
    """A metric as a float: under pmap every device holds the same (pmean'd) value."""
    return float(np.asarray(x).reshape(-1)[0])


# --- PyTorch reference ------------------------------------------------------------------


def torch_threads() -> int:
    """The cores this process may run on (what XLA's CPU client uses), or os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _flax_param_count(params: Any) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(params))


def torch_resnet(model: models.ResNet) -> torch.nn.Module:
    """A torchvision ResNet of `model`'s topology (stage sizes, block, width, stem, classes),
    on the meta device (shapes only; `torch_model` gives it weights).

    torchvision's own constructor fixes width 64 and the 7x7 stem; other widths rebuild the
    stem and stages with `_make_layer` (stage k has width * 2**(k-1) planes), and
    `small_input` gets a 3x3 stride-1 stem conv without max-pool, as `models.ResNet`.
    """
    import torch
    from torchvision.models import resnet as tv

    block = {models.BasicBlock: tv.BasicBlock, models.Bottleneck: tv.Bottleneck}[model.block_cls]
    w = model.width
    with torch.device("meta"):
        net = tv.ResNet(block, list(model.stage_sizes), num_classes=model.num_classes)
        if w != 64:
            net.inplanes = w
            net.bn1 = torch.nn.BatchNorm2d(w)
            for k, num_blocks in enumerate(model.stage_sizes):
                layer = net._make_layer(block, w * 2**k, num_blocks, stride=1 if k == 0 else 2)
                setattr(net, f"layer{k + 1}", layer)
            net.fc = torch.nn.Linear(w * 8 * block.expansion, model.num_classes)
        if model.small_input:
            net.conv1 = torch.nn.Conv2d(3, w, 3, stride=1, padding=1, bias=False)
            net.maxpool = torch.nn.Identity()
        elif w != 64:
            net.conv1 = torch.nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
    return net


def torch_state_dict(variables: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """torchvision state_dict of a Flax ResNet's {'params', 'batch_stats'} (any width/stem),
    with the key names of `convert.torch_resnet` and `num_batches_tracked` 0."""
    import torch

    flat = traverse_util.flatten_dict(
        {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    )
    out = {}
    for path, value in flat.items():
        array = np.asarray(value, np.float32)
        if path[-1] == "kernel":  # conv HWIO -> OIHW, dense [in, out] -> [out, in]
            array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
        key = torch_key(path)
        out[key] = torch.from_numpy(np.array(array, order="C"))  # a writable copy
        if key.endswith(".running_var"):
            out[key.replace(".running_var", ".num_batches_tracked")] = torch.tensor(0)
    return out


def torch_model(model: models.ResNet, variables: Mapping[str, Any]) -> torch.nn.Module:
    """`torch_resnet(model)` holding `variables` (strict load: same keys and shapes)."""
    net = torch_resnet(model)
    ours = _flax_param_count(variables["params"])
    theirs = sum(p.numel() for p in net.parameters())
    assert theirs == ours, f"torch ResNet has {theirs} parameters, ours {ours}: topologies differ"
    net = net.to_empty(device="cpu")
    net.load_state_dict(torch_state_dict(variables), strict=True)
    return net


def torch_adapter(params: Mapping[str, Any]) -> torch.nn.Module | None:
    """The bias-free Linear of our `pooled` adapter params ({'pooled': {'kernel': [in, out]}}),
    or None where there is none (equal widths: identity)."""
    import torch

    kernel = params.get("pooled", {}).get("kernel")
    if kernel is None:
        return None
    adapter = torch.nn.Linear(*kernel.shape, bias=False)
    with torch.no_grad():
        adapter.weight.copy_(torch.from_numpy(np.array(kernel, np.float32).T))
    return adapter


def torch_forward(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision ResNet forward returning (logits, pooled features)."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    pooled = x.mean(dim=(2, 3))
    return net.fc(pooled), pooled


class TorchReference:
    """The PyTorch reference step of `aver` / `agre_batch` distillation (see the module doc).

    Args:
      teachers: M frozen models; biased: the frozen biased model; student: trained.
      adapter: bias-free Linear from the student's to the teachers' pooled width, or None
        (identity, equal widths).
      cfg: our config; the reference implements alpha 1, `mse` on `pooled` only, no feature
        dropout, normalised full-scope gradients.
      channels_last: run the convolutions in NHWC memory format.
      bn_grads: how `agre_batch`'s gradients treat the student's BatchNorm: 'through' (the
        training-mode graph, whose gradients flow through the batch's mean and variance, as
        in the earlier PyTorch code) or 'fixed' (an extra forward in eval mode with this
        batch's statistics held as constants, as ours: `distill.distill_step`'s logit_fn).
    """

    def __init__(
        self,
        teachers: Sequence[torch.nn.Module],
        biased: torch.nn.Module,
        student: torch.nn.Module,
        adapter: torch.nn.Module | None,
        cfg: distill.DistillConfig,
        *,
        channels_last: bool = False,
        bn_grads: str = "through",
    ) -> None:
        import torch

        gammas = dict(cfg.gammas)
        unsupported = {
            "weighting": cfg.weighting not in TORCH_METHODS,
            "grad_scope": cfg.weighting == "agre_batch" and cfg.grad_scope != "full",
            "normalize_grads": not cfg.normalize_grads,
            "alpha": cfg.alpha != 1.0,
            "gammas": set(cfg.feature_layers) - {"pooled"},
            "feature_loss": cfg.feature_loss != "mse",
            "feature_dropout": cfg.feature_dropout > 0,
            "bn_grads": bn_grads not in weighting.BATCH_BN,
        }
        unsupported = [k for k, bad in unsupported.items() if bad]
        if unsupported:
            raise ValueError(
                f"the torch reference does not implement these settings: {unsupported}"
            )
        self.cfg = cfg
        self.gamma = gammas.get("pooled", 0.0)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.teachers = [t.eval().requires_grad_(False) for t in teachers]
        self.biased = biased.eval().requires_grad_(False)
        self.student = student.train()
        self.adapter = adapter
        self.last_weights: torch.Tensor | None = None  # [B, M] of the latest step
        self.bn_grads = bn_grads
        self._moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if bn_grads == "fixed" and cfg.weighting == "agre_batch":
            for name, module in student.named_modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.register_forward_pre_hook(functools.partial(self._record, name))
        for net in [*self.teachers, self.biased, self.student]:
            net.to(memory_format=self.memory_format)
        trained = list(student.parameters()) + (list(adapter.parameters()) if adapter else [])
        self.opt = torch.optim.SGD(
            trained, lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )

    @classmethod
    def from_setup(cls, setup: Setup, **options: Any) -> TorchReference:
        """The reference holding the initial weights of our `setup` (before it is consumed)."""
        ens = setup.mdl.ensemble
        if len(ens.teachers) != 1 or ens.biased is None:
            raise ValueError("the torch reference needs one teacher group and a separate biased")
        stacked = jax.tree.map(np.asarray, setup.frozen["teachers"][0])
        teachers = [
            torch_model(ens.teachers[0], jax.tree.map(lambda x, m=m: x[m], stacked))
            for m in range(ens.num_teachers)
        ]
        biased = torch_model(ens.biased, setup.frozen["biased"])
        student = torch_model(
            setup.mdl.student,
            {"params": setup.state.params["student"], "batch_stats": setup.state.batch_stats},
        )
        adapter = torch_adapter(setup.state.params["adapters"])
        return cls(teachers, biased, student, adapter, setup.cfg, **options)

    def images(self, batch: Mapping[str, jax.Array]) -> torch.Tensor:
        """Our NHWC batch as an NCHW tensor in the reference's memory format."""
        import torch

        x = torch.from_numpy(np.array(batch["image"], np.float32).transpose(0, 3, 1, 2))
        return x.contiguous(memory_format=self.memory_format)

    def _record(self, name: str, module: torch.nn.Module, inputs: tuple[torch.Tensor]) -> None:
        """Forward pre-hook of the student's BatchNorms: the batch's mean and biased variance
        (what training mode normalises with), in training mode only."""
        if module.training:
            x = inputs[0].detach()
            self._moments[name] = (x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False))

    def _fixed_bn_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The student's logits in eval mode with the last batch's BatchNorm statistics."""
        import torch

        stats = {}
        for name, (mean, var) in self._moments.items():
            stats[f"{name}.running_mean"], stats[f"{name}.running_var"] = mean, var
        self.student.eval()
        try:
            tensors = {**dict(self.student.named_parameters()), **stats}
            return torch.func.functional_call(self.student, tensors, (images,))
        finally:
            self.student.train()

    def _batch_weights(
        self, s_logits: torch.Tensor, refs: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        """agre_batch: [M] weights from the cosines of the batch-mean KD gradients of the M
        teachers (refs[:-1]) and of the biased model (refs[-1]) w.r.t. the student's params."""
        import torch

        tau, b = self.cfg.temperature, s_logits.shape[0]
        with torch.no_grad():
            p_s = torch.softmax(s_logits.detach() / tau, dim=-1)
            g_refs = tau * (p_s - torch.softmax(refs / tau, dim=-1)) / b  # [M + 1, B, C]
        logits = self._fixed_bn_logits(images) if self.bn_grads == "fixed" else s_logits
        params = list(self.student.parameters())
        flat = []
        for g in g_refs:
            grads = torch.autograd.grad(logits, params, grad_outputs=g, retain_graph=True)
            flat.append(torch.cat([x.reshape(-1) for x in grads]))
        with torch.no_grad():
            stacked = torch.stack(flat)
            inner = stacked @ stacked.T
            dot = inner[:-1, -1]
            norms = inner.diagonal().clamp_min(0).sqrt()
            denom = norms[:-1] * norms[-1]
            cos = torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), 0.0)
            raw = (1.0 - cos).clamp_min(self.cfg.batch_min_weight)
            return raw / raw.sum()

    def step(self, images: torch.Tensor) -> float:
        """One update on `images` [B, 3, H, W]; returns the loss before the update."""
        import torch
        import torch.nn.functional as F

        tau = self.cfg.temperature
        with torch.no_grad():
            outs = [torch_forward(t, images) for t in self.teachers]
            t_logits = torch.stack([o[0] for o in outs])  # [M, B, C]
            t_pooled = torch.stack([o[1] for o in outs])  # [M, B, D]
            b_logits = self.biased(images)
        s_logits, s_pooled = torch_forward(self.student, images)
        m, b = t_logits.shape[:2]
        if self.cfg.weighting == "agre_batch":
            refs = torch.cat([t_logits, b_logits[None]])
            weights = self._batch_weights(s_logits, refs, images).expand(b, m)
        else:
            weights = torch.full((b, m), 1.0 / m)
        log_ps = F.log_softmax(s_logits / tau, dim=-1)
        log_pt = F.log_softmax(t_logits / tau, dim=-1)
        kd = tau**2 * torch.sum(log_pt.exp() * (log_pt - log_ps), dim=-1)  # [M, B]
        loss = torch.sum(weights.T * kd) / b
        if self.gamma > 0:
            target = torch.einsum("bm,mbd->bd", weights, t_pooled)
            feats = self.adapter(s_pooled) if self.adapter is not None else s_pooled
            loss = loss + self.gamma * F.mse_loss(feats, target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.last_weights = weights
        return loss.item()


def time_torch(ref: TorchReference, images: torch.Tensor, steps: int) -> dict[str, float]:
    """Median of `steps` timed reference steps after one warm-up, and the first-step loss."""
    first_loss = ref.step(images)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = ref.step(images)
        times.append(time.perf_counter() - t0)
    return dict(step_s=statistics.median(times), first_loss=first_loss, loss=loss)


# --- command line -------------------------------------------------------------------------


def bench(args: argparse.Namespace, image_size: int, num_classes: int, method: str) -> dict:
    """One row: our step, then (with --compare-torch) the reference on the same weights."""
    setup = build(args, num_classes, image_size, method)
    ref = images = None
    if args.compare_torch:
        ref = TorchReference.from_setup(
            setup, channels_last=args.torch_channels_last, bn_grads=args.batch_bn
        )
        images = ref.images(setup.batch)
    row = dict(px=image_size, classes=num_classes, method=method, **time_ours(setup, args.steps))
    del setup
    if ref is not None:
        torch_row = time_torch(ref, images, args.steps)
        row.update({f"torch_{k}": v for k, v in torch_row.items()})
    return row


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (validated: --compare-torch restricts methods, gammas and dtype)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    parser.add_argument("--teachers", type=int, default=5)
    parser.add_argument("--teacher-arch", default="resnet50", choices=models.ARCHS)
    parser.add_argument("--student-arch", default="resnet18", choices=models.ARCHS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, nargs="+", default=[64])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--small-input", action="store_true")
    parser.add_argument("--chunk-size", type=int, default=distill.DistillConfig.chunk_size)
    parser.add_argument("--teacher-map", default="unroll", choices=distill.TEACHER_MAPS)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--gammas",
        type=float,
        nargs=3,
        default=[0.0, 0.0, 0.0],
        metavar=("G2", "G3", "G4"),
        help="feature gammas on layer2/3/4",
    )
    parser.add_argument(
        "--gamma-pooled",
        type=float,
        default=None,
        help=f"feature gamma on pooled (default 0, {GAMMA_POOLED_TORCH} with --compare-torch)",
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--conv-impl",
        default="auto",
        choices=models.CONV_IMPLS,
        help="our convolutions: 'auto' (small maps from shifted slices) or 'lax' (before)",
    )
    parser.add_argument(
        "--compare-torch",
        action="store_true",
        help=f"also time a PyTorch reference step ({', '.join(TORCH_METHODS)} only)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=torch_threads(),
        help="torch.set_num_threads (default: the cores this process may use)",
    )
    parser.add_argument(
        "--torch-channels-last", action="store_true", help="NHWC memory format in the reference"
    )
    parser.add_argument(
        "--batch-bn",
        default="through",
        choices=weighting.BATCH_BN,
        help="agre_batch gradients, ours (distill.batch_bn) and the reference's: through the "
        "batch's BatchNorm statistics (training-mode graph) or with them fixed (an extra "
        "eval-mode forward)",
    )
    args = parser.parse_args(argv)
    if args.gamma_pooled is None:
        args.gamma_pooled = GAMMA_POOLED_TORCH if args.compare_torch else 0.0
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    features = any(g > 0 for g in [*args.gammas, args.gamma_pooled])
    if not args.compare_torch:
        args.methods = args.methods or [m for m in METHODS if features or m not in FEATURE_METHODS]
        if not features and set(args.methods) & set(FEATURE_METHODS):
            parser.error(
                f"{', '.join(FEATURE_METHODS)} weights the feature loss: give --gammas or "
                "--gamma-pooled > 0"
            )
        return args
    if args.methods is None:
        args.methods = list(TORCH_METHODS)
    other = [m for m in args.methods if m not in TORCH_METHODS]
    if other:
        parser.error(
            f"--compare-torch: no torch reference for {', '.join(other)}; "
            f"--methods must be among {', '.join(TORCH_METHODS)}"
        )
    if any(g > 0 for g in args.gammas):
        parser.error("--compare-torch: the reference has the pooled feature loss only; --gammas 0")
    if args.dtype != "float32":
        parser.error("--compare-torch: the reference runs in float32; --dtype float32")
    return args


def _print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = args.image_size
    head = (
        f"# {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}; "
        f"{args.teachers} x {args.teacher_arch} -> {args.student_arch}, batch {args.batch}, "
        f"{', '.join(map(str, sizes))} px, width {args.width}"
        f"{', small input' if args.small_input else ''}, {args.dtype}, "
        f"chunk {args.chunk_size}, teacher_map {args.teacher_map}, gammas {args.gammas}, "
        f"gamma_pooled {args.gamma_pooled}"
    )
    if args.compare_torch:
        import torch

        torch.set_num_threads(args.torch_threads)
        head += (
            f"; torch {torch.__version__} CPU, {torch.get_num_threads()} threads"
            f"{', channels_last' if args.torch_channels_last else ''}, "
            f"agre_batch BatchNorm gradients {args.batch_bn}; separate biased model"
        )
    print(head, flush=True)
    rows = []
    for px in sizes:
        for c in args.classes:
            for name in args.methods:
                r = bench(args, px, c, name)
                rows.append(r)
                line = f"  done {px} px c={c} {name}: {r['step_s']:.3f} s"
                if args.compare_torch:
                    rel = abs(r["first_loss"] / r["torch_first_loss"] - 1)
                    line += (
                        f", torch {r['torch_step_s']:.3f} s; first-step loss {r['first_loss']:.6g}"
                        f" (torch: relative difference {rel:.1e})"
                    )
                print(line, flush=True)

    if args.compare_torch:
        _print_table(
            (
                "px",
                "classes",
                "method",
                "ours step s",
                "torch step s",
                "ours / torch",
                "ours compile s",
            ),  # fmt: skip
            [
                (
                    r["px"],
                    r["classes"],
                    r["method"],
                    f"{r['step_s']:.3f}",
                    f"{r['torch_step_s']:.3f}",
                    f"{r['step_s'] / r['torch_step_s']:.2f}",
                    f"{r['compile_s']:.1f}",
                )
                for r in rows
            ],
        )
    else:
        table = []
        for r in rows:
            base = next(
                (
                    b
                    for b in rows
                    if (b["px"], b["classes"]) == (r["px"], r["classes"]) and b["method"] == "aver"
                ),
                None,
            )
            ratio = f"{r['step_s'] / base['step_s']:.2f}" if base else "-"
            mem_ratio = f"{r['peak_gb'] / base['peak_gb']:.2f}" if base else "-"
            cells = (
                r["classes"],
                r["method"],
                f"{r['compile_s']:.1f}",
                f"{r['step_s']:.3f}",
                f"{r['peak_gb']:.2f}",
                ratio,
                mem_ratio,
            )
            table.append(((r["px"],) if len(sizes) > 1 else ()) + cells)
        header = (
            "classes", "method", "compile s", "step s (median)", "peak GiB", "step / aver",
            "peak / aver",
        )  # fmt: skip
        _print_table((("px",) if len(sizes) > 1 else ()) + header, table)

    assert all(np.isfinite(r["loss"]) for r in rows), "non-finite loss in our step"
    if args.compare_torch:
        assert all(np.isfinite(r["torch_loss"]) for r in rows), "non-finite torch loss"
        bad = [
            f"{r['px']} px c={r['classes']} {r['method']}: {r['first_loss']} vs "
            f"{r['torch_first_loss']}"
            for r in rows
            if not np.isclose(r["first_loss"], r["torch_first_loss"], rtol=LOSS_RTOL, atol=0)
        ]
        assert not bad, f"first-step losses of ours and torch disagree: {bad}"


if __name__ == "__main__":
    main()
