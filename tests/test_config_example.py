from __future__ import annotations

import pathlib

from service.config import load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_example_config_parses() -> None:
    config = load_config(ROOT / "deploy" / "config.example.toml")
    assert config.host == "0.0.0.0" and config.grpc_port == 8500
    (model,) = config.models
    assert model.name == "demo" and model.package_path == "/models/demo.pt2"
    assert model.batching is not None and model.batching.max_batch_size == 32
