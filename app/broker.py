"""chatqueue's queues on RabbitMQ and the per-process publishing connections.

Queues (names from :class:`config.Settings`):

* the input queue (``RABBITMQ_QUEUE``), durable: what clients publish to;
* the task queue (``<ns>.tasks``), durable: Celery's, from the consumer to the tasks;
* the dead-letter queue (``<ns>.dead-letter``), durable: rejected requests,
  with the reason in their headers;
* ``response_<uid>``, one per request, declared once at acceptance, durable
  (an answer outlives a broker restart) and with ``x-expires`` so that
  nobody's forgotten queue lives for ever;
* the fanout exchange ``<ns>.cancel``, on which readers that left ask the
  workers to stop an answer, and ``<ns>.accepted``, on which the intake names
  the response queues it made, for the web front's readers waiting for them.

That is the whole broker state of a request (see :mod:`app.lifecycle`).

On a cluster, ``RABBITMQ_QUEUE_TYPE=quorum`` makes the input, task and
dead-letter queues quorum queues (replicated; they outlive the loss of a
node), and ``RESPONSE_QUEUE_TYPE=quorum`` the response queues. A classic
queue lives on one node, the one whose connection declared it (here: the
intake's); when that node dies the queue and its messages are out of reach
until it comes back, and what is published to it meanwhile is dropped.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import select
import threading
from typing import Any

import amqp
from amqp.exceptions import AMQPError
from kombu import Connection, Exchange, Producer, Queue
from kombu.exceptions import OperationalError
from kombu.pools import ProducerPool

from app.errors import RequestError
from app.shutdown import Orphaned, losses
from config import Settings
from config.settings import type_argument

logger = logging.getLogger(__name__)

DEFAULT_EXCHANGE = Exchange("")
# What a broker call raises when the connection or the broker is in trouble
# (the request itself is fine): try again on a new connection, or requeue.
BROKER_ERRORS = (AMQPError, OperationalError, ConnectionError, OSError)
# A publish that fails because the broker went away is retried on a new
# connection for up to about 10 s before the caller hears of it.
RETRY_POLICY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}


def _queue(name: str, settings: Settings) -> Queue:
    """One of chatqueue's own durable queues, of ``RABBITMQ_QUEUE_TYPE``."""
    return Queue(
        name,
        DEFAULT_EXCHANGE,
        name,
        durable=True,
        queue_arguments=settings.queue_arguments or None,
    )


def input_queue(settings: Settings) -> Queue:
    return _queue(settings.rabbitmq_queue, settings)


def task_queue(settings: Settings) -> Queue:
    return _queue(settings.task_queue, settings)


def dead_letter_queue(settings: Settings) -> Queue:
    return _queue(settings.dead_letter_queue, settings)


def response_queue_arguments(settings: Settings) -> dict[str, Any]:
    """Every declare of a response queue carries these (see the module docstring)."""
    return {
        "x-expires": settings.response_queue_ttl * 1000,
        **type_argument(settings.response_queue_type),
    }


def dead_letter(
    producer: Producer,
    settings: Settings,
    body: bytes | str,
    error: RequestError,
    *,
    content_type: str,
    content_encoding: str,
    headers: dict[str, Any] | None = None,
    retry: bool = True,
) -> None:
    """Put a request that will not be answered on ``<ns>.dead-letter``, the
    reason in its headers. The producer's channel must be in confirm mode, or
    in a transaction (then ``retry=False``: a retry would leave it)."""
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
        retry=retry,
        retry_policy=RETRY_POLICY,
    )


def cancel_exchange(settings: Settings) -> Exchange:
    """Fanout exchange on which a uid asks every worker to stop its stream."""
    return Exchange(settings.cancel_exchange, "fanout", durable=False, auto_delete=False)


# The ``type`` of a notice on ``<ns>.accepted`` that names requests an intake
# holds and has not handed off yet (app/consumer.py: Holding).
TAKEN = "taken"


def accepted_exchange(settings: Settings) -> Exchange:
    """Fanout exchange on which the intake names the uids whose response queues
    it has just made (a comma-separated list), for readers waiting for them;
    and, with the message type TAKEN, the uids it has held for a while."""
    return Exchange(settings.accepted_exchange, "fanout", durable=False, auto_delete=False)


def request_cancel(
    producer: Producer, settings: Settings, uid: str, rid: str | None, at: float
) -> None:
    """Ask the worker streaming ``uid`` to stop (its reader left).

    ``rid`` is the incarnation the reader saw (None if it saw no message);
    ``at`` the wall-clock time of the cancel (see :class:`app.lifecycle.Cancels`).
    """
    exchange = cancel_exchange(settings)
    producer.publish(
        json.dumps({"uid": uid, "rid": rid, "at": at}),
        exchange=exchange,
        routing_key="",
        declare=[exchange],
        content_type="application/json",
        content_encoding="utf-8",
        retry=True,
        retry_policy=RETRY_POLICY,
    )


def frames_waiting(connection: Any) -> bool:
    """Whether a py-amqp ``connection`` has a frame (or part of one) to read
    without waiting.

    Reads py-amqp's private ``transport._read_buffer`` (checked against amqp
    5.3 and 5.4): bytes already taken off the socket are not seen by select.
    tests/test_broker.py fails if the attribute moves.
    """
    transport = connection.transport
    if getattr(transport, "_read_buffer", b""):
        return True
    sock = transport.sock
    pending = getattr(sock, "pending", None)  # TLS
    if pending is not None and pending():
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


class Lane:
    """One connection and channel that publishes the messages of many streams.

    RabbitMQ keeps the order of the messages published on one channel, and
    only there: a stream sends every message through the same lane, and the
    lane sends one message at a time. Messages go straight to py-amqp's
    ``basic_publish`` (no kombu ``Producer``, no serializer, no per-message
    declare); a broken connection is renewed by kombu's ``Connection.ensure``
    under ``RETRY_POLICY``, and the message sent again on the new channel.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._channel: Any = None
        self._lock = threading.Lock()
        self._ensured: Any = None

    def revive(self, channel: Any) -> None:
        """Called by ``ensure`` with the channel of a renewed connection."""
        self._channel = channel

    def _publish(
        self, body: str, routing_key: str, properties: dict[str, Any], since: int | None
    ) -> None:
        if since is not None and losses.since(since):
            # A retry on the renewed connection, for a stream whose task
            # message went with the old one: not a message more of it.
            raise Orphaned
        if self._channel is None:
            self._channel = self._connection.default_channel
        self._channel.basic_publish(
            amqp.Message(body, delivery_mode=2, **properties),
            exchange="",
            routing_key=routing_key,
        )

    def publish(
        self, body: str, routing_key: str, properties: dict[str, Any], since: int | None = None
    ) -> None:
        """Send one message; with ``since`` (a count of :data:`losses`), raise
        :class:`~app.shutdown.Orphaned` instead once a connection was lost."""
        with self._lock:
            if self._ensured is None:
                self._ensured = self._connection.ensure(
                    self, self._publish, errback=_log_reconnect, **RETRY_POLICY
                )
            self._ensured(body, routing_key, properties, since)


def _log_reconnect(exc: BaseException, interval: float) -> None:
    # Not counted in ``losses``: a lane notices a lost connection only at its
    # next publish, which may be long after, by a stream that began since.
    logger.warning("connection to RabbitMQ lost (%r); reconnecting in %.1f s", exc, interval)


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
    # A ';'-separated RABBITMQ_URL is kombu's failover list: ensure() moves to
    # the next node when this one goes away.
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
