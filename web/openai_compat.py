"""The OpenAI drop-in: ``/openai/v1`` is a ``base_url`` for any OpenAI client.

``POST /openai/v1/chat/completions`` goes through the same queue path as
everything else (submit to the input queue, read the response queue), then
answers as OpenAI does:

* ``stream: true``: Server-Sent Events ``data: <chat.completion.chunk>``, then
  ``data: [DONE]``. The first message is awaited before any header is sent,
  so a failure before the answer starts is still an HTTP status with an
  OpenAI error object (the SDK raises ``BadRequestError``,
  ``AuthenticationError``, ``NotFoundError``, ``RateLimitError``,
  ``InternalServerError``... for it). A failure mid-stream is a ``data:``
  error object, which the SDK raises as ``APIError``. A RabbitMQ restart
  before the answer began is not a failure: the request is submitted again
  (:func:`web.responses.ask`).
* ``stream: false`` (OpenAI's default): the ``chat.completion``, as JSON.

``GET /openai/v1/models`` lists the LLM server's models (the configured
``OPENAI_MODEL`` first), or only ``OPENAI_MODEL`` if the LLM cannot say.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx2
from flask import Blueprint, Response, jsonify, request, stream_with_context

from app.errors import UpstreamError
from app.protocol import Kind
from config.upstreams import Upstream
from web.auth import current_key
from web.client import ClientGone
from web.errors import AnswerTimeout
from web.responses import Answer, ask
from web.router import Delivery
from web.services import services
from web.sse import SSE_HEADERS, events
from web.submit import read_json_body

logger = logging.getLogger(__name__)

bp = Blueprint("openai", __name__, url_prefix="/openai/v1")

UID_HEADER = "X-Chatqueue-Uid"
MODELS_TIMEOUT = 5.0


def json_answer(body: str, status: int, uid: str) -> Response:
    headers = {UID_HEADER: uid}
    if '"queue_timeout"' in body:
        # The request waited its queue_timeout: the openai SDK would send it
        # again (it retries a 504 by itself, unless told not to), to wait again.
        headers["x-should-retry"] = "false"
    return Response(body, status=status, mimetype="application/json", headers=headers)


@bp.post("/chat/completions")
def chat_completions() -> Response:
    svc = services()
    settings = svc.settings
    data = read_json_body(settings.max_body_bytes)
    data.setdefault("stream", False)  # OpenAI's default, not chatqueue's
    data["queue_updates"] = True  # for this route to see whether it waits
    deadline = time.monotonic() + settings.web_answer_timeout
    try:
        accepted, answer, first = ask(
            svc, data, current_key(), request.environ, settings.web_answer_timeout
        )
    except ClientGone:
        return Response(status=499)
    uid = accepted.uid
    streaming = False
    try:
        first = _first_of_answer(answer, first, deadline, stream=accepted.stream)
        if first is None:
            raise AnswerTimeout(
                f"no answer began within {settings.web_answer_timeout:g} s (WEB_ANSWER_TIMEOUT): "
                "are workers running, and is the LLM up?"
            )
        if first.kind == "error" or first.status is not None:
            return json_answer(first.body, first.status or 502, uid)
        if accepted.stream:
            streaming = True
            return Response(
                stream_with_context(events(answer, settings.sse_keepalive, first=first, ids=False)),
                mimetype="text/event-stream",
                headers={**SSE_HEADERS, UID_HEADER: uid},
            )
        if first.kind == "completion":
            return json_answer(first.body, 200, uid)
        raise UpstreamError(f"uid {uid}: the answer ended before a completion came")
    finally:
        if not streaming:
            answer.close()


def _first_of_answer(
    answer: Answer, first: Delivery | None, deadline: float, *, stream: bool
) -> Delivery | None:
    """The first message to answer with: the first of the answer, or, for a
    stream whose request waits for a slot, its place (the stream then starts,
    its place as comments). Places are skipped otherwise: position 0 (its
    call starts) and a ``stream: false`` answer, which has nowhere to show them."""
    while first is not None and first.kind == Kind.QUEUE:
        if stream and _position(first) > 0:
            return first
        first = answer.next(max(0.0, deadline - time.monotonic()))
    return first


def _position(delivery: Delivery) -> int:
    try:
        position = json.loads(delivery.body).get("position")
    except (ValueError, AttributeError):
        return 0
    return position if isinstance(position, int) else 0


@bp.get("/models")
def models() -> Response:
    """The models each upstream serves (the patterns that name one model),
    with what an upstream's own ``/models`` lists when it serves every model
    (the default upstream); ``OPENAI_MODEL`` first."""
    settings = services().settings
    ids: list[str] = [settings.openai_model]
    owners: dict[str, str] = {}
    for upstream in settings.upstreams.all:
        named = upstream.listed_models
        if "*" in upstream.models:
            named = [*named, *_listed_by(upstream)]
        for model in named:
            if model not in ids:
                ids.append(model)
            owners.setdefault(model, upstream.name)
    if settings.upstreams.route(settings.openai_model) is None:
        ids.remove(settings.openai_model)
    return jsonify(
        object="list",
        data=[
            {"id": i, "object": "model", "created": 0, "owned_by": owners.get(i, "chatqueue")}
            for i in ids
        ],
    )


def _listed_by(upstream: Upstream) -> list[str]:
    """What the upstream's own ``GET /models`` lists; nothing if it cannot say."""
    try:
        response = httpx2.get(
            upstream.url.rstrip("/") + "/models",
            headers={"Authorization": f"Bearer {upstream.api_key}"},
            timeout=MODELS_TIMEOUT,
        )
        response.raise_for_status()
        listed: Any = response.json().get("data", [])
    except (httpx2.HTTPError, ValueError, AttributeError) as exc:
        logger.warning("upstream %s: its model list is unavailable (%r)", upstream.name, exc)
        return []
    return [m["id"] for m in listed if isinstance(m, dict) and isinstance(m.get("id"), str)]
