"""The last step of both models' forward (decoder-only LLMs): run the LLM on the prepared embeddings, and compute
the causal-LM loss, optionally from the supervised positions' logits only.

Why "supervised logits only": an answer-only label mask supervises a few tokens per sample, yet a plain
forward projects every position onto the whole vocabulary (49,152 entries for SmolLM2: about a fifth of a
135M model's forward FLOPs, and the largest activation of a training step). With
`supervised_logits_only=True` (what our Trainers pass in training steps) the LM head runs only at the
positions whose next token has a label, and the loss is the same number (tested); `logits` then holds only
those positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
)

from .transformers_compat import cache_kwargs, cache_of

# Keyword arguments of `forward` that belong to the loss, not to the LLM.
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
# Keyword argument of `forward` with which `model.base_model` (multimodal_body.py) asks for the LLM decoder's final
# hidden states instead of logits.
LAST_HIDDEN_STATE_ONLY = "last_hidden_state_only"


@dataclass
class VisionLanguageCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus, when images were given, `image_hidden_states` (the visual tokens placed into
    the LLM input: num_images, num_image_tokens, LLM width) and `image_outputs` (`get_image_features`' output: the
    vision tower's states with the visual tokens as `pooler_output`), as transformers' vision-language models
    return them."""

    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


def image_features_output(tokens: torch.Tensor, vision_outputs: Any) -> BaseModelOutputWithPooling:
    """`get_image_features(..., return_dict=True)`: the vision tower's states, the visual tokens as pooler_output."""
    return BaseModelOutputWithPooling(
        last_hidden_state=vision_outputs.last_hidden_state,
        pooler_output=tokens,
        hidden_states=vision_outputs.hidden_states,
        attentions=getattr(vision_outputs, "attentions", None),
    )


def supervised_positions(
    labels: torch.Tensor, ignore_index: int = -100, shifted: bool = False
) -> torch.Tensor:
    """Positions t whose next token is supervised in at least one row (1-D, sorted): labels[:, t + 1], or
    shift_labels[:, t] for labels already shifted."""
    targets = labels if shifted else labels[:, 1:]
    return (targets != ignore_index).any(dim=0).nonzero().squeeze(-1)


def next_token_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The label each position's logit predicts: labels[:, t + 1] at position t, `ignore_index` at the end."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)


def last_hidden_state_output(
    language_model: torch.nn.Module, inputs_embeds: torch.Tensor, forward_kwargs: dict[str, Any]
) -> BaseModelOutputWithPast:
    """Run the LLM without its head (a causal LM's `get_decoder()`, whose layers hold the adapters) on
    `inputs_embeds`: its output as it is (`last_hidden_state` after the final norm, the cache, ...). What
    `model.base_model` returns (multimodal_body.py)."""
    forward_kwargs = {key: value for key, value in forward_kwargs.items() if key not in LOSS_KWARGS}
    return language_model.get_decoder()(inputs_embeds=inputs_embeds, **forward_kwargs)


def refuse_partial_logits_with_labels(logits_to_keep: int | torch.Tensor, length: int) -> None:
    """`logits_to_keep` that drops positions, given with labels: the loss needs a logit for every labelled position,
    and transformers' loss stopped with torch's "Expected input batch_size (2) to match target batch_size (26)"."""
    if isinstance(logits_to_keep, int) and (logits_to_keep == 0 or logits_to_keep >= length):
        return
    raise ValueError(
        f"logits_to_keep={logits_to_keep!r} with labels: the loss needs the logits of every labelled position. Leave "
        "logits_to_keep out, or pass supervised_logits_only=True (logits only where the next token is supervised; "
        "the same loss)."
    )


def causal_lm_output(
    language_model: torch.nn.Module,
    loss_function: Callable[..., torch.Tensor],
    vocab_size: int,
    inputs_embeds: torch.Tensor,
    labels: torch.Tensor | None,
    logits_to_keep: int | torch.Tensor,
    supervised_logits_only: bool,
    forward_kwargs: dict[str, Any],
) -> VisionLanguageCausalLMOutput:
    """Run `language_model` (a causal LM) on `inputs_embeds`; the loss when `labels` (or, already shifted,
    `shift_labels` in `forward_kwargs`) are given.

    `forward_kwargs` holds everything else for the LLM and the loss (attention mask, positions, cache, the
    adapters' keyword arguments, `num_items_in_batch`, ...)."""
    loss_kwargs = {key: forward_kwargs.pop(key) for key in LOSS_KWARGS if key in forward_kwargs}
    shift_labels = loss_kwargs.pop("shift_labels", None)
    ignore_index = loss_kwargs.get("ignore_index", -100)
    positions = None
    if supervised_logits_only and (labels is not None or shift_labels is not None):
        if shift_labels is not None:
            positions = supervised_positions(shift_labels, ignore_index, shifted=True)
        else:
            positions = supervised_positions(labels, ignore_index)
        logits_to_keep = positions
    elif labels is not None or shift_labels is not None:
        refuse_partial_logits_with_labels(logits_to_keep, inputs_embeds.shape[1])
    outputs = language_model(inputs_embeds=inputs_embeds, logits_to_keep=logits_to_keep, **forward_kwargs)
    loss = None
    if labels is not None or shift_labels is not None:
        if shift_labels is None:
            shift_labels = next_token_labels(labels, ignore_index)
        if positions is not None:  # logits[:, k] predicts the token after position positions[k]
            shift_labels = shift_labels[:, positions]
        loss = loss_function(
            logits=outputs.logits,
            labels=None,
            shift_labels=shift_labels.to(outputs.logits.device),
            vocab_size=vocab_size,
            **loss_kwargs,
        )
    return VisionLanguageCausalLMOutput(
        loss=loss,
        logits=outputs.logits,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        **cache_kwargs(cache_of(outputs)),
    )
