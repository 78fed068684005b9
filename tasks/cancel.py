"""Cooperative cancel: a client that went away stops its stream.

The web front publishes ``{"uid", "rid", "at"}`` on the fanout exchange
``<ns>.cancel``. Every process that runs tasks listens there (one small
consumer thread, or greenlet under gevent, per process, started with the
process) into its :class:`~app.lifecycle.Cancels`, and a task looks there
between chunks: when its incarnation is cancelled it closes the HTTP stream to
the LLM, which is the only way to stop generation upstream.

Workers say there, too, what became of the task messages that went with a
lost connection (:class:`Notices`, ``{"by", "taken", "holding",
"following", "ended", "at"}``, many of each in one message):

- ``holding``: a stream here lost its task message and goes on, waiting for
  it to come back (tasks/chat.py, ``Lease``); said every ``NOTICE_EVERY``
  seconds while it lasts;
- ``following``: a task message that came back here is another worker's
  ``holding`` stream's: this worker waits for that stream's end instead of
  asking the LLM again, and the stream goes on there;
- ``ended``: a ``holding`` stream ended (``answered``, ``cancelled``,
  ``handed_back``): its follower acknowledges its task message, or answers
  it itself;
- ``taken``: a task message that came back here is answered here again
  (nobody said ``holding`` for it): the stream that lost it stops waiting,
  and holds its LLM call and its pool slot no longer.

After a broker restart every listener's queue is made again when its
process reconnects, and a notice sent before that is not heard: so each is
said again every ``NOTICE_EVERY`` seconds, for ``NOTICE_FOR`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kombu.connection import Connection
from kombu.entity import Queue
from kombu.message import Message
from kombu.messaging import Consumer, Producer
from kombu.mixins import ConsumerMixin

from app.broker import cancel_exchange, to_cancels
from app.lifecycle import Cancels, Incarnation
from app.process import per_process
from config import Settings

logger = logging.getLogger(__name__)

# A notice is said every NOTICE_EVERY seconds, for NOTICE_FOR seconds
# (tasks/chat.py's CARRY_ON_WAIT: no stream waits longer), ``holding`` as
# long as it lasts.
NOTICE_EVERY = 1.0
NOTICE_FOR = 30.0
# Seconds between two tries of the listener to reach RabbitMQ again.
RECONNECT_EVERY = 0.5


def this_process() -> str:
    """How this process names itself in its notices (``by``)."""
    return f"{socket.gethostname()}/{os.getpid()}"


class CancelListener(ConsumerMixin):
    """Consumes the cancel exchange in a daemon thread of this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connection = Connection(settings.rabbitmq_url, heartbeat=0)
        self.cancels = Cancels(keep=settings.response_queue_ttl)
        # Upstream -> until when (wall clock) no call to it may start.
        self.pauses: dict[str, float] = {}
        self.ready = threading.Event()
        # Since when it hears the exchange (monotonic), None while it does not.
        self.connected_at: float | None = None

    @contextmanager
    def establish_connection(self) -> Iterator[Any]:
        """As kombu's, but tried again every RECONNECT_EVERY seconds (kombu
        waits 2, 4, 6 ... s): after a broker restart a worker that does not
        hear the others soon answers again what they go on with."""
        with self.create_connection() as connection:  # type: ignore[no-untyped-call]
            connection.ensure_connection(
                self.on_connection_error,
                self.connect_max_retries,
                interval_start=RECONNECT_EVERY,
                interval_step=0,
                interval_max=RECONNECT_EVERY,
            )
            yield connection

    def consume(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            yield from super().consume(*args, **kwargs)  # type: ignore[no-untyped-call]
        finally:
            self.connected_at = None

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Consumer]:
        queue = Queue(
            "", cancel_exchange(self.settings), exclusive=True, auto_delete=True, durable=False
        )
        return [consumer_cls(queues=[queue], on_message=self.on_message, no_ack=True)]

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Any, **_: Any) -> None:
        self.connected_at = time.monotonic()
        self.ready.set()

    def paused(self, upstream: str) -> bool:
        """Whether ``upstream`` is paused now (a worker heard a 429 from it)."""
        return self.pauses.get(upstream, 0.0) > time.time()

    def on_message(self, message: Message) -> None:
        try:
            cancel = json.loads(message.body)
            if isinstance(cancel, dict) and "pause" in cancel:
                self._on_pause(cancel)
                return
            if isinstance(cancel, dict) and "by" in cancel:
                self._on_notice(cancel)
                return
            uid, rid, at = cancel["uid"], cancel.get("rid"), float(cancel["at"])
            if not isinstance(uid, str) or not (rid is None or isinstance(rid, str)):
                raise TypeError("uid and rid must be strings")
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("a cancel that is not {uid, rid, at} is ignored: %r", exc)
            return
        self.cancels.add(uid, rid, at)
        logger.info("uid=%s: cancel requested (rid %s)", uid, rid or "-")

    def _on_pause(self, notice: dict[str, Any]) -> None:
        """An upstream saturated (:func:`pause`): no call to it starts here until then."""
        upstream, until = notice.get("pause"), notice.get("until")
        if isinstance(upstream, str) and isinstance(until, int | float):
            self.pauses[upstream] = max(float(until), self.pauses.get(upstream, 0.0))

    def _on_notice(self, notice: dict[str, Any]) -> None:
        """What another worker process says (:class:`Notices`)."""
        if notice.get("by") == this_process():
            return
        cancels = self.cancels
        heard: dict[str, Callable[[str, str], None]] = {
            "taken": cancels.take,
            "holding": cancels.heard_holding,
            "following": cancels.heard_following,
        }
        for kind, hear in heard.items():
            for pair in _listed(notice.get(kind), 2):
                hear(pair[0], pair[1])
        for uid, rid, outcome in _listed(notice.get("ended"), 3):
            cancels.heard_ended(uid, rid, outcome)

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        logger.warning("cancels: RabbitMQ unreachable (%r); next try in %.1f s", exc, interval)


def _listed(items: Any, width: int) -> list[list[str]]:
    """The lists of ``width`` strings in ``items`` (a notice's field)."""
    if not isinstance(items, list):
        return []
    return [
        item
        for item in items
        if isinstance(item, list) and len(item) == width and all(isinstance(i, str) for i in item)
    ]


class Notices:
    """What this process says of task messages that went with a lost
    connection (see the module), from a daemon thread (a greenlet under
    gevent) and a connection of its own: every ``NOTICE_EVERY`` seconds, and
    at once when there is something new."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # (uid, rid) -> when it was first said; ``holding`` lasts until released.
        self._said: dict[str, dict[tuple[str, ...], float]] = {
            "taken": {},
            "following": {},
            "ended": {},
            "holding": {},
        }
        self._lock = threading.Lock()
        self._new = threading.Event()

    def say(self, kind: str, *fields: str) -> None:
        with self._lock:
            self._said[kind][fields] = time.monotonic()
        self._new.set()

    def release(self, incarnation: Incarnation, outcome: str) -> None:
        """A ``holding`` stream ended so: ``ended`` is said instead."""
        with self._lock:
            self._said["holding"].pop((incarnation.uid, incarnation.rid), None)
        self.say("ended", incarnation.uid, incarnation.rid, outcome)

    def due(self, now: float) -> dict[str, list[tuple[str, ...]]]:
        """What to say now, by kind; what was said for NOTICE_FOR is forgotten."""
        with self._lock:
            for kind, said in self._said.items():
                if kind != "holding":
                    for key in [k for k, at in said.items() if now - at > NOTICE_FOR]:
                        del said[key]
            return {kind: list(said) for kind, said in self._said.items() if said}

    def serve(self) -> None:
        """Say what is due, each time on a connection that works: one that
        failed is dropped, and the next try (NOTICE_EVERY later) makes a new
        one, given NOTICE_EVERY to connect. kombu's own retries on the old
        one can take 15 s after a broker restart, longer than the other
        workers wait to hear of the streams here."""
        connection: Any = None
        while True:
            self._new.wait(NOTICE_EVERY)
            self._new.clear()
            due = self.due(time.monotonic())
            if not due:
                continue
            try:
                if connection is None:
                    factory: Any = Connection
                    connection = factory(
                        self.settings.rabbitmq_url, heartbeat=0, connect_timeout=NOTICE_EVERY
                    )
                    # Connected here, once round the nodes: left to the
                    # producer, kombu connects with no end of tries, 2, 4,
                    # 6 ... s apart, and no notice would go out for seconds
                    # after the broker is back.
                    connection.ensure_connection(
                        max_retries=len(connection.alt), interval_start=0, interval_step=0
                    )
                to_cancels(
                    Producer(connection, auto_declare=False),
                    self.settings,
                    {"by": this_process(), **due, "at": time.time()},
                    # Once round the nodes of RABBITMQ_URL (kombu moves to the
                    # next at each retry), without pauses.
                    {"max_retries": len(connection.alt), "interval_start": 0, "interval_step": 0},
                )
            except Exception as exc:  # the thread goes on: the notices are best effort
                logger.info("cancels: could not say which tasks run here (%r)", exc)
                if connection is not None:
                    with contextlib.suppress(Exception):  # it failed already
                        connection.release()
                    connection = None
                time.sleep(NOTICE_EVERY)  # not at once again: RabbitMQ may be away


@per_process
def notices(settings: Settings) -> Notices:
    """This process's :class:`Notices`, started on first use (in a daemon
    thread of its own)."""
    made = Notices(settings)
    threading.Thread(target=made.serve, name="chatqueue-notices", daemon=True).start()
    return made


@per_process
def listener(settings: Settings) -> CancelListener:
    """This process's listener, started on first use (in a daemon thread of
    its own)."""
    made = CancelListener(settings)
    threading.Thread(target=made.run, name="chatqueue-cancel", daemon=True).start()
    return made


def pause(producer: Producer, settings: Settings, upstream: str, seconds: float) -> None:
    """Pause ``upstream`` for ``seconds``, for every worker and the dispatcher:
    said on the cancel exchange, which all of them hear; and here at once."""
    until = time.time() + seconds
    listener(settings)._on_pause({"pause": upstream, "until": until})
    to_cancels(producer, settings, {"pause": upstream, "until": until, "by": this_process()})
