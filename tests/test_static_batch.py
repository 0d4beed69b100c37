"""A package compiled at a static batch size: requests of fewer rows are padded."""

from __future__ import annotations

import asyncio

import pytest
import torch

from pt2serve.loader.dtypes import RawTensor
from pt2serve.loader.errors import InvalidInput
from pt2serve.loader.package import ModelPackage
from pt2serve.scheduler.batcher import BatchingConfig
from pt2serve.scheduler.manager import ModelConfig, ModelManager
from pt2serve.service.demo import demo_model
from tests.conftest import Packages


def test_static_schema(packages: Packages) -> None:
    schema = ModelPackage.load(str(packages.static)).schema
    assert schema.batched and schema.static_batch == 4
    assert schema.max_rows == 4 and schema.min_rows == 1
    schema.validate({"x": torch.randn(1, 16)})
    with pytest.raises(InvalidInput, match=r"input .x.: too many rows: 5 \(dim 0\), at most 4 per request"):
        schema.validate({"x": torch.randn(5, 16)})


async def test_padded_batches_match_eager(packages: Packages) -> None:
    manager = ModelManager()
    await manager.load(ModelConfig("static", str(packages.static)))
    try:
        eager = demo_model()
        xs = [torch.randn(1 + i % 3, 16) for i in range(12)]
        results = await asyncio.gather(*(manager.infer("static", {"x": x}) for x in xs))
        for x, result in zip(xs, results, strict=True):
            logits = result.outputs["logits"]
            assert isinstance(logits, RawTensor) and logits.shape == (x.shape[0], 4)
            torch.testing.assert_close(logits.tensor(), eager(x))
        stats = manager.get("static").scheduler.stats
        assert stats.rows == sum(x.shape[0] for x in xs)
        assert max(stats.batch_sizes) <= 4
    finally:
        await manager.close()


async def test_large_requests_split_into_static_batches(packages: Packages) -> None:
    manager = ModelManager()
    config = ModelConfig("static", str(packages.static), batching=BatchingConfig(max_rows_per_request=10))
    await manager.load(config)
    try:
        x = torch.randn(10, 16)
        result = await manager.infer("static", {"x": x})
        logits = result.outputs["logits"]
        assert isinstance(logits, RawTensor)
        torch.testing.assert_close(logits.tensor(), demo_model()(x))
        with pytest.raises(InvalidInput, match="too many rows: 11"):
            await manager.infer("static", {"x": torch.randn(11, 16)})
    finally:
        await manager.close()
