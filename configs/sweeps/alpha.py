"""The alpha ablation (paper Appendix C.1): L = alpha * KD + (1 - alpha) * CE for alpha 0.1,
0.3, 0.5, 0.7, 0.9 and 1.0, on the plan's setting configs/alpha.py (AGRE-KD, pooled gamma
0.25): 6 variants x 3 seeds.

    python main.py --config configs/sweeps/alpha.py[:waterbirds|:celeba] --workdir runs/alpha
    # the paper's own ablation, logits only:
    python main.py --config configs/sweeps/alpha.py --config.distill.gammas.pooled=0 ...
"""

from agre_jax import sweep
from configs import alpha


def get_config(arg=None):
    base = alpha.get_config(arg)
    variants = [
        sweep.variant(
            f"a{a:g}",
            {"distill.alpha": a},
            method="AGRE-KD",
            gamma=base.distill.gammas.pooled,
            alpha=a,
        )
        for a in alpha.ALPHAS
    ]
    return sweep.define(
        base,
        name="alpha",
        title="AGRE-KD: weight alpha of the distillation loss against the labels",
        variants=variants,
        baseline="a1",
        base_name="configs/alpha.py",
    )
