"""Feature losses on the pooled features beside AGRE-KD's weighted KD: logits only, MSE through
a linear adapter (the plan's phase 1 at gamma 0.5) and CRD (contrastive, configs/crd.py),
both at gamma 0.5: 3 variants x 3 seeds, one shared teacher stage.

    python main.py --config configs/sweeps/feature_losses.py[:waterbirds|:celeba|:cmnist] \\
        --workdir runs/feature_losses
"""

from agre_jax import sweep
from configs import default

GAMMA = 0.5


def get_config(arg=None):
    variants = [
        sweep.variant("logits", {}, feature_loss="none"),
        sweep.variant("mse", {"distill.gammas.pooled": GAMMA}, feature_loss="MSE"),
        sweep.variant(
            "crd",
            {"distill.gammas.pooled": GAMMA, "distill.feature_loss": "crd"},
            feature_loss="CRD",
        ),
    ]
    return sweep.define(
        default.get_config(arg),
        name="feature_losses",
        title=f"AGRE-KD with pooled-feature MSE or CRD (gamma {GAMMA}) against logits only",
        variants=variants,
        baseline="logits",
        base_name="configs/default.py",
    )
