"""The plan's multi-layer configuration D (Increasing (deeper = more weight)): AGRE-KD with feature
distillation gamma2 0.1, gamma3 0.2, gamma4 0.3 (MSE through 1x1-conv adapters).

    python main.py --config configs/multilayer_d.py[:waterbirds|:celeba]
"""

from configs import default


def get_config(arg=None):
    c = default.get_config(arg)
    c.distill.gammas.update(dict(layer2=0.1, layer3=0.2, layer4=0.3))
    return c
