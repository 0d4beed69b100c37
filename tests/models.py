"""Modules compiled into test packages. Editing this file rebuilds the cached packages."""

from __future__ import annotations

import torch


class TwoInputNet(torch.nn.Module):
    """Float features plus int64 ids; two outputs."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.proj = torch.nn.Linear(8, 5)
        self.embed = torch.nn.Embedding(10, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, features: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed = self.proj(features) + self.embed(ids).sum(dim=1)
        return mixed, mixed.abs().amax(dim=1)


class Unbatched(torch.nn.Module):
    """No batch dimension: a fixed-size vector in, a fixed-size vector out."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.weight = torch.nn.Parameter(torch.randn(6, 6, generator=g))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.weight @ v)


class NormNet(torch.nn.Module):
    """BatchNorm running statistics and a registered buffer: constants of the
    runtime's Buffer type, which staging treats unlike parameters. 128 features
    keep them from being folded into the compiled code."""

    def __init__(self, seed: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = torch.nn.Linear(8, 128)
        self.bn = torch.nn.BatchNorm1d(128)
        self.head = torch.nn.Linear(128, 4)
        self.register_buffer("scale", torch.rand(128, generator=g) + 0.5)
        with torch.no_grad():
            for tensor in (*self.parameters(), self.bn.running_mean):
                tensor.copy_(torch.randn(tensor.shape, generator=g))
            self.bn.running_var.copy_(torch.rand(128, generator=g) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x)) * self.scale))


def make_norm(seed: int = 3) -> NormNet:
    return NormNet(seed).eval()


def make_two_input() -> TwoInputNet:
    return TwoInputNet().eval()


def make_unbatched() -> Unbatched:
    return Unbatched().eval()


def two_input_example(rows: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rows)
    return {
        "features": torch.randn(rows, 8, generator=g),
        "ids": torch.randint(0, 10, (rows, 3), generator=g),
    }
