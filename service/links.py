"""The two ends of the front end ⇄ engine socket, which carry length-prefixed frames
(`u32 length` then the payload; service/ipc.py has their contents).

- `FrameLink`, a front end's end: an asyncio protocol on the event loop's transport.
- `SocketLink`, the engine's end: a plain socket that the loop reads and that any
  thread may write, so that a runner thread can send answers itself.

Both cut what they read into whole frames (`FrameReader`) and send the frames of
one loop pass in one write.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any, cast

LENGTH = struct.Struct("<I")
_READ_SIZE = 256 * 1024
# Buffers in one sendmsg: Linux takes at most 1,024 (IOV_MAX).
_IOV_MAX = 512


class FrameReader:
    """Cuts a byte stream into frame payloads (each a bytearray of its own: tensors
    decoded from it own writable memory, as the runtime needs)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | memoryview) -> list[bytearray]:
        buffer = self._buffer
        buffer += data
        frames = []
        start = 0
        end = len(buffer)
        while end - start >= 4:
            (length,) = LENGTH.unpack_from(buffer, start)
            stop = start + 4 + length
            if stop > end:
                break
            frames.append(buffer[start + 4 : stop])
            start = stop
        if start:
            del buffer[:start]
        return frames


class _OnePass:
    """Frames sent on the loop leave at the end of its pass, together (`send`)."""

    loop: asyncio.AbstractEventLoop
    _out: list[Any]  # this loop pass's frames (loop thread only)

    def send(self, frame: list[Any], now: bool = False) -> None:
        """On the loop: queue a frame for the end of this loop pass, or, with `now`,
        write it and everything queued before it at once."""
        if not self._out and not now:
            self.loop.call_soon(self._flush)
        self._out.extend(frame)
        if now:
            self._flush()

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out:
            self._write_out(out)

    def _write_out(self, parts: list[Any]) -> None:
        raise NotImplementedError


class FrameLink(_OnePass, asyncio.Protocol):
    """One end of the socket: frames in (`received`, one call per frame), and frames
    out, those of one loop pass in one write (`send`)."""

    def __init__(self) -> None:
        self._reader = FrameReader()
        self._out = []
        self._transport: asyncio.Transport | None = None
        # Kept: on Python before 3.12, each asyncio.get_running_loop() is a getpid()
        # system call (measured: several µs a request on the engine's loop).
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        for frame in self._reader.feed(data):
            if self._transport is None or self._transport.is_closing():
                return
            self.received(frame)

    def received(self, frame: bytearray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _write_out(self, parts: list[Any]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(parts)


class SocketLink(_OnePass):
    """The engine's end of a front end's connection: a plain socket read by the
    event loop, and written by the loop or by any other thread (a runner thread
    sending answers the moment their batch has run, `write`).

    Frames the loop sends in one pass leave in one write (`send`), as `FrameLink`
    has it. Every write takes a lock, so frames never interleave; what the socket
    cannot take at once waits, in order, until the loop sees it writable again, and
    later writes queue behind it.
    """

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, *, reading: bool = True) -> None:
        sock.setblocking(False)
        self.loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._reader = FrameReader()
        self._inbox = bytearray(_READ_SIZE)
        self._out = []
        self._lock = threading.Lock()
        self._backlog: list[Any] = []  # written, not yet taken by the socket (under the lock)
        self.closed = False
        if reading:
            loop.add_reader(self._fd, self._readable)

    def fileno(self) -> int:
        return self._fd

    def pause_reading(self) -> None:
        """On the loop: stop reading, so that another thread may (`pull`)."""
        if not self.closed:
            self.loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        """On the loop: read again, once no other thread does."""
        if not self.closed:
            self.loop.add_reader(self._fd, self._readable)

    def pull(self) -> list[bytearray] | None:
        """On the one thread that reads while the loop does not: the whole frames that
        have arrived (none yet: empty); None at the end of the stream or on an error,
        which the loop then finds for itself once it reads again."""
        got = self._take()
        return None if isinstance(got, OSError) else got

    def received(self, frame: bytearray) -> None:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection closed (by the peer, an error, or `close`); called once."""

    def write(self, parts: list[Any]) -> None:
        """From any thread: write whole frames, after everything written before."""
        with self._lock:
            if self.closed:
                return
            if self._backlog:
                self._backlog.extend(parts)
                return
            rest = self._sent(parts)
            if rest:
                self._backlog = parts.copy() if rest is parts else rest  # never the caller's list
                self.loop.call_soon_threadsafe(self._await_writable)

    def close(self) -> None:
        """On the loop: drop the connection (and whatever it had yet to write)."""
        self._lose(None)

    def _write_out(self, parts: list[Any]) -> None:
        self.write(parts)

    def read_now(self) -> None:
        """On the loop: read what has arrived, as when the socket is readable."""
        if not self.closed:
            self._readable()

    def _readable(self) -> None:
        got = self._take()
        if got is None or isinstance(got, OSError):
            self._lose(got)
            return
        for frame in got:
            if self.closed:
                return
            self.received(frame)

    def _take(self) -> list[bytearray] | OSError | None:
        """Read once: the whole frames that have arrived (none yet: empty); None at
        the end of the stream; the error."""
        try:
            size = self._sock.recv_into(self._inbox)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            return exc
        if not size:
            return None
        return self._reader.feed(memoryview(self._inbox)[:size])

    def _await_writable(self) -> None:
        with self._lock:
            if self._backlog and not self.closed:
                self.loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        with self._lock:
            self._backlog = self._sent(self._backlog)
            if not self._backlog:
                self.loop.remove_writer(self._fd)

    def _sent(self, parts: list[Any]) -> list[Any]:
        """Write as much of `parts` as the socket takes now; returns the rest. Under
        the lock."""
        while parts:
            try:
                sent = self._sock.sendmsg(parts[:_IOV_MAX])
            except (BlockingIOError, InterruptedError):
                return parts
            except OSError:
                return []  # the peer is gone; reading the socket will say so
            parts = _after(parts, sent)
        return parts

    def _lose(self, exc: Exception | None) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._backlog = []
            self.loop.remove_reader(self._fd)
            self.loop.remove_writer(self._fd)
            self._sock.close()
        self.connection_lost(exc)


def _after(parts: list[Any], sent: int) -> list[Any]:
    """`parts` less their first `sent` bytes."""
    for i, part in enumerate(parts):
        size = len(part) if isinstance(part, bytes) else memoryview(part).nbytes
        if sent < size:
            rest = parts[i:]
            if sent:
                rest[0] = memoryview(part).cast("B")[sent:]
            return rest
        sent -= size
    return []
