"""Resolve, load, freeze and fingerprint the frozen Hub backbones (an LLM and a vision tower).

A backbone is given as a Hub id, a local folder, or a config object (random weights: how tests build tiny
models, and how full-size models are built on the meta device). Adapter-only checkpoints name the backbones
they were trained on, with a cheap fingerprint of their weights, so that loading adapters onto a different
backbone is refused with a clear message instead of silently producing garbage.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
)

from ..checkpoint_files import MissingWeightsError, refuse_missing_weights
from ..errors import MMAdaptersError
from ..hub.names import looks_like_local_path
from .backbone_holders import refuse_backbone_in_use
from .embedded import portable_name, resolve_backbone_name
from .loading import BackboneLoadOptions, LoadingOptionError
from .vision_layout import square_side

# How many tensors the fingerprint samples values from, and which flat positions.
_FINGERPRINT_TENSORS = 16
_FINGERPRINT_POSITIONS = (0.0, 1 / 3, 2 / 3, 1.0)


class BackboneMismatchError(MMAdaptersError, ValueError):
    """Adapters were trained on one backbone and are being loaded onto another."""


class BackboneNotFoundError(MMAdaptersError, OSError):
    """A backbone named by a checkpoint or by the caller cannot be found locally or on the Hub."""


class BackboneWeightsMissingError(MissingWeightsError):
    """A backbone checkpoint does not hold every weight of the backbone built from its config."""


@dataclass
class BackboneReference:
    """Where a backbone came from and what its weights looked like: written into `config.json`.

    `note` says why there is no fingerprint when there is none (e.g. a quantised backbone, whose stored values
    are not those of its checkpoint)."""

    name_or_path: str
    revision: str | None = None
    fingerprint: dict[str, Any] | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "note" or v is not None}


# A backbone: a Hub id, a local folder, a config object (random weights) or an already loaded model.
BackboneSpec = str | os.PathLike | PreTrainedConfig | PreTrainedModel


def backbone_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """transformers 5 defaults to dtype="auto"; we keep float32 unless asked, so CPU runs are exact."""
    return torch.float32 if dtype is None else dtype


def vision_config_of(config: PreTrainedConfig) -> PreTrainedConfig:
    """The vision sub-config of a full CLIP/SigLIP config, or the config itself."""
    return getattr(config, "vision_config", None) or config


def load_text_backbone(
    spec: BackboneSpec,
    options: BackboneLoadOptions | None = None,
    revision: str | None = None,
    device_map: dict | None = None,
) -> tuple[PreTrainedModel, BackboneReference | None]:
    """An LLM with its LM head from a Hub id / local path (real weights), a config object (random weights) or a
    loaded model: a causal LM, or a seq2seq LM (T5 family) when the config is encoder-decoder."""
    options = options or BackboneLoadOptions()
    refuse_peft_backbone(spec, "text")
    if isinstance(spec, PreTrainedModel):
        check_llm_backbone(spec.config)
        return adopt_backbone(spec, "text", options, revision)
    if isinstance(spec, PreTrainedConfig):
        model = text_model_class(spec).from_config(spec, **_from_config_kwargs("text", options))
        return _place(model, device_map, options), None
    name = resolve_backbone_name(os.fspath(spec))
    revision = resolve_hub_revision(name, revision, options.hub_kwargs())
    config = backbone_config(name, revision, "text", options.hub_kwargs())
    model = _from_weights(text_model_class(config), "text", name, revision, options, device_map)
    freeze(model)
    return model, _reference(name, revision, model)


def _from_weights(
    model_class: type[PreTrainedModel],
    role: str,
    name: str,
    revision: str | None,
    options: BackboneLoadOptions,
    device_map: dict | None,
    **extra: Any,
) -> PreTrainedModel:
    """`model_class.from_pretrained` of the `role` backbone with this call's options (and its loading info kept,
    when asked for). A checkpoint that does not fill the backbone is refused (`refuse_missing_backbone_weights`)."""
    model, loading_info = model_class.from_pretrained(
        name,
        revision=revision,
        dtype=backbone_dtype(options.dtype[role]),
        output_loading_info=True,
        **extra,
        **options.for_backbone(role, device_map),
    )
    refuse_missing_backbone_weights(role, name, model_class, loading_info["missing_keys"])
    options.keep_loading_info(role, loading_info)
    return model


def refuse_missing_backbone_weights(
    role: str, name: str, model_class: type, missing_keys: Iterable[str]
) -> None:
    """Refuse a backbone whose checkpoint lacks some of its weights: transformers initialises those at random and
    only reports it, and a frozen backbone would keep them random for good (a full vision-language checkpoint given
    as the vision tower, whose tower sits under its own prefix; a bare decoder without its LM head as the LLM)."""
    refuse_missing_weights(
        f"The {role} backbone '{name}'",
        model_class,
        missing_keys,
        "Backbones are frozen, so they would stay so. Pass a checkpoint of that model itself: for the vision "
        "tower of a full vision-language model, save the tower alone (e.g. "
        "`model.model.vision_model.save_pretrained(dir)`) or load it yourself and pass the model; for an LLM, its "
        "causal LM with the LM head.",
        BackboneWeightsMissingError,
    )


def build_text_backbone(config: PreTrainedConfig) -> PreTrainedModel:
    """An LLM with random weights from its config, in torch's current default dtype (transformers sets it while
    loading a full checkpoint with `dtype=`)."""
    return text_model_class(config).from_config(config, dtype=torch.get_default_dtype())


def build_vision_backbone(config: PreTrainedConfig) -> PreTrainedModel:
    """A vision tower with random weights from its config (see `build_text_backbone`)."""
    return _vision_class_for(vision_config_of(config))._from_config(
        vision_config_of(config), dtype=torch.get_default_dtype()
    )


def text_model_class(config: PreTrainedConfig) -> type:
    """The Auto class that loads this LLM (causal or seq2seq LM); a config of anything else is refused."""
    check_llm_backbone(config)
    seq2seq = getattr(config, "is_encoder_decoder", False)
    auto_class = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    if type(config) not in (
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING if seq2seq else MODEL_FOR_CAUSAL_LM_MAPPING
    ):
        # transformers' own message lists every config class it knows (hundreds).
        raise ValueError(
            f"{type(config).__name__} is not the config of a language model: transformers has no {auto_class.__name__} "
            "for it. Pass a causal LM (Llama, Mistral, Qwen, ...) or a T5-family LLM as the text backbone"
            + (
                " (a vision tower? the order is text_model, vision_model)."
                if hasattr(config, "image_size")
                else "."
            )
        )
    return auto_class


def check_llm_backbone(config: PreTrainedConfig) -> None:
    """Refuse, before any weight loads, an LLM that LaVIN and CROME cannot put images into (both give the LLM its
    inputs as embeddings, image features in place of the placeholders)."""
    check_text_only_llm(config)
    check_routing_without_token_ids(config)
    check_default_cache(config)


def check_routing_without_token_ids(config: PreTrainedConfig) -> None:
    """Refuse an LLM whose layers pick their experts by token id (DeepSeek-V4's hash-routed MoE layers,
    `mlp_layer_types` "hash_moe"): image features have no token id, and transformers stopped inside the router
    with "'NoneType' object has no attribute 'reshape'"."""
    hashed = [
        i for i, kind in enumerate(getattr(config, "mlp_layer_types", None) or ()) if kind == "hash_moe"
    ]
    if hashed:
        raise ValueError(
            f"{type(config).__name__} routes the tokens of layers {hashed} to experts by token id "
            "(mlp_layer_types 'hash_moe'), and LaVIN and CROME give the LLM image features as embeddings, which "
            "have no token id. Pass an LLM whose layers route by the hidden states (mlp_layer_types 'moe')."
        )


def check_default_cache(config: PreTrainedConfig) -> None:
    """Refuse an LLM whose cache transformers cannot make (the original MiniMax, whose linear-attention layers keep
    their state in a cache of its own): our models generate with the cache transformers makes and count the tokens
    it has seen from it, and transformers stopped at the first `generate` ("uses cache of its own")."""
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    # GenerationMixin's classmethod; an LLM class without it generates nothing we could run anyway.
    supports_dynamic_cache = getattr(model_class, "_supports_default_dynamic_cache", None)
    if supports_dynamic_cache is not None and not supports_dynamic_cache():
        raise ValueError(
            f"{model_class.__name__} keeps its state in a cache of its own, which LaVIN and CROME cannot generate "
            "with (they generate with transformers' DynamicCache). Pass an LLM that uses it (Llama, Mistral, Qwen, "
            "MiniMax-M2, ...)."
        )


def check_text_only_llm(config: PreTrainedConfig) -> None:
    """Refuse, before any weight loads, a vision-language model given as the LLM (Gemma 3 from 4B, Mistral Small
    3.1, Llama 4, ...: their configs hold a `vision_config`): transformers would build the whole model, with its own
    vision tower, and LaVIN and CROME put their own vision side in front of a text-only LLM."""
    if getattr(config, "vision_config", None) is not None:
        raise ValueError(
            f"The text backbone is a vision-language model ({type(config).__name__} holds a vision_config): LaVIN "
            "and CROME put their own vision side in front of a text-only LLM. Pass a text-only LLM checkpoint "
            "(its causal LM with the LM head), or a text-only model you loaded yourself."
        )


def load_vision_backbone(
    spec: BackboneSpec,
    options: BackboneLoadOptions | None = None,
    revision: str | None = None,
    device_map: dict | None = None,
) -> tuple[PreTrainedModel, BackboneReference | None]:
    """A vision tower (e.g. CLIPVisionModel) from a Hub id / path (also of a full CLIP), a config object or a
    loaded model."""
    options = options or BackboneLoadOptions()
    refuse_peft_backbone(spec, "vision")
    if isinstance(spec, PreTrainedModel):
        check_fixed_size_vision_tower(type(spec))
        check_patch_token_tower(vision_config_of(spec.config))
        return adopt_backbone(spec, "vision", options, revision)
    if isinstance(spec, PreTrainedConfig):
        config = vision_config_of(spec)
        model = _vision_class_for(config)._from_config(config, **_from_config_kwargs("vision", options))
        return _place(model, device_map, options), None
    name = resolve_backbone_name(os.fspath(spec))
    revision = resolve_hub_revision(name, revision, options.hub_kwargs())
    full_config = backbone_config(name, revision, "vision", options.hub_kwargs())
    config = vision_config_of(full_config)
    # The vision-only class of the config (CLIPVisionModel, SiglipVisionModel, ...) also loads the vision
    # half of a full CLIP/SigLIP checkpoint; BLIP/BLIP-2/InstructBLIP checkpoints keep it under `vision_model.`.
    key_mapping = (
        {r"^vision_model\.": ""} if full_config.model_type in ("instructblip", "blip-2", "blip") else None
    )
    model_class = _vision_class_for(config)
    with other_halves_unreported(model_class, full_config is not config):
        model = _from_weights(
            model_class, "vision", name, revision, options, device_map, key_mapping=key_mapping
        )
    freeze(model)
    return model, _reference(name, revision, model)


class _LoadReportOf(logging.Filter):
    """Drops transformers' load report of one model class."""

    def __init__(self, class_name: str) -> None:
        super().__init__()
        self.marker = f"{class_name} LOAD REPORT"

    def filter(self, record: logging.LogRecord) -> bool:
        return self.marker not in record.getMessage()


@contextmanager
def other_halves_unreported(model_class: type, from_full_checkpoint: bool) -> Iterator[None]:
    """While the vision half of a full checkpoint (CLIP, SigLIP, BLIP, InstructBLIP) loads, transformers' load report
    of the tower's class is not logged: it lists the text half, the Q-Former, ... as UNEXPECTED, which is what
    loading the vision half means (a screen of lines at every load of LaVIN's paper tower, a full CLIP). What the
    report would say that matters, a weight the checkpoint lacks, is refused (`refuse_missing_backbone_weights`);
    the whole report stays available with `output_loading_info=True`."""
    if not from_full_checkpoint:
        yield
        return
    report_logger = logging.getLogger("transformers.modeling_utils")  # where transformers logs it
    drop = _LoadReportOf(model_class.__name__)
    report_logger.addFilter(drop)
    try:
        yield
    finally:
        report_logger.removeFilter(drop)


def _vision_class_for(config: PreTrainedConfig) -> type[PreTrainedModel]:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    check_patch_token_tower(config)
    model_class = MODEL_MAPPING.get(type(config), None)
    if model_class is None:
        # Some vision towers have no Auto mapping of their own (BLIP, BLIP-2, InstructBLIP, MetaCLIP 2 in
        # transformers 5.24): transformers names their class after the config (BlipVisionConfig -> BlipVisionModel).
        config_name = type(config).__name__
        class_name = config_name.removesuffix("Config") + "Model"
        model_class = (
            getattr(transformers, class_name, None) if config_name.endswith("VisionConfig") else None
        )
    if model_class is None:
        raise ValueError(
            f"No transformers model class for vision config {type(config).__name__}: pass a CLIP, SigLIP, "
            "MetaCLIP 2 or BLIP-family vision tower."
        )
    check_fixed_size_vision_tower(model_class)
    return model_class


def check_patch_token_tower(config: PreTrainedConfig) -> None:
    """Refuse, before any weight loads, a tower whose config has no token width and layer count (`hidden_size`,
    `num_hidden_layers`): both models read a ViT-style tower's patch tokens. Convolutional towers (ConvNeXt,
    EfficientNet, FocalNet, ALIGN's) stopped the construction with an AttributeError."""
    missing = [
        name
        for name in ("hidden_size", "num_hidden_layers")
        if not isinstance(getattr(config, name, None), int)
    ]
    if missing:
        raise ValueError(
            f"{type(config).__name__} has no {' or '.join(missing)}: LaVIN and CROME read the patch tokens of a "
            "ViT-style vision tower (CLIP, SigLIP, BLIP, DINOv2, ...), not a convolutional one's feature maps. Pass "
            "such a tower, e.g. openai/clip-vit-large-patch14."
        )
    for name in ("image_size", "patch_size"):  # square images and patches (sides given as a pair too)
        if getattr(config, name, None) is not None:
            square_side(config, name)


# Inputs that describe the patch grid of variable-resolution images. Some towers declare them optional but cannot
# run without them (MiniCPM-o/V's `target_sizes`, PaddleOCR-VL's `grid_thw`), or pack every image of a batch into one
# sequence by them (Pixtral's `image_sizes`): named, they are needed.
PATCH_GRID_INPUTS = (
    "grid_thw",
    "image_sizes",
    "image_grid_thw",
    "target_sizes",
    "tgt_sizes",
    "spatial_shapes",
    "merge_sizes",
)


def check_patch_embedding_reads_images(tower: nn.Module) -> None:
    """Refuse a tower whose patch embedding is a linear layer: it reads images already cut into flattened patches,
    (images, patches, channels x patch x patch), as Molmo2's tower does (its processor cuts them), while both
    models feed whole images (images, channels, height, width). It stopped with a matrix-shape error at the first
    image. The first module named like a patch embedding decides (CLIP's `patch_embedding` is a convolution, ViT's
    `patch_embeddings` a module around one)."""
    for name, module in tower.named_modules():
        if "patch_embed" in name.rsplit(".", 1)[-1]:
            if isinstance(module, nn.Linear):
                raise ValueError(
                    f"The vision tower {type(tower).__name__} embeds patches with a linear layer ({name}): it reads "
                    "images already cut into flattened patches, while LaVIN and CROME feed it whole images. Use a "
                    "tower that embeds images with a convolution (CLIP, SigLIP, BLIP, DINOv2, ...)."
                )
            return


def check_fixed_size_vision_tower(model_class: type[nn.Module]) -> None:
    """Refuse, before any weight loads, a model that reads no pixels (a text encoder), and a vision tower whose
    forward needs more than pixel values: SigLIP2's NaFlex towers take variable-resolution patch sequences with
    `pixel_attention_mask` and `spatial_shapes`, and both models feed fixed-size images (the processors resize them)
    to a CLIP/SigLIP/BLIP-style tower."""
    parameters = inspect.signature(model_class.forward).parameters.values()
    if "pixel_values" not in {p.name for p in parameters}:
        raise ValueError(
            f"{model_class.__name__} is not a vision tower: its forward takes no pixel_values (a text encoder such as "
            "CLIP's text half or BERT, or the LLM? the order is text_model, vision_model). Pass a vision tower, e.g. "
            "openai/clip-vit-large-patch14 or a CLIP, SigLIP or BLIP vision config."
        )
    required = [
        p.name
        for p in parameters
        if p.name not in ("self", "pixel_values")
        and (p.default is inspect.Parameter.empty or p.name in PATCH_GRID_INPUTS)
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    if required:
        raise ValueError(
            f"The vision tower {model_class.__name__} needs {', '.join(required)} besides pixel values (it reads "
            "variable-resolution patch sequences); LaVIN and CROME feed fixed-size images to a CLIP, SigLIP or "
            "BLIP-style tower. Use a fixed-resolution one, e.g. openai/clip-vit-large-patch14 or "
            "google/siglip-so400m-patch14-384."
        )


def backbone_config(
    name: str, revision: str | None, role: str, hub_kwargs: dict[str, Any]
) -> PreTrainedConfig:
    """The config of the `role` ("text" / "vision") backbone `name`, with a clear message when the folder or Hub
    repo cannot be found (the models and the processors read backbones through it)."""
    if looks_like_local_path(name) and not os.path.isdir(name):
        raise BackboneNotFoundError(
            f"The {role} backbone folder {name} does not exist (a checkpoint names the backbones it was trained on "
            f"by where they were loaded from). Pass {role}_model= (on the command line --{role}-model) with a local "
            "copy of that backbone, or its Hub id."
        )
    try:
        return AutoConfig.from_pretrained(name, revision=revision, **hub_kwargs)
    except OSError as error:
        raise BackboneNotFoundError(
            f"The {role} backbone '{name}' cannot be loaded: no such local folder, and the Hub repo cannot be "
            f"reached or does not exist ({type(error).__name__}: {str(error).splitlines()[0][:200]}). Pass "
            f"{role}_model= (on the command line --{role}-model) with a local copy of the backbone."
        ) from error


def _from_config_kwargs(role: str, options: BackboneLoadOptions) -> dict[str, Any]:
    if options.quantization[role] is not None:
        raise LoadingOptionError(
            f"quantization_config needs a {role} backbone loaded from weights (a Hub id, a folder or a loaded "
            "model); a config object builds random weights, which transformers does not quantise."
        )
    return {"dtype": backbone_dtype(options.dtype[role]), **options.implementations(role)}


def _place(model: PreTrainedModel, device_map: dict | None, options: BackboneLoadOptions) -> PreTrainedModel:
    """Put a backbone built from a config where its part of the device map says (random weights: nothing to
    read, so a single device is a plain move and a split map is accelerate's dispatch)."""
    if not device_map:
        return model
    devices = set(device_map.values())
    if len(devices) == 1 and "disk" not in devices:
        return model.to(next(iter(devices)) if next(iter(devices)) != "meta" else "meta")
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=device_map, offload_dir=options.offload_folder)


def refuse_peft_backbone(spec: Any, role: str) -> None:
    """A PEFT model, or a backbone with PEFT layers inside (the model in a PeftModel), is not taken as a backbone:
    its layers would stay frozen and out of our checkpoints (a save refuses layers it cannot rebuild). The message
    names the way: the plain backbone, then `load_adapter`, which records the adapter; or a merged copy."""
    from .peft_on_top import PeftOnTopError, peft_imported, tuner_layers

    if not isinstance(spec, nn.Module) or not peft_imported():
        return
    from peft import PeftModel

    if isinstance(spec, PeftModel) or tuner_layers(spec):
        where = "" if role == "text" else ", on='vision_tower'"
        raise PeftOnTopError(
            f"The {role} backbone passed in is a PEFT model or holds PEFT layers: they would stay frozen and out of "
            "the checkpoint. Build the model on the plain backbone (loaded again, or peft_model.unload()) and bring "
            f"the adapter with model.load_adapter(folder{where}) (a folder PeftModel.save_pretrained wrote: the "
            "adapter then trains and saves with ours), or merge it (peft_model.merge_and_unload()), save the "
            "merged backbone to a folder and pass the folder."
        )


def adopt_backbone(
    model: PreTrainedModel, role: str, options: BackboneLoadOptions, revision: str | None
) -> tuple[PreTrainedModel, BackboneReference | None]:
    """An already loaded backbone: frozen, and recorded by the name it was loaded from (none for a model built
    from a config). A quantised one gets no fingerprint (its stored values are not its checkpoint's): the note
    in its reference says so."""
    refuse_backbone_in_use(model, role)  # before anything below changes it
    if options.quantization[role] is not None:
        raise LoadingOptionError(
            f"The {role} backbone was passed as a loaded model: quantise it when you load it (its "
            "from_pretrained(quantization_config=...)), not through from_backbones."
        )
    if options.attn_implementation[role] is not None:
        model.set_attn_implementation(options.attn_implementation[role])
    if options.experts_implementation[role] is not None:
        model.set_experts_implementation(options.experts_implementation[role])
    quantized = is_quantized(model)
    if options.dtype[role] not in (None, "auto"):
        if quantized:
            raise LoadingOptionError(f"The {role} backbone is quantised: its dtype cannot be changed.")
        model.to(options.dtype[role])
    freeze(model)
    name = model.name_or_path or getattr(model.config, "_name_or_path", "")
    return model, (_reference(name, revision, model) if name else None)


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None)


def resolve_hub_revision(
    name: str, revision: str | None, hub_kwargs: dict[str, Any] | None = None
) -> str | None:
    """The commit a Hub backbone's `revision` (default: main) points to now, so that the config, the weights and
    the reference written into our checkpoints all name the same commit. Local folders keep `revision`; when
    the Hub cannot be asked (offline, no cached ref), loading goes on with `revision` as given."""
    if os.path.isdir(name):
        return revision
    from huggingface_hub import resolve_revision
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RevisionResolutionError

    hub_kwargs = {
        k: v for k, v in (hub_kwargs or {}).items() if k in ("token", "cache_dir", "local_files_only")
    }
    try:
        return resolve_revision(name, revision=revision, **hub_kwargs).resolved
    except (RevisionResolutionError, HFValidationError, HfHubHTTPError, TypeError):
        return revision  # transformers' loader then reports the problem in its own words


def _reference(name: str, revision: str | None, model: PreTrainedModel) -> BackboneReference:
    # Hub backbones are pinned to the commit that was loaded (see resolve_hub_revision); the embedded ones are
    # recorded by their portable names.
    name = portable_name(name)
    if is_quantized(model):
        method = getattr(getattr(model.config, "quantization_config", None), "quant_method", "quantised")
        note = f"loaded {method}-quantised: no fingerprint (the quantised values are not the checkpoint's)"
        return BackboneReference(name_or_path=name, revision=revision, fingerprint=None, note=note)
    return BackboneReference(name_or_path=name, revision=revision, fingerprint=fingerprint(model))


@dataclass
class LoadedBackbones:
    """A text and a vision backbone, loaded, with where they came from (None for config-built ones)."""

    language_model: PreTrainedModel
    vision_tower: PreTrainedModel
    text_ref: BackboneReference | None
    vision_ref: BackboneReference | None
    attention: dict[str, str | None] = field(default_factory=dict)
    experts: dict[str, str | None] = field(default_factory=dict)
    # The Hub keywords the backbones loaded with (`token`, ...): the LLM's tokenizer is read with them too.
    hub_kwargs: dict[str, Any] = field(default_factory=dict)

    def config_kwargs(self) -> dict[str, Any]:
        """The composite-config fields that describe the backbones."""
        kwargs = {
            "text_config": self.language_model.config,
            "vision_config": self.vision_tower.config,
            "text_backbone": self.text_ref.to_dict() if self.text_ref else None,
            "vision_backbone": self.vision_ref.to_dict() if self.vision_ref else None,
        }
        if self.text_ref is not None:
            token_id = image_token_id_or_none(
                self.text_ref.name_or_path, self.text_ref.revision, **self.hub_kwargs
            )
            if token_id is not None:
                kwargs["image_token_id"] = token_id
        return kwargs

    def restore_implementations(self, config: PreTrainedConfig) -> None:
        """Set the backbones' attention and experts (mixture-of-experts) implementations, as loaded, on the
        composite `config`: building it from their configs resets both to None on the shared sub-configs."""
        config._attn_implementation = dict(self.attention)
        config._experts_implementation = dict(self.experts)


def load_backbones(
    text_model: BackboneSpec,
    vision_model: BackboneSpec,
    options: BackboneLoadOptions | None = None,
    text_revision: str | None = None,
    vision_revision: str | None = None,
    device_maps: tuple[dict | None, dict | None] = (None, None),
) -> LoadedBackbones:
    language_model, text_ref = load_text_backbone(text_model, options, text_revision, device_maps[0])
    vision_tower, vision_ref = load_vision_backbone(vision_model, options, vision_revision, device_maps[1])
    attention = {
        "text_config": language_model.config._attn_implementation,
        "vision_config": vision_tower.config._attn_implementation,
    }
    experts = {
        "text_config": getattr(language_model.config, "_experts_implementation", None),
        "vision_config": getattr(vision_tower.config, "_experts_implementation", None),
    }
    hub_kwargs = options.hub_kwargs() if options is not None else {}
    return LoadedBackbones(language_model, vision_tower, text_ref, vision_ref, attention, experts, hub_kwargs)


def freeze(module: nn.Module) -> None:
    """Freeze every parameter of a backbone (base weights never train)."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)


def fingerprint(model: nn.Module) -> dict[str, Any] | None:
    """A cheap identity of a backbone's weights: a hash over tensor names and shapes, plus a few sampled values.

    Never a pass over all weights: 16 tensors x 4 values are read. The samples are compared with a tolerance,
    so the same backbone loaded in bf16/fp16 still matches. Meta tensors have no values: returns None.
    """
    state = model.state_dict()
    if any(t.is_meta for t in state.values()):
        return None
    names = sorted(state)
    structure = hashlib.sha256("\n".join(f"{n}:{tuple(state[n].shape)}" for n in names).encode()).hexdigest()
    step = max(1, len(names) // _FINGERPRINT_TENSORS)
    samples = []
    for name in names[::step][:_FINGERPRINT_TENSORS]:
        flat = state[name].detach().reshape(-1)
        if flat.numel() == 0:
            continue
        positions = sorted({round(p * (flat.numel() - 1)) for p in _FINGERPRINT_POSITIONS})
        samples.extend(float(flat[i]) for i in positions)
    return {"structure_sha256": structure, "num_tensors": len(names), "samples": samples}


def fingerprints_match(expected: dict[str, Any] | None, actual: dict[str, Any] | None) -> bool:
    if expected is None or actual is None:
        return True  # nothing recorded (meta-built) or nothing to compare: cannot tell
    if expected["structure_sha256"] != actual["structure_sha256"]:
        return False
    a = torch.tensor(expected["samples"], dtype=torch.float64)
    b = torch.tensor(actual["samples"], dtype=torch.float64)
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-2, atol=1e-3))


def check_backbone(
    role: str, expected: BackboneReference | None, loaded: BackboneReference | None, checkpoint: str
) -> None:
    """Refuse a backbone whose fingerprint differs from the one the adapters were trained on."""
    if expected is None or loaded is None or fingerprints_match(expected.fingerprint, loaded.fingerprint):
        return
    raise BackboneMismatchError(
        f"The adapters in '{checkpoint}' were trained on the {role} backbone '{expected.name_or_path}' "
        f"(revision {expected.revision}), but the {role} backbone loaded from '{loaded.name_or_path}' "
        f"(revision {loaded.revision}) has different weights (fingerprint "
        f"{_short(expected.fingerprint)} != {_short(loaded.fingerprint)}). Pass the original backbone "
        f"(`{role}_model=...`; on the command line --{role}-model), or `ignore_backbone_mismatch=True` "
        "(--ignore-backbone-mismatch) if you really mean to load the adapters onto another backbone."
    )


def _short(fp: dict[str, Any] | None) -> str:
    if fp is None:
        return "none"
    digest = hashlib.sha256(repr(fp["samples"]).encode()).hexdigest()[:8]
    return f"{fp['structure_sha256'][:8]}/{digest}"


# The image placeholder. It is added to the LLM tokenizer as a special token without resizing the frozen
# embeddings (its id may lie past the embedding matrix); the model overwrites those positions.
IMAGE_TOKEN = "<image>"


def add_image_token(tokenizer: Any) -> int:
    """Register the image placeholder as a special token of `tokenizer` (idempotent); return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def tokenizer_for(text_model: str, revision: str | None = None, **hub_kwargs: Any) -> Any:
    """The tokenizer of `text_model`, with the image placeholder registered (`hub_kwargs`: `token`, ...)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_backbone_name(text_model), revision=revision, **hub_kwargs
    )
    add_image_token(tokenizer)
    return tokenizer


def image_token_id_for(text_model: str, revision: str | None = None, **hub_kwargs: Any) -> int:
    """The id the image placeholder gets in the tokenizer of `text_model`."""
    return tokenizer_for(text_model, revision, **hub_kwargs).convert_tokens_to_ids(IMAGE_TOKEN)


def image_token_id_or_none(text_model: str, revision: str | None = None, **hub_kwargs: Any) -> int | None:
    """`image_token_id_for`, or None when the backbone has no tokenizer to read (a loaded model whose name is
    not a folder or a reachable Hub repo): the config then uses the first id past the vocabulary."""
    try:
        return image_token_id_for(text_model, revision, **hub_kwargs)
    except (OSError, ValueError, TypeError):
        return None


# Folders a Trainer push puts beside the checkpoint at a repo's root (hub_strategy "checkpoint" / "all_checkpoints"):
# loading the root checkpoint does not download them.
TRAINER_CHECKPOINT_FOLDERS = ("last-checkpoint/*", "checkpoint-*/*")


def resolve_checkpoint_folder(
    name_or_path: str, revision: str | None = None, subfolder: str = "", **hub_kwargs: Any
) -> str:
    """A local folder holding a checkpoint: the path itself, or a snapshot of a Hub repo's checkpoint files
    (`hub_kwargs`: token, cache_dir, local_files_only); with `subfolder`, the checkpoint in that folder of the
    path or repo (a Trainer push's `last-checkpoint`, `checkpoint-N`)."""
    subfolder = subfolder.strip("/")
    if os.path.isdir(name_or_path):
        folder = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{name_or_path} has no subfolder {subfolder!r}.")
        return folder
    from huggingface_hub import snapshot_download

    if subfolder:
        root = snapshot_download(
            name_or_path, revision=revision, allow_patterns=[f"{subfolder}/*"], **hub_kwargs
        )
        folder = os.path.join(root, subfolder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"The repo {name_or_path} has no folder {subfolder!r}.")
        return folder
    return snapshot_download(
        name_or_path, revision=revision, ignore_patterns=list(TRAINER_CHECKPOINT_FOLDERS), **hub_kwargs
    )


def read_checkpoint_config(
    name_or_path: str, revision: str | None = None, subfolder: str = "", **hub_kwargs: Any
) -> dict[str, Any] | None:
    """The checkpoint's config.json as a dict, read before anything else of a Hub repo is downloaded (so that a
    backbone's repo passed where a checkpoint belongs is refused without fetching its weights); None when there is
    none or it cannot be read here (the full resolution that follows reports why)."""
    import json

    subfolder = subfolder.strip("/")
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, subfolder, "config.json")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(
                name_or_path, "config.json", subfolder=subfolder or None, revision=revision, **hub_kwargs
            )
        except Exception:  # no such file or repo, offline, no access: resolve_checkpoint_folder says which
            return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None  # missing or unreadable: the loaders report it with the folder's other files in view
    return config if isinstance(config, dict) else None


def read_tensors(folder: str, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors checkpoint (single file or shards) whose names start with `prefixes`, read
    one by one: nothing else of the checkpoint is loaded."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"No .safetensors weights in {folder}.")
    tensors = {}
    for file in files:
        with safe_open(os.path.join(folder, file), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefixes):
                    tensors[key] = handle.get_tensor(key)
    return tensors
