"""The teacher weightings on the plan's multi-layer configuration C (configs/multilayer_c.py):
AGRE-KD (per-sample, all student parameters), AGRE-KD in logit space (`grad_scope=last_layer`),
`agre_batch`, AVER and one random teacher per batch: 5 variants x 3 seeds, one shared teacher
stage. The feature loss is weighted like the logits (`distill.feature_weighting` default).

    python main.py --config configs/sweeps/methods_multilayer.py[:waterbirds|:celeba] \\
        --workdir runs/methods_multilayer
"""

from agre_jax import sweep
from configs import multilayer_c
from configs.sweeps import methods

# variant -> (overrides, label): methods.py's weightings (AE-KD aside), by the same names.
METHODS = {k: methods.METHODS[k] for k in ("agre", "aver", "random", "agre_logit", "agre_batch")}


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
