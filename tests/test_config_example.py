from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from pt2serve.loader.errors import InvalidInput
from pt2serve.service.config import default_frontends, default_intra_op_threads, load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_example_config_parses() -> None:
    config = load_config(ROOT / "deploy" / "config.example.toml")
    assert config.host == "0.0.0.0" and config.grpc_port == 8500
    (model,) = config.models
    assert model.name == "demo" and model.package_path == "/models/demo.pt2"
    assert model.batching is not None and model.batching.max_batch_size == 32
    assert model.batching.adaptive_delay_us == 1000 and config.frontends is None


def test_process_settings_are_read_and_checked(tmp_path: pathlib.Path) -> None:
    config = load_config(ROOT / "deploy" / "config.example.toml")
    assert config.gil_switch_interval_us == 200 and config.gc_gen0_threshold == 20000
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\ngc_gen0_threshold = -1\n")
    with pytest.raises(InvalidInput, match="gc_gen0_threshold must not be negative"):
        load_config(bad)


def test_process_settings_take_effect() -> None:
    # In a child: the settings are process-wide and would leak into this test run.
    code = (
        "import gc, sys\n"
        "from pt2serve.service.cli import tune_process\n"
        "tune_process(200, 20000)\n"
        "print(sys.getswitchinterval(), gc.get_threshold()[0], gc.get_freeze_count() > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    interval, gen0, frozen = out.stdout.split()
    assert abs(float(interval) - 200e-6) < 1e-9 and gen0 == "20000" and frozen == "True"


def check_count_or_auto(
    tmp_path: pathlib.Path, key: str, valid: dict[str, int | None], invalid: dict[str, str]
) -> None:
    """`key` under [server] reads each of `valid`'s texts as its value and refuses each
    of `invalid`'s with a message containing the text given."""
    config = tmp_path / "server.toml"
    for text, expected in valid.items():
        config.write_text(f"[server]\n{key} = {text}\n")
        assert getattr(load_config(config), key) == expected
    for text, message in invalid.items():
        config.write_text(f"[server]\n{key} = {text}\n")
        with pytest.raises(InvalidInput, match=message):
            load_config(config)


def test_frontends_is_a_count_or_auto(tmp_path: pathlib.Path) -> None:
    assert [default_frontends(cpus) for cpus in (1, 2, 3, 8, 16, 64)] == [0, 2, 3, 8, 8, 8]
    check_count_or_auto(
        tmp_path,
        "frontends",
        {'"auto"': None, "0": 0, "3": 3},
        {"-1": "frontends must be 0", '"many"': "frontends must be a count or 'auto'"},
    )


def test_intra_op_threads_is_a_count_or_auto(tmp_path: pathlib.Path) -> None:
    # The CPUs left by the serving event loops (one process counts as one), at least 1.
    assert [default_intra_op_threads(2, cpus) for cpus in (1, 2, 3, 16)] == [1, 1, 1, 14]
    assert [default_intra_op_threads(0, cpus) for cpus in (1, 2, 16)] == [1, 1, 15]
    check_count_or_auto(
        tmp_path,
        "intra_op_threads",
        {'"auto"': None, "1": 1, "6": 6},
        {"0": "intra_op_threads must be 1 or more", '"all"': "intra_op_threads must be a count or 'auto'"},
    )


def test_intra_op_threads_reach_the_threads_that_run_models() -> None:
    # OpenMP keeps the count per thread, and a compiled model's kernels read it
    # directly: set on the main thread alone, it would not reach the worker threads
    # (torch applies its own count to a thread only at that thread's first parallel
    # aten call). A fresh process, so that this one's torch is untouched.
    code = (
        "import asyncio, ctypes, threading, torch\n"
        "from pt2serve.scheduler.workers import WorkerPool, set_intra_op_threads\n"
        "maps = open('/proc/self/maps').read().splitlines()\n"
        "gomp = ctypes.CDLL(next(line.split()[-1] for line in maps if 'libgomp' in line))\n"
        "default = gomp.omp_get_max_threads()\n"
        "set_intra_op_threads(1)\n"
        "plain = []\n"
        "t = threading.Thread(target=lambda: plain.append(gomp.omp_get_max_threads()))\n"
        "t.start(); t.join()\n"
        "async def main():\n"
        "    pool = WorkerPool(2, 'test')\n"
        "    pool.start(asyncio.get_running_loop())\n"
        "    counts = await asyncio.gather(*(pool.call(gomp.omp_get_max_threads) for _ in range(4)))\n"
        "    pool.close()\n"
        "    return counts\n"
        "print(default, plain[0], gomp.omp_get_max_threads(), *asyncio.run(main()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    default, plain_thread, main, *workers = (int(n) for n in out.stdout.split())
    assert main == 1 and workers == [1, 1, 1, 1]
    # What the worker threads' own setting is for: a thread it did not reach keeps
    # OpenMP's default.
    assert plain_thread == default
