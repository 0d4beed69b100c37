"""`pt2serve serve --frontends N`: one parent process that owns an engine process
and N front-end processes sharing the gRPC port (SO_REUSEPORT, which grpc sets).

- The parent starts the engine and the front ends, each a `pt2serve serve` of the
  same arguments with a hidden `--role`, and logs `ready:` once the engine has
  loaded its models and every front end is connected to it.
- A child that exits while the server runs is started again (after 0.5 s, doubling
  up to 10 s while it keeps failing within a minute of its start). One that exits
  before it was ever ready (a model that does not load, a port that is taken) stops
  the server with exit code 2: starting it again would fail the same way. While the engine
  is away, front ends answer UNAVAILABLE and report NOT_SERVING; models loaded at run
  time through LoadModel are not loaded again by a restarted engine, the configured
  ones are.
- SIGTERM (or SIGINT): the front ends shut down first, each as service/shutdown.py
  says (NOT_SERVING, the drain delay, GOAWAY, calls in progress finish); then the
  engine stops; the parent exits 0. A second signal is passed on: it ends the
  front ends' drain delay.
- Every child gets PROMETHEUS_MULTIPROC_DIR, a directory in the run directory: the
  engine serves /metrics for all of them (service/engine.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pathlib
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from pt2serve.service.config import ServerConfig, default_frontends, default_intra_op_threads, usable_cpus
from pt2serve.service.shutdown import StopSignals

log = logging.getLogger("pt2serve.supervisor")
NOTIFY_ENV = "PT2SERVE_NOTIFY_FD"
PARENT_ENV = "PT2SERVE_SUPERVISOR_PID"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR_ENV = "PT2SERVE_METRICS_DIR"
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
STABLE_S = 60.0


def notify(message: str) -> None:
    """Tell the supervising parent (if any) something: one line on its pipe."""
    fd = os.environ.get(NOTIFY_ENV)
    if fd:
        with contextlib.suppress(OSError):
            os.write(int(fd), f"{message}\n".encode())


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this child when its parent dies (even by SIGKILL), so no
    engine or front end outlives the supervisor."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        parent = os.environ.get(PARENT_ENV)
        if parent and os.getppid() != int(parent):  # the parent died before prctl
            os.kill(os.getpid(), signal.SIGTERM)


class Child:
    def __init__(self, role: str, argv: list[str], env: dict[str, str]) -> None:
        self.role = role
        self.argv = argv
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.starts = 0
        self.backoff_s = FIRST_BACKOFF_S
        self._listener: asyncio.Future[None] | None = None

    async def start(self) -> None:
        read_fd, write_fd = os.pipe()
        self.starts += 1
        self.ready.clear()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "pt2serve.service.cli",
                *self.argv,
                env={**self.env, NOTIFY_ENV: str(write_fd)},
                pass_fds=(write_fd,),
            )
        finally:
            os.close(write_fd)
        log.info("%s started (pid %d)", self.role, self.proc.pid)
        # Kept: the loop holds tasks weakly, and one collected while it waits never
        # hears "ready" (seen: a server that never became ready).
        self._listener = asyncio.ensure_future(self._listen(read_fd))

    async def _listen(self, read_fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb")
        )
        try:
            async for line in reader:
                if line.strip() == b"ready":
                    self.ready.set()
        finally:
            transport.close()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)


def reserve_port(host: str, port: int) -> tuple[socket.socket | None, int]:
    """The port the front ends share. Port 0 picks one: a socket bound to it with
    SO_REUSEPORT (never listening, so it takes no connections) holds it for as long
    as the server runs, restarts of front ends included."""
    if port != 0:
        return None, port
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    holder = socket.socket(family, kind, proto)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(address)
    return holder, int(holder.getsockname()[1])


async def supervise(config: ServerConfig, argv: Sequence[str], frontends: int) -> int:
    # Mode 0700, named for this process: a server that starts after this one was
    # SIGKILLed removes it once the pid is gone (loader/native.py).
    run_dir = pathlib.Path(tempfile.mkdtemp(prefix=f"pt2serve-run-{os.getpid()}-"))
    metrics_dir = run_dir / "metrics"
    metrics_dir.mkdir()
    holder, port = reserve_port(config.host, config.grpc_port)
    # A model's OpenMP threads would otherwise spin for a while after each batch,
    # taking CPU the front ends need (measured: docs/performance.md).
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, PARENT_ENV: str(os.getpid())}
    env.pop(MULTIPROC_ENV, None)
    # Front ends write their metrics to files there; the engine keeps its own in
    # memory and serves them with the files' sums (service/engine.py).
    front_env = {**env, MULTIPROC_ENV: str(metrics_dir)}
    engine_env = {**env, METRICS_DIR_ENV: str(metrics_dir)}
    common = [*argv, "--run-dir", str(run_dir), "--grpc-port", str(port)]
    engine = Child("engine", [*common, "--role", "engine"], engine_env)
    fronts = [Child(f"frontend {i}", [*common, "--role", "frontend"], front_env) for i in range(frontends)]
    children = [engine, *fronts]
    signals = StopSignals()
    stopping = signals.begun
    try:
        for child in children:
            await child.start()
        failed: list[str] = []
        watchers = [asyncio.ensure_future(_watch(child, stopping, failed)) for child in children]
        ready: asyncio.Future[Any] = asyncio.ensure_future(_all_ready(children))
        stop_wait: asyncio.Future[Any] = asyncio.ensure_future(stopping.wait())
        await asyncio.wait([ready, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            kind = type(asyncio.get_running_loop())  # the children's too: one factory
            log.info(
                "ready: %d model(s): %s (gRPC on %s:%d, %d front end(s), engine pid %d; event loop: %s.%s)",
                len(config.models) or 1,
                ", ".join(m.name for m in config.models) or "demo",
                config.host,
                port,
                frontends,
                engine.proc.pid if engine.proc else 0,
                kind.__module__,
                kind.__name__,
            )
        else:
            ready.cancel()
        await stopping.wait()
        log.info(
            "shutting down: front ends first (drain delay %.1fs, grace %.1fs), then the engine",
            config.drain_delay_s,
            config.drain_grace_s,
        )
        for child in fronts:
            child.signal(signal.SIGTERM)
        hurry = asyncio.ensure_future(_pass_on(signals.hurry, fronts))
        await asyncio.gather(*(_exited(c) for c in fronts))
        hurry.cancel()
        engine.signal(signal.SIGTERM)
        await _exited(engine)
        for watcher in watchers:
            watcher.cancel()
        codes = {c.role: _clean(c) for c in children if c.proc is not None}
        log.info("stopped: exit codes %s", codes)
        if failed:
            return 2
        return 0 if all(code == 0 for code in codes.values()) else 1
    finally:
        for child in children:
            child.signal(signal.SIGKILL)
        if holder is not None:
            holder.close()
        shutil.rmtree(run_dir, ignore_errors=True)


async def _pass_on(hurry: asyncio.Event, fronts: list[Child]) -> None:
    """A second signal to the parent ends the front ends' drain delay."""
    await hurry.wait()
    for child in fronts:
        child.signal(signal.SIGTERM)


def _clean(child: Child) -> int | None:
    """A child's exit code; 0 for one that was still starting when SIGTERM came (it
    had accepted nothing, and had no handler yet to drain with)."""
    assert child.proc is not None
    code = child.proc.returncode
    if code == -signal.SIGTERM and not child.ready.is_set():
        log.info("%s was stopped while starting", child.role)
        return 0
    return code


async def _all_ready(children: list[Child]) -> None:
    for child in children:
        await child.ready.wait()


async def _exited(child: Child) -> None:
    if child.proc is not None:
        await child.proc.wait()


async def _watch(child: Child, stopping: asyncio.Event, failed: list[str]) -> None:
    """Start `child` again whenever it exits before shutdown. One that exits before it
    was ever ready (a model that does not load, a port taken) stops the server instead:
    starting it again would fail the same way."""
    while True:
        assert child.proc is not None
        started = time.monotonic()
        code = await child.proc.wait()
        if stopping.is_set():
            return
        if child.starts == 1 and not child.ready.is_set():
            failed.append(child.role)
            log.error(
                "%s failed to start (exit code %s): stopping; its log lines above say why", child.role, code
            )
            stopping.set()
            return
        if time.monotonic() - started > STABLE_S:
            child.backoff_s = FIRST_BACKOFF_S
        log.error("%s exited with %s; starting it again in %.1fs", child.role, code, child.backoff_s)
        try:
            await asyncio.wait_for(stopping.wait(), child.backoff_s)
            return
        except TimeoutError:
            pass
        child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)
        await child.start()
        asyncio.ensure_future(_announce(child))


async def _announce(child: Child) -> None:
    await child.ready.wait()
    log.info("%s is back (pid %d)", child.role, child.proc.pid if child.proc else 0)


def apply_intra_op_threads(config: ServerConfig, frontends: int) -> None:
    """Set the intra-op threads of model calls in this process, the one that runs the
    models: the configured count; torch's own choice where $OMP_NUM_THREADS is set
    and the config says "auto"; else `default_intra_op_threads`."""
    from pt2serve.scheduler.workers import set_intra_op_threads

    if config.intra_op_threads is not None:
        threads, source = config.intra_op_threads, "intra_op_threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        log.info("intra-op threads per model call: from OMP_NUM_THREADS=%s", os.environ["OMP_NUM_THREADS"])
        return
    else:
        threads = default_intra_op_threads(frontends)
        source = f"auto: {usable_cpus()} CPU(s) less {max(1, frontends)} serving event loop(s)"
    set_intra_op_threads(threads)
    log.info("intra-op threads per model call: %d (%s)", threads, source)


async def run_server(config: ServerConfig) -> None:
    """One process serves everything (`frontends = 0`)."""
    from pt2serve.service.cli import tune_process
    from pt2serve.service.metrics import start_metrics_server
    from pt2serve.service.server import Pt2Server

    apply_intra_op_threads(config, 0)
    server = Pt2Server(config)
    signals = StopSignals()
    metrics = None
    if config.metrics_port:
        metrics = start_metrics_server(config.host, config.metrics_port, server.registry)
        log.info("metrics on http://%s:%d/metrics", config.host, metrics.port)
    try:
        await server.start()
        tune_process(config.gil_switch_interval_us, config.gc_gen0_threshold)
        kind = type(asyncio.get_running_loop())
        log.info(
            "ready: %d model(s): %s (event loop: %s.%s)",
            len(config.models),
            ", ".join(m.name for m in config.models),
            kind.__module__,
            kind.__name__,
        )
        await signals.wait()
        log.info(
            "shutting down: drain delay %.1fs, then up to %.1fs for calls in progress",
            config.drain_delay_s,
            config.drain_grace_s,
        )
    finally:
        await server.stop(hurry=signals.hurry)
        if metrics is not None:
            metrics.shutdown()


async def run_engine(config: ServerConfig, run_dir: pathlib.Path) -> None:
    from pt2serve.service.cli import tune_process
    from pt2serve.service.engine import Engine
    from pt2serve.service.metrics import start_metrics_server

    die_with_parent()
    apply_intra_op_threads(config, default_frontends() if config.frontends is None else config.frontends)
    engine = Engine(config, run_dir)
    stop = _stop_on_sigterm()
    metrics = None
    if config.metrics_port:
        registry = engine.served_registry(os.environ.get(METRICS_DIR_ENV))
        metrics = start_metrics_server(config.host, config.metrics_port, registry)
        log.info("metrics on http://%s:%d/metrics (every process)", config.host, metrics.port)
    try:
        await engine.start()
        tune_process(config.gil_switch_interval_us, config.gc_gen0_threshold)
        notify("ready")
        log.info("engine up with %d model(s)", len(config.models))
        await stop.wait()
    finally:
        await engine.stop()
        if metrics is not None:
            metrics.shutdown()


async def run_frontend(config: ServerConfig, run_dir: pathlib.Path) -> None:
    from pt2serve.service.cli import tune_process
    from pt2serve.service.frontend import FrontEnd
    from pt2serve.service.metrics import multiprocess_values

    die_with_parent()
    multiprocess_values()
    front = FrontEnd(config, run_dir)
    signals = _stop_on_sigterm()
    try:
        await front.start()
        tune_process(config.gil_switch_interval_us, config.gc_gen0_threshold)
        waiting = asyncio.ensure_future(front.wait_ready())
        stopping = asyncio.ensure_future(signals.wait())
        await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if waiting.done():
            notify("ready")
        else:
            waiting.cancel()
        await signals.wait()
        log.info("front end shutting down")
    finally:
        await front.stop(signals.hurry)


def _stop_on_sigterm() -> StopSignals:
    """SIGTERM stops a child (a second one ends its drain delay); SIGINT (a
    terminal's Ctrl-C reaches the whole process group) is left to the parent, which
    stops the children in order."""
    signals = StopSignals((signal.SIGTERM,))
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, lambda: None)
    return signals
