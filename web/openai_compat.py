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

import logging
from typing import Any

import httpx2
from flask import Blueprint, Response, jsonify, request, stream_with_context

from app.errors import UpstreamError
from web.auth import current_key
from web.client import ClientGone
from web.errors import AnswerTimeout
from web.responses import ask
from web.services import services
from web.sse import SSE_HEADERS, events
from web.submit import read_json_body

logger = logging.getLogger(__name__)

bp = Blueprint("openai", __name__, url_prefix="/openai/v1")

UID_HEADER = "X-Chatqueue-Uid"
MODELS_TIMEOUT = 5.0


def json_answer(body: str, status: int, uid: str) -> Response:
    return Response(body, status=status, mimetype="application/json", headers={UID_HEADER: uid})


@bp.post("/chat/completions")
def chat_completions() -> Response:
    svc = services()
    settings = svc.settings
    data = read_json_body(settings.max_body_bytes)
    data.setdefault("stream", False)  # OpenAI's default, not chatqueue's
    try:
        accepted, answer, first = ask(
            svc, data, current_key(), request.environ, settings.web_answer_timeout
        )
    except ClientGone:
        return Response(status=499)
    uid = accepted.uid
    streaming = False
    try:
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


@bp.get("/models")
def models() -> Response:
    settings = services().settings
    ids: list[str] = []
    try:
        response = httpx2.get(
            settings.openai_url.rstrip("/") + "/models",
            headers={"Authorization": f"Bearer {settings.openai_api_key}"},
            timeout=MODELS_TIMEOUT,
        )
        response.raise_for_status()
        listed: Any = response.json().get("data", [])
        ids = [m["id"] for m in listed if isinstance(m, dict) and isinstance(m.get("id"), str)]
    except (httpx2.HTTPError, ValueError, AttributeError) as exc:
        logger.warning("the LLM's model list is unavailable (%r); listing OPENAI_MODEL", exc)
    ordered = [settings.openai_model, *(i for i in ids if i != settings.openai_model)]
    return jsonify(
        object="list",
        data=[{"id": i, "object": "model", "created": 0, "owned_by": "chatqueue"} for i in ordered],
    )
