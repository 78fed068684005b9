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
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import amqp
from amqp.exceptions import AMQPError
from gevent import monkey
from kombu import Connection, Exchange, Producer, Queue
from kombu.exceptions import OperationalError
from kombu.pools import ProducerPool

from app.errors import RequestError
from app.process import per_process
from app.shutdown import Orphaned, losses
from config import Settings
from config.celery import running_arguments
from config.settings import type_argument

logger = logging.getLogger(__name__)

# The system's select, even where gevent patched the module (see frames_waiting).
_select = monkey.get_original("select", "select")

DEFAULT_EXCHANGE = Exchange("")
# What a broker call raises when the connection or the broker is in trouble
# (the request itself is fine): try again on a new connection, or requeue.
BROKER_ERRORS = (AMQPError, OperationalError, ConnectionError, OSError)
# A publish that fails because the broker went away is retried on a new
# connection for up to about 10 s before the caller hears of it.
RETRY_POLICY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}

# Seconds a lane in confirm mode waits for the broker's confirm of a message
# before it renews its connection and sends the message again (a quorum
# queue elects a new leader in a few seconds after its node died).
CONFIRM_TIMEOUT = 5.0


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


def waiting_queue(settings: Settings) -> Queue:
    """Accepted requests waiting for a slot of their upstream (app/dispatcher.py)."""
    return _queue(settings.waiting_queue, settings)


def task_queue(settings: Settings) -> Queue:
    """Celery's task queue, ``<ns>.running``: it dead-letters what ends to the free slots."""
    return Queue(
        settings.task_queue,
        DEFAULT_EXCHANGE,
        settings.task_queue,
        durable=True,
        queue_arguments=running_arguments(settings),
    )


def dead_letter_queue(settings: Settings) -> Queue:
    return _queue(settings.dead_letter_queue, settings)


def response_queue_arguments(settings: Settings) -> dict[str, Any]:
    """Every declare of a response queue carries these (see the module docstring)."""
    return {
        "x-expires": settings.response_queue_ttl * 1000,
        **type_argument(settings.response_queue_type),
    }


def reply_queue_arguments(settings: Settings) -> dict[str, Any]:
    """A web process's reply queue (web/publisher.py): the type of the response
    queues, and gone ``2 x WEB_RECONNECT_TIMEOUT`` (one minute at least) after
    its process stopped reading it."""
    expires = max(60.0, 2 * settings.web_reconnect_timeout)
    return {
        "x-expires": int(expires * 1000),
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
    to_cancels(producer, settings, {"uid": uid, "rid": rid, "at": at})


def to_cancels(
    producer: Producer,
    settings: Settings,
    body: dict[str, Any],
    retry_policy: dict[str, float] = RETRY_POLICY,
) -> None:
    """Publish ``body`` on the cancel exchange, which every worker process hears."""
    exchange = cancel_exchange(settings)
    producer.publish(
        json.dumps(body),
        exchange=exchange,
        routing_key="",
        declare=[exchange],
        content_type="application/json",
        content_encoding="utf-8",
        retry=True,
        retry_policy=retry_policy,
    )


def frames_waiting(connection: Any) -> bool:
    """Whether a py-amqp ``connection`` has a frame (or part of one) to read
    without waiting.

    Reads py-amqp's private ``transport._read_buffer`` (checked against amqp
    5.3 and 5.4): bytes already taken off the socket are not seen by select.
    tests/test_broker.py fails if the attribute moves.

    It never yields to other greenlets: gevent's ``select``, even with a
    timeout of 0, lets every other ready greenlet run first. Called once per
    frame in a loop, that made a worker's intake, beside 1,000 streams that
    restarted at once after a broker restart, take 30 to 90 s to collect one
    batch, and the web front's readers wait 404s for those requests.
    """
    transport = connection.transport
    if getattr(transport, "_read_buffer", b""):
        return True
    sock = transport.sock
    pending = getattr(sock, "pending", None)  # TLS
    if pending is not None and pending():
        return True
    readable, _, _ = _select([sock], [], [], 0)
    return bool(readable)


class Lane:
    """One connection and channel that publishes the messages of many streams.

    RabbitMQ keeps the order of the messages published on one channel, and
    only there: a stream sends every message through the same lane, which
    writes them in the order they were handed over. Messages go straight to
    py-amqp's ``basic_publish`` (no kombu ``Producer``, no serializer, no
    per-message declare).

    A stream hands a message over (:meth:`publish`) and goes on: the lane's
    writer, a thread (a greenlet in the worker) of its own, sends everything
    handed over since its last write in one socket write (:func:`one_write`).
    A socket write cost about as much CPU as the rest of a message's way
    through the worker. A stream waits only for its last message
    (:meth:`settle`: the task message is acknowledged after it), or when
    ``WAITING_LIMIT`` messages wait for the lane (a broker that does not
    read, in a memory alarm say: the backlog stays bounded).

    A broken connection is renewed by kombu's ``Connection.ensure`` under
    ``RETRY_POLICY``, and the messages not yet written sent again on the new
    channel. A message that could not be sent (or, with ``since``, whose
    stream lost its task message with a connection: :data:`losses`) is
    dropped with its error, and its stream hears of it at its next
    :meth:`publish` or :meth:`settle`.
    """

    # A stream that hands over a message while this many wait waits for it.
    WAITING_LIMIT = 2000

    def __init__(self, connection: Connection, *, confirm_timeout: float | None = None) -> None:
        """``confirm_timeout``: the connection is in confirm mode; a confirm
        that does not come in this many seconds renews it, and the message is
        sent again on it."""
        self._connection = connection
        self._channel: Any = None
        self._ensured: Any = None
        self._waiting: list[Outgoing] = []
        self._handing = threading.Lock()  # over self._waiting
        self._written = threading.Condition()
        self._wake = threading.Event()
        self._writer: threading.Thread | None = None
        # Off in confirm mode: each publish then waits for the broker's
        # answer, which needs its frames on the wire first.
        self._batch = confirm_timeout is None
        self._confirm = {} if confirm_timeout is None else {"confirm_timeout": confirm_timeout}

    def revive(self, channel: Any) -> None:
        """Called by ``ensure`` with the channel of a renewed connection."""
        self._channel = channel

    def publish(
        self, body: str, routing_key: str, properties: dict[str, Any], since: int | None = None
    ) -> Outgoing:
        """Hand one message over, to be written soon; with ``since`` (a count
        of :data:`losses`), it is dropped with :class:`~app.shutdown.Orphaned`
        once a connection was lost. A stream publishes through a
        :class:`Sender`, which hears what became of each message."""
        out = Outgoing(body, routing_key, properties, since)
        with self._handing:
            self._waiting.append(out)
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_forever, name="lane", daemon=True
                )
                self._writer.start()
        self._wake.set()
        if len(self._waiting) > self.WAITING_LIMIT:
            self.settle(out)
        return out

    def settle(self, out: Outgoing) -> None:
        """Wait until ``out`` and every message handed over before it are
        written or dropped."""
        with self._written:
            while not out.done:
                self._written.wait()

    def _write_forever(self) -> None:
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                with self._handing:
                    batch, self._waiting = self._waiting, []
                if batch:
                    self._write(batch)
        finally:
            # Stopped (its greenlet killed, say): the next publish starts another.
            with self._handing:
                self._writer = None

    def _write(self, batch: list[Outgoing]) -> None:
        failure: BaseException = ConnectionError("the lane's writer was stopped")
        try:
            if self._ensured is None:
                self._ensured = self._connection.ensure(
                    self, self._publish, errback=_log_reconnect, **RETRY_POLICY
                )
            self._ensured(batch)
        except Exception as exc:  # each stream hears of it
            failure = exc
        finally:
            with self._written:
                for out in batch:
                    out.done = True
                    if not out.sent and out.error is None:
                        out.error = failure
                self._written.notify_all()

    def _publish(self, batch: list[Outgoing]) -> None:
        todo = []
        for out in batch:
            if out.sent or out.error is not None:
                continue
            if out.since is not None and losses.since(out.since):
                # A stream whose task message went with a lost connection:
                # not a message more of it.
                out.error = Orphaned()
            else:
                todo.append(out)
        if self._channel is None:
            self._channel = self._connection.default_channel
        channel = self._channel
        if self._batch and len(todo) > 1:
            with one_write(channel):
                for out in todo:
                    _basic_publish(channel, out)
            for out in todo:
                out.sent = True
        else:
            for out in todo:
                _basic_publish(channel, out, **self._confirm)
                out.sent = True


class Sender:
    """One stream's way into a :class:`Lane`: its messages in order, and what
    became of them. A message the lane had to drop raises its error at the
    stream's next message, or at :meth:`settle`; the stream then stops (a
    later message could come after a gap)."""

    def __init__(self, lane: Lane, since: int | None = None) -> None:
        self._lane = lane
        self._since = since
        self._unsettled: deque[Outgoing] = deque()

    def __call__(self, body: str, routing_key: str, properties: dict[str, Any]) -> None:
        unsettled = self._unsettled
        while unsettled and unsettled[0].done:
            _raise_if_dropped(unsettled.popleft())
        unsettled.append(self._lane.publish(body, routing_key, properties, self._since))

    def settle(self) -> None:
        """Wait until every message of the stream is written; raise the error
        of the first one that was dropped."""
        if self._unsettled:
            self._lane.settle(self._unsettled[-1])
        while self._unsettled:
            _raise_if_dropped(self._unsettled.popleft())


def _raise_if_dropped(out: Outgoing) -> None:
    if out.error is not None:
        raise out.error


@dataclass(slots=True)
class Outgoing:
    """A message handed to a :class:`Lane`, and what became of it."""

    body: str
    routing_key: str
    properties: dict[str, Any]
    since: int | None
    sent: bool = False
    done: bool = False
    error: BaseException | None = None


def _basic_publish(channel: Any, out: Outgoing, **confirm: float) -> None:
    channel.basic_publish(
        # Persistent, but where the properties say otherwise (a waiting
        # request's place: of no use after a broker restart).
        amqp.Message(out.body, **{"delivery_mode": 2, **out.properties}),
        exchange="",
        routing_key=out.routing_key,
        **confirm,
    )


@contextmanager
def one_write(channel: Any) -> Iterator[None]:
    """Send what py-amqp writes on ``channel``'s connection inside the block in
    one socket write: at its end (nothing if the block raises), or before it
    waits for the broker (a declare waits for its answer, say).

    py-amqp writes a message's frames with ``transport.write``, which calls
    the private ``transport._write`` (the socket's ``sendall``), and reads
    with ``transport.read_frame``; checked against amqp 5.3 and 5.4.
    tests/test_broker.py fails if they move.
    """
    transport = channel.connection.transport
    own = "_write" in vars(transport)
    sendall = transport._write
    read_frame = transport.read_frame
    parts: list[bytes] = []

    def write_out() -> None:
        if parts:
            data = b"".join(parts)
            parts.clear()
            sendall(data)

    def read_after_writing(*args: Any, **kwargs: Any) -> Any:
        if transport.sock.gettimeout() != 0:
            # A read that waits (for an answer, say); not py-amqp's poll for
            # a connection.blocked before each publish, with a zero timeout.
            write_out()
        return read_frame(*args, **kwargs)

    transport._write = lambda data: parts.append(bytes(data))
    transport.read_frame = read_after_writing
    try:
        yield
    finally:
        del transport.read_frame
        if own:
            transport._write = sendall
        else:
            del transport._write
    if parts:  # all of it may have gone before a read already
        transport.write(b"".join(parts))


def _log_reconnect(exc: BaseException, interval: float) -> None:
    # Not counted in ``losses``: a lane notices a lost connection only at its
    # next publish, which may be long after, by a stream that began since.
    logger.warning("connection to RabbitMQ lost (%r); reconnecting in %.1f s", exc, interval)


class Lanes:
    """The lanes of one process; each new stream takes the next, in turn."""

    def __init__(self, settings: Settings, *, confirm: bool) -> None:
        self._lanes = [
            Lane(
                _connection(settings, confirm), confirm_timeout=CONFIRM_TIMEOUT if confirm else None
            )
            for _ in range(settings.publish_pool_size)
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
    only with ``CONFIRM_CHUNKS`` or quorum response queues
    (:attr:`~config.Settings.lanes_confirm`).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Not a method of self: the fork hook would keep every Pools alive.
        self._made = per_process(lambda: _publishing(settings))

    @property
    def confirmed(self) -> ProducerPool:
        return self._made()[0]

    @property
    def lanes(self) -> Lanes:
        return self._made()[1]


def _publishing(settings: Settings) -> tuple[ProducerPool, Lanes]:
    """A process's publishing connections (see :class:`Pools`)."""
    limit = settings.publish_pool_size
    connection = _connection(settings, confirm=True)
    confirmed = ProducerPool(connection.Pool(limit=limit), limit=limit)
    return confirmed, Lanes(settings, confirm=settings.lanes_confirm)
