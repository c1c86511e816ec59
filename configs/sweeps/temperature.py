"""The temperature ablation: AGRE-KD (logits only) with tau 1, 2, 4 (the paper's), 8 and 10;
the paper reports WGA growing with tau up to about 8-10: 5 variants x 3 seeds.

    python main.py --config configs/sweeps/temperature.py[:waterbirds|:celeba] \\
        --workdir runs/temperature
"""

from agre_jax import sweep
from configs import default

TAUS = (1.0, 2.0, 4.0, 8.0, 10.0)


def get_config(arg=None):
    variants = [
        sweep.variant(f"t{tau:g}", {"distill.temperature": tau}, method="AGRE-KD", tau=tau)
        for tau in TAUS
    ]
    return sweep.define(
        default.get_config(arg),
        name="temperature",
        title="AGRE-KD: distillation temperature tau",
        variants=variants,
        baseline="t4",
        base_name="configs/default.py",
    )
