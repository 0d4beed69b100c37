"""A rolling restart behind an L4 balancer (bench/l4.py: haproxy in TCP mode, as a
Kubernetes ClusterIP Service balances connections) fails no call of a plain
tritonclient caller with UNAVAILABLE, on every layout; every replica exits 0.

A call that raced a GOAWAY may still end CANCELLED: gRPC's core cancels the calls it
had received but not yet handed to the server when the server stops (docs/deploy.md).
At most one call per caller and restart can be in that window.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

from bench.l4 import Replica, rolling_restart
from tests.conftest import CACHE, Packages

FRONTENDS = {"front-ends": "2", "one-process": "0"}
CALLERS = 8


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT restarts on the same port")
def test_rolling_restart_behind_l4_fails_no_plain_call(
    packages: Packages, tmp_path: pathlib.Path, layout: str
) -> None:
    env = {**os.environ, "PT2SERVE_CACHE_DIR": str(CACHE), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "pt2serve.service.cli", "serve", "--grpc-port", "{port}"]
    argv += ["--metrics-port", "0", "--frontends", FRONTENDS[layout]]
    replicas = [Replica(tmp_path, f"replica{i}", argv, "ready:", env) for i in range(3)]
    report = rolling_restart(replicas, tmp_path, callers=CALLERS)
    tally = report.tally
    print(f"{layout}: {tally.line()} in {report.seconds:.1f}s")
    assert report.exit_codes == [0, 0, 0], [r.log.read_text()[-3000:] for r in replicas]
    assert tally.codes["OK"] > 300
    assert set(tally.codes) <= {"OK", "CANCELLED"}, (tally.codes, tally.examples)
    assert tally.codes["CANCELLED"] <= CALLERS * len(replicas), tally.examples
