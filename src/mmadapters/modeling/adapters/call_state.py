"""Per-call adapter state, kept per thread and never on the shared modules.

Two things travel inside one forward call from one hook to another: the routing weights (or folded adapters) the
attention-site hook of a decoder layer hands to the MLP-site hook of the same layer, and the self-routed weights
that `compute_routing_table` collects. Both live in thread-local storage, so two requests served at once by one
model (the demo with `--concurrency > 1`, a server with worker threads) each see their own: proven by
tests/test_adapters.py::test_concurrent_requests_route_independently.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_state = threading.local()


def hand_over(owner: Any, value: Any) -> None:
    """Leave `value` for the next `take_over(owner)` in this thread (the MLP site of the same layer call)."""
    store = getattr(_state, "handed_over", None)
    if store is None:
        store = _state.handed_over = {}
    store[id(owner)] = value


def take_over(owner: Any, default: Any = None) -> Any:
    """What `hand_over(owner, ...)` left in this thread (taken: a later call never sees a stale value)."""
    store = getattr(_state, "handed_over", None)
    return default if store is None else store.pop(id(owner), default)


@contextmanager
def recording_routing() -> Iterator[dict[int, torch.Tensor]]:
    """While active in this thread, every self-routed MM-Adapter records its weights: {id(adapter): weights}."""
    previous = getattr(_state, "recorder", None)
    _state.recorder = recorded = {}
    try:
        yield recorded
    finally:
        _state.recorder = previous


def record_routing(adapter: Any, weights: torch.Tensor) -> None:
    recorder = getattr(_state, "recorder", None)
    if recorder is not None:
        recorder[id(adapter)] = weights
