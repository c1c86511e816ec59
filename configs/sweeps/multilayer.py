"""The plan's phase 2: multi-layer feature distillation, configurations A-E (gammas on layer2,
layer3 and layer4, configs/multilayer_{a..e}.py) and the logit-only AGRE-KD baseline that the
deltas are computed against: 6 variants x 3 seeds.

    python main.py --config configs/sweeps/multilayer.py[:waterbirds|:celeba] \\
        --workdir runs/multilayer
    # deltas against configuration A (single layer) instead:
    python main.py --config configs/sweeps/multilayer.py --config.sweep.baseline=A ...
"""

from agre_jax import sweep
from configs import default, multilayer_a, multilayer_b, multilayer_c, multilayer_d, multilayer_e

CONFIGS = {
    "A": multilayer_a,
    "B": multilayer_b,
    "C": multilayer_c,
    "D": multilayer_d,
    "E": multilayer_e,
}


def get_config(arg=None):
    base = default.get_config(arg)

    def labels(c):
        g = c.distill.gammas
        return dict(gamma2=g.layer2, gamma3=g.layer3, gamma4=g.layer4)

    variants = [sweep.variant("logits", {}, config="logits only", **labels(base))]
    for name, module in CONFIGS.items():
        c = module.get_config(arg)
        variants.append(
            sweep.variant(name, sweep.overrides_between(base, c), config=name, **labels(c))
        )
    return sweep.define(
        base,
        name="multilayer",
        title="Multi-layer feature distillation: the plan's configurations A-E vs logits only",
        variants=variants,
        baseline="logits",
        base_name="configs/default.py",
    )
