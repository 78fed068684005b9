"""The request: a JSON chat request as it arrives on the input queue.

Two shapes are accepted (docs/protocol.md):

* simple: ``{"key": "<uid>", "message": "<prompt>"}``
* chat: ``{"uid": "<uid>", "messages": [...], "model": ..., "stream": true, ...}``

:func:`parse_request` turns raw bytes into a validated :class:`ChatRequest` or
raises :class:`~app.errors.RequestError` saying what is wrong and how to fix it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from app.errors import BodyTooLarge, RequestError

UID_PATTERN = re.compile(r"[A-Za-z0-9\-_.:]{1,128}")
UID_RULE = "1 to 128 characters of A-Z a-z 0-9 - _ . :"
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_NAME = 256  # model and username
MAX_REPLY_TO = 255  # an AMQP short string
# OpenAI's service tiers; chatqueue orders by priority, then default (auto,
# scale and none alike), then flex (app/waiting.py).
SERVICE_TIERS = frozenset({"auto", "default", "flex", "scale", "priority"})
MAX_QUEUE_TIMEOUT = 86_400.0
# The header of an input message in which the web front names the tenant of a
# request (a digest of its API key); without it, the tenant is the username.
TENANT_HEADER = "x-chatqueue-tenant"
# RabbitMQ's direct reply-to: the pseudo-queue a client consumes, and the prefix
# of the names the broker puts in ``reply_to`` in its place.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stop(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(s, str) for s in value)
    )


# The OpenAI fields passed through to the LLM, each with its type check and the
# words of the error when it fails. Anything else in a request is not forwarded.
PASSTHROUGH: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (_number, "a number"),
    "top_p": (_number, "a number"),
    "max_tokens": (_integer, "an integer"),
    "max_completion_tokens": (_integer, "an integer"),
    "stop": (_stop, "a string or a list of strings"),
    "seed": (_integer, "an integer"),
    "presence_penalty": (_number, "a number"),
    "frequency_penalty": (_number, "a number"),
    "logit_bias": (lambda v: isinstance(v, dict), "an object"),
    "logprobs": (lambda v: isinstance(v, bool), "a boolean"),
    "top_logprobs": (_integer, "an integer"),
    "response_format": (lambda v: isinstance(v, dict), "an object"),
    "tools": (lambda v: isinstance(v, list), "a list"),
    "tool_choice": (lambda v: isinstance(v, str | dict), "a string or an object"),
    "parallel_tool_calls": (lambda v: isinstance(v, bool), "a boolean"),
    "stream_options": (lambda v: isinstance(v, dict), "an object"),
    "reasoning_effort": (lambda v: isinstance(v, str), "a string"),
    "user": (lambda v: isinstance(v, str), "a string"),
}


@dataclass(frozen=True)
class ChatRequest:
    """A validated request, as handed from the consumer to the task."""

    uid: str
    messages: list[dict[str, Any]]
    model: str
    stream: bool = True
    username: str = "anonymous"
    params: dict[str, Any] = field(default_factory=dict)
    reply_to: str | None = None
    # Its place while it waits (app/waiting.py): its tier, its tenant (the web
    # front's API key, else the username), how long it may wait (None:
    # QUEUE_TIMEOUT), and whether it is told its place.
    service_tier: str | None = None
    tenant: str | None = None
    queue_timeout: float | None = None
    queue_updates: bool = False

    def summary(self) -> str:
        """The request in one line, without its content."""
        return (
            f"[model={self.model!r}, messages={len(self.messages)}, "
            f"stream={self.stream}, user={self.username!r}]"
        )

    @property
    def tier(self) -> str:
        """Its ``service_tier`` as the line orders it (``auto`` and none are ``default``)."""
        return self.service_tier if self.service_tier in ("priority", "flex") else "default"

    def to_task(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_task(cls, data: Mapping[str, Any]) -> ChatRequest:
        return cls(**data)


def is_valid_uid(uid: object) -> bool:
    return isinstance(uid, str) and UID_PATTERN.fullmatch(uid) is not None


class QueueNames(Protocol):
    """The names of chatqueue's own queues (``config.Settings`` has them)."""

    @property
    def rabbitmq_queue(self) -> str: ...
    @property
    def task_queue(self) -> str: ...
    @property
    def dead_letter_queue(self) -> str: ...
    @property
    def chatqueue_namespace(self) -> str: ...
    @property
    def response_queue_prefix(self) -> str: ...
    @property
    def reply_queue_prefix(self) -> str: ...


def owned_queues(names: QueueNames) -> Callable[[str], bool]:
    """Whether a queue is chatqueue's, where no answer may go: the input, task
    and dead-letter queues, any ``<namespace>.`` name, and any response queue;
    but a web process's reply queue (``<namespace>.replies.<token>``,
    web/publisher.py), where the web front asks for its answers."""
    exact = frozenset({names.rabbitmq_queue, names.task_queue, names.dead_letter_queue})
    prefixes = (f"{names.chatqueue_namespace}.", names.response_queue_prefix)
    replies = names.reply_queue_prefix

    def owned(queue: str) -> bool:
        if queue.startswith(replies):
            return False
        return queue in exact or queue.startswith(prefixes)

    return owned


def is_direct_reply_to(reply_to: str) -> bool:
    """Whether ``reply_to`` is RabbitMQ's direct reply-to (as sent, or as the broker names it)."""
    return reply_to == DIRECT_REPLY_TO or reply_to.startswith(DIRECT_REPLY_TO + ".")


def check_reply_to(reply_to: str, *, owned: Callable[[str], bool]) -> None:
    """Refuse a ``reply_to`` that names a queue chatqueue owns.

    Answering there would put chunks on the input or task queue (a loop), on
    the dead-letter queue, or into another request's answer. A request's own
    ``response_<uid>`` is refused too: it is where the answer goes without
    ``reply_to``. Direct reply-to is always allowed.
    """
    if is_direct_reply_to(reply_to) or not owned(reply_to):
        return
    raise RequestError(
        f"reply_to {reply_to!r} names a queue of chatqueue's own (the input, task or "
        "dead-letter queue, a queue of its namespace, or a response queue): reply to a "
        "queue of your own "
        f"(a server-named exclusive queue, or {DIRECT_REPLY_TO!r}), or leave reply_to "
        "unset and read the response queue of your uid",
        code="invalid_reply_to",
        param="reply_to",
    )


def decode_body(body: bytes | str, max_bytes: int) -> dict[str, Any]:
    """Bytes to a JSON object, or :class:`RequestError`."""
    if len(body) > max_bytes:
        raise BodyTooLarge(
            f"the request body is {len(body)} bytes; the limit is {max_bytes} (MAX_BODY_BYTES)"
        )
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(
                f"the request body is not UTF-8 ({exc.reason} at byte {exc.start})",
                code="invalid_encoding",
            ) from None
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise RequestError(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} "
            f"column {exc.colno}",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise RequestError(
            f"the request body must be a JSON object, not {type(data).__name__}",
            code="invalid_json",
        )
    return data


def parse_request(
    data: Mapping[str, Any],
    *,
    default_model: str,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    uid_required: bool = True,
    owned_queue: Callable[[str], bool] | None = None,
    tenant: str | None = None,
) -> ChatRequest:
    """Validate a decoded request. Raises :class:`RequestError` with ``uid``
    and ``reply_to`` set when they are known, so the caller can answer.

    With ``owned_queue`` (see :func:`owned_queues`), a ``reply_to`` it claims
    is refused first (:func:`check_reply_to`, ``invalid_reply_to``), and that
    error carries no ``reply_to``: nothing is ever sent to such a queue.
    """
    if reply_to is not None and not (
        isinstance(reply_to, str) and 0 < len(reply_to) <= MAX_REPLY_TO
    ):
        reply_to = None
    uid = data.get("uid", data.get("key", correlation_id))
    try:
        if reply_to is not None and owned_queue is not None:
            try:
                check_reply_to(reply_to, owned=owned_queue)
            except RequestError:
                reply_to = None
                raise
        return _parse(data, uid, default_model, reply_to, uid_required, tenant=tenant)
    except RequestError as exc:
        exc.uid = uid if is_valid_uid(uid) else None
        exc.reply_to = reply_to
        raise


def _parse(
    data: Mapping[str, Any],
    uid: object,
    default_model: str,
    reply_to: str | None,
    uid_required: bool,
    *,
    tenant: str | None,
) -> ChatRequest:
    if uid is None and uid_required:
        raise RequestError(
            'the request has no uid: set "uid" (or "key"), or the AMQP correlation_id',
            code="missing_uid",
            param="uid",
        )
    if uid is not None and not is_valid_uid(uid):
        raise RequestError(f"invalid uid: use {UID_RULE}", code="invalid_uid", param="uid")

    if "messages" in data:
        messages = _messages(data["messages"])
    elif "message" in data:
        prompt = data["message"]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(
                '"message" must be a non-empty string', code="invalid_type", param="message"
            )
        messages = [{"role": "user", "content": prompt}]
    else:
        raise RequestError(
            'the request needs "messages" (a list of chat messages) or "message" (a prompt)',
            code="missing_messages",
            param="messages",
        )

    model = data.get("model", default_model)
    if not isinstance(model, str) or not 0 < len(model) <= MAX_NAME:
        raise RequestError(
            f'"model" must be a string of 1 to {MAX_NAME} characters',
            code="invalid_type",
            param="model",
        )
    stream = data.get("stream", True)
    if not isinstance(stream, bool):
        raise RequestError('"stream" must be true or false', code="invalid_type", param="stream")
    username = data.get("username", "anonymous")
    if not isinstance(username, str) or len(username) > MAX_NAME:
        raise RequestError(
            f'"username" must be a string of at most {MAX_NAME} characters',
            code="invalid_type",
            param="username",
        )

    params: dict[str, Any] = {}
    for name, (check, expected) in PASSTHROUGH.items():
        if name in data and data[name] is not None:
            if not check(data[name]):
                raise RequestError(f'"{name}" must be {expected}', code="invalid_type", param=name)
            params[name] = data[name]
    if not stream:
        params.pop("stream_options", None)
    tier = data.get("service_tier")
    if tier is not None and tier not in SERVICE_TIERS:
        raise RequestError(
            f'"service_tier" must be one of {", ".join(sorted(SERVICE_TIERS))}',
            code="invalid_value",
            param="service_tier",
        )
    queue_timeout = data.get("queue_timeout")
    if queue_timeout is not None and not (
        _number(queue_timeout) and 0 < queue_timeout <= MAX_QUEUE_TIMEOUT
    ):
        raise RequestError(
            f'"queue_timeout" must be a number of seconds, more than 0 and at most '
            f"{MAX_QUEUE_TIMEOUT:.0f}",
            code="invalid_type",
            param="queue_timeout",
        )
    updates = data.get("queue_updates", False)
    if not isinstance(updates, bool):
        raise RequestError(
            '"queue_updates" must be true or false', code="invalid_type", param="queue_updates"
        )
    return ChatRequest(
        uid=str(uid) if uid is not None else "",
        messages=messages,
        model=model,
        stream=stream,
        username=username,
        params=params,
        reply_to=reply_to,
        service_tier=tier,
        tenant=tenant,
        queue_timeout=None if queue_timeout is None else float(queue_timeout),
        queue_updates=updates,
    )


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RequestError(
            '"messages" must be a non-empty list of {"role", "content"} objects',
            code="invalid_type",
            param="messages",
        )
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object", code="invalid_type", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(
                f"{where}.role must be one of {', '.join(sorted(ROLES))}",
                code="invalid_type",
                param=f"{where}.role",
            )
        content = message.get("content")
        if not (isinstance(content, str | list) or (content is None and role == "assistant")):
            raise RequestError(
                f"{where}.content must be a string or a list of content parts",
                code="invalid_type",
                param=f"{where}.content",
            )
    return value
