"""Injection of MM-Adapters into a frozen Hugging Face decoder and vision tower.

Adapters are attached with forward hooks, so no base parameter is renamed or moved: the backbone's own
checkpoint keys keep loading untouched, and the adapter modules are owned (and saved) by the composite model.
Where the adapters sit (LAVIN.md section 2):

    h = x + Attn(Adapter(input_layernorm(x)))            every decoder layer
    out = h + MLP(Adapter(norm(h)))                      only with placement="attn_mlp"
    vision: x + Attn(Adapter(layer_norm1(x)))            every encoder layer

LLM side: the attention-site adapter transforms the normed hidden states as they enter self-attention (a
forward pre-hook on `self_attn`, which receives the layer's keyword arguments), or, in the linear-attention layers
of hybrid LLMs (Qwen3.5, Qwen3-Next: `linear_attn`), the token mixer that takes its place (ours: the
paper's LLaMA has self-attention only). That is where the routing weights arrive: the LaVIN model passes
`mm_routing_weights` (batch, layers, sites, 2) to the LLM forward and transformers hands extra keyword arguments
to every decoder layer and its token mixer. The hook runs inside
the layer's forward, so a gradient-checkpointed layer recomputes it with the same arguments. The MLP-site
adapter transforms what enters the MLP (a forward pre-hook on `mlp`): the normed hidden states whatever the norm
is called (`post_attention_layernorm` in Llama; Gemma 2/3, OLMo 2, ... apply that one to the attention output and
give the MLP input `pre_feedforward_layernorm`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .call_state import hand_over, take_over
from .config import MMAdapterConfig
from .data_parallel import REPLICA_ADAPTER, replica_adapter
from .mm_adapter import MMAdapter

# Keyword arguments of the LLM forward that reach every decoder layer: the per-layer routing weights, or
# (generation only) the adapters folded per modality with each sequence's modality.
ROUTING_WEIGHTS_KWARG = "mm_routing_weights"
FOLDED_ADAPTERS_KWARG = "mm_folded_adapters"


# The token mixers an attention-site adapter sits in front of, by the name decoder layers give them.
TOKEN_MIXERS = ("self_attn", "linear_attn")


def token_mixer(layer: nn.Module) -> nn.Module | None:
    """The decoder layer's self-attention, or the linear attention of a hybrid LLM's other layers."""
    for name in TOKEN_MIXERS:
        if isinstance(module := getattr(layer, name, None), nn.Module):
            return module
    return None


class FoldedAdapters:
    """The LLM adapters of every layer folded per modality (inference): each site is x + U (A x + b_A) + c.

    up: (layers, sites, 2 modalities, d, r); bias: (layers, sites, 2, d). `rows` picks each sequence's modality
    and splits per layer and site, so that the per-layer hooks only index Python lists. A batch of a single
    modality (the common case) gets one (d, r) / (d,) pair per site, computed once and reused: the hook is then
    two small linear layers and an add.
    """

    def __init__(self, up: torch.Tensor, bias: torch.Tensor) -> None:
        self.up = up
        self.bias = bias
        self._single_modality_rows: dict[int, tuple[list, list]] = {}

    def rows(self, modality: torch.Tensor) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        if bool((modality == modality[0]).all()):
            key = int(modality[0])
            if key not in self._single_modality_rows:
                self._single_modality_rows[key] = self._split(key)
            return self._single_modality_rows[key]
        return self._split(modality)

    def _split(self, index: torch.Tensor | int) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        # An int picks one modality for the whole batch: (d, r) and (d,) per site. A tensor picks one per
        # sequence: (batch, d, r) and (batch, d).
        up, bias = self.up[:, :, index], self.bias[:, :, index]
        return (
            [list(layer.unbind(0)) for layer in up.unbind(0)],
            [list(layer.unbind(0)) for layer in bias.unbind(0)],
        )


class DecoderLayerAdapters(nn.Module):
    """The MM-Adapters of one decoder layer: `attn` before self-attention, `mlp` before the MLP (optional)."""

    def __init__(self, hidden_size: int, config: MMAdapterConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.attn = MMAdapter(hidden_size, config)
        self.mlp = MMAdapter(hidden_size, config) if config.placement == "attn_mlp" else None

    def sites(self) -> list[MMAdapter]:
        return [self.attn] if self.mlp is None else [self.attn, self.mlp]

    def attention_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook on the token mixer: adapt its input hidden states with this layer's routing weights.

        No routing weights in the arguments means "route by your own first token" (used to run the
        modality token alone when the routing table is computed).
        """
        if (own := replica_adapter(module, self)) is not self:  # a DataParallel replica: its own adapters
            return own.attention_pre_hook(module, args, kwargs)
        if (folded := kwargs.get(FOLDED_ADAPTERS_KWARG)) is not None:
            return self._apply_folded(args, kwargs, *folded)
        table = kwargs.get(ROUTING_WEIGHTS_KWARG)
        rows = None if table is None else table[:, self.layer_index]  # (batch, sites, 2)
        if rows is not None:
            rows = rows.to(self.attn.down.weight.device)
        if self.mlp is not None:  # the MLP runs next in this same layer call (per-thread hand-over)
            hand_over(self, ("routing", None if rows is None else rows[:, 1]))
        attn_weights = None if rows is None else rows[:, 0]
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = self.attn.adapt(kwargs["hidden_states"], attn_weights)
        else:
            args = (self.attn.adapt(args[0], attn_weights), *args[1:])
        return args, kwargs

    def _apply_folded(
        self, args: tuple, kwargs: dict, ups: list[list[torch.Tensor]], biases: list[list[torch.Tensor]]
    ) -> tuple[tuple, dict]:
        # ups[layer][site]: (batch or 1, d, r) and biases[layer][site]: (batch or 1, d), see FoldedAdapters.rows.
        up, bias = ups[self.layer_index], biases[self.layer_index]
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if up[0].device != hidden.device:  # a device map split the layers: bring this layer's rows over
            up, bias = [u.to(hidden.device) for u in up], [b.to(hidden.device) for b in bias]
        if self.mlp is not None:
            hand_over(self, ("folded", (up[1], bias[1])))
        adapted = self.attn.forward_folded(hidden.to(up[0].dtype), up[0], bias[0]).to(hidden.dtype)
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = adapted
        else:
            args = (adapted, *args[1:])
        return args, kwargs

    def fold(self, routing_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold every site for both modalities; `routing_table`: (2, sites, 2) rows of this layer."""
        folded = [site.fold(routing_table[:, index]) for index, site in enumerate(self.sites())]
        return torch.stack([up for up, _ in folded]), torch.stack([bias for _, bias in folded])

    def mlp_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook on `mlp`: adapt its input with what the attention site handed over."""
        if (own := replica_adapter(module, self)) is not self:  # a DataParallel replica: its own adapters
            return own.mlp_pre_hook(module, args, kwargs)
        kind, value = take_over(self, ("routing", None))
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if kind == "folded":
            up, bias = value
            adapted = self.mlp.forward_folded(hidden.to(up.dtype), up, bias).to(hidden.dtype)
        else:
            adapted = self.mlp.adapt(hidden, value)
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = adapted
        else:
            args = (adapted, *args[1:])
        return args, kwargs


def find_decoder_layers(language_model: nn.Module, need_mlp: bool = False) -> nn.ModuleList:
    """The decoder layers of a causal LM (Llama, Mistral, Qwen2/3, SmolLM2, ...), checked for an input norm."""
    decoder = language_model.get_decoder() if hasattr(language_model, "get_decoder") else language_model
    if getattr(decoder, "layers", None) is None:
        # transformers' get_decoder returns the model itself where its base model is stored under another name than
        # base_model_prefix (Llama 4's text model): the decoder is then the usual `model` attribute.
        decoder = getattr(decoder, "model", decoder)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"Cannot find the decoder layers of {type(language_model).__name__}: LaVIN's adapters need a decoder "
            "with a `layers` list (Llama, Mistral, Qwen2, ... style)."
        )
    # Every layer: hybrid LLMs mix layer kinds, and one without these stopped the first forward.
    for index, layer in enumerate(layers):
        needed = {"input_layernorm": getattr(layer, "input_layernorm", None), "self_attn": token_mixer(layer)}
        if need_mlp:
            needed["mlp"] = getattr(layer, "mlp", None)
        missing = [name for name, module in needed.items() if not isinstance(module, nn.Module)]
        if missing:
            raise ValueError(
                f"{type(layer).__name__} (decoder layer {index}) has no `{missing[0]}`: LaVIN's MM-Adapter sits on "
                "the norm before self-attention (or before a hybrid LLM's `linear_attn`; and before the MLP for "
                "placement='attn_mlp'); this architecture is not supported."
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


def inject_decoder_adapters(layers: nn.ModuleList, adapters: nn.ModuleList) -> list[RemovableHandle]:
    """Hook `adapters[i]` (a `DecoderLayerAdapters`) into decoder layer i."""
    if len(adapters) != len(layers):
        raise ValueError(f"Got adapters for {len(adapters)} layers, the decoder has {len(layers)}.")
    handles = []
    for layer, layer_adapters in zip(layers, adapters, strict=True):
        handles.append(
            token_mixer(layer).register_forward_pre_hook(layer_adapters.attention_pre_hook, with_kwargs=True)
        )
        if layer_adapters.mlp is not None:
            handles.append(layer.mlp.register_forward_pre_hook(layer_adapters.mlp_pre_hook, with_kwargs=True))
    return handles


def inject_vision_adapters(layers: nn.ModuleList, adapters: list[MMAdapter]) -> list[RemovableHandle]:
    """Hook `adapters[j]` on vision layer j's `layer_norm1`; each adapter routes itself per image."""
    if len(adapters) != len(layers):
        raise ValueError(f"Got {len(adapters)} vision adapters, the vision tower has {len(layers)} layers.")
    return [
        layer.layer_norm1.register_forward_hook(adapter.norm_output_hook)
        for layer, adapter in zip(layers, adapters, strict=True)
    ]


def modules_with_adapter_hooks(backbone: nn.Module) -> list[str]:
    """Names of the modules in `backbone` that carry a LaVIN adapter's hook (of any model). torch lists a module's
    hooks only in its `_forward_pre_hooks` / `_forward_hooks` dicts; they are read, never changed, here."""
    found = []
    for name, module in backbone.named_modules():
        hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
        if any(
            isinstance(getattr(hook, "__self__", None), (DecoderLayerAdapters, MMAdapter)) for hook in hooks
        ):
            found.append(name)
    return found


def bind_replica_adapters(pairs: list[tuple[nn.Module, nn.Module]]) -> None:
    """On a DataParallel replica: tell each hooked module copy which adapter copy its hooks run (data_parallel.py).

    `pairs`: each adapter with its layer (`own_layer_adapters`): a `DecoderLayerAdapters` with its decoder layer,
    an `MMAdapter` with its vision encoder layer; the hooked modules are those `inject_*` hooks.
    """
    for adapter, layer in pairs:
        if isinstance(adapter, DecoderLayerAdapters):
            hooked = [token_mixer(layer), layer.mlp]
        else:
            hooked = [layer.layer_norm1]
        for module in hooked:
            module.__dict__[REPLICA_ADAPTER] = adapter
