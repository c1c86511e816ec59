"""PyTorch (torchvision) ResNet checkpoints -> agre_jax Flax variables, and back.

    python -m convert --arch resnet50 --num-classes 2 --src erm_seed1.pt --dst teachers/erm1

The library (`agre_jax`) never imports torch; this package imports it only to read `.pt` /
`.pth` files and to build torch tensors in `to_torch_state_dict`.
"""

from convert.torch_resnet import (
    CHECKPOINT_SUFFIXES,
    FORMAT_VERSION,
    ConversionError,
    Converted,
    convert_checkpoint,
    convert_state_dict,
    key_table,
    load_torch_resnet,
    read_state_dict,
    to_torch_state_dict,
)

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "FORMAT_VERSION",
    "ConversionError",
    "Converted",
    "convert_checkpoint",
    "convert_state_dict",
    "key_table",
    "load_torch_resnet",
    "read_state_dict",
    "to_torch_state_dict",
]
