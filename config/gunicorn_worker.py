"""The web front's gunicorn worker: gunicorn's gevent worker, which also
serves the connections it accepted just as its listener closed.

At a graceful stop (``kill -HUP`` of the master: a deploy) gunicorn's gevent
worker closes its listening socket, then serves what it holds until
``graceful_timeout``. A connection accepted just before, whose handler has
not run yet, fails at its first step, ``listener.getsockname()`` (EBADF,
"Socket error processing request",
https://github.com/benoitc/gunicorn/issues/712), and is closed with no
response: its client cannot tell that from a request cut after it was
taken, and a reload under load loses one or two so. The listener's name is
known before it closes; this worker hands it on, and the request is served.

Like :mod:`config.gunicorn`, imported by gunicorn's master before any
monkey-patching: it imports gunicorn's gevent worker, as the master does for
``worker_class = "gevent"``, and nothing of chatqueue's.
"""

from __future__ import annotations

from typing import Any

from gunicorn.workers.ggevent import GeventWorker


class _Named:
    """A listening socket whose name is the one it had before it closed."""

    def __init__(self, listener: Any, name: Any) -> None:
        self._listener = listener
        self._name = name

    def getsockname(self) -> Any:
        return self._name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._listener, attr)


class Worker(GeventWorker):  # type: ignore[misc]  # gunicorn has no type hints
    """gunicorn's gevent worker; a connection's handler asks its listener's
    name of a record taken when the worker started, not of the socket."""

    _names: dict[int, Any]

    def run(self) -> None:
        self._names = {id(listener): listener.getsockname() for listener in self.sockets}
        super().run()

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        name = getattr(self, "_names", {}).get(id(listener))
        super().handle(listener if name is None else _Named(listener, name), client, addr)
