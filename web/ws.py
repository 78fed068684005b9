"""WebSocket ``/v1/chat/ws``: requests in, answers out, on one connection.

The client sends a chat-shaped request (the body of ``POST
/v1/chat/completions``) as a text frame; it receives each body of the answer
as a text frame, the last one ``[DONE]``. Then it may send the next request.
A request that cannot be accepted is answered with an error object and
``[DONE]``. Closing the socket mid-answer cancels the LLM call. A RabbitMQ
restart before the answer began is not a failure: the request is submitted
again; one mid-answer ends it with an error object (the socket is closed).
A worker that starts an answer again mid-answer (its first worker died, or
handed it back at a warm shutdown) ends it with an error object and ``[DONE]``
(``answer_restarted``): the frames cannot tell the client to drop what it had.
A client that does not read its frames while more than ``WEB_REPLY_BUFFER``
bytes of its answer wait gets the same end (``reader_too_slow``), and the LLM
call is cancelled.

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
from wsproto.utilities import LocalProtocolError

from app.errors import BrokerUnavailable, ChatqueueError
from app.protocol import DONE, Kind
from app.request import decode_body
from web.auth import current_key
from web.errors import AnswerCut
from web.responses import Answer, Resubmission
from web.services import Services, services
from web.ws_limits import bound_waiting_frames, whole_frames

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
        whole_frames(ws, settings.sse_keepalive)  # whole frames for a slow client
        try:
            serve(ws)
        except ConnectionClosed:
            raise
        except (OSError, LocalProtocolError) as exc:
            # The client went, or stopped reading, or did not answer a ping
            # (the socket is closing): its answer was cancelled on the way out.
            logger.info("the WebSocket client's connection ended: %r", exc)
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
            answer_request(ws, svc, decode_body(raw, svc.settings.max_body_bytes), key)
        except ChatqueueError as exc:
            ws.send(json.dumps(exc.to_error_object()))
            ws.send(DONE)


def answer_request(ws: Any, svc: Services, data: dict[str, Any], key: str | None) -> None:
    """Submit one request and forward its answer. RabbitMQ going away before
    the answer's first body was sent is no failure: the request is submitted
    again, as the drop-in does (:class:`~web.responses.Resubmission`)."""
    again = Resubmission(svc.settings)
    while True:
        accepted, replies = again.submit(svc, data, key)
        lost = forward(ws, Answer(svc, accepted.uid, replies=replies))
        if lost is None:
            return
        again.lost(lost, accepted.uid)


def forward(ws: Any, answer: Answer) -> BrokerUnavailable | None:
    """Send the answer's bodies until ``[DONE]``; cancel it if the client
    leaves. RabbitMQ gone before the first body: that error, nothing sent."""
    sent = False
    try:
        while True:
            try:
                delivery = answer.next(POLL_SECONDS)
            except AnswerCut as exc:
                answer.close()  # cancels what runs still: it can reach nobody
                ws.send(json.dumps(exc.to_error_object()))
                ws.send(DONE)
                return None
            except ChatqueueError as exc:
                answer.close()  # RabbitMQ stayed away, or the reply queue was lost
                if not sent and isinstance(exc, BrokerUnavailable):
                    return exc
                ws.send(json.dumps(exc.to_error_object()))
                ws.close(reason=1011, message="the answer broke off")
                return None
            if delivery is None:
                if not ws.connected:
                    return None
                continue
            if delivery.done:
                answer.close()
                ws.send(delivery.body)
                return None
            ws.send(delivery.body)
            # A place is no part of the answer: lost before it began, the
            # request is submitted again.
            sent = sent or delivery.kind != Kind.QUEUE
    finally:
        answer.close()
