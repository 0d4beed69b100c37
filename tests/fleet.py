"""Replicas of `pt2serve serve` on loopback, as a fleet behind one balancing client."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Self

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CACHE

ENV = {**os.environ, "PT2SERVE_CACHE_DIR": str(CACHE), "PYTHONUNBUFFERED": "1"}
READY_TIMEOUT_S = 120.0


class LoadThreads:
    """Load from worker threads: `threads` start on enter; on exit `stop` is set and
    each is joined (bounded)."""

    JOIN_S = 120.0

    def __init__(self, threads: list[threading.Thread]) -> None:
        self.stop = threading.Event()
        self._threads = threads

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(self.JOIN_S)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Replica:
    """One `pt2serve serve` process with a fixed gRPC and metrics port, so that it can
    be stopped and started again at the same address."""

    def __init__(self, directory: pathlib.Path, name: str, config: str) -> None:
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / f"{name}.toml"
        self.config.write_text(
            f"[server]\ngrpc_port = {self.port}\nmetrics_port = {self.metrics_port}\n{config}"
        )
        self.log = directory / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pt2serve.service.cli", "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=ENV,
            )

    def wait_ready(self) -> None:
        """Until this start's `ready:` line is in the log. The log is a file (a pipe
        nobody drains could block the child), so it is polled."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            if self.log.read_text().count("ready:") >= self.starts:
                return
            time.sleep(0.05)
        self.kill()  # not left running after the test that started it fails
        raise AssertionError(f"{self.name} not ready: {self.log.read_text()}")

    def stop(self) -> int:
        """SIGTERM, then wait for the drain to end; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

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
