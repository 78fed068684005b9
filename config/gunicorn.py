"""gunicorn settings of the web front, derived from :class:`config.Settings`.

``gunicorn web:app`` reads ``./gunicorn.conf.py``, which takes them from here.
gunicorn imports this before its gevent worker monkey-patches, so it imports
nothing but the standard library and :mod:`config.settings` (no ``socket``
user, no ``ssl``, no ``threading`` in use).
"""

from __future__ import annotations

import resource
from typing import Any

from config.settings import load_settings

_settings = load_settings()

bind = [f"0.0.0.0:{_settings.port}"]
# One gevent loop per process; each holds thousands of streams.
worker_class = "config.gunicorn_worker.Worker"
workers = _settings.web_concurrency
worker_connections = _settings.web_worker_connections
# With async workers this is no per-request limit: a worker whose loop does not
# come round for this long is restarted.
timeout = 30
graceful_timeout = 10
# Seconds gunicorn's async worker waits for a request on a connection: the
# first one too, and past it the connection is closed with no response, which
# a client cannot tell from a request cut after it was taken. gunicorn's 2 s
# loses the submissions of clients slow to send (a bad network, a client
# lagging under load: "no HTTP status line"). nginx's default; more than a
# load balancer's idle timeout (60 s on AWS), as gunicorn's docs advise.
keepalive = 75
loglevel = _settings.log_level
accesslog = "-" if _settings.log_level == "debug" else None
# No --preload: each worker builds its app (and, lazily, its broker
# connections) after the fork and after gevent's monkey-patching.
preload_app = False
# gunicorn's control socket has one default path per user: two web processes
# on one machine would fight over it, and chatqueue does not use it.
control_socket_disable = True


def post_worker_init(worker: Any) -> None:
    """Metrics: listen for every process's snapshots and send this one's, at once."""
    from web.metrics import on_worker_start

    on_worker_start(worker.wsgi)


def worker_exit(server: Any, worker: Any) -> None:
    """Metrics: this process's last snapshot."""
    from web.metrics import on_worker_exit

    on_worker_exit()


def on_starting(server: Any) -> None:
    """Raise the open-file limit: every stream holds a socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * worker_connections + 1024
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
