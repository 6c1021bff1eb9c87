"""Convert an official LaVIN checkpoint (`checkpoint-N.pth` of github luogen1996/LaVIN) into our format.

The official file is a torch pickle holding `model` (adapter tensors only, maybe with a `module.` prefix),
`optimizer`, `epoch`, `scaler` and `args` (an argparse.Namespace). It is read with `weights_only=True` and an
explicit allow-list of the one class it needs (argparse.Namespace), never with a blind unpickle.

Key mapping (LAVIN.md section 9):

    layers.{i}.adapter_attn.{conv_A,conv_B,conv_D}          -> llm_adapters.{i}.attn.{down,expert_b,expert_d}
    layers.{i}.adapter_attn.expert_weights                  -> llm_adapters.{i}.attn.router
    layers.{i}.adapter_mlp.*  (optional second adapter)     -> llm_adapters.{i}.mlp.*
    backbone.visual.transformer.resblocks.{j}.adapter_attn.* -> vision_adapters.{j}.*
    adapter_proj.{conv_A,conv_B}  (nn.Linear)               -> projector.{linear_1,linear_2}
    adapter_modality_embedding                              -> modality_embedding

The adapter convolutions are Conv1d with kernel size 1: weights (out, in / groups, 1) lose their last dimension
(our GroupedLinear keeps Conv1d's layout otherwise). The adapter sizes (r, groups) are read from the tensor
shapes, the temperature and scale from the saved `args` when present.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MMAdaptersError
from ..modeling.adapters import MMAdapterConfig
from ..modeling.backbones import BackboneSpec
from ..modeling.lavin import LavinForConditionalGeneration
from ..processing import LavinProcessor

# The only classes the official pickle may contain besides tensors and containers.
ALLOWED_GLOBALS = [argparse.Namespace]

_ADAPTER_PARTS = {"conv_A": "down", "conv_B": "expert_b", "conv_D": "expert_d", "expert_weights": "router"}
_KEY_PATTERNS = [
    (re.compile(r"^layers\.(\d+)\.adapter_attn\.(\w+)\.(weight|bias)$"), "llm_adapters.{0}.attn.{1}.{2}"),
    (re.compile(r"^layers\.(\d+)\.adapter_mlp\.(\w+)\.(weight|bias)$"), "llm_adapters.{0}.mlp.{1}.{2}"),
    (
        re.compile(r"^backbone\.visual\.transformer\.resblocks\.(\d+)\.adapter_attn\.(\w+)\.(weight|bias)$"),
        "vision_adapters.{0}.{1}.{2}",
    ),
]
_FIXED_KEYS = {
    "adapter_proj.conv_A.weight": "projector.linear_1.weight",
    "adapter_proj.conv_A.bias": "projector.linear_1.bias",
    "adapter_proj.conv_B.weight": "projector.linear_2.weight",
    "adapter_proj.conv_B.bias": "projector.linear_2.bias",
    "adapter_modality_embedding.weight": "modality_embedding.weight",
}


class OfficialCheckpointError(MMAdaptersError, ValueError):
    """The file is not an official LaVIN checkpoint we can convert faithfully."""


@dataclass
class ConversionReport:
    """What the conversion did: how many tensors were mapped, and anything left over on either side."""

    mapped: int = 0
    unmapped: list[str] = field(default_factory=list)  # official keys with no place in our model
    missing: list[str] = field(default_factory=list)  # our adapter tensors the checkpoint did not provide
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the user should know about the backbones

    def summary(self) -> str:
        lines = [f"mapped {self.mapped} tensors; adapter settings {self.settings}", *self.notes]
        if self.unmapped:
            lines.append(f"unmapped official keys ({len(self.unmapped)}): {self.unmapped[:10]}")
        if self.missing:
            lines.append(f"missing adapter tensors ({len(self.missing)}): {self.missing[:10]}")
        return "\n".join(lines)


def load_official_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter tensors (prefix `module.` removed) and the training arguments of an official checkpoint."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"official LaVIN checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:
        raise OfficialCheckpointError(f"{path} is empty (0 bytes): the download or copy was interrupted.")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise OfficialCheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle): expected the "
            "official checkpoint-N.pth."
        )
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, KeyError, ValueError) as error:
        raise OfficialCheckpointError(
            f"{path} cannot be read as a PyTorch checkpoint ({type(error).__name__}: {str(error)[:200]}): it is "
            "truncated or corrupt. Download it again."
        ) from None
    except pickle.UnpicklingError as error:
        raise OfficialCheckpointError(
            f"{path} holds objects outside the allow-list ({[g.__name__ for g in ALLOWED_GLOBALS]} plus tensors "
            f"and containers), so it is not loaded (a pickle can run code). torch said: {str(error)[:400]}"
        ) from error
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise OfficialCheckpointError(
            f"{path} is not an official LaVIN checkpoint: expected a dict with a `model` state dict (found "
            f"{sorted(payload) if isinstance(payload, dict) else type(payload).__name__})."
        )
    tensors = {key.removeprefix("module."): value for key, value in payload["model"].items()}
    args = payload.get("args")
    return tensors, (vars(args) if isinstance(args, argparse.Namespace) else dict(args or {}))


def official_to_ours(key: str) -> str | None:
    """Our parameter name for an official key, or None when it has no counterpart."""
    if key in _FIXED_KEYS:
        return _FIXED_KEYS[key]
    for pattern, template in _KEY_PATTERNS:
        match = pattern.match(key)
        if match:
            *indices, part, kind = match.groups()
            if part not in _ADAPTER_PARTS:
                return None
            return template.format(*indices, _ADAPTER_PARTS[part], kind)
    return None


def adapter_config_from_official(tensors: dict[str, torch.Tensor], args: dict[str, Any]) -> MMAdapterConfig:
    """The MM-Adapter settings the checkpoint was trained with: sizes from the shapes, the rest from `args`."""
    down = tensors.get("layers.0.adapter_attn.conv_A.weight")
    expert = tensors.get("layers.0.adapter_attn.conv_B.weight")
    if down is None or expert is None:
        raise OfficialCheckpointError(
            "No `layers.0.adapter_attn.conv_A/conv_B` weights: not a LaVIN (MM-Adapter) checkpoint."
        )
    r = down.shape[0]
    # The published 7B model used tau = 10, the 13B model tau = 5 (LAVIN.md section 1).
    default_temperature = 5.0 if str(args.get("llm_model", "")).upper() == "13B" else 10.0
    placement = "attn_mlp" if any(".adapter_mlp." in key for key in tensors) else "attn"
    return MMAdapterConfig(
        r=r,
        groups=r // expert.shape[1],
        scale=float(args.get("adapter_scale", 1.0)),
        temperature=float(args.get("temperature", default_temperature)),
        placement=placement,
        vision_adapters=any(key.startswith("backbone.visual.") for key in tensors),
        official_vision_routing=True,
    )


def official_quantization(args: dict[str, Any]) -> Any:
    """The LLM quantisation of an official LaVIN-lite checkpoint (`args.bits` "4bit" / "8bit"; None otherwise), as
    the official code sets it up (util/quantization.py: bitsandbytes, nf4 with double quantisation and float16
    compute, on the decoder layers; transformers' bitsandbytes integration keeps the LM head out, as the official
    code quantises `llama.layers` only). The adapters were trained against it, so the converted model loads it."""
    bits = str(args.get("bits", "16bit"))
    if bits not in ("4bit", "8bit"):
        return None
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise OfficialCheckpointError(
            f"The checkpoint is LaVIN-lite (its LLM was quantised to {bits}, args.bits): converting it faithfully "
            "needs bitsandbytes: pip install 'mmadapters[quant]'."
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=bits == "4bit",
        load_in_8bit=bits == "8bit",
        llm_int8_threshold=6.0,
        llm_int8_has_fp16_weight=False,
        bnb_4bit_compute_dtype=torch.float16,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
    )


def backbone_notes(args: dict[str, Any], text_model: BackboneSpec) -> list[str]:
    """What the saved args say about the backbones that the weights cannot show: a Vicuna LLM has LLaMA's shapes,
    so a conversion onto LLaMA would pass every check and answer worse."""
    notes = []
    if str(args.get("bits", "16bit")) in ("4bit", "8bit"):
        notes.append(
            f"LaVIN-lite: the LLM is quantised to {args['bits']} as the official code did (recorded)."
        )
    if (
        args.get("use_vicuna")
        and "vicuna" not in str(getattr(text_model, "name_or_path", text_model)).lower()
    ):
        notes.append(
            f"note: the checkpoint was trained on Vicuna (args.use_vicuna), and the LLM given is {text_model}; "
            "its adapters expect Vicuna's weights (e.g. lmsys/vicuna-7b-v1.1)."
        )
    return notes


def convert_official_lavin(
    checkpoint: str | os.PathLike,
    text_model: BackboneSpec,
    vision_model: BackboneSpec,
    temperature: float | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[LavinForConditionalGeneration, LavinProcessor, ConversionReport]:
    """Build LaVIN around the given backbones (LLaMA and CLIP ViT-L/14 for the published checkpoints) and load
    the official adapter tensors into it. Raises on missing tensors or unmapped keys (the report lists them).

    `temperature` overrides the router temperature when the checkpoint's `args` do not record it (10 for 7B,
    5 for 13B). A LaVIN-lite checkpoint (`args.bits`) gets its LLM quantised as the official code did
    (`official_quantization`). The processor uses the official preprocessing (bicubic resize, no crop, ImageNet
    statistics)."""
    tensors, args = load_official_checkpoint(checkpoint)
    adapter_config = adapter_config_from_official(tensors, args)
    if temperature is not None:
        adapter_config.temperature = temperature
    vision_layers = sorted({int(k.split(".")[4]) for k in tensors if k.startswith("backbone.visual.")})
    projector = tensors.get("adapter_proj.conv_A.weight")
    quantization = official_quantization(args)
    model = LavinForConditionalGeneration.from_backbones(
        text_model,
        vision_model,
        adapter_config=adapter_config,
        dtype=dtype,
        projector_hidden_size=projector.shape[0] if projector is not None else 128,
        **({"quantization_config": {"text_config": quantization}} if quantization is not None else {}),
    )
    if adapter_config.vision_adapters and len(vision_layers) != len(model.vision_adapters):
        raise OfficialCheckpointError(
            f"The checkpoint has vision adapters for {len(vision_layers)} layers, the vision tower has "
            f"{len(model.vision_adapters)}: pass the vision tower it was trained with (CLIP ViT-L/14)."
        )

    expected = model.adapter_state_dict()
    report = ConversionReport(settings=adapter_config.to_dict(), notes=backbone_notes(args, text_model))
    converted = {}
    for key, value in tensors.items():
        ours = official_to_ours(key)
        if ours is None or ours not in expected:
            report.unmapped.append(key)
            continue
        if value.dim() == 3 and value.shape[-1] == 1:  # Conv1d kernel-1 weight: (out, in/groups, 1)
            value = value.squeeze(-1)
        if value.shape != expected[ours].shape:
            raise OfficialCheckpointError(
                f"{key} has shape {tuple(value.shape)}, our {ours} has {tuple(expected[ours].shape)}: the "
                "checkpoint was trained on other backbones (LaVIN-7B: LLaMA-7B and CLIP ViT-L/14)."
            )
        converted[ours] = value.to(expected[ours].dtype)
        report.mapped += 1
    report.missing = sorted(set(expected) - set(converted))
    if report.unmapped or report.missing:
        raise OfficialCheckpointError(f"The checkpoint does not map onto this model.\n{report.summary()}")
    model.load_adapter_state_dict(converted, source=os.fspath(checkpoint))
    # A processor rebuilt for the checkpoint (saved without its processor) follows the official code too.
    model.config.official_processing = True
    processor = LavinProcessor.from_backbones(
        text_model,
        vision_model,
        num_image_tokens=model.config.num_image_tokens,
        official_preprocessing=True,
        official_tokenization=True,
    )
    return model.eval(), processor, report
