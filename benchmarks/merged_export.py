"""Merged export (issue: Hub sharing and conversion): speed of the merged LaVIN LLM vs the bare base LLM, and
checkpoint sizes (adapter-only vs full).

Speed: LaVIN around the embedded SmolLM2-135M-Instruct with trained-looking (random, non-zero) adapters, merged
for text with `mmadapters merge`, then loaded as a plain `AutoModelForCausalLM`. The merged and the base model
generate the same number of tokens from the same prompts, interleaved round by round; the figure is the ratio
of tokens per second (goal: merged >= 0.99x base). The merged model carries q/k/v (and zero o_proj) biases,
its only extra work. Both models' weights are copied into memory after loading (see `load_llm`).

Sizes: bytes of the adapter-only folder's safetensors vs a full `save_pretrained(adapter_only=False)` for the
embedded backbones (files written), and for LLaMA-7B + ViT-L/14 shapes (built on the meta device; bytes =
parameters x bytes per value, fp32 adapters, fp16 backbone as distributed).

    python benchmarks/merged_export.py [--rounds 5] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import torch
from common import chat_batches, compare_generation, interleaved_decode_ms
from transformers import AutoModelForCausalLM

import mmadapters
from mmadapters import LavinForConditionalGeneration, LavinProcessor
from mmadapters.convert.merge import merge_checkpoint
from mmadapters.modeling.paper_configs import llama_7b_config, vit_l14_config


def folder_bytes(folder: str, suffix: str = ".safetensors") -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(suffix))


def load_llm(folder: str, in_memory: bool = True) -> Any:
    """`AutoModelForCausalLM.from_pretrained(folder)` in fp32, eval mode. from_pretrained maps the safetensors
    file into memory; a file written moments before (the merged model's, here) then reads slower than one that
    has long been in the page cache (the base model itself, saved and reloaded: see `controls`). With `in_memory` the weights are copied into the process's own memory, for both models alike,
    so that the comparison is about the models, not about where their files came from."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if in_memory:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.data = parameter.data.clone()
    return model


def speed(args: argparse.Namespace, work: str) -> None:
    text_model, vision_model = mmadapters.embedded_backbones()
    torch.manual_seed(0)
    lavin = LavinForConditionalGeneration.from_backbones(text_model, vision_model)
    with torch.no_grad():
        for name, parameter in lavin.named_parameters():
            if parameter.requires_grad and "expert" in name:
                parameter.normal_(0, 0.02)
    processor = LavinProcessor.from_backbones(text_model, vision_model)
    adapters, full = os.path.join(work, "adapters"), os.path.join(work, "full")
    lavin.save_pretrained(adapters, processor=processor)
    lavin.save_pretrained(full, adapter_only=False)
    print(
        f"embedded (SmolLM2-135M + tiny CLIP), fp32: adapter-only {folder_bytes(adapters) / 1e6:.2f} MB vs full "
        f"{folder_bytes(full) / 1e6:.1f} MB ({folder_bytes(full) / folder_bytes(adapters):.0f}x)"
    )

    merged_dir = os.path.join(work, "merged")
    merge_checkpoint(adapters, merged_dir, "text")
    merged, base = load_llm(merged_dir), load_llm(text_model)
    batches = chat_batches(processor)
    compare_generation(base, merged, "merged LaVIN", batches, args.rounds, args.new_tokens)

    # Per-token decode cost with a KV cache, the two models interleaved step by step.
    steps = args.rounds * 40
    base_ms, merged_ms = interleaved_decode_ms(base, merged, batches[0], steps)
    print(
        f"decode step with KV cache ({steps} steps, interleaved): base {base_ms:.2f} ms, merged "
        f"{merged_ms:.2f} ms: merged / base speed ratio {base_ms / merged_ms:.3f}"
    )


def controls(text_model: str, work: str, steps: int) -> None:
    """What the per-step ratio can resolve on this machine, each against the bare LLM, interleaved:
    - a second copy of it (the same work: any deviation from 1 is measurement noise);
    - the same LLM with zero q/k/v/o biases (`attention_bias=True`, the same function): the merged model's
      only extra work, isolated;
    - the same LLM saved and loaded back as from_pretrained leaves it (weights mapped from the new file, not
      copied into memory): the storage effect that `load_llm` removes."""
    base = load_llm(text_model)
    config = type(base.config).from_dict({**base.config.to_dict(), "attention_bias": True})
    biased = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    biased.load_state_dict(base.state_dict(), strict=False)  # the biases are the only missing keys
    with torch.no_grad():
        for name, parameter in biased.named_parameters():
            if name.endswith("proj.bias"):
                parameter.zero_()
    fresh_dir = os.path.join(work, "base-resaved")
    base.save_pretrained(fresh_dir)
    others = (
        ("a second copy of base (noise)", load_llm(text_model)),
        ("base + zero q/k/v/o biases", biased),
        ("base saved and reloaded, file-mapped", load_llm(fresh_dir, in_memory=False)),
    )
    inputs = {"input_ids": torch.arange(1, 9)[None]}
    for label, other in others:
        base_ms, other_ms = interleaved_decode_ms(base, other, inputs, steps)
        print(
            f"control, {steps} decode steps interleaved: base {base_ms:.2f} ms, {label} {other_ms:.2f} ms: "
            f"ratio {base_ms / other_ms:.3f}"
        )


def llama_7b_sizes() -> None:
    text, vision = llama_7b_config(), vit_l14_config()
    with torch.device("meta"):
        model = LavinForConditionalGeneration.from_backbones(text, vision)
    adapter = sum(p.numel() for p in model.adapter_state_dict().values())
    backbone = sum(p.numel() for n, p in model.state_dict().items() if n not in model.adapter_state_dict())
    print(
        f"LLaMA-7B + ViT-L/14 shapes: adapter-only {adapter:,} values = {adapter * 4 / 1e6:.1f} MB (fp32); "
        f"full {adapter * 4 / 1e9 + backbone * 2 / 1e9:.2f} GB (fp16 backbones + fp32 adapters): "
        f"{(adapter * 4 + backbone * 2) / (adapter * 4):.0f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    llama_7b_sizes()
    with tempfile.TemporaryDirectory() as work:
        speed(args, work)
        controls(mmadapters.embedded_backbones()[0], work, steps=args.rounds * 40)


if __name__ == "__main__":
    from mmadapters.library_logs import quiet_library_logs

    quiet_library_logs()
    main()
