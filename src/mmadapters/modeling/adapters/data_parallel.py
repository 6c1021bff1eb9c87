"""Adapters on DataParallel replicas (transformers' Trainer on several GPUs in one process).

`nn.DataParallel` runs a shallow copy of the model on each GPU at every step. The copies of the backbone modules
that carry our hooks share their hook tables with the originals, and those hooks are bound to the original
adapters (on the first GPU): a copy would run the original adapters, on the wrong device and outside the copy's
autograd graph. So a replica's forward tells each of its hooked modules which adapter copy is its own, as a plain
attribute of that module copy (`injection.bind_replica_adapters`), and every hook runs that one. The original
modules never carry the attribute. It lives on the module, not in a per-thread state, because activation
checkpointing recomputes a layer during the backward pass, in autograd's own thread.
"""

from __future__ import annotations

from torch import nn

REPLICA_ADAPTER = "mm_replica_adapter"


def replica_adapter(module: nn.Module, adapter: nn.Module) -> nn.Module:
    """The adapter a hook on `module` runs: the replica's own on a DataParallel copy, else `adapter`."""
    return module.__dict__.get(REPLICA_ADAPTER, adapter)
