"""Adapter-only checkpoints for models built around frozen backbones (shared by LaVIN and CROME).

An adapter-only folder holds `config.json` (naming the backbones with revision and weight fingerprint),
`adapter_config.json`, `adapter_model.safetensors` (the adapter-side tensors only) and, when given, the
processor files. Loading resolves the backbones again, refuses one whose fingerprint differs, builds the
model around them and loads the adapter tensors strictly.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, PreTrainedModel

from .backbones import (
    BackboneReference,
    BackboneSpec,
    check_backbone,
    load_text_backbone,
    load_vision_backbone,
    resolve_checkpoint_folder,
)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterCheckpointMixin:
    """Adds adapter-only `save_pretrained` / `from_pretrained` to a `PreTrainedModel` whose `__init__` takes
    `(config, language_model=None, vision_tower=None)` and whose config has `text_backbone`/`vision_backbone`.

    Subclasses say which top-level modules are saved with `adapter_module_names()` and how the adapter settings
    are written with `adapter_config_to_save()`.
    """

    def adapter_module_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def adapter_config_to_save(self) -> Any:
        raise NotImplementedError

    def load_referenced_weights(self, checkpoint: str, ignore_backbone_mismatch: bool) -> None:
        """Load trainable-side weights that the checkpoint references instead of storing (none by default)."""

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The saved side only (see `adapter_module_names`); the frozen backbones are never included."""
        names = self.adapter_module_names()
        return {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] in names}

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
        self.load_state_dict(state_dict, strict=False)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        adapter_only: bool = True,
        processor: Any = None,
        **kwargs: Any,
    ) -> None:
        """Save the adapters only (default) or, with `adapter_only=False`, every weight. A processor given is
        saved too, so that `AutoProcessor` and `pipeline` load the folder."""
        if not adapter_only:
            # No adapter_config.json here: transformers would take the folder for a PEFT adapter. The adapter
            # settings are in config.json.
            PreTrainedModel.save_pretrained(self, save_directory, **kwargs)
        else:
            unsaved = [
                role for role in ("text", "vision") if getattr(self.config, f"{role}_backbone") is None
            ]
            if unsaved:
                raise ValueError(
                    f"The {' and '.join(unsaved)} backbone(s) were built from config objects (random weights), so "
                    "an adapter-only checkpoint could not be loaded again. Save the backbones with their own "
                    "`save_pretrained` and build the model from those folders, or use `adapter_only=False`."
                )
            os.makedirs(save_directory, exist_ok=True)
            self.config.save_pretrained(save_directory)
            self.generation_config.save_pretrained(save_directory)
            state = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
            save_file(state, os.path.join(save_directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
            self.adapter_config_to_save().save_pretrained(save_directory)
        if processor is not None:
            processor.save_pretrained(save_directory)

    def push_to_hub(
        self,
        repo_id: str,
        processor: Any = None,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        adapter_only: bool = True,
        **kwargs: Any,
    ) -> str:
        """Upload the adapter-only checkpoint (with `processor` files when given, and a generated model card) to
        `repo_id` on the Hub; returns the commit URL. See `mmadapters.hub.push_folder` for the options
        (retries, `include_backbone_weights` for `adapter_only=False`)."""
        import tempfile

        from ..hub import push_folder

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, adapter_only=adapter_only, processor=processor)
            return push_folder(
                folder,
                repo_id,
                private=private,
                token=token,
                commit_message=commit_message,
                include_backbone_weights=not adapter_only,
                **kwargs,
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        text_model: BackboneSpec | None = None,
        vision_model: BackboneSpec | None = None,
        ignore_backbone_mismatch: bool = False,
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load a checkpoint: adapter-only (the backbones are resolved again from the names in config.json, or
        from `text_model` / `vision_model` if given, and checked against the recorded fingerprints) or full."""
        # transformers' Auto classes take any folder with an adapter_config.json for a PEFT adapter and pass
        # these along; our adapters are not PEFT's, and are loaded below.
        kwargs.pop("adapter_kwargs", None)
        kwargs.pop("_adapter_model_path", None)
        name = os.fspath(pretrained_model_name_or_path)
        folder = resolve_checkpoint_folder(name, revision)
        if not os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS_NAME)):
            kwargs.pop("config", None)
            dtype = torch.float32 if dtype in (None, "auto") else dtype
            return super().from_pretrained(folder, *model_args, dtype=dtype, **kwargs)

        config = cls.config_class.from_pretrained(folder)
        dtype = None if dtype == "auto" else dtype
        loaded = {}
        for role, loader, override in (
            ("text", load_text_backbone, text_model),
            ("vision", load_vision_backbone, vision_model),
        ):
            expected = BackboneReference(**getattr(config, f"{role}_backbone"))
            source = override or expected.name_or_path
            model, found = loader(source, dtype, None if override else expected.revision)
            if not ignore_backbone_mismatch:
                check_backbone(role, expected, found, name)
            loaded[role] = model
        config.text_config = loaded["text"].config
        config.vision_config = loaded["vision"].config
        model = cls(config, language_model=loaded["text"], vision_tower=loaded["vision"])
        model.load_referenced_weights(name, ignore_backbone_mismatch)
        model.load_adapter_state_dict(load_file(os.path.join(folder, ADAPTER_WEIGHTS_NAME)), source=name)
        if os.path.isfile(os.path.join(folder, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(folder)
        model.eval()
        return model
