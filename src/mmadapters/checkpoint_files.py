"""The files of an adapter-only checkpoint, and how a folder is recognised (ours, PEFT's, or neither).

An adapter-only checkpoint is `config.json` (the model's config: backbones, adapter settings, LoRA-on-top
record), `generation_config.json` and `mmadapters_model.safetensors` (every trained tensor: our adapters and any
PEFT layers on the backbones).

Why not PEFT's names (`adapter_config.json` / `adapter_model.safetensors`, which mmadapters 0.1 wrote): a
`PeftModel.save_pretrained` into one of our folders overwrote them, and transformers' Auto classes and PEFT's
loaders took our folders for PEFT adapters of a method they do not know. With distinct names a PEFT adapter and
ours can share a folder without harm, and each loader says clearly what it was given. Checkpoints written with
the old names still load (`adapter_weights_file`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

from .errors import MMAdaptersError
from .method_names import METHOD_NAMES

ADAPTER_WEIGHTS_NAME = "mmadapters_model.safetensors"
# PEFT's file names (what PeftModel.save_pretrained writes; safetensors, or a pickle from old PEFT versions).
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# mmadapters 0.1 wrote PEFT's names (our settings in adapter_config.json); read, never written.
LEGACY_ADAPTER_WEIGHTS_NAME = PEFT_WEIGHTS_NAMES[0]
# Our adapter methods as PEFT-style `peft_type`s in the legacy adapter_config.json.
OUR_PEFT_TYPES = ("MMA", "CROME")
# Name parts of PEFT layers' own tensors (LoRA, LoHa, LoKr, IA3, OFT, BOFT, VeRA, DoRA's magnitude): in our adapter
# file they are adapter tensors (LoRA on top), even under `language_model.` / `vision_tower.`.
PEFT_TENSOR_PARTS = ("lora_", "hada_", "lokr_", "ia3_", "oft_", "boft_", "vera_")


def is_peft_tensor_name(name: str) -> bool:
    """Whether a state-dict key names a tensor of a PEFT layer (trained, saved with the adapters)."""
    return any(part.startswith(PEFT_TENSOR_PARTS) for part in name.split("."))


def adapter_weights_file(folder: str) -> str | None:
    """The adapter weights of the checkpoint in `folder` (current or legacy name), or None."""
    current = os.path.join(folder, ADAPTER_WEIGHTS_NAME)
    if os.path.isfile(current):
        return current
    legacy = os.path.join(folder, LEGACY_ADAPTER_WEIGHTS_NAME)
    if os.path.isfile(legacy) and peft_type_of(folder) in (None, *OUR_PEFT_TYPES):
        return legacy
    return None


def _peft_config_of(folder: str) -> dict:
    """The folder's adapter_config.json as a dict ({} when there is none or it cannot be read)."""
    path = os.path.join(folder, PEFT_CONFIG_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def peft_type_of(folder: str) -> str | None:
    """The `peft_type` named by the folder's adapter_config.json (None: no such file or no such field)."""
    value = _peft_config_of(folder).get("peft_type")
    return str(value) if value is not None else None


def peft_base_model(folder: str) -> dict[str, str | None] | None:
    """The base model a PEFT adapter folder names (`name_or_path` and `revision` from its adapter_config.json);
    None when it names none (PEFT records none for a model built from configs)."""
    config = _peft_config_of(folder)
    if not config.get("base_model_name_or_path"):
        return None
    return {"name_or_path": config["base_model_name_or_path"], "revision": config.get("revision")}


def is_peft_adapter_folder(folder: str) -> bool:
    """Whether `folder` holds a PEFT adapter (an adapter_config.json of a PEFT method, not one of ours)."""
    peft_type = peft_type_of(folder)
    return peft_type is not None and peft_type not in OUR_PEFT_TYPES


def replaced_by_adapter_save(folder: str) -> Callable[[str], bool]:
    """Which of `folder`'s files a model save replaces: ours (weights and the files describing them, legacy names
    included), but never a PEFT adapter saved into the same folder (its adapter_config.json and weights stay)."""
    from .atomic import replaced_by_model_save

    peft_files = (PEFT_CONFIG_NAME, *PEFT_WEIGHTS_NAMES)
    keep_peft = is_peft_adapter_folder(folder)

    def replaces(name: str) -> bool:
        if name in peft_files:
            return not keep_peft
        return replaced_by_model_save(name)

    return replaces


# What transformers' own `save_pretrained` writes for a full checkpoint (single file or shards, safetensors or pickle).
FULL_WEIGHTS_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointKindError(MMAdaptersError, ValueError):
    """A checkpoint of another kind than the class asked to load it (another method, or not ours at all);
    `found` is the model_type its config.json names (None: none)."""

    def __init__(self, message: str, found: str | None = None) -> None:
        super().__init__(message)
        self.found = found


class MissingWeightsError(MMAdaptersError, ValueError):
    """A checkpoint does not hold every weight of the model it builds: transformers would initialise the rest at
    random and only report it."""


def refuse_missing_weights(
    what: str,
    model_class: type,
    missing_keys: Iterable[str],
    fix: str,
    error_class: type[MissingWeightsError] = MissingWeightsError,
) -> None:
    """Refuse a load whose checkpoint (`what` names it) lacks some of `model_class`'s weights, naming the first few."""
    missing = sorted(missing_keys)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise error_class(
            f"{what} does not hold every weight of {model_class.__name__}: {shown} would be random. {fix}"
        )


def check_checkpoint_kind(name: str, config: dict | None, model_type: str) -> None:
    """Refuse a checkpoint whose config.json (`config`, None: none) is of another model type than `model_type`.

    transformers only warns when a config.json of another model type is loaded, and then builds the model from
    that type's defaults: for us a random paper-size LLM and vision tower (tens of gigabytes) when someone passes a
    backbone's folder or repo where a checkpoint belongs. Refused here, before anything is built or downloaded."""
    found = None if config is None else config.get("model_type")
    if config is None or found == model_type:
        return
    method_name = METHOD_NAMES[model_type].name
    if found in METHOD_NAMES:
        raise CheckpointKindError(
            f"'{name}' is a {METHOD_NAMES[found].name} checkpoint (config.json: model_type '{found}'), not a "
            f"{method_name} one. Load it with AutoModelForImageTextToText / AutoProcessor.from_pretrained('{name}'), "
            "which pick the right classes.",
            found=found,
        )
    what = f"a '{found}' model" if found else "a config.json without a model_type"
    raise CheckpointKindError(
        f"'{name}' holds {what}, not a {method_name} checkpoint (the folder that `save_pretrained` wrote). To "
        f"build {method_name} around a backbone, pass it to `from_backbones` as text_model= or vision_model=.",
        found=found,
    )


def incomplete_checkpoint_message(name: str, folder: str) -> str | None:
    """Why a folder with a config.json cannot load (None: it has weights, or no config.json): no adapter file and
    no full weights, e.g. a copy or download that stopped after config.json."""
    if not os.path.isfile(os.path.join(folder, "config.json")) or adapter_weights_file(folder) is not None:
        return None
    if any(os.path.isfile(os.path.join(folder, f)) for f in FULL_WEIGHTS_NAMES):
        return None
    return (
        f"'{name}' has a config.json but no weights: neither {ADAPTER_WEIGHTS_NAME} (an adapter-only checkpoint) "
        "nor model.safetensors (a full one). The folder is incomplete: save the model again, or copy or download "
        "the whole checkpoint again."
    )


def not_our_checkpoint_message(name: str, folder: str) -> str:
    """Why `folder` is not an mmadapters checkpoint, and what to do instead (a PEFT adapter is named as such)."""
    if is_peft_adapter_folder(folder):
        return (
            f"'{name}' is a PEFT adapter ({peft_type_of(folder)}), not an mmadapters checkpoint: load it onto a "
            f"LaVIN or CROME model with `model.load_adapter('{name}')`, "
            "or onto its base model with `peft.PeftModel.from_pretrained(base_model, ...)`."
        )
    return (
        f"'{name}' holds no {ADAPTER_WEIGHTS_NAME} and no full set of weights (model.safetensors): it is not a "
        "checkpoint that mmadapters or transformers wrote. Pass the folder that `model.save_pretrained` wrote."
    )


__all__ = [
    "ADAPTER_WEIGHTS_NAME",
    "CheckpointKindError",
    "check_checkpoint_kind",
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAMES",
    "LEGACY_ADAPTER_WEIGHTS_NAME",
    "FULL_WEIGHTS_NAMES",
    "adapter_weights_file",
    "incomplete_checkpoint_message",
    "MissingWeightsError",
    "refuse_missing_weights",
    "is_peft_adapter_folder",
    "not_our_checkpoint_message",
    "peft_base_model",
]
