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
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

# Keyword arguments of `forward` that belong to the loss, not to the LLM.
LOSS_KWARGS = ("num_items_in_batch", "ignore_index")


def supervised_positions(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Positions t whose next token labels[:, t + 1] is supervised in at least one row (1-D, sorted)."""
    return (labels[:, 1:] != ignore_index).any(dim=0).nonzero().squeeze(-1)


def causal_lm_output(
    language_model: torch.nn.Module,
    loss_function: Callable[..., torch.Tensor],
    vocab_size: int,
    inputs_embeds: torch.Tensor,
    labels: torch.Tensor | None,
    logits_to_keep: int | torch.Tensor,
    supervised_logits_only: bool,
    forward_kwargs: dict[str, Any],
) -> CausalLMOutputWithPast:
    """Run `language_model` (a causal LM) on `inputs_embeds`; the loss when `labels` are given.

    `forward_kwargs` holds everything else for the LLM and the loss (attention mask, positions, cache, the
    adapters' keyword arguments, `num_items_in_batch`, ...)."""
    loss_kwargs = {key: forward_kwargs.pop(key) for key in LOSS_KWARGS if key in forward_kwargs}
    positions = None
    if labels is not None and supervised_logits_only:
        positions = supervised_positions(labels, loss_kwargs.get("ignore_index", -100))
        logits_to_keep = positions
    outputs = language_model(inputs_embeds=inputs_embeds, logits_to_keep=logits_to_keep, **forward_kwargs)
    loss = None
    if labels is not None:
        if positions is not None:  # logits[:, k] predicts the token after position positions[k]
            loss = loss_function(
                logits=outputs.logits,
                labels=None,
                shift_labels=labels[:, positions + 1],
                vocab_size=vocab_size,
                **loss_kwargs,
            )
        else:
            loss = loss_function(logits=outputs.logits, labels=labels, vocab_size=vocab_size, **loss_kwargs)
    return CausalLMOutputWithPast(
        loss=loss,
        logits=outputs.logits,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )
