"""CROME model configuration."""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ..adapters import CromeAdapterConfig
from ..frozen_backbones_config import FrozenBackbonesConfig
from ..vision_layout import num_patches, tokens_before_patches

STAGES = ("pretrain", "instruct", "finetune")


@strict
class CromeConfig(FrozenBackbonesConfig):
    r"""Configuration of [`CromeForConditionalGeneration`] (CROME, arXiv 2408.06610): a frozen vision tower, an
    instruction-aware Q-Former, projections, the cross-modal CROME-Adapter and a frozen LLM (decoder-only or
    encoder-decoder).

    Defaults: InstructBLIP's EVA ViT-g/14 tower and Q-Former shapes with LLaMA-7B-sized (Vicuna-7B) text shapes.

    Args:
        text_config: the frozen LLM (Llama family or T5 family).
        vision_config: the frozen vision tower (InstructBLIP's, CLIP or SigLIP).
        qformer_config: an `InstructBlipQFormerConfig`; its `encoder_hidden_size` must equal the tower's width.
        adapter_config: a `CromeAdapterConfig` as a dict.
        num_query_tokens: learned Q-Former queries (32).
        use_patch_branch: also pass the projected image patches (without the tokens before them: CLS, registers)
            to the adapter [ours, on].
        vision_feature_layer: the vision hidden state the patch branch reads (-2: second-to-last layer).
        image_token_id: id of the image placeholder in `input_ids` (may lie past the LLM's embeddings).
        stages_used: training stages set so far (see `CromeForConditionalGeneration.set_stage`); an adapter-only
            checkpoint holds everything any of them trained.
        text_backbone, vision_backbone: where the frozen backbones come from (name, revision, fingerprint).
        qformer_source: the InstructBLIP checkpoint the Q-Former, the query tokens and (when the widths match)
            the query projection were initialised from, with `modules` naming what it provided.
        backbone_quantization: how the backbones were quantised (see `LavinConfig`).
        peft_adapters: PEFT layers on the backbones (LoRA on top; see `LavinConfig`).
    """

    model_type = "crome"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="instructblip_vision_model"),
        "qformer_config": SubConfigSpec(config_class=AutoConfig, model_type="instructblip_qformer"),
    }

    adapter_config_class = CromeAdapterConfig

    qformer_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    use_patch_branch: bool = True
    vision_feature_layer: int = -2
    stages_used: list[str] | None = None
    qformer_source: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.qformer_config.encoder_hidden_size != self.vision_config.hidden_size:
            raise ValueError(
                f"qformer_config.encoder_hidden_size={self.qformer_config.encoder_hidden_size} must equal the vision "
                f"tower's hidden_size={self.vision_config.hidden_size}: the Q-Former cross-attends to its output."
            )
        if self.num_query_tokens < 1:
            raise ValueError(
                f"num_query_tokens must be a positive integer (32 in the paper), got {self.num_query_tokens}."
            )
        num_vision_layers = self.vision_config.num_hidden_layers
        if not -(num_vision_layers + 1) <= self.vision_feature_layer <= num_vision_layers:
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer} must index the vision tower's hidden states "
                f"(-{num_vision_layers + 1}..{num_vision_layers}: the embeddings, then {num_vision_layers} layers)."
            )
        self.stages_used = list(self.stages_used or [])
        unknown = [stage for stage in self.stages_used if stage not in STAGES]
        if unknown:
            raise ValueError(f"Unknown stage(s) {unknown}; stages are {STAGES}.")

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens the vision tower puts before its patches: the CLS token (CLIP, BLIP / InstructBLIP, ViT, DINOv2),
        DeiT's distillation token and register tokens (DINOv2 with registers); SigLIP and the towers built on it,
        AIMv2 and I-JEPA have none (see `vision_layout`). A tower of another layout is refused by the count check
        in `get_image_features`."""
        return tokens_before_patches(self.vision_config)

    @property
    def num_patches(self) -> int:
        return num_patches(self.vision_config)

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image: the Q-Former queries, then the patches (with the patch branch)."""
        return self.num_query_tokens + (self.num_patches if self.use_patch_branch else 0)

    @property
    def crome_adapter_config(self) -> CromeAdapterConfig:
        return CromeAdapterConfig.from_dict(self.adapter_config)


__all__ = ["STAGES", "CromeConfig"]
