"""Merged export: fold LaVIN's LLM-side adapters into the frozen LLM for one modality (LAVIN.md section 8).

For a fixed modality the routing weights are constants (they come from the modality token alone), so each
LLM adapter is affine: x' = M x + c with M = I + U A and c = U b_A + c_experts (`MMAdapter.fold` gives U and
c_experts). The adapter sits on the normed input of the projections that follow it, so folding it into them is
exact:

    W x' + b = (W M) x + (W c + b)       for q/k/v (attention site) and the MLP's input projections

The result is a plain transformers checkpoint of the LLM's own architecture (no mmadapters code needed to
load it), with biases enabled on those projections because c is in general non-zero. Positions: LaVIN runs
text from position 1 (position 0 belongs to the modality token); RoPE attention depends only on position
differences, so the merged LLM, counting from 0, gives the same logits.

PEFT layers on the LLM (LoRA on top) are merged into its weights first (W + s B A), so the adapters fold into the
weights the LLM actually uses (and so are PEFT layers on the LLM adapters' own linear layers); PEFT layers on the
vision tower stay with the unmerged vision side.

A quantised LLM (LaVIN-lite) is dequantized first: the export holds full-precision weights (a quantised LLM with
PEFT layers on it is refused: the LoRA would be quantised too).

The vision side stays unmerged (its router depends on each image), so `--modality image` exports the LLM that
an image sample sees: it takes `inputs_embeds` with the visual tokens placed by the unmerged LaVIN model.
"""

from __future__ import annotations

import json
import os
from typing import Literal

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from ..atomic import atomic_directory, check_output_folder
from ..checkpoint_files import CheckpointKindError
from ..errors import MMAdaptersError
from ..modeling.adapters.injection import find_decoder_layers
from ..modeling.embedded import resolve_backbone_name
from ..modeling.lavin import LavinForConditionalGeneration
from ..modeling.peft_on_top import merge_peft_layers, name_through_peft_layers, tuner_layers
from ..processing.base import build_chat_template

MODALITIES = {"text": 0, "image": 1}
MERGE_INFO_NAME = "mmadapters_merge.json"

# The projections that read each adapter site's output, and the config flag that gives them a bias.
_SITE_PROJECTIONS = {
    "attn": ("self_attn", ("q_proj", "k_proj", "v_proj"), "attention_bias"),
    "mlp": ("mlp", ("gate_proj", "up_proj"), "mlp_bias"),
}


class MergeError(MMAdaptersError, ValueError):
    """The adapters cannot be folded into this LLM as a plain checkpoint."""


@torch.no_grad()
def merge_lavin_adapters(
    model: LavinForConditionalGeneration, modality: Literal["text", "image"] = "text"
) -> PreTrainedModel:
    """Fold the LLM adapters of `model` for `modality` into its LLM and return that LLM (modified in place:
    `model` is consumed). The returned model has no adapter hooks and saves as a plain checkpoint."""
    if modality not in MODALITIES:
        raise MergeError(f"modality must be 'text' or 'image', got {modality!r}")
    language_model = model.language_model
    site_names = ["attn"] + (["mlp"] if model.llm_adapters[0].mlp is not None else [])
    # The decoder layers stay the same modules below (dequantizing and merging PEFT layers replace what is inside).
    layers = find_decoder_layers(language_model, need_mlp="mlp" in site_names)
    _refuse_linear_attention(language_model, layers)
    model.eval()
    _dequantize(language_model)
    # PEFT layers first: on the LLM, and on the LLM adapters' own linear layers where
    # get_peft_model(target_modules="all-linear") put them, so that the routing and the fold below see them.
    _untie_weights_under_peft_layers(language_model)
    merge_peft_layers(language_model)
    merge_peft_layers(model.llm_adapters)
    table = model.compute_routing_table()[MODALITIES[modality]]  # (layers, sites, 2)
    _enable_biases(language_model, layers, site_names)

    for index, (layer, adapters) in enumerate(zip(layers, model.llm_adapters, strict=True)):
        for site_index, (site_name, adapter) in enumerate(zip(site_names, adapters.sites(), strict=True)):
            up, bias = adapter.fold(table[index, site_index].unsqueeze(0))  # (1, d, r), (1, d)
            down = adapter.down.weight.double()
            affine = torch.eye(down.shape[1], dtype=torch.float64) + up[0].double() @ down  # M = I + U A
            shift = bias[0].double() + up[0].double() @ adapter.down.bias.double()  # U b_A + c
            parent_name, projection_names, _ = _SITE_PROJECTIONS[site_name]
            parent = getattr(layer, parent_name)
            for name in projection_names:
                projection: nn.Linear = getattr(parent, name)
                weight = projection.weight.double()
                new_bias = weight @ shift + projection.bias.double()
                projection.weight.copy_((weight @ affine).to(projection.weight.dtype))
                projection.bias.copy_(new_bias.to(projection.bias.dtype))

    model.remove_adapter_hooks()
    return language_model


def _refuse_linear_attention(language_model: PreTrainedModel, layers: nn.ModuleList) -> None:
    """Refuse, before anything changes, a hybrid LLM (Qwen3.5, Qwen3-Next): the adapters in front of its
    linear-attention layers would fold into projections that have no bias and no config flag to add one."""
    linear = [
        index
        for index, layer in enumerate(layers)
        if not isinstance(getattr(layer, "self_attn", None), nn.Module)
    ]
    if linear:
        raise MergeError(
            f"Decoder layers {linear} of {type(language_model).__name__} use linear attention (`linear_attn`): the "
            "adapter in front of it has a constant term that its projections cannot take (no bias, and no config "
            "option to add one); keep this model unmerged."
        )


def _untie_weights_under_peft_layers(language_model: PreTrainedModel) -> None:
    """Give a tied weight under a PEFT layer its own copy before the merge (LoRA on a tied LM head, trainable
    tokens on tied embeddings; SmolLM2 ties them): merged into the one shared tensor, the LM head's LoRA would
    change the input embeddings too. The exported LLM then has untied embeddings (`tie_word_embeddings=False`),
    as PEFT advises for such merges."""
    untied = False
    for target, source in list(language_model.all_tied_weights_keys.items()):
        held_target = name_through_peft_layers(language_model, target)
        held_source = name_through_peft_layers(language_model, source)
        if (held_target, held_source) == (target, source):
            continue  # no PEFT layer on either: the merge leaves the shared weight alone
        module_name, _, parameter_name = held_target.rpartition(".")
        copy = language_model.get_parameter(held_source).detach().clone()
        setattr(
            language_model.get_submodule(module_name), parameter_name, nn.Parameter(copy, requires_grad=False)
        )
        del language_model.all_tied_weights_keys[target]
        untied = True
    if untied:
        language_model.config.get_text_config().tie_word_embeddings = False


def _dequantize(language_model: PreTrainedModel) -> None:
    """Turn a quantised LLM (LaVIN-lite: bitsandbytes 4-bit or 8-bit) back into full-precision layers, in place,
    before anything is folded: the export is a plain checkpoint, and folding into packed quantised weights would
    compute nonsense. The dequantized weights are the ones the model computed with, so the merged LLM answers
    as the quantised LaVIN did (up to the quantised kernels' rounding); quantise it again when loading it."""
    quantizer = getattr(language_model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(quantizer.quantization_config, "quant_method", "quantised")
    method = getattr(method, "value", method)  # an enum in transformers
    if tuner_layers(language_model):
        raise MergeError(
            f"The LLM is quantised ({method}) and holds PEFT layers: merging those into quantised weights would "
            "quantise the LoRA too. Keep this model unmerged (its adapter-only checkpoint loads as it is), or "
            "train the LoRA on a full-precision LLM to merge it."
        )
    try:
        language_model.dequantize()
    except (ValueError, NotImplementedError, AttributeError, TypeError) as error:
        raise MergeError(
            f"The LLM is quantised ({method}) and transformers cannot dequantize it ({error}); a merged export "
            "needs full-precision weights. Keep this model unmerged."
        ) from error


def _enable_biases(language_model: PreTrainedModel, layers: nn.ModuleList, site_names: list[str]) -> None:
    """Give the projections that receive a folded adapter a (zero) bias, through the architecture's own config
    flag, so that the saved checkpoint loads as the same architecture with biases."""
    config = language_model.config
    for site_name in site_names:
        parent_name, projection_names, flag = _SITE_PROJECTIONS[site_name]
        parent = getattr(layers[0], parent_name)
        missing = [
            name for name in projection_names if not isinstance(getattr(parent, name, None), nn.Linear)
        ]
        if missing:
            raise MergeError(
                f"{type(parent).__name__} has no {missing}: merged export knows Llama-style projections "
                f"({', '.join(projection_names)}); keep this model unmerged."
            )
        if all(getattr(parent, name).bias is not None for name in projection_names):
            continue  # e.g. Qwen2's q/k/v already have biases
        if not hasattr(config, flag):
            raise MergeError(
                f"The {config.model_type} architecture has no bias on {', '.join(projection_names)} and no "
                f"`{flag}` option to add one, but the folded adapter has a constant term. Merged export needs an "
                "LLM whose config can enable those biases (Llama, SmolLM2, Qwen2/3, ...); keep this model unmerged."
            )
        setattr(config, flag, True)
        # The flag also gives every other projection under it a bias (e.g. o_proj): add zero ones.
        for layer in layers:
            for module in getattr(layer, parent_name).modules():
                if isinstance(module, nn.Linear) and module.bias is None:
                    module.bias = nn.Parameter(
                        torch.zeros(
                            module.out_features, dtype=module.weight.dtype, device=module.weight.device
                        ),
                        requires_grad=False,
                    )


def merge_checkpoint(
    checkpoint: str,
    output_dir: str | os.PathLike,
    modality: Literal["text", "image"] = "text",
    text_model: str | None = None,
    vision_model: str | None = None,
    overwrite: bool = False,
) -> str:
    """`mmadapters merge`: load a LaVIN checkpoint, fold its LLM adapters for `modality`, and save a plain
    transformers LLM checkpoint (weights, config, generation config, tokenizer) to `output_dir`. An output folder
    that overlaps the input or holds another checkpoint is refused unless `overwrite`.

    The tokenizer's chat template puts LaVIN's "Image: N/A" line in front of text-only conversations, as the
    adapters were trained with it."""
    check_output_folder(output_dir, (checkpoint, *(m for m in (text_model, vision_model) if m)), overwrite)
    try:
        model = LavinForConditionalGeneration.from_pretrained(
            checkpoint, text_model=text_model, vision_model=vision_model
        )
    except CheckpointKindError as error:
        if error.found != "crome":
            raise
        raise MergeError(
            f"'{os.fspath(checkpoint)}' is a CROME checkpoint: its Q-Former, projection and adapter sit in front of "
            "the LLM, so there is nothing to fold into it (merge folds LaVIN's adapters, which sit inside the LLM; "
            "a LoRA on a CROME's LLM saves and loads with the checkpoint). Share the adapter-only checkpoint as it "
            "is: mmadapters push."
        ) from error
    text_backbone = text_model or model.config.text_backbone["name_or_path"]
    text_revision = None if text_model else model.config.text_backbone.get("revision")
    language_model = merge_lavin_adapters(model, modality)
    language_model.generation_config = model.generation_config
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_name(text_backbone), revision=text_revision)
    tokenizer.chat_template = build_chat_template(tokenizer, "Image: <image>\n", "Image: N/A\n")
    with atomic_directory(output_dir) as staging:  # all or nothing: see mmadapters.atomic
        language_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, MERGE_INFO_NAME), "w") as f:
            json.dump({"source": os.fspath(checkpoint), "modality": modality}, f, indent=2)
            f.write("\n")
    return os.fspath(output_dir)
