"""Quantised backbones in a full checkpoint (every weight saved, `save_pretrained(adapter_only=False)`).

transformers' loader applies one quantisation to a whole model: the one the text sub-config records, or the
`quantization_config` keyword. For our models that quantised the vision tower and our trainable modules too (and an
LM head tied to the embeddings), and the first forward failed inside bitsandbytes. `scoped_quantization` gives the
loader the quantisation with everything outside the quantised backbone(s) listed as not to be converted, for both
cases:
- recorded (LaVIN-lite saved with every weight): the file holds the quantised backbone's weights as bitsandbytes
  stores them (4-bit: `<layer>.weight` with `<layer>.weight.absmax` and the rest of its quantisation state beside
  it; 8-bit: `<layer>.weight` and `<layer>.SCB`); the layers without that state stay in full precision;
- requested (`from_pretrained(full_checkpoint, quantization_config=...)`, one config for both backbones or a dict
  keyed by `text_config` / `vision_config`, as for adapter-only checkpoints): the backbone's linear layers are
  quantised as transformers would quantise that backbone alone (its LM head kept in full precision).
Both are bitsandbytes only (its `llm_int8_skip_modules` scopes them); other methods are refused for full checkpoints.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .loading import ROLES, LoadingOptionError, per_role

# The state-dict suffixes by which bitsandbytes marks a quantised layer (4-bit, 8-bit).
QUANTISED_LAYER_SUFFIXES = (".weight.absmax", ".SCB")
# A role's backbone attribute (also its state-dict prefix).
BACKBONE_OF_ROLE = {"text": "language_model", "vision": "vision_tower"}


def scoped_quantization(folder: str, config: Any, requested: Any) -> tuple[dict[str, Any] | None, Any]:
    """(the `backbone_quantization` record of the loaded model, the quantization config to load `folder` with:
    a dict for a pre-quantised checkpoint, set on its config; a config object for a requested one, passed as
    `quantization_config`); (None, None) when no backbone is quantised."""
    recorded = getattr(config, "backbone_quantization", None) or {}
    if recorded and requested is not None:
        raise LoadingOptionError(
            f"{folder} holds backbone weights quantised already ({sorted(recorded)}); load it without "
            "quantization_config, or quantise the adapter-only checkpoint of this model instead."
        )
    if requested is not None:
        record = {
            f"{role}_config": value if isinstance(value, dict) else value.to_dict()
            for role, value in per_role(requested, "quantization_config").items()
            if value is not None
        }
    else:
        record = dict(recorded)
    if not record:
        return None, None
    settings = _one_bitsandbytes_setting(folder, record)
    backbone_configs = {
        BACKBONE_OF_ROLE[role]: getattr(config, f"{role}_config")
        for role in ROLES
        if f"{role}_config" in record
    }
    names = weight_names(folder)
    linear_layers, heads = _linear_layers_and_heads(backbone_configs)
    if recorded:  # the layers the file holds quantised
        quantised = {
            name[: -len(suffix)]
            for name in names
            for suffix in QUANTISED_LAYER_SUFFIXES
            if name.endswith(suffix)
        }
    else:  # as transformers quantises a backbone alone: every linear layer but its LM head
        quantised = set(linear_layers) - set(heads)
    full_precision = [name for name in linear_layers if name not in quantised]
    others = sorted({name.split(".", 1)[0] for name in names} - set(backbone_configs))
    skip = [re.escape(name) for name in (*others, *full_precision)]
    if recorded:
        return record, {**settings, "llm_int8_skip_modules": skip}
    from transformers.quantizers.auto import AutoQuantizationConfig

    return record, AutoQuantizationConfig.from_dict({**settings, "llm_int8_skip_modules": skip})


def _one_bitsandbytes_setting(folder: str, record: dict[str, Any]) -> dict[str, Any]:
    settings = list({json.dumps(value, sort_keys=True): value for value in record.values()}.values())
    if len(settings) > 1:
        raise LoadingOptionError(
            f"{folder} is a full checkpoint and its backbones are quantised differently ({sorted(record)}); "
            "transformers loads one quantisation per model. Use the adapter-only checkpoint of this model."
        )
    if settings[0].get("quant_method") != "bitsandbytes":
        raise LoadingOptionError(
            f"{folder} is a full checkpoint, and its backbones can be quantised by bitsandbytes only (got "
            f"{settings[0].get('quant_method')}); use the adapter-only checkpoint of this model."
        )
    return {key: value for key, value in settings[0].items() if key != "llm_int8_skip_modules"}


def _linear_layers_and_heads(backbone_configs: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The qualified names of each backbone's linear layers, and of its output head (the LM head), found on the
    backbone built without weights (meta device)."""
    from .backbones import build_text_backbone, build_vision_backbone

    build = {"language_model": build_text_backbone, "vision_tower": build_vision_backbone}
    linear_layers, heads = [], []
    for attribute, backbone_config in backbone_configs.items():
        with torch.device("meta"):
            backbone = build[attribute](backbone_config)
        head = backbone.get_output_embeddings() if hasattr(backbone, "get_output_embeddings") else None
        for name, module in backbone.named_modules():
            if isinstance(module, nn.Linear):
                linear_layers.append(f"{attribute}.{name}")
                if module is head:
                    heads.append(f"{attribute}.{name}")
    return linear_layers, heads


def weight_names(folder: str) -> list[str]:
    """The tensor names of a full safetensors checkpoint (one file or shards), read without loading tensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return list(json.load(f)["weight_map"])
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        raise LoadingOptionError(
            f"{folder} is a full checkpoint without safetensors weights, which quantised backbones need here; "
            "save it again with save_pretrained(folder, adapter_only=False) (safetensors), or adapter-only."
        )
    with safe_open(single, framework="pt") as f:
        return list(f.keys())
