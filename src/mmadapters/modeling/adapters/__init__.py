"""Adapter building blocks with no model knowledge: layers, configs, and their injection."""

from .config import ADAPTER_CONFIG_NAME, AdapterSettingsError, CromeAdapterConfig, MMAdapterConfig
from .crome_adapter import CromeAdapter
from .injection import (
    FOLDED_ADAPTERS_KWARG,
    ROUTING_WEIGHTS_KWARG,
    DecoderLayerAdapters,
    FoldedAdapters,
    find_decoder_layers,
    find_vision_layers,
    inject_decoder_adapters,
    inject_vision_adapters,
)
from .mm_adapter import GroupedLinear, MMAdapter

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "AdapterSettingsError",
    "CromeAdapter",
    "CromeAdapterConfig",
    "DecoderLayerAdapters",
    "FOLDED_ADAPTERS_KWARG",
    "FoldedAdapters",
    "GroupedLinear",
    "MMAdapter",
    "MMAdapterConfig",
    "ROUTING_WEIGHTS_KWARG",
    "find_decoder_layers",
    "find_vision_layers",
    "inject_decoder_adapters",
    "inject_vision_adapters",
]
