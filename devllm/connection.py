"""The client's TCP connection, as far as the application can see it.

:class:`devllm.server.Handler` puts the connection's socket in the WSGI
environ under :data:`ENVIRON_KEY`; :class:`ClientConnection` uses it to wait
while watching for the client to leave, and to drop the connection on purpose.
Without that key (another WSGI server, Flask's test client) waiting is a plain
sleep, a client is never seen leaving, and dropping raises
:class:`ConnectionAbortedError` instead.

A client that closes its socket, or whose process dies (the kernel closes it),
makes the socket readable with EOF. :meth:`ClientConnection.pause` notices it:
long waits watch the socket throughout and end at once; short ones (a token's
delay) are plain sleeps followed by one non-blocking ``poll`` of the socket, a
single system call, so a stream notices a departed client at its next token
at the latest, without an I/O watcher per token.
"""

from __future__ import annotations

import contextlib
import math
import select
import socket
import time
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import gevent
from gevent.event import Event
from gevent.monkey import get_original
from gevent.socket import wait_read

ENVIRON_KEY = "devllm.socket"
# Waits at least this long watch the socket (and the wake event) throughout; shorter
# ones sleep, then check once: an I/O watcher per token of thousands of streams costs
# more than the token itself.
WATCH_AT_LEAST = 0.5

# The operating system's poll, not gevent's: polling with a zero timeout never blocks,
# so it needs no hub switch.
_poll: Any = get_original("select", "poll")

Woke = Literal["elapsed", "woken", "gone"]


class _Socket(Protocol):
    def fileno(self) -> int: ...
    def recv(self, bufsize: int, flags: int = ..., /) -> bytes: ...
    def shutdown(self, how: int, /) -> None: ...


class ClientConnection:
    """Wait on, and drop, one client's connection."""

    def __init__(self, sock: _Socket | None) -> None:
        self._sock = sock
        self._poller: Any = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any]) -> ClientConnection:
        return cls(environ.get(ENVIRON_KEY))

    def pause(self, seconds: float, wake: Event | None = None) -> Woke:
        """Wait ``seconds`` (``math.inf``: until woken or gone), then say why the wait ended.

        ``"woken"`` if ``wake`` is set, else ``"gone"`` if the client closed or reset
        the connection, else ``"elapsed"``. Both are checked when the wait ends, even
        after a wait of 0; waits of :data:`WATCH_AT_LEAST` or more also end as soon as
        either happens. Shorter waits are plain sleeps: an event per token costs a
        timer more, and a cut or a departure is seen when the sleep ends.
        """
        if seconds >= WATCH_AT_LEAST and self._sock is not None:
            self._watch(seconds, wake)
        elif seconds >= WATCH_AT_LEAST and wake is not None:
            wake.wait(None if math.isinf(seconds) else seconds)
        elif seconds > 0:
            gevent.sleep(seconds)
        if wake is not None and wake.is_set():
            return "woken"
        if self.left():
            return "gone"
        return "elapsed"

    def _watch(self, seconds: float, wake: Event | None) -> None:
        """Wait until ``seconds`` pass, ``wake`` is set or the client leaves."""
        assert self._sock is not None
        deadline = time.monotonic() + seconds
        timeout = None if math.isinf(seconds) else seconds
        reader = gevent.spawn(wait_read, self._sock.fileno())
        try:
            gevent.wait([reader] if wake is None else [reader, wake], timeout=timeout, count=1)
            readable = reader.dead
        finally:
            reader.kill()
        if not readable or self.gone():
            return
        # The client sent more bytes (a pipelined request): it is still there, just wait.
        remaining = None if timeout is None else max(0.0, deadline - time.monotonic())
        if wake is not None:
            wake.wait(remaining)
        elif remaining is not None:
            gevent.sleep(remaining)

    def left(self) -> bool:
        """Whether the client closed or reset the connection; never blocks."""
        if self._sock is None:
            return False
        if self._poller is None:
            self._poller = _poll()
            self._poller.register(self._sock.fileno(), select.POLLIN)
        if not self._poller.poll(0):
            return False
        return self.gone()

    def gone(self) -> bool:
        """Whether the client closed or reset the connection (call when it is readable)."""
        if self._sock is None:
            return False
        try:
            return self._sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def drop(self) -> None:
        """Close the connection abruptly: the client sees it end mid-response."""
        if self._sock is None:
            raise ConnectionAbortedError("devllm dropped the connection (fault=disconnect)")
        with contextlib.suppress(OSError):  # already gone
            self._sock.shutdown(socket.SHUT_RDWR)
