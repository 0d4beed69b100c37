"""The bundled demo model: a small seeded MLP, compiled once and cached.

`pt2serve serve` with no arguments serves it, so a new user has a model to call.
"""

from __future__ import annotations

import inspect
import os
import pathlib
import sys

import torch

from pt2serve.loader.build import build_package, cached_package

IN_FEATURES = 16
OUT_FEATURES = 4


class DemoMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.hidden = torch.nn.Linear(IN_FEATURES, 32)
        self.out = torch.nn.Linear(32, OUT_FEATURES)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.out(torch.relu(self.hidden(x)))
        return logits


def demo_model() -> DemoMLP:
    return DemoMLP().eval()


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("PT2SERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pt2serve"
    )
    return pathlib.Path(base)


def demo_package(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Path of the compiled demo package, building it on first use (10-40 s)."""
    source = inspect.getsource(sys.modules[__name__])

    def build(path: pathlib.Path) -> None:
        build_package(
            demo_model(),
            {"x": torch.randn(2, IN_FEATURES)},
            path,
            max_batch_size=256,
            output_names=["logits"],
            metadata={"pt2serve.model": "demo-mlp"},
        )

    return cached_package(cache_dir or default_cache_dir(), "demo", [source], build)
