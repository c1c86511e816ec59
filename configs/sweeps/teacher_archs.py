"""Teachers of one or of mixed architectures (issue 10, item 4): AGRE-KD and AVER distilling
5 ResNet-18, 5 ResNet-34, 2 ResNet-34 + 3 ResNet-18 (equal feature shapes) or 2 ResNet-50 +
3 ResNet-18 (`teachers.archs`; each architecture a teacher stage of its own, shared by the
variants and seeds that use it), logits only: 8 variants x 3 seeds.

    python main.py --config configs/sweeps/teacher_archs.py[:waterbirds|:celeba|:cmnist] \\
        --workdir runs/teacher_archs
"""

from agre_jax import sweep
from configs import default

ENSEMBLES = {
    "r18": ("resnet18",) * 5,
    "r34": ("resnet34",) * 5,
    "r34x2_r18x3": ("resnet34",) * 2 + ("resnet18",) * 3,
    "r50x2_r18x3": ("resnet50",) * 2 + ("resnet18",) * 3,
}
METHODS = {"agre": "AGRE-KD", "aver": "AVER"}


def get_config(arg=None):
    variants = [
        sweep.variant(
            f"{method}_{name}",
            {"teachers.num": len(archs), "teachers.archs": archs, "distill.weighting": method},
            method=label,
            teachers=name,
        )
        for name, archs in ENSEMBLES.items()
        for method, label in METHODS.items()
    ]
    return sweep.define(
        default.get_config(arg),
        name="teacher_archs",
        title="AGRE-KD and AVER distilling teachers of one or of mixed architectures",
        variants=variants,
        baseline="agre_r18",
        base_name="configs/default.py",
    )
