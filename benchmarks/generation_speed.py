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
from common import chat_batches, compare_generation, embedded_lavin_and_base, interleaved_decode_ms, timed
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    lavin, processor, base = embedded_lavin_and_base()

    batches = chat_batches(processor)
    compare_generation(base, lavin, "LaVIN", batches, args.rounds, args.new_tokens)

    # Per-token decode cost with a KV cache, the two models interleaved step by step: the adapters' share of
    # each generated token. The base model gets LaVIN's positions (text from 1).
    inputs = batches[0]
    folded = {
        "folded_adapters": lavin.fold_llm_adapters(),
        "modality": lavin.modality_of(inputs["input_ids"]),
    }
    steps = args.rounds * 20
    base_ms, lavin_ms = interleaved_decode_ms(base, lavin, inputs, steps, folded, base_position_offset=1)
    print(
        f"decode step with KV cache ({steps} steps, interleaved): base {base_ms:.2f} ms, "
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
    from mmadapters.library_logs import quiet_library_logs

    quiet_library_logs()
    main()
