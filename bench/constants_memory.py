"""Memory while ~100 MB of new weights stream into a served model and are swapped in.

Builds (once, cached) a model with one 5120x5120 float32 weight (105 MB), serves it
with pt2serve, then uploads a new weight set through the client-streaming
LoadConstants RPC (1 MB chunks) into the inactive buffer and swaps it in, while
sampling the server's resident memory. Prints the numbers for docs/constants.md.

    python -m bench.constants_memory
"""

from __future__ import annotations

import pathlib
import re
import sys
import tempfile
import threading
import time

import torch

from bench.run import CACHE, server_process
from pt2serve.loader.build import build_package, cached_package
from pt2serve.service.client import Pt2ServeClient

WIDTH = 5120


class Big(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(x)
        return out


def rss_bytes(pid: int) -> int:
    text = pathlib.Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    assert match
    return int(match.group(1)) * 1024


def main() -> None:
    source = pathlib.Path(__file__).read_text()
    path = cached_package(
        CACHE,
        "big",
        [source],
        lambda p: build_package(Big().eval(), {"x": torch.randn(2, WIDTH)}, p, max_batch_size=8),
    )
    weight_mb = WIDTH * WIDTH * 4 / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        config = pathlib.Path(tmp) / "big.toml"
        config.write_text(
            f'[server]\ngrpc_port = 0\nmetrics_port = 0\n\n[[models]]\nname = "big"\npath = "{path}"\n'
        )
        argv = [sys.executable, "-m", "pt2serve.service.cli", "serve", "--config", str(config)]
        with server_process(argv, "ready:", dict(__import__("os").environ)) as server:
            pid = server.pid
            with Pt2ServeClient(server.target) as client:
                x = torch.randn(1, WIDTH)
                client.infer("big", {"x": x})
                before = rss_bytes(pid)
                samples: list[int] = []
                done = threading.Event()

                def sample() -> None:
                    while not done.is_set():
                        samples.append(rss_bytes(pid))
                        time.sleep(0.005)

                sampler = threading.Thread(target=sample)
                sampler.start()
                new = torch.randn(WIDTH, WIDTH) / WIDTH**0.5
                started = time.perf_counter()
                staged = client.load_constants(
                    "big", {"proj.weight": new}, use_inactive=True, check_full_update=True
                )
                staged_at = time.perf_counter()
                swapped = client.swap_constants("big")
                swapped_at = time.perf_counter()
                done.set()
                sampler.join()
                after = rss_bytes(pid)
                got = client.infer("big", {"x": x})["output"]
                ok = torch.allclose(got, x @ new.t(), atol=1e-3, rtol=1e-3)
    peak = max(samples)
    mb = 2**20
    print(
        f"weights: {weight_mb:.0f} MB in one constant; staged version {staged.constants_version}, "
        f"swapped to {swapped.constants_version}; outputs match new weights: {ok}"
    )
    print(f"upload + stage: {staged_at - started:.2f} s; swap: {(swapped_at - staged_at) * 1e3:.1f} ms")
    print(
        f"server RSS before: {before / mb:.0f} MB; peak during: {peak / mb:.0f} MB "
        f"(+{(peak - before) / mb:.0f} MB = {(peak - before) / mb / weight_mb:.2f} weight copies); "
        f"after: {after / mb:.0f} MB (+{(after - before) / mb:.0f} MB)"
    )


if __name__ == "__main__":
    main()
