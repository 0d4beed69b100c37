"""One weight set across a fleet of replicas, in two phases (`pt2serve constants rollout`).

1. Stage: every replica stages the weights in its inactive buffer (`use_inactive`),
   all at once. If any replica refuses or fails, what was staged is discarded on
   every replica, and the fleet keeps serving the weights it had.
2. Swap: every replica swaps, all at once; a failed swap is tried again, and replicas
   that still did not switch are reported.

Requests keep flowing throughout: a replica serves either weight set, never a mix
(staging does not touch the served buffer; a swap happens between batches). During the
swap phase, which takes about one batch, replicas differ in which set they serve.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from pt2serve.service.client import ArrayLike, Pt2ServeClient, channel_target

T = TypeVar("T")
SWAP_ATTEMPTS = 3
SWAP_BACKOFF_S = 0.5


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """What one replica serves (or why it could not be asked)."""

    address: str
    version: int | None = None
    label: str | None = None
    error: str = ""


@dataclass(slots=True)
class RolloutReport:
    # The phase the rollout ended in: "staged" failed and was undone, or "swapped".
    phase: str
    # Per replica, what went wrong in the phase that failed.
    errors: dict[str, str] = field(default_factory=dict)
    # What each replica serves afterwards.
    replicas: list[ReplicaState] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def not_switched(self) -> list[str]:
        return sorted(self.errors) if self.phase == "swapped" else [r.address for r in self.replicas]


def replica_addresses(targets: str | Sequence[str]) -> list[str]:
    """Every replica of `targets`: addresses (a list, comma-separated, or an `ipv4:` /
    `ipv6:` target) or a `dns:///name:port` target, resolved to each of its addresses
    (a Kubernetes headless Service resolves to every ready pod)."""
    target = channel_target(targets)
    scheme, _, rest = target.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return rest.split(",")
    if scheme == "dns":
        name = rest.lstrip("/").split("/")[-1]  # dns:///name:port or dns://server/name:port
        host, _, port = name.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{targets!r}: a dns target needs a port, as dns:///name:port")
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        addresses = {str(info[4][0]) for info in infos}
        return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in sorted(addresses)]
    return [target]


def check(targets: str | Sequence[str], model: str, **client_options: Any) -> list[ReplicaState]:
    """The constants version and label each replica serves for `model`."""
    addresses = replica_addresses(targets)

    def state(address: str) -> ReplicaState:
        try:
            with _client(address, client_options) as client:
                for status in client.list_models():
                    if status.name == model:
                        return ReplicaState(address, status.constants_version, status.constants_label)
                return ReplicaState(address, error=f"model {model!r} is not served")
        except grpc.RpcError as exc:
            return ReplicaState(address, error=_describe(exc))

    return _on_each(addresses, state)


def rollout(
    targets: str | Sequence[str],
    model: str,
    *,
    label: str,
    file: str | None = None,
    constants: Mapping[str, ArrayLike] | None = None,
    full: bool = True,
    swap_attempts: int = SWAP_ATTEMPTS,
    **client_options: Any,
) -> RolloutReport:
    """Roll one weight set out to every replica of `targets`: `file` (a path each
    replica reads under its own model root) or `constants` (uploaded to each).
    `full`: every constant of the model must be given (a swap needs all of them)."""
    if (file is None) == (constants is None):
        raise ValueError("give the weights as file or as constants, not both")
    addresses = replica_addresses(targets)

    def stage(address: str) -> str:
        try:
            with _client(address, client_options) as client:
                if file is not None:
                    client.load_constants_from_file(
                        model, file, use_inactive=True, check_full_update=full, label=label
                    )
                else:
                    assert constants is not None
                    client.load_constants(
                        model, constants, use_inactive=True, check_full_update=full, label=label
                    )
            return ""
        except grpc.RpcError as exc:
            return _describe(exc)

    staged = dict(zip(addresses, _on_each(addresses, stage), strict=True))
    refused = {a: e for a, e in staged.items() if e}
    if refused:

        def discard(address: str) -> None:
            try:
                with _client(address, client_options) as client:
                    client.discard_staged_constants(model)
            except grpc.RpcError:
                pass  # unreachable: nothing staged there can be swapped in by this rollout

        _on_each(addresses, discard)
        return RolloutReport("staged", refused, check(addresses, model, **client_options))

    def swap(address: str) -> str:
        error = ""
        for attempt in range(swap_attempts):
            if attempt:
                time.sleep(SWAP_BACKOFF_S * attempt)
            try:
                with _client(address, client_options) as client:
                    client.swap_constants(model)
                return ""
            except grpc.RpcError as exc:
                error = _describe(exc)
        return f"{error} (after {swap_attempts} attempts)"

    swapped = dict(zip(addresses, _on_each(addresses, swap), strict=True))
    failed = {a: e for a, e in swapped.items() if e}
    return RolloutReport("swapped", failed, check(addresses, model, **client_options))


def _client(address: str, options: Mapping[str, Any]) -> Pt2ServeClient:
    # One replica, exactly: no balancing and no retries to elsewhere.
    return Pt2ServeClient(address, service_config=None, **options)


def _on_each(addresses: Sequence[str], fn: Callable[[str], T]) -> list[T]:
    """`fn(address)` for every replica at once; results in address order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(addresses), 32) or 1) as pool:
        return list(pool.map(fn, addresses))


def _describe(exc: grpc.RpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"
