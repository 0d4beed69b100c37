"""Replicas of `pt2serve serve` on loopback, as a fleet behind one balancing client."""

from __future__ import annotations

import os
import pathlib
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from bench import l4
from bench.l4 import free_port
from tests.conftest import CACHE

ENV = {**os.environ, "PT2SERVE_CACHE_DIR": str(CACHE), "PYTHONUNBUFFERED": "1"}


class Replica(l4.Replica):
    """One `pt2serve serve --config` process with a fixed gRPC and metrics port, so
    that it can be stopped and started again at the same address."""

    def __init__(self, directory: pathlib.Path, name: str, config: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / f"{name}.toml"
        argv = [sys.executable, "-m", "pt2serve.service.cli", "serve", "--config", str(self.config)]
        super().__init__(directory, name, argv, "ready:", ENV)
        self.metrics_port = free_port()
        self.config.write_text(
            f"[server]\ngrpc_port = {self.port}\nmetrics_port = {self.metrics_port}\n{config}"
        )

    def served(self, model: str = "demo") -> float:
        """Requests this process answered OK, from its own /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "pt2serve_inference_requests_total" and sample.labels == {
                    "model": model,
                    "code": "OK",
                }:
                    return float(sample.value)
        return 0.0
