"""The biased model's architecture (the paper's Table 5): AGRE-KD with the ERM version of
teacher 0 as the biased model (the default, baseline) against a separately trained ERM
ResNet-18, ResNet-34 and ResNet-50 (`biased.arch`: one network per architecture, trained as a
teacher stage with the teachers' width and ERM settings, shared by every seed): 4 variants x
3 seeds.

    python main.py --config configs/sweeps/biased_model.py[:waterbirds|:celeba|:cmnist] \\
        --workdir runs/biased_model
"""

from agre_jax import sweep
from configs import default

ARCHS = ("resnet18", "resnet34", "resnet50")


def get_config(arg=None):
    variants = [sweep.variant("teacher0", {}, biased="ERM teacher 0")]
    variants += [sweep.variant(a, {"biased.arch": a}, biased=a) for a in ARCHS]
    return sweep.define(
        default.get_config(arg),
        name="biased_model",
        title="AGRE-KD against the biased model: ERM teacher 0, or a trained ResNet-18/34/50",
        variants=variants,
        baseline="teacher0",
        base_name="configs/default.py",
    )
