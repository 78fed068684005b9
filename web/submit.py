"""Submitting a request: the web front is one more client of the input queue.

``POST /v1/chat/completions`` (and the OpenAI drop-in, and the WebSocket)
validate a chat-shaped body with the worker's own rules, then hand it to the
input queue exactly as any client does, so the intake accepts it:

1. a uid: a fresh one when the body has none; with ``API_KEYS`` it carries an
   HMAC under the caller's key, so only that key reads its answer (a uid the
   client chose is taken only if it carries that tag);
2. a uid the client chose is refused (409) while its response queue exists:
   another request's answer lives there;
3. the response queue, declared before the request is published so the
   answer can be read at once; and the request, persistent, confirmed by the
   broker before the client hears 202. Both go in one round trip.

That is the whole broker work of a submission: one queue, one publish.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

from amqp.exceptions import NotFound
from flask import Blueprint, Response, jsonify, request, url_for
from kombu.exceptions import OperationalError

from app.broker import BROKER_ERRORS, RETRY_POLICY, declare_response_queue
from app.errors import BodyTooLarge, BrokerUnavailable, DuplicateRequest, RequestError
from app.lifecycle import new_uid, owned_by
from app.request import ChatRequest, decode_body, parse_request
from config import Settings
from web.auth import current_key
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


def submit(services: Services, data: dict[str, Any], key: str | None) -> ChatRequest:
    """Validate ``data`` and publish it to the input queue; the accepted request.

    ``key``: the caller's API key when ``API_KEYS`` is set (the uid is bound
    to it). Raises :class:`~app.errors.RequestError` (400, 413),
    :class:`DuplicateRequest` (409) or :class:`BrokerUnavailable` (503).
    """
    settings = services.settings
    accepted = parse_request(data, default_model=settings.openai_model, uid_required=False)
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
    try:
        with services.producer() as producer:
            # A pooled connection may have died with the broker (a restart):
            # the first broker error renews it, and the hand-off is tried again.
            for attempt in (1, 2):
                try:
                    hand_off(producer, settings, uid, raw, check_free=chosen)
                    break
                except BROKER_ERRORS as exc:
                    # OperationalError: kombu could not connect at all, retries included.
                    if attempt == 2 or isinstance(exc, OperationalError):
                        raise
                    logger.info("uid=%s: broker connection lost (%r); on a new one", uid, exc)
                    connection = producer.connection
                    connection.collect()
                    producer.revive(connection)
    except BROKER_ERRORS as exc:
        logger.warning("uid=%s: broker unavailable while submitting: %r", uid, exc)
        raise BrokerUnavailable(f"RabbitMQ cannot be reached ({exc}); try again later") from exc
    logger.info("uid=%s: submitted (model %s, stream %s)", uid, accepted.model, accepted.stream)
    return replace(accepted, uid=uid)


def hand_off(producer: Any, settings: Settings, uid: str, raw: bytes, *, check_free: bool) -> None:
    """Declare the response queue of ``uid`` and publish the request (confirmed)."""
    if check_free and _queue_exists(producer, settings.response_queue(uid)):
        raise DuplicateRequest(
            f"uid {uid} is in use: its answer has not been read yet (or its queue has not "
            "expired, RESPONSE_QUEUE_TTL): choose another uid, or send none to get a fresh one"
        )
    # No wait for the declare's answer: the publish that follows on the same
    # channel is routed after it, and its confirm answers for both.
    producer.revive(declare_response_queue(producer.channel, settings, uid, nowait=True))
    producer.publish(
        raw,
        exchange="",
        routing_key=settings.rabbitmq_queue,
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=2,
        retry=True,
        retry_policy=RETRY_POLICY,
    )


def _queue_exists(producer: Any, name: str) -> bool:
    # On a channel of its own: a missing queue closes the channel it is asked on.
    channel = producer.channel.connection.channel()
    try:
        channel.queue_declare(queue=name, passive=True)
    except NotFound:
        return False
    finally:
        if channel.is_open:
            channel.close()
    return True


@bp.post("/v1/chat/completions")
def create() -> tuple[Response, int]:
    svc = services()
    data = read_json_body(svc.settings.max_body_bytes)
    accepted = submit(svc, data, current_key())
    return jsonify(
        uid=accepted.uid,
        status="queued",
        response_url=url_for("sse.response", uid=accepted.uid, _external=True),
    ), 202
