"""The config fields and behaviour LaVIN's and CROME's configs share (the config side of
`frozen_backbones.FrozenBackbonesPreTrainedModel`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ..validation import type_errors
from .backbone_names import with_recorded_backbone_names
from .image_tokens import check_num_image_tokens


def _mapping_problems(
    value: Any, where: str, entry_is_valid: Callable[[str, Any], bool], entry_shape: str
) -> list[str]:
    """What is wrong with a record that maps names to entries (null allowed)."""
    if value is None:
        return []
    if not isinstance(value, dict):
        return [f"{where} must be an object or null, got {value!r:.80}"]
    return [
        f"{where}.{key} must be {entry_shape}"
        for key, entry in value.items()
        if not entry_is_valid(key, entry)
    ]


def check_records(config: Any) -> None:
    """The records a save writes into config.json (`text_backbone` / `vision_backbone`: where each backbone came
    from and its fingerprint; `backbone_quantization`; `peft_adapters`) have one shape. A record edited into another
    is refused here, by field, rather than failing inside the loader as a Python TypeError (or, for a revision that
    is not a string, not at all)."""
    problems = []
    for role in ("text", "vision"):
        record, where = getattr(config, f"{role}_backbone"), f"{role}_backbone"
        if record is None:
            continue
        if not isinstance(record, dict):
            problems.append(
                f"{where} must be an object (name_or_path, revision, fingerprint), got {record!r:.80}"
            )
            continue
        if not isinstance(record.get("name_or_path"), str):
            problems.append(f"{where}.name_or_path must be a string, got {record.get('name_or_path')!r:.80}")
        if record.get("revision") is not None and not isinstance(record["revision"], str):
            problems.append(f"{where}.revision must be a string or null, got {record['revision']!r:.80}")
        fingerprint = record.get("fingerprint")
        if fingerprint is not None and not (
            isinstance(fingerprint, dict)
            and isinstance(fingerprint.get("structure_sha256"), str)
            and isinstance(fingerprint.get("samples"), list)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in fingerprint["samples"])
        ):
            problems.append(f"{where}.fingerprint must be an object (structure_sha256, samples) or null")
    problems += _mapping_problems(
        config.backbone_quantization,
        "backbone_quantization",
        lambda key, entry: key in ("text_config", "vision_config") and isinstance(entry, dict | None),
        "a quantization config (an object)",
    )
    problems += _mapping_problems(
        config.peft_adapters,
        "peft_adapters",
        lambda key, entry: (
            isinstance(entry, dict)
            and isinstance(entry.get("on"), str)
            and isinstance(entry.get("config"), dict)
            and type(entry.get("order", 0)) is int
        ),
        "an object with 'on', 'config' (PEFT's config) and an integer 'order'",
    )
    if problems:
        raise ValueError(
            f"{type(config).__name__}: "
            + "; ".join(problems)
            + ". These records are written by save_pretrained: "
            "restore the checkpoint's config.json (or save the model again)."
        )


def llm_vocabulary_size(text_config: Any) -> int:
    """The LLM's vocabulary size (an image placeholder's id is one past it by default). A `text_config` of something
    else (a vision tower's: the configs given in the other order) is named here; it met an AttributeError."""
    vocab_size = getattr(text_config, "vocab_size", None)
    if not isinstance(vocab_size, int):
        swapped = (
            " (a vision tower's? the order is text_config, vision_config)"
            if hasattr(text_config, "image_size")
            else ""
        )
        raise ValueError(
            f"text_config is a {type(text_config).__name__}, which has no vocabulary{swapped}: it must be the LLM's "
            "config (a causal LM such as Llama, Mistral or Qwen, or a T5-family LLM)."
        )
    return vocab_size


@strict
class FrozenBackbonesConfig(PreTrainedConfig):
    r"""Base of [`LavinConfig`] and [`CromeConfig`]: two frozen backbones and an adapter side.

    Args:
        text_config: config of the frozen LLM.
        vision_config: config of the frozen vision tower.
        adapter_config: the adapter settings as a dict (validated by the subclass's `adapter_config_class`).
        image_token_id: id of the image placeholder in `input_ids`; default: the first id past the LLM's embedding
            matrix (it never collides with a real token; those positions are overwritten with visual features).
        text_backbone, vision_backbone: where the frozen backbones come from (`name_or_path`, `revision`,
            `fingerprint`), written by `from_backbones` and checked by `from_pretrained`.
        backbone_quantization: how the backbones were quantised (`{"text_config": {...}, "vision_config": ...}`,
            quantization configs as dicts); `from_pretrained` of an adapter-only checkpoint quantises them the
            same way unless given another `quantization_config`.
        peft_adapters: PEFT layers on the backbones (LoRA on top), adapter name -> `{"on": backbone, "config": PEFT
            config as a dict, "active": whether it was active when saved, "order": its place in the injection
            order}`; every load rebuilds them, in that order, before reading the weights and makes the same ones
            active (see `modeling.peft_on_top`).
        tie_word_embeddings: follows the LLM's own setting (set in `__post_init__`).
    """

    # The adapter settings' class (MMAdapterConfig, CromeAdapterConfig); set by each subclass.
    adapter_config_class = None
    # Outputs the Trainer does not gather in evaluation: the KV cache, and the vision tower's states in
    # `image_outputs` (a tower's last hidden state per image, e.g. 257 x 1024 for ViT-L/14, for every image of an
    # evaluation set); the logits and `image_hidden_states` (the visual tokens) are kept.
    keys_to_ignore_at_inference = ["past_key_values", "cache", "image_outputs"]

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    adapter_config: dict | None = None
    image_token_id: int | None = None
    text_backbone: dict | None = None
    vision_backbone: dict | None = None
    backbone_quantization: dict | None = None
    peft_adapters: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self._check_field_types()
        check_records(self)
        # Validate and normalise the adapter settings (unknown fields raise a clear error here, early).
        self.adapter_config = self.adapter_config_class.from_dict(self.adapter_config or {}).to_dict()
        if self.image_token_id is None:
            self.image_token_id = llm_vocabulary_size(self.text_config)
        if self.image_token_id < 0:
            raise ValueError(f"image_token_id must be a non-negative integer, got {self.image_token_id}.")
        # Output embeddings are tied (or not) inside the LLM itself; follow it, as LLaVA does.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    def _check_field_types(self) -> None:
        """A value of the wrong type in one of our fields (a hand-edited config.json: `"use_patch_branch": "no"`,
        `"projector_hidden_size": "128"`) is named with its field here, not read as something else later or met as a
        comparison error. `@strict` checks no annotation of ours: they are strings (`from __future__ import
        annotations`), which its validators skip."""
        ours = {
            name
            for klass in type(self).__mro__
            if klass.__module__.startswith("mmadapters.")
            for name in vars(klass).get("__annotations__", {})
        }
        errors = type_errors(
            type(self), {name: getattr(self, name) for name in sorted(ours) if hasattr(self, name)}
        )
        if errors:
            raise ValueError(
                "; ".join(f"{type(self).__name__}.{name} {message}" for name, message in errors.items()) + "."
            )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """As transformers' `from_dict`, except for an `adapter_config` keyword (`from_pretrained(checkpoint,
        adapter_config=...)`, the Auto classes' way included): it changes the saved adapter settings field by field
        (`changed_adapter_settings`) instead of replacing them whole."""
        settings = kwargs.pop("adapter_config", None)
        # Derived from the fields (a property), not settable; the processor options handed to AutoProcessor reach
        # the config this way when the checkpoint holds no processor files.
        asked_tokens = kwargs.pop("num_image_tokens", None)
        loaded = super().from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if settings is not None:
            config.adapter_config = changed_adapter_settings(config, settings, "this checkpoint")
        check_num_image_tokens(asked_tokens, config.num_image_tokens, "this model")
        return loaded

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoConfig") -> None:
        """A no-op: `import mmadapters` registers our configs, and saves write their own `auto_map` (see
        `mmadapters.hub.remote_code`); transformers' version would make later saves copy our source files."""

    def to_dict(self) -> dict[str, Any]:
        """The config as saved: the backbones' sub-configs name them as recorded in `text_backbone` /
        `vision_backbone` (a portable name or Hub id), never by the path they were loaded from on this machine."""
        return with_recorded_backbone_names(super().to_dict())


def changed_adapter_settings(config: FrozenBackbonesConfig, settings: Any, where: str) -> dict[str, Any]:
    """The adapter settings of `config` with the fields of `settings` (a dict of some fields, or a whole adapter
    config) replaced: `from_pretrained(checkpoint, adapter_config=...)`. transformers would replace the nested dict
    whole (every other field back to its default); fields that decide the adapter weights must keep the
    checkpoint's values (`AdapterConfigFile.with_changes` refuses, naming `where`)."""
    adapter_class = config.adapter_config_class
    if isinstance(settings, adapter_class):
        changes = {k: v for k, v in settings.to_dict().items() if k != "base_model_name_or_path"}
    elif isinstance(settings, dict):
        changes = settings
    else:
        raise TypeError(
            f"adapter_config must be a {adapter_class.__name__} or a dict of its fields, got "
            f"{type(settings).__name__}."
        )
    return adapter_class.from_dict(config.adapter_config).with_changes(changes, where).to_dict()


__all__ = ["FrozenBackbonesConfig", "changed_adapter_settings"]
