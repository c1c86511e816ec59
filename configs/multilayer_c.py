"""The plan's multi-layer configuration C: gamma2 0.05, gamma3 0.1, gamma4 0.25 (AGRE-KD).

python main.py --config configs/multilayer_c.py            # synthetic benchmark
python main.py --config configs/multilayer_c.py:waterbirds --config.data.manual_dir=DIR
"""

from configs import default


def get_config(arg=None):
    c = default.get_config(arg)
    c.distill.gammas.update(dict(layer2=0.05, layer3=0.1, layer4=0.25))
    return c
