"""AGRE-KD vs AVER vs one random teacher per batch (Fukuda et al.), each with pooled-feature
distillation gamma 0, 0.25 and 0.5: 9 variants x 3 seeds, one shared teacher stage.

    python main.py --config configs/sweeps/methods.py[:waterbirds|:celeba] --workdir runs/methods
"""

from agre_jax import sweep
from configs import default

METHODS = {"agre": "AGRE-KD", "aver": "AVER", "random": "random"}  # weighting -> label
GAMMAS = (0.0, 0.25, 0.5)


def get_config(arg=None):
    variants = [
        sweep.variant(
            f"{weighting}_g{gamma:g}",
            {"distill.weighting": weighting, "distill.gammas.pooled": gamma},
            method=method,
            gamma=gamma,
        )
        for gamma in GAMMAS
        for weighting, method in METHODS.items()
    ]
    return sweep.define(
        default.get_config(arg),
        name="methods",
        title="AGRE-KD vs AVER vs random teacher, pooled-feature gamma 0 / 0.25 / 0.5",
        variants=variants,
        baseline="agre_g0",
        base_name="configs/default.py",
    )
