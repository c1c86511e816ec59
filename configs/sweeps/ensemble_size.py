"""Ensemble size: every teacher weighting of configs/sweeps/methods.py (AGRE-KD, logit-space
AGRE-KD, agre_batch, AE-KD, AVER, random) distilling 3, 5 or 10 teachers, and a single
teacher (where every weighting is the same: one variant, AVER), logits only: 3 x 6 + 1 = 19
variants x 3 seeds. Each ensemble size is its own teacher stage (M teachers trained stacked;
teacher m uses teachers.seed + m), shared by the methods of that size.

    python main.py --config configs/sweeps/ensemble_size.py[:waterbirds|:celeba|:cmnist] \\
        --workdir runs/ensemble_size
    # AGRE-KD and AVER only:
    python main.py --config configs/sweeps/ensemble_size.py --workdir runs/ensemble_size \\
        --config.sweep.only=aver_n1,agre_n3,aver_n3,agre_n5,aver_n5,agre_n10,aver_n10
"""

from agre_jax import sweep
from configs import default
from configs.sweeps.methods import METHODS

SIZES = (3, 5, 10)  # M; plus the single teacher


def get_config(arg=None):
    variants = [
        sweep.variant(
            "aver_n1", {"teachers.num": 1, "distill.weighting": "aver"}, method="AVER", teachers=1
        )
    ]
    variants += [
        sweep.variant(f"{prefix}_n{m}", {**overrides, "teachers.num": m}, method=method, teachers=m)
        for m in SIZES
        for prefix, (overrides, method) in METHODS.items()
    ]
    return sweep.define(
        default.get_config(arg),
        name="ensemble_size",
        title="Teacher weightings against the ensemble size (1, 3, 5, 10 teachers), logits only",
        variants=variants,
        baseline="agre_n5",
        base_name="configs/default.py",
    )
