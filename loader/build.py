"""Export an nn.Module and compile it into a `.pt2` package with its serving schema.

The schema is stored in the package metadata (`aot_inductor.metadata`), so
`load_metadata_from_package` reads it without loading the model.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import pathlib
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch

from pt2serve.loader import defaults
from pt2serve.loader.dtypes import name_of
from pt2serve.loader.errors import InvalidInput
from pt2serve.loader.schema import METADATA_KEY, Dim, ModelSchema, TensorSpec


def import_factory(target: str) -> Callable[[], torch.nn.Module]:
    """Resolve 'package.module:factory' to a callable returning a module."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise InvalidInput(f"expected MODULE:FACTORY, got {target!r}")
    module = importlib.import_module(module_name)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InvalidInput(f"{target!r} is not callable")
    return factory  # type: ignore[no-any-return]


def build_package(
    module: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    output_path: str | os.PathLike[str],
    *,
    batched: bool = True,
    max_batch_size: int = defaults.MAX_BATCH,
    static_batch: int | None = None,
    output_names: list[str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ModelSchema:
    """Export `module` on `example_inputs` (forward's positional args, by name) and
    compile it to `output_path`. With `batched`, dim 0 of every input is dynamic in
    1..max_batch_size, or, with `static_batch`, compiled at exactly that many rows (the
    server pads smaller batches). Returns the schema stored in the package."""
    module = module.eval()
    names = list(example_inputs)
    _check_forward_signature(module, names)
    examples = dict(example_inputs)
    if static_batch is not None and (not batched or static_batch < 1):
        raise InvalidInput("static_batch needs a batched model and at least one row")
    if batched:
        if any(t.dim() == 0 for t in examples.values()):
            raise InvalidInput("a batched model needs every input to have a batch dimension")
        # Trace at the static batch size; otherwise with at least two rows, since
        # export specialises sizes 0 and 1.
        rows = static_batch or max(2, min(t.shape[0] for t in examples.values()))
        examples = {
            n: t if t.shape[0] == rows else t[:1].expand(rows, *t.shape[1:]).clone()
            for n, t in examples.items()
        }
    args = tuple(examples.values())
    with torch.no_grad():
        eager = module(*args)
    flat_out = list(eager) if isinstance(eager, (tuple, list)) else [eager]
    if not all(isinstance(t, torch.Tensor) for t in flat_out):
        raise InvalidInput("forward must return a tensor or a tuple/list of tensors")
    out_names = output_names or [
        f"output{i}" if len(flat_out) > 1 else "output" for i in range(len(flat_out))
    ]
    if len(out_names) != len(flat_out):
        raise InvalidInput(f"{len(out_names)} output names for {len(flat_out)} outputs")

    example_rows = next(iter(examples.values())).shape[0] if batched else None
    dynamic_shapes: dict[str, Any] | None = None
    if batched and static_batch is None:
        batch = torch.export.Dim("batch", min=1, max=max_batch_size)
        dynamic_shapes = {n: {0: batch} for n in names}
    if batched:
        for name, out in zip(out_names, flat_out, strict=True):
            if out.dim() == 0 or out.shape[0] != example_rows:
                raise InvalidInput(f"output {name!r} has no batch dimension matching the inputs")

    import torch.fx.experimental._config as fx_config

    # Size-oblivious tracing keeps the low bound of the batch dim at 1, so the
    # compiled guards admit single-row batches.
    with cast(Any, fx_config).patch(backed_size_oblivious=True):
        exported = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)

    def spec(name: str, t: torch.Tensor) -> TensorSpec:
        dims = tuple(Dim(size=s) for s in t.shape)
        if batched and static_batch is None:
            dims = (Dim(None, 1, max_batch_size), *dims[1:])
        return TensorSpec(name, name_of(t.dtype), dims)

    schema = ModelSchema(
        inputs=tuple(spec(n, t) for n, t in examples.items()),
        outputs=tuple(spec(n, t) for n, t in zip(out_names, flat_out, strict=True)),
        batched=batched,
    )
    stored = {**(metadata or {}), METADATA_KEY: schema.to_json()}
    output_path = pathlib.Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    # Compile next to the target and rename, so a reader never sees half a package.
    fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=output_path.parent)
    os.close(fd)
    try:
        torch._inductor.aoti_compile_and_package(
            exported,
            package_path=tmp,
            inductor_configs={"aot_inductor.metadata": stored},
        )
        # mkstemp creates 0600; a package is read by whoever serves it (another user
        # in a container): give it the mode a plain file gets under the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, output_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return schema


def _check_forward_signature(module: torch.nn.Module, names: list[str]) -> None:
    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if params[: len(names)] != names:
        raise InvalidInput(f"example inputs {names} must match forward's leading parameters {params}")


def cache_key(*parts: str) -> str:
    """A key for a compiled package: torch version, CPU ISA and the given parts."""
    isa = torch.backends.cpu.get_cpu_capability()
    digest = hashlib.sha256("\0".join((torch.__version__, isa, *parts)).encode())
    return digest.hexdigest()[:16]


def cached_package(
    cache_dir: str | os.PathLike[str],
    name: str,
    key_parts: list[str],
    build: Callable[[pathlib.Path], object],
) -> pathlib.Path:
    """Return `cache_dir/name-KEY.pt2`, calling `build(path)` first if it is absent."""
    path = pathlib.Path(cache_dir) / f"{name}-{cache_key(*key_parts)}.pt2"
    if not path.exists():
        build(path)
    return path
