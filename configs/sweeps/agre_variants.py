"""AGRE-KD's variants: the paper's per-sample weights (exact, all student parameters) against
the earlier PyTorch code's batch-level `agre_batch`, the two policies for samples where every
teacher pulls with the biased model (`empty_rows` 'uniform' / 'drop'), gradients of the last
layer only, and AVER for reference: 6 variants x 3 seeds, logits only.

    python main.py --config configs/sweeps/agre_variants.py[:waterbirds|:celeba] \\
        --workdir runs/agre_variants
"""

from agre_jax import sweep
from configs import default


def get_config(arg=None):
    def agre(name, weighting="agre", scope="full", empty_rows="uniform"):
        return sweep.variant(
            name,
            {
                "distill.weighting": weighting,
                "distill.grad_scope": scope,
                "distill.empty_rows": empty_rows,
            },
            method="AGRE-KD" if weighting == "agre" else "AGRE-batch",
            scope=scope,
            empty_rows=empty_rows if weighting == "agre" else "n/a",
        )

    variants = [
        agre("agre"),
        agre("agre_drop", empty_rows="drop"),
        agre("agre_last_layer", scope="last_layer"),
        agre("agre_batch", weighting="agre_batch"),
        agre("agre_batch_last_layer", weighting="agre_batch", scope="last_layer"),
        sweep.variant("aver", {"distill.weighting": "aver"}, method="AVER"),
    ]
    return sweep.define(
        default.get_config(arg),
        name="agre_variants",
        title="AGRE-KD per-sample vs batch-level weights, empty-row policies, gradient scope",
        variants=variants,
        baseline="agre",
        base_name="configs/default.py",
    )
