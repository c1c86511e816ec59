"""The plan's multi-layer configuration A (Baseline (single-layer)): AGRE-KD with feature
distillation gamma2 0.0, gamma3 0.0, gamma4 0.25 (MSE through 1x1-conv adapters).

    python main.py --config configs/multilayer_a.py[:waterbirds|:celeba]
"""

from configs import default


def get_config(arg=None):
    c = default.get_config(arg)
    c.distill.gammas.update(dict(layer2=0.0, layer3=0.0, layer4=0.25))
    return c
