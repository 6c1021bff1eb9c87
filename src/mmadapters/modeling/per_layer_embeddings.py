"""Per-layer token embeddings (PLE) of Gemma 3n and Gemma 4: besides its input embeddings, each decoder layer of these
LLMs reads an embedding of the token id. LaVIN and CROME give the LLM its inputs as embeddings (image features in
place of the placeholders); given embeddings alone, the LLM recovers the ids by matching its embedding table, which
fails at every visual token ("the `inputs_embeds` you provided do not exactly match the embedding weights"). As
transformers' Gemma 4 vision-language model does, the ids are looked up here, with the pad token at the image
placeholders (and at ids beyond the per-layer vocabulary), and given to the LLM as `per_layer_inputs`.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def takes_per_layer_inputs(language_model: nn.Module) -> bool:
    """Whether the LLM's decoder reads per-layer token embeddings (Gemma 3n, Gemma 4 with PLE)."""
    return bool(getattr(language_model.config, "hidden_size_per_layer_input", 0)) and hasattr(
        language_model.get_decoder(), "get_per_layer_inputs"
    )


def add_per_layer_inputs(
    language_model: nn.Module,
    llm_kwargs: dict,
    input_ids: torch.LongTensor | None,
    image_mask: torch.Tensor,
) -> None:
    """Give the LLM's keyword arguments `per_layer_inputs` where the LLM reads them, the ids are known and none were
    given (both models call this before running the LLM)."""
    if (
        input_ids is not None
        and "per_layer_inputs" not in llm_kwargs
        and takes_per_layer_inputs(language_model)
    ):
        llm_kwargs["per_layer_inputs"] = per_layer_inputs(language_model, input_ids, image_mask)


def _pad_id(config: object) -> int:
    return config.pad_token_id if config.pad_token_id is not None else 0


def per_layer_inputs(
    language_model: nn.Module, input_ids: torch.LongTensor, image_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The per-layer token embeddings of `input_ids` (batch, length, layers, width), the pad token's at the image
    placeholders (`image_mask`) and at ids outside the per-layer vocabulary."""
    config = language_model.config
    pad = _pad_id(config)
    limit = getattr(config, "vocab_size_per_layer_input", None) or config.vocab_size
    keep = (input_ids >= 0) & (input_ids < limit)
    if image_mask is not None:
        keep &= ~image_mask.to(input_ids.device)
    decoder = language_model.get_decoder()
    ids = torch.where(keep, input_ids, torch.full_like(input_ids, pad))
    ids = ids.to(decoder.embed_tokens_per_layer.weight.device)
    # Gemma 4 also takes `inputs_embeds` (required before transformers 5.24), to find ids it is not given.
    if "inputs_embeds" in inspect.signature(decoder.get_per_layer_inputs).parameters:
        return decoder.get_per_layer_inputs(ids, None)
    return decoder.get_per_layer_inputs(ids)


def pad_per_layer_inputs(
    language_model: nn.Module, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    """The pad token's per-layer embeddings for a (batch, length) run of tokens that have no id (LaVIN's modality
    token, which the routing table runs through the LLM)."""
    ids = torch.full((batch, length), _pad_id(language_model.config), dtype=torch.long, device=device)
    return per_layer_inputs(language_model, ids)
