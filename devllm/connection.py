"""The client's TCP connection, as far as the application can see it.

:class:`devllm.server.Handler` puts the connection's socket in the WSGI
environ under :data:`ENVIRON_KEY`; :class:`ClientConnection` uses it to wait
while watching for the client to leave, and to drop the connection on purpose.
Without that key (another WSGI server, Flask's test client) waiting is a plain
sleep and dropping raises :class:`ConnectionAbortedError` instead.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Mapping
from typing import Any, Protocol

import gevent
from gevent.socket import wait_read

ENVIRON_KEY = "devllm.socket"
# Shorter waits are plain sleeps: a departed client is noticed at the next write anyway,
# and watching the socket on every token of thousands of streams costs too much.
WATCH_AT_LEAST = 0.5


class _Socket(Protocol):
    def fileno(self) -> int: ...
    def recv(self, bufsize: int, flags: int = ..., /) -> bytes: ...
    def shutdown(self, how: int, /) -> None: ...


class ClientConnection:
    """Wait on, and drop, one client's connection."""

    def __init__(self, sock: _Socket | None) -> None:
        self._sock = sock

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any]) -> ClientConnection:
        return cls(environ.get(ENVIRON_KEY))

    def pause(self, seconds: float) -> bool:
        """Wait ``seconds``; return True as soon as the client is seen gone (long waits only)."""
        if seconds <= 0:
            return False
        if self._sock is None or seconds < WATCH_AT_LEAST:
            gevent.sleep(seconds)
            return False
        deadline = time.monotonic() + seconds
        try:
            wait_read(self._sock.fileno(), timeout=seconds)
        except TimeoutError:
            return False
        if self.gone():
            return True
        # The client sent more bytes (a pipelined request): it is still there, just wait.
        gevent.sleep(max(0.0, deadline - time.monotonic()))
        return False

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
