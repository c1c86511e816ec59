"""Stand-ins shared by tests that compute stage keys without preparing any data."""

import types


def dataset_keys(key: str = "the-data") -> types.SimpleNamespace:
    """What stages.stage_keys and stages.pretrain_keys read of a Dataset: its content `key`
    and `augmented_key(augment)` (here the same key either way)."""
    return types.SimpleNamespace(key=key, augmented_key=lambda augment: key)
