"""Loading a full checkpoint of a model whose backbone(s) were quantised (LaVIN-lite saved with every weight).

The file holds the quantised backbone's weights as bitsandbytes stores them (4-bit: `<layer>.weight` with
`<layer>.weight.absmax` and the rest of its quantisation state beside it; 8-bit: `<layer>.weight` and `<layer>.SCB`),
and everything else in full precision. transformers' loader takes the quantisation from the text sub-config and
applies it to the whole model: the other backbone and our trainable modules were quantised too, and the first
forward failed inside bitsandbytes. `scoped_quantization_config` gives the loader the same quantisation with every
module the file holds in full precision listed as not to be converted.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from safetensors import safe_open

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
    quantised_backbones = {BACKBONE_OF_ROLE[role] for role in record}
    full_precision = sorted(
        {
            name.rsplit(".", 1)[0]
            for name in names
            if name.split(".", 1)[0] in quantised_backbones and name.endswith(".weight")
        }
        - quantised
    )
    others = sorted({name.split(".", 1)[0] for name in names} - quantised_backbones)
    return {**settings[0], "llm_int8_skip_modules": [re.escape(name) for name in (*others, *full_precision)]}


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
