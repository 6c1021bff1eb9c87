"""The backbone shapes the papers use, in one place: for full-size parameter counts (meta device, no weights),
benchmarks and the GPU check. Random-weight configs only; real runs load the Hub checkpoints."""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig

# CLIP ViT-L/14 at 224 px (LaVIN's vision tower): also LavinConfig's default vision config.
VIT_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    image_size=224,
    projection_dim=768,
)
LLAMA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
)
LLAMA_13B = dict(
    hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, vocab_size=32000
)


def vit_l14_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(**VIT_L14)


def llama_7b_config() -> LlamaConfig:
    """LLaMA-7B (and Vicuna-7B) shapes."""
    return LlamaConfig(**LLAMA_7B)


def llama_13b_config() -> LlamaConfig:
    """LLaMA-13B (and Vicuna-13B) shapes."""
    return LlamaConfig(**LLAMA_13B)


__all__ = ["LLAMA_13B", "LLAMA_7B", "VIT_L14", "llama_13b_config", "llama_7b_config", "vit_l14_config"]
