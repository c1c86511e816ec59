"""Optimisers and learning-rate schedules from config blocks (optax).

A config block (`config.teachers.optimizer`, `config.train.optimizer`) has the keys of
`configs/default.py::_optimizer`: name, learning_rate, momentum, weight_decay, schedule,
warmup_epochs. `check_config` lists what is wrong with one before any work;
`from_config` builds the optax transformation once the number of steps is known.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import optax

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


def create_schedule(
    learning_rate: float, total_steps: int, *, schedule: str = "cosine", warmup_steps: int = 0
) -> optax.Schedule:
    """Cosine decay to 0 over `total_steps` (or constant), after an optional linear warm-up."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if (
        not (math.isfinite(learning_rate) and learning_rate > 0)
        or total_steps < 1
        or not 0 <= warmup_steps <= total_steps
    ):
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


def check_config(block: Mapping[str, Any], key: str, epochs: int) -> list[str]:
    """Problems of an optimizer config block (empty when it can run).

    Args:
      block: the block's values (name, learning_rate, momentum, weight_decay, schedule,
        warmup_epochs).
      key: its dotted config key, for messages (e.g. 'train.optimizer').
      epochs: the stage's number of epochs (warm-up must fit in it).

    Returns:
      One message per problem, each naming `key.field`, the value and what is expected.
    """

    def number(x: Any) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

    problems = []
    if block["name"] not in OPTIMIZERS:
        problems.append(f"{key}.name is {block['name']!r}; expected one of {OPTIMIZERS}")
    if block["schedule"] not in SCHEDULES:
        problems.append(f"{key}.schedule is {block['schedule']!r}; expected one of {SCHEDULES}")
    lr = block["learning_rate"]
    if not (number(lr) and lr > 0):
        problems.append(f"{key}.learning_rate is {lr!r}; expected a finite number > 0")
    momentum = block["momentum"]
    if not (number(momentum) and 0 <= momentum < 1):
        problems.append(f"{key}.momentum is {momentum!r}; expected a number in [0, 1)")
    wd = block["weight_decay"]
    if not (number(wd) and wd >= 0):
        problems.append(f"{key}.weight_decay is {wd!r}; expected a finite number >= 0")
    warmup = block["warmup_epochs"]
    if not (number(warmup) and 0 <= warmup <= epochs):
        problems.append(f"{key}.warmup_epochs is {warmup!r}; expected a number in [0, {epochs}]")
    return problems


def from_config(
    block: Mapping[str, Any], *, epochs: int, steps_per_epoch: int
) -> optax.GradientTransformation:
    """The optimiser of a config block for a stage of `epochs` x `steps_per_epoch` steps.

    Raises:
      ValueError: the block or the step counts cannot make an optimiser (see check_config).
    """
    return create_optimizer(
        block["name"],
        block["learning_rate"],
        epochs * steps_per_epoch,
        momentum=block["momentum"],
        weight_decay=block["weight_decay"],
        schedule=block["schedule"],
        warmup_steps=int(block["warmup_epochs"] * steps_per_epoch),
    )
