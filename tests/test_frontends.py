"""`pt2serve serve --frontends 2`: an engine process behind two gRPC front ends on
one port, under one supervising parent (real processes, real packages).

- Answers through the front ends equal eager, for both protocols, unary and streams;
  bad requests are refused with the field named; the server keeps serving.
- Management RPCs reach the engine from any front end (and still need the token);
  health and /metrics are one truth across the processes, each request counted once.
- SIGTERM drains the front ends, then the engine: the parent exits 0 and every
  request is answered OK or refused UNAVAILABLE (which clients retry), none lost.
- A SIGKILLed front end is started again; a SIGKILLed engine turns readiness off and
  makes the front ends answer UNAVAILABLE until it is back, then serving resumes.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.l4 import LoadThreads
from pt2serve.service import tensors
from pt2serve.service.demo import demo_model
from pt2serve.service.pb import grpc_service_pb2 as v2
from pt2serve.service.pb import grpc_service_pb2_grpc as v2_grpc
from pt2serve.service.pb import pt2serve_pb2 as pb
from pt2serve.service.pb import pt2serve_pb2_grpc as pb_grpc
from tests import models
from tests.conftest import Packages
from tests.fleet import ENV, Replica
from tests.test_service import outputs_of, run_request

TOKEN = "front-end-test-token"
LIMIT_S = 60.0
# Connections: the kernel spreads them over the front ends' listeners (SO_REUSEPORT).
CHANNELS = 8


def supervised(directory: pathlib.Path, packages: Packages, extra: str = "") -> Replica:
    token = directory / "token"
    directory.mkdir(parents=True, exist_ok=True)
    token.write_text(TOKEN)
    replica = Replica(
        directory,
        "supervised",
        f'frontends = 2\nmanagement_token_file = "{token}"\ndrain_grace_s = 5\n'
        f'model_root = "{packages.demo.parent}"\n{extra}'
        f'[[models]]\nname = "demo"\npath = "{packages.demo}"\n',
    )
    replica.start()
    replica.wait_ready()
    return replica


def children(replica: Replica) -> dict[int, str]:
    """pid -> role of the parent's children."""
    assert replica.proc is not None
    found: dict[int, str] = {}
    for task in pathlib.Path(f"/proc/{replica.proc.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if b"--role" in argv:
                found[int(pid)] = argv[argv.index(b"--role") + 1].decode()
    return found


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` every 10 ms: the processes are others, with no event to wait on."""
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def readiness(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return int(stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=5).status)
        except grpc.RpcError:
            return -1


def metric_samples(replica: Replica) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{replica.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    # Each family once, whichever processes counted it (the engine keeps its own
    # metrics in memory, the front ends write files).
    types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), sorted(t for t in types if types.count(t) > 1)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture(scope="module")
def server(packages: Packages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    replica = supervised(tmp_path_factory.mktemp("frontends"), packages)
    try:
        yield replica
    finally:
        code = replica.stop()
        assert code == 0, replica.log.read_text()


def demo_answer(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        answer: torch.Tensor = demo_model()(x)
    return answer


def test_answers_through_every_front_end_equal_eager(server: Replica) -> None:
    roles = sorted(children(server).values())
    assert roles == ["engine", "frontend", "frontend"]
    for i in range(CHANNELS):
        x = torch.randn(3, 16, generator=torch.Generator().manual_seed(i))
        expected = demo_answer(x)
        with grpc.insecure_channel(server.address) as channel:
            native = pb_grpc.InferenceStub(channel)
            got = outputs_of(native.Run(run_request("demo", x=x), timeout=30))
            torch.testing.assert_close(got["logits"], expected)
            request = v2.ModelInferRequest(model_name="demo")
            request.inputs.add(name="x", datatype="FP32", shape=[3, 16])
            request.raw_input_contents.append(x.numpy().tobytes())
            answer = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
            logits = torch.frombuffer(bytearray(answer.raw_output_contents[0]), dtype=torch.float32)
            torch.testing.assert_close(logits.reshape(3, 4), expected)
            stream_request = v2.ModelInferRequest(model_name="demo", id="k")
            stream_request.inputs.add(name="x", datatype="FP32", shape=[3, 16])
            stream_request.raw_input_contents.append(x.numpy().tobytes())
            (kserve_answer,) = list(
                v2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([stream_request]), timeout=30)
            )
            assert not kserve_answer.error_message, kserve_answer.error_message
            raw = kserve_answer.infer_response.raw_output_contents[0]
            torch.testing.assert_close(
                torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(3, 4), expected
            )
            rows = [x[r : r + 1] for r in range(3)]
            streamed = list(
                native.RunStream(
                    iter(run_request("demo", str(r), x=row) for r, row in enumerate(rows)), timeout=30
                )
            )
            assert len(streamed) == 3
            for answer_pb in streamed:
                row = int(answer_pb.request_id)
                torch.testing.assert_close(
                    tensors.tensor_from_pb(answer_pb.response.outputs["logits"], "logits"),
                    expected[row : row + 1],
                )


def test_many_requests_at_once_each_get_their_own_answer(server: Replica) -> None:
    """64 requests out together: the first batches are small (their runner answers
    them), the later ones big (the engine's loop does); every answer must reach the
    request it belongs to, once."""
    inputs = [torch.randn(1, 16, generator=torch.Generator().manual_seed(100 + i)) for i in range(64)]
    with grpc.insecure_channel(server.address) as channel:
        native = pb_grpc.InferenceStub(channel)
        calls = [
            native.Run.future(run_request("demo", str(i), x=x), timeout=30) for i, x in enumerate(inputs)
        ]
        answers = [call.result() for call in calls]
    for i, (x, answer) in enumerate(zip(inputs, answers, strict=True)):
        assert answer.request_id == str(i)
        torch.testing.assert_close(outputs_of(answer)["logits"], demo_answer(x))


def test_bad_requests_are_refused_by_name_and_serving_goes_on(server: Replica) -> None:
    with grpc.insecure_channel(server.address) as channel:
        native = pb_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            native.Run(run_request("demo", x=torch.randn(2, 5)), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'x'" in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info:
            native.Run(run_request("nope", x=torch.randn(2, 16)), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'nope'" in (info.value.details() or "")
        # Past every fixed width of the engine's frames (service/ipc.py).
        with pytest.raises(grpc.RpcError) as info:
            native.Run(run_request("m" * 200_000, x=torch.randn(2, 16)), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
        x = torch.randn(2, 16)
        torch.testing.assert_close(
            outputs_of(native.Run(run_request("demo", x=x), timeout=30))["logits"], demo_answer(x)
        )


def test_management_reaches_the_engine_from_every_front_end(server: Replica, packages: Packages) -> None:
    auth = (("authorization", f"Bearer {TOKEN}"),)
    load = pb.LoadModelRequest(name="two", package_path=str(packages.two_input))
    with grpc.insecure_channel(server.address) as channel:
        loader = pb_grpc.ModelLoaderStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            loader.LoadModel(load, timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        status = loader.LoadModel(load, timeout=60, metadata=auth)
        assert status.model.name == "two"
    example = models.two_input_example(4)
    mixed, peak = models.make_two_input()(**example)
    try:
        for _ in range(CHANNELS):
            with grpc.insecure_channel(server.address) as channel:
                names = {
                    m.name for m in pb_grpc.ModelLoaderStub(channel).ListModels(pb.ListModelsRequest()).models
                }
                assert names == {"demo", "two"}
                got = outputs_of(
                    pb_grpc.InferenceStub(channel).Run(run_request("two", **example), timeout=30)
                )
                torch.testing.assert_close(got["mixed"], mixed)
                torch.testing.assert_close(got["peak"], peak)
                health = health_pb2_grpc.HealthStub(channel)
                check = health.Check(health_pb2.HealthCheckRequest(service="two"), timeout=5)
                assert check.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        with grpc.insecure_channel(server.address) as channel:
            pb_grpc.ModelLoaderStub(channel).UnloadModel(pb.UnloadModelRequest(name="two"), metadata=auth)
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.InferenceStub(channel).Run(run_request("two", **example), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_metrics_count_each_request_once_with_the_usual_names(server: Replica) -> None:
    requests_ok = ("pt2serve_inference_requests_total", (("code", "OK"), ("model", "demo")))
    run_labels = (("grpc_method", "Run"), ("grpc_service", "pt2serve.v1.Inference"), ("grpc_type", "unary"))
    handled = ("grpc_server_handled_total", (("grpc_code", "OK"), *run_labels))
    started = ("grpc_server_started_total", run_labels)
    # Refused by the front end that received it: the same series as the engine's.
    refused = ("pt2serve_inference_requests_total", (("code", "INVALID_ARGUMENT"), ("model", "demo")))
    before = metric_samples(server)
    sent = bad = 0
    for _ in range(CHANNELS):
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            for _ in range(5):
                stub.Run(run_request("demo", x=torch.randn(1, 16)), timeout=30)
                sent += 1
            with pytest.raises(grpc.RpcError):
                stub.Run(run_request("demo", x=torch.randn(1, 15)), timeout=30)
            bad += 1
    after = metric_samples(server)

    def delta(key: tuple[str, tuple[tuple[str, str], ...]]) -> float:
        return after[key] - before.get(key, 0.0)

    assert delta(requests_ok) == sent
    assert delta(handled) == sent
    assert delta(started) == sent + bad
    assert delta(refused) == bad
    names = {name for name, _ in after}
    for name in (
        "pt2serve_inference_request_duration_seconds_count",
        "pt2serve_queue_duration_seconds_count",
        "pt2serve_compute_duration_seconds_count",
        "pt2serve_batch_size_rows_count",
        "pt2serve_batches_total",
        "pt2serve_inferred_rows_total",
        "pt2serve_model_ready",
        "pt2serve_queue_depth",
        "pt2serve_batches_in_flight",
        "process_cpu_seconds_total",
    ):
        assert name in names, name
    assert readiness(server.address) == health_pb2.HealthCheckResponse.SERVING


class Load(LoadThreads):
    """Unary Run requests from threads, each with its own connection, until stopped
    (or, with `until_refused`, until a thread is refused): every outcome recorded,
    every answer compared with eager."""

    def __init__(self, target: str, threads: int = 3, until_refused: bool = False) -> None:
        self.target = target
        self.until_refused = until_refused
        self.answered = 0
        self.codes: dict[str, int] = {}
        self.wrong = 0
        self._lock = threading.Lock()
        super().__init__([threading.Thread(target=self._work, args=(i,)) for i in range(threads)])

    def _work(self, index: int) -> None:
        x = torch.randn(2, 16, generator=torch.Generator().manual_seed(index))
        expected = demo_answer(x)
        request = run_request("demo", x=x)
        # No retries: the test sees every refusal a client would.
        options = [("grpc.enable_retries", 0)]
        with grpc.insecure_channel(self.target, options=options) as channel:
            stub = pb_grpc.InferenceStub(channel)
            for _ in range(100_000):
                if self.stop.is_set():
                    return
                try:
                    got = outputs_of(stub.Run(request, timeout=30))["logits"]
                except grpc.RpcError as exc:
                    code = exc.code().name
                    with self._lock:
                        self.codes[code] = self.codes.get(code, 0) + 1
                    if self.until_refused:
                        return
                    time.sleep(0.01)  # a client's backoff
                    continue
                with self._lock:
                    self.answered += 1
                    self.wrong += not torch.allclose(got, expected)

    def answered_more_than(self, count: int) -> Callable[[], bool]:
        return lambda: self.answered > count


def test_sigterm_drains_front_ends_then_the_engine(packages: Packages, tmp_path: pathlib.Path) -> None:
    replica = supervised(tmp_path, packages)
    try:
        with Load(replica.address, until_refused=True) as load:
            wait_for(load.answered_more_than(200), "load")
            assert replica.proc is not None
            replica.proc.send_signal(signal.SIGTERM)
            code = replica.proc.wait(timeout=LIMIT_S)
        assert code == 0, replica.log.read_text()
        assert load.wrong == 0
        # After the GOAWAY a lone server's callers fail to connect (UNAVAILABLE from
        # the client library), or a call caught in gRPC's window ends CANCELLED
        # (docs/deploy.md); none is refused for draining (tests/test_drain.py).
        assert set(load.codes) <= {"UNAVAILABLE", "CANCELLED"}, (load.codes, replica.log.read_text())
        log = replica.log.read_text()
        assert "shutting down: front ends first" in log
        assert "'engine': 0, 'frontend 0': 0, 'frontend 1': 0" in log
    finally:
        replica.kill()


def test_a_killed_front_end_is_started_again(packages: Packages, tmp_path: pathlib.Path) -> None:
    replica = supervised(tmp_path, packages)
    try:
        with Load(replica.address) as load:
            wait_for(load.answered_more_than(100), "load")
            before = children(replica)
            victim = next(pid for pid, role in before.items() if role == "frontend")
            os.kill(victim, signal.SIGKILL)
            wait_for(
                lambda: (
                    "frontend 0 is back" in replica.log.read_text()
                    or "frontend 1 is back" in replica.log.read_text()
                ),
                "a new front end",
            )
            assert sorted(children(replica).values()) == ["engine", "frontend", "frontend"]
            assert victim not in children(replica)
            answered = load.answered
            wait_for(load.answered_more_than(answered + 100), "load after the restart")
        assert load.wrong == 0
        # The killed front end's connections broke: UNAVAILABLE, which clients retry.
        assert set(load.codes) <= {"UNAVAILABLE"}, load.codes
        assert (
            "frontend 0 exited" in replica.log.read_text() or "frontend 1 exited" in replica.log.read_text()
        )
        for _ in range(CHANNELS):  # both front ends serve again
            x = torch.randn(1, 16)
            with grpc.insecure_channel(replica.address) as channel:
                got = outputs_of(pb_grpc.InferenceStub(channel).Run(run_request("demo", x=x), timeout=30))
                torch.testing.assert_close(got["logits"], demo_answer(x))
        assert replica.stop() == 0
    finally:
        replica.kill()


def test_a_killed_engine_turns_readiness_off_until_it_is_back(
    packages: Packages, tmp_path: pathlib.Path
) -> None:
    replica = supervised(tmp_path, packages)
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        with Load(replica.address) as load:
            wait_for(load.answered_more_than(100), "load")
            engine = next(pid for pid, role in children(replica).items() if role == "engine")
            os.kill(engine, signal.SIGKILL)
            wait_for(
                lambda: readiness(replica.address) == health_pb2.HealthCheckResponse.NOT_SERVING,
                "NOT_SERVING",
            )
            with grpc.insecure_channel(replica.address) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    pb_grpc.InferenceStub(channel).Run(run_request("demo", x=torch.randn(1, 16)), timeout=30)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            wait_for(lambda: readiness(replica.address) == serving, "SERVING again")
            answered = load.answered
            wait_for(load.answered_more_than(answered + 100), "load after the restart")
        assert load.wrong == 0
        assert set(load.codes) <= {"UNAVAILABLE"}, load.codes
        assert engine not in children(replica)
        assert "engine exited" in replica.log.read_text()
        assert "engine is back" in replica.log.read_text()
        assert replica.stop() == 0
    finally:
        replica.kill()


def test_an_engine_that_cannot_start_stops_the_server(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        f'[server]\ngrpc_port = 0\nmetrics_port = 0\nfrontends = 1\nmodel_root = "{tmp_path}"\n'
        f'[[models]]\nname = "m"\npath = "{tmp_path / "missing.pt2"}"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "pt2serve.service.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=LIMIT_S * 2,
        env=ENV,
    )
    assert done.returncode == 2, done.stderr
    assert "missing.pt2" in done.stderr and "engine failed to start" in done.stderr


def test_a_sigkilled_servers_run_directory_is_removed_by_the_next_start(
    packages: Packages, tmp_path: pathlib.Path
) -> None:
    """The supervisor's run directory (sockets, metrics files) is named for its pid:
    after SIGKILL nothing removes it, so the next server's start does, once that pid
    is gone; a live server's stays."""
    killed = supervised(tmp_path / "killed", packages)
    live = supervised(tmp_path / "live", packages)
    try:
        assert killed.proc is not None and live.proc is not None
        temp = pathlib.Path(tempfile.gettempdir())
        (run_dir,) = temp.glob(f"pt2serve-run-{killed.proc.pid}-*")
        (live_dir,) = temp.glob(f"pt2serve-run-{live.proc.pid}-*")
        engine = next(pid for pid, role in children(killed).items() if role == "engine")
        killed.proc.kill()
        killed.proc.wait()
        # Its children follow it (PR_SET_PDEATHSIG): SIGTERM, a drain, exit.
        wait_for(lambda: not pathlib.Path(f"/proc/{engine}").exists(), "the orphaned engine to exit")
        assert run_dir.exists()
        again = supervised(tmp_path / "again", packages)
        try:
            assert not run_dir.exists()
            assert live_dir.exists()
        finally:
            again.kill()
    finally:
        killed.kill()
        live.kill()
