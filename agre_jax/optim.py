"""Optimisers and learning-rate schedules from config values (optax)."""

from __future__ import annotations

import optax

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


def create_schedule(
    learning_rate: float, total_steps: int, *, schedule: str = "cosine", warmup_steps: int = 0
) -> optax.Schedule:
    """Cosine decay to 0 over `total_steps` (or constant), after an optional linear warm-up."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if learning_rate <= 0 or total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need learning_rate > 0, total_steps >= 1 and 0 <= warmup_steps <= total_steps; got "
            f"{learning_rate}, {total_steps}, {warmup_steps}"
        )
    if schedule == "constant":
        main = optax.constant_schedule(learning_rate)
    else:
        main = optax.cosine_decay_schedule(learning_rate, max(1, total_steps - warmup_steps))
    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def create_optimizer(
    name: str,
    learning_rate: float,
    total_steps: int,
    *,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    schedule: str = "cosine",
    warmup_steps: int = 0,
) -> optax.GradientTransformation:
    """SGD with momentum and coupled (PyTorch-style) weight decay, or AdamW.

    SGD adds `weight_decay * param` to the gradient before momentum, as torch.optim.SGD does,
    on every parameter (BatchNorm scales and biases included, as in the paper's code).
    """
    lr = create_schedule(learning_rate, total_steps, schedule=schedule, warmup_steps=warmup_steps)
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=momentum or None)
        )
    if name == "adamw":
        return optax.adamw(lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
