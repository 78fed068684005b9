"""chatqueue's queues on RabbitMQ and the per-process publishing connections.

Queues (names from :class:`config.Settings`):

* the input queue (``RABBITMQ_QUEUE``), durable: what clients publish to;
* the task queue (``<ns>.tasks``), durable: Celery's, from the consumer to the tasks;
* the dead-letter queue (``<ns>.dead-letter``), durable: rejected requests,
  with the reason in their headers;
* ``response_<uid>``, one per request, declared once at acceptance, durable
  (an answer outlives a broker restart) and with ``x-expires`` so that
  nobody's forgotten queue lives for ever;
* ``<ns>.claim.<uid>``, one per uid for ``DEDUP_WINDOW`` seconds: a register
  that holds at most one message and refuses a second publish, so the broker
  itself tells the first request with a uid from a duplicate.
  ``<ns>.claim.<uid>/info`` holds a copy of the claim (token and owner) for
  reading: the register itself is never read (see :func:`claim_uid`).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from typing import Any

from amqp.exceptions import AMQPError, MessageNacked, NotFound, PreconditionFailed
from kombu import Connection, Exchange, Producer, Queue
from kombu.exceptions import OperationalError
from kombu.pools import ProducerPool
from kombu.transport.pyamqp import Channel

from app.errors import RequestError
from config import Settings

logger = logging.getLogger(__name__)

DEFAULT_EXCHANGE = Exchange("")
# What a broker call raises when the connection or the broker is in trouble
# (the request itself is fine): try again on a new connection, or requeue.
BROKER_ERRORS = (AMQPError, OperationalError, ConnectionError, OSError)
# A publish that fails because the broker went away is retried on a new
# connection for up to about 10 s before the caller hears of it.
RETRY_POLICY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}


def input_queue(settings: Settings) -> Queue:
    return Queue(settings.rabbitmq_queue, DEFAULT_EXCHANGE, settings.rabbitmq_queue, durable=True)


def task_queue(settings: Settings) -> Queue:
    return Queue(settings.task_queue, DEFAULT_EXCHANGE, settings.task_queue, durable=True)


def dead_letter_queue(settings: Settings) -> Queue:
    return Queue(
        settings.dead_letter_queue, DEFAULT_EXCHANGE, settings.dead_letter_queue, durable=True
    )


def response_queue_arguments(settings: Settings) -> dict[str, Any]:
    return {"x-expires": settings.response_queue_ttl * 1000}


def declare_response_queue(
    channel: Channel, settings: Settings, uid: str, *, nowait: bool = False
) -> Channel:
    """Declare ``response_<uid>``; return the channel to go on with.

    A queue the client declared itself with other arguments is used as it is:
    RabbitMQ closes the channel on the mismatch, so a fresh one is returned.
    With ``nowait`` no answer is awaited: a mismatch then surfaces as
    :class:`PreconditionFailed` from the channel's next synchronous call.
    """
    name = settings.response_queue(uid)
    try:
        channel.queue_declare(
            queue=name,
            durable=True,
            auto_delete=False,
            arguments=response_queue_arguments(settings),
            nowait=nowait,
        )
    except PreconditionFailed:
        logger.info("uid=%s: %s exists with other arguments; using it as it is", uid, name)
        channel = channel.connection.channel()
    return channel


CLAIM_TOKEN_HEADER = "x-chatqueue-claim"


def _claim_queue(channel: Channel, settings: Settings, name: str) -> str:
    # No wait for the declare's answer: the publish that follows on the same
    # channel is routed after it, and its confirm answers for both.
    channel.queue_declare(
        queue=name,
        durable=True,
        auto_delete=False,
        arguments={
            "x-max-length": 1,
            "x-overflow": "reject-publish",
            "x-expires": settings.dedup_window * 1000,
        },
        nowait=True,
    )
    return name


def claim_queue_name(settings: Settings, uid: str) -> str:
    return f"{settings.claim_prefix}{uid}"


def claim_info_queue(settings: Settings, uid: str) -> str:
    # "/" is in no uid, so this is never the name of another uid's claim.
    return f"{claim_queue_name(settings, uid)}/info"


def claim_uid(
    channel: Channel, settings: Settings, uid: str, *, token: str = "", owner: str = ""
) -> bool:
    """Claim ``uid`` for ``DEDUP_WINDOW`` seconds; False when it was claimed before.

    The claim holds ``token`` (a secret of the submitter, which it sends along
    in the ``x-chatqueue-claim`` header so the consumer knows the claim is the
    request's own) and ``owner`` (a hash of the API key that may read the
    answer). The channel must be in confirm mode (``confirm_publish``).

    The claim queue itself is never read: ``x-max-length`` counts only ready
    messages, so a reader holding its message for a moment would let a second
    claim in. What :func:`read_claim` reads is a copy in a queue of its own,
    written once the claim is won (only when there is a token or an owner).
    """
    name = _claim_queue(channel, settings, claim_queue_name(settings, uid))
    body = json.dumps({"token": token, "owner": owner}).encode()
    try:
        channel.basic_publish(channel.prepare_message(body), exchange="", routing_key=name)
    except MessageNacked:
        return False
    if token or owner:
        info = _claim_queue(channel, settings, claim_info_queue(settings, uid))
        channel.basic_publish(channel.prepare_message(body), exchange="", routing_key=info)
    return True


# A claim's copy is out of its queue while another reader looks at it: wait
# this many times this long for it to come back.
CLAIM_READ_TRIES = 40
CLAIM_READ_PAUSE = 0.005


def read_claim(connection: Connection, settings: Settings, uid: str) -> dict[str, str] | None:
    """The claim of ``uid`` (``token``, ``owner``), or None when there is none
    (or it was made with neither).

    Uses a channel of its own: a missing queue closes the channel it is asked on.
    """
    name = claim_info_queue(settings, uid)
    channel = connection.channel()
    try:
        channel.queue_declare(queue=name, passive=True)
        for _ in range(CLAIM_READ_TRIES):
            message = channel.basic_get(queue=name, no_ack=False)
            if message is not None:
                break
            time.sleep(CLAIM_READ_PAUSE)
        else:
            return None
        channel.basic_reject(message.delivery_tag, requeue=True)
    except NotFound:
        return None
    finally:
        if channel.is_open:
            channel.close()
    try:
        claim = json.loads(message.body)
    except ValueError:
        return None
    return claim if isinstance(claim, dict) else None


def dead_letter(
    producer: Producer,
    settings: Settings,
    body: bytes | str,
    error: RequestError,
    *,
    content_type: str,
    content_encoding: str,
    headers: dict[str, Any] | None = None,
) -> None:
    """Put a request that will not be answered on ``<ns>.dead-letter``, the
    reason in its headers. The producer's channel must be in confirm mode."""
    headers = dict(headers or {})
    headers.update(
        {
            "x-chatqueue-reason": error.message[:1000],
            "x-chatqueue-error-code": error.code,
            "x-chatqueue-source-queue": settings.rabbitmq_queue,
        }
    )
    if error.uid:
        headers["x-chatqueue-uid"] = error.uid
    producer.publish(
        body,
        exchange="",
        routing_key=settings.dead_letter_queue,
        content_type=content_type,
        content_encoding=content_encoding,
        headers=headers,
        delivery_mode=2,
        retry=True,
        retry_policy=RETRY_POLICY,
    )


def cancel_exchange(settings: Settings) -> Exchange:
    """Fanout exchange on which a uid asks every worker to stop its stream."""
    return Exchange(settings.cancel_exchange, "fanout", durable=False, auto_delete=False)


def request_cancel(producer: Producer, settings: Settings, uid: str) -> None:
    """Ask the worker streaming ``uid`` to stop (its client went away)."""
    exchange = cancel_exchange(settings)
    producer.publish(
        uid,
        exchange=exchange,
        routing_key="",
        declare=[exchange],
        content_type="text/plain",
        content_encoding="utf-8",
        retry=True,
        retry_policy=RETRY_POLICY,
    )


class Lane:
    """One connection and channel that publishes the messages of many streams.

    RabbitMQ keeps the order of the messages published on one channel, and
    only there: a stream sends every message through the same lane, and the
    lane sends one message at a time.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._producer: Producer | None = None
        self._lock = threading.Lock()

    def publish(self, body: str, routing_key: str, properties: dict[str, Any]) -> None:
        with self._lock:
            if self._producer is None:
                self._producer = Producer(self._connection)
            self._producer.publish(
                body,
                exchange="",
                routing_key=routing_key,
                delivery_mode=2,
                retry=True,
                retry_policy=RETRY_POLICY,
                **properties,
            )


class Lanes:
    """The lanes of one process; each new stream takes the next, in turn."""

    def __init__(self, settings: Settings, *, confirm: bool) -> None:
        self._lanes = [
            Lane(_connection(settings, confirm)) for _ in range(settings.publish_pool_size)
        ]
        self._turn = itertools.count()

    def next(self) -> Lane:
        return self._lanes[next(self._turn) % len(self._lanes)]


def _connection(settings: Settings, confirm: bool) -> Connection:
    return Connection(
        settings.rabbitmq_url, transport_options={"confirm_publish": confirm}, heartbeat=0
    )


class Pools:
    """Publishing connections of one process, made on first use after a fork.

    ``confirmed`` waits for the broker's confirm of every publish (hand-offs,
    dead letters); ``lanes`` carry the streamed answers and wait for confirms
    only with ``CONFIRM_CHUNKS``.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._pid = -1
        self._confirmed: ProducerPool | None = None
        self._lanes: Lanes | None = None

    def _ensure(self) -> None:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    limit = self.settings.publish_pool_size
                    connection = _connection(self.settings, confirm=True)
                    self._confirmed = ProducerPool(connection.Pool(limit=limit), limit=limit)
                    self._lanes = Lanes(self.settings, confirm=self.settings.confirm_chunks)
                    self._pid = os.getpid()

    @property
    def confirmed(self) -> ProducerPool:
        self._ensure()
        assert self._confirmed is not None
        return self._confirmed

    @property
    def lanes(self) -> Lanes:
        self._ensure()
        assert self._lanes is not None
        return self._lanes
