"""Loading a full checkpoint of a model whose backbone(s) were quantised (LaVIN-lite saved with every weight).

The file holds the quantised backbone's weights as bitsandbytes stores them (4-bit: `<layer>.weight` with
`<layer>.weight.absmax` and the rest of its quantisation state beside it; 8-bit: `<layer>.weight` and `<layer>.SCB`),
and everything else in full precision. transformers' loader takes the quantisation from the text sub-config and
applies it to the whole model: the other backbone and our trainable modules were quantised too, and the first
forward failed inside bitsandbytes. `scoped_quantization_config` gives the loader the same quantisation with every
module the file does not hold quantised listed as not to be converted.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .loading import LoadingOptionError

# The state-dict suffixes by which bitsandbytes marks a quantised layer (4-bit, 8-bit).
QUANTISED_LAYER_SUFFIXES = (".weight.absmax", ".SCB")
# A role of `backbone_quantization` -> the attribute (and state-dict prefix) of that backbone.
BACKBONE_OF_ROLE = {"text_config": "language_model", "vision_config": "vision_tower"}


def scoped_quantization_config(folder: str, config: Any) -> dict[str, Any] | None:
    """The quantization config (as the dict a config.json holds) to load `folder`, a full checkpoint, with; None
    when no backbone was quantised."""
    record = getattr(config, "backbone_quantization", None)
    if not record:
        return None
    settings = list({json.dumps(value, sort_keys=True): value for value in record.values()}.values())
    if len(settings) > 1:
        raise LoadingOptionError(
            f"{folder} is a full checkpoint whose backbones were quantised differently ({sorted(record)}); "
            "transformers loads one quantisation per model. Save such a model adapter-only (the default)."
        )
    if settings[0].get("quant_method") != "bitsandbytes":
        raise LoadingOptionError(
            f"{folder} is a full checkpoint with a {settings[0].get('quant_method')}-quantised backbone; full "
            "checkpoints of quantised backbones load for bitsandbytes only. Save the model adapter-only."
        )
    names = weight_names(folder)
    quantised = {
        name[: -len(suffix)] for name in names for suffix in QUANTISED_LAYER_SUFFIXES if name.endswith(suffix)
    }
    backbone_configs = {BACKBONE_OF_ROLE[role]: getattr(config, role) for role in record}
    # Linear layers of a quantised backbone that the file holds in full precision (the LM head), or not at all (an
    # LM head tied to the input embeddings): found on the backbone built without weights (meta device).
    full_precision = [name for name in linear_layer_names(backbone_configs) if name not in quantised]
    others = sorted({name.split(".", 1)[0] for name in names} - set(backbone_configs))
    skip = [re.escape(name) for name in (*others, *full_precision)]
    return {**settings[0], "llm_int8_skip_modules": skip}


def linear_layer_names(backbone_configs: dict[str, Any]) -> list[str]:
    """The qualified names of the linear layers of each backbone (attribute -> its config)."""
    from .backbones import build_text_backbone, build_vision_backbone

    build = {"language_model": build_text_backbone, "vision_tower": build_vision_backbone}
    names = []
    for attribute, backbone_config in backbone_configs.items():
        with torch.device("meta"):
            backbone = build[attribute](backbone_config)
        names += [
            f"{attribute}.{n}" for n, module in backbone.named_modules() if isinstance(module, nn.Linear)
        ]
    return names


def weight_names(folder: str) -> list[str]:
    """The tensor names of a full safetensors checkpoint (one file or shards), read without loading tensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return list(json.load(f)["weight_map"])
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        raise LoadingOptionError(
            f"{folder} is a full checkpoint of a quantised backbone without safetensors weights; save it again "
            "with save_pretrained(folder, adapter_only=False) (safetensors), or adapter-only."
        )
    with safe_open(single, framework="pt") as f:
        return list(f.keys())
