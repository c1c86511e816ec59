"""Every teacher-weighting method of the paper's tables, logits only and with pooled-feature
distillation gamma 0.25 and 0.5, plus One-hot (labels only): 7 x 3 + 1 = 22 variants x 3
seeds, one shared teacher stage.

Methods: AGRE-KD (per-sample, all student parameters), AGRE-KD in logit space (gradients of
the last layer only, whose cosine equals that of the logit gradients: `grad_scope=last_layer`),
`agre_batch` (the earlier PyTorch code's batch-level weights), AE-KD (Du et al. 2020), AVER,
one random teacher per batch (Fukuda et al. 2017), and One-hot (alpha 0).

    python main.py --config configs/sweeps/methods.py[:waterbirds|:celeba|:cmnist] \\
        --workdir runs/methods
    python main.py --config configs/sweeps/methods.py --workdir runs/methods \\
        --config.sweep.seeds='(0,1,2,3,4)' --config.sweep.only=agre_g0,aver_g0,aekd_g0
"""

from agre_jax import sweep
from configs import default

# variant prefix -> (overrides, label); the names of the first three are those of earlier sweeps.
METHODS = {
    "agre": ({"distill.weighting": "agre"}, "AGRE-KD"),
    "aver": ({"distill.weighting": "aver"}, "AVER"),
    "random": ({"distill.weighting": "random"}, "random"),
    "agre_logit": (
        {"distill.weighting": "agre", "distill.grad_scope": "last_layer"},
        "AGRE-KD (logit space)",
    ),
    "agre_batch": ({"distill.weighting": "agre_batch"}, "agre_batch"),
    "aekd": ({"distill.weighting": "aekd"}, "AE-KD"),
}
GAMMAS = (0.0, 0.25, 0.5)


def get_config(arg=None):
    variants = [
        sweep.variant(
            f"{prefix}_g{gamma:g}",
            {**overrides, "distill.gammas.pooled": gamma},
            method=method,
            gamma=gamma,
        )
        for gamma in GAMMAS
        for prefix, (overrides, method) in METHODS.items()
    ]
    variants.append(
        sweep.variant(
            "onehot",
            {"distill.alpha": 0.0, "distill.weighting": "aver"},
            method="One-hot",
            gamma=0.0,
        )
    )
    return sweep.define(
        default.get_config(arg),
        name="methods",
        title="Teacher weightings (AGRE-KD, logit-space AGRE-KD, agre_batch, AE-KD, AVER, "
        "random) and One-hot, pooled-feature gamma 0 / 0.25 / 0.5",
        variants=variants,
        baseline="agre_g0",
        base_name="configs/default.py",
    )
