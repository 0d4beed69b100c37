"""The KServe v2 / Triton endpoint, driven by the real tritonclient package."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from pt2serve.loader.dtypes import TYPES, AnyTensor, RawTensor
from pt2serve.service.demo import demo_model
from pt2serve.service.kserve import decode_inputs, encode_response
from pt2serve.service.pb import grpc_service_pb2 as v2
from tests import models
from tests.conftest import Packages, Running

T = TypeVar("T")


async def call(running: Running, fn: Callable[[triton.InferenceServerClient], T]) -> T:
    """Run a blocking tritonclient call in a thread; the server runs on this loop."""

    def work() -> T:
        client = triton.InferenceServerClient(running.target)
        try:
            return fn(client)
        finally:
            client.close()

    return await asyncio.to_thread(work)


def demo_inputs(x: np.ndarray[Any, Any]) -> list[triton.InferInput]:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


async def test_health_and_metadata(running: Running) -> None:
    def check(client: triton.InferenceServerClient) -> dict[str, Any]:
        return {
            "live": client.is_server_live(),
            "ready": client.is_server_ready(),
            "model_ready": client.is_model_ready("demo"),
            "unknown_ready": client.is_model_ready("nope"),
            "server": client.get_server_metadata(as_json=True),
            "metadata": client.get_model_metadata("two", as_json=True),
            "config": client.get_model_config("demo", as_json=True)["config"],
            "vec_config": client.get_model_config("vec", as_json=True)["config"],
        }

    got = await call(running, check)
    assert got["live"] and got["ready"] and got["model_ready"] and not got["unknown_ready"]
    assert got["server"]["name"] == "pt2serve" and "model_repository" in got["server"]["extensions"]
    metadata = got["metadata"]
    assert metadata["platform"] == "pytorch_aoti" and metadata["versions"] == ["1"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [
        ("features", "FP32", ["-1", "8"]),
        ("ids", "INT64", ["-1", "3"]),
    ]
    assert [o["name"] for o in metadata["outputs"]] == ["mixed", "peak"]
    config = got["config"]
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == ["16"]
    assert config["input"][0]["data_type"] == "TYPE_FP32" and "dynamic_batching" in config
    assert got["vec_config"].get("max_batch_size", 0) == 0 and got["vec_config"]["input"][0]["dims"] == ["6"]


async def test_infer_matches_eager_and_filters_outputs(running: Running) -> None:
    x = np.random.default_rng(0).standard_normal((3, 16), dtype=np.float32)
    result = await call(running, lambda c: c.infer("demo", demo_inputs(x)))
    np.testing.assert_allclose(
        result.as_numpy("logits"), demo_model()(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6
    )
    assert result.get_response().model_version == "1"

    example = models.two_input_example(4)
    features = triton.InferInput("features", [4, 8], "FP32")
    features.set_data_from_numpy(example["features"].numpy())
    ids = triton.InferInput("ids", [4, 3], "INT64")
    ids.set_data_from_numpy(example["ids"].numpy())
    wanted = [triton.InferRequestedOutput("peak")]
    result = await call(running, lambda c: c.infer("two", [features, ids], outputs=wanted, request_id="r-1"))
    assert result.as_numpy("mixed") is None
    np.testing.assert_allclose(
        result.as_numpy("peak"), models.make_two_input()(**example)[1].detach().numpy(), rtol=1e-5
    )
    assert result.get_response().id == "r-1"


async def test_async_infer_and_priority(running: Running) -> None:
    x = np.ones((2, 16), dtype=np.float32)

    def run(client: triton.InferenceServerClient) -> Any:
        done: queue.Queue[Any] = queue.Queue()
        client.async_infer(
            "demo", demo_inputs(x), lambda result, error: done.put((result, error)), priority=2
        )
        return done.get(timeout=30)

    result, error = await call(running, run)
    assert error is None
    np.testing.assert_allclose(
        result.as_numpy("logits"), demo_model()(torch.from_numpy(x)).detach().numpy(), rtol=1e-5
    )
    with pytest.raises(InferenceServerException, match="priority 4 out of range"):
        await call(running, lambda c: c.infer("demo", demo_inputs(x), priority=5))


async def test_stream_answers_in_order_and_survives_errors(running: Running) -> None:
    xs = [np.random.default_rng(i).standard_normal((1 + i % 3, 16), dtype=np.float32) for i in range(10)]

    def run(client: triton.InferenceServerClient) -> list[Any]:
        answers: queue.Queue[Any] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            for i, x in enumerate(xs):
                client.async_stream_infer("demo", demo_inputs(x), request_id=f"s{i}")
                if i == 4:
                    bad = triton.InferInput("x", [1, 3], "FP32")
                    bad.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
                    client.async_stream_infer("demo", [bad], request_id="bad")
            return [answers.get(timeout=30) for _ in range(len(xs) + 1)]
        finally:
            client.stop_stream()

    answers = await call(running, run)
    ids = [r.get_response().id if r is not None else "bad" for r, _ in answers]
    assert ids == [f"s{i}" for i in range(5)] + ["bad"] + [f"s{i}" for i in range(5, 10)]
    error = answers[5][1]
    assert error is not None and "input 'x': dim 1 is 3, expected 16" in str(error)
    eager = demo_model()
    for (result, err), x in zip([a for a in answers if a[0] is not None], xs, strict=True):
        assert err is None
        np.testing.assert_allclose(
            result.as_numpy("logits"), eager(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6
        )


async def test_bad_requests_get_precise_errors(running: Running) -> None:
    x = np.zeros((2, 16), dtype=np.float64)
    wrong = triton.InferInput("x", [2, 16], "FP64")
    wrong.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as info:
        await call(running, lambda c: c.infer("demo", [wrong]))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'x': dtype float64, expected float32" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        await call(running, lambda c: c.infer("nope", demo_inputs(np.zeros((1, 16), dtype=np.float32))))
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        await call(
            running,
            lambda c: c.infer("demo", demo_inputs(np.zeros((1, 16), dtype=np.float32)), model_version="7"),
        )
    assert info.value.status() == "StatusCode.NOT_FOUND"
    ok = await call(running, lambda c: c.infer("demo", demo_inputs(np.zeros((1, 16), dtype=np.float32))))
    assert ok.as_numpy("logits").shape == (1, 4)


async def test_statistics_and_repository(running: Running, packages: Packages) -> None:
    x = np.ones((3, 16), dtype=np.float32)

    def run(client: triton.InferenceServerClient) -> dict[str, Any]:
        for _ in range(4):
            client.infer("demo", demo_inputs(x))
        stats = client.get_inference_statistics("demo", as_json=True)["model_stats"][0]
        index = client.get_model_repository_index(as_json=True)["models"]
        client.unload_model("vec")
        after_unload = client.is_model_ready("vec")
        unloaded_index = client.get_model_repository_index(as_json=True)["models"]
        # A configured model loads again by name.
        client.load_model("vec")
        reloaded = client.is_model_ready("vec")
        try:
            client.load_model("missing")
            missing_error = ""
        except InferenceServerException as exc:
            missing_error = str(exc)
        return {
            "stats": stats,
            "index": index,
            "after_unload": after_unload,
            "unloaded_index": unloaded_index,
            "reloaded": reloaded,
            "missing_error": missing_error,
        }

    got = await call(running, run)
    stats = got["stats"]
    assert int(stats["inference_count"]) == 12 and int(stats["execution_count"]) >= 1
    assert int(stats["inference_stats"]["success"]["count"]) == 4
    assert int(stats["inference_stats"]["success"]["ns"]) > 0
    assert {m["name"] for m in got["index"]} >= {"demo", "two", "vec"}
    assert got["after_unload"] is False and got["reloaded"] is True
    states = {m["name"]: m.get("state") for m in got["unloaded_index"]}
    assert states["vec"] == "UNAVAILABLE" and states["demo"] == "READY"
    assert "NOT_FOUND" in got["missing_error"] and "no package file" in got["missing_error"]


def as_tensor(tensor: AnyTensor) -> torch.Tensor:
    """Raw contents stay bytes until the data plane makes them a tensor."""
    return tensor.tensor() if isinstance(tensor, RawTensor) else tensor


@pytest.mark.parametrize("element", [t for t in TYPES if t.kserve_contents], ids=lambda t: t.kserve)
def test_typed_contents_become_the_bytes_raw_contents_would_be(element: Any) -> None:
    """Every type with a typed-contents field, at its extremes: decoded as bytes (no
    torch call on the loop), the same bytes raw contents carry."""
    info = np.finfo(element.numpy) if np.issubdtype(element.numpy, np.floating) else None
    if element.numpy is np.bool_:
        values = np.array([[True, False, True]])
    elif info is not None:
        values = np.array([[info.min, -0.0, info.max]], dtype=element.numpy)
    else:
        limits = np.iinfo(element.numpy)
        values = np.array([[limits.min, 0, limits.max]], dtype=element.numpy)
    raw = v2.ModelInferRequest(model_name="m")
    raw.inputs.add(name="x", datatype=element.kserve, shape=[1, 3])
    raw.raw_input_contents.append(values.astype(element.numpy).tobytes())
    typed = v2.ModelInferRequest(model_name="m")
    spec = typed.inputs.add(name="x", datatype=element.kserve, shape=[1, 3])
    getattr(spec.contents, element.kserve_contents).extend(values.ravel().tolist())
    got, want = decode_inputs(typed)["x"], decode_inputs(raw)["x"]
    assert isinstance(got, RawTensor) and isinstance(want, RawTensor)
    assert (got.dtype, got.shape, bytes(got.data)) == (want.dtype, want.shape, bytes(want.data))


def test_typed_and_raw_contents_decode_alike() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = v2.ModelInferRequest(model_name="m")
    raw.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    raw.raw_input_contents.append(values.tobytes())
    typed = v2.ModelInferRequest(model_name="m")
    tensor = typed.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    tensor.contents.fp32_contents.extend(values.ravel().tolist())
    assert torch.equal(as_tensor(decode_inputs(raw)["x"]), as_tensor(decode_inputs(typed)["x"]))
    halves = torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16)
    response = encode_response(raw, {"y": halves, "z": halves.half()}, 3)
    assert [o.datatype for o in response.outputs] == ["BF16", "FP16"]
    assert response.raw_output_contents[0] == halves.view(torch.int16).numpy().tobytes()
    assert response.parameters["constants_version"].int64_param == 3
    back = v2.ModelInferRequest(model_name="m")
    back.inputs.add(name="y", datatype="BF16", shape=[1, 2])
    back.raw_input_contents.append(response.raw_output_contents[0])
    assert torch.equal(as_tensor(decode_inputs(back)["y"]), halves)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda r: r.raw_input_contents.append(b"\0" * 4), "raw_input_contents has 2 entries for 1 inputs"),
        (lambda r: setattr(r.inputs[0], "datatype", "UINT16"), "datatype 'UINT16' is not supported"),
        (
            lambda r: r.inputs[0].shape.__setitem__(0, 3),
            "raw contents have 24 bytes, shape [3, 3] of FP32 needs 36",
        ),
    ],
)
def test_malformed_v2_requests(mutate: Callable[[v2.ModelInferRequest], object], fragment: str) -> None:
    from pt2serve.loader.errors import InvalidInput

    request = v2.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    request.raw_input_contents.append(np.zeros((2, 3), dtype=np.float32).tobytes())
    mutate(request)
    with pytest.raises(InvalidInput) as info:
        decode_inputs(request)
    assert fragment in str(info.value)
