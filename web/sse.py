"""``GET /v1/chat/response?uid=``: an answer as Server-Sent Events.

Each response message becomes one event, ``id: <seq>`` and ``data: <body>``
(the body verbatim, an OpenAI ``data:`` payload), and the stream ends after
``data: [DONE]``. While the LLM is silent a comment line (``: ping``) goes out
every ``SSE_KEEPALIVE`` seconds, so proxies keep the connection and a gone
client is noticed. ``X-Accel-Buffering: no`` keeps nginx from buffering.

When a worker restarted the stream, ``id`` starts again from 0: a reader drops
what it had. A client whose connection dropped reads again with
``Last-Event-ID`` (``EventSource`` does it by itself) and gets the messages
after that one: the answer waits ``WEB_RESUME_GRACE`` seconds for it. If the
connection to RabbitMQ breaks, the stream pauses and goes on over a new one;
after ``WEB_RECONNECT_TIMEOUT`` an error object is sent and the stream ends
without ``[DONE]``, the answer left in its queue.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from flask import Blueprint, Response, request, stream_with_context

from app.errors import ChatqueueError, RequestError
from app.lifecycle import looks_issued
from app.protocol import Kind
from app.request import UID_RULE, is_valid_uid
from web.auth import may_read
from web.client import ClientGone
from web.errors import UnknownStream
from web.responses import Answer
from web.router import Delivery
from web.services import services

bp = Blueprint("sse", __name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PING = ": ping\n\n"


def data_lines(body: str) -> str:
    """``body`` as the ``data:`` field of one event (one line per line of it)."""
    return "".join(f"data: {line}\n" for line in body.split("\n"))


def event(delivery: Delivery, *, ids: bool = True) -> str:
    if delivery.kind == Kind.QUEUE:
        # The request's place while it waits: an event of its own type, which
        # EventSource passes only to a listener of ``queue``; no id, so a
        # resume goes on from the last message of the answer.
        return f"event: queue\n{data_lines(delivery.body)}\n"
    seq = "" if delivery.seq is None or not ids else f"id: {delivery.seq}\n"
    return f"{seq}{data_lines(delivery.body)}\n"


def comment(delivery: Delivery) -> str:
    """A ``queue`` message as an SSE comment (the drop-in: the openai SDK skips it)."""
    return f": {delivery.body}\n\n"


def error_event(exc: ChatqueueError) -> str:
    return f"{data_lines(json.dumps(exc.to_error_object()))}\n"


def events(
    answer: Answer,
    keepalive: float,
    *,
    first: Delivery | None = None,
    ids: bool = True,
) -> Iterator[str]:
    """The events of ``answer`` (starting with ``first`` if it was read
    already; ``id:`` lines unless ``ids`` is false, and then a request's place
    as comments, not ``queue`` events); always closes it, whatever ends the
    stream."""
    try:
        delivery = first if first is not None else answer.next(keepalive)
        while True:
            if delivery is None:
                yield PING
            elif delivery.done:
                try:
                    yield event(delivery, ids=ids)
                except GeneratorExit:  # not written: the client, or this process, went
                    answer.undelivered()
                    raise
                # Written: the queue goes, before the response ends.
                answer.close()
                return
            elif delivery.kind == Kind.QUEUE and not ids:
                yield comment(delivery)
            else:
                yield event(delivery, ids=ids)
            delivery = answer.next(keepalive)
    except ClientGone:
        answer.left()
    except GeneratorExit:  # the server closed the stream: a write to the client failed
        answer.left()
        raise
    except ChatqueueError as exc:
        # RabbitMQ stayed away, or the queue went: the answer is not the
        # client's doing, so it is neither cancelled nor deleted (but for a
        # drop-in or WebSocket reply, which nobody can read again); reading
        # again goes on.
        answer.close()
        yield error_event(exc)
    finally:
        # Anything else (the web process shutting down) leaves the answer be.
        answer.close()


def last_event_id() -> int | None:
    """The ``seq`` a reconnecting ``EventSource`` saw last (``Last-Event-ID``);
    None for a first read, or for an id this front never sent."""
    raw = request.headers.get("Last-Event-ID", "").strip()
    return int(raw) if raw.isdigit() and len(raw) < 10 else None


@bp.get("/v1/chat/response")
def response() -> Response:
    uid = request.args.get("uid", "")
    if not is_valid_uid(uid):
        raise RequestError(
            f"the query needs ?uid=<uid> of an accepted request ({UID_RULE})",
            code="invalid_uid",
            param="uid",
        )
    svc = services()
    if not may_read(uid):
        # The same answer as for a uid that does not exist: nothing leaks.
        raise UnknownStream(f"no stream with uid {uid} for this API key")
    wait = svc.settings.web_accept_wait if looks_issued(uid) else 0.0
    answer = Answer(svc, uid, environ=request.environ, wait=wait, after=last_event_id())
    return Response(
        stream_with_context(events(answer, svc.settings.sse_keepalive)),
        mimetype="text/event-stream",
        headers=SSE_HEADERS,
    )
