"""How much a process hop costs: the transport between gRPC front ends and an engine.

    python -m bench.transport                   # 64 B and 64 KiB payloads, 64 in flight
    python -m bench.transport --payloads 64,4096,262144 --seconds 3

A front end (this process) keeps `--in-flight` requests outstanding to an echo engine
(a child process) that answers each with a payload of the same size, over:

- `zmq`: ZeroMQ DEALER/ROUTER over ipc://, a request as two frames (a 16-byte header,
  the payload) sent without copying on the Python side (`copy=False`);
- `pipe`: multiprocessing's Pipe, header and payload in one `send_bytes`;
- `unix`: a Unix stream socket, length-prefixed frames, `sendmsg` of header and payload
  (no join) and `recv_into` a preallocated buffer.

Reports round trips per second and the CPU both processes spent per round trip
(user + system). Each transport runs `--rounds` times, taking turns; medians.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

HEADER = struct.Struct("<QQ")  # request id, payload length


# ------------------------------------------------------------------ engines
def zmq_engine(requests: str, answers: str) -> None:
    import zmq

    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.bind(requests)
    outbox = context.socket(zmq.PUSH)
    outbox.bind(answers)
    while True:
        header, payload = inbox.recv_multipart(copy=False)
        if len(header.bytes) == 0:
            outbox.send_multipart([b"", b""])
            return
        outbox.send_multipart([header, payload], copy=False)


def pipe_engine(conn: Connection) -> None:
    while True:
        message = conn.recv_bytes()
        conn.send_bytes(message)
        if not message:
            return


def unix_engine(path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    conn, _ = server.accept()
    buffer = bytearray(1 << 24)
    view = memoryview(buffer)
    while True:
        if not _recv_exact(conn, view, HEADER.size):
            return
        _, length = HEADER.unpack_from(buffer)
        _recv_exact(conn, view[HEADER.size :], length)
        conn.sendall(view[: HEADER.size + length])


def _recv_exact(conn: socket.socket, view: memoryview, size: int) -> bool:
    got = 0
    while got < size:
        n = conn.recv_into(view[got:size])
        if n == 0:
            return False
        got += n
    return True


# -------------------------------------------------------------- front ends
# Each returns (send, receive, close): `send` and `receive` run in two threads of the
# front end, as a gRPC front end's loop and its answer reader would.
Link = tuple[Callable[[int], None], Callable[[], None], Callable[[], None]]


def zmq_link(payload: bytes) -> Link:
    import zmq

    base = tempfile.mktemp(prefix="pt2serve-bench-")
    requests, answers = f"ipc://{base}-in", f"ipc://{base}-out"
    engine = multiprocessing.Process(target=zmq_engine, args=(requests, answers))
    engine.start()
    context = zmq.Context()
    outbox = context.socket(zmq.PUSH)
    outbox.connect(requests)
    inbox = context.socket(zmq.PULL)
    inbox.connect(answers)

    def send(i: int) -> None:
        outbox.send_multipart([HEADER.pack(i, len(payload)), payload], copy=False)

    def receive() -> None:
        inbox.recv_multipart(copy=False)

    def close() -> None:
        outbox.send_multipart([b"", b""])
        engine.join(10)
        outbox.close(0)
        inbox.close(0)
        context.term()

    return send, receive, close


def pipe_link(payload: bytes) -> Link:
    ours, theirs = multiprocessing.Pipe()
    engine = multiprocessing.Process(target=pipe_engine, args=(theirs,))
    engine.start()

    def send(i: int) -> None:
        ours.send_bytes(HEADER.pack(i, len(payload)) + payload)

    def receive() -> None:
        ours.recv_bytes()

    def close() -> None:
        ours.send_bytes(b"")
        engine.join(10)

    return send, receive, close


def unix_link(payload: bytes) -> Link:
    path = tempfile.mktemp(prefix="pt2serve-bench-")
    engine = multiprocessing.Process(target=unix_engine, args=(path,))
    engine.start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for _ in range(500):
        try:
            sock.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.01)
    buffer = bytearray(HEADER.size + len(payload))
    view = memoryview(buffer)

    def send(i: int) -> None:
        sock.sendmsg([HEADER.pack(i, len(payload)), payload])

    def receive() -> None:
        _recv_exact(sock, view, len(buffer))

    def close() -> None:
        sock.close()
        engine.join(10)
        os.unlink(path)

    return send, receive, close


def closed_loop(link: Link, in_flight: int, seconds: float) -> tuple[int, float, int]:
    """Keep `in_flight` round trips outstanding: a sending thread waits for room, a
    receiving thread counts answers. Returns (round trips measured, seconds, round trips
    in all); the first second warms up and is not measured."""
    send, receive, close = link
    room = threading.Semaphore(in_flight)
    # Set before the last request is sent, with how many there are in all: the answer
    # to the last one then always finds it set.
    last = threading.Event()
    total = [0]
    times: list[float] = []

    def receiver() -> None:
        while True:
            receive()
            times.append(time.monotonic())
            room.release()
            if last.is_set() and len(times) >= total[0]:
                return

    reader = threading.Thread(target=receiver, daemon=True)
    reader.start()
    start = time.monotonic()
    sent = 0
    while True:
        room.acquire()
        final = time.monotonic() - start >= seconds + 1.0
        if final:
            total[0] = sent + 1
            last.set()
        send(sent)
        sent += 1
        if final:
            break
    reader.join(60)
    close()
    measured = [t for t in times if t >= start + 1.0]
    elapsed = measured[-1] - measured[0] if len(measured) > 1 else 0.0
    return len(measured), elapsed, sent


TRANSPORTS: dict[str, Callable[[bytes], Link]] = {"zmq": zmq_link, "pipe": pipe_link, "unix": unix_link}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--payloads", default="64,65536", help="payload bytes, comma-separated")
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    args = parser.parse_args()
    multiprocessing.set_start_method("spawn")
    print("| payload | transport | round trips/s (median) | rounds | CPU per round trip, both processes |")
    print("|---|---|---|---|---|")
    for size in (int(s) for s in args.payloads.split(",")):
        payload = os.urandom(size)
        rates: dict[str, list[float]] = {t: [] for t in args.transports.split(",")}
        cpu: dict[str, list[float]] = {t: [] for t in rates}
        for _ in range(args.rounds):
            for name in rates:
                before = os.times()
                count, elapsed, total = closed_loop(TRANSPORTS[name](payload), args.in_flight, args.seconds)
                after = os.times()
                # The engine has exited: its CPU is in our children's times.
                spent = (after.user - before.user) + (after.system - before.system)
                spent += (after.children_user - before.children_user) + (
                    after.children_system - before.children_system
                )
                rates[name].append(count / elapsed)
                # Both processes over the whole run (start-up included), per round trip.
                cpu[name].append(spent / total * 1e6)
        for name in rates:
            print(
                f"| {size:,} B | {name} | {statistics.median(rates[name]):,.0f} | "
                f"{', '.join(f'{r:,.0f}' for r in rates[name])} | {statistics.median(cpu[name]):.1f} µs |"
            )


if __name__ == "__main__":
    main()
