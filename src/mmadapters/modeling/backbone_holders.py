"""A loaded backbone belongs to one LaVIN or CROME model at a time.

Our models change their backbones in place: LaVIN's adapters are forward hooks on the LLM's and the vision tower's
layers, and PEFT layers (`add_adapter`, `load_adapter`) are put inside them. A backbone object shared by two of our
models therefore runs the other model's adapters too, and both compute something else than they were trained for,
without any error (two LaVINs built on one loaded LLM gave other logits than each alone). So a model is not built
on a backbone object that another live model of ours holds, or that still carries LaVIN adapter hooks (of a model
deleted without `remove_adapter_hooks()`); the refusal comes before the backbone is touched.

To serve several adapter sets on one backbone, keep one model and switch PEFT adapters on it (`set_adapter`,
`load_adapter(..., hotswap=True)`), or load the backbone once per model.
"""

from __future__ import annotations

import gc
import weakref

from torch import nn

from ..errors import MMAdaptersError
from .adapters.injection import modules_with_adapter_hooks

# backbone module -> the model that holds it (weak on both sides: neither is kept alive by this table).
_HOLDERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


class BackboneInUseError(MMAdaptersError, ValueError):
    """A loaded backbone is already part of another LaVIN or CROME model, or carries LaVIN adapter hooks."""


def refuse_backbone_in_use(backbone: nn.Module, role: str) -> None:
    """Refuse `backbone` (the `role` backbone: "text" or "vision") for a new model if another live model holds it
    or LaVIN adapter hooks sit in it."""
    holder = _holder(backbone)
    if holder is not None:
        gc.collect()  # a model the caller dropped may only be waiting for the cycle collector
        holder = _holder(backbone)
    if holder is not None:
        release = (
            "call its remove_adapter_hooks() (its adapters are hooked into the layers), then delete it"
            if hasattr(holder, "remove_adapter_hooks")
            else "delete it"
        )
        raise BackboneInUseError(
            f"The {role} backbone passed in is already part of a {type(holder).__name__} (a model changes its "
            "backbones in place: LaVIN hooks its adapters into the layers, PEFT layers go inside them, so two "
            "models on one backbone object would each run the other's adapters). Load the backbone again for "
            f"this model, or free it from the other model first ({release}); to serve several adapter sets on "
            "one backbone, keep one model and switch PEFT adapters on it (set_adapter, load_adapter(..., "
            "hotswap=True))."
        )
    hooked = modules_with_adapter_hooks(backbone)
    if hooked:
        raise BackboneInUseError(
            f"The {role} backbone passed in still carries the adapter hooks of a LaVIN model ({hooked[0]}, ...), "
            "which would run inside this model too. Call remove_adapter_hooks() on that model before building "
            "another one on its backbone, or load the backbone again."
        )


def hold_backbones(model: nn.Module, *backbones: nn.Module) -> None:
    """Record `model` as the holder of its backbones (after `refuse_backbone_in_use` let them in)."""
    for backbone in backbones:
        _HOLDERS[backbone] = weakref.ref(model)


def _holder(backbone: nn.Module) -> nn.Module | None:
    reference = _HOLDERS.get(backbone)
    return reference() if reference is not None else None
