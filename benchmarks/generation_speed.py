"""Generation speed of LaVIN vs. the bare base LLM on the embedded SmolLM2-135M-Instruct, measured in one run.

Text-only: the same chat prompts, the same number of new tokens (greedy, min_new_tokens = max_new_tokens), base
and LaVIN interleaved round by round so that machine noise hits both alike; the figure is the ratio of
tokens per second (goal: LaVIN >= 0.95x the base model). Image prefill: the cost of one image in the prompt
(vision tower + projector + the visual tokens' share of the LLM prefill) as the ratio of an image prompt's
prefill time to the same prompt's text-only prefill.

    python benchmarks/generation_speed.py [--rounds 5] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import chat_batches, compare_generation, timed
from PIL import Image
from transformers import AutoModelForCausalLM

import mmadapters
from mmadapters import LavinForConditionalGeneration, LavinProcessor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    text_model, vision_model = mmadapters.embedded_backbones()
    lavin = LavinForConditionalGeneration.from_backbones(text_model, vision_model).eval()
    processor = LavinProcessor.from_backbones(text_model, vision_model)
    base = AutoModelForCausalLM.from_pretrained(text_model, dtype=torch.float32).eval()

    batches = chat_batches(processor)
    compare_generation(base, lavin, "LaVIN", batches, args.rounds, args.new_tokens)

    # Per-token decode cost with a KV cache, the two models interleaved step by step (less noise than whole
    # generate calls): the adapters' share of each generated token.
    from transformers import DynamicCache

    inputs = batches[0]
    folded = lavin.fold_llm_adapters()
    modality = lavin.modality_of(inputs["input_ids"])
    base_steps, lavin_steps = [], []
    with torch.no_grad():
        base_cache, lavin_cache = DynamicCache(), DynamicCache()
        base(**inputs, past_key_values=base_cache, use_cache=True)
        lavin(
            **inputs, past_key_values=lavin_cache, use_cache=True, folded_adapters=folded, modality=modality
        )
        token = inputs["input_ids"][:, -1:]
        for step in range(args.rounds * 20):
            position = torch.tensor([[inputs["input_ids"].shape[1] + step]])
            base_steps.append(
                timed(
                    lambda p=position: base(input_ids=token, past_key_values=base_cache, position_ids=p + 1)
                )
            )
            lavin_steps.append(
                timed(
                    lambda p=position: lavin(
                        input_ids=token,
                        past_key_values=lavin_cache,
                        position_ids=p,
                        folded_adapters=folded,
                        modality=modality,
                    )
                )
            )
    base_ms, lavin_ms = statistics.median(base_steps) * 1e3, statistics.median(lavin_steps) * 1e3
    print(
        f"decode step with KV cache ({len(base_steps)} steps, interleaved): base {base_ms:.2f} ms, "
        f"LaVIN {lavin_ms:.2f} ms: LaVIN / base speed ratio {base_ms / lavin_ms:.3f}"
    )

    image = Image.new("RGB", (64, 64), (255, 0, 0))
    question = "What color is the shape?"
    image_chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text_chat = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    image_inputs = processor(
        images=[image], text=processor.apply_chat_template(image_chat, add_generation_prompt=True)
    )
    text_inputs = processor(text=processor.apply_chat_template(text_chat, add_generation_prompt=True))
    image_times, text_times, vision_times = [], [], []
    with torch.no_grad():
        for _ in range(args.rounds * 4):
            image_times.append(timed(lambda: lavin(**image_inputs)))
            text_times.append(timed(lambda: lavin(**text_inputs)))
            vision_times.append(timed(lambda: lavin.get_image_features(image_inputs["pixel_values"])))
    image_ms, text_ms = statistics.median(image_times) * 1e3, statistics.median(text_times) * 1e3
    print(
        f"prefill with one image ({image_inputs['input_ids'].shape[1]} tokens) vs text-only "
        f"({text_inputs['input_ids'].shape[1]} tokens): {image_ms:.1f} ms vs {text_ms:.1f} ms "
        f"= {image_ms / text_ms:.2f}x; vision tower + projector alone: {statistics.median(vision_times) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
