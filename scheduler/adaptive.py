"""`AdaptiveWait`: how long a free runner waits for a fuller batch, from measured
batch costs (the idea of Clipper's adaptive batching and TF Serving's batch timeout,
without a constant per model).

It learns two things as the model serves:
- what a batch costs: running averages of rows and seconds per power-of-two bucket
  of batch sizes (1, 2-3, 4-7, ...), fitted to `fixed + per_row * rows`. The
  seconds are the batch's whole turn as the scheduler sees it (thread hand-offs
  included), not only the model's compute;
- how fast requests arrive *while others are still waiting or running*: a running
  average of the gaps between arrivals, times the share of arrivals that found the
  scheduler busy. A closed-loop client with one request in flight never arrives
  while its own request is out, so it counts for nothing: waiting for it would only
  add latency.

When a runner is free and the queue holds fewer rows than a batch can, it waits
(never past `bound_s` since the oldest request arrived) only if
- at least one more request is expected meanwhile: a lone request on an idle
  server goes at once; and
- the fitted cost per row of the fuller batch is at least 10 % lower (`GAIN`):
  waiting buys throughput only when a batch's cost grows slower than its size
  (a fixed part per batch: kernel launches, thread hand-offs, Python).
It waits just long enough for the rows it expects, counted from the last arrival
(once they are late it waits no more), and never for more requests than can still
arrive: the most requests that were at the scheduler at once lately (queued or
running; the larger of this window's and the last window's peak), less those there
now. Clients that keep a fixed number of requests in flight (a closed loop) send no
more than that: once all of theirs are queued, waiting longer only holds them
(docs/performance.md, "Ninth round": 8 requests in flight, two front ends, 0.52× the
null server's rate before these two bounds, 0.65× with them, 0.71× never waiting).

Until batches of two different sizes have been measured it does not wait; sizes
vary with load by themselves (the queue grows while a runner is busy).

**Under CPU contention** (`Contention.contended`: a thread that feeds the scheduler,
a front end's event loop or this process's own, wants a CPU all the time and waits
for one part of it, or waits for one a third of the time) the rule changes.
Requests then queue in front of the starved thread, where the scheduler cannot see
them, and every batch the scheduler runs takes CPU from it: the fixed part of a
batch's cost (the scheduler's own Python, thread hand-offs) is paid by everyone,
whatever the fitted wall time says. So every arrival counts towards the rate, not
only those that found others out, the fit is not consulted, and the wait may last
up to `contended_bound_s` (default 10 ms), still only as long as the rows expected
meanwhile need. Measured on 2 CPUs (docs/performance.md): a 5 ms wait behind a
starved front end raised throughput by a quarter; a 10 ms bound gave the
compute-bound model batches of 25 rows instead of 14 and took a tenth off the CPU per
request; without contention, a closed loop of a few clients would only lose by it,
and the rule above holds.
"""

from __future__ import annotations

# Wait only for at least this much less cost per row.
GAIN = 0.9
# Weight of the newest sample in the running averages.
ALPHA = 0.2
# A shorter wait is not worth a timer (its wakeup costs about as much), and waits
# that shrink towards zero near the bound must end.
MIN_WAIT_S = 50e-6
# The peak of requests present is kept per window of this length; the larger of the
# current and the previous window's counts.
PEAK_WINDOW_S = 1.0


class Contention:
    """Whether a thread that feeds the schedulers is starved for CPU: each source (an
    event loop, a front end) reports what the operating system says of it
    (service/contention.py); every model's AdaptiveWait reads `contended`."""

    __slots__ = ("contended", "_starved")

    def __init__(self) -> None:
        self.contended = False
        self._starved: set[object] = set()

    def report(self, source: object, starved: bool) -> None:
        if starved:
            self._starved.add(source)
        else:
            self._starved.discard(source)
        self.contended = bool(self._starved)


class AdaptiveWait:
    def __init__(
        self,
        bound_s: float,
        limit: int,
        contended_bound_s: float = 0.0,
        contention: Contention | None = None,
    ) -> None:
        self.bound_s = bound_s
        self.limit = limit
        self.contended_bound_s = contended_bound_s
        self.contention = contention or Contention()
        # bucket -> (average rows, average seconds)
        self._batches: dict[int, tuple[float, float]] = {}
        # fixed seconds per batch, seconds per row; None until two sizes are known
        self.fit: tuple[float, float] | None = None
        # Running average of the gaps between all arrivals.
        self._gap_s: float | None = None
        self._last_arrival: float | None = None
        # Share of arrivals that found other requests queued or running.
        self._overlap = 0.0
        # Requests at the scheduler now (arrived and not yet left), and the most at
        # once in this window and the one before it.
        self.present = 0
        self._peak = 0
        self._peak_before = 0
        self._window_ends = PEAK_WINDOW_S

    def arrived(self, now: float, busy: bool) -> None:
        """A request arrived at `now` (the scheduler's clock); `busy`: others were
        queued or running then. It is present until `left`."""
        if self._last_arrival is not None:
            gap = max(now - self._last_arrival, 0.0)
            self._gap_s = gap if self._gap_s is None else self._gap_s + ALPHA * (gap - self._gap_s)
        self._last_arrival = now
        self._overlap += ALPHA * ((1.0 if busy else 0.0) - self._overlap)
        self.present += 1
        if now >= self._window_ends:
            self._peak_before = self._peak if now < self._window_ends + PEAK_WINDOW_S else 0
            self._peak = 0
            self._window_ends = now + PEAK_WINDOW_S
        self._peak = max(self._peak, self.present)

    def left(self) -> None:
        """A request that `arrived` left the scheduler (answered, failed, withdrawn)."""
        self.present -= 1

    def ran(self, rows: int, seconds: float) -> None:
        """A batch of `rows` took `seconds` to compute."""
        bucket = max(rows, 1).bit_length() - 1
        known = self._batches.get(bucket)
        if known is None:
            self._batches[bucket] = (float(rows), seconds)
        else:
            self._batches[bucket] = (
                known[0] + ALPHA * (rows - known[0]),
                known[1] + ALPHA * (seconds - known[1]),
            )
        self.fit = _line(list(self._batches.values()))

    @property
    def rate(self) -> float:
        """Requests per second that arrive while others are out, lately (0 before two
        have arrived)."""
        if self._gap_s is None:
            return 0.0
        return self._overlap / self._gap_s if self._gap_s > 0 else float("inf")

    def hold(self, rows: int, age_s: float, now: float) -> float:
        """Seconds to wait at `now` before dispatching `rows` waiting rows whose oldest
        request has waited `age_s`; 0: dispatch now. Never more than the bound
        (`bound_s`, or under contention the larger of it and `contended_bound_s`)
        less `age_s`, and never less than MIN_WAIT_S. The rows it expects are due at
        the pace of arrivals from the last one: once they are late, it waits no more
        (a wait that ends with nothing new does not start again)."""
        wait = self._hold(rows, age_s, now)
        return wait if wait >= MIN_WAIT_S else 0.0

    def _hold(self, rows: int, age_s: float, now: float) -> float:
        contended = self.contention.contended and self.contended_bound_s > 0
        bound = max(self.bound_s, self.contended_bound_s) if contended else self.bound_s
        window = bound - age_s
        if window <= 0 or rows >= self.limit or rows < 1:
            return 0.0
        fit = None if contended else self.fit  # under contention the fit is not consulted
        if contended:
            # Every batch's fixed cost is CPU taken from the starved thread, whatever
            # the fit says of its wall time: wait for the rows that keep coming.
            gap = self._gap_s
            rate = 0.0 if gap is None else (1.0 / gap if gap > 0 else float("inf"))
        elif fit is None:
            return 0.0
        else:
            rate = self.rate
        room = max(self._peak, self._peak_before) - self.present  # requests that can still come
        expected = min(rate * window, room)
        if expected < 1:
            return 0.0
        bigger = min(self.limit, rows + int(min(expected, self.limit)))
        if fit is not None:
            fixed, per_row = fit
            if fixed / bigger + per_row > GAIN * (fixed / rows + per_row):
                return 0.0
        due = (bigger - rows) / rate
        if self._last_arrival is not None:
            due -= now - self._last_arrival
        return min(window, due)


def _line(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares `seconds = fixed + per_row * rows`, both parts at least 0."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread <= 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    per_row = max(slope, 0.0)
    fixed = mean_y - per_row * mean_x
    if fixed < 0:  # through the origin instead
        return 0.0, sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    return fixed, per_row
