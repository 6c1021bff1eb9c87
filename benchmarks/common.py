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
    interleaved round by round so that machine noise hits both alike; prints medians and the speed ratio."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    tokens = len(batches) * new_tokens
    base.generate(**batches[0], **kwargs)  # warm-up
    other.generate(**batches[0], **kwargs)
    base_tps, other_tps, ratios = [], [], []
    for _ in range(rounds):
        base_time = sum(timed(lambda b=b: base.generate(**b, **kwargs)) for b in batches)
        other_time = sum(timed(lambda b=b: other.generate(**b, **kwargs)) for b in batches)
        base_tps.append(tokens / base_time)
        other_tps.append(tokens / other_time)
        ratios.append(base_time / other_time)
    print(
        f"text-only generation, {len(batches)} prompts x {new_tokens} new tokens, {rounds} rounds interleaved"
    )
    print(f"  base SmolLM2: {statistics.median(base_tps):.1f} tokens/s (median)")
    print(f"  {name + ':':<13} {statistics.median(other_tps):.1f} tokens/s (median)")
    print(
        f"  {name} / base speed ratio: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
    )
