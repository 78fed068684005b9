"""Noticing that an HTTP client went away while its answer streams.

WSGI tells an application of a gone client only when a write fails, which
for a silent stream is at the next keep-alive comment. The client of a
streamed answer sends nothing more on its connection, so the socket turning
readable means it closed (or reset) the connection: a greenlet waits for that
and reports it at once, and the answer is cancelled without waiting for the
next write.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import gevent
from gevent.socket import wait_read


class ClientGone(Exception):
    """The client closed its connection before the answer was complete."""


class ClientWatch:
    """Calls ``on_gone`` once if the client of ``environ`` closes its connection."""

    def __init__(self, environ: Mapping[str, Any], on_gone: Callable[[], None]) -> None:
        sock = environ.get("gunicorn.socket")
        self._greenlet: gevent.Greenlet | None = None
        # A TLS socket cannot be peeked at; its client is noticed on a write.
        if isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket):
            self._greenlet = gevent.spawn(self._watch, sock, on_gone)

    @staticmethod
    def _watch(sock: socket.socket, on_gone: Callable[[], None]) -> None:
        try:
            wait_read(sock.fileno())
            data = sock.recv(1, socket.MSG_PEEK)
        except OSError:
            data = b""
        if not data:  # end of file: the client closed; data: it pipelines, leave it
            on_gone()

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None
