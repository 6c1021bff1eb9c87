"""LaVIN model configuration."""

from __future__ import annotations

from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import SubConfigSpec

from ..adapters import MMAdapterConfig
from ..frozen_backbones_config import FrozenBackbonesConfig
from ..paper_configs import VIT_L14
from ..vision_layout import has_cls_token


def default_vision_feature_layers(num_vision_layers: int) -> list[int]:
    """Every 4th vision layer (4, 8, ..., 24 for ViT-L/14: 6 visual tokens), as in the paper."""
    return list(range(4, num_vision_layers + 1, 4)) or [num_vision_layers]


@strict
class LavinConfig(FrozenBackbonesConfig):
    r"""Configuration of [`LavinForConditionalGeneration`]: a frozen LLM and a frozen vision tower joined by
    LaVIN's MM-Adapters (Luo et al., NeurIPS 2023).

    The defaults describe the paper's LaVIN-7B: LLaMA-7B shapes and CLIP ViT-L/14 at 224 px.

    Args (besides those of `FrozenBackbonesConfig`: text_config, vision_config, adapter_config, image_token_id,
    text_backbone, vision_backbone, backbone_quantization, peft_adapters):
        text_config: config of the frozen LLM (any decoder with an input norm before self-attention).
        vision_config: config of the frozen vision tower (CLIP or SigLIP vision model).
        adapter_config: an `MMAdapterConfig` as a dict.
        vision_feature_layers: the vision layers whose first token (CLS) becomes a visual token; default
            every 4th layer (4, 8, ..., 24 for ViT-L: 6 tokens). Taken before any post-layernorm.
        vision_feature_pooling: "cls" (the first token; CLIP) or "mean" (mean of all tokens; towers without a
            CLS token such as SigLIP). Also how vision adapters pick their router input. Default: "mean" for
            towers without a CLS token (`vision_layout.has_cls_token`: SigLIP and the towers built on it), else "cls".
        vision_feature_whitening: whiten the visual features (per feature layer, with statistics fitted by
            `fit_feature_whitening` on unlabeled images) before the projector. Not in the paper; for vision
            towers with badly conditioned features, such as the embedded seeded random one. Default False.
        projector_hidden_size: width of the SiLU projector's hidden layer (128 in the paper).
        official_processing: the checkpoint was converted from the official LaVIN code (`convert-lavin`): its
            inputs are built as the official code builds them (`LavinProcessor(official_preprocessing=True,
            official_tokenization=True)`), and a processor rebuilt for it from its backbones (a checkpoint saved
            without its processor, `LavinProcessor.from_model`) is built so too. Default False.
    """

    model_type = "lavin"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs=VIT_L14,
        ),
    }

    adapter_config_class = MMAdapterConfig

    vision_feature_layers: list[int] | None = None
    vision_feature_pooling: Literal["cls", "mean"] | None = None
    vision_feature_whitening: bool = False
    projector_hidden_size: int = 128
    official_processing: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        num_vision_layers = self.vision_config.num_hidden_layers
        if self.vision_feature_layers is None:
            self.vision_feature_layers = default_vision_feature_layers(num_vision_layers)
        bad = [
            layer
            for layer in self.vision_feature_layers
            if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= num_vision_layers
        ]
        if bad or not self.vision_feature_layers:
            raise ValueError(
                f"vision_feature_layers={self.vision_feature_layers} must name layers 1..{num_vision_layers} of "
                "the vision tower (layer k = output of the k-th encoder layer)."
            )
        if self.vision_feature_pooling is None:
            self.vision_feature_pooling = "cls" if has_cls_token(self.vision_config) else "mean"
        if self.vision_feature_pooling not in ("cls", "mean"):
            raise ValueError(
                f"vision_feature_pooling must be 'cls' or 'mean', got {self.vision_feature_pooling!r}."
            )
        if self.vision_feature_pooling == "cls" and not has_cls_token(self.vision_config):
            raise ValueError(
                f"vision_feature_pooling='cls' reads each image's CLS token, but the vision tower "
                f"({self.vision_config.model_type}) has no CLS token: its first token is a patch. Use "
                "vision_feature_pooling='mean' (the default for this tower)."
            )
        if self.projector_hidden_size < 1:
            raise ValueError(
                f"projector_hidden_size must be a positive integer (128 in the paper), got {self.projector_hidden_size}."
            )

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image: one per feature layer (6 for ViT-L/14)."""
        return len(self.vision_feature_layers)

    @property
    def mm_adapter_config(self) -> MMAdapterConfig:
        return MMAdapterConfig.from_dict(self.adapter_config)


__all__ = ["LavinConfig"]
