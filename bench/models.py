"""Benchmark models: the tiny demo (overhead-bound) and a transformer-style
feed-forward stack (compute-bound: ~17 MB of weights, read once per run)."""

from __future__ import annotations

import torch

WIDTH = 512


class FeedForwardStack(torch.nn.Module):
    """Two pre-norm transformer feed-forward blocks (512 -> 2048 -> 512) with residuals."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.LayerNorm(WIDTH),
                torch.nn.Linear(WIDTH, 4 * WIDTH),
                torch.nn.GELU(),
                torch.nn.Linear(4 * WIDTH, WIDTH),
            )
            for _ in range(layers)
        )
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def make_ffn() -> FeedForwardStack:
    return FeedForwardStack().eval()
