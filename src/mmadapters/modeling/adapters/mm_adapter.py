"""LaVIN's MM-Adapter: a RepAdapter with two grouped experts and a modality router (LAVIN.md section 1)."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init

from .call_state import record_routing
from .config import MMAdapterConfig
from .data_parallel import replica_adapter


class GroupedLinear(nn.Module):
    """A block-diagonal linear layer, equal to the official `Conv1d(in, out, kernel_size=1, groups=g)`.

    Output block g (features g*out/g .. (g+1)*out/g - 1) reads only input block g. The weight is stored
    in Conv1d layout without the kernel dimension: (out_features, in_features // groups).
    """

    def __init__(self, in_features: int, out_features: int, groups: int, bias: bool = True) -> None:
        super().__init__()
        if in_features % groups or out_features % groups:
            raise ValueError(
                f"groups={groups} must divide in_features={in_features} and out_features={out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features // groups))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groups
        x = x.unflatten(-1, (g, self.in_features // g))  # (..., g, in/g)
        weight = self.weight.view(g, self.out_features // g, self.in_features // g)  # (g, out/g, in/g)
        y = torch.einsum("...gi,goi->...go", x, weight).flatten(-2)
        return y + self.bias if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense (out_features, in_features) weight: block-diagonal."""
        g = self.groups
        return torch.block_diag(*self.weight.view(g, self.out_features // g, self.in_features // g))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}"


class MMAdapter(nn.Module):
    """One MM-Adapter: y = x + s * (w0 * B(drop(A x)) + w1 * D(drop(A x))).

    A is the down-projection (d -> r, no activation: the adapter is affine), B and D are the two grouped
    "experts" (r -> d), zero-initialised so that the adapter starts as the identity, and
    w = softmax(router(z) / temperature) are the routing weights.

    Routing: the caller either hands the weights in (`routing_weights`, shape (batch, 2); LaVIN's LLM side,
    where they come from the modality token, see `LavinForConditionalGeneration.compute_routing_table`),
    or the adapter routes itself by the first token of its own input (`z = x[:, 0]`: the CLS token of
    each image in the vision tower, or the modality token itself when the routing table is computed).
    """

    def __init__(
        self,
        hidden_size: int,
        config: MMAdapterConfig,
        router_token: str = "first",
        official_routing: bool = False,
    ) -> None:
        super().__init__()
        if router_token not in ("first", "mean"):
            raise ValueError(f"router_token must be 'first' or 'mean', got {router_token!r}")
        self.hidden_size = hidden_size
        self.scale = config.scale
        self.temperature = config.temperature
        self.router_token = router_token
        self.official_routing = official_routing  # parity flag for converted official ViT adapters only
        self.down = nn.Linear(hidden_size, config.r)
        self.dropout = nn.Dropout(config.dropout)
        self.expert_b = GroupedLinear(config.r, hidden_size, config.groups)
        self.expert_d = GroupedLinear(config.r, hidden_size, config.groups)
        self.router = nn.Linear(hidden_size, 2)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init.xavier_uniform_(self.down.weight)
        init.zeros_(self.down.bias)
        for expert in (self.expert_b, self.expert_d):
            init.zeros_(expert.weight)
            init.zeros_(expert.bias)
        # The router keeps torch's default nn.Linear initialisation, as in the official code.
        init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.hidden_size)
        init.uniform_(self.router.bias, -bound, bound)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights computed from the adapter's own input x (batch, seq, d)."""
        if self.official_routing:
            # Official LaVIN ViT: (L, N, D) layout made `x[:, 0]` the first image's tokens, so each
            # position of every image is routed by the same position of image 0. Shape (1, seq, 2).
            return torch.softmax(self.router(x[0]) / self.temperature, dim=-1).unsqueeze(0)
        z = x[:, 0] if self.router_token == "first" else x.mean(dim=1)
        return torch.softmax(self.router(z) / self.temperature, dim=-1)

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        if routing_weights is None:
            routing_weights = self.route(x)
            record_routing(self, routing_weights)  # collected by compute_routing_table (per thread)
        if routing_weights.dim() == 2:  # (batch, 2) -> (batch, 1, 2): one choice per sequence
            routing_weights = routing_weights.unsqueeze(1)
        hidden = self.dropout(self.down(x))
        w = routing_weights.to(x.dtype)
        return x + self.scale * (w[..., 0:1] * self.expert_b(hidden) + w[..., 1:2] * self.expert_d(hidden))

    def fold(self, routing_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For fixed routing weights (rows of (n, 2)) the adapter is affine (LAVIN.md section 8):
        y = x + U (A x + b_A) + c, with U = s (w0 B + w1 D) of shape (n, d, r) and c = s (w0 b_B + w1 b_D) of
        shape (n, d); `forward_folded` applies it. The down-projection (A, b_A) stays a module call there rather
        than being folded into U and c: PEFT layers a user put on it (`get_peft_model` with
        `target_modules="all-linear"` wraps it) then count as they do in `forward`. Dropout is ignored
        (inference only)."""
        w = routing_weights.to(self.down.weight.dtype)
        mixed = (
            w[:, 0, None, None] * self.expert_b.dense_weight()
            + w[:, 1, None, None] * self.expert_d.dense_weight()
        )
        mixed_bias = w[:, 0, None] * self.expert_b.bias + w[:, 1, None] * self.expert_d.bias
        return self.scale * mixed, self.scale * mixed_bias

    def forward_folded(self, x: torch.Tensor, up: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The adapter from `fold`'s output: `up` (d, r) and `bias` (d,) for the whole batch, or (batch, d, r)
        and (batch, d) with one row per sequence. A few ops per token."""
        hidden = self.down(x)  # (batch, seq, r)
        if up.dim() == 2:
            return x + torch.nn.functional.linear(hidden, up, bias)
        return x + (hidden @ up.transpose(1, 2) + bias.unsqueeze(1))

    def adapt(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the adapter in its own dtype (float32 over a bf16/fp16 backbone) and cast back."""
        return self(x.to(self.down.weight.dtype), routing_weights).to(x.dtype)

    def norm_output_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on a norm (vision side): adapt its output, each sequence routed by itself."""
        return replica_adapter(module, self).adapt(output)  # a DataParallel replica runs its own adapter

    def extra_repr(self) -> str:
        return f"scale={self.scale}, temperature={self.temperature}, router_token={self.router_token!r}"
