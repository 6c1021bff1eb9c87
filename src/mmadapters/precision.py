"""Whether a device computes bfloat16 natively: bfloat16 mixed precision (`TrainingArguments(bf16=True)`) saves time
only there. Elsewhere torch emulates bfloat16, and a quickstart training step took 16 times as long as in float32
(an AVX2-only AMD EPYC; benchmarks/README.md, "Quickstart")."""

from __future__ import annotations

import torch


def native_bfloat16(device: str = "cpu") -> bool:
    """True where `device` ("cpu" or "cuda") has bfloat16 kernels: on the CPU, oneDNN's (x86 with AVX-512, Arm with
    the BF16 extension); on a GPU, what `torch.cuda.is_bf16_supported()` says (Ampere and newer)."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False
