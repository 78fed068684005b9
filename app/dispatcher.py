"""The dispatcher: each upstream gets no more LLM calls at once than its ``max_in_flight``.

The limit is held by RabbitMQ, for every worker on every host of a
deployment, with no service beside it. A unit of capacity is a *slot* of an
upstream (numbered 0 to ``max_in_flight - 1``), and at every moment each slot
is one message, in exactly one of two places:

* free: a message on ``<ns>.slots`` (minted by the dispatcher, or a task
  message that came back from ``<ns>.running``), which the dispatcher holds
  unacknowledged;
* taken: the task message of one request on ``<ns>.running`` (ready, or
  unacknowledged by the worker that answers it), its slot in a header.

The dispatcher takes a slot by sending a waiting request's task message to
``<ns>.running`` and acknowledging the free slot and the waiting message, in
one broker transaction. A worker gives the slot back by ending its task
message: the worker rejects it without requeue, and ``<ns>.running``
dead-letters it to ``<ns>.slots`` (app/factory.py: ``SlotRequest``), where it
is a free slot again: one broker operation. A worker that dies leaves its task
message unacknowledged; RabbitMQ gives it back to ``<ns>.running`` the moment
it sees the connection gone, and another worker answers it in the same slot.
A broker restart keeps every message where it was. See app/lifecycle.py for
who holds a slot at each moment of a request's life.

Requests wait in ``<ns>.waiting`` (the intake puts them there), durably. One
worker process at a time is the dispatcher: the one RabbitMQ gives the baton
to, a message of ``<ns>.dispatcher``, a single-active-consumer queue. Every
worker runs a :class:`Dispatcher` and consumes that queue; when the active
consumer's connection goes (kill -9, a lost connection), RabbitMQ makes the
next one active and gives it the baton, and with it everything the last one
held unacknowledged: the waiting requests and the free slots. Nothing is lost
and nothing waits on a timer. The dispatcher holds up to ``DISPATCH_WINDOW``
waiting requests unacknowledged and orders them (app/waiting.py); the rest
wait in the queue behind them, in arrival order.

How many slots exist is written on ``<ns>.ledger`` (one message per upstream,
held by the dispatcher): at start the dispatcher mints the slots a larger
``max_in_flight`` adds, and retires a slot whose number a smaller one no
longer has when it comes free. A slot that comes back twice (a dead-lettering
of a quorum queue is at-least-once) is acknowledged and dropped.

It also keeps each upstream's pauses (a 429, or a 503 with ``retry-after``,
heard on the cancel exchange), its ``rpm``, each request's ``queue_timeout``,
cancels of waiting requests, and tells each waiting request that asked for it
its place (app/waiting.py).
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import amqp
from kombu import Connection

from app import metrics
from app.broker import BROKER_ERRORS, frames_waiting
from app.errors import error_object
from app.lifecycle import Cancels, Incarnation, State, check_transition
from app.protocol import QUEUE_PROPERTIES, ResponseStream, queue_status
from app.waiting import TIERS, Entry, Line, tier_rank
from config import Settings
from config.celery import running_arguments
from config.upstreams import Upstream, Upstreams

logger = logging.getLogger(__name__)

# Headers of a task message, set by the intake (app/handoff.py) and the dispatcher.
H_UPSTREAM = "x-chatqueue-upstream"
H_RID = "x-chatqueue-rid"
H_AT = "x-chatqueue-at"
H_DEADLINE = "x-chatqueue-deadline"
H_TIER = "x-chatqueue-tier"
H_TENANT = "x-chatqueue-tenant"
H_REPLY = "x-chatqueue-reply"
H_UPDATES = "x-chatqueue-updates"
H_SLOT = "x-chatqueue-slot"  # the slot a running task message holds (-1: no limit)
H_DISPATCHED = "x-chatqueue-dispatched"  # when it was sent to run (wall clock)
H_TOLD = "x-chatqueue-told"  # it was told a place: it is told too when its call starts

BATON = "baton"
# Seconds between two looks at deadlines, pauses, rates and positions.
TICK = 0.25
# A waiting request that asked is told its place when it is first known, and
# again when it changed, this many seconds after it was last told at the
# soonest: so at least every 2 s (TELL_EVERY + TICK) while it changes.
TELL_EVERY = 1.75
# Seconds before a lost connection is tried again.
RECONNECT_PAUSE = 1.0
# Calls whose durations make an upstream's mean call time (the estimated wait).
DURATIONS = 50

Publish = Callable[[str, str, dict[str, Any]], object]


@dataclass
class Slot:
    number: int
    tag: int  # the free slot's delivery tag


@dataclass
class UpstreamState:
    """What the dispatcher knows of one upstream."""

    upstream: Upstream
    line: Line = field(default_factory=Line)
    free: dict[int, Slot] = field(default_factory=dict)  # slot number -> free slot
    minted: int = 0  # slots that exist (the ledger)
    paused_until: float = 0.0  # wall clock
    # rpm: calls start evenly, 60 / rpm seconds apart (a burst of a whole
    # minute's calls at once would meet a limiter that counts by the second).
    next_start: float = 0.0
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=DURATIONS))
    running: int = 0  # calls of an upstream with no limit, since this process leads
    told_version: int = -1  # the line's version when places were last counted
    behind: bool = False  # a changed place waits to be told (TELL_EVERY)

    @property
    def limit(self) -> int:
        return self.upstream.max_in_flight

    @property
    def in_flight(self) -> int:
        if self.limit:
            return max(0, min(self.minted, self.limit) - len(self.free))
        return self.running

    def room(self, now: float) -> bool:
        """Whether a call may start now."""
        if now < self.paused_until:
            return False
        if now < self.next_start:
            return False
        return not self.limit or bool(self.free)

    def estimate(self, position: int, now: float) -> float | None:
        """Seconds until the call of a request at ``position`` starts, if known."""
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        parallel = self.limit or max(1, self.running)
        wait = position * mean / parallel
        if self.upstream.rpm:
            wait = max(wait, position * 60.0 / self.upstream.rpm)
        return round(max(wait, self.paused_until - now, 0.0), 1)


class Dispatcher:
    """Runs in every worker process; the one holding the baton dispatches."""

    def __init__(self, settings: Settings, upstreams: Upstreams, publish: Publish) -> None:
        self.settings = settings
        self.upstreams = upstreams
        self.publish = publish  # a response message to a client (a lane of the process)
        self.should_stop = False
        self.leading = False
        self._reset()

    def _reset(self) -> None:
        self.leading = False
        self.states = {u.name: UpstreamState(u) for u in self.upstreams.all}
        self.by_uid: dict[str, Entry] = {}
        self._deadlines: list[tuple[float, int, Entry]] = []
        self._order = 0
        self._unknown: set[str] = set()
        self._pending = 0  # acknowledgements and publishes since the last commit
        self._ledger: dict[str, tuple[int, int]] = {}  # upstream -> (tag, slots)
        self._cancels = Cancels(keep=self.settings.response_queue_ttl)
        self._channel: Any = None
        self._told_at = 0.0

    # --- the connection ----------------------------------------------------------------------

    def serve(self) -> None:
        """Consume until stopped; a lost connection is one line, and a new try."""
        while not self.should_stop:
            try:
                with Connection(self.settings.rabbitmq_url, heartbeat=0) as connection:
                    connection.ensure_connection(max_retries=1)
                    self._run(connection.connection)
            except BROKER_ERRORS as exc:
                if self.should_stop:
                    break
                logger.warning("dispatcher: connection to RabbitMQ lost (%r); reconnecting", exc)
            except Exception:
                logger.exception("dispatcher: unexpected error; reconnecting")
            if self.leading:
                # Another worker takes over: news after a lost connection, not at a stop.
                log = logger.info if self.should_stop else logger.warning
                log("dispatcher: no longer dispatching (another worker takes over)")
                metrics.capacity({})
            self._reset()
            time.sleep(RECONNECT_PAUSE)

    def _run(self, connection: amqp.Connection) -> None:
        settings = self.settings
        channel = self._channel = connection.channel()
        declare_capacity_queues(channel, settings)
        channel.tx_select()
        # Each process adds a baton; the one that leads keeps one, and acknowledges the others.
        channel.basic_publish(
            amqp.Message(BATON, delivery_mode=1), exchange="", routing_key=settings.dispatcher_queue
        )
        channel.tx_commit()
        channel.basic_qos(0, 0, False)
        channel.basic_consume(settings.dispatcher_queue, callback=self._on_baton)
        while not self.should_stop:
            try:
                connection.drain_events(timeout=TICK)
                while frames_waiting(connection):
                    connection.drain_events(timeout=TICK)
            except TimeoutError:
                pass
            if self.leading:
                self._tick()

    # --- leading -----------------------------------------------------------------------------

    def _on_baton(self, message: amqp.Message) -> None:
        if self.leading:
            self._channel.basic_ack(message.delivery_tag)  # one baton is enough
            self._pending += 1
            return
        self.leading = True
        logger.info("dispatcher: this worker dispatches (it holds the baton)")
        self._lead()

    def _lead(self) -> None:
        channel, settings = self._channel, self.settings
        self._read_ledger()
        self._mint()
        channel.tx_commit()
        self._pending = 0
        channel.basic_qos(0, 0, False)
        channel.basic_consume(settings.slots_queue, callback=self._on_slot, exclusive=True)
        channel.basic_qos(0, settings.dispatch_window, False)
        channel.basic_consume(settings.waiting_queue, callback=self._on_waiting, exclusive=True)
        # Cancels of waiting requests and pauses of upstreams, on the cancel exchange.
        heard = channel.connection.channel()
        heard.exchange_declare(settings.cancel_exchange, "fanout", durable=False, auto_delete=False)
        name, _, _ = heard.queue_declare("", exclusive=True, auto_delete=True)
        heard.queue_bind(name, settings.cancel_exchange, "")
        heard.basic_consume(name, callback=self._on_notice, no_ack=True)

    def _read_ledger(self) -> None:
        channel = self._channel
        while (message := channel.basic_get(self.settings.ledger_queue)) is not None:
            try:
                entry = json.loads(message.body)
                name, slots = str(entry["upstream"]), int(entry["slots"])
            except (ValueError, KeyError, TypeError):
                logger.warning("dispatcher: a ledger entry that is not {upstream, slots} dropped")
                channel.basic_ack(message.delivery_tag)
                continue
            old = self._ledger.get(name)
            if old is not None:  # the last one written is the one that counts
                channel.basic_ack(old[0])
            self._ledger[name] = (message.delivery_tag, slots)

    def _mint(self) -> None:
        """Make the slots that ``max_in_flight`` adds; write down the count."""
        channel, settings = self._channel, self.settings
        for name in set(self._ledger) | set(self.states):
            state = self.states.get(name)
            limit = state.limit if state is not None else 0
            tag, minted = self._ledger.get(name, (None, 0))
            if state is not None:
                state.minted = limit
            if minted == limit:
                continue
            for number in range(minted, limit):
                channel.basic_publish(
                    amqp.Message(
                        "slot",
                        delivery_mode=2,
                        application_headers={H_UPSTREAM: name, H_SLOT: number},
                    ),
                    exchange="",
                    routing_key=settings.slots_queue,
                )
            if tag is not None:
                channel.basic_ack(tag)
            channel.basic_publish(
                amqp.Message(json.dumps({"upstream": name, "slots": limit}), delivery_mode=2),
                exchange="",
                routing_key=settings.ledger_queue,
            )
            logger.info("dispatcher: upstream %s has %d slots (was %d)", name, limit, minted)

    def _on_slot(self, message: amqp.Message) -> None:
        """A free slot: minted, or given back by a task message that ended."""
        headers = message.headers or {}
        name = headers.get(H_UPSTREAM)
        number = headers.get(H_SLOT)
        state = self.states.get(name) if isinstance(name, str) else None
        returned = "x-death" in headers
        if returned and state is not None:
            dispatched = headers.get(H_DISPATCHED)
            if isinstance(dispatched, int | float):
                state.durations.append(max(0.0, time.time() - dispatched))
            if not state.limit:
                state.running = max(0, state.running - 1)
        if (
            state is None
            or not state.limit
            or not isinstance(number, int)
            or not 0 <= number < state.limit
            or number in state.free
        ):
            # Not a slot of a limited upstream (any more), or one held twice.
            self._channel.basic_ack(message.delivery_tag)
            self._pending += 1
            return
        state.free[number] = Slot(number, message.delivery_tag)

    def _on_waiting(self, message: amqp.Message) -> None:
        headers = message.headers or {}
        now = time.time()
        try:
            uid = str(headers["id"])
            entry = Entry(
                uid=uid,
                rid=str(headers.get(H_RID) or uid),
                tier=tier_rank(str(headers.get(H_TIER) or "default")),
                tenant=str(headers.get(H_TENANT) or "anonymous"),
                at=float(headers.get(H_AT) or now),
                deadline=float(headers.get(H_DEADLINE) or now + self.settings.queue_timeout),
                tag=message.delivery_tag,
                message=message,
                reply=str(headers.get(H_REPLY) or self.settings.response_queue(uid)),
                updates=bool(headers.get(H_UPDATES)),
                upstream=str(headers.get(H_UPSTREAM) or ""),
            )
        except (KeyError, ValueError, TypeError) as exc:
            # Not the intake's: nothing to answer it with, and nowhere to put it.
            logger.error("dispatcher: a waiting message without its headers (%r) dropped", exc)
            self._channel.basic_reject(message.delivery_tag, requeue=False)
            self._pending += 1
            return
        if self._cancels.cancelled(Incarnation(entry.uid, entry.rid, entry.at)):
            self._end(entry, None)
            return
        state = self.states.get(entry.upstream)
        if state is None and entry.upstream not in self._unknown:
            self._unknown.add(entry.upstream)
            logger.error(
                "dispatcher: requests for upstream %r, which this worker's UPSTREAMS_FILE does "
                "not name, wait until their queue_timeout (give every worker the same file)",
                entry.upstream,
            )
        if state is not None:
            state.line.add(entry)
        self._order += 1
        heapq.heappush(self._deadlines, (entry.deadline, self._order, entry))
        old = self.by_uid.get(uid)
        if old is not None and not old.gone:
            logger.warning("uid=%s: waits twice (rids %s and %s)", uid, old.rid, entry.rid)
        self.by_uid[uid] = entry

    def _on_notice(self, message: amqp.Message) -> None:
        """A cancel (``{uid, rid, at}``) or a pause (``{pause, until}``)."""
        try:
            notice = json.loads(message.body)
            if not isinstance(notice, dict):
                return
            if "pause" in notice:
                self._pause(str(notice["pause"]), float(notice["until"]))
            elif "uid" in notice and "by" not in notice:
                self._cancel(str(notice["uid"]), notice.get("rid"), float(notice["at"]))
        except (ValueError, KeyError, TypeError) as exc:
            logger.debug("dispatcher: a notice it cannot read (%r)", exc)

    def _pause(self, name: str, until: float) -> None:
        state = self.states.get(name)
        if state is not None and until > state.paused_until:
            state.paused_until = until
            logger.warning(
                "dispatcher: upstream %s paused for %.1f s (rate limited)",
                name,
                until - time.time(),
            )

    def _cancel(self, uid: str, rid: Any, at: float) -> None:
        rid = rid if isinstance(rid, str) else None
        self._cancels.add(uid, rid, at)
        entry = self.by_uid.get(uid)
        if entry is None or entry.gone:
            return
        if self._cancels.cancelled(Incarnation(entry.uid, entry.rid, entry.at)):
            state = self.states.get(entry.upstream)
            if state is not None:
                state.line.remove(entry)
            logger.info("uid=%s: cancelled while waiting; no LLM call", uid)
            metrics.ended_waiting("cancelled", entry.upstream)
            self._end(entry, None)

    def _end(self, entry: Entry, error: tuple[dict[str, Any], int] | None) -> None:
        """Acknowledge a waiting request that will not run (timed out, with
        ``error``, or cancelled); tell its client why, if told."""
        check_transition(State.WAITING, State.TIMED_OUT if error else State.CANCELLED)
        entry.gone = True
        if error is not None:
            ResponseStream(self._to_client, entry.reply, entry.uid, rid=entry.rid).fail(*error)
        self._channel.basic_ack(entry.tag)
        self._pending += 1
        if self.by_uid.get(entry.uid) is entry:
            del self.by_uid[entry.uid]

    def _to_client(self, body: str, queue: str, properties: dict[str, Any]) -> None:
        self.publish(body, queue, properties)

    # --- each tick ---------------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.time()
        self._expire(now)
        for state in self.states.values():
            self._dispatch(state, now)
        if self._pending:
            self._channel.tx_commit()
            self._pending = 0
        if time.monotonic() - self._told_at >= TICK:
            self._tell(now)
            self._told_at = time.monotonic()
            self._report()

    def _expire(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and (deadlines[0][0] <= now or deadlines[0][2].gone):
            _, _, entry = heapq.heappop(deadlines)
            if entry.gone:
                continue
            state = self.states.get(entry.upstream)
            if state is not None:
                state.line.remove(entry)
            waited = now - entry.at
            logger.warning(
                "uid=%s: waited %.1f s for upstream %s; queue_timeout",
                entry.uid,
                waited,
                entry.upstream,
            )
            metrics.ended_waiting("queue_timeout", entry.upstream)
            self._end(entry, queue_timeout_error(waited))

    def _dispatch(self, state: UpstreamState, now: float) -> None:
        line = state.line
        while line and state.room(now):
            entry = line.pop()
            assert entry is not None
            slot = state.free.pop(min(state.free)) if state.limit else None
            self._send(entry, slot, now)
            if state.upstream.rpm:
                state.next_start = max(now, state.next_start) + 60.0 / state.upstream.rpm
            if not state.limit:
                state.running += 1
            metrics.started(state.upstream.name, TIERS[entry.tier], now - entry.at)

    def _send(self, entry: Entry, slot: Slot | None, now: float) -> None:
        check_transition(State.WAITING, State.HANDED_OFF)
        message = entry.message
        properties = dict(message.properties)
        headers = dict(properties.pop("application_headers", None) or {})
        headers[H_SLOT] = -1 if slot is None else slot.number
        headers[H_DISPATCHED] = now
        headers[H_TOLD] = entry.told is not None
        channel = self._channel
        channel.basic_publish(
            amqp.Message(message.body, application_headers=headers, **properties),
            exchange="",
            routing_key=self.settings.task_queue,
        )
        channel.basic_ack(entry.tag)
        if slot is not None:
            channel.basic_ack(slot.tag)
        self._pending += 3
        entry.message = None  # the broker has it; this process need not
        if self.by_uid.get(entry.uid) is entry:
            del self.by_uid[entry.uid]

    def _tell(self, now: float) -> None:
        """Tell each waiting request that asked its place, when it is new or
        changed: the places of a line are counted only when it changed since
        they were last, and some request in it asks."""
        mono = time.monotonic()
        for state in self.states.values():
            line = state.line
            if not line.asking or (line.version == state.told_version and not state.behind):
                continue
            state.told_version, state.behind = line.version, False
            for entry, position in line.positions():
                if not entry.updates or entry.told == position:
                    continue
                if entry.told is not None and mono - entry.told_at < TELL_EVERY:
                    state.behind = True  # told again at a later tick
                    continue
                entry.told, entry.told_at = position, mono
                self.publish(*queue_message(entry, position, state.estimate(position, now)))

    def _report(self) -> None:
        metrics.capacity(
            {
                name: (state.in_flight, state.limit, state.line.by_tier(), state.line.by_tenant())
                for name, state in self.states.items()
            }
        )


def queue_message(
    entry: Entry, position: int, wait: float | None
) -> tuple[str, str, dict[str, Any]]:
    """The ``queue`` message that tells ``entry`` its place: (body, queue, properties)."""
    properties = QUEUE_PROPERTIES | {"correlation_id": entry.uid}
    return queue_status(position, wait), entry.reply, properties


def queue_timeout_error(waited: float) -> tuple[dict[str, Any], int]:
    return (
        error_object(
            f"the request waited {waited:.0f} s for the LLM and its queue_timeout passed; "
            "ask again later, or with a longer queue_timeout",
            "timeout",
            "queue_timeout",
        ),
        504,
    )


def declare_capacity_queues(channel: Any, settings: Settings) -> None:
    """Declare the queues of waiting and capacity (each declare carries the same arguments)."""
    kind = settings.queue_arguments
    for name in (settings.waiting_queue, settings.slots_queue, settings.ledger_queue):
        channel.queue_declare(name, durable=True, auto_delete=False, arguments=dict(kind))
    channel.queue_declare(
        settings.dispatcher_queue,
        durable=True,
        auto_delete=False,
        arguments={**kind, "x-single-active-consumer": True},
    )
    channel.queue_declare(
        settings.task_queue, durable=True, auto_delete=False, arguments=running_arguments(settings)
    )


def start_dispatcher(settings: Settings, upstreams: Upstreams, publish: Publish) -> Dispatcher:
    dispatcher = Dispatcher(settings, upstreams, publish)
    threading.Thread(target=dispatcher.serve, name="chatqueue-dispatcher", daemon=True).start()
    return dispatcher
