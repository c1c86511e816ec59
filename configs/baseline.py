"""AGRE-KD baseline: logit distillation only (all gammas 0), the paper's method.

python main.py --config configs/baseline.py[:waterbirds|:celeba]
"""

from configs import default


def get_config(arg=None):
    return default.get_config(arg)
