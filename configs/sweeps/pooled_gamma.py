"""The plan's phase 1: AGRE-KD with pooled-feature distillation, gamma 0 (logits only), 0.05,
0.25, 0.5, 0.75 and 1.0 (Linear adapter, MSE): 6 variants x 3 seeds.

    python main.py --config configs/sweeps/pooled_gamma.py[:waterbirds|:celeba] \\
        --workdir runs/pooled_gamma
"""

from agre_jax import sweep
from configs import default, pooled


def get_config(arg=None):
    variants = [
        sweep.variant(
            f"g{gamma:g}", {"distill.gammas.pooled": gamma}, method="AGRE-KD", gamma=gamma
        )
        for gamma in pooled.GAMMAS
    ]
    return sweep.define(
        default.get_config(arg),
        name="pooled_gamma",
        title="AGRE-KD with pooled-feature distillation: the gamma ablation",
        variants=variants,
        baseline="g0",
        base_name="configs/default.py",
    )
