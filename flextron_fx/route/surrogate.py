"""The surrogate model (paper Eq. 10): predicts the language-model loss of a sub-network
from the routers' outputs, so routers can minimise the loss without a gradient through the
backbone.

    S(r)      = sigma(r W_S1^T) W_S2                 static routers
    S(r, h_N) = sigma(r W_S1^T + h_N W_SH^T) W_S2    dynamic routers (h_N pooled over tokens)

`r` concatenates, per op, the router's decision for the sub-network: a one-hot over its
candidates (static) or the share of tokens taking each candidate (dynamic).
"""

from __future__ import annotations

import torch
from torch import nn


class Surrogate(nn.Module):
    """Two-layer MLP from router outputs (and, if `hidden_dim`, the pooled final hidden
    state) to a predicted loss. `offset` is the mean loss it starts from (set from the
    first batch by the router training), so the layers learn differences only."""

    def __init__(self, router_dim: int, hidden: int = 128, hidden_dim: int | None = None):
        super().__init__()
        self.w1 = nn.Linear(router_dim, hidden)
        self.wh = nn.Linear(hidden_dim, hidden, bias=False) if hidden_dim else None
        self.w2 = nn.Linear(hidden, 1)
        nn.init.zeros_(self.w2.weight)
        nn.init.zeros_(self.w2.bias)
        self.register_buffer("offset", torch.zeros(()))

    def forward(self, r: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """[n, router_dim] (and [n, hidden_dim]) -> [n] predicted losses."""
        z = self.w1(r)
        if self.wh is not None:
            if h is None:
                raise ValueError("this surrogate also reads the final hidden state")
            z = z + self.wh(h)
        return self.w2(torch.sigmoid(z)).squeeze(-1) + self.offset
