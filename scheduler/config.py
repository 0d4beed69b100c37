"""What a served model is: `ModelConfig`, and how its requests batch: `BatchingConfig`.

Durations are whole microseconds everywhere a user sets them (config files, the
native API, KServe's model config), so every protocol converts them by copying.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pt2serve.loader import defaults
from pt2serve.loader.errors import InvalidInput, shown
from pt2serve.loader.schema import ModelSchema


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    # Rows per batch; 0 fits it to the package (`fit_batching`).
    max_batch_size: int = 0
    # How long an idle runner waits for a fuller batch (0: dispatch at once).
    max_queue_delay_us: int = 0
    # Without a fixed delay: the most an idle runner may wait for a fuller batch when
    # measured batch costs say waiting pays (scheduler/adaptive.py); 0: never.
    adaptive_delay_us: int = 1000
    # The same, while a thread that feeds the scheduler is starved for CPU (a front
    # end's event loop, or this process's): then every batch's fixed cost takes CPU
    # from it, and a longer wait pays (scheduler/adaptive.py); 0: no longer wait.
    contended_delay_us: int = 10000
    # Requests waiting in the queue, all priorities together.
    max_queue_size: int = 1024
    # Applied when a request sets no timeout (0: the caller's deadline only).
    default_timeout_us: int = 0
    priority_levels: int = 2
    # With more rows waiting than a batch holds, cut batches at these sizes.
    preferred_batch_sizes: tuple[int, ...] = ()
    # A request with more rows than this is refused; above max_batch_size it is
    # split into several batches and reassembled (0: max_batch_size).
    max_rows_per_request: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise InvalidInput(f"max_batch_size must not be negative, got {self.max_batch_size}")
        if self.max_queue_size < 1:
            raise InvalidInput(f"max_queue_size must be at least 1, got {self.max_queue_size}")
        if self.priority_levels < 1:
            raise InvalidInput(f"priority_levels must be at least 1, got {self.priority_levels}")
        delays = (
            self.max_queue_delay_us,
            self.default_timeout_us,
            self.adaptive_delay_us,
            self.contended_delay_us,
        )
        if min(delays) < 0:
            raise InvalidInput(
                "max_queue_delay, adaptive_delay, contended_delay and default_timeout must not be negative"
            )
        if self.max_rows_per_request < 0:
            raise InvalidInput("max_rows_per_request must not be negative")
        if any(s < 1 or s > (self.max_batch_size or s) for s in self.preferred_batch_sizes):
            raise InvalidInput("preferred_batch_sizes must lie in 1..max_batch_size")

    @property
    def row_limit(self) -> int:
        return self.max_rows_per_request or self.max_batch_size

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_us / 1e6

    @property
    def default_timeout_s(self) -> float | None:
        return self.default_timeout_us / 1e6 if self.default_timeout_us else None


def fit_batching(schema: ModelSchema, given: BatchingConfig | None) -> BatchingConfig:
    """Fit a batching config to what the package can run."""
    given = given or BatchingConfig()
    if not schema.batched:
        return replace(given, max_batch_size=1, max_rows_per_request=0, preferred_batch_sizes=())
    bound = schema.max_rows
    size = given.max_batch_size or min(bound or defaults.MAX_BATCH, defaults.MAX_BATCH)
    if bound is not None and size > bound:
        raise InvalidInput(f"max_batch_size {size} exceeds the package's bound of {bound} rows")
    if any(p > size for p in given.preferred_batch_sizes):
        raise InvalidInput(f"preferred_batch_sizes must not exceed max_batch_size {size}")
    return replace(given, max_batch_size=size)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    package_path: str
    model_name: str = defaults.MODEL_NAME
    run_single_threaded: bool = False
    num_runners: int = defaults.NUM_RUNNERS
    device_indices: tuple[int, ...] = defaults.DEVICE_INDICES
    schema: ModelSchema | None = None
    batching: BatchingConfig | None = None  # None: defaults sized from the schema
    runtime: str = defaults.RUNTIME
    # Run one batch of zeros at load (like Triton's model warmup): the first client
    # does not pay the cold start, and outputs the package does not describe get
    # their dtype and shape from it.
    warmup: bool = True
    # Weights to serve from the start instead of the compiled ones (a .safetensors or
    # torch.save file with every constant), and their label: a replica added to a
    # fleet starts with the fleet's current weights.
    weights: str | None = None
    weights_label: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidInput("model name must not be empty")
        if not self.package_path:
            raise InvalidInput(f"model {shown(self.name)}: package_path must not be empty")
        if self.num_runners < 1:
            raise InvalidInput(f"model {shown(self.name)}: num_runners must be at least 1")
        if self.run_single_threaded and self.num_runners != 1:
            raise InvalidInput(
                f"model {shown(self.name)}: run_single_threaded runs one runner per device; "
                f"num_runners must be 1, got {self.num_runners}"
            )
        if not self.device_indices:
            raise InvalidInput(f"model {shown(self.name)}: device_indices must not be empty")

    @property
    def runners_per_device(self) -> int:
        return 1 if self.run_single_threaded else self.num_runners
