"""AGRE-KD with pooled-feature distillation (Linear adapter), gamma 0.5: the plan's best
single-layer setting. The plan's gamma ablation is 0, 0.05, 0.25, 0.5, 0.75, 1.0:

    python main.py --config configs/pooled.py --config.distill.gammas.pooled=0.25
    python main.py --config configs/sweeps/pooled_gamma.py   # all of them, with seeds
"""

from configs import default

GAMMAS = (0.0, 0.05, 0.25, 0.5, 0.75, 1.0)


def get_config(arg=None):
    c = default.get_config(arg)
    c.distill.gammas.pooled = 0.5
    return c
