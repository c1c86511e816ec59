"""AVER: distil from the plain average of the teachers (You et al. 2017), logits only.

python main.py --config configs/aver.py[:waterbirds|:celeba]
"""

from configs import default


def get_config(arg=None):
    c = default.get_config(arg)
    c.distill.weighting = "aver"
    return c
