"""Where LaVIN's text-only decode step spends its time beyond the bare LLM's (embedded SmolLM2-135M, batch 1).

Four variants decode the same chat prompt with a KV cache, interleaved step by step with the order alternating
(as in common.interleaved_decode_ms), each from its own cache:
- base: the bare LLM, loaded on its own;
- LaVIN's LLM, hooks off: LaVIN's language model called directly with the adapter hooks removed (the same
  computation as base: what remains is the machine's noise between two copies of the weights);
- LaVIN's LLM + hooks, identity adapters: LaVIN's language model called directly with the folded adapters as
  the hooks' keyword argument and their arithmetic replaced by the identity (the hooks' Python work alone);
- LaVIN, identity adapters: the same through LaVIN's own forward (adds LaVIN's wrapper);
- LaVIN: the real thing (`generate`'s path in eval mode: the adapters folded per modality).

    python benchmarks/decode_overhead.py [--steps 150]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
from common import alternate, chat_batches, embedded_lavin_and_base
from transformers import DynamicCache

from mmadapters.modeling.adapters import FOLDED_ADAPTERS_KWARG
from mmadapters.modeling.adapters.mm_adapter import MMAdapter
from mmadapters.modeling.transformers_compat import cache_kwargs


@contextmanager
def hooks_removed(module: torch.nn.Module):
    saved = {m: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in module.modules()}
    for m in saved:
        m._forward_pre_hooks.clear()
        m._forward_hooks.clear()
    try:
        yield
    finally:
        for m, (pre, post) in saved.items():
            m._forward_pre_hooks.update(pre)
            m._forward_hooks.update(post)


@contextmanager
def identity_adapters():
    original = MMAdapter.forward_folded
    MMAdapter.forward_folded = lambda self, x, up, bias: x
    try:
        yield
    finally:
        MMAdapter.forward_folded = original


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    lavin, processor, base = embedded_lavin_and_base()
    inputs = chat_batches(processor)[0]
    folded = {
        "folded_adapters": lavin.fold_llm_adapters(),
        "modality": lavin.modality_of(inputs["input_ids"]),
    }
    rows = {FOLDED_ADAPTERS_KWARG: folded["folded_adapters"].rows(folded["modality"])}
    length = inputs["input_ids"].shape[1]
    token = inputs["input_ids"][:, -1:]

    # name -> (a context the step runs in, entered outside the timer; one decode step with cache c at position
    # p; the prefill into c). LaVIN counts text positions from 0 and shifts by one inside (its modality token),
    # the bare LLM gets the shifted positions directly.
    variants = {
        "base (bare LLM)": (
            nullcontext,
            lambda c, p: base(input_ids=token, **cache_kwargs(c), position_ids=p + 1),
            lambda c: base(**inputs, **cache_kwargs(c)),
        ),
        "LaVIN's LLM, hooks off": (
            lambda: hooks_removed(lavin.language_model),
            lambda c, p: lavin.language_model(input_ids=token, **cache_kwargs(c), position_ids=p + 1),
            lambda c: lavin.language_model(**inputs, **cache_kwargs(c)),
        ),
        "LaVIN's LLM + hooks, identity adapters": (
            identity_adapters,
            lambda c, p: lavin.language_model(input_ids=token, **cache_kwargs(c), position_ids=p + 1, **rows),
            lambda c: lavin.language_model(**inputs, **cache_kwargs(c), **rows),
        ),
        "LaVIN, identity adapters": (
            identity_adapters,
            lambda c, p: lavin(input_ids=token, **cache_kwargs(c), position_ids=p, **folded),
            lambda c: lavin(**inputs, **cache_kwargs(c), **folded),
        ),
        "LaVIN": (
            nullcontext,
            lambda c, p: lavin(input_ids=token, **cache_kwargs(c), position_ids=p, **folded),
            lambda c: lavin(**inputs, **cache_kwargs(c), **folded),
        ),
    }
    caches = {name: DynamicCache() for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for name, (context, _, prefill) in variants.items():
            with context():
                prefill(caches[name])
        for step in range(args.steps):
            position = torch.tensor([[length + step]])
            for name in alternate(list(variants), step):
                context, decode, _ = variants[name]
                with context():
                    start = time.perf_counter()
                    decode(caches[name], position)
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    print(f"decode step with KV cache, batch 1, median of {args.steps} interleaved steps:")
    reference = medians["base (bare LLM)"]
    for name, ms in medians.items():
        print(f"  {name:<39} {ms:6.2f} ms  (+{ms - reference:5.2f} ms, speed ratio {reference / ms:.3f})")


if __name__ == "__main__":
    from mmadapters.library_logs import quiet_library_logs

    quiet_library_logs()
    main()
