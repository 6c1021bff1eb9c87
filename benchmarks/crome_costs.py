"""CROME: trainable parameters per stage at the paper's sizes, and the cost of an image question for CROME vs
LaVIN vs the bare LLM on the embedded backbones (ratios measured in one run).

    python benchmarks/crome_costs.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image
from transformers import AutoModelForCausalLM, DynamicCache, InstructBlipVisionConfig, T5Config

import mmadapters
from mmadapters import (
    CromeForConditionalGeneration,
    CromeProcessor,
    LavinForConditionalGeneration,
    LavinProcessor,
)
from mmadapters.modeling.paper_configs import llama_7b_config, llama_13b_config
from mmadapters.modeling.transformers_compat import cache_kwargs

SHAPES = {
    "Vicuna-7B": llama_7b_config(),
    "Vicuna-13B": llama_13b_config(),
    "Flan-T5-XXL": T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128),
}


def stage_table() -> None:
    print("| LLM (+ EVA ViT-g/14, InstructBLIP Q-Former) | pretrain | instruct | finetune |")
    print("|---|---|---|---|")
    for name, text_config in SHAPES.items():
        with torch.device("meta"):
            model = CromeForConditionalGeneration.from_backbones(text_config, InstructBlipVisionConfig())
        counts = []
        for stage in ("pretrain", "instruct", "finetune"):
            model.set_stage(stage)
            counts.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
        print(f"| {name} | {counts[0]:,} | {counts[1]:,} | {counts[2]:,} |")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_step_time(model, inputs, steps: int, **kwargs) -> float:
    """Median time of one decode step with a KV cache, after the prompt's prefill."""
    cache = DynamicCache()
    times = []
    with torch.no_grad():
        model(**inputs, **cache_kwargs(cache), use_cache=True, **kwargs)
        token = inputs["input_ids"][:, -1:]
        length = inputs["input_ids"].shape[1]
        for step in range(steps):
            mask = torch.ones(1, length + step + 1, dtype=torch.long)
            times.append(
                timed(
                    lambda m=mask: model(input_ids=token, attention_mask=m, **cache_kwargs(cache), **kwargs)
                )
            )
    return statistics.median(times)


def cost_table(rounds: int) -> None:
    torch.manual_seed(0)
    text_model, vision_model = mmadapters.embedded_backbones()
    base = AutoModelForCausalLM.from_pretrained(text_model, dtype=torch.float32).eval()
    lavin = LavinForConditionalGeneration.from_backbones(text_model, vision_model).eval()
    lavin_processor = LavinProcessor.from_backbones(text_model, vision_model)
    crome = CromeForConditionalGeneration.from_backbones(text_model, vision_model).eval()
    crome_processor = CromeProcessor.from_backbones(
        text_model, vision_model, num_image_tokens=crome.config.num_image_tokens
    )
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    question = "What color is the shape?"
    image_chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text_chat = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    base_inputs = lavin_processor(
        text=lavin_processor.apply_chat_template(text_chat, add_generation_prompt=True)
    )
    lavin_inputs = lavin_processor(
        images=[image], text=lavin_processor.apply_chat_template(image_chat, add_generation_prompt=True)
    )
    crome_inputs = crome_processor(
        images=[image], text=crome_processor.apply_chat_template(image_chat, add_generation_prompt=True)
    )
    # LaVIN as `generate` runs it: adapters folded once per call (and cached while the weights are unchanged).
    with torch.no_grad():
        lavin_decode_kwargs = {"folded_adapters": lavin.fold_llm_adapters(), "modality": torch.tensor([1])}
    prefill = {"base": [], "lavin": [], "crome": []}
    with torch.no_grad():
        for _ in range(rounds):
            prefill["base"].append(timed(lambda: base(**base_inputs)))
            prefill["lavin"].append(timed(lambda: lavin(**lavin_inputs, **lavin_decode_kwargs)))
            prefill["crome"].append(timed(lambda: crome(**crome_inputs)))
    decode = {
        "base": decode_step_time(base, base_inputs, rounds),
        "lavin": decode_step_time(lavin, lavin_inputs, rounds, **lavin_decode_kwargs),
        "crome": decode_step_time(crome, {k: v for k, v in crome_inputs.items()}, rounds),
    }
    base_prefill = statistics.median(prefill["base"])
    print(f"image question on the embedded backbones (SmolLM2-135M, tiny CLIP), {rounds} rounds, medians")
    print("| model | prompt tokens | prefill ms | x bare LLM | decode step ms | x bare LLM |")
    print("|---|---|---|---|---|---|")
    for name, inputs in (
        ("bare LLM (text only)", base_inputs),
        ("LaVIN", lavin_inputs),
        ("CROME", crome_inputs),
    ):
        key = {"bare LLM (text only)": "base", "LaVIN": "lavin", "CROME": "crome"}[name]
        p, d = statistics.median(prefill[key]), decode[key]
        print(
            f"| {name} | {inputs['input_ids'].shape[1]} | {p * 1e3:.1f} | {p / base_prefill:.2f} | {d * 1e3:.2f} "
            f"| {d / decode['base']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    stage_table()
    cost_table(args.rounds)


if __name__ == "__main__":
    from mmadapters.library_logs import quiet_library_logs

    quiet_library_logs()
    main()
