"""Helpers shared by the generation benchmarks: the prompts, a timer, and the interleaved generate comparison."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Name three primary colors.",
    "Explain what a triangle is.",
]


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def embedded_lavin_and_base() -> tuple[Any, Any, Any]:
    """(LaVIN, its processor, the bare LLM) on the embedded backbones, fp32, eval mode; LaVIN's adapters start
    from seed 0."""
    import torch
    from transformers import AutoModelForCausalLM

    import mmadapters
    from mmadapters import LavinForConditionalGeneration, LavinProcessor

    torch.manual_seed(0)
    text_model, vision_model = mmadapters.embedded_backbones()
    lavin = LavinForConditionalGeneration.from_backbones(text_model, vision_model).eval()
    processor = LavinProcessor.from_backbones(text_model, vision_model)
    base = AutoModelForCausalLM.from_pretrained(text_model, dtype=torch.float32).eval()
    return lavin, processor, base


def chat_batches(processor: Any) -> list[Any]:
    """One text-only chat prompt per entry of PROMPTS, as model inputs."""
    batches = []
    for prompt in PROMPTS:
        chat = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        batches.append(processor(text=processor.apply_chat_template(chat, add_generation_prompt=True)))
    return batches


def compare_generation(
    base: Any, other: Any, name: str, batches: list[Any], rounds: int, new_tokens: int
) -> None:
    """Tokens per second of `other` vs `base` on the same prompts (greedy, exactly `new_tokens` each), the two
    interleaved round by round so that machine noise hits both alike; which one goes first alternates between
    rounds (going first or second is not neutral on this machine). Prints medians and the speed ratio."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    tokens = len(batches) * new_tokens
    base.generate(**batches[0], **kwargs)  # warm-up
    other.generate(**batches[0], **kwargs)
    base_tps, other_tps, ratios = [], [], []
    for round_index in range(rounds):
        times = {}
        for key, model in alternate([("base", base), ("other", other)], round_index):
            times[key] = sum(timed(lambda b=b, m=model: m.generate(**b, **kwargs)) for b in batches)
        base_tps.append(tokens / times["base"])
        other_tps.append(tokens / times["other"])
        ratios.append(times["base"] / times["other"])
    print(
        f"text-only generation, {len(batches)} prompts x {new_tokens} new tokens, {rounds} rounds interleaved"
    )
    print(f"  base SmolLM2: {statistics.median(base_tps):.1f} tokens/s (median)")
    print(f"  {name + ':':<13} {statistics.median(other_tps):.1f} tokens/s (median)")
    print(
        f"  {name} / base speed ratio: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
    )


def alternate(items: list[Any], index: int) -> list[Any]:
    """`items` in order on even `index`, reversed on odd: each model goes first half of the time."""
    return items if index % 2 == 0 else items[::-1]


def interleaved_decode_ms(
    base: Any,
    other: Any,
    inputs: Any,
    steps: int,
    other_kwargs: dict[str, Any] | None = None,
    base_position_offset: int = 0,
) -> tuple[float, float]:
    """Median milliseconds of one decode step with a KV cache for `base` and `other`, interleaved step by step
    (less noisy than whole generate calls, where one hiccup of the shared machine lands on one model), the
    order alternating from step to step. Both are prefilled with `inputs`; `other_kwargs` go to every call of
    `other`; `base_position_offset` shifts the base model's positions (LaVIN counts text from 0 and shifts by
    one inside)."""
    import torch
    from transformers import DynamicCache

    from mmadapters.modeling.transformers_compat import cache_kwargs

    other_kwargs = other_kwargs or {}
    base_steps, other_steps = [], []
    with torch.no_grad():
        base_cache, other_cache = DynamicCache(), DynamicCache()
        base(**inputs, **cache_kwargs(base_cache), use_cache=True)
        other(**inputs, **cache_kwargs(other_cache), use_cache=True, **other_kwargs)
        token = inputs["input_ids"][:, -1:]
        for step in range(steps):
            position = torch.tensor([[inputs["input_ids"].shape[1] + step]])
            calls = [
                (
                    base_steps,
                    lambda p=position: base(
                        input_ids=token, **cache_kwargs(base_cache), position_ids=p + base_position_offset
                    ),
                ),
                (
                    other_steps,
                    lambda p=position: other(
                        input_ids=token, **cache_kwargs(other_cache), position_ids=p, **other_kwargs
                    ),
                ),
            ]
            for times, call in alternate(calls, step):
                times.append(timed(call))
    return statistics.median(base_steps) * 1e3, statistics.median(other_steps) * 1e3
