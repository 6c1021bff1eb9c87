"""Resolve, load, freeze and fingerprint the frozen Hub backbones (an LLM and a vision tower).

A backbone is given as a Hub id, a local folder, or a config object (random weights: how tests build tiny
models, and how full-size models are built on the meta device). Adapter-only checkpoints name the backbones
they were trained on, with a cheap fingerprint of their weights, so that loading adapters onto a different
backbone is refused with a clear message instead of silently producing garbage.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
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

# How many tensors the fingerprint samples values from, and which flat positions.
_FINGERPRINT_TENSORS = 16
_FINGERPRINT_POSITIONS = (0.0, 1 / 3, 2 / 3, 1.0)


class BackboneMismatchError(ValueError):
    """Adapters were trained on one backbone and are being loaded onto another."""


@dataclass
class BackboneReference:
    """Where a backbone came from and what its weights looked like: written into `config.json`."""

    name_or_path: str
    revision: str | None = None
    fingerprint: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


BackboneSpec = str | os.PathLike | PreTrainedConfig


def backbone_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """transformers 5 defaults to dtype="auto"; we keep float32 unless asked, so CPU runs are exact."""
    return torch.float32 if dtype is None else dtype


def vision_config_of(config: PreTrainedConfig) -> PreTrainedConfig:
    """The vision sub-config of a full CLIP/SigLIP config, or the config itself."""
    return getattr(config, "vision_config", None) or config


def load_text_backbone(
    spec: BackboneSpec, dtype: torch.dtype | str | None = None, revision: str | None = None
) -> tuple[PreTrainedModel, BackboneReference | None]:
    """An LLM with its LM head from a Hub id / local path (real weights) or a config object (random weights):
    a causal LM, or a seq2seq LM (T5 family) when the config is encoder-decoder."""
    if isinstance(spec, PreTrainedConfig):
        return _text_class_for(spec).from_config(spec, dtype=backbone_dtype(dtype)), None
    name = os.fspath(spec)
    revision = resolve_hub_revision(name, revision)
    auto_class = _text_class_for(AutoConfig.from_pretrained(name, revision=revision))
    model = auto_class.from_pretrained(name, revision=revision, dtype=backbone_dtype(dtype))
    return model, _reference(name, revision, model)


def _text_class_for(config: PreTrainedConfig) -> type:
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def load_vision_backbone(
    spec: BackboneSpec, dtype: torch.dtype | str | None = None, revision: str | None = None
) -> tuple[PreTrainedModel, BackboneReference | None]:
    """A vision tower (e.g. CLIPVisionModel) from a Hub id / path (also of a full CLIP) or a config object."""
    if isinstance(spec, PreTrainedConfig):
        config = vision_config_of(spec)
        return _vision_class_for(config)._from_config(config, dtype=backbone_dtype(dtype)), None
    name = os.fspath(spec)
    revision = resolve_hub_revision(name, revision)
    full_config = AutoConfig.from_pretrained(name, revision=revision)
    config = vision_config_of(full_config)
    # The vision-only class of the config (CLIPVisionModel, SiglipVisionModel, ...) also loads the vision
    # half of a full CLIP/SigLIP checkpoint; BLIP-2/InstructBLIP checkpoints keep it under `vision_model.`.
    key_mapping = {r"^vision_model\.": ""} if full_config.model_type in ("instructblip", "blip-2") else None
    model = _vision_class_for(config).from_pretrained(
        name, revision=revision, dtype=backbone_dtype(dtype), key_mapping=key_mapping
    )
    return model, _reference(name, revision, model)


def _vision_class_for(config: PreTrainedConfig) -> type[PreTrainedModel]:
    from transformers import Blip2VisionModel, InstructBlipVisionModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    # Vision towers of BLIP-2 / InstructBLIP have no Auto mapping of their own.
    unmapped = {"instructblip_vision_model": InstructBlipVisionModel, "blip_2_vision_model": Blip2VisionModel}
    if config.model_type in unmapped:
        return unmapped[config.model_type]
    try:
        return MODEL_MAPPING[type(config)]
    except KeyError as error:
        raise ValueError(f"No transformers model class for vision config {type(config).__name__}.") from error


def resolve_hub_revision(name: str, revision: str | None) -> str | None:
    """The commit a Hub backbone's `revision` (default: main) points to now, so that the config, the weights and
    the reference written into our checkpoints all name the same commit. Local folders keep `revision`; when
    the Hub cannot be asked (offline, no cached ref), loading goes on with `revision` as given."""
    if os.path.isdir(name):
        return revision
    from huggingface_hub import resolve_revision
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RevisionResolutionError

    try:
        return resolve_revision(name, revision=revision).resolved
    except (RevisionResolutionError, HFValidationError, HfHubHTTPError):
        return revision  # transformers' loader then reports the problem in its own words


def _reference(name: str, revision: str | None, model: PreTrainedModel) -> BackboneReference:
    # Hub backbones are pinned to the commit that was loaded (see resolve_hub_revision).
    return BackboneReference(name_or_path=name, revision=revision, fingerprint=fingerprint(model))


@dataclass
class LoadedBackbones:
    """A text and a vision backbone, loaded, with where they came from (None for config-built ones)."""

    language_model: PreTrainedModel
    vision_tower: PreTrainedModel
    text_ref: BackboneReference | None
    vision_ref: BackboneReference | None
    attention: dict[str, str | None]

    def config_kwargs(self) -> dict[str, Any]:
        """The composite-config fields that describe the backbones."""
        kwargs = {
            "text_config": self.language_model.config,
            "vision_config": self.vision_tower.config,
            "text_backbone": self.text_ref.to_dict() if self.text_ref else None,
            "vision_backbone": self.vision_ref.to_dict() if self.vision_ref else None,
        }
        if self.text_ref is not None:
            kwargs["image_token_id"] = image_token_id_for(self.text_ref.name_or_path, self.text_ref.revision)
        return kwargs

    def attention_implementations(self) -> dict[str, str | None]:
        """The backbones' attention implementations, as chosen when they were loaded. Building a composite config
        resets its sub-configs' choice: set it again with `config._attn_implementation = ...`."""
        return dict(self.attention)


def load_backbones(
    text_model: BackboneSpec,
    vision_model: BackboneSpec,
    dtype: torch.dtype | str | None = None,
    text_revision: str | None = None,
    vision_revision: str | None = None,
) -> LoadedBackbones:
    language_model, text_ref = load_text_backbone(text_model, dtype, text_revision)
    vision_tower, vision_ref = load_vision_backbone(vision_model, dtype, vision_revision)
    attention = {
        "text_config": language_model.config._attn_implementation,
        "vision_config": vision_tower.config._attn_implementation,
    }
    return LoadedBackbones(language_model, vision_tower, text_ref, vision_ref, attention)


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
        f"(`{role}_model=...`), or `ignore_backbone_mismatch=True` if you really mean to load the adapters onto "
        "another backbone."
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


def tokenizer_for(text_model: str, revision: str | None = None) -> Any:
    """The tokenizer of `text_model`, with the image placeholder registered."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_model, revision=revision)
    add_image_token(tokenizer)
    return tokenizer


def image_token_id_for(text_model: str, revision: str | None = None) -> int:
    """The id the image placeholder gets in the tokenizer of `text_model`."""
    return tokenizer_for(text_model, revision).convert_tokens_to_ids(IMAGE_TOKEN)


def resolve_checkpoint_folder(name_or_path: str, revision: str | None = None) -> str:
    """A local folder holding a checkpoint: the path itself, or a snapshot of a Hub repo."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, revision=revision)


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
