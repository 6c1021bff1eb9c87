"""Initialise CROME from an InstructBLIP checkpoint, as the paper does (CROME.md sections 1 and 5).

Taken from InstructBLIP: the vision tower (kept frozen, referenced as CROME's vision backbone), the Q-Former,
the query tokens, the query projection when the LLM width matches InstructBLIP's `language_projection`, and the
Q-Former tokenizer (its `qformer_tokenizer/` subfolder). Only those tensors are read from the checkpoint; its
language model is never loaded.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import InstructBlipConfig

from ..modeling.adapters import CromeAdapterConfig
from ..modeling.backbones import BackboneSpec, fingerprint, resolve_checkpoint_folder, resolve_hub_revision
from ..modeling.crome import CromeForConditionalGeneration
from ..modeling.loading import HUB_KEYWORDS
from ..processing import CromeProcessor
from ..processing.processing_crome import instructblip_qformer_tokenizer


def from_instructblip(
    path_or_id: str | os.PathLike,
    text_model: BackboneSpec,
    adapter_config: CromeAdapterConfig | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    **config_kwargs: Any,
) -> tuple[CromeForConditionalGeneration, CromeProcessor]:
    """CROME around `text_model`, with vision tower, Q-Former and query tokens from an InstructBLIP checkpoint.

    Returns the model and its processor (with InstructBLIP's Q-Former tokenizer). `config_kwargs`: what
    `from_backbones` takes; its Hub keywords (`token`, ...) reach the InstructBLIP checkpoint's files too.
    """
    name = os.fspath(path_or_id)
    hub_kwargs = {k: config_kwargs[k] for k in HUB_KEYWORDS if k in config_kwargs}
    # A Hub checkpoint is pinned to the commit read now and named by its repo id in the records (its tower is
    # CROME's vision backbone; its Q-Former is read again from it at load): the Hub cache folder it is read from
    # here exists on this machine only.
    revision = resolve_hub_revision(name, revision, hub_kwargs)
    folder = resolve_checkpoint_folder(name, revision, **hub_kwargs)
    source_config = InstructBlipConfig.from_pretrained(folder)
    model = CromeForConditionalGeneration.from_backbones(
        text_model,
        name,
        vision_revision=revision,
        qformer=source_config.qformer_config,
        adapter_config=adapter_config,
        dtype=dtype,
        num_query_tokens=source_config.num_query_tokens,
        **config_kwargs,
    )
    modules = model.load_instructblip_weights(folder)
    model.config.qformer_source = {
        "name_or_path": name,
        "revision": revision,
        "modules": modules,
        "fingerprint": fingerprint(model.qformer),
    }
    processor = CromeProcessor.from_backbones(
        text_model,
        name,
        vision_revision=revision,
        qformer_tokenizer=instructblip_qformer_tokenizer(folder),
        num_image_tokens=model.config.num_image_tokens,
        **hub_kwargs,
    )
    return model, processor
