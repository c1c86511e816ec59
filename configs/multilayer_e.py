"""The plan's multi-layer configuration E (Decreasing (early = more weight)): AGRE-KD with feature
distillation gamma2 0.2, gamma3 0.15, gamma4 0.1 (MSE through 1x1-conv adapters).

    python main.py --config configs/multilayer_e.py[:waterbirds|:celeba]
"""

from configs import default


def get_config(arg=None):
    c = default.get_config(arg)
    c.distill.gammas.update(dict(layer2=0.2, layer3=0.15, layer4=0.1))
    return c
