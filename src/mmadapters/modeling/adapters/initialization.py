"""Keeping our own initialisation through transformers' weight-initialisation pass."""

from torch import nn


def keep_initialization(module: nn.Module) -> nn.Module:
    """Mark `module` and its children as initialised, so that `PreTrainedModel.post_init` leaves them alone.

    Our modules initialise themselves in `__init__` (Xavier down-projections, zero experts, ...). transformers
    would otherwise re-initialise their inner `nn.Linear`s with its generic normal(0, 0.02) and, for models
    outside the library, skip parents without direct parameters, so a parent-level `_init_weights` never runs.
    """
    for child in module.modules():
        child._is_hf_initialized = True
    return module
