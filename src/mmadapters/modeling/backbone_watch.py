"""Notice when the frozen backbones' weights change after loading, so an adapter-only save never drops a change.

An adapter-only checkpoint re-reads the backbones from their source, so anything done to their weights in memory
(a LoRA merged with `merge_and_unload`, a backbone unfrozen and trained, weights edited by hand) would be lost
without a word. `BackboneWatch` keeps a small sample of every backbone tensor, taken once the model is built or
loaded, and `changed()` compares it with the weights as they are now.

The sample: about 4,096 evenly strided elements per tensor (all of a small one). A merge or a training step
changes essentially every element of a tensor it touches, so a sample sees it; reading the sample costs
milliseconds even for a 7B model. Dtype casts and device moves are not changes: the recorded values are cast to
the tensor's current dtype before comparing, also through bfloat16 or float16 on the way (`model.to(torch.bfloat16)`
then `model.float()` holds the loaded values rounded; an adapter-only reload reads them again unrounded). A change
made while the weights were in half precision still shows wherever it moved a value by a rounding step or more,
as it would on a model kept in that precision. Offloaded tensors (on the meta device) are skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint_files import is_peft_tensor_name
from .peft_on_top import PeftOnTopError

SAMPLES_PER_TENSOR = 4096
# The half precisions a model may have been cast through and back (see the module docstring).
ROUNDING_DTYPES = (torch.bfloat16, torch.float16)


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
    return flat[::step].to("cpu", copy=True)


def keep_quantized_weights_in_place(module: nn.Module) -> None:
    """Keep bitsandbytes from rewriting a backbone's 4-bit weights. On a CPU with AVX512-BF16, bitsandbytes (0.50)
    repacks a 4-bit layer's weights in place at its first inference pass, into a layout it computes in bfloat16
    and packs back only approximately (its double-quantised absmax is quantised again): an adapter-only save then
    refused as if the backbone had been trained, a merged export dequantized garbage, and inference computed
    differently from training. With the switch off those layers compute as on any other CPU (their float32
    compute dtype) and their weights stay as loaded."""
    for layer in module.modules():
        if getattr(layer, "support_avx512bf16_for_cpu", False):
            layer.support_avx512bf16_for_cpu = False


def backbone_tensors(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The backbones' tensors, named `role.name` (role: "language_model", "vision_tower"), as the live modules
    hold them."""
    return _without_peft(
        {
            f"{role}.{name}": t
            for role, module in modules.items()
            for name, t in module.state_dict(keep_vars=True).items()
        }
    )


def backbone_tensors_in(
    state_dict: dict[str, torch.Tensor], roles: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The backbones' tensors in a whole-model state dict (e.g. one a Trainer gathered under FSDP, where reading
    the live modules on one process would wait for the others)."""
    return _without_peft({name: t for name, t in state_dict.items() if name.split(".", 1)[0] in roles})


def _without_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's `base_layer.` left out of the names (injected layers keep the name of the weight they wrap) and
    PEFT's own tensors skipped (they are saved with the adapters)."""
    return {
        ".".join(part for part in name.split(".") if part != "base_layer"): tensor
        for name, tensor in tensors.items()
        if not is_peft_tensor_name(name)
    }


class BackboneChangedError(PeftOnTopError):
    """An adapter-only save of a model whose backbone weights changed since loading (it would lose the change).
    A `PeftOnTopError` too, the class this refusal had before it had its own, so handlers of that still catch it."""


class BackboneWatch:
    """A sample of the backbones' weights as loaded (see the module docstring)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        """`tensors`: `backbone_tensors(...)` of the model as loaded."""
        self.samples = {
            name: _sample(tensor)
            for name, tensor in tensors.items()
            if tensor.device.type != "meta" and tensor.numel() > 0
        }

    def changed(self, now: dict[str, torch.Tensor]) -> list[str]:
        """Names of backbone tensors whose values in `now` (`backbone_tensors` or `backbone_tensors_in`) differ
        from the sample (a different dtype class, such as a tensor quantised in place, counts as unchanged: it is
        rebuilt the same way on load)."""
        different = []
        for name, recorded in self.samples.items():
            tensor = now.get(name)
            if tensor is None or tensor.device.type == "meta":
                continue
            if tensor.dtype.is_floating_point != recorded.dtype.is_floating_point:
                continue
            current = _sample(tensor)
            if current.shape != recorded.shape or not _same_up_to_casts(current, recorded):
                different.append(name)
        return different


def _same_up_to_casts(current: torch.Tensor, recorded: torch.Tensor) -> bool:
    """Whether `current` holds the recorded values cast to its dtype, directly or through a half precision."""
    if torch.equal(current, recorded.to(current.dtype)):
        return True
    if not current.dtype.is_floating_point:
        return False
    return any(torch.equal(current, recorded.to(half).to(current.dtype)) for half in ROUNDING_DTYPES)


__all__ = ["BackboneChangedError", "BackboneWatch", "backbone_tensors", "backbone_tensors_in"]
