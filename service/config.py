"""Server configuration: one typed, frozen value, assembled once (`configure`) from a
TOML file and command-line flags. Each key is declared once, in a table that names
its field and how its value is read; flags use the same key names."""

from __future__ import annotations

import os
import pathlib
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pt2serve.loader.errors import AccessDenied, InvalidInput, shown
from pt2serve.loader.schema import ModelSchema
from pt2serve.scheduler.config import BatchingConfig, ModelConfig
from pt2serve.service.tensors import DEFAULT_MAX_MESSAGE_BYTES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_GRPC_PORT = 8500
DEFAULT_METRICS_PORT = 8502
DEFAULT_MAX_TENSOR_BYTES = 1 << 30
EVENT_LOOPS = ("auto", "asyncio", "uvloop")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    grpc_port: int = DEFAULT_GRPC_PORT
    # 0 disables the metrics endpoint.
    metrics_port: int = DEFAULT_METRICS_PORT
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Relative package paths (flags, config, LoadModel) resolve against this.
    model_root: str = "."
    # Shutdown (service/shutdown.py): on SIGTERM the server turns NOT_SERVING and
    # serves on for drain_delay_s (long enough for a Kubernetes endpoint removal to
    # reach every node and client); then GOAWAY, and the calls in progress get
    # drain_grace_s to finish.
    drain_delay_s: float = 0.0
    drain_grace_s: float = 10.0
    # Python's GIL switch interval for the process. Runner threads need the GIL for
    # a moment before and after each batch; at the default 5 ms they wait behind
    # the event loop, and batches stall (measured: half the throughput at 64
    # requests in flight). 0 keeps Python's default.
    gil_switch_interval_us: int = 200
    # Allocations between young-generation garbage collections (Python's default is
    # 700: at thousands of requests a second the collector runs hundreds of times a
    # second). Objects alive once the models are loaded are frozen out of collection.
    # 0 keeps Python's default.
    gc_gen0_threshold: int = 20_000
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
    # "auto": uvloop when installed (it is a dependency on Linux), else asyncio's
    # default loop; "asyncio" or "uvloop" to choose.
    event_loop: str = "auto"
    # gRPC front-end processes in front of one engine process (service/supervisor.py);
    # 0 serves everything from one process; None: `default_frontends()` for this machine.
    frontends: int | None = None
    # Threads each model call may use for one operator (OpenMP and MKL): its intra-op
    # threads. None: `default_intra_op_threads()`, the CPUs the serving processes'
    # event loops leave free, unless $OMP_NUM_THREADS is set.
    intra_op_threads: int | None = None
    # With front ends: while the engine has nothing in flight, a thread reads their
    # connections and runs a lone request at once (service/intake.py), instead of
    # the event loop queueing it for a runner thread. false: the loop always reads.
    engine_intake: bool = True
    models: tuple[ModelConfig, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.event_loop not in EVENT_LOOPS:
            raise InvalidInput(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise InvalidInput("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise InvalidInput("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.frontends is not None and self.frontends < 0:
            raise InvalidInput(f"frontends must be 0 (one process), more, or 'auto'; got {self.frontends}")
        if self.intra_op_threads is not None and self.intra_op_threads < 1:
            raise InvalidInput(f"intra_op_threads must be 1 or more, or 'auto'; got {self.intra_op_threads}")
        if self.drain_delay_s < 0 or self.drain_grace_s < 0:
            raise InvalidInput("drain_delay_s and drain_grace_s must not be negative")
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


def default_frontends(cpus: int | None = None) -> int:
    """Front ends for `frontends = "auto"`: one per CPU this process may use, at most 8;
    one process (0) on a single CPU. Measured on 2 CPUs over twenty-two runs (README,
    Processes; docs/performance.md), two front ends answered the overhead-bound demo
    model at 0.82-1.17x the null server, one front end at 0.70-1.00x and one process
    at 0.44-0.79x; a lone request took between 0.57 ms less and 0.21 ms more behind
    two than behind one."""
    cpus = usable_cpus() if cpus is None else cpus
    return 0 if cpus < 2 else min(8, cpus)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, and a container's CPU limit (cgroup
    v2 `cpu.max`, which Kubernetes sets from the pod's limit), whichever is fewer."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = pathlib.Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def count_or_auto(key: str, value: Any) -> int | None:
    """The setting `key`: a count, or "auto" (None)."""
    if value in (None, "auto"):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{key} must be a count or 'auto', got {value!r}") from None


def frontends_value(value: Any) -> int | None:
    return count_or_auto("frontends", value)


def intra_op_threads_value(value: Any) -> int | None:
    return count_or_auto("intra_op_threads", value)


def default_intra_op_threads(frontends: int, cpus: int | None = None) -> int:
    """Intra-op threads for `intra_op_threads = "auto"`: the CPUs this process may use
    (`usable_cpus`: a container's CPU limit counts, which torch's own default, the
    machine's cores, ignores) less one per event loop that serves requests: each
    front end's, or the single process's. At least one.

    A model's operators otherwise spread over every core and then wait at each
    barrier for the thread that a front end holds up. Measured on 2 CPUs with two
    front ends, in two runs (docs/performance.md, "Fifth round"): with one thread
    rather than two, the compute-bound model answered 3-15 % more requests a second
    at 5-15 % less CPU per request, and a lone request 0.24-0.49 ms sooner."""
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, cpus - max(1, frontends))


def parse_model_flag(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise InvalidInput(f"--model takes NAME=PATH.pt2, got {value!r}")
    return name, path


# A key's reader: (value, directory relative paths resolve against) -> field value.
Reader = Callable[[Any, pathlib.Path], Any]


def _path(value: Any, base: pathlib.Path) -> str:
    return str((base / os.path.expanduser(str(value))).resolve())


def _megabytes(value: Any, base: pathlib.Path) -> int:
    """MiB, fractions allowed (0.5 is 512 KiB)."""
    return int(float(value) * (1 << 20))


def _as(kind: Callable[[Any], Any]) -> Reader:
    return lambda value, base: kind(value)


# [server] keys (and the flags of the same names): key -> (ServerConfig field, reader).
SERVER_KEYS: dict[str, tuple[str, Reader]] = {
    "host": ("host", _as(str)),
    "grpc_port": ("grpc_port", _as(int)),
    "metrics_port": ("metrics_port", _as(int)),
    "max_message_mb": ("max_message_bytes", _megabytes),
    "model_root": ("model_root", _path),
    "drain_delay_s": ("drain_delay_s", _as(float)),
    "drain_grace_s": ("drain_grace_s", _as(float)),
    "gil_switch_interval_us": ("gil_switch_interval_us", _as(int)),
    "gc_gen0_threshold": ("gc_gen0_threshold", _as(int)),
    "max_connection_age_s": ("max_connection_age_s", _as(float)),
    "max_connection_age_grace_s": ("max_connection_age_grace_s", _as(float)),
    "max_tensor_mb": ("max_tensor_bytes", _megabytes),
    "max_concurrent_streams": ("max_concurrent_streams", _as(int)),
    "management_token_file": ("management_token_file", _path),
    "tls_cert_file": ("tls_cert_file", _path),
    "tls_key_file": ("tls_key_file", _path),
    "tls_client_ca_file": ("tls_client_ca_file", _path),
    "event_loop": ("event_loop", _as(str)),
    "frontends": ("frontends", lambda value, base: frontends_value(value)),
    "intra_op_threads": ("intra_op_threads", lambda value, base: intra_op_threads_value(value)),
    "engine_intake": ("engine_intake", _as(bool)),
}
MODEL_KEYS: dict[str, tuple[str, Reader]] = {
    "name": ("name", _as(str)),
    "path": ("package_path", _path),
    "model_name": ("model_name", _as(str)),
    "run_single_threaded": ("run_single_threaded", _as(bool)),
    "num_runners": ("num_runners", _as(int)),
    "devices": ("device_indices", lambda value, base: tuple(int(d) for d in value)),
    "schema": ("schema", lambda value, base: ModelSchema.from_json(_read(base / value), source="user")),
    "runtime": ("runtime", _as(str)),
    "warmup": ("warmup", _as(bool)),
    "weights": ("weights", _path),
    "weights_label": ("weights_label", _as(str)),
}
# [models.batching]: durations in microseconds, as in the API; the _ms names of
# earlier releases are still read.
BATCHING_KEYS: dict[str, tuple[str, Reader]] = {
    "max_batch_size": ("max_batch_size", _as(int)),
    "max_queue_delay_us": ("max_queue_delay_us", _as(int)),
    "adaptive_delay_us": ("adaptive_delay_us", _as(int)),
    "contended_delay_us": ("contended_delay_us", _as(int)),
    "max_queue_delay_ms": ("max_queue_delay_us", lambda value, base: round(float(value) * 1000)),
    "max_queue_size": ("max_queue_size", _as(int)),
    "default_timeout_us": ("default_timeout_us", _as(int)),
    "default_timeout_ms": ("default_timeout_us", lambda value, base: round(float(value) * 1000)),
    "priority_levels": ("priority_levels", _as(int)),
    "preferred_batch_sizes": ("preferred_batch_sizes", lambda value, base: tuple(int(s) for s in value)),
    "max_rows_per_request": ("max_rows_per_request", _as(int)),
}


def configure(
    file: str | os.PathLike[str] | None = None, flags: Mapping[str, Any] | None = None
) -> ServerConfig:
    """The server's configuration: the file's [server] table and [[models]], then the
    flags (keyed like [server]; None means not given) on top. Relative paths in the
    file resolve against its directory (models against model_root); in flags,
    against the working directory."""
    table: dict[str, Any] = {}
    entries: list[Any] = []
    base = pathlib.Path.cwd()
    if file is not None:
        path = pathlib.Path(file)
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInput(f"cannot read config {str(path)!r}: {exc}") from exc
        table = _table(raw, "server", str(path))
        entries = list(raw.get("models", []))
        base = path.parent.resolve()
    values = _read_table(table, SERVER_KEYS, base, "[server]")
    values.setdefault("model_root", str(base))
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    values.update(_read_table(given, SERVER_KEYS, pathlib.Path.cwd(), "flags"))
    root = pathlib.Path(values["model_root"])
    models = tuple(_model(entry, i, root) for i, entry in enumerate(entries))
    return ServerConfig(**values, models=models)


def load_config(path: str | os.PathLike[str]) -> ServerConfig:
    """Read a TOML config file (see deploy/config.example.toml)."""
    return configure(path)


def _model(entry: Any, index: int, root: pathlib.Path) -> ModelConfig:
    where = f"[[models]] #{index + 1}"
    if not isinstance(entry, dict):
        raise InvalidInput(f"{where} must be a table")
    for key in ("name", "path"):
        if key not in entry:
            raise InvalidInput(f"{where}: {key!r} is required")
    batching = entry.pop("batching", None)
    values = _read_table(entry, MODEL_KEYS, root, where)
    if batching is not None:
        if not isinstance(batching, dict):
            raise InvalidInput(f"{where}.batching must be a table")
        values["batching"] = BatchingConfig(**_read_table(batching, BATCHING_KEYS, root, f"{where}.batching"))
    return ModelConfig(**values)


def _read_table(
    table: Mapping[str, Any], keys: Mapping[str, tuple[str, Reader]], base: pathlib.Path, where: str
) -> dict[str, Any]:
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise InvalidInput(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(keys))}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        name, read = keys[key]
        try:
            values[name] = read(value, base)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"{where}: {key} = {shown(value)} is not valid: {exc}") from exc
    return values


def _read(path: pathlib.Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read {str(path)!r}: {exc}") from exc


def _table(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: [{key}] must be a table")
    return value
