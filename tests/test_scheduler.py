"""Scheduler unit tests with a fake runner whose timing the test controls.

The runner is held back by a threading.Event (it runs in executor threads), so
tests decide exactly what is queued while a batch computes; no sleeps decide
outcomes and nothing asserts on wall-clock time.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pt2serve.loader.dtypes import TYPES, AnyTensor, RawTensor, join_raw, join_rows, rows_as_raw
from pt2serve.loader.errors import ExecutionFailed, Expired, InvalidInput, Overloaded, Unavailable
from pt2serve.scheduler.batcher import BatchingConfig, ModelScheduler, RunnerSlot, RunResult
from pt2serve.scheduler.batches import EARLY_MAX_REQUESTS

WIDTHS = (3, 5)  # two shape buckets: rows of width 3 or 5


class FakeRunner:
    """Doubles its input; records every batch; fails rows whose id is negative."""

    def __init__(self, *, hold: bool = False) -> None:
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.batches: list[list[int]] = []
        self.entered: list[list[int]] = []
        self.widths: list[set[int]] = []
        self.lock = threading.Lock()
        self.entered_changed = threading.Condition(self.lock)
        self.running = 0
        self.max_running = 0

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.entered.append([int(i) for i in inputs[0][:, 0].tolist()])
            self.entered_changed.notify_all()
        try:
            self.gate.wait(timeout=30)
            (x,) = inputs
            with self.lock:
                self.batches.append([int(i) for i in x[:, 0].tolist()])
                self.widths.append({x.shape[1]})
            if (x[:, 0] < 0).any():
                raise RuntimeError("poisoned row")
            return [x * 2, x.sum(dim=1)]
        finally:
            with self.lock:
                self.running -= 1

    def wait_entered(self, batches: int) -> None:
        """Block until `batches` batches have entered `run`; fail after 30 s."""
        with self.lock:
            if not self.entered_changed.wait_for(lambda: len(self.entered) >= batches, timeout=30):
                raise AssertionError(f"{len(self.entered)} of {batches} batches reached the runner")


def request(ident: int, rows: int = 1, width: int = 3) -> list[torch.Tensor]:
    x = torch.full((rows, width), float(ident))
    x[:, 1:] = torch.arange(rows * (width - 1), dtype=torch.float32).reshape(rows, width - 1)
    return [x]


def expected(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    (x,) = inputs
    return [x * 2, x.sum(dim=1)]


def host(outputs: Sequence[AnyTensor]) -> list[torch.Tensor]:
    """Answers as tensors: the scheduler hands them over as the batch's bytes."""
    assert all(isinstance(t, RawTensor) for t in outputs)
    return [t.tensor() if isinstance(t, RawTensor) else t for t in outputs]


def make(
    runner: FakeRunner, *, capacity: int = 1, clock: FakeClock | None = None, **config: object
) -> ModelScheduler:
    cfg = BatchingConfig(**{"max_batch_size": 8, **config})  # type: ignore[arg-type]
    kwargs = {"clock": clock} if clock else {}
    scheduler = ModelScheduler("m", [RunnerSlot(runner, capacity)], cfg, batched=True, **kwargs)  # type: ignore[arg-type]
    scheduler.start()
    return scheduler


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def enqueue(
    scheduler: ModelScheduler, inputs: list[AnyTensor], **options: object
) -> asyncio.Future[RunResult]:
    """Queue a request now (dispatch happens inside the call): no task to wait for."""
    return scheduler.enqueue(inputs, **options)  # type: ignore[arg-type]


async def settle() -> None:
    """Run the callbacks that cancels and answers have scheduled: the loop runs every
    ready callback in one pass, and futures (not tasks) add no further steps."""
    await asyncio.sleep(0)


async def test_idle_runner_dispatches_a_lone_request_at_once() -> None:
    runner = FakeRunner()
    scheduler = make(runner, max_queue_delay_us=0)
    result = await enqueue(scheduler, request(1, rows=2))
    torch.testing.assert_close(host(result.outputs), expected(request(1, rows=2)))
    assert runner.batches == [[1, 1]]
    await scheduler.close()


async def test_queue_accumulates_while_the_runner_is_busy() -> None:
    runner = FakeRunner(hold=True)
    scheduler = make(runner)
    first = enqueue(scheduler, request(1))
    await settle()
    rest = [enqueue(scheduler, request(i)) for i in range(2, 7)]
    await settle()
    assert scheduler.queue_depth == 5 and scheduler.batches_in_flight == 1
    runner.gate.set()
    await asyncio.gather(first, *rest)
    assert runner.batches == [[1], [2, 3, 4, 5, 6]]
    await scheduler.close()


async def test_batches_respect_max_size_and_buckets() -> None:
    runner = FakeRunner(hold=True)
    scheduler = make(runner, max_batch_size=4)
    blocker = enqueue(scheduler, request(100))
    await settle()
    tasks = [enqueue(scheduler, request(i, rows=1 + i % 2, width=WIDTHS[i % 2])) for i in range(10)]
    await settle()
    runner.gate.set()
    results = await asyncio.gather(blocker, *tasks)
    for i, result in enumerate(results[1:]):
        torch.testing.assert_close(
            host(result.outputs), expected(request(i, rows=1 + i % 2, width=WIDTHS[i % 2]))
        )
    for batch, width in zip(runner.batches, runner.widths, strict=True):
        assert len(batch) <= 4 and len(width) == 1
    await scheduler.close()


async def test_full_queue_is_refused_at_once() -> None:
    runner = FakeRunner(hold=True)
    scheduler = make(runner, max_queue_size=2)
    running = enqueue(scheduler, request(1))
    await settle()
    queued = [enqueue(scheduler, request(i)) for i in (2, 3)]
    await settle()
    with pytest.raises(Overloaded, match="queue full"):
        await enqueue(scheduler, request(4))
    runner.gate.set()
    await asyncio.gather(running, *queued)
    assert 4 not in sum(runner.batches, [])
    await scheduler.close()


async def test_expired_requests_never_run() -> None:
    runner = FakeRunner(hold=True)
    clock = FakeClock()
    scheduler = make(runner, clock=clock)
    running = enqueue(scheduler, request(1))
    await settle()
    doomed = enqueue(scheduler, request(2), deadline=clock.now + 5)
    kept = enqueue(scheduler, request(3), deadline=clock.now + 50)
    await settle()
    clock.now += 10
    runner.gate.set()
    with pytest.raises(Expired, match="deadline exceeded while queued"):
        await doomed
    await asyncio.gather(running, kept)
    assert runner.batches == [[1], [3]]
    assert scheduler.queue_depth == 0
    await scheduler.close()


async def test_timeout_can_only_shorten_the_deadline() -> None:
    runner = FakeRunner(hold=True)
    clock = FakeClock()
    scheduler = make(runner, clock=clock, default_timeout_us=5_000_000)
    running = enqueue(scheduler, request(1))
    await settle()
    # A later deadline does not extend the default timeout.
    late = enqueue(scheduler, request(2), deadline=clock.now + 100)
    await settle()
    clock.now += 6
    runner.gate.set()
    with pytest.raises(Expired):
        await late
    await running
    with pytest.raises(Expired, match="before the request was queued"):
        await enqueue(scheduler, request(3), deadline=clock.now - 1)
    await scheduler.close()


async def test_cancelled_requests_never_run_and_leave_no_work() -> None:
    runner = FakeRunner(hold=True)
    scheduler = make(runner)
    running = enqueue(scheduler, request(1))
    await settle()
    victims = [enqueue(scheduler, request(i)) for i in (2, 3)]
    survivor = enqueue(scheduler, request(4))
    await settle()
    for task in victims:
        task.cancel()
    await settle()
    assert scheduler.queue_depth == 1
    runner.gate.set()
    await asyncio.gather(running, survivor)
    assert runner.batches == [[1], [4]]
    await scheduler.close()


async def test_a_failing_batch_is_retried_member_by_member() -> None:
    runner = FakeRunner(hold=True)
    scheduler = make(runner)
    first = enqueue(scheduler, request(1))
    await settle()
    good = [enqueue(scheduler, request(i)) for i in (2, 3)]
    bad = enqueue(scheduler, request(-5))
    await settle()
    runner.gate.set()
    await asyncio.gather(first, *good)
    with pytest.raises(ExecutionFailed, match="poisoned row"):
        await bad
    # The mixed batch failed once, then each member ran alone.
    assert runner.batches[1] == [2, 3, -5] and sorted(runner.batches[2:]) == [[-5], [2], [3]]
    assert host((await enqueue(scheduler, request(9))).outputs)[0][0, 0] == 18
    await scheduler.close()


async def test_higher_priority_goes_first() -> None:
    runner = FakeRunner(hold=True)
    scheduler = make(runner, max_batch_size=1)
    running = enqueue(scheduler, request(1))
    await settle()
    low = enqueue(scheduler, request(2), priority=1)
    high = enqueue(scheduler, request(3), priority=0)
    await settle()
    runner.gate.set()
    await asyncio.gather(running, low, high)
    assert runner.batches == [[1], [3], [2]]
    with pytest.raises(InvalidInput, match="priority 2 out of range"):
        await enqueue(scheduler, request(4), priority=2)
    await scheduler.close()


async def test_large_requests_are_split_and_reassembled() -> None:
    runner = FakeRunner()
    scheduler = make(runner, max_batch_size=4, max_rows_per_request=10)
    inputs = request(7, rows=10)
    result = await enqueue(scheduler, inputs)
    torch.testing.assert_close(host(result.outputs), expected(inputs))
    assert [len(b) for b in runner.batches] == [4, 4, 2]
    with pytest.raises(InvalidInput, match="too many rows: 11"):
        await enqueue(scheduler, request(7, rows=11))
    await scheduler.close()


def test_received_bytes_join_and_split_without_torch_on_the_loop() -> None:
    x = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    raw = as_received(x)
    parts = [raw.row_slice(0, 2), raw.row_slice(2, 5), raw.row_slice(5, 9)]
    assert [p.shape for p in parts] == [(2, 4), (3, 4), (1, 4)]
    joined = join_rows(parts)
    assert torch.equal(joined, x)
    joined[0, 0] = -1.0  # writable, as the runtime may need: a copy, not a view
    assert torch.equal(parts[0].tensor()[0], x[0]) and raw.tensor()[0, 0] == 0.0


@given(
    dtype=st.sampled_from([t.torch for t in TYPES]),
    rows=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    tail=st.lists(st.integers(0, 3), max_size=2),
)
def test_answers_are_cut_from_the_batch_as_bytes(
    dtype: torch.dtype, rows: list[int], tail: list[int]
) -> None:
    batch = (torch.randn(sum(rows), *tail) * 100).to(dtype)
    parts = rows_as_raw(batch, rows)
    start = 0
    for count, part in zip(rows, parts, strict=True):
        assert isinstance(part, RawTensor) and part.shape == (count, *tail)
        assert torch.equal(part.tensor(), batch[start : start + count])
        start += count
    assert torch.equal(join_raw(parts).tensor(), batch)


def test_answers_the_wire_cannot_carry_stay_tensors_for_the_encoder_to_refuse() -> None:
    batch = torch.zeros(3, 2, dtype=torch.complex64)
    parts = rows_as_raw(batch, [1, 2])
    assert [type(p) for p in parts] == [torch.Tensor, torch.Tensor]
    assert [tuple(p.shape) for p in parts] == [(1, 2), (2, 2)]


class RecordingSink:
    """An AnswerSink that records what runner threads put, and where; it refuses the
    keys in `refuse` (the loop answers those), and `put` waits for `gate`."""

    def __init__(self, refuse: frozenset[int] = frozenset()) -> None:
        self.refuse = refuse
        self.puts: dict[int, list[RunResult]] = {}
        self.threads: set[int] = set()
        self.flushes = 0
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def put(self, key: int, result: RunResult) -> bool:
        self.entered.set()
        self.gate.wait(timeout=30)
        self.puts.setdefault(key, []).append(result)
        self.threads.add(threading.get_ident())
        return key not in self.refuse

    def flush(self) -> None:
        self.flushes += 1


async def test_a_small_batch_is_answered_by_its_runner_thread() -> None:
    runner = FakeRunner(hold=True)
    scheduler = make(runner)
    sink = RecordingSink(refuse=frozenset({3}))
    first = enqueue(scheduler, request(1), early=(sink, 1))
    await settle()
    rest = [enqueue(scheduler, request(i), early=(sink, i)) for i in (2, 3)]
    plain = enqueue(scheduler, request(4))
    await settle()
    runner.gate.set()
    results = await asyncio.gather(first, *rest, plain)
    assert runner.batches == [[1], [2, 3, 4]]
    # 1 finished while the others waited: the loop, which starts the next batch,
    # answers it. 4 has no sink.
    assert sorted(sink.puts) == [2, 3]
    assert threading.get_ident() not in sink.threads  # never on the loop
    assert sink.flushes == 1  # once a batch that put something
    for key, result in zip((1, 2, 3, 4), results, strict=True):
        torch.testing.assert_close(host(result.outputs), expected(request(key)))
        if key in sink.puts:
            (put,) = sink.puts[key]
            assert put.outputs == result.outputs
        # Delivered: the loop must not answer again; refused or without a sink: it must.
        assert result.delivered == (key == 2)
    alone = await enqueue(scheduler, request(5), early=(sink, 5))
    assert alone.delivered and sink.puts[5][0].outputs == alone.outputs
    await scheduler.close()


async def test_a_big_batch_is_answered_from_the_loop() -> None:
    runner = FakeRunner(hold=True)
    scheduler = make(runner, max_batch_size=16)
    sink = RecordingSink()
    first = enqueue(scheduler, request(0))
    await settle()
    many = [enqueue(scheduler, request(i), early=(sink, i)) for i in range(1, EARLY_MAX_REQUESTS + 2)]
    await settle()
    runner.gate.set()
    results = await asyncio.gather(first, *many)
    assert len(runner.batches) == 2 and len(runner.batches[1]) == EARLY_MAX_REQUESTS + 1
    assert not sink.puts and not any(r.delivered for r in results)
    await scheduler.close()


async def test_a_deadline_passing_after_the_runner_took_the_answer_does_not_expire_it() -> None:
    runner = FakeRunner()
    clock = FakeClock()  # the runner's deadline check reads it: it never sees the deadline pass
    scheduler = make(runner, clock=clock)
    sink = RecordingSink()
    sink.gate.clear()
    expired = asyncio.Event()
    expire = scheduler._expire

    def spy(req: object) -> None:
        expire(req)  # type: ignore[arg-type]
        expired.set()

    scheduler._expire = spy  # type: ignore[method-assign]
    future = enqueue(scheduler, request(1), timeout_s=0.05, early=(sink, 1))
    await asyncio.to_thread(sink.entered.wait, 30)  # the runner thread took the answer
    await expired.wait()  # and then the deadline's timer ran on the loop
    sink.gate.set()
    result = await future
    assert result.delivered and sink.puts[1][0].outputs == result.outputs
    await scheduler.close()


async def test_preferred_batch_sizes_cut_batches() -> None:
    runner = FakeRunner(hold=True)
    scheduler = make(runner, max_batch_size=8, preferred_batch_sizes=(4,))
    first = enqueue(scheduler, request(0))
    await settle()
    rest = [enqueue(scheduler, request(i)) for i in range(1, 7)]
    await settle()
    runner.gate.set()
    await asyncio.gather(first, *rest)
    assert [len(b) for b in runner.batches] == [1, 4, 2]
    await scheduler.close()


async def test_queue_delay_holds_a_partial_batch_until_it_fills() -> None:
    runner = FakeRunner()
    scheduler = make(runner, max_batch_size=3, max_queue_delay_us=60_000_000)
    tasks = [enqueue(scheduler, request(i)) for i in range(3)]
    # Full at three rows: dispatched without waiting out the delay.
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    assert runner.batches == [[0, 1, 2]]
    await scheduler.close()


async def test_two_runner_slots_run_two_batches_at_once() -> None:
    runner = FakeRunner(hold=True)
    scheduler = make(runner, capacity=2, max_batch_size=1)
    tasks = [enqueue(scheduler, request(i)) for i in range(4)]
    assert scheduler.batches_in_flight == 2 and scheduler.queue_depth == 2
    await asyncio.to_thread(runner.wait_entered, 2)  # both inside the runner at once
    assert runner.running == 2
    runner.gate.set()
    await asyncio.gather(*tasks)
    assert runner.max_running == 2
    await scheduler.close()


async def test_exclusive_waits_for_running_batches_and_blocks_new_ones() -> None:
    runner = FakeRunner(hold=True)
    scheduler = make(runner)
    running = enqueue(scheduler, request(1))
    await settle()
    seen: list[int] = []

    def update() -> str:
        seen.append(runner.running)
        return "done"

    update_task = asyncio.ensure_future(scheduler.exclusive(update, bump_version=True))
    await settle()  # its first step pauses dispatch and waits for the running batch
    queued = enqueue(scheduler, request(2))
    await settle()
    assert not update_task.done() and scheduler.queue_depth == 1
    runner.gate.set()
    assert await update_task == "done"
    first, second = await asyncio.gather(running, queued)
    assert seen == [0]
    assert first.constants_version == 0 and second.constants_version == 1
    await scheduler.close()


async def test_close_drains_then_refuses() -> None:
    runner = FakeRunner(hold=True)
    scheduler = make(runner)
    running = enqueue(scheduler, request(1))
    await settle()
    queued = enqueue(scheduler, request(2))
    await settle()
    closing = asyncio.ensure_future(scheduler.close(grace_s=0.0))
    # Closing refuses what is still queued while the runner is held.
    await asyncio.wait([queued], timeout=30)
    assert queued.done() and not closing.done()
    runner.gate.set()
    await closing
    assert isinstance(await running, RunResult)
    with pytest.raises(Unavailable):
        await queued
    with pytest.raises(Unavailable):
        await enqueue(scheduler, request(3))


# ------------------------------------------------------------------ properties
request_plan = st.tuples(
    st.integers(1, 4),  # rows
    st.sampled_from(WIDTHS),  # bucket
    st.integers(0, 1),  # priority
    st.sampled_from(["ok", "ok", "ok", "cancel", "expire", "poison"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plans=st.lists(request_plan, min_size=1, max_size=25),
    max_batch=st.integers(1, 8),
    capacity=st.integers(1, 2),
    delay=st.sampled_from([0.0, 0.001]),
    raw_every=st.sampled_from([0, 1, 2]),
    sink_every=st.sampled_from([0, 1, 2]),
)
def test_every_request_is_answered_exactly_once(
    plans: list[tuple[int, int, int, str]],
    max_batch: int,
    capacity: int,
    delay: float,
    raw_every: int,
    sink_every: int,
) -> None:
    """`raw_every`: which requests arrive as received bytes (RawTensor), as from a
    decoder or the engine's frames: none, all, or every other one (mixed batches).
    `sink_every`: which ones a runner thread may answer itself (an AnswerSink, as
    the engine gives), the same way."""
    asyncio.run(_check_invariants(plans, max_batch, capacity, delay, raw_every, sink_every))


def as_received(tensor: torch.Tensor) -> RawTensor:
    return RawTensor(tensor.dtype, tuple(tensor.shape), memoryview(tensor.numpy().tobytes()))


async def _check_invariants(
    plans: list[tuple[int, int, int, str]],
    max_batch: int,
    capacity: int,
    delay: float,
    raw_every: int,
    sink_every: int = 0,
) -> None:
    runner = FakeRunner(hold=True)
    clock = FakeClock()
    scheduler = make(
        runner,
        capacity=capacity,
        clock=clock,
        max_batch_size=max_batch,
        max_rows_per_request=8,
        max_queue_delay_us=round(delay * 1e6),
    )
    inputs = {}
    tasks = {}
    sink = RecordingSink(refuse=frozenset(range(3, len(plans) + 1, 3)))
    with_sink = set()
    for ident, (rows, width, priority, fate) in enumerate(plans, start=1):
        key = -ident if fate == "poison" else ident
        inputs[key] = request(key, rows=rows, width=width)
        sent: list[AnyTensor] = list(inputs[key])
        if raw_every and ident % raw_every == 0:
            sent = [as_received(t) for t in sent]
        deadline = clock.now + (1 if fate == "expire" else 1e6)
        early = None
        if sink_every and ident % sink_every == 0:
            early = (sink, key)
            with_sink.add(key)
        tasks[key] = enqueue(scheduler, sent, priority=priority, deadline=deadline, early=early)
    # Every dispatched batch must reach the runner, so that `started` is exact.
    await asyncio.to_thread(runner.wait_entered, scheduler.batches_in_flight)
    with runner.lock:
        started = {i for batch in runner.entered for i in batch}
    fates = {(-i if p[3] == "poison" else i): p[3] for i, p in enumerate(plans, start=1)}
    cancelled = [tasks[key] for key, fate in fates.items() if fate == "cancel"]
    for task in cancelled:
        task.cancel()
    if cancelled:
        # Withdrawn before the clock moves: a batching delay's timer, due once the clock
        # has moved, must not find them still queued.
        await asyncio.wait(cancelled)
    clock.now += 2  # every "expire" deadline passes while it waits
    runner.gate.set()
    results = await asyncio.gather(*tasks.values(), return_exceptions=True)
    executed = {i for batch in runner.batches for i in batch}
    for (key, fate), result in zip(fates.items(), results, strict=True):
        if fate == "cancel" and key not in started:
            assert isinstance(result, asyncio.CancelledError)
            assert key not in executed
        elif fate == "expire" and key not in started:
            assert isinstance(result, Expired), result
            assert key not in executed
        elif fate == "poison":
            assert isinstance(result, ExecutionFailed)
        elif fate == "ok":
            assert isinstance(result, RunResult), result
            torch.testing.assert_close(host(result.outputs), expected(inputs[key]))
    for batch, widths in zip(runner.batches, runner.widths, strict=True):
        assert len(batch) <= max_batch
        assert len(widths) == 1
    # Answered early exactly when allowed: once, off the loop, with the answer the
    # future got; never for a withdrawn, expired, failed or split request.
    assert threading.get_ident() not in sink.threads
    failed = {i for batch in runner.batches if min(batch) < 0 for i in batch}
    early_batches = [set(b) for b in runner.batches if min(b) > 0 and len(set(b)) <= EARLY_MAX_REQUESTS]
    rows = {key: inputs[key][0].shape[0] for key in inputs}
    for (key, fate), result in zip(fates.items(), results, strict=True):
        puts = sink.puts.get(key, [])
        assert len(puts) <= 1
        eligible = (
            key in with_sink
            and fate == "ok"
            and rows[key] <= max_batch
            and key not in failed
            and any(key in b for b in early_batches)
        )
        if fate in ("cancel", "expire", "poison") or key not in with_sink:
            assert not puts, (key, fate)
        # (and only when nothing waited as the batch finished: not known here)
        assert eligible or not puts, (key, fate)
        if puts:
            assert isinstance(result, RunResult) and puts[0].outputs == result.outputs
            assert result.delivered == (key not in sink.refuse)
        elif isinstance(result, RunResult):
            assert not result.delivered
    assert scheduler.queue_depth == 0
    await scheduler.close()


async def test_a_flooded_model_does_not_hold_up_another() -> None:
    """Models share the event loop, not queues or runner threads: with one model's
    runner stuck and its queue full, another model's requests are still answered."""
    stuck = FakeRunner(hold=True)
    flooded = make(stuck, max_queue_size=32)
    backlog = [enqueue(flooded, request(i)) for i in range(33)]
    await settle()
    assert flooded.batches_in_flight == 1 and flooded.queue_depth == 32
    with pytest.raises(Overloaded):
        flooded.enqueue(request(99))
    other = make(FakeRunner())
    answers = await asyncio.wait_for(
        asyncio.gather(*(enqueue(other, request(i)) for i in range(20))), timeout=30
    )
    for i, answer in enumerate(answers):
        torch.testing.assert_close(host(answer.outputs), expected(request(i)))
    assert flooded.queue_depth == 32 and not any(task.done() for task in backlog)
    stuck.gate.set()
    await asyncio.gather(*backlog)
    await flooded.close()
    await other.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uvloop is a dependency on Linux")
def test_batching_timers_work_on_uvloop() -> None:
    # uvloop answers a timer due within 1 ms with a plain Handle (no when()); the
    # engine and front ends run on uvloop. Each request arrives while a batching
    # delay under 1 ms is armed, then waits for it.
    import uvloop

    async def main() -> list[list[int]]:
        runner = FakeRunner()
        scheduler = make(runner, max_queue_delay_us=300)
        futures = [enqueue(scheduler, request(i)) for i in range(3)]
        results = await asyncio.gather(*futures)
        for i, result in enumerate(results):
            assert all(
                torch.equal(a, b) for a, b in zip(host(result.outputs), expected(request(i)), strict=True)
            )
        late = await enqueue(scheduler, request(7))  # a timer again, after the first ran
        assert torch.equal(host(late.outputs)[0], expected(request(7))[0])
        await scheduler.close()
        return runner.batches

    batches = uvloop.run(main())
    assert sorted(i for batch in batches for i in batch) == [0, 1, 2, 7]


async def test_run_alone_runs_only_what_the_queue_would_start_at_once() -> None:
    runner = FakeRunner()
    scheduler = make(runner, priority_levels=2)
    options: dict[str, object] = {"priority": 0, "timeout_s": None, "deadline": None}
    ran = await asyncio.to_thread(scheduler.run_alone, request(3), **options)  # type: ignore[arg-type]
    assert ran is not None
    outputs, version, compute = ran
    assert [torch.equal(a, b) for a, b in zip(host(outputs), expected(request(3)), strict=True)] == [
        True,
        True,
    ]
    assert version == 0 and compute > 0
    scheduler.ran_alone(1, compute, None)
    assert (scheduler.stats.batches, scheduler.stats.requests) == (1, 1)
    # What `enqueue` would refuse or hold is left to it.
    refused = [
        (request(4), {**options, "priority": 2}),  # no such priority
        (request(4, rows=9), options),  # more rows than a batch
        (request(4), {**options, "deadline": scheduler._clock() - 1}),  # expired
        (request(4), {**options, "timeout_s": 0.0}),
    ]
    for inputs, these in refused:
        assert await asyncio.to_thread(scheduler.run_alone, inputs, **these) is None  # type: ignore[arg-type]
    # Nor while a batch runs.
    runner.gate.clear()
    running = enqueue(scheduler, request(5))
    await asyncio.to_thread(runner.wait_entered, 2)
    assert await asyncio.to_thread(scheduler.run_alone, request(6), **options) is None  # type: ignore[arg-type]
    runner.gate.set()
    await running
    assert runner.batches == [[3], [5]]
    await scheduler.close()


async def test_run_alone_waits_for_no_update_and_updates_wait_for_it() -> None:
    runner = FakeRunner(hold=True)
    scheduler = make(runner)
    options: dict[str, object] = {"priority": 0, "timeout_s": None, "deadline": None}
    alone = asyncio.ensure_future(asyncio.to_thread(scheduler.run_alone, request(1), **options))  # type: ignore[arg-type]
    await asyncio.to_thread(runner.wait_entered, 1)
    seen: list[int] = []

    def update() -> str:
        seen.append(runner.running)
        return "done"

    updating = asyncio.ensure_future(scheduler.exclusive(update, bump_version=True))
    await settle()
    # A second run alone does not start beside the first, nor while an update waits.
    assert await asyncio.to_thread(scheduler.run_alone, request(2), **options) is None  # type: ignore[arg-type]
    assert not updating.done() and seen == []
    runner.gate.set()
    ran = await alone
    assert ran is not None and ran[1] == 0  # ran on the constants it started with
    assert await updating == "done" and seen == [0]
    ran = await asyncio.to_thread(scheduler.run_alone, request(3), **options)  # type: ignore[arg-type]
    assert ran is not None and ran[1] == 1
    # Closing waits for a run alone, and none starts once it has begun.
    runner.gate.clear()
    alone = asyncio.ensure_future(asyncio.to_thread(scheduler.run_alone, request(4), **options))  # type: ignore[arg-type]
    await asyncio.to_thread(runner.wait_entered, 3)
    closing = asyncio.ensure_future(scheduler.close())
    # (A check that something does not happen: it gets half a second to.)
    await asyncio.wait([closing], timeout=0.5)
    assert not closing.done()
    runner.gate.set()
    await closing
    assert (await alone) is not None
    assert await asyncio.to_thread(scheduler.run_alone, request(5), **options) is None  # type: ignore[arg-type]
