"""CROME's cross-modal adapter: gated down-projections per modality, one shared up-projection (CROME.md section 2)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from .config import CromeAdapterConfig

MODALITIES = ("text", "vision")


class CromeAdapter(nn.Module):
    """For tokens X_k of modality k in {text, vision}:

        H_k = SiLU(X_k W_d^k) * (X_k W_g^k)      gated down-projection, d -> m, one pair per modality
        Y_k = X_k + H_k W_u                        up-projection m -> d, SHARED by both modalities

    The shared W_u is what makes the adapter cross-modal. With m = 256 and no biases it has 5 * d * m
    parameters (5,242,880 at d = 4096). W_u starts at zero [ours], so the adapter starts as the identity.
    """

    def __init__(self, hidden_size: int, config: CromeAdapterConfig) -> None:
        super().__init__()
        m = config.bottleneck
        self.zero_init_up = config.zero_init_up
        self.down = nn.ModuleDict({k: nn.Linear(hidden_size, m, bias=config.bias) for k in MODALITIES})
        self.gate = nn.ModuleDict({k: nn.Linear(hidden_size, m, bias=config.bias) for k in MODALITIES})
        self.up = nn.Linear(m, hidden_size, bias=config.bias)
        self.act = nn.SiLU()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for linear in (*self.down.values(), *self.gate.values()):
            init.xavier_uniform_(linear.weight)
            if linear.bias is not None:
                init.zeros_(linear.bias)
        if self.zero_init_up:
            init.zeros_(self.up.weight)
        else:
            init.xavier_uniform_(self.up.weight)
        if self.up.bias is not None:
            init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        dtype, device = x.dtype, x.device
        # The adapter in its own dtype (fp32 over a half-precision LLM) and on its own device (device maps).
        x = x.to(self.up.weight.device, self.up.weight.dtype)
        hidden = self.act(self.down[modality](x)) * self.gate[modality](x)
        return (x + self.up(hidden)).to(device, dtype)
