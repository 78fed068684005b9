"""The intake bootstep: raw JSON from the input queue, handed to the task exactly once.

Each request is parsed and validated, its response queue declared, and then
its task message published and its input message acknowledged *in one broker
transaction* (AMQP ``tx``) on the channel that consumes the input queue: the
hand-off and the ack happen together or not at all. A worker killed, or a
connection lost, at any moment leaves either the input message (redelivered,
handed off again: nothing had been) or the task message (answered), never
both, so no request is answered twice at once (see :mod:`app.lifecycle`).

The intake has a connection of its own and runs in a thread of its own (a
greenlet under the gevent pool). Its message callback only collects
deliveries; a loop hands them off in batches, one transaction each, so a
burst is taken in at the broker's pace: while the loop waits for a
transaction's answer, the deliveries that come in are only collected, never
dispatched into a half-done hand-off (a synchronous call on the consuming
connection would drain it and run the callback inside itself, nesting
until RecursionError under a burst).

A request that cannot be served is dead-lettered to ``<ns>.dead-letter`` with
the reason in its headers and, where its uid or ``reply_to`` is known, the
client gets an error object and ``[DONE]``; in the same transaction as its
ack. Nothing escapes the loop: a broken connection is one log line, and the
intake reconnects (kombu's ``ensure_connection``); what was not committed is
delivered again.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import amqp
from amqp.exceptions import ChannelError, PreconditionFailed
from celery import bootsteps, signals
from kombu import Connection, Producer
from kombu.message import Message
from kombu.messaging import Consumer
from kombu.mixins import ConsumerMixin

from app import handoff, metrics
from app.broker import (
    BROKER_ERRORS,
    TAKEN,
    accepted_exchange,
    dead_letter,
    dead_letter_queue,
    frames_waiting,
    input_queue,
    one_write,
    response_queue_arguments,
)
from app.dispatcher import Dispatcher, declare_capacity_queues, start_dispatcher
from app.errors import ModelNotFound, RequestError
from app.lifecycle import new_rid
from app.logs import stack_of
from app.protocol import ResponseStream
from app.request import TENANT_HEADER, ChatRequest, decode_body, owned_queues, parse_request
from app.shutdown import losses, task_link
from app.tasknames import STREAM_CHAT

logger = logging.getLogger(__name__)

# Seconds between two looks at the stop flag while the input queue is idle.
IDLE_WAIT = 1.0
# Seconds before a lost connection is tried again (kombu backs off from there).
RECONNECT_PAUSE = 1.0
# A batch with more response queues than this declares them on DECLARING_CHANNELS
# channels in parallel, and waits for them; a smaller one declares them on the
# transaction's channel, in the commit's round trip.
IN_LINE_DECLARES = 8
DECLARING_CHANNELS = 8
# Seconds between two tries when chatqueue's own queues exist with another type.
MISMATCH_PAUSE = 10.0
# Seconds the intake declares response queues apart (one more round trip a
# batch) after a client's queue with other arguments broke a transaction.
CAREFUL_SECONDS = 600.0
# A batch handed off this many seconds after its first delivery is logged, with
# where the time went (the web front's readers wait WEB_ACCEPT_WAIT for it).
SLOW_HAND_OFF = 2.0
# Seconds a request is held before the web front is told it is (see Holding),
# and between two tellings while it still is.
HOLD_NOTICE = 1.0
RETELL = 3.0
# A request held this long (seconds) is reported with where the intake's loop
# is (an ERROR, again every STALL_REPEAT seconds while it lasts).
STALL_REPORT = 20.0
STALL_REPEAT = 60.0


class RequestConsumer(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs the :class:`Intake` of ``RABBITMQ_QUEUE`` and a
    :class:`~app.dispatcher.Dispatcher` in every worker."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.intake: Intake | None = None
        self.dispatcher: Dispatcher | None = None
        self.thread: threading.Thread | None = None

    def start(self, w: Any) -> None:
        # The dispatcher's messages to clients (their places, queue_timeout)
        # go through one lane of the process, in order.
        self.dispatcher = start_dispatcher(
            w.app.settings, w.app.settings.upstreams, w.app.pools.lanes.next().publish
        )
        self.intake = intake = Intake(w.app)
        task_link.broker_up = lambda: bool(intake.connection.connected)
        self.thread = threading.Thread(target=self.intake.serve, name="chatqueue-intake")
        self.thread.daemon = True
        self.thread.start()
        threading.Thread(
            target=self.intake.holding.serve, name="chatqueue-holding", daemon=True
        ).start()
        # Celery stops this step only after its pool has run dry: on SIGTERM
        # the intake lets go of the input queue at once instead (app/shutdown.py).
        signals.worker_shutting_down.connect(self.on_shutting_down, weak=False)

    def on_shutting_down(self, **_: Any) -> None:
        """From the signal handler: only a flag, which the intake's loop reads
        within IDLE_WAIT."""
        if self.intake is not None:
            self.intake.should_stop = self.intake.holding.should_stop = True
        if self.dispatcher is not None:
            self.dispatcher.should_stop = True

    def stop(self, w: Any) -> None:
        if self.dispatcher is not None:
            self.dispatcher.should_stop = True
        if self.intake is not None:
            self.intake.should_stop = self.intake.holding.should_stop = True
        if self.thread is not None:
            self.thread.join(timeout=IDLE_WAIT + 5)

    shutdown = stop


class Read:
    """One input message as the intake read it: a request and its upstream, or why not."""

    __slots__ = ("came", "error", "message", "request", "upstream")

    def __init__(
        self,
        message: Message,
        request: ChatRequest | None,
        error: RequestError | None,
        upstream: str = "",
    ) -> None:
        self.message = message
        self.request = request
        self.error = error
        self.upstream = upstream
        # When the intake read it (wall clock): its place in the line. Each
        # intake reads the input queue in its order, so over several intakes
        # the places follow the arrivals, not which batch committed first.
        self.came = time.time()

    @property
    def uid(self) -> str | None:
        return self.request.uid if self.request is not None else None

    @property
    def response_uid(self) -> str | None:
        """The uid whose response queue this message needs, if any."""
        if self.request is not None:
            return None if self.request.reply_to else self.request.uid
        if self.error is not None and self.error.uid and not self.error.reply_to:
            return self.error.uid
        return None


class Holding:
    """Tells the web front which requests an intake holds and has not handed off yet.

    A request taken from the input queue is neither in its backlog nor
    accepted until its transaction commits; a busy broker or process can make
    that take seconds, and a reader waiting for it (web/accepted.py) would
    give up after WEB_ACCEPT_WAIT with a 404 for a request that is answered
    later. So each request held longer than HOLD_NOTICE is named on
    ``<ns>.accepted`` as ``taken``, again every RETELL seconds while it is
    held, from a thread and a connection of its own: the intake's may be
    waiting for the broker just then. A reader waits WEB_ACCEPT_WAIT from the
    last telling. When the intake dies, the tellings stop and the request
    goes back to the queue's backlog, for which readers wait too.
    """

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.since: dict[str, float] = {}  # uid -> when it came
        self.told: dict[str, float] = {}  # uid -> when the web front last heard of it
        self.should_stop = False
        # Says where the intake's loop is, for a request held STALL_REPORT seconds.
        self.where: Callable[[], str] = lambda: "?"
        self._reported = 0.0

    def add(self, uid: str) -> None:
        self.since.setdefault(uid, time.monotonic())

    def remove(self, uids: list[str]) -> None:
        for uid in uids:
            self.since.pop(uid, None)
            self.told.pop(uid, None)

    def clear(self) -> None:
        self.since.clear()
        self.told.clear()

    def due(self, now: float) -> list[str]:
        return [
            uid
            for uid, came in list(self.since.items())
            if now - came >= HOLD_NOTICE and now - self.told.get(uid, -RETELL) >= RETELL
        ]

    def _report_stall(self, now: float) -> None:
        oldest = min(self.since.values(), default=now)
        if now - oldest >= STALL_REPORT and now - self._reported >= STALL_REPEAT:
            self._reported = now
            logger.error(
                "intake: %d requests held, the oldest for %.0f s, not handed off; "
                "its loop is at:\n%s",
                len(self.since),
                now - oldest,
                self.where(),
            )

    def serve(self) -> None:
        with Connection(self.settings.rabbitmq_url, heartbeat=0) as connection:
            producer = Producer(connection, auto_declare=False)
            while not self.should_stop:
                time.sleep(HOLD_NOTICE / 2)
                now = time.monotonic()
                self._report_stall(now)
                uids = self.due(now)
                if not uids:
                    continue
                try:
                    producer.publish(
                        ",".join(uids),
                        exchange=accepted_exchange(self.settings),
                        routing_key="",
                        type=TAKEN,
                        content_type="text/plain",
                        retry=True,
                        retry_policy={"max_retries": 1},
                    )
                except BROKER_ERRORS as exc:
                    logger.info("intake: could not tell the web front what it holds (%r)", exc)
                    continue
                for uid in uids:
                    if uid in self.since:
                        self.told[uid] = now


class Intake(ConsumerMixin):
    """Consumes the input queue and hands requests off in transactions."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.settings = app.settings
        self.connection = Connection(self.settings.rabbitmq_url, heartbeat=0)
        self.task = app.tasks[STREAM_CHAT]
        self.owned_queue = owned_queues(self.settings)
        self.pending: list[Read] = []
        self.holding = Holding(self.settings)
        self._first_at = 0.0  # when the first of the pending messages came
        self._conn: Any = None
        self._channel: Any = None
        self._declarers: list[Any] = []
        self._producer: Any = None
        self._careful_until = 0.0
        self._consuming = False  # its queues are declared and consumed
        self._frame: Callable[[], Any] = lambda: None  # the frame its loop is at
        self.holding.where = self.where

    # --- the loop ------------------------------------------------------------------------------

    def where(self) -> str:
        """The stack of the intake's loop (for a stall report)."""
        return stack_of(self._frame())

    def serve(self) -> None:
        """Consume until stopped; every connection loss is one line and a reconnect."""
        self._frame = _frame_of_current()
        while not self.should_stop:
            try:
                for _ in self.consume(safety_interval=IDLE_WAIT):  # type: ignore[no-untyped-call]
                    pass
            except PreconditionFailed as exc:
                if not self._consuming:
                    # chatqueue's own queues exist with other arguments (another
                    # RABBITMQ_QUEUE_TYPE): nothing works until an operator
                    # moves them over; say so, and try again now and then.
                    logger.error(
                        "intake: %s; the input or dead-letter queue exists with another "
                        "type than RABBITMQ_QUEUE_TYPE=%s (see docs/operations.md: moving an "
                        "existing deployment to quorum queues); next try in %.0f s",
                        exc,
                        self.settings.rabbitmq_queue_type,
                        MISMATCH_PAUSE,
                    )
                    time.sleep(MISMATCH_PAUSE)
                    continue
                # A client declared a response queue with other arguments: the
                # broker closed the channel, and the batch comes back. For a
                # while, declare apart, where a mismatch closes only the
                # declaring channel.
                logger.info("intake: %s; the batch comes back, declared apart", exc)
                self._careful_until = time.monotonic() + CAREFUL_SECONDS
                self._forget_pending()
                continue
            except BROKER_ERRORS as exc:
                if self.should_stop:
                    break
                if not isinstance(exc, ChannelError):
                    losses.lost()  # the connection went: the tasks here lost theirs too
                logger.warning("intake: connection to RabbitMQ lost (%r); reconnecting", exc)
            except Exception:
                logger.exception("intake: unexpected error; reconnecting")
            self._forget_pending()  # not committed: the broker delivers them again
            time.sleep(RECONNECT_PAUSE)
        logger.info("intake: stopped; no new requests from %s", self.settings.rabbitmq_queue)

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        logger.warning("intake: RabbitMQ unreachable (%r); next try in %.1f s", exc, interval)

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Consumer]:
        settings = self.settings
        self._forget_pending()
        self._consuming = False
        dead_letter_queue(settings)(channel).declare()
        declare_capacity_queues(channel, settings)
        channel.tx_select()
        self._channel = channel
        self._producer = Producer(channel)
        self._declarers = [channel.connection.channel() for _ in range(DECLARING_CHANNELS)]
        accepted_exchange(settings)(channel).declare()
        logger.info(
            "consuming requests from %s (prefetch %d, handed off in transactions)",
            settings.rabbitmq_queue,
            settings.input_prefetch,
        )
        return [
            consumer_cls(
                queues=[input_queue(settings)],
                on_message=self._collect,
                prefetch_count=settings.input_prefetch,
            )
        ]

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Any, **_: Any) -> None:
        self._conn = connection
        self._consuming = True

    def _collect(self, message: Message) -> None:
        if not self.pending:
            self._first_at = time.monotonic()
        read = self.read(message)
        self.pending.append(read)
        if read.uid is not None:
            self.holding.add(read.uid)

    def _forget_pending(self) -> None:
        self.pending = []
        self.holding.clear()

    def on_iteration(self) -> None:
        """Hand off what has come in, with whatever else is already waiting.

        Deliveries keep coming while a transaction's answer is awaited (they
        are collected then): they are handed off at once too, not after the
        loop's next idle wait.
        """
        amqp_connection = self._conn.connection
        while self.pending:
            while frames_waiting(amqp_connection):
                try:
                    self._conn.drain_events(timeout=IDLE_WAIT)
                except TimeoutError:
                    break
            batch, self.pending = self.pending, []
            self.hand_off(batch, self._first_at)

    # --- one batch, one transaction ------------------------------------------------------------

    def hand_off(self, reads: list[Read], since: float | None = None) -> None:
        began = time.monotonic()
        uids = [u for r in reads if (u := r.response_uid) is not None]
        apart = len(uids) > IN_LINE_DECLARES or time.monotonic() < self._careful_until
        if apart:
            self.declare_response_queues(uids)
        declared = time.monotonic()
        # Up to the commit, nothing here waits for an answer (but Celery's
        # first declare of the task queue and event exchange on a channel):
        # it all goes in one socket write.
        with one_write(self._channel):
            if not apart:
                # On the transaction's own channel, unanswered: they are done
                # before the commit, whose answer then stands for them too.
                self._declare_in_line(uids)
            if uids:
                # Readers of the web front waiting for these queues
                # (web/accepted.py) hear of them with the commit.
                self._channel.basic_publish(
                    amqp.Message(",".join(uids), content_type="text/plain"),
                    exchange=self.settings.accepted_exchange,
                    routing_key="",
                )
            for r in reads:
                if r.request is not None:
                    self._send_task(r.request, r.upstream, r.came)
                elif r.error is not None:
                    self._refuse(r.message, r.error)
                r.message.ack()
        committing = time.monotonic()
        self._channel.tx_commit()
        requested = [u for r in reads if (u := r.uid) is not None]
        self.holding.remove(requested)
        done = time.monotonic()
        if since is not None and done - since > SLOW_HAND_OFF:
            logger.warning(
                "intake: %d requests (uid=%s first) handed off %.1f s after the first came "
                "(waiting %.1f s, declaring %.1f s, tasks %.1f s, commit %.1f s)",
                len(reads),
                requested[0] if requested else "-",
                done - since,
                began - since,
                declared - began,
                committing - declared,
                done - committing,
            )
        for r in reads:
            if r.request is not None:
                logger.info("uid=%s: accepted", r.request.uid)
                metrics.accepted()
            elif r.error is not None:
                metrics.dead_lettered(r.error.code)

    def read(self, message: Message) -> Read:
        try:
            props = message.properties
            data = decode_body(message.body, self.settings.max_body_bytes)
            request = parse_request(
                data,
                default_model=self.settings.openai_model,
                correlation_id=props.get("correlation_id"),
                reply_to=props.get("reply_to"),
                owned_queue=self.owned_queue,
                tenant=_tenant(message.headers),
            )
            upstream = self.settings.upstreams.route(request.model)
            if upstream is None:
                unserved = ModelNotFound.of(request.model)
                unserved.uid, unserved.reply_to = request.uid, request.reply_to
                raise unserved
        except RequestError as exc:
            logger.warning("uid=%s: rejected (%s): %s", exc.uid or "-", exc.code, exc.message)
            return Read(message, None, exc)
        except Exception:
            logger.exception("unexpected error while reading a request; dead-lettering it")
            return Read(message, None, RequestError("internal error", code="internal_error"))
        return Read(message, request, None, upstream.name)

    def _declare_in_line(self, uids: list[str]) -> None:
        for uid in dict.fromkeys(uids):
            self._declare(self._channel, self.settings.response_queue(uid), nowait=True)

    def declare_response_queues(self, uids: list[str]) -> None:
        """Declare these response queues on the declaring channels, spread over
        them (the broker makes queues of different channels in parallel, about
        three times as many a second), and wait until all are there: one
        round trip for all.

        A queue that a client declared with other arguments is used as it is:
        the broker closes the channel at the mismatch, and that channel's
        share is then declared one by one on fresh channels.
        """
        names = [self.settings.response_queue(uid) for uid in dict.fromkeys(uids)]
        shares = [names[i :: len(self._declarers)] for i in range(len(self._declarers))]
        for channel, share in zip(self._declarers, shares, strict=True):
            for name in share[:-1]:
                self._declare(channel, name, nowait=True)
        again: list[str] = []
        for i, share in enumerate(shares):
            if not share:
                continue
            try:
                # Answered once the channel has made every queue before it too.
                self._declare(self._declarers[i], share[-1], nowait=False)
            except PreconditionFailed:
                self._declarers[i] = self._channel.connection.channel()
                again.extend(share)
        for name in again:
            try:
                self._declare(self._declarers[0], name, nowait=False)
            except PreconditionFailed:
                logger.info("%s exists with other arguments; used as it is", name)
                self._declarers[0] = self._channel.connection.channel()

    def _declare(self, channel: Any, name: str, *, nowait: bool) -> None:
        channel.queue_declare(
            queue=name,
            durable=True,
            auto_delete=False,
            arguments=response_queue_arguments(self.settings),
            nowait=nowait,
        )

    def _send_task(self, request: ChatRequest, upstream: str, at: float) -> None:
        """Its task message, to wait on ``<ns>.waiting`` for a slot of its upstream."""
        handoff.send(
            self.task,
            request,
            handoff.Handoff(rid=new_rid(), at=at, upstream=upstream),
            self.settings,
            self._producer,
            retry=False,  # the transaction is the retry: uncommitted, it comes back
        )

    def _refuse(self, message: Message, error: RequestError) -> None:
        dead_letter(
            self._producer,
            self.settings,
            message.body,
            error,
            content_type=message.content_type or "application/octet-stream",
            content_encoding=message.content_encoding or "binary",
            headers=message.headers,
            retry=False,
        )
        queue = error.reply_to or (self.settings.response_queue(error.uid) if error.uid else None)
        if queue is not None:
            ResponseStream(self._publish, queue, error.uid or "").fail(
                error.to_error_object(), error.status
            )

    def _publish(self, body: str, routing_key: str, properties: dict[str, Any]) -> None:
        self._channel.basic_publish(
            amqp.Message(body, delivery_mode=2, **properties), exchange="", routing_key=routing_key
        )


def _tenant(headers: Any) -> str | None:
    """Whose request it is for the fair share, as the web front names it (a
    digest of the API key); None: its username."""
    tenant = (headers or {}).get(TENANT_HEADER)
    if isinstance(tenant, bytes):
        tenant = tenant.decode("utf-8", "replace")
    return tenant[:128] if isinstance(tenant, str) and tenant else None


def _frame_of_current() -> Callable[[], Any]:
    """A callable that gives the frame the calling thread is at: its
    greenlet's under gevent's monkey-patching (a thread is a greenlet then),
    else the thread's own."""
    if "gevent" in sys.modules:
        import gevent.monkey

        if gevent.monkey.is_module_patched("threading"):
            greenlet = gevent.getcurrent()
            return lambda: getattr(greenlet, "gr_frame", None)
    ident = threading.get_ident()
    return lambda: sys._current_frames().get(ident)
