"""Hotswapping a LoRA adapter on LaVIN and CROME: transformers' `load_adapter(path, adapter_name=<a loaded one>,
hotswap=True)` and `enable_peft_hotswap(target_rank=...)`.

A hotswap replaces the weights and scalings of a loaded LoRA adapter with another LoRA's in place: the same
parameter tensors, so a model compiled with torch.compile runs the new adapter without recompiling (what PEFT's
`hotswap_adapter` does for a PeftModel). The new adapter must adapt the same layers with the same layer options
(dropout, DoRA, ...). Ranks: a lower-rank adapter fits into layers of a higher rank (zero-padded, which computes the
same). `enable_peft_hotswap(target_rank=R)`, called before the first adapter is loaded, pads every LoRA that
`load_adapter` loads to rank R and keeps its scalings as tensors, so that any LoRA of rank up to R and any alpha
swaps in without recompiling.

Nothing is lost by a swap: the record (`config.peft_adapters`) keeps the loaded adapter's targets and describes
each layer as it now is (its rank, padded or not, and an alpha that gives the scaling in use), so a checkpoint saved
after a swap, or after training the swapped-in adapter, reloads to the same outputs.

Where this differs from transformers 5.24 (by reading its `load_adapter`): there `enable_peft_hotswap` stores
target_rank but nothing pads, and a hotswap copies the weights without updating the scalings (an adapter with
another alpha would run with the old one). The copy is written here rather than taken from PEFT's
`hotswap_adapter_from_state_dict`, which changed across the PEFT releases we support (0.18 swaps the tensor objects,
so a padded layer lost its padding; 0.21 copies).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .peft_on_top import (
    SCOPES,
    PeftAdapter,
    PeftOnTopError,
    peft_adapter_state_dict,
    peft_config_from_dict,
    peft_config_to_dict,
    tuner_layers,
)

logger = logging.get_logger(__name__)

# Set on a model by enable_peft_hotswap (not saved, as in transformers): the rank every loaded LoRA is padded to,
# and what to do where the model is compiled already.
TARGET_RANK_ATTRIBUTE = "_peft_hotswap_target_rank"
CHECK_COMPILED_ATTRIBUTE = "_peft_hotswap_check_compiled"
CHECK_COMPILED_CHOICES = ("error", "warn", "ignore")
# LoRA options that shape a layer (or what it computes besides alpha / rank): a swapped-in adapter must have the
# same ones, since the layers stay as they were built.
LAYER_OPTIONS = (
    "lora_dropout",
    "fan_in_fan_out",
    "use_dora",
    "lora_bias",
    "use_qalora",
    "qalora_group_size",
    "alora_invocation_tokens",
    "layer_replication",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
)
# The two LoRA matrices of a layer as PEFT names them (Linear / Conv layers; Embedding layers).
DOWN_PROJECTIONS = ("lora_A", "lora_embedding_A")


def enable_peft_hotswap(model: nn.Module, target_rank: int, check_compiled: str) -> None:
    """Pad every LoRA that `load_adapter` loads from now on to `target_rank`, with its scalings as tensors (see the
    module docstring). As in transformers, it belongs before the first adapter: with adapters loaded already,
    `check_compiled` says what to do ("error" raises, "warn" warns, "ignore" goes on; those stay unpadded)."""
    if check_compiled not in CHECK_COMPILED_CHOICES:
        raise ValueError(f"check_compiled should be one of {CHECK_COMPILED_CHOICES}, got {check_compiled!r}.")
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
        raise ValueError(
            f"target_rank is the highest LoRA rank you will load, a positive int; got {target_rank!r}."
        )
    loaded = sorted(model.config.peft_adapters or {})
    if loaded and check_compiled == "error":
        raise RuntimeError(
            f"Call enable_peft_hotswap before loading the first adapter: {loaded} are loaded already and are not "
            "padded to target_rank (pass check_compiled='warn' or 'ignore' to go on with them as they are)."
        )
    if loaded and check_compiled == "warn":
        logger.warning(
            f"enable_peft_hotswap after adapters were loaded: {loaded} keep their ranks; only adapters of their "
            "rank or lower swap into them."
        )
    setattr(model, TARGET_RANK_ATTRIBUTE, target_rank)
    setattr(model, CHECK_COMPILED_ATTRIBUTE, check_compiled)


def wants_hotswap(model: nn.Module, adapter_name: str, hotswap: bool | str) -> bool:
    """transformers' rule: `hotswap="auto"` swaps when enable_peft_hotswap was called and an adapter of that name
    is loaded; True always swaps (an adapter of that name must be loaded); False never does."""
    if hotswap == "auto":
        enabled = getattr(model, TARGET_RANK_ATTRIBUTE, None) is not None
        return enabled and adapter_name in (model.config.peft_adapters or {})
    if hotswap not in (True, False):
        raise ValueError(f"hotswap is True, False or 'auto'; got {hotswap!r}.")
    return hotswap


def check_before_padded_load(model: nn.Module, adapter: PeftAdapter) -> None:
    """Before a load while hotswapping is enabled: refuse what could not be padded to the target rank (a higher
    rank; a layer type other than Linear or Embedding) or a model compiled already (`check_compiled`)."""
    target_rank = getattr(model, TARGET_RANK_ATTRIBUTE, None)
    if target_rank is None or _peft_type(adapter.config) != "LORA":
        return
    ranks = {key: value.shape[0] for key, value in adapter.state.items() if _is_down_projection(key)}
    too_high = sorted(key for key, rank in ranks.items() if rank > target_rank)
    if too_high:
        raise PeftOnTopError(
            f"'{adapter.source}' has rank {max(ranks.values())} ({too_high[0]}), above the target_rank "
            f"{target_rank} given to enable_peft_hotswap; call it (on a fresh model) with the highest rank you will "
            "load."
        )
    not_padded = sorted(
        key for key, value in adapter.state.items() if _is_down_projection(key) and value.dim() != 2
    )
    if not_padded:
        raise PeftOnTopError(
            f"enable_peft_hotswap pads LoRA layers on Linear and Embedding modules; '{adapter.source}' also adapts "
            f"{not_padded[0]}. Load it without enable_peft_hotswap (same-rank adapters still hotswap into it)."
        )
    if getattr(model, "_compiled_call_impl", None) is not None:
        how = getattr(model, CHECK_COMPILED_ATTRIBUTE, "error")
        message = "The model is compiled already: padding its LoRA layers now makes it recompile."
        if how == "error":
            raise PeftOnTopError(f"{message} Load the first adapter before model.compile().")
        if how == "warn":
            logger.warning(message)


def pad_loaded_adapter(model: nn.Module, adapter_name: str) -> None:
    """After a load while hotswapping is enabled: pad the adapter's LoRA layers to the target rank (zeros, which
    compute the same) and make its scalings tensors, so that a hotswap changes values only."""
    target_rank = getattr(model, TARGET_RANK_ATTRIBUTE, None)
    entry = (model.config.peft_adapters or {}).get(adapter_name)
    if target_rank is None or entry is None or entry["config"].get("peft_type") != "LORA":
        return
    with torch.no_grad():
        for _, layer in _layers_holding(model, adapter_name):
            for down_name in DOWN_PROJECTIONS:
                down = getattr(layer, down_name, {})
                if adapter_name in down:
                    up = getattr(layer, down_name.replace("_A", "_B"))
                    _pad_rank(down, up, adapter_name, target_rank)
            scaling = layer.scaling[adapter_name]
            if not isinstance(scaling, torch.Tensor):
                layer.scaling[adapter_name] = torch.tensor(float(scaling), device=_device_of(layer))
    _record_layers_as_they_are(model, adapter_name, entry["config"])


def hotswap_lora(model: nn.Module, adapter: PeftAdapter, adapter_name: str, is_trainable: bool) -> None:
    """Put `adapter`'s weights and scalings into the loaded LoRA `adapter_name` in place. Everything is checked
    before anything changes: the name is loaded, both are LoRA with the same layer options, the new adapter adapts
    exactly the same layers with ranks that fit, and the loaded one is not merged."""
    recorded = model.config.peft_adapters or {}
    if adapter_name not in recorded:
        raise PeftOnTopError(
            f"To hotswap an adapter, there must already be an existing adapter with the same adapter name: the "
            f"model has {sorted(recorded) or 'no PEFT adapter'}. Load the first one with "
            f"load_adapter(path, adapter_name={adapter_name!r}) (hotswap=False)."
        )
    not_lora = sorted(name for name, entry in recorded.items() if entry["config"].get("peft_type") != "LORA")
    if not_lora or _peft_type(adapter.config) != "LORA":
        raise PeftOnTopError(
            f"Hotswapping is supported for LoRA only (the model has non-LoRA adapters {not_lora}; "
            f"'{adapter.source}' is {_peft_type(adapter.config)}). Load it with hotswap=False under another name."
        )
    loaded = peft_config_from_dict(recorded[adapter_name]["config"])
    differing = [
        option
        for option in LAYER_OPTIONS
        if getattr(loaded, option, None) != getattr(adapter.config, option, None)
    ]
    if differing:
        raise PeftOnTopError(
            f"'{adapter.source}' cannot be hotswapped into {adapter_name!r}: their LoRA layers differ in "
            f"{differing}. Load it with hotswap=False under another name."
        )
    if getattr(adapter.config, "use_dora", False):
        raise PeftOnTopError("Hotswapping DoRA adapters is not supported (PEFT swaps plain LoRA only).")
    layers = dict(_layers_holding(model, adapter_name))
    merged = sorted(name for name, layer in layers.items() if adapter_name in layer.merged_adapters)
    if merged:
        raise PeftOnTopError(
            f"Adapter {adapter_name!r} is merged into the weights of {merged[0]}: unmerge it before a hotswap."
        )
    new_state = _relative_to_model(adapter)
    current = peft_adapter_state_dict(model, adapter_name, model.state_dict())
    missing, unexpected = sorted(set(current) - set(new_state)), sorted(set(new_state) - set(current))
    if missing or unexpected:
        raise PeftOnTopError(
            f"'{adapter.source}' adapts other layers than {adapter_name!r} (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); a hotswap keeps the layers. Load it with hotswap=False under another name."
        )
    for key, value in new_state.items():
        if not _fits(value.shape, current[key].shape):
            raise PeftOnTopError(
                f"'{adapter.source}' does not fit {adapter_name!r}: {key} is {tuple(value.shape)}, the layer holds "
                f"{tuple(current[key].shape)}. A higher rank fits where the layers were padded: call "
                "model.enable_peft_hotswap(target_rank=...) before the first load_adapter (add_adapter does not pad)."
            )

    new_values = peft_config_to_dict(adapter.config)
    scope_prefix = f"{adapter.scope}." if adapter.scope else ""
    # alpha_pattern is matched against a layer's name in the module the adapter was trained on
    scalings = {
        name: _scaling(new_values, name.removeprefix(scope_prefix), _rank_in(new_state, name))
        for name in layers
    }

    # Checked: from here on nothing fails.
    with torch.no_grad():
        for key, value in new_state.items():
            parameter = model.get_parameter(_module_key(key, adapter_name))
            parameter.zero_()
            parameter[tuple(slice(0, size) for size in value.shape)].copy_(value)
        for name, layer in layers.items():
            if isinstance(layer.scaling[adapter_name], torch.Tensor):
                layer.scaling[adapter_name].fill_(scalings[name])
            else:
                layer.scaling[adapter_name] = scalings[name]
    values = peft_config_to_dict(loaded)
    values["use_rslora"] = bool(getattr(adapter.config, "use_rslora", False))
    values["inference_mode"] = not is_trainable
    _record_layers_as_they_are(model, adapter_name, values)
    model._thaw_peft_layers()


def record_lora_scalings(model: nn.Module) -> None:
    """Before a save: bring the record of each LoRA adapter to its layers where they differ from what the record
    would build (a rank or a scaling). PEFT's own `hotswap_adapter` on a PeftModel around ours changes a LoRA's
    weights and scalings without telling the record; saved as it was, the checkpoint reloaded with the old alpha."""
    for adapter_name, entry in (model.config.peft_adapters or {}).items():
        values = entry["config"]
        if values.get("peft_type") != "LORA":
            continue
        if any(
            _described_differently(values, _name_where_injected(name, entry["on"]), layer, adapter_name)
            for name, layer in _layers_holding(model, adapter_name)
        ):
            _record_layers_as_they_are(model, adapter_name, values)


# --- helpers -----------------------------------------------------------------------------------------------------


def _peft_type(config: Any) -> str:
    peft_type = getattr(config, "peft_type", None)
    return getattr(peft_type, "value", peft_type)


def _is_down_projection(key: str) -> bool:
    return any(f".{name}." in f"{key}." for name in DOWN_PROJECTIONS)


def _layers_holding(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """The LoRA layers (names relative to the model) that hold `adapter_name`."""
    return [
        (name, layer)
        for name, layer in tuner_layers(model)
        if hasattr(layer, "scaling") and adapter_name in layer.scaling
    ]


def _device_of(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device


def _pad_rank(down: Any, up: Any, adapter_name: str, target_rank: int) -> None:
    """Pad one adapter's LoRA matrices to `target_rank` in place: rows of the down projection, columns of the up
    projection, zeros (so the layer computes what it did). nn.Linear pieces (Linear layers) or bare parameters
    (Embedding layers)."""
    down_item, up_item = down[adapter_name], up[adapter_name]
    down_weight = down_item.weight if isinstance(down_item, nn.Module) else down_item
    up_weight = up_item.weight if isinstance(up_item, nn.Module) else up_item
    rank = down_weight.shape[0]
    if rank == target_rank:
        return
    padded_down = down_weight.new_zeros(target_rank, down_weight.shape[1])
    padded_down[:rank] = down_weight
    padded_up = up_weight.new_zeros(up_weight.shape[0], target_rank)
    padded_up[:, :rank] = up_weight
    if isinstance(down_item, nn.Module):
        down_item.weight = nn.Parameter(padded_down, requires_grad=down_weight.requires_grad)
        down_item.out_features = target_rank
        up_item.weight = nn.Parameter(padded_up, requires_grad=up_weight.requires_grad)
        up_item.in_features = target_rank
    else:
        down[adapter_name] = nn.Parameter(padded_down, requires_grad=down_weight.requires_grad)
        up[adapter_name] = nn.Parameter(padded_up, requires_grad=up_weight.requires_grad)


def _relative_to_model(adapter: PeftAdapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed relative to our model (as `peft_adapter_state_dict` keys ours)."""
    if adapter.scope not in ("", *SCOPES["both"]):
        raise PeftOnTopError(f"A hotswap loads into one place: on={adapter.scope!r} is not one.")
    prefix = f"{adapter.scope}." if adapter.scope else ""
    return {prefix + key: value for key, value in adapter.state.items()}


def _fits(new: torch.Size, held: torch.Size) -> bool:
    """The same shape, or smaller in one dimension only (the rank, where the layer is padded)."""
    return (
        len(new) == len(held)
        and all(n <= h for n, h in zip(new, held, strict=True))
        and (sum(n != h for n, h in zip(new, held, strict=True)) <= 1)
    )


def _module_key(saved_key: str, adapter_name: str) -> str:
    """PEFT's saved key of a LoRA tensor ("...q_proj.lora_A.weight") as the layer's parameter name, which holds the
    adapter name ("...q_proj.lora_A.default.weight"; an Embedding layer's "...lora_embedding_A.default")."""
    head, _, tail = saved_key.rpartition(".lora_")
    piece, _, rest = tail.partition(".")
    return f"{head}.lora_{piece}.{adapter_name}" + (f".{rest}" if rest else "")


def _rank_in(state: dict[str, torch.Tensor], layer_name: str) -> int:
    for down_name in DOWN_PROJECTIONS:
        for key in (f"{layer_name}.{down_name}.weight", f"{layer_name}.{down_name}"):
            if key in state:
                return state[key].shape[0]
    raise PeftOnTopError(f"No LoRA down projection for {layer_name} in the adapter.")


def _pattern_value(pattern: dict[str, Any] | None, name: str, default: Any) -> Any:
    """A LoRA config's `rank_pattern` / `alpha_pattern` entry for the layer `name`, matched as PEFT matches it."""
    from peft.utils.other import get_pattern_key

    pattern = pattern or {}
    return pattern.get(get_pattern_key(pattern.keys(), name), default)


def _scaling(values: dict[str, Any], name: str, rank: int) -> float:
    """The scaling PEFT gives the layer `name` of a LoRA config (`values`, as a dict) at `rank`: alpha / rank, or
    alpha / sqrt(rank) with rsLoRA, alpha taken from `alpha_pattern` where it names the layer."""
    alpha = _pattern_value(values.get("alpha_pattern"), name, values["lora_alpha"])
    return alpha / math.sqrt(rank) if values.get("use_rslora") else alpha / rank


def _record_layers_as_they_are(model: nn.Module, adapter_name: str, values: dict[str, Any]) -> None:
    """Record `adapter_name` with `values` (its PEFT config as a dict: the targets and layer options) and the rank
    and alpha of each layer as it is now (padded rank; alpha such that alpha / rank, or alpha / sqrt(rank), is the
    scaling in use), so that a load builds the same layers with the same scalings. The most common rank and alpha
    become `r` and `lora_alpha`; the other layers get exact-name entries in `rank_pattern` / `alpha_pattern`."""
    entry = model.config.peft_adapters[adapter_name]
    rslora = bool(values.get("use_rslora"))
    ranks, alphas = {}, {}
    for name, layer in _layers_holding(model, adapter_name):
        rank = _rank_of(layer, adapter_name)
        scaling = float(layer.scaling[adapter_name])
        alpha = scaling * (math.sqrt(rank) if rslora else rank)
        alpha = round(alpha) if abs(alpha - round(alpha)) < 1e-9 else alpha
        injected = _name_where_injected(name, entry["on"])
        ranks[injected], alphas[injected] = rank, alpha
    values = dict(values)
    values["r"] = Counter(ranks.values()).most_common(1)[0][0]
    values["lora_alpha"] = Counter(alphas.values()).most_common(1)[0][0]
    values["rank_pattern"] = {re.escape(n): r for n, r in ranks.items() if r != values["r"]}
    values["alpha_pattern"] = {re.escape(n): a for n, a in alphas.items() if a != values["lora_alpha"]}
    model.config.peft_adapters[adapter_name] = {**entry, "config": values}


def _described_differently(values: dict[str, Any], name: str, layer: nn.Module, adapter_name: str) -> bool:
    """Whether the recorded config (`values`) would build this layer (`name` relative to where it was injected)
    with another rank or scaling than it has."""
    rank = _pattern_value(values.get("rank_pattern"), name, values["r"])
    return _rank_of(layer, adapter_name) != rank or not math.isclose(
        float(layer.scaling[adapter_name]), _scaling(values, name, rank), rel_tol=1e-9
    )


def _rank_of(layer: nn.Module, adapter_name: str) -> int:
    down = layer.lora_A if adapter_name in layer.lora_A else layer.lora_embedding_A
    item = down[adapter_name]
    return (item.weight if isinstance(item, nn.Module) else item).shape[0]


def _name_where_injected(name: str, on: str) -> str:
    """A layer's name relative to the module its adapter was injected into (the model, or a backbone)."""
    for scope in SCOPES.get(on, ("",)):
        if scope and name.startswith(f"{scope}."):
            return name[len(scope) + 1 :]
    return name
