"""The web front's gunicorn worker serves a connection it accepted as its
listener closed (a graceful reload), where gunicorn's own gevent worker
closes it unanswered (https://github.com/benoitc/gunicorn/issues/712)."""

from __future__ import annotations

import json
import select
import socket
from typing import Any

from gunicorn.config import Config
from gunicorn.glogging import Logger

import config.gunicorn
from config.gunicorn_worker import Worker
from tests.support import Web, about, holds_for


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


def test_a_request_that_comes_seconds_after_its_connection_is_answered(web: Web) -> None:
    """gunicorn's async workers give the first request on a connection, as each
    later one, ``keepalive`` seconds to arrive, and close the connection
    silently past that: a client on a slow network, or one whose loop lags
    between its connect and its write (under load), would get a closed
    connection and no status line, and could not know whether its POST was
    taken. The web front's ``keepalive`` leaves such a client time."""
    host, port = web.url.removeprefix("http://").split(":")
    body = json.dumps({"messages": [{"role": "user", "content": "Say hello."}]}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as client:
        # Silent for longer than gunicorn's default keepalive (2 s): the web
        # front keeps the connection open (readable would mean closed).
        holds_for(
            lambda: not select.select([client], [], [], 0)[0],
            3,
            about("the web front closed a silent connection", web),
        )
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: chatqueue\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        response = b""
        while chunk := client.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 202"), response
