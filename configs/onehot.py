"""One-hot: the student trained on the labels alone (alpha 0: no distillation), the paper's
lower baseline. The teacher and DFR stages still run (and are reused from other runs of the
same preset), for the report's teacher rows; the weighting is AVER, whose weights no loss
uses at alpha 0.

python main.py --config configs/onehot.py[:waterbirds|:celeba|:cmnist]
"""

from configs import default


def get_config(arg=None):
    c = default.get_config(arg)
    c.distill.alpha = 0.0
    c.distill.weighting = "aver"
    return c
