"""Where a vision tower's patches start in its output: after one CLS token (CLIP, BLIP, ViT, DINOv2, ...), after the
CLS and DeiT's distillation token, after register tokens (DINOv2 with registers), or at once (SigLIP and the towers
built on it, AIMv2, I-JEPA).

LaVIN reads each feature layer's CLS token (the mean of its tokens where there is none) and routes its vision
adapters by it; CROME's patch branch skips what comes before the patches. The layout is known by model type (the
short table below); a tower of another layout is caught by a count check at its first image rather than guessed
(`LavinForConditionalGeneration.check_cls_token`, `CromeForConditionalGeneration.check_patch_count`).
"""

from __future__ import annotations

from transformers import PreTrainedConfig

# Tokens before the patches, by model type, where it is not one CLS token. Any model type with "siglip" in it has
# none; register tokens are counted from the config (`num_register_tokens`).
TOKENS_BEFORE_PATCHES = {
    "aimv2_vision_model": 0,
    "ijepa": 0,
    # SigLIP-based towers of other model types (Idefics3 / SmolVLM / Aria, Granite Docling, Phi-4-multimodal, Janus)
    "idefics3_vision": 0,
    "smolvlm_vision": 0,
    "granite_docling_vision": 0,
    "phi4_multimodal_vision": 0,
    "janus_vision_model": 0,
    "deit": 2,  # CLS and the distillation token
}


def tokens_before_patches(vision_config: PreTrainedConfig) -> int:
    """How many tokens come before the patches in the output of a tower of this config."""
    model_type = vision_config.model_type
    before = 0 if "siglip" in model_type else TOKENS_BEFORE_PATCHES.get(model_type, 1)
    return before + int(getattr(vision_config, "num_register_tokens", 0) or 0)


def has_cls_token(vision_config: PreTrainedConfig) -> bool:
    """Whether a tower of this config puts a CLS token first (towers with registers put it before them)."""
    return tokens_before_patches(vision_config) > 0


def square_side(vision_config: PreTrainedConfig, name: str) -> int:
    """The tower's `image_size` or `patch_size` as one side: an int, or a pair of equal sides (InternVL's tower
    gives (448, 448)). Both models feed square images; a tower of other sides is refused."""
    value = getattr(vision_config, name)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(
                f"The vision tower's {name} is {tuple(value)}: LaVIN and CROME feed it square images (the processors "
                "resize to one side). Pass a tower of square images and patches."
            )
        value = value[0]
    return int(value)


def num_patches(vision_config: PreTrainedConfig) -> int:
    """Patches per image at the tower's resolution."""
    return (square_side(vision_config, "image_size") // square_side(vision_config, "patch_size")) ** 2
