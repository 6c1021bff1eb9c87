"""The methods the package implements, in one table: kind -> config, model, processor and adapter settings.

Recipes, the CLI and the demo look a method up here instead of branching on its name; adding a method means adding
a row (and its Auto-class registration in `mmadapters/__init__.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .method_names import METHOD_NAMES
from .modeling.adapters import CromeAdapterConfig, MMAdapterConfig
from .modeling.crome import CromeConfig, CromeForConditionalGeneration
from .modeling.lavin import LavinConfig, LavinForConditionalGeneration
from .processing import CromeProcessor, LavinProcessor
from .trainers import CromeTrainer, LavinTrainer


@dataclass(frozen=True)
class Method:
    """One adapter method: its classes and how to build it around two backbones."""

    kind: str
    config_class: type
    model_class: type
    processor_class: type
    adapter_config_class: type
    trainer_class: type
    staged: bool = False  # trained in stages (CROME): the Trainer takes the recipe's `stage`

    @property
    def title(self) -> str:
        """How people call it (`mmadapters.method_names`)."""
        return METHOD_NAMES[self.kind].title

    def trainer(self, recipe: dict[str, Any], **trainer_kwargs: Any) -> Any:
        """The method's Trainer for a recipe (CROME's takes the recipe's `stage`)."""
        stage = {"stage": recipe.get("stage", "finetune")} if self.staged else {}
        return self.trainer_class(**stage, **trainer_kwargs)

    def build(
        self, text_model: Any, vision_model: Any, adapter: dict[str, Any] | None = None, **config_fields: Any
    ) -> tuple[Any, Any]:
        """(model, processor) around the backbones, with `adapter` settings (a dict of the adapter config's
        fields) and other config fields."""
        adapter_config = self.adapter_config_class.from_dict(adapter or {})
        model = self.model_class.from_backbones(
            text_model, vision_model, adapter_config=adapter_config, **config_fields
        )
        return model, self.processor_class.from_model(model)


METHODS = {
    "lavin": Method(
        "lavin",
        LavinConfig,
        LavinForConditionalGeneration,
        LavinProcessor,
        MMAdapterConfig,
        LavinTrainer,
    ),
    "crome": Method(
        "crome",
        CromeConfig,
        CromeForConditionalGeneration,
        CromeProcessor,
        CromeAdapterConfig,
        CromeTrainer,
        staged=True,
    ),
}


def method(kind: str) -> Method:
    """The method named `kind` ("lavin", "crome"), or a clear error naming the known ones."""
    if kind not in METHODS:
        raise ValueError(f"Unknown method {kind!r}; the methods are {sorted(METHODS)}.")
    return METHODS[kind]
