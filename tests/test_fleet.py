"""Past one machine, on loopback: three replicas behind one balancing client.

- A rolling restart (SIGTERM, exit, start again on the same port, each replica in
  turn) under steady unary and streaming load fails no request, and traffic comes
  back to each restarted replica.
- `constants rollout` moves the fleet to one new weight set under load, each answer
  from exactly one weight set; a replica that refuses the file leaves the whole
  fleet on the old set.

Load is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import torch
from safetensors.torch import save_file

from bench.l4 import LoadThreads
from pt2serve.scheduler.config import ModelConfig
from pt2serve.service import rollout
from pt2serve.service.client import SERVICE_CONFIG, Pt2ServeClient, channel_target
from pt2serve.service.demo import DemoMLP, demo_model
from pt2serve.service.pb import pt2serve_pb2 as pb
from pt2serve.service.pb import pt2serve_pb2_grpc as pb_grpc
from tests.conftest import Packages, Served, serving
from tests.fleet import ENV, Replica, free_port
from tests.test_constants import shifted_model, weights_of
from tests.test_service import outputs_of, run_request

# The documented bound (docs/deploy.md): a restarted replica gets traffic again within
# the client's reconnect backoff, a few seconds; max_connection_age_s makes clients
# re-resolve and reconnect periodically (new pods behind a DNS name).
TRAFFIC_BACK_S = 15.0
ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_REQUESTS = 200_000  # per worker: bounds the load if the test hangs
UNARY_WORKERS = 3


class Load(LoadThreads):
    """Steady unary and streaming load through one balancing client, in threads;
    every answer is compared with the eager module."""

    def __init__(self, client: Pt2ServeClient) -> None:
        self.client = client
        self.failures: list[str] = []
        self.answered = 0
        self.streamed = 0
        self._lock = threading.Lock()
        self._eager = demo_model()
        workers = [threading.Thread(target=self._unary) for _ in range(UNARY_WORKERS)]
        super().__init__([*workers, threading.Thread(target=self._stream)])

    def _check(self, x: torch.Tensor, got: torch.Tensor) -> None:
        with torch.no_grad():
            if not torch.allclose(got, self._eager(x), atol=1e-5):
                self.failures.append("an answer does not match the eager module")

    def _unary(self) -> None:
        for _ in range(MAX_REQUESTS):
            if self.stop.is_set():
                return
            x = torch.randn(1, 16)
            try:
                outputs = self.client.infer("demo", {"x": x}, timeout_s=60)
            except grpc.RpcError as exc:
                self.failures.append(f"unary: {exc.code().name}: {exc.details()}")
                continue
            self._check(x, outputs["logits"])
            with self._lock:
                self.answered += 1

    def _stream(self) -> None:
        sent: dict[int, torch.Tensor] = {}

        def inputs() -> Iterator[dict[str, torch.Tensor]]:
            for i in range(MAX_REQUESTS):
                if self.stop.is_set():
                    return
                sent[i] = torch.randn(1, 16)
                yield {"x": sent[i]}
                if i % 16 == 15:
                    time.sleep(0.005)  # a steady trickle, not a flood of one stream

        try:
            for index, outputs in self.client.infer_stream("demo", inputs(), timeout_s=600):
                self._check(sent.pop(index), outputs["logits"])
                with self._lock:
                    self.streamed += 1
        except (grpc.RpcError, RuntimeError) as exc:
            self.failures.append(f"stream: {exc}")


def wait_for(condition: object, what: str, limit_s: float) -> float:
    """Poll `condition()` (another process's /metrics: no event to wait on) every
    50 ms; returns the seconds it took, fails after `limit_s`."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if condition():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"timed out after {limit_s}s waiting for {what}")


def without_retries(service_config: str) -> str:
    """The documented service config less its retry policy: calls that fail are seen."""
    config = json.loads(service_config)
    for method in config["methodConfig"]:
        method.pop("retryPolicy", None)
    return json.dumps(config)


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT restarts on the same port")
def test_rolling_restart_fails_nothing(packages: Packages, tmp_path: pathlib.Path, layout: str) -> None:
    """With the drain delay, clients that watch health have moved away before the
    GOAWAY: not one call fails, and none needs the retry policy (it is taken out)."""
    frontends = {"front-ends": 2, "one-process": 0}[layout]
    config = (
        f"frontends = {frontends}\nmax_connection_age_s = 2\nmax_connection_age_grace_s = 5\n"
        "drain_delay_s = 1\ndrain_grace_s = 20\n"
    )
    replicas = [Replica(tmp_path, f"replica{i}", config) for i in range(3)]
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        client = Pt2ServeClient([r.address for r in replicas], service_config=without_retries(SERVICE_CONFIG))
        back_after: list[float] = []
        with Load(client) as load:
            for replica in replicas:
                wait_for(lambda r=replica: r.served() > 0, f"{replica.name} to serve", 60)
            for replica in replicas:
                before = replica.served()
                assert replica.stop() == 0, replica.log.read_text()
                replica.start()
                replica.wait_ready()
                back_after.append(
                    wait_for(
                        lambda r=replica: r.served() > 0, f"traffic back at {replica.name}", TRAFFIC_BACK_S
                    )
                )
                assert before > 0
            streamed_before_end = load.streamed
            wait_for(lambda: load.streamed > streamed_before_end, "the stream to keep flowing", 30)
        client.close()
        assert not load.failures, load.failures[:5]
        assert load.answered > 100 and load.streamed > 100, (load.answered, load.streamed)
        print(
            f"traffic back after {[round(s, 2) for s in back_after]} s; "
            f"{load.answered} unary, {load.streamed} streamed"
        )
    finally:
        for replica in replicas:
            replica.kill()


# ------------------------------------------------------------------ rollout
class Fleet:
    def __init__(self, replicas: list[Served], roots: list[pathlib.Path]) -> None:
        self.replicas = replicas
        self.roots = roots

    @property
    def addresses(self) -> list[str]:
        return [r.target for r in self.replicas]


@pytest.fixture
async def fleet(packages: Packages, tmp_path: pathlib.Path, layout: str) -> AsyncIterator[Fleet]:
    """Three replicas on one layout, each with a model root of its own."""
    replicas, roots = [], []
    async with contextlib.AsyncExitStack() as stack:
        for i in range(3):
            root = tmp_path / f"root{i}"
            root.mkdir()
            models = (ModelConfig("demo", str(packages.demo)),)
            replicas.append(
                await stack.enter_async_context(
                    serving(layout, tmp_path / f"replica{i}", models, model_root=root)
                )
            )
            roots.append(root)
        yield Fleet(replicas, roots)


async def updatable(fleet: Fleet) -> list[str]:
    """The demo's constants a server can update (folded ones are compiled in)."""
    async with grpc.aio.insecure_channel(fleet.addresses[0]) as channel:
        listed = await pb_grpc.ModelLoaderStub(channel).GetConstantFqns(
            pb.GetConstantFqnsRequest(name="demo")
        )
    return [c.fqn for c in listed.constants]


async def load_all(fleet: Fleet, sets: list[DemoMLP], stop: asyncio.Event) -> list[str]:
    """Unary requests to every replica until `stop`: each answer must equal exactly
    one weight set's eager output. Returns the failures."""
    failures: list[str] = []

    async def one(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            for _ in range(MAX_REQUESTS):
                if stop.is_set():
                    return
                x = torch.randn(2, 16)
                try:
                    got = outputs_of(await stub.Run(run_request("demo", x=x)))["logits"]
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{address}: {exc.code().name}: {exc.details()}")
                    continue
                matches = [torch.allclose(got, s(x), atol=1e-5) for s in sets]
                if matches.count(True) != 1:
                    failures.append(f"{address}: an answer matches {matches.count(True)} weight sets")

    await asyncio.gather(*(one(a) for a in fleet.addresses))
    return failures


async def rollout_under_load(fleet: Fleet, sets: list[DemoMLP]) -> tuple[rollout.RolloutReport, list[str]]:
    """Roll v2.safetensors out (label v2) while every replica serves requests, each of
    whose answers must come from exactly one of `sets`."""
    stop = asyncio.Event()
    load = asyncio.create_task(load_all(fleet, sets, stop))
    try:
        report = await asyncio.to_thread(
            rollout.rollout, fleet.addresses, "demo", label="v2", file="v2.safetensors"
        )
    finally:
        stop.set()
        failures = await load
    return report, failures


async def test_rollout_moves_every_replica_under_load(fleet: Fleet) -> None:
    fqns = await updatable(fleet)
    new = shifted_model(fqns, 0.05)
    for root in fleet.roots:
        save_file(weights_of(new, fqns), str(root / "v2.safetensors"))
    report, failures = await rollout_under_load(fleet, [demo_model(), new])
    assert report.ok and report.phase == "swapped", report
    assert not failures, failures[:5]
    assert [(r.version, r.label) for r in report.replicas] == [(1, "v2")] * 3
    checked = await asyncio.to_thread(rollout.check, ",".join(fleet.addresses), "demo")
    assert {(r.label, r.error) for r in checked} == {("v2", "")}
    x = torch.randn(3, 16)
    for address in fleet.addresses:
        async with grpc.aio.insecure_channel(address) as channel:
            got = outputs_of(await pb_grpc.InferenceStub(channel).Run(run_request("demo", x=x)))["logits"]
        torch.testing.assert_close(got, new(x))


async def test_a_refused_stage_leaves_every_replica_on_the_old_weights(fleet: Fleet) -> None:
    fqns = await updatable(fleet)
    new = shifted_model(fqns, 0.05)
    for root in fleet.roots[:2]:
        save_file(weights_of(new, fqns), str(root / "v2.safetensors"))
    wrong = weights_of(new, fqns)
    wrong[fqns[0]] = torch.zeros(3, 3)  # the wrong shape: refused before the runtime
    save_file(wrong, str(fleet.roots[2] / "v2.safetensors"))
    report, failures = await rollout_under_load(fleet, [demo_model()])
    assert not failures, failures[:5]
    assert report.phase == "staged" and not report.ok
    assert list(report.errors) == [fleet.addresses[2]]
    assert (
        "INVALID_ARGUMENT" in report.errors[fleet.addresses[2]]
        and "shape" in report.errors[fleet.addresses[2]]
    )
    assert [(r.version, r.label) for r in report.replicas] == [(0, "")] * 3
    # What the two good replicas staged was discarded: nothing can be swapped in.
    for address in fleet.addresses[:2]:
        async with grpc.aio.insecure_channel(address) as channel:
            loader = pb_grpc.ModelLoaderStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await loader.SwapConstantBuffer(pb.SwapConstantBufferRequest(name="demo"))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_rollout_command(fleet: Fleet) -> None:
    fqns = await updatable(fleet)
    new = shifted_model(fqns, 0.05)
    for root in fleet.roots:
        save_file(weights_of(new, fqns), str(root / "v2.safetensors"))
    targets = ",".join(fleet.addresses)

    async def pt2serve(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pt2serve.service.cli",
            "constants",
            "rollout",
            "--targets",
            targets,
            "--model",
            "demo",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=ENV,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        return proc.returncode or 0, out.decode()

    code, out = await pt2serve("--file", "v2.safetensors", "--label", "v2")
    assert code == 0, out
    for address in fleet.addresses:
        assert f"{address}: version 1 (v2)" in out, out
    code, out = await pt2serve("--check")
    assert code == 0 and out.count("version 1 (v2)") == 3, out


# ------------------------------------------------------------------ targets
def test_targets_name_one_or_several_replicas() -> None:
    assert channel_target("10.0.0.1:8500") == "10.0.0.1:8500"
    assert channel_target("10.0.0.1:8500,10.0.0.2:8500") == "ipv4:10.0.0.1:8500,10.0.0.2:8500"
    assert channel_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    assert (
        channel_target("dns:///pt2serve-headless.default.svc:8500")
        == "dns:///pt2serve-headless.default.svc:8500"
    )
    with pytest.raises(ValueError, match="dns:///name:port"):
        channel_target("a.example:1,b.example:1")
    assert rollout.replica_addresses("ipv4:10.0.0.1:1,10.0.0.2:2") == ["10.0.0.1:1", "10.0.0.2:2"]
    assert "127.0.0.1:8500" in rollout.replica_addresses("dns:///localhost:8500")


def test_the_shipped_service_config_is_the_clients() -> None:
    """deploy/ carries the client's service config for other languages: the same JSON."""
    shipped = json.loads((ROOT / "deploy" / "grpc-service-config.json").read_text())
    assert shipped == json.loads(SERVICE_CONFIG)
    (policy,) = [c["retryPolicy"] for c in shipped["methodConfig"]]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert shipped["healthCheckConfig"] == {"serviceName": "readiness"}


async def test_a_dns_target_reaches_the_fleet(fleet: Fleet) -> None:
    port = fleet.addresses[0].rpartition(":")[2]

    def infer() -> torch.Tensor:
        with Pt2ServeClient(f"dns:///localhost:{port}") as client:
            return client.infer("demo", {"x": x}, timeout_s=30)["logits"]

    x = torch.randn(2, 16)
    torch.testing.assert_close(await asyncio.to_thread(infer), demo_model()(x))


async def test_a_new_replica_starts_with_the_fleets_weights(
    fleet: Fleet, packages: Packages, tmp_path: pathlib.Path, layout: str
) -> None:
    """A pod the autoscaler adds reads its config: `weights` and `weights_label` (the
    file and label the last rollout wrote there) are served from its first request."""
    fqns = await updatable(fleet)
    new = shifted_model(fqns, 0.05)
    save_file(weights_of(new, fqns), str(tmp_path / "current.safetensors"))
    weights = str(tmp_path / "current.safetensors")
    models = (ModelConfig("demo", str(packages.demo), weights=weights, weights_label="v2"),)
    async with serving(layout, tmp_path / "joined", models, model_root=tmp_path) as joined:
        address = joined.target
        (state,) = await asyncio.to_thread(rollout.check, address, "demo")
        assert (state.version, state.label) == (0, "v2")
        x = torch.randn(3, 16)
        async with grpc.aio.insecure_channel(address) as channel:
            got = outputs_of(await pb_grpc.InferenceStub(channel).Run(run_request("demo", x=x)))["logits"]
        torch.testing.assert_close(got, new(x))


def test_a_stream_with_no_replica_gives_up() -> None:
    """Nobody listens: infer_stream raises UNAVAILABLE after its attempts instead of
    opening streams forever."""
    with Pt2ServeClient(f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(grpc.RpcError) as info:
            list(client.infer_stream("demo", [{"x": torch.randn(1, 16)}], timeout_s=30))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
