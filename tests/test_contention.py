"""The CPU-starvation probe (service/contention.py): its verdicts, with hysteresis,
and the per-thread numbers it reads from Linux."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from pt2serve.service.contention import (
    BUSY,
    BUSY_OFF,
    QUEUED,
    QUEUED_OFF,
    WAITING,
    StarvationProbe,
    read_schedstat,
)


def test_starved_when_the_thread_wants_a_cpu_all_the_time_or_waits_long_for_one() -> None:
    heard: list[bool] = []
    probe = StarvationProbe(heard.append)
    # 1 in flight, 4 in flight (measured shares on 2 CPUs): idle now and then, and
    # the waits for a CPU short.
    assert not probe.judge(0.57, 0.07)
    assert not probe.judge(0.85, 0.11)
    assert not probe.judge(0.68, 0.23)
    # A compute-bound model at 64 in flight: idle moments, but a third of the time
    # waiting for a CPU that the model's threads hold.
    assert probe.judge(0.86, 0.43)
    assert probe.judge(QUEUED, QUEUED)
    # Busy all the time on a CPU of its own (a big machine): nothing to gain.
    assert not probe.judge(0.99, 0.01)
    # 64 in flight on 2 CPUs: starved.
    assert probe.judge(0.98, 0.14)
    assert probe.judge(BUSY, WAITING)


def test_once_starved_it_stays_so_while_the_thread_has_no_idle_time_or_waits_long() -> None:
    probe = StarvationProbe(lambda starved: None)
    probe.starved = True
    # Longer batching waits take load off the CPUs: less waiting, still no idle time.
    assert probe.judge(0.97, 0.0)
    assert probe.judge(BUSY_OFF, 0.0)
    assert probe.judge(0.5, QUEUED_OFF)
    assert not probe.judge(BUSY_OFF - 0.01, QUEUED_OFF - 0.01)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's schedstat")
def test_schedstat_counts_the_thread_s_own_cpu_time() -> None:
    probe = StarvationProbe(lambda starved: None)
    assert probe.available
    path = f"/proc/self/task/{threading.get_native_id()}/schedstat"
    on_cpu, waiting = read_schedstat(path)
    spent = time.thread_time_ns()
    while time.thread_time_ns() - spent < 20_000_000:  # 20 ms of this thread's CPU
        pass
    later_on_cpu, later_waiting = read_schedstat(path)
    assert later_on_cpu - on_cpu >= 15_000_000
    assert later_waiting >= waiting
