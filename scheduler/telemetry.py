"""The narrow interface through which the scheduler and manager report what happens.

The service implements it with Prometheus (service/metrics.py); nothing here
imports a metrics library. Every method is called on the event-loop thread and
must return quickly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pt2serve.loader.errors import ErrorKind


class Telemetry(Protocol):
    def batch_finished(
        self,
        model: str,
        device: str,
        rows: int,
        queue_waits: Sequence[float],
        compute_seconds: float,
        ok: bool,
    ) -> None:
        """A batch ran: its rows, each request's wait in the queue, its compute time."""

    def request_finished(self, model: str, outcome: ErrorKind | None, seconds: float) -> None:
        """A request was answered (outcome None: success) `seconds` after it was accepted."""

    def request_cancelled(self, model: str, seconds: float) -> None:
        """The caller went away before its request was answered."""

    def model_loaded(self, model: str, seconds: float, ok: bool) -> None: ...

    def model_unloaded(self, model: str) -> None: ...

    def constants_updated(self, model: str, operation: str, ok: bool, seconds: float, version: int) -> None:
        """A constant operation (load_constants, update_constant_buffer, swap) ended."""


class NoTelemetry:
    """Reports nothing (unit tests, embedding without metrics)."""

    def batch_finished(
        self,
        model: str,
        device: str,
        rows: int,
        queue_waits: Sequence[float],
        compute_seconds: float,
        ok: bool,
    ) -> None:
        pass

    def request_finished(self, model: str, outcome: ErrorKind | None, seconds: float) -> None:
        pass

    def request_cancelled(self, model: str, seconds: float) -> None:
        pass

    def model_loaded(self, model: str, seconds: float, ok: bool) -> None:
        pass

    def model_unloaded(self, model: str) -> None:
        pass

    def constants_updated(self, model: str, operation: str, ok: bool, seconds: float, version: int) -> None:
        pass
