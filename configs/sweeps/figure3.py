"""The paper's Figure 3: ensembles of 5 teachers of which 1 to 5 are debiased (DFR heads; the
others are their ERM versions), distilled with AGRE-KD, AVER and a random teacher per batch:
15 variants x 3 seeds, one shared teacher stage (`teachers.debiased` does not retrain them).

    python main.py --config configs/sweeps/figure3.py[:waterbirds|:celeba] --workdir runs/figure3
    # AGRE-KD and AVER only:
    python main.py --config configs/sweeps/figure3.py \\
        --config.sweep.only=agre_d1,agre_d2,agre_d3,agre_d4,agre_d5,aver_d1,aver_d2,aver_d3,aver_d4,aver_d5
"""

from agre_jax import sweep
from configs import default

METHODS = {"agre": "AGRE-KD", "aver": "AVER", "random": "random"}  # weighting -> label
NUM_TEACHERS = 5


def get_config(arg=None):
    base = default.get_config(arg)
    base.teachers.num = NUM_TEACHERS
    variants = [
        sweep.variant(
            f"{weighting}_d{d}",
            # all debiased is the default (-1), so those runs are the main config's
            {"distill.weighting": weighting, "teachers.debiased": -1 if d == NUM_TEACHERS else d},
            method=method,
            debiased=d,
        )
        for weighting, method in METHODS.items()
        for d in range(1, NUM_TEACHERS + 1)
    ]
    return sweep.define(
        base,
        name="figure3",
        title=f"WGA vs the number of debiased teachers among {NUM_TEACHERS} (paper Fig. 3)",
        variants=variants,
        baseline="agre_d5",
        base_name="configs/default.py",
    )
