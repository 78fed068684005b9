"""The web front's gunicorn worker serves a connection it accepted as its
listener closed (a graceful reload), where gunicorn's own gevent worker
closed it unanswered (gunicorn issue #712)."""

from __future__ import annotations

import socket
from typing import Any

from gunicorn.config import Config
from gunicorn.glogging import Logger

import config.gunicorn
from config.gunicorn_worker import Worker


def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"served on port {environ['SERVER_PORT']}".encode()]


def test_a_connection_accepted_as_the_listener_closes_is_served() -> None:
    cfg = Config()
    cfg.set("worker_class", config.gunicorn.worker_class)
    assert cfg.worker_class is Worker, "gunicorn web:app does not run this worker"

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    worker = Worker(0, 0, [listener], None, 30, cfg, Logger(cfg))
    worker.wsgi = hello
    worker._names = {id(listener): listener.getsockname()}  # what run() records

    client = socket.create_connection(("127.0.0.1", port))
    accepted, addr = listener.accept()
    # The reload: the listener closes before this connection's handler runs.
    listener.close()
    client.sendall(b"GET / HTTP/1.1\r\nHost: chatqueue\r\nConnection: close\r\n\r\n")
    try:
        worker.handle(listener, accepted, addr)
    finally:
        worker.tmp.close()

    client.settimeout(10)
    response = b""
    while chunk := client.recv(65536):
        response += chunk
    client.close()
    assert response.startswith(b"HTTP/1.1 200 OK"), response
    assert f"served on port {port}".encode() in response
