"""The plan's multi-layer configuration B (Add layer3 only): AGRE-KD with feature
distillation gamma2 0.0, gamma3 0.1, gamma4 0.25 (MSE through 1x1-conv adapters).

    python main.py --config configs/multilayer_b.py[:waterbirds|:celeba]
"""

from configs import default


def get_config(arg=None):
    c = default.get_config(arg)
    c.distill.gammas.update(dict(layer2=0.0, layer3=0.1, layer4=0.25))
    return c
