"""AGRE-KD with labels: alpha 0.9 (L = alpha * KD + (1 - alpha) * CE) and pooled gamma 0.25,
the plan's run. The paper's alpha ablation (Appendix C.1) is 0.1, 0.3, 0.5, 0.7, 0.9, 1.0:

    python main.py --config configs/alpha.py --config.distill.alpha=0.5
    python main.py --config configs/sweeps/alpha.py   # all of them, with seeds
"""

from configs import default

ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def get_config(arg=None):
    c = default.get_config(arg)
    c.distill.alpha = 0.9
    c.distill.gammas.pooled = 0.25
    return c
