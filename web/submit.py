"""Submitting a request: the web front is one more client of the input queue.

``POST /v1/chat/completions`` (and the OpenAI drop-in, and the WebSocket)
validate a chat-shaped body with the worker's own rules, then hand it to the
input queue exactly as any client does, so the consumer bootstep accepts it:

1. a uid (generated when the body has none);
2. the uid's claim, holding a fresh secret token and the owner (the hash of
   the caller's API key): a uid already claimed is 409, never a way to read
   another request's answer;
3. the response queue, declared before the request is published so the
   answer can be read at once;
4. the request, persistent, with the token in the ``x-chatqueue-claim``
   header (the bootstep sees the claim is the request's own), confirmed by
   the broker before the client hears 202.
"""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from dataclasses import replace
from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for
from kombu.exceptions import OperationalError

from app.broker import (
    BROKER_ERRORS,
    CLAIM_TOKEN_HEADER,
    RETRY_POLICY,
    claim_uid,
    declare_response_queue,
    read_claim,
)
from app.errors import BodyTooLarge, BrokerUnavailable, DuplicateRequest
from app.request import ChatRequest, decode_body, parse_request
from config import Settings
from web.auth import current_owner
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


def new_uid() -> str:
    return uuid.uuid4().hex


def submit(services: Services, data: dict[str, Any], owner: str) -> ChatRequest:
    """Validate ``data`` and publish it to the input queue; the accepted request.

    Raises :class:`~app.errors.RequestError` (400), :class:`DuplicateRequest`
    (409) or :class:`BrokerUnavailable` (503).
    """
    settings = services.settings
    accepted = parse_request(data, default_model=settings.openai_model, uid_required=False)
    uid = accepted.uid or new_uid()
    body = {k: v for k, v in data.items() if k != "key"}
    body["uid"] = uid
    token = secrets.token_urlsafe(24)
    try:
        with services.producer() as producer:
            # A pooled connection may have died with the broker (a restart):
            # the first broker error renews it, and the hand-off is tried again.
            for attempt in (1, 2):
                try:
                    hand_off(producer, settings, uid, token=token, owner=owner, body=body)
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


def hand_off(
    producer: Any, settings: Settings, uid: str, *, token: str, owner: str, body: dict[str, Any]
) -> None:
    """Claim ``uid``, declare its response queue, publish the request (confirmed)."""
    if not claim_uid(producer.channel, settings, uid, token=token, owner=owner):
        # Taken: by another request, or by this one on a connection that then broke.
        claim = read_claim(producer.connection, settings, uid)
        if claim is None or not secrets.compare_digest(str(claim.get("token")), token):
            raise DuplicateRequest(
                f"uid {uid} is in use (taken in the last {settings.dedup_window} s, "
                "DEDUP_WINDOW): choose another uid, or send none to get a fresh one"
            )
    producer.revive(declare_response_queue(producer.channel, settings, uid))
    producer.publish(
        json.dumps(body),
        exchange="",
        routing_key=settings.rabbitmq_queue,
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=2,
        headers={CLAIM_TOKEN_HEADER: token},
        retry=True,
        retry_policy=RETRY_POLICY,
    )


@bp.post("/v1/chat/completions")
def create() -> tuple[Response, int]:
    svc = services()
    data = read_json_body(svc.settings.max_body_bytes)
    accepted = submit(svc, data, current_owner())
    return jsonify(
        uid=accepted.uid,
        status="queued",
        response_url=url_for("sse.response", uid=accepted.uid, _external=True),
    ), 202
