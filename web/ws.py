"""WebSocket ``/v1/chat/ws``: requests in, answers out, on one connection.

The client sends a chat-shaped request (the body of ``POST
/v1/chat/completions``) as a text frame; it receives each body of the answer
as a text frame, the last one ``[DONE]``. Then it may send the next request.
A request that cannot be accepted is answered with an error object and
``[DONE]``. Closing the socket mid-answer cancels the LLM call.

flask-sock swallows ``ConnectionClosed`` in its route wrapper, so the clean-up
of an answer is in ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

from flask import Flask
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from app.errors import ChatqueueError
from app.protocol import DONE
from app.request import decode_body
from web.auth import current_key
from web.responses import Answer
from web.services import services
from web.submit import submit_and_read
from web.ws_limits import bound_waiting_frames

logger = logging.getLogger(__name__)

# How often a waiting answer looks whether its client is still there.
POLL_SECONDS = 0.5


def init_ws(app: Flask, sock: Sock | None = None) -> Sock:
    settings: Any = app.extensions["chatqueue"].settings
    app.config["SOCK_SERVER_OPTIONS"] = {
        "ping_interval": settings.sse_keepalive,
        "max_message_size": settings.max_body_bytes,
    }
    sock = sock or Sock(app)

    def chat(ws: Any) -> None:
        bound_waiting_frames(ws)  # a client that floods the socket is closed (1008)
        try:
            serve(ws)
        except ConnectionClosed:
            raise
        except Exception:
            # Past the handshake an exception must not reach Flask: its error
            # page would be written into the WebSocket stream.
            logger.exception("the WebSocket handler failed; closing the socket")
            with contextlib.suppress(ConnectionClosed, OSError):
                ws.close(reason=1011, message="internal error")

    route: Any = sock.route("/v1/chat/ws", endpoint="chat_ws")
    route(chat)
    return sock


def serve(ws: Any) -> None:
    """Requests in, answers out, until the client closes the socket."""
    svc = services()
    key = current_key()
    while True:
        frame = ws.receive()
        if frame is None:
            continue
        raw = frame.encode("utf-8") if isinstance(frame, str) else frame
        try:
            data = decode_body(raw, svc.settings.max_body_bytes)
            accepted, replies = submit_and_read(svc, data, key)
            answer = Answer(svc, accepted.uid, replies=replies)
        except ChatqueueError as exc:
            ws.send(json.dumps(exc.to_error_object()))
            ws.send(DONE)
            continue
        forward(ws, answer)


def forward(ws: Any, answer: Answer) -> None:
    """Send the answer's bodies until ``[DONE]``; cancel it if the client leaves."""
    try:
        while True:
            try:
                delivery = answer.next(POLL_SECONDS)
            except ChatqueueError as exc:
                answer.close()  # RabbitMQ went away: a direct reply cannot be read again
                ws.send(json.dumps(exc.to_error_object()))
                ws.close(reason=1011, message="the answer broke off")
                return
            if delivery is None:
                if not ws.connected:
                    return
                continue
            if delivery.done:
                answer.close()
                ws.send(delivery.body)
                return
            ws.send(delivery.body)
    finally:
        answer.close()
