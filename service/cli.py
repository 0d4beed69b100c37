"""`pt2serve` command line: serve, build, infer, inspect."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import torch

from pt2serve.loader import defaults
from pt2serve.loader.dtypes import DTYPES
from pt2serve.loader.errors import InvalidInput, Pt2ServeError
from pt2serve.loader.package import load_metadata_from_package, read_package_sources, resolve_schema
from pt2serve.loader.schema import ModelSchema
from pt2serve.scheduler.config import ModelConfig
from pt2serve.service.config import (
    DEFAULT_GRPC_PORT,
    DEFAULT_METRICS_PORT,
    SERVER_KEYS,
    configure,
    default_frontends,
    frontends_value,
    intra_op_threads_value,
    parse_model_flag,
)
from pt2serve.service.security import TOKEN_ENV, read_token
from pt2serve.service.tensors import DEFAULT_MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from pt2serve.service.client import Pt2ServeClient

log = logging.getLogger("pt2serve")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # A supervising `serve` starts its children with the same arguments.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result: int = args.func(args)
        return result
    except Pt2ServeError as exc:
        print(f"pt2serve: error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"pt2serve: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pt2serve", description="Serve AOTInductor .pt2 packages over gRPC."
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve models (the demo model when none is given)")
    serve.add_argument("--model", action="append", default=[], metavar="NAME=PATH.pt2", help="repeatable")
    serve.add_argument("--config", metavar="FILE.toml", help="server and model configuration")
    serve.add_argument("--host", help="listen address (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--grpc-port", type=int, help=f"default {DEFAULT_GRPC_PORT}; 0 picks a free port")
    serve.add_argument("--metrics-port", type=int, help=f"default {DEFAULT_METRICS_PORT}; 0 disables")
    serve.add_argument("--max-message-mb", type=int, help=f"default {DEFAULT_MAX_MESSAGE_BYTES >> 20}")
    serve.add_argument("--num-runners", type=int, default=1, help="runners per --model (default 1)")
    serve.add_argument(
        "--management-token-file", help=f"require this bearer token for management RPCs (or set ${TOKEN_ENV})"
    )
    serve.add_argument("--tls-cert", dest="tls_cert_file", help="serve TLS with this certificate ...")
    serve.add_argument("--tls-key", dest="tls_key_file", help="... and this private key")
    serve.add_argument(
        "--tls-client-ca",
        dest="tls_client_ca_file",
        help="require client certificates signed by this CA (mutual TLS)",
    )
    serve.add_argument(
        "--frontends",
        type=frontends_value,
        help="gRPC front-end processes before one engine process; 0: one process; "
        "default auto: one per CPU, at most 8 (README, Processes)",
    )
    serve.add_argument(
        "--intra-op-threads",
        type=intra_op_threads_value,
        help="threads per model operator (OpenMP, MKL); default auto: the CPUs the event "
        "loops leave, at least 1, unless $OMP_NUM_THREADS is set (README, Processes)",
    )
    serve.add_argument(
        "--drain-delay-s",
        type=float,
        help="on SIGTERM, serve on this long after turning NOT_SERVING, before closing "
        "connections (default 0; the Kubernetes manifests set 5)",
    )
    serve.add_argument("--drain-grace-s", type=float, help="then, how long calls in progress get to finish")
    serve.add_argument("--role", choices=["engine", "frontend"], help=argparse.SUPPRESS)
    serve.add_argument("--run-dir", help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    build = sub.add_parser("build", help="export and compile a module into a .pt2 package")
    build.add_argument("factory", metavar="MODULE:FACTORY", help="a callable returning an nn.Module")
    build.add_argument(
        "--example-input",
        action="append",
        required=True,
        metavar="NAME=D0,D1,..[:DTYPE]",
        help="one per forward argument, in order (dtype default float32)",
    )
    build.add_argument("-o", "--output", required=True, metavar="PATH.pt2")
    build.add_argument(
        "--max-batch",
        type=int,
        default=defaults.MAX_BATCH,
        help=f"upper bound of the batch dim (default {defaults.MAX_BATCH})",
    )
    build.add_argument("--no-batch", action="store_true", help="the model has no batch dimension")
    build.add_argument(
        "--static-batch",
        type=int,
        metavar="B",
        help="compile at exactly B rows; the server pads smaller batches",
    )
    build.add_argument("--output-names", help="comma-separated names of the outputs")
    build.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    build.set_defaults(func=_build)

    infer = sub.add_parser("infer", help="send one request and print the outputs")
    _connection_flags(infer)
    infer.add_argument("--model", required=True)
    infer.add_argument(
        "--input", action="append", default=[], metavar="NAME=FILE.npy|random", help="repeatable"
    )
    infer.add_argument("--rows", type=int, default=1, help="rows for random inputs (default 1)")
    infer.add_argument("--seed", type=int, default=0, help="seed for random inputs")
    infer.add_argument("--save", metavar="DIR", help="also write each output to DIR/NAME.npy")
    infer.add_argument("--timeout", type=float, default=30.0, help="seconds")
    infer.set_defaults(func=_infer)

    from pt2serve.service.cli_constants import add_constants_parser

    add_constants_parser(sub, _connection_flags).set_defaults(func=_constants)

    inspect = sub.add_parser("inspect", help="show a package's metadata and schema without loading it")
    inspect.add_argument("path")
    inspect.add_argument("--model-name", default=defaults.MODEL_NAME)
    inspect.set_defaults(func=_inspect)
    return parser


def _connection_flags(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    if several:
        parser.add_argument(
            "--targets",
            required=True,
            help="every replica: H1:P1,H2:P2 (IP addresses) or dns:///name:port (each address of the name)",
        )
    else:
        parser.add_argument(
            "--target",
            default=f"127.0.0.1:{DEFAULT_GRPC_PORT}",
            help="the server: host:port; several replicas as H1:P1,H2:P2 (IP addresses) or "
            "dns:///name:port, balanced round robin and retried on UNAVAILABLE",
        )
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system CAs unless --tls-ca)")
    parser.add_argument("--tls-ca", help="CA certificate that signed the server's certificate")
    parser.add_argument("--tls-cert", help="client certificate, for mutual TLS")
    parser.add_argument("--tls-key", help="client private key, for mutual TLS")
    parser.add_argument(
        "--token-file", help=f"management token (default: ${TOKEN_ENV}); needed to load models or weights"
    )


def _client(args: argparse.Namespace) -> Pt2ServeClient:
    from pt2serve.service.client import Pt2ServeClient

    return Pt2ServeClient(args.target, **client_options(args))


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """TLS and token flags as Pt2ServeClient options."""
    return {
        "tls": args.tls,
        "ca_file": args.tls_ca,
        "cert_file": args.tls_cert,
        "key_file": args.tls_key,
        "token": read_token(args.token_file),
    }


# ---------------------------------------------------------------------- serve
def _serve(args: argparse.Namespace) -> int:
    # The serve flags carry the config file's key names (dest), so the file and the
    # flags are read by one table: service.config.SERVER_KEYS.
    config = configure(args.config, {k: v for k, v in vars(args).items() if k in SERVER_KEYS})
    models = list(config.models)
    for flag in args.model:
        name, path = parse_model_flag(flag)
        models.append(ModelConfig(name=name, package_path=config.resolve(path), num_runners=args.num_runners))
    frontends = default_frontends() if config.frontends is None else config.frontends
    loads_models = args.role == "engine" or (args.role is None and frontends == 0)
    if not models and loads_models:
        from pt2serve.service.demo import demo_package

        log.info("no model given: serving the bundled demo model as 'demo' (first run compiles it)")
        models.append(
            ModelConfig(name="demo", package_path=str(demo_package()), num_runners=args.num_runners)
        )
    config = dataclasses.replace(config, models=tuple(models))
    with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
        if args.role is not None:
            from pt2serve.service.supervisor import run_engine, run_frontend

            child = run_engine if args.role == "engine" else run_frontend
            runner.run(child(config, pathlib.Path(args.run_dir)))
        elif frontends > 0:
            from pt2serve.service.supervisor import supervise

            return runner.run(supervise(config, args.argv, frontends))
        else:
            from pt2serve.service.supervisor import run_server

            runner.run(run_server(config))
    return 0


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop a serving process runs on: uvloop (libuv; a dependency on
    Linux) unless `choice` is "asyncio" or uvloop is not installed ("auto")."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise InvalidInput("event_loop = 'uvloop', but uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def tune_process(gil_switch_interval_us: int, gc_gen0_threshold: int) -> None:
    """The process settings of a serving process (see ServerConfig); call once the
    long-lived objects (models, server) exist."""
    if gil_switch_interval_us > 0:
        sys.setswitchinterval(gil_switch_interval_us / 1e6)
    if gc_gen0_threshold > 0:
        gc.freeze()
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gc_gen0_threshold, gen1, gen2)


# ---------------------------------------------------------------------- build
def _build(args: argparse.Namespace) -> int:
    from pt2serve.loader.build import build_package, import_factory

    sys.path.insert(0, str(pathlib.Path.cwd()))
    module = import_factory(args.factory)()
    examples = dict(_example_input(spec) for spec in args.example_input)
    metadata = dict(_key_value(item, "--metadata") for item in args.metadata)
    schema = build_package(
        module,
        examples,
        args.output,
        batched=not args.no_batch,
        max_batch_size=args.max_batch,
        static_batch=args.static_batch,
        output_names=args.output_names.split(",") if args.output_names else None,
        metadata=metadata,
    )
    print(f"wrote {args.output}")
    _print_schema(schema)
    return 0


def _example_input(spec: str) -> tuple[str, torch.Tensor]:
    name, shape_dtype = _key_value(spec, "--example-input")
    shape_text, _, dtype_name = shape_dtype.partition(":")
    dtype = DTYPES.get(dtype_name or "float32")
    if dtype is None:
        raise SystemExit(f"--example-input {spec!r}: unknown dtype; choose from {', '.join(DTYPES)}")
    shape = [int(d) for d in shape_text.split(",") if d]
    return name, _random(shape, dtype, torch.Generator().manual_seed(0))


def _key_value(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"{flag} takes KEY=VALUE, got {item!r}")
    return key, value


def _random(shape: Sequence[int], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=generator).bool()
    if dtype.is_floating_point:
        return torch.randn(tuple(shape), generator=generator).to(dtype)
    return torch.randint(0, 10, tuple(shape), generator=generator, dtype=dtype)


# ---------------------------------------------------------------------- infer
def _infer(args: argparse.Namespace) -> int:
    from pt2serve.service.convert import schema_from_pb

    with _client(args) as client:
        status = {m.name: m for m in client.list_models()}.get(args.model)
        if status is None:
            raise SystemExit(f"model {args.model!r} is not served at {args.target}")
        schema = schema_from_pb(status.schema)
        assert schema is not None
        generator = torch.Generator().manual_seed(args.seed)
        given = dict(_key_value(item, "--input") for item in args.input)
        inputs: dict[str, torch.Tensor] = {}
        for spec in schema.inputs:
            source = given.pop(spec.name, "random")
            if source == "random":
                inputs[spec.name] = _random_for(schema, spec.name, args.rows, generator)
            else:
                inputs[spec.name] = torch.from_numpy(np.load(source))
        if given:
            raise SystemExit(f"unknown input {next(iter(given))!r}; inputs: {', '.join(schema.input_names)}")
        outputs = client.infer(args.model, inputs, timeout_s=args.timeout)
    torch.set_printoptions(precision=6, sci_mode=False)  # type: ignore[no-untyped-call]
    for name, tensor in outputs.items():
        print(f"{name}: {str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}")
        print(tensor)
        if args.save:
            pathlib.Path(args.save).mkdir(parents=True, exist_ok=True)
            np.save(pathlib.Path(args.save, f"{name}.npy"), tensor.numpy())
    return 0


def _random_for(schema: ModelSchema, name: str, rows: int, generator: torch.Generator) -> torch.Tensor:
    spec = next(s for s in schema.inputs if s.name == name)
    if spec.dims is None or spec.dtype is None:
        raise SystemExit(f"input {name!r} has no known shape: give it as {name}=FILE.npy")
    shape = [d.size if d.size is not None else max(d.min, 1) for d in spec.dims]
    if schema.batched:
        shape[0] = rows
    return _random(shape, DTYPES[spec.dtype], generator)


# ------------------------------------------------------------------ constants
def _constants(args: argparse.Namespace) -> int:
    from pt2serve.service.cli_constants import constants_command, rollout_command

    if args.action == "rollout":
        return rollout_command(args, client_options(args))
    with _client(args) as client:
        return constants_command(client, args)


# -------------------------------------------------------------------- inspect
def _inspect(args: argparse.Namespace) -> int:
    metadata = load_metadata_from_package(args.path, args.model_name)
    print(f"package: {args.path}")
    print("metadata:")
    for key in sorted(metadata):
        value = metadata[key]
        print(f"  {key}: {value if len(value) < 120 else value[:117] + '...'}")
    schema = resolve_schema(args.path, args.model_name, metadata, None)
    _print_schema(schema)
    source = read_package_sources(args.path, args.model_name)
    if source is not None:
        from pt2serve.loader.schema import constants_from_wrapper

        constants = constants_from_wrapper(source)
        print(f"constants ({len(constants)}):")
        for spec in constants.values():
            print(f"  {spec.fqn} ({spec.internal_name}): {spec.dtype}{list(spec.shape)}")
    return 0


def _print_schema(schema: ModelSchema) -> None:
    rows = f", at most {schema.max_rows} rows per run" if schema.max_rows else ""
    print(f"schema ({schema.source}; {'batched on dim 0' if schema.batched else 'not batched'}{rows}):")
    for spec in schema.inputs:
        print(f"  input  {spec.describe()}")
    for spec in schema.outputs:
        print(f"  output {spec.describe()}")


if __name__ == "__main__":
    sys.exit(main())
