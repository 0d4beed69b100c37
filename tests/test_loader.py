"""loader/ against real compiled packages."""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator

import pytest
import torch

from pt2serve.loader.errors import InvalidInput, PackageError, PackageNotFound
from pt2serve.loader.package import (
    LoadOptions,
    ModelPackage,
    load_metadata_from_package,
    read_package_sources,
)
from pt2serve.loader.schema import METADATA_KEY, Dim, ModelSchema, derive_from_wrapper
from pt2serve.service.demo import demo_model
from tests import models
from tests.conftest import Packages

Loader = Callable[..., ModelPackage]


@pytest.fixture
def load() -> Iterator[Loader]:
    """Load packages that the test's teardown closes."""
    opened: list[ModelPackage] = []

    def load_one(path: object, options: LoadOptions | None = None) -> ModelPackage:
        package = ModelPackage.load(str(path), options or LoadOptions())
        opened.append(package)
        return package

    yield load_one
    for package in opened:
        package.close()


def test_run_matches_eager(load: Loader, packages: Packages) -> None:
    package = load(packages.two_input)
    for rows in (1, 2, 7, 32):
        example = models.two_input_example(rows)
        expected = models.make_two_input()(**example)
        outputs = package.run(package.schema.validate(example))
        assert len(outputs) == 2
        for got, want in zip(outputs, expected, strict=True):
            torch.testing.assert_close(got, want)


def test_schema_is_read_without_loading(packages: Packages) -> None:
    metadata = load_metadata_from_package(str(packages.two_input))
    assert metadata["owner"] == "tests"
    schema = ModelSchema.from_json(metadata[METADATA_KEY])
    assert schema.input_names == ("features", "ids")
    assert schema.output_names == ("mixed", "peak")
    assert schema.batched and schema.max_rows == 32 and schema.min_rows == 1
    assert schema.inputs[1].dtype == "int64"
    assert schema.inputs[0].dims == (Dim(None, 1, 32), Dim(8))


def test_derived_schema_matches_stored(load: Loader, packages: Packages) -> None:
    """The schema read from the wrapper's input checks agrees with what build stored."""
    source = read_package_sources(str(packages.two_input))
    assert source is not None
    derived = derive_from_wrapper(source)
    stored = load(packages.two_input).schema
    assert derived.batched
    assert [s.dtype for s in derived.inputs] == [s.dtype for s in stored.inputs]
    assert [s.dims for s in derived.inputs] == [s.dims for s in stored.inputs]
    assert len(derived.outputs) == 2


def test_foreign_package_gets_a_derived_schema(load: Loader, packages: Packages) -> None:
    package = load(packages.foreign)
    schema = package.schema
    assert schema.source == "derived"
    assert schema.input_names == ("input0", "input1")
    assert schema.max_rows == 16 and schema.min_rows == 1
    example = models.two_input_example(1)
    outputs = package.run(schema.validate({"input0": example["features"], "input1": example["ids"]}))
    expected = models.make_two_input()(**example)
    torch.testing.assert_close(outputs[0], expected[0])
    with pytest.raises(InvalidInput, match=r"input 'input1': dtype int32, expected int64"):
        schema.validate({"input0": example["features"], "input1": example["ids"].int()})


def test_unbatched_package(load: Loader, packages: Packages) -> None:
    package = load(packages.unbatched)
    assert not package.schema.batched
    v = torch.randn(6)
    (out,) = package.run(package.schema.validate({"v": v}))
    torch.testing.assert_close(out, models.make_unbatched()(v))


def test_call_spec_and_metadata(load: Loader, packages: Packages) -> None:
    package = load(packages.two_input, LoadOptions(num_runners=2))
    spec = package.get_call_spec()
    assert spec.input_names == ("features", "ids")
    assert '"type": "builtins.tuple"' in spec.in_spec
    assert spec.out_spec
    metadata = package.get_metadata()
    assert metadata["owner"] == "tests" and metadata["AOTI_DEVICE_KEY"] == "cpu"


def test_constant_specs_match_runtime(load: Loader, packages: Packages) -> None:
    """The constant table read from the wrapper agrees with the runtime's own."""
    package = load(packages.two_input)
    specs = {s.fqn: s for s in package.constant_specs()}
    assert set(specs) == set(package.get_constant_fqns())
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(packages.two_input) as archive:
        archive.extractall(tmp)
        so = next(os.path.join(tmp, n) for n in archive.namelist() if n.endswith(".so"))
        runner = torch._C._aoti.AOTIModelContainerRunnerCpu(so, 1)
        live = runner.extract_constants_map(False)
        names = runner.get_constant_names_to_original_fqns()
    assert set(live) == set(specs)
    for fqn, tensor in live.items():
        assert specs[fqn].shape == tuple(tensor.shape)
        assert specs[fqn].dtype == str(tensor.dtype).removeprefix("torch.")
    assert {s.internal_name: s.fqn for s in specs.values()} == dict(names)


def test_load_constants_changes_outputs_like_eager(load: Loader, packages: Packages) -> None:
    package = load(packages.two_input)
    eager = models.make_two_input()
    with torch.no_grad():
        for fqn in package.get_constant_fqns():
            eager.get_parameter(fqn).mul_(-2.0)
    new = {fqn: eager.get_parameter(fqn).detach().clone() for fqn in package.get_constant_fqns()}
    package.load_constants(new, use_inactive=False, check_full_update=True)
    example = models.two_input_example(3)
    outputs = package.run(package.schema.validate(example))
    torch.testing.assert_close(outputs[0], eager(**example)[0])


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (
            torch.zeros(32, 16, dtype=torch.float64),
            r"constant 'hidden.weight': dtype float64, expected float32",
        ),
        (torch.zeros(16, 32), r"constant 'hidden.weight': shape \[16, 32\], expected \[32, 16\]"),
        (torch.zeros(16, 32).t(), r"constant 'hidden.weight': tensor is not contiguous"),
    ],
)
def test_bad_constants_are_refused_before_the_runtime(
    load: Loader, packages: Packages, tensor: torch.Tensor, message: str
) -> None:
    package = load(packages.demo)
    x = torch.randn(2, 16)
    before = package.run([x.clone()])[0]
    with pytest.raises(InvalidInput, match=message):
        package.load_constants({"hidden.weight": tensor}, use_inactive=False, check_full_update=False)
    torch.testing.assert_close(package.run([x.clone()])[0], before)
    torch.testing.assert_close(before, demo_model()(x))


def test_unknown_constant_and_full_update(load: Loader, packages: Packages) -> None:
    package = load(packages.demo)
    with pytest.raises(InvalidInput, match=r"unknown constant 'nope'"):
        package.load_constants({"nope": torch.zeros(1)}, use_inactive=False, check_full_update=False)
    weight = demo_model().hidden.weight.detach().clone()
    with pytest.raises(InvalidInput, match=r"full update requested but constant '.*' is missing"):
        package.load_constants({"hidden.weight": weight}, use_inactive=False, check_full_update=True)


def test_update_constant_buffer_by_internal_name(load: Loader, packages: Packages) -> None:
    package = load(packages.demo)
    spec = next(s for s in package.constant_specs() if s.fqn == "hidden.weight")
    eager = demo_model()
    with torch.no_grad():
        eager.hidden.weight.zero_()
    package.update_constant_buffer(
        {spec.internal_name: torch.zeros(spec.shape)}, use_inactive=False, validate_full_updates=False
    )
    x = torch.randn(3, 16)
    torch.testing.assert_close(package.run([x.clone()])[0], eager(x))
    with pytest.raises(InvalidInput, match=r"unknown constant \(internal name\) 'hidden.weight'"):
        package.update_constant_buffer(
            {"hidden.weight": torch.zeros(spec.shape)}, use_inactive=False, validate_full_updates=False
        )


def test_inactive_update_is_not_served(load: Loader, packages: Packages) -> None:
    package = load(packages.demo)
    x = torch.randn(2, 16)
    before = package.run([x.clone()])[0]
    package.load_constants({"hidden.weight": torch.zeros(32, 16)}, use_inactive=True, check_full_update=False)
    torch.testing.assert_close(package.run([x.clone()])[0], before)


def test_missing_and_broken_packages(tmp_path: object) -> None:
    with pytest.raises(PackageNotFound, match="no package file"):
        ModelPackage.load("/nonexistent/model.pt2")
    path = os.path.join(str(tmp_path), "junk.pt2")
    with open(path, "wb") as f:
        f.write(b"not a zip")
    with pytest.raises(PackageError):
        ModelPackage.load(path)


def test_wrong_model_name(packages: Packages) -> None:
    with pytest.raises(PackageError):
        ModelPackage.load(str(packages.demo), LoadOptions(model_name="other"))
