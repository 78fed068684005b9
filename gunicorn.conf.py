"""gunicorn reads this file by default: the web front's settings live in config/gunicorn.py."""

from config.gunicorn import (
    accesslog,
    bind,
    control_socket_disable,
    graceful_timeout,
    keepalive,
    loglevel,
    on_starting,
    post_worker_init,
    preload_app,
    timeout,
    worker_class,
    worker_connections,
    worker_exit,
    workers,
)

__all__ = [
    "accesslog",
    "bind",
    "control_socket_disable",
    "graceful_timeout",
    "keepalive",
    "loglevel",
    "on_starting",
    "post_worker_init",
    "preload_app",
    "timeout",
    "worker_class",
    "worker_connections",
    "worker_exit",
    "workers",
]
