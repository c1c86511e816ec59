"""AGRE-KD vs AVER vs one random teacher per batch on the main config, the plan's
multi-layer configuration C (configs/multilayer_c.py): 3 variants x 3 seeds, one shared
teacher stage. Seed 0 of `agre` is the run `make run` makes.

    python main.py --config configs/sweeps/methods_multilayer.py[:waterbirds|:celeba] \\
        --workdir runs/methods_multilayer
"""

from agre_jax import sweep
from configs import multilayer_c

METHODS = {"agre": "AGRE-KD", "aver": "AVER", "random": "random"}  # weighting -> label


def get_config(arg=None):
    variants = [
        sweep.variant(weighting, {"distill.weighting": weighting}, method=method)
        for weighting, method in METHODS.items()
    ]
    return sweep.define(
        multilayer_c.get_config(arg),
        name="methods_multilayer",
        title="AGRE-KD vs AVER vs random teacher with multi-layer feature distillation (C)",
        variants=variants,
        baseline="agre",
        base_name="configs/multilayer_c.py",
    )
