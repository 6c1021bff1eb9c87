"""`model.base_model`: LaVIN or CROME without the LM head, returning the LLM's final hidden states.

transformers' vision-language models come in two parts: a body (LLaVA's `LlavaModel`: vision tower, projector and
the LLM's decoder, returning `last_hidden_state`) and the LM head on top; `model.base_model` is the body. Ours keep
the frozen LLM whole (its head included) beside the vision tower and the adapters, so there is no body module to
register (that would rename every weight); this view runs the model's own forward (images placed, adapters and
routing applied) and stops before the head.

Who needs it: code that applies the LM head itself. TRL's `SFTTrainer` computes per-token log-probabilities from
`model.base_model(**batch).last_hidden_state` in chunks of positions, never building the full logits.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from .causal_lm_output import LAST_HIDDEN_STATE_ONLY


class MultimodalBody:
    """The body of a LaVIN or CROME model (decoder-only LLM): `body(**inputs)` takes the model's forward inputs and
    returns a `BaseModelOutputWithPast` whose `last_hidden_state` is the LLM decoder's output (after its final norm)
    for every input position, `(batch, sequence, LLM width)`; the model's LM head turns it into the logits.

    A view, not a module: it holds no weights of its own (`model.parameters()` has them all)."""

    # transformers reads these of `base_model` (tensor and pipeline parallel plans): the body has none of its own.
    _tp_plan = None
    _pp_plan = None
    # What code written for transformers' bodies reads of one besides calling it (its common model tests look for
    # the towers by name and walk the module tree): the model's own, shared. Nothing else is passed through: the
    # body does not answer for the whole model (`get_encoder`, `generate`, ...).
    SHARED_ATTRIBUTES = (
        "config",
        "language_model",
        "vision_tower",
        "modules",
        "named_modules",
        "parameters",
        "named_parameters",
        "device",
        "dtype",
    )

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        if name in MultimodalBody.SHARED_ATTRIBUTES:
            return getattr(self._model, name)
        raise AttributeError(
            f"{type(self).__name__} (model.base_model) has no attribute {name!r}: it runs the model without its LM "
            f"head and shares {', '.join(MultimodalBody.SHARED_ATTRIBUTES)}; use the model itself for the rest."
        )

    def __call__(self, *args: Any, **kwargs: Any) -> BaseModelOutputWithPast | tuple:
        if getattr(self._model, "is_encoder_decoder_llm", False):
            raise ValueError(
                "base_model(...) returns a decoder-only LLM's final hidden states; this CROME's LLM is an "
                f"encoder-decoder ({self._model.config.text_config.model_type}). Call the model itself: its output "
                "holds the decoder's logits and `encoder_last_hidden_state`."
            )
        if kwargs.get("labels") is not None:
            raise ValueError(
                "base_model(...) stops before the LM head, so it computes no loss: call the model itself with "
                "`labels`, or apply `model.get_output_embeddings()` to `last_hidden_state`."
            )
        kwargs.pop("labels", None)
        return self._model(*args, **kwargs, **{LAST_HIDDEN_STATE_ONLY: True})

    def __repr__(self) -> str:
        return f"MultimodalBody({type(self._model).__name__})"
