"""The shared base of LaVIN and CROME: a model built around two frozen backbones (an LLM and a vision tower)
with a small trainable side.

What lives here (each model keeps only what is its own):
- construction around backbones (`__init__`, `from_backbones`): loading keywords, device maps, quantisation,
  freezing, the backbone record in the config;
- adapter-only checkpoints: `save_pretrained` / `from_pretrained` / `push_to_hub`, with the backbones resolved
  again from the record and checked against their fingerprints;
- weight initialisation of our modules when a checkpoint does not provide them (`_init_weights`);
- the transformers plumbing every composite model needs (embeddings, attention flags, placement).

Subclasses define `_build_trainable_side(config)`, `adapter_module_names()`, `_composite_config(...)` and may
define `load_referenced_weights(...)` and `own_layer_adapters()`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import os
import types
from typing import Any, Self

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.compiler import is_compiling
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import LoadStateDictInfo
from transformers.utils import logging

from ..atomic import atomic_directory, recover
from ..checkpoint_files import (
    ADAPTER_WEIGHTS_NAME,
    adapter_weights_file,
    check_checkpoint_kind,
    incomplete_checkpoint_message,
    is_peft_adapter_folder,
    not_our_checkpoint_message,
    peft_base_model,
    refuse_missing_weights,
    replaced_by_adapter_save,
)
from ..errors import closest_names
from ..hub.names import looks_like_local_path
from ..hub.remote_code import model_auto_map, write_loader
from ..method_names import METHOD_NAMES
from . import peft_hotswap, peft_on_top
from .backbone_holders import hold_backbones, refuse_backbone_in_use
from .backbone_watch import (
    BackboneChangedError,
    BackboneWatch,
    backbone_tensors,
    backbone_tensors_in,
    keep_quantized_weights_in_place,
)
from .backbones import (
    BackboneReference,
    BackboneSpec,
    build_text_backbone,
    build_vision_backbone,
    check_backbone,
    check_patch_embedding_reads_images,
    freeze,
    is_quantized,
    load_backbones,
    load_text_backbone,
    load_vision_backbone,
    read_checkpoint_config,
    resolve_checkpoint_folder,
    vision_config_of,
)
from .causal_lm_output import (
    LAST_HIDDEN_STATE_ONLY,
    VisionLanguageCausalLMOutput,
    causal_lm_output,
    last_hidden_state_output,
)
from .frozen_backbones_config import changed_adapter_settings
from .full_checkpoint_quantization import hand_quantization_to_backbones, scoped_quantization
from .image_tokens import NumImageTokensError, labels_without_image_tokens, vocabulary_size
from .loading import (
    PEFT_ADAPTER_KWARGS,
    ROLES,
    BackboneLoadOptions,
    LoadingOptionError,
    PeftAdapterToLoad,
    compute_device_map,
    execution_device,
    loading_keyword_names,
    main_device_of,
    move_own_modules,
    normalize_device_map,
    per_role,
    quantization_as_dict,
    split_device_map,
    take_loading_options,
)
from .multimodal_body import MultimodalBody
from .prompt_logits_processors import placeholder_safe
from .transformers_compat import ACTIVATION_CHECKPOINTING_NAMES, cache_kwargs
from .vision_layout import square_side

logger = logging.get_logger(__name__)

FULL_WEIGHTS_NAMES = ("model.safetensors", "model.safetensors.index.json")


# The attribute names of the two frozen backbones (also the first part of their state-dict keys).
BACKBONE_MODULES = ("language_model", "vision_tower")
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def without_wrapper_prefixes(name: str) -> str:
    """A module or tensor name without the prefixes that FSDP, activation checkpointing and torch.compile add."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


# PreTrainedModel.save_pretrained's options and the values an adapter-only save writes anyway (one
# mmadapters_model.safetensors, no variant). `token` only matters with push_to_hub (refused): any value.
# `max_shard_size` is checked against the adapter file's size (see `check_adapter_file_fits`).
ADAPTER_ONLY_SAVE_OPTIONS_ANY_VALUE = ("token",)
ADAPTER_ONLY_SAVE_DEFAULTS = {
    "variant": None,
    "save_peft_format": True,
    "save_original_format": True,
    "distributed_checkpoint": False,
    "safe_serialization": True,
}


def image_order_for_expansion(images_per_sample: list[int], expand_size: int) -> list[int]:
    """The per-image rows of a batch, each sample's group repeated `expand_size` times in place: images [A, B | C]
    of two samples, expanded twice, give [A, B, A, B, C, C]."""
    order = []
    start = 0
    for count in images_per_sample:
        order += list(range(start, start + count)) * expand_size
        start += count
    return order


def check_token_ids(ids: torch.Tensor, name: str, layout: str, hint: str) -> None:
    """Refuse token ids (`name`: input_ids, CROME's qformer_input_ids) that are not a 2-D (`layout`) integer tensor;
    `hint` says how to build them."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}.")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be 2-D ({layout}), got shape {tuple(ids.shape)}; {hint}")


def unexpected_keywords_error(where: str, unexpected: Any, config_class: type) -> TypeError:
    """The TypeError for keywords that are neither loading keywords nor fields of `config_class` (transformers
    raises one too), with the closest known name of a misspelt one, and how to set a field of the adapter config."""
    unexpected = sorted(unexpected)
    config_fields = {field.name for field in dataclasses.fields(config_class)}
    known = loading_keyword_names() | config_fields | {"adapter_config", "generation_config", "config"}
    for method in (
        FrozenBackbonesPreTrainedModel.from_pretrained,
        FrozenBackbonesPreTrainedModel.from_backbones,
    ):
        known |= set(inspect.signature(method).parameters) - {"kwargs", "model_args"}
    message = (
        f"{where} got unexpected keyword argument(s) {unexpected}{closest_names(unexpected, known)}: they are "
        f"neither loading options nor fields of {config_class.__name__}."
    )
    adapter_class = config_class.adapter_config_class
    adapter_fields = {field.name for field in dataclasses.fields(adapter_class)}
    settings = [name for name in unexpected if name in adapter_fields]
    if settings:
        given = ", ".join(f"{name!r}: ..." for name in settings)
        message += f" {settings}: fields of {adapter_class.__name__}: pass adapter_config={{{given}}}."
    return TypeError(message)


def check_adapter_only_save_options(options: dict[str, Any]) -> None:
    """Refuse, before anything is written, a `save_pretrained` option an adapter-only save cannot honour."""
    unknown = sorted(
        set(options) - set(ADAPTER_ONLY_SAVE_DEFAULTS) - set(ADAPTER_ONLY_SAVE_OPTIONS_ANY_VALUE)
    )
    if unknown:
        known = set(ADAPTER_ONLY_SAVE_DEFAULTS) | set(ADAPTER_ONLY_SAVE_OPTIONS_ANY_VALUE)
        raise TypeError(
            f"save_pretrained() got unexpected keyword argument(s) {unknown}{closest_names(unknown, known)}."
        )
    changed = sorted(
        name
        for name, value in options.items()
        if name in ADAPTER_ONLY_SAVE_DEFAULTS and value != ADAPTER_ONLY_SAVE_DEFAULTS[name]
    )
    if changed:
        raise ValueError(
            f"save_pretrained({', '.join(f'{name}={options[name]!r}' for name in changed)}) applies to full "
            f"checkpoints: an adapter-only checkpoint is one small {ADAPTER_WEIGHTS_NAME} (safetensors). Pass "
            "adapter_only=False to save every weight with these options."
        )


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def size_in_bytes(size: int | str) -> int:
    """A `max_shard_size` in bytes: an int, or a string such as "5GB" (powers of 1000) or "500MiB" (of 1024)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    text = str(size).strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    unit = text[len(number) :]
    try:
        return int(float(number) * _SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise ValueError(
            f"max_shard_size={size!r} is not a size: give bytes (an int) or e.g. '5GB', '500MiB'."
        ) from None


def check_adapter_file_fits(tensors: dict[str, torch.Tensor], max_shard_size: int | str | None) -> None:
    """An adapter-only checkpoint is one file: it honours `max_shard_size` when it fits in one shard (adapters are
    megabytes), and refuses, before anything is written, a limit it would exceed."""
    if max_shard_size is None:
        return
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size > size_in_bytes(max_shard_size):
        raise ValueError(
            f"The adapter file would be {size:,} bytes, more than max_shard_size={max_shard_size!r}: an adapter-only "
            f"checkpoint is one {ADAPTER_WEIGHTS_NAME}. Raise max_shard_size, or save every weight in shards with "
            "adapter_only=False."
        )


def bitsandbytes_mark(name: str, parameter_class: str) -> property:
    """The model's `is_loaded_in_4bit` / `is_loaded_in_8bit`: whether a backbone holds bitsandbytes parameters of
    `parameter_class`. Setting it is allowed only to the same value (transformers' loader sets it on the model it
    loads from a quantised full checkpoint)."""

    def read(model: FrozenBackbonesPreTrainedModel) -> bool:
        return model._backbones_hold(parameter_class)

    def check(model: FrozenBackbonesPreTrainedModel, value: bool) -> None:
        if bool(value) != read(model):
            raise AttributeError(
                f"{name} is read from the backbones' weights ({read(model)}) and cannot be set; quantise a "
                "backbone when loading it (quantization_config=...)."
            )

    return property(read, check)


# Image keywords of other vision-language models' forward: our forward passes unknown keywords on to the LLM (as
# LLaVA's does), which ignores them, so these were dropped without a word.
FIXED_FEATURES = "the visual features come from the vision tower layers the model was built with (its config)"
OTHER_PROCESSOR = "inputs of another model's processor"
OTHER_MODELS_INPUTS = {
    "vision_feature_layer": FIXED_FEATURES,
    "vision_feature_select_strategy": FIXED_FEATURES,
    "image_sizes": OTHER_PROCESSOR,
    "image_grid_thw": OTHER_PROCESSOR,
    "pixel_attention_mask": OTHER_PROCESSOR,
    "image_attention_mask": OTHER_PROCESSOR,
    "aspect_ratio_ids": OTHER_PROCESSOR,
    "aspect_ratio_mask": OTHER_PROCESSOR,
    "pixel_values_videos": "the model takes images and text",
    "video_grid_thw": "the model takes images and text",
    "input_features": "the model takes images and text",
}
# Each method's own forward inputs, which the other method's forward does not take.
LAVIN_INPUTS = ("modality", "routing_weights", "folded_adapters")
CROME_INPUTS = ("qformer_input_ids", "qformer_attention_mask", "prompt_mask")


def refuse_other_models_inputs(
    model_name: str, kwargs: dict[str, Any], other_method: tuple[str, ...]
) -> None:
    """Refuse keywords (given a value) that belong to another model: other vision-language models' image inputs, or
    the other method's own inputs (`other_method`: CROME's Q-Former inputs given to LaVIN, LaVIN's routing to
    CROME). Before, the LLM ignored them and the answer came without them."""
    given = sorted(
        name
        for name in kwargs
        if kwargs[name] is not None and (name in OTHER_MODELS_INPUTS or name in other_method)
    )
    if not given:
        return
    reasons = sorted({OTHER_MODELS_INPUTS.get(name, "inputs of the other method's model") for name in given})
    processor = model_name.replace("ForConditionalGeneration", "Processor")
    raise TypeError(
        f"{model_name} does not take {', '.join(given)}: {'; '.join(reasons)}. Its processor builds what it takes "
        f"({processor}.from_model(model), or AutoProcessor of its checkpoint)."
    )


def forward_ignoring_placeholder_labels(model: Any, forward: Any, *args: Any, **kwargs: Any) -> Any:
    """`forward(*args, **kwargs)` with the image placeholders in `labels` ignored (`_text_labels`)."""
    if kwargs.get("labels") is not None:
        kwargs["labels"] = model._text_labels(kwargs["labels"], kwargs.get("ignore_index", -100))
    return forward(*args, **kwargs)


def method_ignoring_placeholder_labels(function: Any) -> Any:
    """A forward function (`function(model, ...)`) that ignores the image placeholders in `labels` first."""

    @functools.wraps(function)
    def forward(model: Any, *args: Any, **kwargs: Any) -> Any:
        return forward_ignoring_placeholder_labels(model, functools.partial(function, model), *args, **kwargs)

    return forward


class FrozenBackbonesPreTrainedModel(PreTrainedModel):
    """Base class of models made of a frozen `language_model`, a frozen `vision_tower` and trainable modules.

    `_init_weights` initialises our own modules through their `reset_parameters()`, using transformers'
    initialisation helpers, which leave every tensor a checkpoint provided untouched: a checkpoint missing an
    adapter tensor gets that adapter's proper initialisation (zero experts, Xavier down-projection), never the
    uninitialised memory of a meta-device build.
    """

    # There is no separate "base model" module (LLaVA's `self.model`): the backbones hang off this class (no weight
    # name has a base-model prefix). `base_model` is a view that runs the model without its LM head.
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # No attention of its own: each backbone's support for an implementation is checked by transformers when it is set
    # on that backbone (a T5 LLM refuses flash attention itself), so the composite takes every kind.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # Inputs with one row per image, not per sample (see `_expand_inputs_for_generation`).
    per_image_input_names: tuple[str, ...] = ("pixel_values",)

    def __init__(
        self,
        config: PreTrainedConfig,
        language_model: PreTrainedModel | None = None,
        vision_tower: PreTrainedModel | None = None,
        **unexpected: Any,
    ) -> None:
        if unexpected:
            # transformers' loader of a full checkpoint passes the keywords it does not know on to here
            raise unexpected_keywords_error(type(self).__name__, unexpected, type(config))
        for backbone, role in ((language_model, "text"), (vision_tower, "vision")):
            if backbone is not None:  # a loaded backbone: not one that another of our models holds
                refuse_backbone_in_use(backbone, role)
        super().__init__(config)
        # Built from the configs when not given (random weights; a full checkpoint then loads into them).
        self.language_model = language_model or build_text_backbone(config.text_config)
        self.vision_tower = vision_tower or build_vision_backbone(config.vision_config)
        check_patch_embedding_reads_images(self.vision_tower)
        hold_backbones(self, self.language_model, self.vision_tower)
        freeze(self.language_model)
        freeze(self.vision_tower)
        # Our modules are float32 whatever the backbones' dtype: they train in it (as from_backbones builds them),
        # and a full checkpoint's loader, which builds the model in the dtype asked, then loads their saved float32
        # weights exactly instead of rounding them to it.
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            self._build_trainable_side(config)
        finally:
            torch.set_default_dtype(default_dtype)
        self.post_init()
        self.restore_trainable_side()  # what the method trains now (e.g. CROME: the current stage's modules)
        # The dtype the weights are in, as transformers' from_pretrained records it (serving and evaluation tools read
        # it); the sub-configs hold each backbone's own.
        self.config.dtype = self.dtype

    def __setattr__(self, name: str, value: Any) -> None:
        # A forward put on the model from outside still ignores the image placeholders in `labels`, as the model's own
        # forward does: TRL's SFT / DPO / GRPO trainers put their fused LM head there, which computes the loss itself,
        # and TRL's vision collator labels every token, placeholders (ids outside the LLM's vocabulary) included
        # (accelerate's device hooks and mixed-precision wrapper go there too). A method stays a method bound to the
        # model (accelerate reads `model.forward.__func__`), anything else becomes a partial: no closure holds the
        # model, so a deepcopy of the model rebinds either to the copy.
        if name == "forward" and isinstance(value, types.MethodType) and value.__self__ is self:
            value = types.MethodType(method_ignoring_placeholder_labels(value.__func__), self)
        elif name == "forward" and callable(value) and not isinstance(value, nn.Module):
            value = functools.update_wrapper(
                functools.partial(forward_ignoring_placeholder_labels, self, value), value
            )
        super().__setattr__(name, value)

    # ------------------------------------------------------------------------------------------------
    # What subclasses say
    # ------------------------------------------------------------------------------------------------

    def _build_trainable_side(self, config: PreTrainedConfig) -> None:
        """Build the method's own modules (adapters, projections, ...) around the frozen backbones, which are in
        place as `self.language_model` and `self.vision_tower`."""
        raise NotImplementedError

    def adapter_module_names(self) -> tuple[str, ...]:
        """Top-level modules an adapter-only checkpoint holds."""
        raise NotImplementedError

    @classmethod
    def _composite_config(
        cls,
        text_ref: BackboneReference | None,
        adapter_config: Any,
        fields: dict[str, Any],
        hub_kwargs: dict[str, Any] | None = None,
    ) -> PreTrainedConfig:
        """The model's config: `fields` holds the config fields (`text_config`, `vision_config`, the backbone
        records and the caller's), `text_ref` the LLM's record (None: built from a config object), `hub_kwargs`
        the Hub keywords for the LLM's files it reads (CROME's fresh Q-Former takes its tokenizer's length)."""
        raise NotImplementedError

    def load_referenced_weights(
        self, checkpoint: str, ignore_backbone_mismatch: bool, hub_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Load trainable-side weights that the checkpoint references instead of storing (none by default), with the
        Hub keywords of the load (`hub_kwargs`: `token`, ...)."""

    def restore_trainable_side(self) -> None:
        """Make our modules trainable again (after something froze them, e.g. `peft.get_peft_model`)."""
        for name in self.adapter_module_names():
            module = getattr(self, name, None)
            if module is not None:
                module.requires_grad_(True)

    def own_layer_adapters(self) -> list[tuple[nn.Module, nn.Module]]:
        """(adapter module, backbone layer it runs inside) pairs: each adapter is placed on its layer's device."""
        return []

    # ------------------------------------------------------------------------------------------------
    # Initialisation and transformers plumbing
    # ------------------------------------------------------------------------------------------------

    def post_init(self) -> None:
        # transformers first (it ties the backbones' weights by their plain names), then the PEFT layers recorded
        # in the config (LoRA on top), before any weight is loaded, so that a checkpoint's PEFT tensors find them.
        super().post_init()
        peft_on_top.rebuild_recorded_layers(self)
        self._name_tied_weights_as_held()

    def _name_tied_weights_as_held(self) -> None:
        """transformers' tied-weights mapping (`all_tied_weights_keys`, which a full load and `tie_weights` read),
        named as the model holds the weights now: a PEFT layer on a tied module (LoRA on a tied LM head, trainable
        tokens on tied embeddings) holds the weight under its base layer. A full save finds the tied copies to
        leave out by the modules' `_tied_weights_keys`: the renamed ones are declared on this model."""
        held = self._as_held(self.all_tied_weights_keys)
        renamed = set(held) - set(self.all_tied_weights_keys)
        self.all_tied_weights_keys = held
        self._tied_weights_keys = {target: held[target] for target in renamed} or None

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        return self._as_held(super().get_expanded_tied_weights_keys(all_submodels=all_submodels))

    def _as_held(self, mapping: dict[str, str]) -> dict[str, str]:
        name = peft_on_top.name_through_peft_layers
        return {name(self, target): name(self, source) for target, source in mapping.items()}

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers treats models outside the library as "custom code" and then skips every module without
        # direct parameters (our adapters keep theirs in children). Our `_init_weights` uses transformers'
        # initialisation helpers, which skip loaded tensors, so the library's own rule is the right one here.
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        reset = getattr(module, "reset_parameters", None)
        if module.__class__.__module__.startswith("mmadapters.") and callable(reset):
            reset()  # our modules: their own initialisation (see each reset_parameters)
        else:
            super()._init_weights(module)

    def _restore_trainability(self) -> None:
        """What trains, as when the model was built: the backbones frozen (their PEFT layers train), our modules as
        the method says (`restore_trainable_side`). transformers' loader of a full checkpoint makes every parameter
        it loads trainable, the backbones' included."""
        freeze(self.language_model)
        freeze(self.vision_tower)
        self.restore_trainable_side()
        self._thaw_peft_layers()

    def freeze_backbones(self) -> int:
        """Freeze both backbones again; returns how many backbone parameters had become trainable (in-place
        quantisation, e.g. optimum-quanto's `quantize(model.language_model, ...)`, creates new parameters that
        require gradients). Our Trainers call it before training."""
        peft_parameters = {id(p) for p in self._peft_parameters()}  # they train, in the backbones or in ours
        thawed = sum(
            p.numel()
            for m in (self.language_model, self.vision_tower)
            for p in m.parameters()
            if p.requires_grad and id(p) not in peft_parameters
        )
        freeze(self.language_model)
        freeze(self.vision_tower)
        self._thaw_peft_layers()
        if thawed:
            logger.warning(f"{thawed:,} backbone parameters had become trainable; they are frozen again.")
        return thawed

    # transformers marks a model loaded with bitsandbytes `is_loaded_in_4bit` / `is_loaded_in_8bit`, and PEFT, the
    # Trainer, accelerate and transformers itself read the marks on the model they are given: PEFT's
    # `get_peft_model` wraps 4-bit layers with its 4-bit LoRA (a plain LoRA cannot be merged into them),
    # `prepare_model_for_kbit_training` turns on activation checkpointing, the Trainer does not copy the model with
    # DataParallel, `num_parameters()` counts packed 4-bit weights at their real size. Ours is quantised where its
    # backbones are, so the marks are read from the backbones' weights.
    is_loaded_in_4bit = bitsandbytes_mark("is_loaded_in_4bit", "Params4bit")
    is_loaded_in_8bit = bitsandbytes_mark("is_loaded_in_8bit", "Int8Params")

    def dequantize(self, dtype: torch.dtype | None = None) -> FrozenBackbonesPreTrainedModel:
        """transformers' `dequantize` for each quantised backbone (e.g. LaVIN-lite's LLM), in place; returns the
        model. A full save then holds (and reloads) the dequantized backbones in full precision; an adapter-only
        save still records how they were quantised, since quantising their sources again rebuilds the values they
        now hold."""
        quantised = [backbone for backbone in self._backbone_modules().values() if is_quantized(backbone)]
        if not quantised:
            raise ValueError(
                f"Neither backbone of this {type(self).__name__} is quantised: nothing to dequantize."
            )
        for backbone in quantised:
            backbone.dequantize(dtype=dtype)
        return self

    def _backbones_hold(self, parameter_class: str) -> bool:
        """Whether a backbone holds bitsandbytes parameters of this class (by name, as PEFT reads them, so that
        bitsandbytes need not be installed)."""
        return any(
            type(parameter).__name__ == parameter_class
            for backbone in self._backbone_modules().values()
            for parameter in backbone.parameters()
        )

    def _refuse_quantised(self, call: str, how: str) -> None:
        """transformers refuses dtype casts of a bitsandbytes model (and `.cuda()` of an 8-bit one); it does so by
        the quantizer on the model, which ours hands to its backbones, so the refusal is made here: a cast would
        turn our float32 modules and the LLM's unquantised layers to the new dtype."""
        bits = 4 if self.is_loaded_in_4bit else 8 if self.is_loaded_in_8bit else None
        if bits is not None:
            raise ValueError(
                f"This {type(self).__name__} has a {bits}-bit bitsandbytes backbone: `{call}` is refused, as "
                f"transformers refuses it for bitsandbytes models. {how}, or call model.dequantize() first."
            )

    def _refuse_quantised_cast(self, call: str) -> None:
        self._refuse_quantised(
            call,
            "Choose the backbones' dtype when loading (from_backbones(..., dtype=...) or from_pretrained(..., "
            "dtype=...); our own modules stay float32)",
        )

    def to(self, *args: Any, **kwargs: Any) -> Self:
        if "dtype" in kwargs or any(isinstance(arg, (torch.dtype, torch.Tensor)) for arg in args):
            self._refuse_quantised_cast(".to(dtype)")
        return super().to(*args, **kwargs)

    def half(self) -> Self:
        self._refuse_quantised_cast(".half()")
        return super().half()

    def float(self) -> Self:
        self._refuse_quantised_cast(".float()")
        return super().float()

    def bfloat16(self) -> Self:
        self._refuse_quantised_cast(".bfloat16()")
        return super().bfloat16()

    def double(self) -> Self:
        self._refuse_quantised_cast(".double()")
        return super().double()

    def cuda(self, *args: Any, **kwargs: Any) -> Self:
        if self.is_loaded_in_8bit:
            self._refuse_quantised(".cuda()", "Load it on the GPU (device_map=...)")
        return super().cuda(*args, **kwargs)

    def _peft_parameters(self) -> list[nn.Parameter]:
        prefixes = peft_on_top.peft_state_prefixes(self)
        return [p for n, p in self.named_parameters() if n.startswith(prefixes)] if prefixes else []

    def _thaw_peft_layers(self) -> None:
        """PEFT layers on the backbones train (their active adapters, unless loaded for inference only)."""
        recorded = self.config.peft_adapters or {}
        for _, layer in peft_on_top.tuner_layers(self):
            if layer.disable_adapters:
                continue
            inference = all(
                (recorded.get(name) or {}).get("config", {}).get("inference_mode", False)
                for name in layer.active_adapters
            )
            layer.set_adapter(layer.active_adapters, inference_mode=inference)

    @property
    def dtype(self) -> torch.dtype:
        """The backbones' dtype (the LLM's; our modules stay float32), whichever parameter comes first: what
        `inputs.to(model.dtype)` and a full save's recorded `dtype` (what `dtype="auto"` reloads in) mean."""
        return self.language_model.dtype

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether activation checkpointing is on. transformers 5.24 deprecated this name for
        `is_activation_checkpointing`, but PEFT (get_peft_model, 0.21) still reads it: answered here without the
        deprecation warning, so that PEFT on our models runs quietly."""
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.modules())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any):
        """Turn on activation checkpointing. transformers 5.24 deprecated this name for
        `activation_checkpointing_enable` (which calls this override), but PEFT (`prepare_model_for_kbit_training`,
        0.21) still calls it: done here without the deprecation warning.

        Checkpoint keywords without `use_reentrant` get `use_reentrant=False`, transformers' default (PEFT passes
        `{}`, which left torch to pick reentrant checkpointing, with a warning; LaVIN's routing weights reach the
        decoder layers as keyword arguments, and reentrant checkpointing cannot differentiate those)."""
        if gradient_checkpointing_kwargs is not None and "use_reentrant" not in gradient_checkpointing_kwargs:
            gradient_checkpointing_kwargs = {**gradient_checkpointing_kwargs, "use_reentrant": False}
        if ACTIVATION_CHECKPOINTING_NAMES:  # the method under this name is transformers' deprecated alias
            return self._activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)
        return super().gradient_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Turn off activation checkpointing. transformers 5.24 deprecated this name for
        `activation_checkpointing_disable` (which calls this override), but TRL (1.16: DPO's reference pass, GRPO's
        and RLOO's generation) still calls it: done here without the deprecation warning."""
        if ACTIVATION_CHECKPOINTING_NAMES:  # the method under this name is transformers' deprecated alias
            return self._activation_checkpointing_disable()
        return super().gradient_checkpointing_disable()

    def placeholder_mask(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(batch, seq) True at the image placeholders: read from `input_ids`, or, without them, found in
        `inputs_embeds` as the placeholder's embedding (as transformers' LLaVA does; possible when the
        placeholder id lies inside the LLM vocabulary)."""
        image_token_id = self.config.image_token_id
        if input_ids is not None:
            return input_ids == image_token_id
        embeddings = self.get_input_embeddings()
        vocab_size = vocabulary_size(embeddings)
        if image_token_id >= vocab_size and pixel_values is None:
            return torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        if image_token_id >= vocab_size:
            raise ValueError(
                f"With inputs_embeds and no input_ids, the image placeholders cannot be found: the image token "
                f"({image_token_id}) has no embedding in the LLM vocabulary ({vocab_size}). Pass "
                "input_ids (the processor's output)."
            )
        placeholder = embeddings(torch.tensor(image_token_id, device=inputs_embeds.device)).to(
            inputs_embeds.dtype
        )
        return (inputs_embeds == placeholder).all(dim=-1)

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs: Any,
    ) -> tuple[torch.LongTensor | None, dict[str, Any]]:
        """Beam search and `num_return_sequences` repeat each sample `expand_size` times. GenerationMixin repeats
        every tensor row by row, which is right for per-sample rows but not for per-image rows (`pixel_values`,
        CROME's Q-Former inputs): a sample with two images [A, B] needs [A, B, A, B], not [A, A, B, B], or its
        copies would be given the wrong images. So the per-image rows are repeated by sample here."""
        per_image = {
            name: model_kwargs.pop(name)
            for name in self.per_image_input_names
            if isinstance(model_kwargs.get(name), torch.Tensor)
        }
        if expand_size > 1 and per_image:
            text_ids = input_ids if input_ids is not None and input_ids.numel() else None
            mask = self.placeholder_mask(
                text_ids, model_kwargs.get("inputs_embeds"), per_image.get("pixel_values")
            )
            images_per_sample = (mask.sum(dim=-1) // self.config.num_image_tokens).tolist()
            order = image_order_for_expansion(images_per_sample, expand_size)
            for name, values in per_image.items():
                if len(order) == expand_size * values.shape[0]:
                    per_image[name] = values[torch.tensor(order, device=values.device)]
                else:  # images and placeholders disagree: forward's image-count check says what is wrong
                    per_image[name] = values.repeat_interleave(expand_size, dim=0)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        return input_ids, {**model_kwargs, **per_image}

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Any = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """GenerationMixin's, except that the images are kept whenever the cache has not seen the prompt yet.
        GenerationMixin drops `pixel_values` outside "the first iteration", and an assistant model (assisted
        generation, `generate(..., assistant_model=...)`) runs even its first round as a later iteration: it would
        see the image placeholders without their images. (Both names of the cache, and `inputs_embeds`, stay in
        the signature: generate reads it to tell model keywords from typos, and to allow generation from
        embeddings.)"""
        cache = cache if cache is not None else past_key_values
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **cache_kwargs(cache),
            **kwargs,
        )
        if cache is None or cache.get_seq_length() == 0:
            for name in self.per_image_input_names:
                if name not in model_inputs and kwargs.get(name) is not None:
                    model_inputs[name] = kwargs[name]
        return model_inputs

    def _get_logits_processor(
        self, *args: Any, encoder_input_ids: torch.LongTensor | None = None, **kwargs: Any
    ) -> LogitsProcessorList:
        """GenerationMixin's, with the processors that index the logits by the prompt's ids
        (`encoder_repetition_penalty`, `encoder_no_repeat_ngram_size`) kept clear of the image placeholders, whose
        id lies outside the vocabulary (see prompt_logits_processors.py; they stopped with an IndexError)."""
        vocab_size = self.config.get_text_config().vocab_size
        if isinstance(encoder_input_ids, torch.Tensor) and encoder_input_ids.dim() == 2:
            encoder_input_ids = encoder_input_ids.clamp(max=vocab_size)
        processors = super()._get_logits_processor(*args, encoder_input_ids=encoder_input_ids, **kwargs)
        return placeholder_safe(processors, vocab_size)

    def heal_tokens(self, input_ids: torch.LongTensor, tokenizer: Any = None) -> torch.LongTensor:
        """Refused: transformers' token healing (`generate(token_healing=True)`) decodes the prompts to text and
        tokenizes them again, which drops the image placeholders (outside the vocabulary) and leaves the inputs
        that follow `input_ids` (attention_mask, CROME's prompt_mask) at the old length."""
        raise ValueError(
            f"token_healing is not supported by {type(self).__name__}: it decodes the prompts to text and tokenizes "
            "them again, which drops the image placeholders (their id lies outside the vocabulary). Generate "
            "without it."
        )

    def init_continuous_batching(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: transformers' continuous batching (`generate_batch`, `init_continuous_batching`) feeds the model
        bare token lists through a paged KV cache. It takes no images, and the models' forward (routing, visual
        tokens) does not run on that cache: each request failed with only a log line and an empty answer."""
        raise NotImplementedError(
            f"{type(self).__name__} does not support transformers' continuous batching (generate_batch / "
            "init_continuous_batching): it takes token lists without images and runs a paged cache the adapters do "
            "not run on. Use generate() on a padded batch from the processor (batches may mix image and text-only "
            "samples)."
        )

    def check_assistant_model(self, assistant_model: Any) -> None:
        """Assisted generation hands every model input (the images included) to the assistant's own `generate`:
        only a model of the same class can take them. transformers would stop inside the assistant's `generate`
        with a list of "unused" model keywords."""
        if assistant_model is not None and not isinstance(assistant_model, type(self)):
            raise TypeError(
                f"assistant_model must be a {type(self).__name__} too (assisted generation gives the assistant the "
                f"same inputs, images included), not {type(assistant_model).__name__}. For a draft model without "
                "images, use prompt lookup instead: generate(..., prompt_lookup_num_tokens=10)."
            )

    def check_inputs(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        past_length: int = 0,
        position_ids: torch.Tensor | None = None,
    ) -> None:
        """Refuse malformed inputs with a message that names the argument, before any backbone runs: token ids that
        are not a non-empty 2-D integer tensor, an attention mask of another batch size or length (or neither 2-D
        nor transformers' 4-D custom mask), positions of another length, images that are not (num_images, channels,
        height, width) floats with the tower's channel count, a sequence longer than the LLM's context. Skipped
        while torch.compile traces (checks on values would break the graph)."""
        if is_compiling():
            return
        if input_ids is not None:
            check_token_ids(
                input_ids,
                "input_ids",
                "batch, sequence",
                "add a batch dimension with input_ids[None] (the processor returns it so).",
            )
            if input_ids.numel() == 0:
                raise ValueError(
                    f"input_ids is empty (shape {tuple(input_ids.shape)}): give each sample at least one token."
                )
            if attention_mask is not None and attention_mask.dim() not in (2, 4):
                raise ValueError(
                    f"attention_mask must be 2-D (batch, sequence), as the processor returns it (or a 4-D custom "
                    f"mask, as transformers' models take it), got shape {tuple(attention_mask.shape)}."
                )
            if position_ids is not None and position_ids.shape[-1] != input_ids.shape[1]:
                raise ValueError(
                    f"position_ids has shape {tuple(position_ids.shape)} but input_ids {tuple(input_ids.shape)}: "
                    "one position per token of input_ids. Leave it out to have positions counted from the "
                    "attention mask."
                )
            if attention_mask is not None and attention_mask.dim() == 2:
                expected = (input_ids.shape[0], past_length + input_ids.shape[1])
                if attention_mask.shape[0] != expected[0] or attention_mask.shape[1] not in (
                    input_ids.shape[1],
                    expected[1],
                ):
                    raise ValueError(
                        f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                        f"{tuple(input_ids.shape)}: they must describe the same batch and sequence."
                    )
            limit = getattr(self.config.text_config, "max_position_embeddings", None)
            length = past_length + input_ids.shape[1] + self._position_offset()
            if limit is not None and length > limit:
                raise ValueError(
                    f"The sequence is {length} positions long but the LLM's context holds {limit} "
                    "(max_position_embeddings). Shorten the prompt, or let the processor truncate it "
                    "(overflow='truncate_left' with max_length)."
                )
        if pixel_values is not None:
            self.check_pixel_values(pixel_values)

    def check_pixel_values(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> None:
        """Refuse images that are not (num_images, channels, height, width) floats with the tower's channel count,
        or not of the size a fixed-size tower takes (`forward` and `get_image_features` check them before the tower
        runs). Skipped while torch.compile traces."""
        if is_compiling():
            return
        channels = getattr(self.config.vision_config, "num_channels", 3)
        if pixel_values.dim() != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values must be (num_images, {channels}, height, width), got shape "
                f"{tuple(pixel_values.shape)}. Build them with the model's processor (it converts grayscale "
                "and RGBA images to RGB)."
            )
        if not pixel_values.dtype.is_floating_point:
            raise ValueError(
                f"pixel_values must be floating point (normalised by the processor), got {pixel_values.dtype}."
            )
        size = self._fixed_image_size
        height, width = pixel_values.shape[-2:]
        if size is not None and not interpolate_pos_encoding and (height, width) != (size, size):
            raise ValueError(
                f"pixel_values hold {height}x{width} images, but the vision tower "
                f"({self.config.vision_config.model_type}) takes {size}x{size} (its config's image_size; it "
                "interpolates its position embeddings only when asked). Build them with the model's processor, "
                "which resizes to that size."
            )

    @functools.cached_property
    def _fixed_image_size(self) -> int | None:
        """The image size the vision tower takes, None where it takes any: towers with an `interpolate_pos_encoding`
        switch (CLIP, SigLIP, BLIP, ViT) take their config's size unless it is on; others take any size themselves
        (DINOv2, Idefics3)."""
        if getattr(self.config.vision_config, "image_size", None) is None:
            return None
        forward = inspect.signature(type(self.vision_tower).forward).parameters
        return (
            square_side(self.config.vision_config, "image_size")
            if "interpolate_pos_encoding" in forward
            else None
        )

    def check_labels(self, labels: torch.Tensor, batch: int, length: int | None) -> None:
        """Refuse `labels` that cannot be scored against the inputs, naming both shapes (torch's cross entropy would
        stop with "Expected input batch_size (36) to match target batch_size (32)"). `length`: the sequence length
        they must have (a decoder-only LLM: the whole sequence); None for an encoder-decoder's answer."""
        if is_compiling():
            return
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must hold integer token ids (-100 where nothing is scored), got {labels.dtype}."
            )
        if (
            labels.dim() != 2
            or labels.shape[0] != batch
            or (length is not None and labels.shape[1] != length)
        ):
            expected = f"({batch}, {length})" if length is not None else f"({batch}, answer length)"
            layout = (
                "the whole sequence, as input_ids, with -100 where nothing is predicted"
                if length is not None
                else "the answer's token ids"
            )
            raise ValueError(
                f"labels has shape {tuple(labels.shape)} but must be {expected}: {layout}. The processor builds "
                "them: processor(images=..., text=prompts, answers=answers)."
            )

    def _position_offset(self) -> int:
        """Positions the model uses before the text (LaVIN's modality token takes position 0)."""
        return 0

    def _return_dict(self, return_dict: bool | None) -> bool:
        return self.config.return_dict if return_dict is None else return_dict

    def _text_labels(self, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """`labels` without the image placeholders (`labels_without_image_tokens`): `labels=input_ids` works."""
        return labels_without_image_tokens(
            labels, self.config.image_token_id, self.config.text_config.vocab_size, ignore_index
        )

    def _decoder_only_output(
        self,
        inputs_embeds: torch.Tensor,
        image_outputs: Any,
        labels: torch.Tensor | None,
        logits_to_keep: int | torch.Tensor,
        supervised_logits_only: bool,
        llm_kwargs: dict[str, Any],
    ) -> VisionLanguageCausalLMOutput | BaseModelOutputWithPast:
        """The decoder-only LLM on the prepared input embeddings (the end of both models' `forward`): logits and
        loss (`causal_lm_output`; `llm_kwargs` holds the attention mask, positions, cache, adapter and loss
        keyword arguments), with the image outputs attached as transformers' vision-language models do. For
        `model.base_model(...)` (`last_hidden_state_only`): the LLM's decoder output, without the head."""
        if llm_kwargs.pop(LAST_HIDDEN_STATE_ONLY, False):  # model.base_model(...)
            return last_hidden_state_output(self.language_model, inputs_embeds, llm_kwargs)
        if labels is not None:
            self.check_labels(labels, inputs_embeds.shape[0], inputs_embeds.shape[1])
            labels = self._text_labels(labels, llm_kwargs.get("ignore_index", -100))
        output = causal_lm_output(
            self.language_model,
            self.loss_function,
            self.config.text_config.vocab_size,
            inputs_embeds,
            labels,
            logits_to_keep,
            supervised_logits_only,
            llm_kwargs,
        )
        if image_outputs is not None:
            output.image_outputs = image_outputs
            output.image_hidden_states = image_outputs.pooler_output
        return output

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    @property
    def base_model(self) -> MultimodalBody:
        """The model without its LM head: `model.base_model(**inputs).last_hidden_state` are the LLM's final hidden
        states with the images placed and the adapters applied (transformers' vision-language models' body, e.g.
        LLaVA's `model.model`); see multimodal_body.py."""
        return MultimodalBody(self)

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Embedding:
        """Resize the LLM's input embeddings and LM head (both stay frozen), and record the new size."""
        embeddings = self.language_model.resize_token_embeddings(*args, **kwargs)
        self.config.text_config.vocab_size = embeddings.num_embeddings
        self.vocab_size = embeddings.num_embeddings
        return embeddings

    # ------------------------------------------------------------------------------------------------
    # Construction around backbones
    # ------------------------------------------------------------------------------------------------

    @classmethod
    def from_backbones(
        cls,
        text_model: BackboneSpec,
        vision_model: BackboneSpec,
        adapter_config: Any = None,
        dtype: torch.dtype | str | None = None,
        text_revision: str | None = None,
        vision_revision: str | None = None,
        **kwargs: Any,
    ) -> Self:
        """Build the model around a frozen LLM and a frozen vision tower.

        Args:
            text_model: a Hub id, a local folder, a config object (random weights) or a loaded model of a
                causal LM (or, for CROME, a T5-style encoder-decoder; e.g. one you loaded quantised or with your own
                device map).
            vision_model: the same for a CLIP/SigLIP vision tower (a full CLIP checkpoint also works).
            adapter_config: the method's adapter settings (LaVIN: `MMAdapterConfig`, CROME: `CromeAdapterConfig`;
                or a dict of its fields; default: the paper's); not modified.
            dtype: dtype of the frozen backbones (adapters stay float32). Default float32.
            text_revision, vision_revision: Hub revisions to load (recorded in the config).
            **kwargs: loading keywords of `from_pretrained` (`attn_implementation`, `device_map`, `max_memory`,
                `offload_folder`, `quantization_config`, `token`, `cache_dir`, `local_files_only`, ...: see
                `mmadapters.modeling.loading`) and other fields of the model's config (LaVIN: vision_feature_layers,
                projector_hidden_size, ...). Anything else raises TypeError.

        Returns the model in eval mode, as from_pretrained does. Works under `with torch.device("meta"):` with
        config objects, for instant full-size parameter counts.
        """
        kwargs["dtype"] = dtype
        where = f"{cls.__name__}.from_backbones"
        options = take_loading_options(kwargs, where)
        if options.loading_info is not None:
            raise LoadingOptionError(
                f"{where} does not take `output_loading_info` (a from_pretrained keyword): it builds a new model. "
                "Load the backbones with their own from_pretrained(..., output_loading_info=True) and pass them in."
            )
        fields = cls._take_config_fields(kwargs, where)
        if (isinstance(text_model, PreTrainedModel) or isinstance(vision_model, PreTrainedModel)) and (
            options.device_map is not None
        ):
            raise LoadingOptionError(
                "device_map places the backbones that from_backbones loads; a backbone passed as a loaded model "
                "stays where it is (load it with its own device_map). Our modules follow their layers' devices."
            )
        device_maps, own_map = cls._plan_placement(
            options,
            lambda: cls._composite_config(
                None,
                adapter_config,
                {
                    **fields,
                    "text_config": _config_of(text_model, options, text_revision, "text"),
                    "vision_config": vision_config_of(
                        _config_of(vision_model, options, vision_revision, "vision")
                    ),
                },
            ),
        )
        backbones = load_backbones(
            text_model, vision_model, options, text_revision, vision_revision, device_maps
        )
        config = cls._composite_config(
            backbones.text_ref,
            adapter_config,
            {**backbones.config_kwargs(), **fields},
            backbones.hub_kwargs,
        )
        backbones.restore_implementations(config)
        config.backbone_quantization = _quantization_record(backbones.language_model, backbones.vision_tower)
        model = cls(config, language_model=backbones.language_model, vision_tower=backbones.vision_tower)
        model.generation_config = GenerationConfig.from_dict(
            backbones.language_model.generation_config.to_dict()
        )
        model._follow_backbone_devices(own_map)
        model.watch_backbones()
        # One mode for the whole model, eval, as from_pretrained gives (the backbones came in eval mode from their
        # own from_pretrained, in training mode from a config object; our modules were built in training mode).
        # A Trainer, or `model.train()`, turns training mode on.
        return model.eval()

    @classmethod
    def _take_config_fields(cls, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
        """Pop the config fields from `kwargs`; a keyword that is neither a loading keyword nor a field of the
        config raises TypeError, as transformers does for unknown keywords."""
        allowed = {f.name for f in dataclasses.fields(cls.config_class)}
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in allowed}
        if kwargs:
            raise unexpected_keywords_error(f"{where}()", kwargs, cls.config_class)
        return fields

    @classmethod
    def _plan_placement(
        cls, options: BackboneLoadOptions, meta_config: Any
    ) -> tuple[tuple[dict | None, dict | None], dict | None]:
        """Per-backbone device maps and the map of our modules, from the whole model's map (None: no map).
        `meta_config` builds the model's config for a meta-device copy of the model (only when needed)."""
        if options.device_map is None:
            return (None, None), None
        config = meta_config()
        with torch.device("meta"):
            meta_model = cls(config)
        for role, backbone in zip(ROLES, (meta_model.language_model, meta_model.vision_tower), strict=True):
            if options.dtype[role] not in (None, "auto"):
                backbone.to(options.dtype[role])
        full_map = compute_device_map(meta_model, options)
        text_map, vision_map, own_map = split_device_map(full_map)
        return (text_map or None, vision_map or None), {**own_map, "__main__": main_device_of(full_map)}

    def _follow_backbone_devices(self, own_map: dict | None) -> None:
        """Put our modules where they run: each layer adapter on the device its backbone layer runs on, the rest
        where the map says (default: the LLM's input device). Records `hf_device_map` when a map was given."""
        backbones_placed = any(
            hasattr(m, "hf_device_map") or m.device.type != "cpu"
            for m in (self.language_model, self.vision_tower)
        )
        if own_map is None and not backbones_placed:
            return
        own_map = dict(own_map or {})
        main_device = own_map.pop("__main__", None) or _execution_device(self.get_input_embeddings())
        move_own_modules(self, own_map or {"": main_device}, main_device)
        for adapter, layer in self.own_layer_adapters():
            device = _execution_device(layer)
            if device is not None and str(device) != "meta":
                adapter.to(device)
        self.hf_device_map = self._merged_device_map()

    def _merged_device_map(self) -> dict[str, Any]:
        merged = {}
        for role_name in BACKBONE_MODULES:
            module = getattr(self, role_name)
            for key, device in (
                getattr(module, "hf_device_map", None) or {"": _first_device(module)}
            ).items():
                merged[f"{role_name}.{key}" if key else role_name] = device
        for name, child in self.named_children():
            if name in BACKBONE_MODULES or child is None:
                continue
            if isinstance(child, nn.ModuleList):  # layer adapters: one entry each (they follow their layers)
                merged.update({f"{name}.{i}": _first_device(item) for i, item in enumerate(child)})
            else:
                merged[name] = _first_device(child)
        for name, parameter in self.named_parameters(recurse=False):
            merged[name] = _device_name(parameter.device)
        return merged

    # ------------------------------------------------------------------------------------------------
    # Adapter-only checkpoints
    # ------------------------------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The saved side only (see `adapter_module_names`) and the tensors of PEFT layers on the backbones; the
        frozen backbone weights are never included."""
        return self._adapter_entries(self.state_dict())

    def _adapter_entries(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter tensors among a whole-model `state_dict` (this model's, or one gathered for it)."""
        names = self.adapter_module_names()
        # Module names as seen inside an FSDP / activation-checkpointing / torch.compile wrapper carry the
        # wrappers' prefixes; a gathered state dict does not.
        peft_prefixes = tuple(without_wrapper_prefixes(p) for p in peft_on_top.peft_state_prefixes(self))
        return {
            k: v
            for k, v in state_dict.items()
            if k.split(".", 1)[0] in names or (peft_prefixes and k.startswith(peft_prefixes))
        }

    def _adapter_tensors(self, state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The adapter tensors to save: the model's own, or those of a given whole-model `state_dict` (under FSDP
        or ZeRO-3 the live module holds a shard, and reading its state dict on one process alone would wait for
        the others: the gathered one is read instead)."""
        if state_dict is None:
            return self.adapter_state_dict()
        if not state_dict:  # what a Trainer hands over under ZeRO-3 without gathering
            raise ValueError(
                "The state_dict given to save_pretrained is empty. Under DeepSpeed ZeRO-3 the Trainer passes an empty "
                'one unless "stage3_gather_16bit_weights_on_model_save": true is set under "zero_optimization".'
            )
        entries = self._adapter_entries(state_dict)
        present = {name for name in self.adapter_module_names() if getattr(self, name, None) is not None}
        missing = sorted(present - {k.split(".", 1)[0] for k in entries})
        if missing:
            raise ValueError(
                f"The state_dict given to save_pretrained holds no tensors of {missing}: pass the model's whole state "
                "dict (as a Trainer gathers it), or none to save the model's own."
            )
        return entries

    def load_adapter_state_dict(
        self, state_dict: dict[str, torch.Tensor], source: str = "state dict"
    ) -> None:
        """Load adapter tensors, refusing missing, unexpected or mis-shaped ones with a clear message."""
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        mis_shaped = [
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in sorted(set(expected) & set(state_dict))
            if state_dict[k].shape != expected[k].shape
        ]
        if missing or unexpected or mis_shaped:
            raise ValueError(
                f"The adapter weights in {source} do not fit this model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, shape mismatches {mis_shaped[:5]}. Were they trained with another backbone or "
                "another adapter configuration?"
            )
        bad = []
        for key, value in sorted(state_dict.items()):
            if value.dtype.is_floating_point != expected[key].dtype.is_floating_point:
                bad.append(f"{key} (dtype {value.dtype}, the model's is {expected[key].dtype})")
            elif value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
                bad.append(f"{key} (not finite)")
        if bad:
            raise ValueError(
                f"The adapter weights in {source} are unusable: {', '.join(bad[:5])}. Adapter weights must be finite "
                "floating-point values; the checkpoint is corrupt or was written by a diverged run."
            )
        self.load_state_dict(state_dict, strict=False)

    def backbones_are_referenced(self) -> bool:
        """Whether both backbones can be found again by name (an adapter-only checkpoint can then be loaded)."""
        return all(getattr(self.config, f"{role}_backbone") is not None for role in ROLES)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        adapter_only: bool = True,
        processor: Any = None,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Save the adapters only (default) or, with `adapter_only=False`, every weight. A processor given is
        saved too, so that `AutoProcessor` and `pipeline` load the folder.

        A model whose backbones were built from config objects (random weights: nothing names them) is saved
        with every weight even when `adapter_only=True`, so that it reloads identically, as any transformers
        model does; a log line says so.

        transformers' keywords: `is_main_process=False` writes nothing (the other processes of a distributed run);
        `state_dict` is what to save, e.g. the full state dict a Trainer gathered under FSDP or DeepSpeed ZeRO-3
        (an adapter-only save takes the adapter tensors from it: the live module holds only a shard). A full save
        passes the others on to `PreTrainedModel.save_pretrained`; an adapter-only save refuses those that would
        change what it writes (`check_adapter_only_save_options`). `push_to_hub=True` is refused: save, then
        `push_to_hub(repo_id)`, which also writes the model card."""
        if push_to_hub:
            raise ValueError(
                "save_pretrained(push_to_hub=True) is not supported: save, then call model.push_to_hub(repo_id) "
                "(or `mmadapters push FOLDER REPO_ID`), which uploads the checkpoint with a generated model card."
            )
        self.check_save_directory(save_directory)
        if processor is not None:
            self.check_processor(processor)
        referenced = self.backbones_are_referenced()
        shard_limit = None
        if adapter_only and referenced:
            shard_limit = kwargs.pop("max_shard_size", None)
            if shard_limit is not None:
                size_in_bytes(shard_limit)  # a malformed size is refused on every process
            check_adapter_only_save_options(kwargs)
        if not is_main_process:
            return
        if adapter_only and not referenced:
            logger.info(
                "The backbones were built from config objects (random weights) and cannot be found again by "
                "name: saving every weight so that the model reloads identically."
            )
            adapter_only = False
        peft_on_top.sync_record(self)
        peft_hotswap.record_lora_scalings(self)
        if adapter_only:
            self._refuse_changed_backbones(state_dict)
            adapter_state = {
                k: v.detach().contiguous().cpu() for k, v in self._adapter_tensors(state_dict).items()
            }
            check_adapter_file_fits(adapter_state, shard_limit)
        else:
            peft_on_top.check_full_checkpoint_can_rebuild(self)
        # The remote-code loader: the checkpoint loads with trust_remote_code=True and no `import mmadapters`.
        self.config.auto_map = model_auto_map(type(self.config), type(self))
        # As transformers' save writes it (a full save does so itself): TRL reloads a reference model by it, and
        # the Hub and serving tools read it.
        self.config.architectures = [type(self).__name__]
        folder = os.fspath(save_directory)
        replaces = replaced_by_adapter_save(folder) if os.path.isdir(folder) else None
        # Written into a staging folder and swapped in: a kill at any moment leaves the old or the new checkpoint.
        with atomic_directory(save_directory, **({"replaces": replaces} if replaces else {})) as staging:
            if not adapter_only:
                # The adapter settings and the PEFT record are in config.json; the PEFT layers' tensors are among
                # the weights (config.json makes every load rebuild their layers first). The quantisation record
                # says how the backbones in the file are quantised: a backbone dequantized since loading is
                # saved, and reloads, in full precision. (An adapter-only save keeps the record of how they were
                # loaded: quantising their sources again rebuilds the values a dequantized backbone holds.)
                self._name_tied_weights_as_held()  # PEFT layers added since construction
                loaded_quantization = self.config.backbone_quantization
                self.config.backbone_quantization = _quantization_record(
                    self.language_model, self.vision_tower
                )
                try:
                    PreTrainedModel.save_pretrained(self, staging, state_dict=state_dict, **kwargs)
                finally:
                    self.config.backbone_quantization = loaded_quantization
            else:
                # As transformers' save records it: the dtype the weights are in now.
                self.config.dtype = self.dtype
                self.config.save_pretrained(staging)
                self.generation_config.save_pretrained(staging)
                save_file(
                    adapter_state, os.path.join(staging, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"}
                )
            write_loader(staging)
            if processor is not None:
                processor.save_pretrained(staging)

    def check_processor(self, processor: Any) -> None:
        """Refuse, before anything is saved with it, a processor that does not build this model's inputs: another
        method's (or a bare tokenizer: no processor would load from the folder), one that expands `<image>` to
        another number of visual tokens, one whose tokenizer gives the image placeholder another id (built on another
        LLM's tokenizer), or one for the other kind of LLM (decoder-only / encoder-decoder)."""
        processor_name = type(self).__name__.replace("ForConditionalGeneration", "Processor")
        how = f"Build it with {processor_name}.from_model(model), or from_backbones with this model's backbones."
        if getattr(processor, "model_type", None) != self.config.model_type:
            method = METHOD_NAMES[self.config.model_type].name
            raise ValueError(
                f"{type(processor).__name__} is not a processor of {method} ({processor_name}). {how}"
            )
        if processor.num_image_tokens != self.config.num_image_tokens:
            raise NumImageTokensError(
                f"The processor expands each <image> to {processor.num_image_tokens} visual tokens, but this model "
                f"makes {self.config.num_image_tokens} per image. {how}"
            )
        if processor.image_token_id != self.config.image_token_id:
            raise ValueError(
                f"The processor's tokenizer gives the image placeholder id {processor.image_token_id}, but this "
                f"model's is {self.config.image_token_id}: it was built for another LLM. {how}"
            )
        encoder_decoder = bool(getattr(self.config.text_config, "is_encoder_decoder", False))
        if getattr(processor, "encoder_decoder", encoder_decoder) != encoder_decoder:
            raise ValueError(
                f"The processor lays out inputs for {'a decoder-only' if encoder_decoder else 'an encoder-decoder'} "
                f"LLM, but this model's is {'encoder-decoder' if encoder_decoder else 'decoder-only'}. {how}"
            )

    def check_save_directory(self, save_directory: str | os.PathLike) -> None:
        """Refuse, before anything is written, to save into the folder a backbone was loaded from: the save would
        replace that backbone's config.json and weights, and this checkpoint, which reads its backbones from
        there, could no longer load. (Our Trainers check their output folder when they are built.)"""
        target = os.path.realpath(save_directory)
        for role, backbone in (("text", self.language_model), ("vision", self.vision_tower)):
            source = getattr(backbone, "name_or_path", "") or ""
            if source and os.path.isdir(source) and os.path.realpath(source) == target:
                raise ValueError(
                    f"{os.fspath(save_directory)} is the folder the {role} backbone was loaded from: saving there "
                    "would replace its config.json and weights with this checkpoint's, and the checkpoint reads its "
                    "backbones from there. Save to another folder."
                )

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoModel") -> None:
        """A no-op: our models are registered with the Auto classes by `import mmadapters`, and every save writes
        its own `auto_map` (see `mmadapters.hub.remote_code`). transformers calls this when it loads one of our
        repos as remote code; its version would make later saves copy this package's source files instead."""

    def _refuse_changed_backbones(self, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Refuse an adapter-only save that would lose a change to the backbone weights; read from `state_dict`
        when one is given (see `save_pretrained`)."""
        watch = getattr(self, "_backbone_watch", None)
        if watch is None:
            return
        if state_dict is None:
            changed = watch.changed(backbone_tensors(self._backbone_modules()))
        else:
            changed = watch.changed(backbone_tensors_in(state_dict, BACKBONE_MODULES))
        if changed:
            raise BackboneChangedError(
                f"The backbone weights changed since the model was loaded ({len(changed)} tensors, e.g. "
                f"{changed[:3]}): a merged LoRA (merge_and_unload), resized token embeddings or a trained backbone. "
                "An adapter-only checkpoint "
                "re-reads the backbones from their source and would lose the change. Save every weight with "
                "save_pretrained(folder, adapter_only=False), or keep the LoRA unmerged (it is saved with the "
                "adapters)."
            )

    def _backbone_modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in BACKBONE_MODULES}

    def watch_backbones(self) -> None:
        """Remember the backbones' weights as they are now (see `BackboneWatch`), and keep bitsandbytes from
        rewriting quantised ones (`keep_quantized_weights_in_place`); called once loaded."""
        for backbone in self._backbone_modules().values():
            keep_quantized_weights_in_place(backbone)
        self._backbone_watch = BackboneWatch(backbone_tensors(self._backbone_modules()))

    # ------------------------------------------------------------------------------------------------
    # PEFT on top (transformers' PeftAdapterMixin API, scoped to the backbones; see peft_on_top)
    # ------------------------------------------------------------------------------------------------

    def add_adapter(
        self, adapter_config: Any, adapter_name: str | None = None, on: str = "language_model"
    ) -> None:
        """Add fresh PEFT layers (e.g. a `LoraConfig`) to the LLM (default), the vision tower or both (`on`); they
        train with our adapters and are saved with them. Unlike transformers' version, the layers go into the
        backbone named by `on`, not into every matching module of the model."""
        peft_on_top.inject_peft_layers(self, adapter_config, adapter_name or "default", on)

    def load_adapter(
        self,
        peft_model_id: str | os.PathLike | None = None,
        adapter_name: str | None = None,
        on: str | None = None,
        revision: str | None = None,
        token: str | None = None,
        is_trainable: bool = False,
        adapter_kwargs: dict[str, Any] | None = None,
        load_config: Any = None,
        peft_config: Any = None,
        adapter_state_dict: dict[str, torch.Tensor] | None = None,
        hotswap: bool | str = "auto",
        low_cpu_mem_usage: bool = False,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> LoadStateDictInfo:
        """Load a PEFT adapter (a folder or Hub repo that `PeftModel.save_pretrained` wrote, or, as in transformers,
        `adapter_state_dict` in PEFT's saved form with its `peft_config`) onto the model; see
        `mmadapters.modeling.peft_on_top.load_peft_adapter`. It is saved with our adapters by save_pretrained.

        `adapter_kwargs` (`revision`, `token`, `cache_dir`, `force_download`, `local_files_only`, `subfolder`) and
        `local_files_only` as in transformers; transformers' loader calls this with them when
        a full checkpoint comes with a PEFT adapter, and with `load_config`, its settings for the model's own
        weights (dtype, placement), which the adapter's layers take from the layers they wrap. Returns the
        adapter's loading report, as transformers does (`from_pretrained(..., output_loading_info=True)` of a full
        checkpoint returns it): empty, since a tensor without its place is refused, not reported.

        `hotswap` as in transformers: True replaces the weights and scalings of the loaded LoRA `adapter_name` in
        place (a compiled model does not recompile); "auto" does so after `enable_peft_hotswap` where that name is
        loaded. See `mmadapters.modeling.peft_hotswap`."""
        adapter_kwargs = dict(adapter_kwargs or {})
        unsupported = sorted(set(adapter_kwargs) - set(PEFT_ADAPTER_KWARGS))
        if kwargs or unsupported:
            raise TypeError(
                f"load_adapter() got keyword argument(s) {sorted(kwargs)} (adapter_kwargs {unsupported}) that "
                "mmadapters does not support here (supported: adapter_name, on, revision, token, is_trainable, "
                "peft_config, adapter_state_dict, hotswap, local_files_only, adapter_kwargs with "
                f"{list(PEFT_ADAPTER_KWARGS)})."
            )
        if low_cpu_mem_usage:
            raise TypeError(
                "load_adapter(low_cpu_mem_usage=True) is not supported: PEFT layers are created in memory and "
                "filled from the file (they are a few megabytes); drop the keyword."
            )
        download = {
            **adapter_kwargs,
            "revision": revision if revision is not None else adapter_kwargs.get("revision"),
            "token": token if token is not None else adapter_kwargs.get("token"),
            "local_files_only": local_files_only or bool(adapter_kwargs.get("local_files_only")),
        }
        name = adapter_name or "default"
        swap = peft_hotswap.wants_hotswap(self, name, hotswap)
        adapter = peft_on_top.read_peft_adapter(
            self, peft_model_id, on, download, peft_config, adapter_state_dict
        )
        if swap:
            peft_hotswap.hotswap_lora(self, adapter, name, is_trainable)
        else:
            peft_hotswap.check_before_padded_load(self, adapter)
            peft_on_top.place_peft_adapter(self, adapter, name, is_trainable)
            peft_hotswap.pad_loaded_adapter(self, name)
        return LoadStateDictInfo(
            missing_keys=set(),
            unexpected_keys=set(),
            mismatched_keys=set(),
            error_msgs=[],
            conversion_errors={},
            skipped_pp_keys=set(),
        )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """nn.Module's, after a check that the PEFT tensors in `state_dict` name modules of this model (an adapter
        trained on the bare LLM, given to `PeftModel.from_pretrained`, is refused with the way that works; see
        `peft_on_top.refuse_peft_tensors_of_another_model`)."""
        peft_on_top.refuse_peft_tensors_of_another_model(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _check_peft_adapter_names(self, names: list[str], action: str) -> None:
        """Refuse, before anything changes, a PEFT adapter call on a model without PEFT adapters or with names it
        does not hold, as transformers does (its methods raise ValueError there) rather than do nothing. Known: the
        recorded adapters and those whose layers are in the model (a `get_peft_model` wrapper not yet adopted)."""
        known = sorted(set(self.config.peft_adapters or {}) | peft_on_top.adapter_names_in(self))
        if not known:
            raise peft_on_top.PeftOnTopError(
                f"No PEFT adapter loaded: nothing to {action}. Add one with add_adapter() or load_adapter() first. "
                f"{type(self).__name__}'s own adapters are not PEFT adapters: they are part of the model and always "
                "run."
            )
        unknown = [name for name in names if name not in known]
        if unknown:
            raise peft_on_top.PeftOnTopError(f"No PEFT adapter named {unknown}: the model has {known}.")

    def enable_peft_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None:
        """Make LoRA adapters hotswappable without recompiling a compiled model: every LoRA that `load_adapter`
        loads from now on is padded to `target_rank` (the highest rank you will load) and `load_adapter(...,
        hotswap="auto")` swaps into a loaded name. Call it before the first adapter is loaded, as in transformers
        (`check_compiled`: "error", "warn" or "ignore" where adapters are loaded already)."""
        peft_hotswap.enable_peft_hotswap(self, target_rank, check_compiled)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make the named PEFT adapter(s) the active ones."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_peft_adapter_names(names, "set")
        # Every layer takes all the names, as PEFT's set_adapter does (a layer runs those of them it holds), so
        # that any layer answers `active_adapters`.
        for _, layer in peft_on_top.tuner_layers(self):
            layer.set_adapter(names)
        self._thaw_peft_layers()

    def disable_adapters(self) -> None:
        """Run without the PEFT layers (our own adapters stay on)."""
        self._check_peft_adapter_names([], "disable")
        for _, layer in peft_on_top.tuner_layers(self):
            layer.enable_adapters(False)

    def enable_adapters(self) -> None:
        """Run with the PEFT layers again."""
        self._check_peft_adapter_names([], "enable")
        for _, layer in peft_on_top.tuner_layers(self):
            layer.enable_adapters(True)
        self._thaw_peft_layers()

    def active_adapters(self) -> list[str]:
        """Names of the active PEFT adapters ([] without any; transformers raises there, PEFT's layers answer [])."""
        for _, layer in peft_on_top.tuner_layers(self):
            return list(layer.active_adapters)
        return []

    def delete_adapter(self, adapter_names: str | list[str]) -> None:
        """Remove PEFT adapter(s) and their layers' tensors; every name must be one of the model's adapters (checked
        before any is removed)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_peft_adapter_names(names, "delete")
        for _, layer in peft_on_top.tuner_layers(self):
            for name in names:
                if name in layer._all_available_adapter_names():
                    layer.delete_adapter(name)
        peft_on_top.sync_record(self)

    def get_adapter_state_dict(self, adapter_name: str | None = None, state_dict: dict | None = None) -> dict:
        """The tensors of one PEFT adapter (default: the first active one) as PEFT saves them, as transformers'
        method returns them: keys relative to the model without the adapter name (`get_peft_model_state_dict`),
        what `PeftModel.save_pretrained` writes (with its "base_model.model." prefix) and `load_adapter` reads."""
        name = adapter_name or (self.active_adapters() or ["default"])[0]
        self._check_peft_adapter_names([name], "return")
        state = state_dict if state_dict is not None else self.state_dict()
        return peft_on_top.peft_adapter_state_dict(self, name, state)

    def push_to_hub(
        self,
        repo_id: str,
        processor: Any = None,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        adapter_only: bool = True,
        create_pr: bool = False,
        revision: str | None = None,
        commit_description: str | None = None,
        tags: list[str] | None = None,
        max_shard_size: int | str | None = None,
        **kwargs: Any,
    ) -> str:
        """Upload the adapter-only checkpoint (with `processor` files when given, and a generated model card) to
        `repo_id` on the Hub; returns the commit URL (the pull request's with `create_pr=True`).

        transformers' keywords: `private`, `token`, `commit_message`, `commit_description`, `create_pr`,
        `revision` (the branch), `tags` (added to the card) and `max_shard_size` (as in `save_pretrained`: an
        adapter file is one file, refused if it would exceed it). Other options of `mmadapters.hub.push_folder`
        pass through (retries, `allow_local_backbones`, ...)."""
        import tempfile

        from ..hub import push_folder

        save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        with tempfile.TemporaryDirectory() as scratch:
            folder = os.path.join(scratch, "checkpoint")
            self.save_pretrained(folder, adapter_only=adapter_only, processor=processor, **save_kwargs)
            return push_folder(
                folder,
                repo_id,
                private=private,
                token=token,
                commit_message=commit_message,
                include_backbone_weights=not adapter_only,
                create_pr=create_pr,
                revision=revision,
                commit_description=commit_description,
                tags=tags,
                **kwargs,
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None,
        *model_args: Any,
        text_model: BackboneSpec | None = None,
        vision_model: BackboneSpec | None = None,
        ignore_backbone_mismatch: bool = False,
        revision: str | None = None,
        text_revision: str | None = None,
        vision_revision: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load a checkpoint: adapter-only (the backbones are resolved again from the names in config.json, or
        from `text_model` / `vision_model` if given, and checked against the recorded fingerprints) or full.

        Every keyword of `PreTrainedModel.from_pretrained` is honoured or refused with a reason (see
        `mmadapters.modeling.loading`); `text_revision` / `vision_revision` pick the backbones' revisions.

        A PEFT adapter loads as in transformers: a PEFT adapter folder or repo loads the model its
        adapter_config.json names (`base_model_name_or_path`), then the adapter; so does a PEFT adapter saved
        into the checkpoint's folder (`adapter_name` names it)."""
        peft_adapter = PeftAdapterToLoad.pop_from(kwargs)
        # Our one nested config field: the fields given replace the checkpoint's (changed_adapter_settings).
        adapter_settings = kwargs.pop("adapter_config", None)
        if pretrained_model_name_or_path is None:
            peft_adapter.refuse_name_without_adapter("the config")
            kwargs.update(peft_adapter.transformers_keywords())
            return cls._from_full_checkpoint(None, model_args, revision, adapter_settings, kwargs)
        name = os.fspath(pretrained_model_name_or_path)
        recover(name)  # a save killed between its two renames left the checkpoint moved aside: put it back
        if not os.path.isdir(name) and looks_like_local_path(name):
            raise FileNotFoundError(
                f"No checkpoint folder at {name}. Pass the folder that save_pretrained wrote, or a Hub repo id "
                "(namespace/name)."
            )
        # The checkpoint's own files are read with the Hub keywords too (`force_download` mends a broken cache).
        checkpoint_download = ("token", "cache_dir", "local_files_only", "force_download")
        hub_kwargs = {k: kwargs[k] for k in checkpoint_download if k in kwargs}
        # `subfolder`: where the checkpoint lies in the folder or repo (a Trainer push's last-checkpoint/); the
        # backbones are found from its config.json.
        subfolder = kwargs.pop("subfolder", "") or ""
        config_given = kwargs.get("config") is not None
        if not config_given:  # a backbone or the other method's checkpoint: refused before any download
            saved_config = read_checkpoint_config(name, revision, subfolder, **hub_kwargs)
            check_checkpoint_kind(name, saved_config, cls.config_class.model_type)
        folder = resolve_checkpoint_folder(name, revision, subfolder, **hub_kwargs)
        holds_peft_adapter = is_peft_adapter_folder(folder)
        if holds_peft_adapter and not os.path.isfile(os.path.join(folder, "config.json")):
            # A PEFT adapter alone: its base model first (one of our checkpoints), then the adapter.
            base = peft_base_model(folder)
            base_config = base and read_checkpoint_config(
                base["name_or_path"], base["revision"], **hub_kwargs
            )
            base_is_ours = (base_config or {}).get("model_type") == cls.config_class.model_type
            if not base_is_ours or peft_adapter.path is not None:
                raise ValueError(not_our_checkpoint_message(name, folder))
            peft_adapter.path = folder  # resolved here (a Hub repo's subfolder included)
            return cls.from_pretrained(
                base["name_or_path"],
                *model_args,
                text_model=text_model,
                vision_model=vision_model,
                ignore_backbone_mismatch=ignore_backbone_mismatch,
                revision=base["revision"],
                text_revision=text_revision,
                vision_revision=vision_revision,
                adapter_config=adapter_settings,
                **peft_adapter.transformers_keywords(),
                **kwargs,
            )
        if peft_adapter.path == name and not holds_peft_adapter:
            peft_adapter.path = None  # transformers' Auto classes took our old adapter_config.json for PEFT's
        if peft_adapter.path is None and holds_peft_adapter:
            peft_adapter.path = folder  # saved beside the model: transformers loads it too
        peft_adapter.refuse_name_without_adapter(name)
        if peft_adapter.path is not None:
            peft_adapter.refuse_taken_name(name, (read_checkpoint_config(folder) or {}).get("peft_adapters"))
        if adapter_weights_file(folder) is None:
            incomplete = None if config_given else incomplete_checkpoint_message(name, folder)
            if incomplete:
                raise FileNotFoundError(incomplete)
            if text_model is not None or vision_model is not None:
                raise LoadingOptionError(
                    f"'{name}' is a full checkpoint (it holds the backbones' weights): text_model= / vision_model= "
                    "apply to adapter-only checkpoints."
                )
            kwargs.update(peft_adapter.transformers_keywords())  # transformers' loader calls our load_adapter
            return named_after(
                cls._from_full_checkpoint(folder, model_args, None, adapter_settings, kwargs), name
            )
        if model_args:
            raise TypeError(
                f"{cls.__name__}.from_pretrained() takes no extra positional arguments: {model_args}"
            )
        loaded = cls._from_adapter_checkpoint(
            name,
            folder,
            text_model,
            vision_model,
            ignore_backbone_mismatch,
            text_revision,
            vision_revision,
            adapter_settings,
            kwargs,
        )
        if peft_adapter.path is not None:
            model = loaded[0] if isinstance(loaded, tuple) else loaded
            model.load_adapter(
                peft_adapter.path, adapter_name=peft_adapter.adapter_name, **peft_adapter.adapter_kwargs
            )
        return named_after(loaded, name)

    @classmethod
    def _from_full_checkpoint(
        cls,
        folder: str | None,
        model_args: tuple,
        revision: str | None,
        adapter_settings: Any,
        kwargs: dict[str, Any],
    ) -> Any:
        """A checkpoint with every weight: transformers' own loader (all its keywords apply). Our default dtype is
        float32 (transformers' is "auto")."""
        dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
        asked = dtype if dtype is not None else torch_dtype
        kwargs["dtype"] = torch.float32 if asked is None else one_dtype(asked, folder)
        if revision is not None:
            kwargs["revision"] = revision
        # Hub kernels off unless asked, whatever the release's default (see BackboneLoadOptions.for_backbone).
        kwargs.setdefault("use_kernels", False)
        # The checkpoint's config, read once; a config object given is copied before it is changed.
        given = kwargs.get("config")
        config = given if isinstance(given, PreTrainedConfig) else None
        read_here = config is None and (folder is not None or given is not None)
        if read_here:
            config = cls.config_class.from_pretrained(given if given is not None else folder)
        elif config is not None:
            config = copy.deepcopy(config)
        changed = False
        if adapter_settings is not None:
            if config is None:
                raise ValueError("adapter_config= needs a checkpoint folder or a config to change.")
            config.adapter_config = changed_adapter_settings(
                config, adapter_settings, folder or "the given config"
            )
            changed = True
        if folder is not None and kwargs.get("device_map") is not None:
            kwargs["device_map"] = cls._full_checkpoint_device_map(config, kwargs)
        record = None
        if folder is not None:
            # Quantised backbones: quantisation for them alone (see full_checkpoint_quantization).
            record, quantization = scoped_quantization(
                folder, config, kwargs.pop("quantization_config", None), cls
            )
            if quantization is not None and config.backbone_quantization:
                # Pre-quantised weights in the file: transformers reads how from the config.
                config.quantization_config = quantization
                changed = True
            elif quantization is not None:
                kwargs["quantization_config"] = quantization
        if changed and read_here:
            # transformers sets the keywords that are config attributes (`output_hidden_states=True`) on a config
            # it reads itself (with a config object given, it passes them to the model's __init__). This config
            # was read here for it: they are set as transformers would have.
            for key in [key for key in kwargs if key != "dtype" and hasattr(config, key)]:
                setattr(config, key, kwargs.pop(key))
        if changed:
            kwargs["config"] = config
        # The loading info is always read (and returned when output_loading_info=True asks for it): a backbone weight
        # the checkpoint lacks is refused, as transformers would initialise it at random and the frozen backbone would
        # stay so. A module of ours it lacks gets its initialisation (the identity adapter), as in transformers.
        asked_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(folder, *model_args, output_loading_info=True, **kwargs)
        refuse_missing_weights(
            f"The checkpoint '{folder}'",
            cls,
            [key for key in loading_info["missing_keys"] if key.split(".")[0] in BACKBONE_MODULES],
            "Backbones are frozen, so they would stay so. It is incomplete or was edited (a copy that stopped, a "
            "file changed by hand): save it again with save_pretrained(..., adapter_only=False), or copy it again.",
        )
        loaded = (model, loading_info) if asked_info else model
        if record is not None:
            model.config.backbone_quantization = record
            hand_quantization_to_backbones(model, record)
        peft_on_top.rebuild_layers_with_lost_buffers(model)
        model._restore_trainability()
        model.watch_backbones()
        return loaded

    @classmethod
    def _full_checkpoint_device_map(cls, config: PreTrainedConfig, kwargs: dict[str, Any]) -> Any:
        """The device map for a full checkpoint, resolved as for adapter-only ones (`_plan_placement`): transformers'
        loader would resolve a strategy over the whole model and could offload our own modules (to disk, or to CPU
        beside accelerators), leaving their weights on the meta device where our forward reads them. Here they
        go where they compute (they are small); the backbones' layers are placed as the strategy says."""
        options = BackboneLoadOptions(
            dtype=per_role(kwargs["dtype"], "dtype"),
            device_map=normalize_device_map(kwargs["device_map"]),
            max_memory=kwargs.get("max_memory"),
        )
        if set(options.device_map) == {""}:  # one device for everything: nothing is offloaded
            return kwargs["device_map"]
        (text_map, vision_map), own_map = cls._plan_placement(options, lambda: config)
        main_device = own_map.pop("__main__")
        if "" in own_map:  # the strategy put the whole model on one device
            return {"": own_map[""]}
        device_map = {}
        for prefix, backbone_map in (("language_model", text_map), ("vision_tower", vision_map)):
            for key, device in (backbone_map or {}).items():
                device_map[f"{prefix}.{key}" if key else prefix] = device
        for key, device in own_map.items():
            device_map[key] = execution_device(device, main_device)
        return device_map

    @classmethod
    def _from_adapter_checkpoint(
        cls,
        name: str,
        folder: str,
        text_model: BackboneSpec | None,
        vision_model: BackboneSpec | None,
        ignore_backbone_mismatch: bool,
        text_revision: str | None,
        vision_revision: str | None,
        adapter_settings: Any,
        kwargs: dict[str, Any],
    ) -> Any:
        where = f"{cls.__name__}.from_pretrained"
        generation_config = kwargs.pop("generation_config", None)
        given_config = kwargs.pop("config", None)
        options = take_loading_options(kwargs, where)
        if given_config is None and not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(
                f"'{name}' has adapter weights but no config.json (which names the backbones): the folder is "
                "incomplete. Save it again with model.save_pretrained, or copy config.json from where it was saved."
            )
        adapter_tensors = read_adapter_file(adapter_weights_file(folder), name)
        if isinstance(given_config, PreTrainedConfig):
            config, unused = given_config, kwargs
            options.take_implementations_from(config)
        else:
            config, unused = cls.config_class.from_pretrained(
                given_config or folder, return_unused_kwargs=True, **kwargs
            )
        if unused:
            raise unexpected_keywords_error(f"{where}()", unused, cls.config_class)
        if adapter_settings is not None:
            config = copy.deepcopy(config)
            config.adapter_config = changed_adapter_settings(config, adapter_settings, f"'{name}'")
        _apply_recorded_quantization(options, config)
        options.take_recorded_dtypes(config)
        device_maps, own_map = cls._plan_placement(options, lambda: config)
        overrides = {"text": text_model, "vision": vision_model}
        revisions = {"text": text_revision, "vision": vision_revision}
        loaders = {"text": load_text_backbone, "vision": load_vision_backbone}
        loaded = {}
        for index, role in enumerate(ROLES):
            recorded = getattr(config, f"{role}_backbone")
            if recorded is None:
                raise LoadingOptionError(
                    f"'{name}' has adapter weights but its config.json names no {role} backbone: it is not a "
                    "checkpoint this version of mmadapters wrote. Save it again from the model, or pass "
                    f"{role}_model=... ."
                )
            expected = BackboneReference(**recorded)
            override = overrides[role]
            source = override if override is not None else expected.name_or_path
            revision = revisions[role] or (None if override is not None else expected.revision)
            model, found = loaders[role](source, options, revision, device_maps[index])
            if not ignore_backbone_mismatch:
                check_backbone(role, expected, found, name)
            loaded[role] = model
        attention = {
            "text_config": loaded["text"].config._attn_implementation,
            "vision_config": loaded["vision"].config._attn_implementation,
        }
        config.text_config = loaded["text"].config
        config.vision_config = loaded["vision"].config
        config._attn_implementation = attention
        # As the backbones are now: quantised as recorded, or as this call's quantization_config asked (a save then
        # reloads the model as it was saved, as transformers does for a quantised model).
        config.backbone_quantization = _quantization_record(loaded["text"], loaded["vision"])
        model = cls(config, language_model=loaded["text"], vision_tower=loaded["vision"])
        model.load_referenced_weights(name, ignore_backbone_mismatch, options.hub_kwargs())
        model.load_adapter_state_dict(adapter_tensors, source=name)
        if generation_config is not None:
            model.generation_config = generation_config
        elif os.path.isfile(os.path.join(folder, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(folder)
        model._follow_backbone_devices(own_map)
        model.watch_backbones()
        model.eval()
        if options.loading_info is not None:
            return model, options.composite_loading_info(dict(zip(ROLES, BACKBONE_MODULES, strict=True)))
        return model


def one_dtype(dtype: Any, folder: str | None) -> Any:
    """The dtype of a full checkpoint's load: one for the whole model. transformers would turn a per-backbone dict
    into float32 for everything with a deprecation warning; a dict that asks one dtype for both is taken."""
    if not isinstance(dtype, dict):
        return dtype
    per_backbone = per_role(dtype, "dtype")
    if len({str(value) for value in per_backbone.values()}) > 1:
        raise LoadingOptionError(
            f"{folder or 'This'} is a full checkpoint, which loads in one dtype (transformers deprecates one per "
            f"module); got {dtype}. Pass one dtype and cast a backbone afterwards (model.vision_tower.to(...)), "
            "or save the model adapter-only: each backbone then loads in its own dtype."
        )
    return per_backbone["text"]


def read_adapter_file(path: str, source: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter_model.safetensors, or a clear error for an empty, truncated or foreign file."""
    if os.path.getsize(path) == 0:
        raise ValueError(
            f"{path} is empty (0 bytes): the save that wrote it was interrupted. Save the model again, or resume "
            "training from an earlier checkpoint."
        )
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(
            f"{path} in '{source}' is not a readable safetensors file ({type(error).__name__}: {error}); it is "
            "truncated or corrupt. Save the model again, or download the checkpoint again."
        ) from None


def adapter_settings(adapter_config: Any, config_class: type, text_ref: BackboneReference | None) -> dict:
    """The adapter settings for a new model's config: a copy of the caller's adapter config (an instance of
    `config_class` or a dict of its fields; never modified; the class default when None) naming the LLM it adapts."""
    if adapter_config is None:
        values = {}
    elif isinstance(adapter_config, dict):
        values = dict(adapter_config)
    elif isinstance(adapter_config, config_class):
        values = adapter_config.to_dict()
    else:
        raise TypeError(
            f"adapter_config must be a {config_class.__name__} (or a dict of its fields), got "
            f"{type(adapter_config).__name__}."
        )
    settings = config_class.from_dict(values)  # a copy; unknown fields and wrong types: a clear error
    settings.base_model_name_or_path = text_ref.name_or_path if text_ref else None
    return settings.to_dict()


def _config_of(spec: BackboneSpec, options: BackboneLoadOptions, revision: str | None, role: str) -> Any:
    """A backbone's config without loading its weights (to plan a device map)."""
    from .backbones import backbone_config, resolve_hub_revision

    if isinstance(spec, PreTrainedConfig):
        return spec
    if isinstance(spec, PreTrainedModel):
        return spec.config
    name = os.fspath(spec)
    hub_kwargs = options.hub_kwargs()
    return backbone_config(name, resolve_hub_revision(name, revision, hub_kwargs), role, hub_kwargs)


def _quantization_record(language_model: nn.Module, vision_tower: nn.Module) -> dict | None:
    """How each backbone was quantised (the quantization config as a dict), for `from_pretrained` to redo it."""
    record = {}
    for role, module in (("text", language_model), ("vision", vision_tower)):
        quantization = getattr(module.config, "quantization_config", None) if is_quantized(module) else None
        if quantization is not None:
            record[f"{role}_config"] = quantization_as_dict(quantization)
    return record or None


def _apply_recorded_quantization(options: BackboneLoadOptions, config: Any) -> None:
    """Without a `quantization_config` from the caller, rebuild the backbones quantised as they were trained."""
    record = getattr(config, "backbone_quantization", None)
    if not record or any(value is not None for value in options.quantization.values()):
        return
    from transformers.quantizers.auto import AutoQuantizationConfig

    for role in ROLES:
        if record.get(f"{role}_config") is not None:
            options.quantization[role] = AutoQuantizationConfig.from_dict(dict(record[f"{role}_config"]))


def named_after(loaded: Any, name: str) -> Any:
    """The loaded model (or `(model, loading_info)`) with `name_or_path` set to the name it was loaded by, as
    transformers sets it: PEFT records it as an adapter's base model, which transformers' Auto classes, pipelines
    and PEFT's AutoPeftModel load before the adapter."""
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    model.name_or_path = model.config.name_or_path = name
    return loaded


def _device_name(device: torch.device) -> Any:
    if device.type in ("cpu", "meta"):
        return device.type
    return device.index if device.index is not None else device.type


def _first_device(module: nn.Module) -> Any:
    for tensor in (*module.parameters(), *module.buffers()):
        return _device_name(tensor.device)
    return "cpu"


def _execution_device(module: nn.Module) -> Any:
    """Where `module` computes: the execution device of its accelerate hook (offloaded modules), else the
    device of its first weight."""
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            return hook.execution_device
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return None


__all__ = ["ADAPTER_WEIGHTS_NAME", "FrozenBackbonesPreTrainedModel", "adapter_settings"]
