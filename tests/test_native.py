"""The native (C ABI, GIL-free) runtime against torch's binding, the reference."""

from __future__ import annotations

import os
import pathlib
import subprocess
import threading

import pytest
import torch

from pt2serve.loader.errors import InvalidInput, Unsupported
from pt2serve.loader.native import clean_stale_extractions
from pt2serve.loader.package import LoadOptions, ModelPackage
from pt2serve.service.demo import demo_model
from tests import models
from tests.conftest import Packages


def both(path: str, **options: object) -> tuple[ModelPackage, ModelPackage]:
    native = ModelPackage.load(path, LoadOptions(runtime="native", **options))  # type: ignore[arg-type]
    binding = ModelPackage.load(path, LoadOptions(runtime="binding", **options))  # type: ignore[arg-type]
    return native, binding


@pytest.mark.parametrize("rows", [1, 3, 32])
def test_outputs_equal_the_binding_exactly(packages: Packages, rows: int) -> None:
    native, binding = both(str(packages.two_input), num_runners=2)
    example = models.two_input_example(rows)
    ordered = native.schema.validate(example)
    got = native.run([t.clone() for t in ordered])
    want = binding.run([t.clone() for t in ordered])
    assert len(got) == len(want) == 2
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    native.close()


def test_single_threaded_native_matches_eager(packages: Packages) -> None:
    package = ModelPackage.load(str(packages.demo), LoadOptions(run_single_threaded=True))
    x = torch.randn(4, 16)
    torch.testing.assert_close(package.run([x.clone()])[0], demo_model()(x))
    package.close()


def test_inspection_agrees_with_the_binding(packages: Packages) -> None:
    native, binding = both(str(packages.two_input))
    assert native.get_call_spec() == binding.get_call_spec()
    assert sorted(native.get_constant_fqns()) == sorted(binding.get_constant_fqns())
    assert native.get_metadata()["owner"] == binding.get_metadata()["owner"] == "tests"
    native.close()


def test_constant_updates_agree_with_the_binding(packages: Packages) -> None:
    native, binding = both(str(packages.demo))
    weight = torch.randn(32, 16)
    for package in (native, binding):
        package.load_constants({"hidden.weight": weight}, use_inactive=False, check_full_update=False)
    x = torch.randn(2, 16)
    assert torch.equal(native.run([x.clone()])[0], binding.run([x.clone()])[0])
    eager = demo_model()
    with torch.no_grad():
        eager.hidden.weight.copy_(weight)
    torch.testing.assert_close(native.run([x.clone()])[0], eager(x))
    native.close()


def test_staged_constants_are_served_only_after_a_full_swap(packages: Packages) -> None:
    package = ModelPackage.load(str(packages.demo))
    fqns = package.get_constant_fqns()
    eager = demo_model()
    with torch.no_grad():
        for fqn in fqns:
            eager.get_parameter(fqn).mul_(-1)
    x = torch.randn(3, 16)
    old = package.run([x.clone()])[0]
    first, *rest = fqns
    package.load_constants(
        {first: eager.get_parameter(first).detach()}, use_inactive=True, check_full_update=False
    )
    # A partial stage would leave parameters empty in the runtime: refused, nothing changes.
    with pytest.raises(Unsupported, match="were not staged"):
        package.swap_constant_buffer()
    assert torch.equal(package.run([x.clone()])[0], old)
    package.load_constants(
        {f: eager.get_parameter(f).detach() for f in rest}, use_inactive=True, check_full_update=False
    )
    assert torch.equal(package.run([x.clone()])[0], old)
    package.swap_constant_buffer()
    torch.testing.assert_close(package.run([x.clone()])[0], eager(x))
    with pytest.raises(Unsupported, match="were not staged"):
        package.swap_constant_buffer()
    package.close()


def test_binding_has_no_swap(packages: Packages) -> None:
    binding = ModelPackage.load(str(packages.demo), LoadOptions(runtime="binding"))
    try:
        with pytest.raises(Unsupported, match="no swap"):
            binding.swap_constant_buffer()
    finally:
        binding.close()


def test_unknown_runtime_is_refused(packages: Packages) -> None:
    with pytest.raises(InvalidInput, match="runtime must be one of native, binding"):
        ModelPackage.load(str(packages.demo), LoadOptions(runtime="tvm"))


def test_native_runs_from_several_threads(packages: Packages) -> None:
    package = ModelPackage.load(str(packages.two_input), LoadOptions(num_runners=2))
    eager = models.make_two_input()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for rows in range(1, 20):
                example = models.two_input_example(rows + seed)
                if rows + seed > 32:
                    continue
                out = package.run(package.schema.validate({k: v.clone() for k, v in example.items()}))
                torch.testing.assert_close(out[0], eager(**example)[0])
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (0, 7, 13)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    package.close()


def test_stale_extractions_and_run_dirs_of_dead_processes_are_removed(tmp_path: pathlib.Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"pt2serve-{dead.pid}-abc"
    stale_run = tmp_path / f"pt2serve-run-{dead.pid}-xyz"
    live = tmp_path / f"pt2serve-{os.getpid()}-def"
    live_run = tmp_path / f"pt2serve-run-{os.getpid()}-uvw"
    unrelated = tmp_path / "pt2serve-notapid"
    # A directory whose random part came out all digits, with no owner in its name.
    digits = tmp_path / f"pt2serve-{dead.pid}"
    for path in (stale, stale_run, live, live_run, unrelated, digits):
        path.mkdir()
        (path / "model.so").write_bytes(b"x")
    assert sorted(clean_stale_extractions(str(tmp_path))) == sorted([str(stale), str(stale_run)])
    assert not stale.exists() and not stale_run.exists()
    assert live.exists() and live_run.exists() and unrelated.exists() and digits.exists()
