"""A smoke sweep on configs/tiny.py (seconds per stage on a CPU): AGRE-KD vs AVER, 2 seeds;
both variants share the teacher and DFR stages.

    python main.py --config configs/sweeps/tiny.py --workdir /tmp/tiny_sweep
"""

from agre_jax import sweep
from configs import tiny


def get_config(arg=None):
    variants = [
        sweep.variant("agre", {"distill.weighting": "agre"}, method="AGRE-KD"),
        sweep.variant("aver", {"distill.weighting": "aver"}, method="AVER"),
    ]
    return sweep.define(
        tiny.get_config(arg),
        name="tiny",
        title="Smoke test: AGRE-KD vs AVER on the tiny config",
        variants=variants,
        baseline="agre",
        seeds=(0, 1),
        base_name="configs/tiny.py",
    )
