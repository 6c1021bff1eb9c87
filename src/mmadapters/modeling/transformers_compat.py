"""What differs between the transformers 5.x releases that our pins allow, decided once, in one place.

- The KV cache keyword: transformers 5.24 renamed `past_key_values` to `cache` (in model forwards, in
  `generate`'s model inputs and in the output classes) and warns on the old name; releases before it only know
  `past_key_values`. Our forwards accept both names and hand the LLM the one its release knows.
- Activation checkpointing: 5.24 renamed `gradient_checkpointing_enable` / `is_gradient_checkpointing` to
  `activation_checkpointing_enable` / `is_activation_checkpointing` and deprecated the old names.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

_OUTPUT_FIELDS = {field.name for field in dataclasses.fields(CausalLMOutputWithPast)}

# The keyword (and output field) under which this transformers release passes the KV cache.
CACHE_KWARG = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"


def pick_cache(cache: Any, past_key_values: Any, owner: str) -> Any:
    """The KV cache, whichever name it was given under (`cache` since 5.24, `past_key_values` before). Where this
    release has renamed it, the old name warns as transformers' own models do."""
    if past_key_values is not None and CACHE_KWARG == "cache":
        warnings.warn(
            f"`past_key_values` is deprecated and will be removed in version 5.40.0 for `{owner}.forward`. Use "
            "`cache` instead.",
            FutureWarning,
            stacklevel=3,
        )
    return cache if cache is not None else past_key_values


def cache_of(outputs: Any) -> Any:
    """The KV cache of a model output, read under the field name of this release (no deprecation warning)."""
    return getattr(outputs, CACHE_KWARG, None)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{name: cache}` for a model call or an output class of this release."""
    return {CACHE_KWARG: cache}


# Whether this release has the activation-checkpointing names (5.24+; the gradient-checkpointing ones then warn).
ACTIVATION_CHECKPOINTING_NAMES = hasattr(PreTrainedModel, "activation_checkpointing_enable")


def enable_activation_checkpointing(model: nn.Module, checkpoint_kwargs: dict | None = None) -> None:
    """`activation_checkpointing_enable` where it exists (5.24+), else `gradient_checkpointing_enable`;
    `checkpoint_kwargs` go to `torch.utils.checkpoint` (e.g. `{"use_reentrant": False}`)."""
    if ACTIVATION_CHECKPOINTING_NAMES:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
