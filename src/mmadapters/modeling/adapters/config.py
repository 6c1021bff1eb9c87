"""PEFT-style configurations of our adapters (LaVIN's MM-Adapter, CROME's adapter).

A model checkpoint keeps them in its config.json (`adapter_config`); `save_pretrained` / `from_pretrained` here
write and read one on its own, as PEFT's `adapter_config.json` (checkpoints no longer carry that file: see
`mmadapters.checkpoint_files`)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ...errors import MMAdaptersError
from ...validation import type_errors

ADAPTER_CONFIG_NAME = "adapter_config.json"


class AdapterSettingsError(MMAdaptersError, ValueError):
    """Adapter settings that do not fit the adapters they are meant for."""


class AdapterConfigFile:
    """Saving and loading shared by our adapter configs (PEFT's layout: one `adapter_config.json`)."""

    peft_type: str
    # The fields that decide the adapters' weights (their shapes, which exist): a checkpoint's adapters load only
    # with its own values of these. The others (dropout, temperature, ...) may change at load time.
    WEIGHT_FIELDS: ClassVar[tuple[str, ...]] = ("peft_type",)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Unknown {cls.__name__} field(s) {unknown}; known fields are {sorted(known)}. "
                "Was this adapter_config.json written by a newer mmadapters or by another adapter method?"
            )
        errors = type_errors(cls, values)
        method = cls.peft_type  # the method's own (each config class's default)
        if "peft_type" not in errors and values.get("peft_type", method) != method:
            errors["peft_type"] = (
                f"must be {method!r}, got {values['peft_type']!r} (another method's settings)"
            )
        if errors:
            raise ValueError(
                "; ".join(f"{cls.__name__}.{name} {message}" for name, message in errors.items()) + "."
            )
        return cls(**values)

    def with_changes(self, changes: dict[str, Any], where: str) -> Any:
        """This config with the fields in `changes` replaced (validated), refusing a change to a weight field with
        a message for `where` (the checkpoint whose adapters these settings describe)."""
        changed = type(self).from_dict({**self.to_dict(), **changes})
        refused = [
            f"{name} ({getattr(self, name)!r} -> {getattr(changed, name)!r})"
            for name in self.WEIGHT_FIELDS
            if getattr(changed, name) != getattr(self, name)
        ]
        if refused:
            others = sorted(set(self.to_dict()) - set(self.WEIGHT_FIELDS) - {"base_model_name_or_path"})
            raise AdapterSettingsError(
                f"adapter_config changes {', '.join(refused)}, which decide the shapes of the adapters in {where}: "
                f"they load only with the values they were trained with. Leave these out (fields that leave the "
                f"weights alone may change: {', '.join(others)}), or build new adapters with from_backbones."
            )
        return changed

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, ADAPTER_CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Any:
        path = os.path.join(directory, ADAPTER_CONFIG_NAME)
        with open(path) as f:
            values = json.load(f)
        try:
            return cls.from_dict(values)  # checks the fields, another method's peft_type included
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


@dataclass
class MMAdapterConfig(AdapterConfigFile):
    """Configuration of the MM-Adapters that LaVIN (Mixture-of-Modality Adaptation) injects.

    Follows PEFT's conventions (a dataclass, `save_pretrained` / `from_pretrained`, a `peft_type`), but PEFT
    cannot register new method types from outside the library, so the adapter lives in our model.

    Args:
        r: bottleneck width of the down-projection (8 in the paper).
        groups: groups of the two up-projection experts (block-diagonal, 2 in the paper).
        dropout: dropout on the down-projection output (0.1 in the paper).
        scale: scale s of the adapter branch (1 in the paper).
        temperature: router softmax temperature tau (10 for LLaMA-7B, 5 for 13B).
        placement: "attn" puts one adapter before self-attention in every decoder layer (the paper);
            "attn_mlp" adds a second one before the MLP (off in the paper: no gain reported).
        vision_adapters: inject adapters in every vision encoder layer too (the paper does).
        llm_routing: how the LLM-side adapters are routed. "learned" (the paper): routing weights from each
            adapter's router, reading the modality token. "modality" (ours, off by default): fixed by the
            modality, text-only sequences through expert D alone and sequences with an image through expert B
            alone, so that training on images cannot change the text-only path (its routers and the modality
            embedding then do not train). Why: with the learned router at temperature 10 the weights stay near
            0.5 / 0.5 for both modalities through short runs (benchmarks/README.md, "Quickstart").
        official_vision_routing: parity flag for converted official checkpoints only. The official code
            routes every image of a batch (position by position) by the first image's tokens; the
            default routes each image by its own first token.
    """

    r: int = 8
    groups: int = 2
    dropout: float = 0.1
    scale: float = 1.0
    temperature: float = 10.0
    placement: Literal["attn", "attn_mlp"] = "attn"
    vision_adapters: bool = True
    llm_routing: Literal["learned", "modality"] = "learned"
    official_vision_routing: bool = False
    peft_type: str = "MMA"
    base_model_name_or_path: str | None = None

    WEIGHT_FIELDS: ClassVar[tuple[str, ...]] = ("r", "groups", "placement", "vision_adapters", "peft_type")

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"MMAdapterConfig.r must be a positive integer, got {self.r}.")
        if self.groups < 1 or self.r % self.groups != 0:
            raise ValueError(
                f"MMAdapterConfig.groups={self.groups} must divide r={self.r} (each expert group reads r/groups "
                "hidden units)."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MMAdapterConfig.dropout must be in [0, 1), got {self.dropout}.")
        if self.temperature <= 0:
            raise ValueError(f"MMAdapterConfig.temperature must be > 0, got {self.temperature}.")
        if self.llm_routing not in ("learned", "modality"):
            raise ValueError(
                f"MMAdapterConfig.llm_routing must be 'learned' or 'modality', got {self.llm_routing!r}."
            )
        if self.placement not in ("attn", "attn_mlp"):
            raise ValueError(
                f"MMAdapterConfig.placement must be 'attn' or 'attn_mlp', got {self.placement!r}."
            )

    @property
    def sites_per_layer(self) -> int:
        """How many adapters each decoder layer holds (1 before attention, +1 before the MLP)."""
        return 2 if self.placement == "attn_mlp" else 1


@dataclass
class CromeAdapterConfig(AdapterConfigFile):
    """Configuration of CROME's cross-modal adapter (CROME.md section 2).

    Args:
        bottleneck: width m of the gated down-projections (256 in the paper: 5 * d * m parameters).
        bias: biases on the projections (none in the paper).
        zero_init_up: start the shared up-projection at zero, so the adapter starts as the identity [ours].
    """

    bottleneck: int = 256
    bias: bool = False
    zero_init_up: bool = True
    peft_type: str = "CROME"
    base_model_name_or_path: str | None = None

    WEIGHT_FIELDS: ClassVar[tuple[str, ...]] = ("bottleneck", "bias", "peft_type")

    def __post_init__(self) -> None:
        if self.bottleneck < 1:
            raise ValueError(
                f"CromeAdapterConfig.bottleneck must be a positive integer, got {self.bottleneck}."
            )
