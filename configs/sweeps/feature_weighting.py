"""Per-layer AGRE weighting of the feature loss (the plan's section 9.3) against the shared
weights: configuration C (configs/multilayer_c.py) with the KD's per-sample teacher weights on
its feature targets, and with per-layer weights of their own (configs/feature_agre.py), beside
logits only: 3 variants x 3 seeds, one shared teacher stage.

    python main.py --config configs/sweeps/feature_weighting.py[:waterbirds|:celeba|:cmnist] \\
        --workdir runs/feature_weighting
"""

from agre_jax import sweep
from configs import default, feature_agre, multilayer_c


def get_config(arg=None):
    base = default.get_config(arg)
    variants = [
        sweep.variant("logits", {}, features="none"),
        sweep.variant(
            "C", sweep.overrides_between(base, multilayer_c.get_config(arg)), features="shared"
        ),
        sweep.variant(
            "C_agre",
            sweep.overrides_between(base, feature_agre.get_config(arg)),
            features="per-layer AGRE",
        ),
    ]
    return sweep.define(
        base,
        name="feature_weighting",
        title="Configuration C with per-layer AGRE feature weights against the KD's weights",
        variants=variants,
        baseline="C",
        base_name="configs/default.py",
    )
