"""How much a WebSocket client can make a web process hold of what it sends,
and frames that go out whole to a client slower than the answer.

An answer is sent back as the client's frames arrive; a client that sends
frames faster than its requests are answered (or sends one huge frame) must
not make the process buffer without bound:

- a frame larger than ``MAX_BODY_BYTES`` closes the socket with 1009
  (message too big): simple-websocket's ``max_message_size``, set by
  web/ws.py;
- more than :data:`MAX_WAITING_FRAMES` frames received and not yet read
  (the client sends while its answer streams) close it with 1008 (policy
  violation).

simple-websocket's reader greenlet appends each whole frame it reads to the
socket's ``input_buffer`` list, without limit; it has no option for a bound,
so the list is replaced by :class:`WaitingFrames`, whose ``append`` refuses
the frame that would go over. Checked against simple-websocket 1.0 and 1.1;
tests/test_web_ws.py fails if the attribute moves (the flood is then not
closed).

simple-websocket writes each frame with one ``socket.send``, whose return it
does not look at (https://github.com/miguelgrinberg/simple-websocket/issues/45,
fixed after 1.1.0, the last release). Under gevent a socket's ``send`` writes
what the kernel takes and returns: to a client that reads slower than its
answer comes, the rest of a frame would be lost and the next frame's header
would land inside it (the client: ``cannot decode``; tests/test_reply_backlog.py
checks it does not). :func:`whole_frames` gives the socket a
``send`` that writes all of it, under a lock: the reader greenlet's pings and
the handler's frames never interleave. A frame the client does not take
within two ping intervals (it would have failed the pong check, which cannot
come round while a write waits) ends the connection (``BrokenPipeError``),
and with it the answer.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from typing import Any

import gevent
from simple_websocket import ConnectionClosed

logger = logging.getLogger(__name__)

# Frames a client may have sent and not yet had read (about MAX_BODY_BYTES each
# at most): a request, and a few more sent ahead of their turn.
MAX_WAITING_FRAMES = 8
POLICY_VIOLATION = 1008


class WaitingFrames(list[Any]):
    """A socket's received frames not yet read; at most ``limit`` of them."""

    def __init__(self, ws: Any, limit: int) -> None:
        super().__init__(ws.input_buffer)
        self.ws = ws
        self.limit = limit

    def append(self, frame: Any) -> None:
        if len(self) < self.limit:
            super().append(frame)
            return
        logger.warning(
            "a WebSocket client sent more than %d frames ahead of their answers; closed",
            self.limit,
        )
        with contextlib.suppress(ConnectionClosed, OSError):
            self.ws.close(
                reason=POLICY_VIOLATION,
                message=f"more than {self.limit} frames sent ahead of their answers",
            )


def bound_waiting_frames(ws: Any, limit: int = MAX_WAITING_FRAMES) -> None:
    """Bound the frames ``ws`` holds for its handler (see the module). Call it
    first thing in the handler: under gevent the reader greenlet has not run yet."""
    ws.input_buffer = WaitingFrames(ws, limit)


class WholeWrites:
    """A socket whose ``send`` writes all it is given, one caller at a time,
    within ``timeout`` seconds, or shuts the socket."""

    def __init__(self, sock: Any, timeout: float) -> None:
        self._sock = sock
        self._timeout = timeout
        self._lock = threading.Lock()  # gevent's, once monkey-patched

    def send(self, data: bytes) -> int:
        timer = gevent.Timeout(self._timeout)
        try:
            with timer, self._lock:
                self._sock.sendall(data)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise  # a caller's own timeout: not the client's doing
            logger.info(
                "a WebSocket client took no frame for %g s; its connection is closed",
                self._timeout,
            )
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            raise BrokenPipeError("the client took no frame in time") from None
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def whole_frames(ws: Any, ping_interval: float) -> None:
    """Make every frame ``ws`` sends go out whole (see the module); after the
    handshake, which simple-websocket writes before the handler runs."""
    ws.sock = WholeWrites(ws.sock, timeout=2 * ping_interval)
