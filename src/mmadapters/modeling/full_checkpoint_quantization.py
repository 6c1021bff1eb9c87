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

import copy
import json
import os
import re
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .loading import ROLES, LoadingOptionError, per_role, quantization_as_dict

# The state-dict suffixes by which bitsandbytes marks a quantised layer (4-bit, 8-bit).
QUANTISED_LAYER_SUFFIXES = (".weight.absmax", ".SCB")
# A role's backbone attribute (also its state-dict prefix).
BACKBONE_OF_ROLE = {"text": "language_model", "vision": "vision_tower"}


def scoped_quantization(
    folder: str, config: Any, requested: Any, model_class: type
) -> tuple[dict[str, Any] | None, Any]:
    """(the `backbone_quantization` record of the loaded model, the quantization config to load `folder` with:
    a dict for a pre-quantised checkpoint, set on its config; a config object for a requested one, passed as
    `quantization_config`); (None, None) when no backbone is quantised. `model_class` builds the model that will
    load (on the meta device, without weights) to find its layers."""
    recorded = getattr(config, "backbone_quantization", None) or {}
    if recorded and requested is not None:
        raise LoadingOptionError(
            f"{folder} holds backbone weights quantised already ({sorted(recorded)}); load it without "
            "quantization_config, or quantise the adapter-only checkpoint of this model instead."
        )
    if requested is not None:
        record = {
            f"{role}_config": quantization_as_dict(value)
            for role, value in per_role(requested, "quantization_config").items()
            if value is not None
        }
    else:
        record = dict(recorded)
    if not record:
        return None, None
    settings = _one_bitsandbytes_setting(folder, record)
    backbones = [BACKBONE_OF_ROLE[role] for role in ROLES if f"{role}_config" in record]
    names = weight_names(folder)
    linear_layers, kept = _linear_layers_and_heads(model_class, config, backbones)
    if recorded:  # the layers the file holds quantised
        quantised = {
            name[: -len(suffix)]
            for name in names
            for suffix in QUANTISED_LAYER_SUFFIXES
            if name.endswith(suffix)
        }
    else:  # as transformers quantises a backbone alone: every linear layer but its LM head (and PEFT's own)
        quantised = set(linear_layers) - set(kept)
    full_precision = [name for name in linear_layers if name not in quantised]
    others = sorted({name.split(".", 1)[0] for name in names} - set(backbones))
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


def _linear_layers_and_heads(
    model_class: type, config: Any, backbones: list[str]
) -> tuple[list[str], list[str]]:
    """The qualified names of the linear layers of the `backbones` as the model builds them (with the PEFT layers
    recorded in the config), and of those never to quantise: the LM head and the PEFT adapters' own layers (e.g.
    `lora_A`). Found on the model built without weights (meta device)."""
    from .peft_on_top import peft_state_prefixes

    with torch.device("meta"):
        model = model_class(copy.deepcopy(config))
    peft_layers = tuple(prefix.rstrip(".") for prefix in peft_state_prefixes(model))
    head = model.language_model.get_output_embeddings()
    linear_layers, kept = [], []
    for backbone in backbones:
        for name, module in getattr(model, backbone).named_modules(prefix=backbone):
            if isinstance(module, nn.Linear):
                linear_layers.append(name)
                if module is head or (peft_layers and name.startswith(peft_layers)):
                    kept.append(name)
    return linear_layers, kept


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


def hand_quantization_to_backbones(model: nn.Module, record: dict[str, Any]) -> None:
    """After a full checkpoint loaded with quantised backbones: transformers' loader marked the whole model
    quantised (`hf_quantizer`, `is_quantized`, `quantization_method` and the top-level `quantization_config` on the
    LaVIN/CROME model), but only the backbones are. Move the marks to the backbones, as each carries them when
    loaded by itself, so that the model is the same as one built by `from_backbones` or from an adapter-only
    checkpoint: the Trainer sees trainable adapters around quantised backbones (it refused "a purely quantized
    model"), `language_model.dequantize()` (used by `mmadapters merge`) finds its quantizer, and the model saves
    again with every weight."""
    from transformers.quantizers.auto import AutoHfQuantizer, AutoQuantizationConfig

    for role in ROLES:
        settings = record.get(f"{role}_config")
        if settings is None:
            continue
        backbone = getattr(model, BACKBONE_OF_ROLE[role])
        quantization = AutoQuantizationConfig.from_dict(dict(settings))
        backbone.config.quantization_config = quantization
        backbone.hf_quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=True)
        backbone.is_quantized = True
        backbone.quantization_method = quantization.quant_method
        setattr(backbone, "is_loaded_in_4bit" if quantization.load_in_4bit else "is_loaded_in_8bit", True)
    # transformers' loader keeps the conversions it read the weights with, to undo them at the next full save. The
    # quantizer's own (bitsandbytes' saved state into quantised layers) have no undo: the save raised
    # NotImplementedError (as it does for a transformers model loaded pre-quantised, in 5.24). None is needed: a
    # quantised layer's state dict is in the saved form already.
    quantizer_patterns = [c.source_patterns for c in model.hf_quantizer.get_weight_conversions()]
    model._weight_conversions = [
        conversion
        for conversion in getattr(model, "_weight_conversions", None) or []
        if conversion.source_patterns not in quantizer_patterns
    ]
    # The model's own `is_loaded_in_4bit` / `is_loaded_in_8bit` are read from the backbones' weights.
    model.hf_quantizer = None
    model.is_quantized = False
    model.__dict__.pop("quantization_method", None)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
