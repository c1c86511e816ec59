"""Datasets (TFDS builders) and the input pipeline.

Importing this package registers the builders with TFDS: `spurious_shapes` (the embedded
synthetic default), `pretrain_shapes` (its pretraining task), `waterbirds`, `celeba_groups` and
`colored_mnist` (on real MNIST digits, embedded by default). The input pipeline lives in
`agre_jax.data.pipeline`; its device path (decode-once cache, augmentation in the compiled
step) in `agre_jax.data.device_input`.
"""

from agre_jax.data.celeba_groups import CelebaGroups
from agre_jax.data.colored_mnist import ColoredMnist, ColoredMnistConfig
from agre_jax.data.core import DataError, group_counts
from agre_jax.data.pretrain_shapes import PretrainShapes, PretrainShapesConfig
from agre_jax.data.spurious_shapes import SpuriousShapes, SpuriousShapesConfig
from agre_jax.data.waterbirds import Waterbirds

__all__ = [
    "CelebaGroups",
    "ColoredMnist",
    "ColoredMnistConfig",
    "DataError",
    "PretrainShapes",
    "PretrainShapesConfig",
    "SpuriousShapes",
    "SpuriousShapesConfig",
    "Waterbirds",
    "group_counts",
]
