"""The CUDA path, and front-end scaling, on a machine with a GPU: one script.

    python bench/gpu.py                       # cuda:0, front ends 0 (one process), 1, 2, 4, 8
    python bench/gpu.py --device cpu --frontends 0,1 --seconds 3     # the same on CPU

Runs from a checkout without installing it (it links service/, scheduler/ and loader/
under a temporary `pt2serve` package), with the machine's own torch, grpcio, protobuf
and prometheus-client; grpcio-health-checking and grpcio-reflection must import too
(`--wheels DIR` installs them from wheels carried along, with no index).

1. Builds a 512→2048→2048→512 MLP on the device (`aoti_compile_and_package`).
2. For each front-end count: serves it with `devices = [0]` (`pt2serve serve
   --frontends N`), compares answers at 1, 7 and 64 rows with the eager module, then
   drives single-row unary `Run` requests for `--seconds` from `--clients` load
   processes (Python, asyncio: nothing more to install) and reads the mean
   batch from the server.
3. Prints a Markdown table and writes it to $OUT/gpu.md when $OUT is set.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def link_package() -> pathlib.Path:
    """A directory whose `pt2serve/` links to this checkout's layers."""
    top = pathlib.Path(tempfile.mkdtemp(prefix="pt2serve-src-"))
    (top / "pt2serve").mkdir()
    for layer in ("service", "scheduler", "loader"):
        (top / "pt2serve" / layer).symlink_to(ROOT / layer)
    return top


def install_wheels(directory: str) -> None:
    wheels = [str(p) for p in pathlib.Path(directory).glob("*.whl")]
    if wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *wheels], check=True
        )


def load_process(target: str, body: bytes, seconds: float, in_flight: int, out: str) -> None:
    """One client process: `in_flight` unary calls outstanding for `seconds`."""
    import asyncio

    import grpc

    async def run() -> int:
        done = 0
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_unary("/pt2serve.v1.Inference/Run", None, None)
            end = time.monotonic() + seconds

            async def worker() -> None:
                nonlocal done
                while time.monotonic() < end:
                    await call(body)
                    done += 1

            await asyncio.gather(*(worker() for _ in range(in_flight)))
        return done

    pathlib.Path(out).write_text(str(asyncio.run(run())))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--frontends", default="0,1,2,4,8")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=4, help="load processes")
    parser.add_argument("--in-flight", type=int, default=64, help="per load process")
    parser.add_argument("--wheels", help="install the wheels in this directory first (no index)")
    parser.add_argument("--load-process", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    top = link_package()
    sys.path[:0] = [str(top), str(ROOT)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(top), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    if args.load_process:
        target, body, seconds, out = args.load_process
        load_process(target, pathlib.Path(body).read_bytes(), float(seconds), args.in_flight, out)
        return
    if args.wheels:
        install_wheels(args.wheels)

    import torch

    from bench.run import model_counters, server_process
    from pt2serve.loader.build import build_package
    from pt2serve.service import tensors
    from pt2serve.service.client import Pt2ServeClient
    from pt2serve.service.pb import pt2serve_pb2 as pb

    device = torch.device(args.device)
    torch.manual_seed(0)
    module = (
        torch.nn.Sequential(
            torch.nn.Linear(512, 2048),
            torch.nn.ReLU(),
            torch.nn.Linear(2048, 2048),
            torch.nn.ReLU(),
            torch.nn.Linear(2048, 512),
        )
        .to(device)
        .eval()
    )
    work = pathlib.Path(tempfile.mkdtemp(prefix="pt2serve-gpu-"))
    package = work / "wide.pt2"
    started = time.monotonic()
    build_package(module, {"input": torch.randn(2, 512, device=device)}, package, max_batch_size=256)
    lines = [
        f"# pt2serve on {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}",
        "",
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; wide MLP (512→2048→2048→512) compiled "
        f"for {device} in {time.monotonic() - started:.0f} s; single-row unary Run, "
        f"{args.clients} load processes × {args.in_flight} in flight, {args.seconds:g} s each",
        "",
        "| front ends | answers = eager | req/s | mean batch |",
        "|---|---|---|---|",
    ]
    request = pb.RunRequest(model="wide")
    request.inputs["input"].CopyFrom(tensors.tensor_to_pb(torch.randn(1, 512)))
    body = work / "body.bin"
    body.write_bytes(request.SerializeToString())
    devices = "[0]" if device.type == "cuda" else "[-1]"
    for count in [int(n) for n in args.frontends.split(",")]:
        config = work / f"serve-{count}.toml"
        config.write_text(
            f'[server]\ngrpc_port = 0\nmetrics_port = 0\nfrontends = {count}\n\n[[models]]\nname = "wide"\n'
            f'path = "{package}"\ndevices = {devices}\n\n[models.batching]\nmax_batch_size = 256\n'
            "max_queue_size = 4096\n"
        )
        argv = [sys.executable, "-m", "pt2serve.service.cli", "serve", "--config", str(config)]
        with server_process(argv, "ready:", env) as server:
            equal = True
            with Pt2ServeClient(server.target) as client:
                for rows in (1, 7, 64):
                    x = torch.randn(rows, 512)
                    got = next(iter(client.infer("wide", {"input": x}).values()))
                    with torch.no_grad():
                        expected = module(x.to(device)).cpu()
                    equal = equal and torch.allclose(got, expected, rtol=1e-2, atol=1e-2)
            before = model_counters(server.target, "wide")
            outs = [work / f"done-{count}-{i}" for i in range(args.clients)]
            loads = [
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--in-flight",
                        str(args.in_flight),
                        "--load-process",
                        server.target,
                        str(body),
                        str(args.seconds),
                        str(out),
                    ],
                    env=env,
                )
                for out in outs
            ]
            for load in loads:
                load.wait()
            answered = sum(int(out.read_text()) for out in outs)
            after = model_counters(server.target, "wide")
            batch = "-"
            if before and after and after[0] > before[0]:
                batch = f"{(after[1] - before[1]) / (after[0] - before[0]):.1f}"
            lines.append(
                f"| {count or '0 (one process)'} | {'yes' if equal else 'NO'} | "
                f"{answered / args.seconds:,.0f} | {batch} |"
            )
            print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "gpu.md").write_text(report)


if __name__ == "__main__":
    main()
