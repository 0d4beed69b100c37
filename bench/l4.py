"""A rolling restart behind an L4 balancer, as a platform team runs it: replicas behind
haproxy in TCP mode (round robin over TCP connections, as a Kubernetes ClusterIP
Service balances them; TCP checks every 500 ms), callers that are plain
`tritonclient.grpc` clients (no service config, no retries) calling `ModelInfer` in a
loop, and each replica in turn stopped with SIGTERM and started again on its port.

Used by tests/test_l4.py and `python -m bench.drain`. Every loop is bounded in count
and time, and traffic only goes to loopback.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import pathlib
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any, Self

import numpy as np

READY_TIMEOUT_S = 180.0
MAX_CALLS = 1_000_000  # per caller: bounds the load if the run hangs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Replica:
    """One server process on a fixed port, so that it can be stopped and started
    again at the same address. `argv` may hold "{port}"; `ready` is the log line
    that says it serves (counted per start)."""

    def __init__(
        self, directory: pathlib.Path, name: str, argv: Sequence[str], ready: str, env: dict[str, str]
    ) -> None:
        self.name = name
        self.port = free_port()
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.ready = ready
        self.env = env
        directory.mkdir(parents=True, exist_ok=True)
        self.log = directory / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env)

    def wait_ready(self) -> None:
        """Until this start's ready line is in the log. The log is a file (a pipe
        nobody drains could block the child), so it is polled."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            if self.log.read_text().count(self.ready) >= self.starts:
                return
            time.sleep(0.05)
        self.kill()  # not left running after the run that started it fails
        raise AssertionError(f"{self.name} not ready: {self.log.read_text()}")

    def stop(self) -> int:
        """SIGTERM, then wait for the shutdown to end; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Balancer:
    """haproxy in TCP mode in front of `backends`: round robin over connections, TCP
    checks every 500 ms, a refused connection tried again on another backend."""

    def __init__(self, directory: pathlib.Path, backends: Sequence[str]) -> None:
        haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
        if haproxy is None:
            raise RuntimeError("haproxy is not installed: run `make tools` (apt-get install haproxy)")
        self.port = free_port()
        servers = "\n".join(f"    server r{i} {b} check inter 500ms" for i, b in enumerate(backends))
        self.config = directory / "haproxy.cfg"
        self.config.write_text(
            f"""global
    maxconn 4096
defaults
    mode tcp
    timeout connect 1s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch
frontend public
    bind 127.0.0.1:{self.port}
    default_backend replicas
backend replicas
    balance roundrobin
{servers}
"""
        )
        self.log = directory / "haproxy.log"
        self._haproxy = haproxy
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [self._haproxy, "-db", "-f", str(self.config)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            time.sleep(0.05)
        raise AssertionError(f"haproxy did not listen: {self.log.read_text()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@dataclasses.dataclass
class Tally:
    """How the callers' calls ended: status names -> counts, and one example message
    per failing status."""

    codes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def calls(self) -> int:
        return sum(self.codes.values())

    @property
    def failed(self) -> int:
        return self.calls - self.codes["OK"]

    def line(self) -> str:
        return f"{self.calls} calls, {self.failed} failed: " + ", ".join(
            f"{k} {v}" for k, v in sorted(self.codes.items())
        )


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


class TritonCallers(LoadThreads):
    """`count` threads, each with its own plain tritonclient gRPC client, calling
    ModelInfer on `model` ({input: float32 [1, width]}) until stopped."""

    def __init__(self, target: str, count: int, model: str, input_name: str, width: int) -> None:
        self.tally = Tally()
        self._lock = threading.Lock()
        self._args = (target, model, input_name, width)
        super().__init__([threading.Thread(target=self._call, daemon=True) for _ in range(count)])

    def ok(self) -> int:
        with self._lock:
            return self.tally.codes["OK"]

    def _call(self) -> None:
        import tritonclient.grpc as triton
        from tritonclient.utils import InferenceServerException

        target, model, input_name, width = self._args
        client: Any = triton.InferenceServerClient(target)
        data = np.zeros((1, width), dtype=np.float32)
        try:
            for _ in range(MAX_CALLS):
                if self.stop.is_set():
                    return
                tensor = triton.InferInput(input_name, [1, width], "FP32")
                tensor.set_data_from_numpy(data)
                try:
                    client.infer(model, [tensor], client_timeout=60)
                    code, message = "OK", ""
                except InferenceServerException as exc:
                    code = str(exc.status() or "UNKNOWN").removeprefix("StatusCode.")
                    message = str(exc.message())
                with self._lock:
                    self.tally.codes[code] += 1
                    self.tally.examples.setdefault(code, message)
        finally:
            client.close()


def wait_until(condition: Any, what: str, limit_s: float) -> None:
    """Poll `condition()` (other processes' state: no event to wait on) every 50 ms."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {limit_s}s waiting for {what}")


@dataclasses.dataclass
class RestartReport:
    tally: Tally
    exit_codes: list[int]
    seconds: float


def rolling_restart(
    replicas: Sequence[Replica],
    directory: pathlib.Path,
    callers: int = 8,
    model: str = "demo",
    input_name: str = "x",
    width: int = 16,
) -> RestartReport:
    """Start every replica, put haproxy in front, run the callers, and restart each
    replica in turn (SIGTERM, wait for exit, start again, wait until it serves and
    the callers' calls go on succeeding)."""
    exit_codes: list[int] = []
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        started = time.monotonic()
        with (
            Balancer(directory, [r.address for r in replicas]) as balancer,
            TritonCallers(balancer.address, callers, model, input_name, width) as load,
        ):
            wait_until(lambda: load.ok() > 100, "calls to succeed", 60)
            for replica in replicas:
                exit_codes.append(replica.stop())
                replica.start()
                replica.wait_ready()
                before = load.ok()
                wait_until(lambda before=before: load.ok() > before + 100, "calls to go on succeeding", 60)
        return RestartReport(load.tally, exit_codes, time.monotonic() - started)
    finally:
        for replica in replicas:
            replica.kill()
