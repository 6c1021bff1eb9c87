"""Notice when the frozen backbones' weights change after loading, so an adapter-only save never drops a change.

An adapter-only checkpoint re-reads the backbones from their source, so anything done to their weights in memory
(a LoRA merged with `merge_and_unload`, a backbone unfrozen and trained, weights edited by hand) would be lost
without a word. `BackboneWatch` keeps a small sample of every backbone tensor, taken once the model is built or
loaded, and `changed()` compares it with the weights as they are now.

The sample: about 4,096 evenly strided elements per tensor (all of a small one). A merge or a training step
changes essentially every element of a tensor it touches, so a sample sees it; reading the sample costs
milliseconds even for a 7B model. Dtype casts (`model.half()`) and device moves are not changes: the recorded
values are cast to the tensor's current dtype before comparing. Offloaded tensors (on the meta device) are skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint_files import is_peft_tensor_name

SAMPLES_PER_TENSOR = 4096


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
    return flat[::step].to("cpu", copy=True)


def _weights(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Backbone tensors by name, with PEFT's `base_layer.` left out (injected layers keep the name of the weight
    they wrap) and PEFT's own tensors skipped (they are saved with the adapters)."""
    found = {}
    for role, module in modules.items():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if is_peft_tensor_name(name):
                continue
            parts = name.split(".")
            found[f"{role}.{'.'.join(p for p in parts if p != 'base_layer')}"] = tensor
    return found


class BackboneWatch:
    """A sample of the backbones' weights as loaded (see the module docstring)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.samples = {
            name: _sample(tensor)
            for name, tensor in _weights(modules).items()
            if tensor.device.type != "meta" and tensor.numel() > 0
        }

    def changed(self, modules: dict[str, nn.Module]) -> list[str]:
        """Names of backbone tensors whose values differ from the sample (a different dtype class, such as a
        tensor quantised in place, counts as unchanged: it is rebuilt the same way on load)."""
        now = _weights(modules)
        different = []
        for name, recorded in self.samples.items():
            tensor = now.get(name)
            if tensor is None or tensor.device.type == "meta":
                continue
            if tensor.dtype.is_floating_point != recorded.dtype.is_floating_point:
                continue
            current = _sample(tensor)
            if current.shape != recorded.shape or not torch.equal(current, recorded.to(tensor.dtype)):
                different.append(name)
        return different


__all__ = ["BackboneWatch"]
