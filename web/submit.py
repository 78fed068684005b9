"""Submitting a request: the web front is one more client of the input queue.

``POST /v1/chat/completions`` (and the OpenAI drop-in, and the WebSocket)
validate a chat-shaped body with the worker's own rules, then hand it to the
input queue exactly as any client does, so the intake accepts it:

1. a uid: a fresh one when the body has none; with ``API_KEYS`` it carries an
   HMAC under the caller's key, so only that key reads its answer (a uid the
   client chose is taken only if it carries that tag);
2. a uid the client chose is refused (409) while its response queue exists:
   another request's answer lives there;
3. the request, persistent, confirmed by the broker before the client hears
   202, through the process's :class:`~web.publisher.Publisher`: one round
   trip, shared with every submission in flight (503 at once while a
   memory or disk alarm blocks publishing). The response queue of a
   fresh uid is declared by the worker that accepts the request (a reader
   waits for it, ``WEB_ACCEPT_WAIT``); that of a uid the client chose is
   declared with the request, so that a duplicate finds it at once.

That is the whole broker work of a submission: one queue, one publish.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for

from app.errors import (
    BodyTooLarge,
    BrokerBlocked,
    BrokerUnavailable,
    DuplicateRequest,
    ModelNotFound,
    RequestError,
)
from app.lifecycle import new_uid, owned_by
from app.request import SERVICE_TIERS, ChatRequest, decode_body, parse_request
from app.waiting import tier_rank
from web.auth import current_key
from web.publisher import Replies
from web.services import Services, services

logger = logging.getLogger(__name__)

bp = Blueprint("submit", __name__)


def read_json_body(max_bytes: int) -> dict[str, Any]:
    """The request's JSON object; 413 before reading a body announced too large."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise BodyTooLarge(
            f"the request body is {length} bytes; the limit is {max_bytes} (MAX_BODY_BYTES)"
        )
    return decode_body(request.get_data(cache=False), max_bytes)


def tenant_of(key: str | None) -> str | None:
    """The tenant of a request for the fair share: its API key, by a digest
    (a key never travels in a message); None without keys (its username)."""
    if key is None:
        return None
    return "key:" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def capped(data: dict[str, Any], cap: str | None) -> dict[str, Any]:
    """``data`` with its ``service_tier`` lowered to ``cap`` if it asks for more."""
    tier = data.get("service_tier")
    if cap is None or tier not in SERVICE_TIERS or tier_rank(tier) >= tier_rank(cap):
        return data  # no cap, a tier below it, or none that parse_request takes
    return {**data, "service_tier": cap}


def submit(services: Services, data: dict[str, Any], key: str | None) -> ChatRequest:
    """Validate ``data`` and publish it to the input queue; the accepted request,
    whose answer goes to ``response_<uid>``.

    ``key``: the caller's API key when ``API_KEYS`` is set (the uid is bound
    to it). Raises :class:`~app.errors.RequestError` (400, 413),
    :class:`DuplicateRequest` (409) or :class:`BrokerUnavailable` (503).
    """
    return _submit(services, data, key, reading=False)[0]


def submit_and_read(
    services: Services, data: dict[str, Any], key: str | None
) -> tuple[ChatRequest, Replies]:
    """As :func:`submit`, for a caller that reads the answer at once in this
    process (the drop-in, the WebSocket): it comes back to the process's
    reply queue (web/publisher.py), and no response queue is made."""
    accepted, replies = _submit(services, data, key, reading=True)
    assert replies is not None
    return accepted, replies


def _submit(
    services: Services, data: dict[str, Any], key: str | None, *, reading: bool
) -> tuple[ChatRequest, Replies | None]:
    settings = services.settings
    data = capped(data, settings.tier_cap(key))
    accepted = parse_request(data, default_model=settings.openai_model, uid_required=False)
    if settings.upstreams.route(accepted.model) is None:
        raise ModelNotFound.of(accepted.model)
    chosen = bool(accepted.uid)
    uid = accepted.uid or new_uid(key)
    if chosen and key is not None and not owned_by(uid, key):
        raise RequestError(
            "with API keys, uids are issued by chatqueue: send no uid to get one "
            "(a uid is bound to the key that submitted it)",
            code="invalid_uid",
            param="uid",
        )
    body = {k: v for k, v in data.items() if k != "key"}
    body["uid"] = uid
    # What the worker will read, byte for byte, checked against the same limit.
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(raw) > settings.max_body_bytes:
        raise BodyTooLarge(
            f"the request is {len(raw)} bytes as published; the limit is "
            f"{settings.max_body_bytes} (MAX_BODY_BYTES)"
        )
    for attempt in (1, 2):
        try:
            publisher = services.publisher()
            if chosen and publisher.queue_exists(settings.response_queue(uid)):
                raise DuplicateRequest(
                    f"uid {uid} is in use: its answer has not been read yet (or its queue has "
                    "not expired, RESPONSE_QUEUE_TTL): choose another uid, or send none to get "
                    "a fresh one"
                )
            # A fresh uid's response queue is declared by the worker as it
            # accepts the request (declaring ~1,000 durable queues took the
            # broker ~6 s here: a burst's 202s must not wait for that); a uid
            # the client chose is declared now, so a duplicate sees it at once.
            replies = publisher.submit(
                uid, raw, declare=chosen and not reading, reply=reading, tenant=tenant_of(key)
            )
            break
        except BrokerBlocked as exc:
            # Not again: the broker is short of memory or disk (and a publish
            # that was not confirmed in time may yet be taken: no second copy).
            logger.warning("uid=%s: %s", uid, exc)
            raise
        except BrokerUnavailable as exc:
            # Most often a connection that died with the broker (a restart):
            # once more, on a new one.
            if attempt == 2:
                logger.warning("uid=%s: broker unavailable while submitting: %s", uid, exc)
                raise
            logger.info("uid=%s: %s; on a new connection", uid, exc)
    logger.info("uid=%s: submitted (model %s, stream %s)", uid, accepted.model, accepted.stream)
    return replace(accepted, uid=uid), replies


@bp.post("/v1/chat/completions")
def create() -> tuple[Response, int]:
    svc = services()
    data = read_json_body(svc.settings.max_body_bytes)
    # Its SSE reader passes its place on as ``queue`` events.
    data.setdefault("queue_updates", True)
    accepted = submit(svc, data, current_key())
    return jsonify(
        uid=accepted.uid,
        status="queued",
        response_url=url_for("sse.response", uid=accepted.uid, _external=True),
    ), 202
