"""Injection of MM-Adapters into a frozen Hugging Face decoder and vision tower.

Adapters are attached with forward hooks on the existing norm modules, so no base parameter is renamed or
moved: the backbone's own checkpoint keys keep loading untouched, and the adapter modules are owned (and
saved) by the composite model. Where the LLM adapters sit (LAVIN.md section 2):

    h = x + Attn(Adapter(input_layernorm(x)))            every decoder layer
    out = h + MLP(Adapter(post_attention_layernorm(h)))  only with placement="attn_mlp"
    vision: x + Attn(Adapter(layer_norm1(x)))            every encoder layer
"""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from .mm_adapter import MMAdapter


def find_decoder_layers(language_model: nn.Module, need_mlp_norm: bool = False) -> nn.ModuleList:
    """The decoder layers of a causal LM (Llama, Mistral, Qwen2/3, SmolLM2, ...), checked for an input norm."""
    decoder = language_model.get_decoder() if hasattr(language_model, "get_decoder") else language_model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"Cannot find the decoder layers of {type(language_model).__name__}: LaVIN's adapters need a decoder "
            "with a `layers` list (Llama, Mistral, Qwen2, ... style)."
        )
    norms = ["input_layernorm"] + (["post_attention_layernorm"] if need_mlp_norm else [])
    for name in norms:
        if not isinstance(getattr(layers[0], name, None), nn.Module):
            raise ValueError(
                f"{type(layers[0]).__name__} has no `{name}`: LaVIN's MM-Adapter sits on the norm before "
                "self-attention (and before the MLP for placement='attn_mlp'); this architecture is not supported."
            )
    return layers


def find_vision_layers(vision_model: nn.Module) -> nn.ModuleList:
    """The encoder layers of a CLIP/SigLIP-style vision tower, checked for `layer_norm1`."""
    inner = getattr(vision_model, "vision_model", vision_model)
    layers = getattr(getattr(inner, "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(layers[0], "layer_norm1"):
        raise ValueError(
            f"Cannot find CLIP/SigLIP-style encoder layers (`encoder.layers[i].layer_norm1`) in "
            f"{type(vision_model).__name__}; pass a CLIP or SigLIP vision tower."
        )
    return layers


def inject_decoder_adapters(layers: nn.ModuleList, adapters: list[list[MMAdapter]]) -> list[RemovableHandle]:
    """Hook `adapters[i][0]` on layer i's input norm (and `adapters[i][1]` on its post-attention norm)."""
    if len(adapters) != len(layers):
        raise ValueError(f"Got adapters for {len(adapters)} layers, the decoder has {len(layers)}.")
    handles = []
    norm_names = ("input_layernorm", "post_attention_layernorm")
    for layer_index, (layer, layer_adapters) in enumerate(zip(layers, adapters, strict=True)):
        for site_index, adapter in enumerate(layer_adapters):
            adapter.layer_index, adapter.site_index = layer_index, site_index
            handles.append(layer.register_forward_pre_hook(adapter.decoder_layer_pre_hook, with_kwargs=True))
            norm = getattr(layer, norm_names[site_index])
            handles.append(norm.register_forward_hook(adapter.norm_output_hook))
    return handles


def inject_vision_adapters(layers: nn.ModuleList, adapters: list[MMAdapter]) -> list[RemovableHandle]:
    """Hook `adapters[j]` on vision layer j's `layer_norm1`; each adapter routes itself per image."""
    if len(adapters) != len(layers):
        raise ValueError(f"Got {len(adapters)} vision adapters, the vision tower has {len(layers)} layers.")
    return [
        layer.layer_norm1.register_forward_hook(adapter.norm_output_hook)
        for layer, adapter in zip(layers, adapters, strict=True)
    ]
