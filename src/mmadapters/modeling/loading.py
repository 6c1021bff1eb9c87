"""How the loading keywords of transformers' `from_pretrained` reach the two frozen backbones of our models.

`LavinForConditionalGeneration` and `CromeForConditionalGeneration` are built around two backbones loaded
separately (an LLM and a vision tower) plus a small trainable side. Every keyword that
`PreTrainedModel.from_pretrained` accepts is either honoured here or refused with a message that says why;
unknown keywords raise `TypeError`, as in transformers:

- per backbone: `dtype` (`torch_dtype`), `attn_implementation` and `experts_implementation` (mixture-of-experts
  LLMs), each a string or a dict keyed by `text_config` / `vision_config` as transformers' composite models take
  it (a full checkpoint loads in one dtype: `one_dtype`; "auto" of an adapter-only checkpoint is the dtype each
  backbone was saved in), `quantization_config` (one config for both backbones, or such a dict; our trainable
  modules are never quantised), the Hub keywords (`token`,
  `cache_dir`, `local_files_only`, `force_download`, `proxies`), `use_safetensors`, `trust_remote_code`,
  `weights_only`, `disable_mmap`, `offload_buffers`, `output_loading_info` (the backbones' loading info under
  their names in the model: `BackboneLoadOptions.composite_loading_info`);
- placement: `device_map` ("auto"/"balanced"/"balanced_low_0"/"sequential", a device, or a dict over the
  composite's module names such as `{"language_model": 0, "vision_tower": "cpu", ...}`), `max_memory`,
  `offload_folder`. The composite map is computed once on a meta copy of the whole model, so accelerate can
  split a 7B LLM across devices without cutting a decoder layer (`_no_split_modules` come from the backbones),
  then split per backbone; each adapter is placed on the device where its layer runs (see
  `FrozenBackbonesPreTrainedModel._follow_backbone_devices`).

Hub kernels stay off: each backbone loads with `use_kernels=False` (transformers 5.25 turns them on by default).

A PEFT adapter comes after the model, as in transformers (`PeftAdapterToLoad`): `from_pretrained` of a PEFT
adapter folder or repo loads the base model its adapter_config.json names, then the adapter (`adapter_name`);
transformers' Auto classes and pipelines pass it as `adapter_kwargs`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import MMAdaptersError

ROLES = ("text", "vision")
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

# Passed unchanged to both backbones' `from_pretrained` (and, for the Hub ones, to config/revision lookups).
HUB_KEYWORDS = ("token", "cache_dir", "local_files_only", "force_download", "proxies")
PASS_THROUGH = HUB_KEYWORDS + (
    "use_safetensors",
    "trust_remote_code",
    "weights_only",
    "disable_mmap",
    "tqdm_class",
)
# Accepted and without effect, as in transformers 5 itself (loading is always low-memory there).
NO_EFFECT = ("low_cpu_mem_usage", "offload_state_dict", "mirror", "_fast_init")
# Set by transformers' Auto classes and pipelines on the way in: not for us.
INTERNAL = ("_from_auto", "_from_pipeline", "_commit_hash")
# Accepted by transformers but not meaningful for a model assembled from two separately loaded backbones.
REFUSED = {
    "gguf_file": "load the GGUF LLM with AutoModelForCausalLM.from_pretrained(..., gguf_file=...) and pass the "
    "loaded model to from_backbones(text_model=...)",
    "tp_plan": "tensor parallelism would cut through the adapters' hooks; use device_map or FSDP instead",
    "tp_size": "tensor parallelism would cut through the adapters' hooks; use device_map or FSDP instead",
    "distributed_config": "tensor/pipeline parallelism is not supported; use device_map or FSDP instead",
    "device_mesh": "tensor parallelism is not supported; use device_map or FSDP instead",
    "use_kernels": "Hub kernels would replace the backbone layers our adapters hook into",
    "kernel_config": "Hub kernels would replace the backbone layers our adapters hook into",
    "allow_all_kernels": "Hub kernels would replace the backbone layers our adapters hook into",
    "kernels_mode": "Hub kernels would replace the backbone layers our adapters hook into",
    "fusion_config": "fused backbone layers would bypass the adapters' hooks",
    "key_mapping": "the backbones load with their own checkpoint keys; rename keys in the backbone checkpoints",
    "subfolder": "point text_model= / vision_model= at the backbone folders instead",
    "variant": "point text_model= / vision_model= at the backbone variant folders instead",
    "adapter_name": "it names the PEFT adapter that from_pretrained loads from a PEFT adapter folder; add PEFT "
    "adapters to a model built here with model.load_adapter(..., adapter_name=...)",
    "adapter_kwargs": "it goes with a PEFT adapter that from_pretrained loads; add PEFT adapters to a model built "
    "here with model.load_adapter(...)",
    "ignore_mismatched_sizes": "adapter weights of another shape belong to another model: they are refused",
    "state_dict": "pass adapter weights with model.load_adapter_state_dict(...) after loading",
}


class LoadingOptionError(MMAdaptersError, ValueError):
    """A loading keyword that our models cannot honour."""


# transformers' `adapter_kwargs` that reach the adapter's download (the Auto classes set `revision` and `token`);
# `subfolder` is the adapter's folder inside the repo. huggingface_hub 1.0 dropped `proxies` (set HTTPS_PROXY).
PEFT_ADAPTER_KWARGS = ("revision", "token", "cache_dir", "force_download", "local_files_only", "subfolder")


@dataclass
class PeftAdapterToLoad:
    """A PEFT adapter (a folder or repo that `PeftModel.save_pretrained` wrote) that `from_pretrained` loads onto
    the model after the model itself, as transformers' `from_pretrained` does: `path` is named by transformers'
    Auto classes and pipelines (`adapter_kwargs["_adapter_model_path"]`, after they loaded the adapter's base
    model), found in the checkpoint folder (a PEFT adapter saved beside the model) or given directly (a PEFT
    adapter folder whose base model is our checkpoint). `adapter_name` names it ("default" unless given)."""

    path: str | None = None
    adapter_name: str | None = None
    adapter_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> PeftAdapterToLoad:
        """Take transformers' adapter keywords out of `from_pretrained`'s `kwargs`; unsupported ones are refused."""
        adapter_kwargs = dict(kwargs.pop("adapter_kwargs", None) or {})
        path = adapter_kwargs.pop("_adapter_model_path", None) or kwargs.pop("_adapter_model_path", None)
        unsupported = sorted(set(adapter_kwargs) - set(PEFT_ADAPTER_KWARGS))
        if unsupported:
            raise LoadingOptionError(
                f"adapter_kwargs {unsupported} are not supported: the PEFT adapter's download takes "
                f"{list(PEFT_ADAPTER_KWARGS)}."
            )
        return cls(path and os.fspath(path), kwargs.pop("adapter_name", None), adapter_kwargs)

    def transformers_keywords(self) -> dict[str, Any]:
        """The keywords that make transformers' own loader (full checkpoints) load this adapter: it calls the
        model's `load_adapter` with them, as for any model."""
        keywords: dict[str, Any] = {"adapter_name": self.adapter_name} if self.adapter_name else {}
        if self.path is not None:
            keywords["adapter_kwargs"] = {**self.adapter_kwargs, "_adapter_model_path": self.path}
        return keywords

    def refuse_taken_name(self, name: str, recorded: dict[str, Any] | None) -> None:
        """Refuse, before loading, the PEFT adapter at `path` when its name is one the checkpoint's own PEFT
        adapters (`recorded`, from its config.json) already use."""
        taken = self.adapter_name or "default"
        if taken in (recorded or {}):
            raise LoadingOptionError(
                f"'{name}' holds a PEFT adapter named {taken!r} (recorded in its config.json), and the PEFT adapter "
                f"at '{self.path}' would load under the same name. Pass adapter_name='another name' to load both, "
                "or load the checkpoint from a folder without PEFT's adapter_config.json."
            )

    def refuse_name_without_adapter(self, name: str) -> None:
        if self.adapter_name is not None and self.path is None:
            raise LoadingOptionError(
                f"adapter_name={self.adapter_name!r} names the PEFT adapter that from_pretrained loads from a PEFT "
                f"adapter folder (adapter_config.json), and '{name}' holds none. Add one afterwards with "
                "model.load_adapter(path, adapter_name=...)."
            )


@dataclass
class BackboneLoadOptions:
    """The backbone-related loading keywords of one `from_pretrained` / `from_backbones` call, validated."""

    dtype: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(ROLES))
    attn_implementation: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(ROLES))
    experts_implementation: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(ROLES))
    quantization: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(ROLES))
    device_map: Any = None
    max_memory: dict | None = None
    offload_folder: str | None = None
    offload_buffers: bool = False
    pass_through: dict[str, Any] = field(default_factory=dict)
    # `output_loading_info=True`: each backbone's loading info, by role, as its loader found it (else None).
    loading_info: dict[str, dict] | None = None

    def hub_kwargs(self) -> dict[str, Any]:
        """The keywords that also apply to config and revision lookups."""
        return {k: v for k, v in self.pass_through.items() if k in HUB_KEYWORDS}

    def implementations(self, role: str) -> dict[str, str]:
        """The attention and experts implementations asked for the `role` backbone (keywords of from_pretrained
        and from_config)."""
        asked = {
            "attn_implementation": self.attn_implementation[role],
            "experts_implementation": self.experts_implementation[role],
        }
        return {name: value for name, value in asked.items() if value is not None}

    def keep_loading_info(self, role: str, loading_info: dict) -> None:
        """Keep a backbone's loading info when `output_loading_info=True` asked for it."""
        if self.loading_info is not None:
            self.loading_info[role] = loading_info

    def composite_loading_info(self, prefixes: dict[str, str]) -> dict[str, Any]:
        """transformers' loading info of the whole model: each backbone's, under its name in the model
        (`prefixes`: role -> attribute name)."""
        info: dict[str, Any] = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()}
        info["error_msgs"] = []
        for role, found in (self.loading_info or {}).items():
            prefix = f"{prefixes[role]}."
            for name in ("missing_keys", "unexpected_keys"):
                info[name] |= {prefix + key for key in found.get(name, ())}
            info["mismatched_keys"] |= {
                (prefix + key, *shapes) for key, *shapes in found.get("mismatched_keys", ())
            }
            info["error_msgs"] += list(found.get("error_msgs", ()))
        return info

    def take_recorded_dtypes(self, config: Any) -> None:
        """`dtype="auto"` for an adapter-only checkpoint: each backbone in the dtype the model was saved with
        (recorded in its sub-config), as "auto" means for a full checkpoint; the backbone source's own dtype where
        none is recorded."""
        for role in ROLES:
            recorded = getattr(getattr(config, f"{role}_config", None), "dtype", None)
            if self.dtype[role] == "auto" and recorded is not None:
                self.dtype[role] = recorded

    def take_implementations_from(self, config: Any) -> None:
        """The attention and experts implementations a given config object asks for, for each backbone that no
        keyword chose: transformers' pipeline passes `model_kwargs={"attn_implementation": ...}` this way (set on
        the config it loads, then `from_pretrained(config=...)` without the keyword)."""
        for name in ("attn_implementation", "experts_implementation"):
            chosen = getattr(self, name)
            for role in ROLES:
                asked = getattr(getattr(config, f"{role}_config", None), f"_{name}", None)
                if chosen[role] is None and isinstance(asked, str):
                    chosen[role] = asked

    def for_backbone(self, role: str, device_map: dict | None) -> dict[str, Any]:
        """`from_pretrained` keywords for the `role` backbone, given its part of the composite device map."""
        # Hub kernels stay off, as every release before transformers 5.25 had them (5.25 turns them on by default and
        # fetches them from the Hub while loading): they replace the layers our adapters hook into.
        kwargs = {"use_kernels": False, **self.pass_through}
        kwargs.update(self.implementations(role))
        if self.quantization[role] is not None:
            kwargs["quantization_config"] = self.quantization[role]
        if device_map is not None:
            kwargs["device_map"] = device_map
            if set(device_map.values()) == {"disk"} and not whole_model_disk_offload_supported():
                raise LoadingOptionError(
                    f"The device map offloads the whole {role} backbone to disk, which accelerate < 1.15 refuses: "
                    "upgrade accelerate, or raise max_memory so that part of it stays in memory."
                )
            if any(device == "disk" for device in device_map.values()):
                if self.offload_folder is None:
                    raise LoadingOptionError(
                        "The device map offloads part of a backbone to disk: pass offload_folder=... ."
                    )
                kwargs["offload_folder"] = os.path.join(self.offload_folder, f"{role}_backbone")
            if self.offload_buffers:
                kwargs["offload_buffers"] = True
        return kwargs


def whole_model_disk_offload_supported() -> bool:
    """accelerate 1.15 accepts a device map that puts a whole model on disk; earlier releases refuse it."""
    import accelerate
    from packaging.version import Version

    return Version(accelerate.__version__) >= Version("1.15")


# The keywords `take_loading_options` reads itself (besides PASS_THROUGH, NO_EFFECT, INTERNAL and REFUSED).
TAKEN = (
    "dtype",
    "torch_dtype",
    "attn_implementation",
    "experts_implementation",
    "quantization_config",
    "device_map",
    "max_memory",
    "offload_folder",
    "offload_buffers",
    "output_loading_info",
)


def loading_keyword_names() -> set[str]:
    """Every loading keyword of `from_pretrained` / `from_backbones`, taken or refused: what a misspelt keyword is
    compared with for the error's "did you mean"."""
    return set(TAKEN + PASS_THROUGH + NO_EFFECT) | set(REFUSED)


def take_loading_options(kwargs: dict[str, Any], where: str) -> BackboneLoadOptions:
    """Pop every loading keyword from `kwargs` into options (refusing the unsupported ones with the reason);
    what is left in `kwargs` is for the caller to handle (config fields) or refuse."""
    for name in INTERNAL + NO_EFFECT:
        kwargs.pop(name, None)
    for name, why in REFUSED.items():
        if name in kwargs:
            value = kwargs.pop(name)
            if value in (None, False, "", {}):  # the default: nothing asked for
                continue
            raise LoadingOptionError(f"{where} does not support `{name}`: {why}.")
    options = BackboneLoadOptions()
    dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
    options.dtype = per_role(dtype if dtype is not None else torch_dtype, "dtype")
    for name in ("attn_implementation", "experts_implementation"):
        per_backbone = per_role(kwargs.pop(name, None), name)
        for role, value in per_backbone.items():
            if value is not None and not isinstance(value, str):
                raise LoadingOptionError(f"{name} for the {role} backbone must be a string, got {value!r}.")
        setattr(options, name, per_backbone)
    options.quantization = per_role(kwargs.pop("quantization_config", None), "quantization_config")
    options.device_map = normalize_device_map(kwargs.pop("device_map", None))
    options.max_memory = kwargs.pop("max_memory", None)
    options.offload_folder = kwargs.pop("offload_folder", None)
    options.offload_buffers = bool(kwargs.pop("offload_buffers", False))
    options.pass_through = {name: kwargs.pop(name) for name in PASS_THROUGH if name in kwargs}
    options.loading_info = {} if kwargs.pop("output_loading_info", False) else None
    return options


def per_role(value: Any, name: str) -> dict[str, Any]:
    """A value for both backbones, or a dict keyed by `text_config` / `vision_config` (transformers' form for
    composite models; a missing key leaves that backbone at its default)."""
    if isinstance(value, dict) and value and set(value) <= {"text_config", "vision_config", ""}:
        default = value.get("")
        return {role: value.get(f"{role}_config", default) for role in ROLES}
    if isinstance(value, dict) and name in ("dtype", "attn_implementation", "experts_implementation"):
        raise LoadingOptionError(
            f"{name} as a dict must be keyed by 'text_config' and/or 'vision_config', got keys {sorted(value)}."
        )
    if isinstance(value, dict) and name == "quantization_config" and value and "quant_method" not in value:
        raise LoadingOptionError(
            f"{name} as a dict is either one quantization config (with 'quant_method') or keyed by "
            f"'text_config' / 'vision_config'; got keys {sorted(value)}."
        )
    return dict.fromkeys(ROLES, value)


def quantization_as_dict(value: Any) -> dict[str, Any]:
    """A quantization config (a transformers config object, or its dict already) as the dict config.json records."""
    return value if isinstance(value, dict) else value.to_dict()


def normalize_device_map(device_map: Any) -> Any:
    """A strategy name, a dict {module name: device}, or None. A single device becomes {"": device}."""
    if device_map is None or isinstance(device_map, dict):
        return device_map
    if isinstance(device_map, str) and device_map in STRATEGIES:
        return device_map
    return {"": check_device(device_map)}


def check_device(device: Any) -> str | int:
    """A device as accelerate writes it in maps: an int (accelerator index), "cpu", "disk", "meta", "cuda:1"."""
    if isinstance(device, bool):
        raise LoadingOptionError(f"device_map values must be devices, got {device!r}.")
    if isinstance(device, int):
        if device < 0:
            raise LoadingOptionError("device_map cannot use a negative device index; use 'cpu' for the CPU.")
        return device
    if isinstance(device, torch.device):
        return str(device)
    if device == "disk":
        return device
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise LoadingOptionError(
            f"device_map: {device!r} is not a device. Use 'auto', 'balanced', 'balanced_low_0', 'sequential', a "
            "device ('cpu', 'cuda:0', 0, 'meta', 'disk') or a dict {module name: device}."
        ) from None
    return device


def execution_device(device: Any, main_device: Any) -> Any:
    """Where a module mapped to `device` computes: offloaded modules ("disk", or "cpu" beside accelerators)
    run on the main device, as accelerate's dispatch does."""
    if device == "disk" or (device == "cpu" and main_device != "cpu"):
        return main_device
    return device


def main_device_of(device_map: dict[str, Any]) -> Any:
    accelerators = [d for d in device_map.values() if d not in ("cpu", "disk", "meta")]
    return accelerators[0] if accelerators else "cpu"


def compute_device_map(meta_model: nn.Module, options: BackboneLoadOptions) -> dict[str, Any] | None:
    """The whole model's device map: a strategy is resolved by accelerate on `meta_model` (the composite built on
    the meta device, in the backbones' dtype), which keeps every `_no_split_modules` block (a decoder layer, a
    vision encoder layer) on one device; an explicit dict is checked to cover every parameter."""
    from accelerate.utils import check_device_map, get_balanced_memory, get_max_memory, infer_auto_device_map

    device_map = options.device_map
    if device_map is None:
        return None
    no_split = sorted(getattr(meta_model, "_no_split_modules", None) or [])
    if isinstance(device_map, str):
        if device_map == "sequential":
            max_memory = get_max_memory(options.max_memory)
        else:
            max_memory = get_balanced_memory(
                meta_model,
                max_memory=options.max_memory,
                no_split_module_classes=no_split,
                low_zero=device_map == "balanced_low_0",
            )
        return infer_auto_device_map(meta_model, max_memory=max_memory, no_split_module_classes=no_split)
    device_map = {key: check_device(device) for key, device in device_map.items()}
    names = {name for name, _ in meta_model.named_modules()}
    unknown = sorted(key for key in device_map if key and key not in names)
    if unknown:
        raise LoadingOptionError(
            f"device_map names modules that this model does not have: {unknown[:5]}. Top-level modules are "
            f"{sorted(name for name, _ in meta_model.named_children())}."
        )
    try:
        check_device_map(meta_model, device_map)
    except ValueError as error:
        raise LoadingOptionError(f"device_map does not place every weight: {error}") from None
    return device_map


def split_device_map(device_map: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The composite map split into the LLM's map, the vision tower's map (keys relative to each backbone) and
    the map of our own modules."""
    text, vision, own = {}, {}, {}
    for key, device in device_map.items():
        if key == "":
            text[""] = vision[""] = own[""] = device
        elif key == "language_model" or key.startswith("language_model."):
            text[key.removeprefix("language_model").removeprefix(".")] = device
        elif key == "vision_tower" or key.startswith("vision_tower."):
            vision[key.removeprefix("vision_tower").removeprefix(".")] = device
        else:
            own[key] = device
    return text, vision, own


def move_own_modules(model: nn.Module, own_map: dict[str, Any], main_device: Any) -> None:
    """Move our (small, trainable) modules to where the map puts them; offloaded entries run on the main device."""
    for key in sorted(own_map, key=len):  # parents first, children override
        device = execution_device(own_map[key], main_device)
        if key == "":
            for name, child in model.named_children():
                if name not in ("language_model", "vision_tower"):
                    child.to(device)
            for parameter in model.parameters(recurse=False):
                parameter.data = parameter.data.to(device)
        elif key in dict(model.named_parameters()):  # a top-level parameter (CROME's query tokens)
            parameter = model.get_parameter(key)
            parameter.data = parameter.data.to(device)
        else:
            model.get_submodule(key).to(device)
