"""Server configuration: one typed, frozen value built from flags or a TOML file."""

from __future__ import annotations

import os
import pathlib
import tomllib
from dataclasses import dataclass, field
from typing import Any

from pt2serve.loader.errors import AccessDenied, InvalidInput, shown
from pt2serve.loader.schema import ModelSchema
from pt2serve.scheduler.batcher import BatchingConfig
from pt2serve.scheduler.manager import ModelConfig

DEFAULT_HOST = "127.0.0.1"
DEFAULT_GRPC_PORT = 8500
DEFAULT_DRAIN_GRACE_S = 10.0
DEFAULT_GIL_SWITCH_INTERVAL_US = 200
DEFAULT_GC_GEN0_THRESHOLD = 20_000
DEFAULT_MAX_TENSOR_BYTES = 1 << 30
DEFAULT_METRICS_PORT = 8502
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    grpc_port: int = DEFAULT_GRPC_PORT
    # 0 disables the metrics endpoint.
    metrics_port: int = DEFAULT_METRICS_PORT
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Relative package paths (flags, config, LoadModel) resolve against this.
    model_root: str = "."
    # How long queued requests get to finish on shutdown.
    drain_grace_s: float = DEFAULT_DRAIN_GRACE_S
    # Python's GIL switch interval for the process. Runner threads need the GIL for
    # a moment before and after each batch; at the default 5 ms they wait behind
    # the event loop, and batches stall (measured: half the throughput at 64
    # requests in flight). 0 keeps Python's default.
    gil_switch_interval_us: int = DEFAULT_GIL_SWITCH_INTERVAL_US
    # Allocations between young-generation garbage collections (Python's default is
    # 700: at thousands of requests a second the collector runs hundreds of times a
    # second). Objects alive once the models are loaded are frozen out of collection.
    # 0 keeps Python's default.
    gc_gen0_threshold: int = DEFAULT_GC_GEN0_THRESHOLD
    # Close client connections after this long (0: never), so clients behind a
    # per-connection load balancer reconnect and spread over new replicas. Calls
    # in progress get max_connection_age_grace_s to finish.
    max_connection_age_s: float = 0.0
    max_connection_age_grace_s: float = 30.0
    # Limits, each refused with a clear status: one tensor's bytes (inputs and
    # constants), concurrent calls per client connection (0: gRPC's default, no limit;
    # calls beyond a limit are refused with UNAVAILABLE, so size it above the
    # concurrency of your largest client).
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    max_concurrent_streams: int = 0
    # Security: the management token (file, else $PT2SERVE_MANAGEMENT_TOKEN) and TLS.
    # With tls_client_ca_file, clients must present a certificate it signed (mTLS).
    management_token_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    models: tuple[ModelConfig, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise InvalidInput("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise InvalidInput("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.max_tensor_bytes < 1 or self.max_concurrent_streams < 0:
            raise InvalidInput("max_tensor_mb must be positive and max_concurrent_streams not negative")
        if self.gil_switch_interval_us < 0 or self.gc_gen0_threshold < 0:
            raise InvalidInput(
                "gil_switch_interval_us and gc_gen0_threshold must not be negative (0: Python's default)"
            )

    def resolve(self, path: str) -> str:
        """A path the operator gave (flags, config): relative ones join model_root."""
        if not path:
            raise InvalidInput("package_path must not be empty")
        return str(pathlib.Path(self.model_root, os.path.expanduser(path)).resolve())

    def confine(self, path: str, field: str = "package_path") -> str:
        """A path a client gave (RPCs): resolved under model_root, symlinks followed;
        anything that ends up outside the root is refused."""
        if not path:
            raise InvalidInput(f"{field} must not be empty")
        if "\0" in path:
            raise InvalidInput(f"{field} {shown(path)} contains a NUL byte")
        root = pathlib.Path(self.model_root).resolve()
        target = (root / path).resolve()
        if target != root and root not in target.parents:
            raise AccessDenied(f"{field} {shown(path)} is outside the server's model root")
        return str(target)


def parse_model_flag(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise InvalidInput(f"--model takes NAME=PATH.pt2, got {value!r}")
    return name, path


def load_config(path: str | os.PathLike[str]) -> ServerConfig:
    """Read a TOML config file (see deploy/config.example.toml)."""
    file = pathlib.Path(path)
    try:
        raw = tomllib.loads(file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"cannot read config {str(file)!r}: {exc}") from exc
    server = _table(raw, "server", str(file))
    _reject_unknown(
        server,
        {
            "host",
            "grpc_port",
            "metrics_port",
            "max_message_mb",
            "model_root",
            "drain_grace_s",
            "gil_switch_interval_us",
            "gc_gen0_threshold",
            "max_connection_age_s",
            "max_connection_age_grace_s",
            "max_tensor_mb",
            "max_concurrent_streams",
            "management_token_file",
            "tls_cert_file",
            "tls_key_file",
            "tls_client_ca_file",
        },
        "[server]",
    )
    root = str((file.parent / server.get("model_root", ".")).resolve())
    models = tuple(_model(entry, i, root) for i, entry in enumerate(raw.get("models", [])))
    return ServerConfig(
        host=server.get("host", DEFAULT_HOST),
        grpc_port=int(server.get("grpc_port", DEFAULT_GRPC_PORT)),
        metrics_port=int(server.get("metrics_port", DEFAULT_METRICS_PORT)),
        max_message_bytes=int(server.get("max_message_mb", DEFAULT_MAX_MESSAGE_BYTES >> 20)) << 20,
        model_root=root,
        drain_grace_s=float(server.get("drain_grace_s", DEFAULT_DRAIN_GRACE_S)),
        gil_switch_interval_us=int(server.get("gil_switch_interval_us", DEFAULT_GIL_SWITCH_INTERVAL_US)),
        gc_gen0_threshold=int(server.get("gc_gen0_threshold", DEFAULT_GC_GEN0_THRESHOLD)),
        max_connection_age_s=float(server.get("max_connection_age_s", 0.0)),
        max_connection_age_grace_s=float(server.get("max_connection_age_grace_s", 30.0)),
        max_tensor_bytes=int(server.get("max_tensor_mb", DEFAULT_MAX_TENSOR_BYTES >> 20)) << 20,
        max_concurrent_streams=int(server.get("max_concurrent_streams", 0)),
        management_token_file=_path(file, server.get("management_token_file")),
        tls_cert_file=_path(file, server.get("tls_cert_file")),
        tls_key_file=_path(file, server.get("tls_key_file")),
        tls_client_ca_file=_path(file, server.get("tls_client_ca_file")),
        models=models,
    )


_BATCHING_DEFAULTS = BatchingConfig()
_MODEL_KEYS = {
    "name",
    "path",
    "model_name",
    "run_single_threaded",
    "num_runners",
    "devices",
    "schema",
    "batching",
    "runtime",
    "warmup",
}
_BATCHING_KEYS = {
    "max_batch_size",
    "max_queue_delay_ms",
    "max_queue_size",
    "default_timeout_ms",
    "priority_levels",
    "preferred_batch_sizes",
    "max_rows_per_request",
}


def _model(entry: dict[str, Any], index: int, root: str) -> ModelConfig:
    where = f"[[models]] #{index + 1}"
    _reject_unknown(entry, _MODEL_KEYS, where)
    for key in ("name", "path"):
        if key not in entry:
            raise InvalidInput(f"{where}: {key!r} is required")
    schema = None
    if "schema" in entry:
        schema_path = pathlib.Path(root, entry["schema"])
        schema = ModelSchema.from_json(schema_path.read_text(), source="user")
    batching = None
    if "batching" in entry:
        b = entry["batching"]
        _reject_unknown(b, _BATCHING_KEYS, f"{where}.batching")
        timeout = b.get("default_timeout_ms")
        batching = BatchingConfig(
            max_batch_size=int(b.get("max_batch_size", 0)),
            max_queue_delay_s=float(b.get("max_queue_delay_ms", 0)) / 1e3,
            max_queue_size=int(b.get("max_queue_size", _BATCHING_DEFAULTS.max_queue_size)),
            default_timeout_s=float(timeout) / 1e3 if timeout else None,
            priority_levels=int(b.get("priority_levels", _BATCHING_DEFAULTS.priority_levels)),
            preferred_batch_sizes=tuple(int(s) for s in b.get("preferred_batch_sizes", ())),
            max_rows_per_request=int(b["max_rows_per_request"]) if b.get("max_rows_per_request") else None,
        )
    return ModelConfig(
        name=str(entry["name"]),
        package_path=str(pathlib.Path(root, entry["path"]).resolve()),
        model_name=str(entry.get("model_name", "model")),
        run_single_threaded=bool(entry.get("run_single_threaded", False)),
        num_runners=int(entry.get("num_runners", 1)),
        device_indices=tuple(int(d) for d in entry.get("devices", (-1,))),
        schema=schema,
        batching=batching,
        runtime=str(entry.get("runtime", "native")),
        warmup=bool(entry.get("warmup", True)),
    )


def _path(config_file: pathlib.Path, value: object) -> str | None:
    if value is None:
        return None
    return str((config_file.parent / str(value)).resolve())


def _table(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: [{key}] must be a table")
    return value


def _reject_unknown(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise InvalidInput(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
