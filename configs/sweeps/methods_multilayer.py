"""The teacher weightings on the plan's multi-layer configuration C (configs/multilayer_c.py):
AGRE-KD (per-sample, all student parameters), AGRE-KD in logit space (`grad_scope=last_layer`),
`agre_batch`, AVER and one random teacher per batch: 5 variants x 3 seeds, one shared teacher
stage. The feature loss is weighted like the logits (`distill.feature_weighting` default).

    python main.py --config configs/sweeps/methods_multilayer.py[:waterbirds|:celeba] \\
        --workdir runs/methods_multilayer
"""

from agre_jax import sweep
from configs import multilayer_c

# variant -> (overrides, label); the first three names are those of earlier sweeps.
METHODS = {
    "agre": ({"distill.weighting": "agre"}, "AGRE-KD"),
    "aver": ({"distill.weighting": "aver"}, "AVER"),
    "random": ({"distill.weighting": "random"}, "random"),
    "agre_logit": (
        {"distill.weighting": "agre", "distill.grad_scope": "last_layer"},
        "AGRE-KD (logit space)",
    ),
    "agre_batch": ({"distill.weighting": "agre_batch"}, "agre_batch"),
}


def get_config(arg=None):
    variants = [
        sweep.variant(name, overrides, method=method)
        for name, (overrides, method) in METHODS.items()
    ]
    return sweep.define(
        multilayer_c.get_config(arg),
        name="methods_multilayer",
        title="Teacher weightings (AGRE-KD, logit-space AGRE-KD, agre_batch, AVER, random) "
        "with multi-layer feature distillation (C)",
        variants=variants,
        baseline="agre",
        base_name="configs/multilayer_c.py",
    )
