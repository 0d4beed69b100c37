"""Adaptive batching (scheduler/adaptive.py): waiting for fuller batches only when
measured costs say it pays, and never past the configured bound.

The queue is driven by a discrete-event simulation on a virtual clock: a runner
whose batch cost is `fixed + per_row * rows`, and requests arriving at generated
times. Exact timing, no sleeps.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Iterator
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pt2serve.scheduler.adaptive import AdaptiveWait, Contention
from pt2serve.scheduler.batches import PendingRequest
from pt2serve.scheduler.config import BatchingConfig
from pt2serve.scheduler.queue import RequestQueue

LIMIT = 32
BUCKET = (((4,), torch.float32),)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class Batch(NamedTuple):
    dispatched: float
    free_since: float  # the runner was free since
    oldest: float  # its oldest request arrived then
    rows: int


def simulate(
    loop: asyncio.AbstractEventLoop,
    arrivals: list[float],
    fixed_s: float,
    per_row_s: float,
    bound_s: float,
    contended_bound_s: float = 0.0,
    contended: Callable[[float], bool] = lambda now: False,
    *,
    think_s: float | None = None,
    answers: int = 0,
) -> tuple[list[Batch], AdaptiveWait]:
    """Serve `arrivals` (times) with one runner; returns its batches and the policy
    as it ended. `contended(now)`: whether a feeding thread is starved for CPU at
    that time. With `think_s`, a closed loop: every answered request is sent again
    `think_s` later, until `answers` have been answered."""
    contention = Contention()
    adaptive = AdaptiveWait(bound_s, LIMIT, contended_bound_s, contention)
    queue = RequestQueue("m", BatchingConfig(max_batch_size=LIMIT), True, adaptive)
    inputs = [torch.zeros(1, 4)]
    events: list[tuple[float, int, str]] = [(t, i, "arrive") for i, t in enumerate(sorted(arrivals))]
    heapq.heapify(events)
    sequence = len(events)
    free_since = 0.0
    busy = False
    running = 0
    answered = 0
    batches: list[Batch] = []
    while events and (think_s is None or answered < answers):
        now, _, kind = heapq.heappop(events)
        contention.report("probe", contended(now))
        if kind == "arrive":
            adaptive.arrived(now, busy or queue.size > 0)
            queue.push(PendingRequest(inputs, 1, BUCKET, 0, None, loop.create_future(), now))
        elif kind == "done":
            busy = False
            free_since = now
            for _ in range(running):
                adaptive.left()
                answered += 1
                if think_s is not None:
                    sequence += 1
                    heapq.heappush(events, (now + think_s, sequence, "arrive"))
        if busy:
            continue
        batch, wait = queue.take(now)
        if batch is None:
            if wait is not None:
                sequence += 1
                heapq.heappush(events, (now + wait, sequence, "timer"))
            continue
        rows = sum(r.rows for r in batch)
        cost = fixed_s + per_row_s * rows
        adaptive.ran(rows, cost)
        batches.append(Batch(now, free_since, min(r.enqueued_at for r in batch), rows))
        busy = True
        running = len(batch)
        sequence += 1
        heapq.heappush(events, (now + cost, sequence, "done"))
    assert think_s is not None or queue.size == 0  # every request was dispatched
    return batches, adaptive


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=0.004), min_size=1, max_size=300),
    fixed_s=st.floats(min_value=0.0, max_value=0.002),
    per_row_s=st.floats(min_value=0.0, max_value=0.0002),
    bound_s=st.floats(min_value=0.0, max_value=0.005),
    contended_bound_s=st.floats(min_value=0.0, max_value=0.01),
    flips=st.lists(st.floats(min_value=0.0, max_value=1.2), max_size=8),
)
def test_no_request_waits_on_a_free_runner_past_the_bound(
    loop: asyncio.AbstractEventLoop,
    gaps: list[float],
    fixed_s: float,
    per_row_s: float,
    bound_s: float,
    contended_bound_s: float,
    flips: list[float],
) -> None:
    # Contention switches on and off at the `flips` times, as a probe reports it
    # (no flips: never contended, and the bound is `bound_s`).
    arrivals = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    switches = sorted(flips)

    def contended(now: float) -> bool:
        return sum(1 for t in switches if t <= now) % 2 == 1

    batches, _ = simulate(loop, arrivals, fixed_s, per_row_s, bound_s, contended_bound_s, contended)
    longest = max(bound_s, contended_bound_s) if switches else bound_s
    for batch in batches:
        # Waiting began when both the runner was free and the request was there; the
        # scheduler's own waiting never takes a request past arrival + bound.
        assert batch.dispatched <= max(batch.free_since, batch.oldest + longest) + 1e-9


@settings(max_examples=100, deadline=None)
@given(
    fixed_s=st.floats(min_value=0.0001, max_value=0.002),
    bound_s=st.floats(min_value=0.0, max_value=0.005),
    gap_s=st.floats(min_value=0.01, max_value=1.0),
)
def test_a_lone_request_on_an_idle_server_goes_at_once(
    loop: asyncio.AbstractEventLoop, fixed_s: float, bound_s: float, gap_s: float
) -> None:
    # Requests far apart (each gap longer than any batch and the bound): none waits.
    arrivals = [i * gap_s for i in range(20)]
    batches, _ = simulate(loop, arrivals, fixed_s, 0.0, bound_s)
    assert all(b.dispatched == b.oldest for b in batches)


def test_waits_when_a_batch_costs_about_the_same_at_any_size(loop: asyncio.AbstractEventLoop) -> None:
    # A request every 50 µs; a batch costs 1 ms whatever its size: waiting pays.
    arrivals = [i * 50e-6 for i in range(2000)]
    flat, adaptive = simulate(loop, arrivals, 1e-3, 0.0, 2e-3)
    assert adaptive.hold(2, 0.0, arrivals[-1]) > 0
    # Cost proportional to rows: nothing to gain, so it never waits.
    linear, adaptive = simulate(loop, arrivals, 0.0, 60e-6, 2e-3)
    assert adaptive.hold(2, 0.0, arrivals[-1]) == 0
    assert all(b.dispatched == max(b.free_since, b.oldest) for b in linear)
    # The wait shows in fuller batches than dispatching at once gives.
    at_once, _ = simulate(loop, arrivals, 1e-3, 0.0, 0.0)
    assert len(flat) < len(at_once)


def test_hold_never_exceeds_what_is_left_of_the_bound() -> None:
    adaptive = AdaptiveWait(0.002, LIMIT)
    for i in range(50):
        adaptive.arrived(i * 1e-5, busy=True)
    for _ in range(49):  # answered, all but one: they may come again
        adaptive.left()
    adaptive.ran(1, 0.005)
    adaptive.ran(16, 0.005)
    now = 49e-5  # the last arrival
    assert 0 < adaptive.hold(1, 0.0, now) <= 0.002
    assert 0 < adaptive.hold(1, 0.0015, now) <= 0.0005 + 1e-12
    assert adaptive.hold(1, 0.002, now) == 0
    assert adaptive.hold(LIMIT, 0.0, now) == 0


def test_a_wait_ends_once_the_rows_it_expects_are_late() -> None:
    # Requests came every 10 µs; after 10 ms without one, those it would wait for are
    # late: it dispatches instead of waiting again, whatever is left of the bound.
    adaptive = AdaptiveWait(0.002, LIMIT, 0.05, Contention())
    adaptive.contention.report("probe", True)
    for i in range(50):
        adaptive.arrived(i * 1e-5, busy=True)
    for _ in range(49):
        adaptive.left()
    assert adaptive.hold(1, 0.0, 49e-5) > 0
    assert adaptive.hold(1, 0.0, 49e-5 + 0.01) == 0


def test_a_closed_loop_client_with_one_request_in_flight_never_waits(loop: asyncio.AbstractEventLoop) -> None:
    # The next request arrives only after the answer: nothing ever arrives while
    # another is out, so waiting could only add latency.
    adaptive = AdaptiveWait(0.002, LIMIT)
    queue = RequestQueue("m", BatchingConfig(max_batch_size=LIMIT), True, adaptive)
    now = 0.0
    for _ in range(500):
        adaptive.arrived(now, busy=False)
        queue.push(PendingRequest([torch.zeros(1, 4)], 1, BUCKET, 0, None, loop.create_future(), now))
        batch, wait = queue.take(now)
        assert batch is not None and wait is None
        cost = 1e-3  # the same whatever the size: waiting would pay if anyone came
        adaptive.ran(len(batch), cost)
        adaptive.ran(LIMIT, cost)
        adaptive.left()
        now += cost + 50e-6  # answered, then the client sends its next request


def test_contention_fills_batches_a_free_runner_would_send_at_once(loop: asyncio.AbstractEventLoop) -> None:
    # A request every 500 µs, batches that take 100 µs whatever their size: the
    # runner is free when each request comes, so nothing arrives while another is
    # out, and the uncontended rule sends every request alone.
    arrivals = [i * 500e-6 for i in range(400)]
    calm, _ = simulate(loop, arrivals, 100e-6, 0.0, 1e-3, 5e-3)
    assert all(b.dispatched == b.oldest for b in calm)
    # A starved feeding thread: every batch takes CPU from it, so the runner waits
    # (up to 5 ms) for the rows that keep coming, as many as it has seen at once
    # lately (a burst of 16 at the start).
    burst = [0.0] * 16 + arrivals[1:]
    starved, _ = simulate(loop, burst, 100e-6, 0.0, 1e-3, 5e-3, lambda now: True)
    assert len(burst) / len(starved) >= 8
    assert all(b.dispatched - b.oldest <= 5e-3 + 1e-9 for b in starved)
    # Without the burst, no more than one request was ever there at once: as with
    # clients that each wait for their answer, nothing more can be expected.
    alone, _ = simulate(loop, arrivals, 100e-6, 0.0, 1e-3, 5e-3, lambda now: True)
    assert all(b.dispatched == b.oldest for b in alone)
    # contended_delay_us = 0 turns the longer wait off.
    off, _ = simulate(loop, arrivals, 100e-6, 0.0, 1e-3, 0.0, lambda now: True)
    assert all(b.dispatched == b.oldest for b in off)


def closed_loop(
    loop: asyncio.AbstractEventLoop, clients: int, contended_bound_s: float
) -> tuple[float, list[int]]:
    """`clients` that each keep one request in flight, sending the next 1 ms after
    each answer, served by one runner whose batches cost 100 µs whatever their size,
    under CPU contention (the longer bound applies); returns (answers per second,
    batch sizes)."""
    batches, _ = simulate(
        loop,
        [0.0] * clients,
        100e-6,
        0.0,
        1e-3,
        contended_bound_s,
        lambda now: True,
        think_s=1e-3,
        answers=2000,
    )
    return sum(b.rows for b in batches) / batches[-1].dispatched, [b.rows for b in batches]


@pytest.mark.parametrize("clients", [2, 8, 24])
def test_a_closed_loop_is_not_held_for_requests_that_cannot_come(
    loop: asyncio.AbstractEventLoop, clients: int
) -> None:
    # Under contention the runner waits up to 10 ms for rows that keep coming; but a
    # fixed population of clients sends no more once all its requests are queued.
    # Batches of 100 µs whatever their size, clients that answer after 1 ms.
    at_once, sizes_at_once = closed_loop(loop, clients, contended_bound_s=0.0)
    bounded, sizes = closed_loop(loop, clients, contended_bound_s=10e-3)
    assert bounded >= 0.9 * at_once
    # ...while still batching what is there, at least as fully as without a wait.
    assert sum(sizes[10:]) / len(sizes[10:]) >= sum(sizes_at_once[10:]) / len(sizes_at_once[10:])


def test_contention_is_reported_per_source() -> None:
    contention = Contention()
    contention.report("front end 1", True)
    contention.report("front end 2", True)
    contention.report("front end 1", False)
    assert contention.contended
    contention.report("front end 2", False)
    assert not contention.contended
