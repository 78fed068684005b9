"""Cooperative cancel: a client that went away stops its stream.

The web front publishes ``{"uid", "rid", "at"}`` on the fanout exchange
``<ns>.cancel``. Every process that runs tasks listens there (one small
consumer thread, or greenlet under gevent, per process, started with the
process) into its :class:`~app.lifecycle.Cancels`, and a task looks there
between chunks: when its incarnation is cancelled it closes the HTTP stream to
the LLM, which is the only way to stop generation upstream.

Workers say there, too, which task messages that came back after a lost
connection they answer (:class:`TakenNotices`, ``{"taken_by", "taken",
"at"}``): the process that lost one, whose stream waits up to
``CARRY_ON_WAIT`` seconds for it to come back to it (tasks/chat.py), stops
waiting, and holds its LLM call and its pool slot no longer. After a broker
restart every listener's queue is made again when its process reconnects,
and a notice sent before that is not heard: so each is said again every
``NOTICE_EVERY`` seconds, for ``NOTICE_FOR`` seconds, many in one message.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kombu.connection import Connection
from kombu.entity import Queue
from kombu.message import Message
from kombu.messaging import Consumer, Producer
from kombu.mixins import ConsumerMixin

from app.broker import BROKER_ERRORS, RETRY_POLICY, cancel_exchange, to_cancels
from app.lifecycle import Cancels, Incarnation
from config import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A taken task message is said every NOTICE_EVERY seconds, for NOTICE_FOR
# seconds (tasks/chat.py's CARRY_ON_WAIT: no stream waits longer).
NOTICE_EVERY = 2.0
NOTICE_FOR = 30.0


def this_process() -> str:
    """How this process names itself in a ``taken_by`` notice."""
    return f"{socket.gethostname()}/{os.getpid()}"


class CancelListener(ConsumerMixin):
    """Consumes the cancel exchange in a daemon thread of this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connection = Connection(settings.rabbitmq_url, heartbeat=0)
        self.cancels = Cancels(keep=settings.response_queue_ttl)
        self.ready = threading.Event()

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Consumer]:
        queue = Queue(
            "", cancel_exchange(self.settings), exclusive=True, auto_delete=True, durable=False
        )
        return [consumer_cls(queues=[queue], on_message=self.on_message, no_ack=True)]

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Any, **_: Any) -> None:
        self.ready.set()

    def on_message(self, message: Message) -> None:
        try:
            cancel = json.loads(message.body)
            if isinstance(cancel, dict) and "taken_by" in cancel:
                self._on_taken(cancel)
                return
            uid, rid, at = cancel["uid"], cancel.get("rid"), float(cancel["at"])
            if not isinstance(uid, str) or not (rid is None or isinstance(rid, str)):
                raise TypeError("uid and rid must be strings")
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("a cancel that is not {uid, rid, at} is ignored: %r", exc)
            return
        self.cancels.add(uid, rid, at)
        logger.info("uid=%s: cancel requested (rid %s)", uid, rid or "-")

    def _on_taken(self, notice: dict[str, Any]) -> None:
        """Another worker process answers these incarnations (:class:`TakenNotices`)."""
        by, taken = notice.get("taken_by"), notice.get("taken")
        if by == this_process() or not isinstance(taken, list):
            return
        for pair in taken:
            if isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair):
                self.cancels.take(pair[0], pair[1])

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        logger.warning("cancels: RabbitMQ unreachable (%r); next try in %.1f s", exc, interval)


class TakenNotices:
    """Says which task messages that came back after a lost connection this
    process answers (see the module): each is said every ``NOTICE_EVERY``
    seconds for ``NOTICE_FOR`` seconds, all of them in one message, from a
    daemon thread (a greenlet under gevent) and a connection of its own."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._taken: dict[tuple[str, str], float] = {}  # (uid, rid) -> when it came
        self._lock = threading.Lock()

    def add(self, incarnation: Incarnation) -> None:
        with self._lock:
            self._taken[(incarnation.uid, incarnation.rid)] = time.monotonic()

    def due(self, now: float) -> list[tuple[str, str]]:
        """Those to say now; the older ones are forgotten."""
        with self._lock:
            for key, came in list(self._taken.items()):
                if now - came > NOTICE_FOR:
                    del self._taken[key]
            return list(self._taken)

    def serve(self) -> None:
        with Connection(self.settings.rabbitmq_url, heartbeat=0) as connection:
            producer = Producer(connection, auto_declare=False)
            while True:
                time.sleep(NOTICE_EVERY)
                taken = self.due(time.monotonic())
                if not taken:
                    continue
                try:
                    to_cancels(
                        producer,
                        self.settings,
                        {"taken_by": this_process(), "taken": taken, "at": time.time()},
                        {**RETRY_POLICY, "max_retries": 1},
                    )
                except BROKER_ERRORS as exc:
                    logger.info("cancels: could not say which tasks run here (%r)", exc)
                except Exception:  # the thread goes on: the notices are best effort
                    logger.exception("cancels: could not say which tasks run here")


_listeners: dict[int, CancelListener] = {}
_notices: dict[int, TakenNotices] = {}
_start_lock = threading.Lock()


def _of_this_process(
    made: dict[int, T], make: Callable[[], T], run: Callable[[T], Callable[[], None]], name: str
) -> T:
    """The one ``make()`` of this process (made after a fork, never shared
    across one), ``run`` in a daemon thread of its own from its making."""
    pid = os.getpid()
    found = made.get(pid)
    if found is None:
        with _start_lock:
            found = made.get(pid)
            if found is None:
                found = made[pid] = make()
                threading.Thread(target=run(found), name=name, daemon=True).start()
    return found


def notices(settings: Settings) -> TakenNotices:
    """This process's :class:`TakenNotices`, started on first use."""
    return _of_this_process(
        _notices, lambda: TakenNotices(settings), lambda n: n.serve, "chatqueue-taken"
    )


def listener(settings: Settings) -> CancelListener:
    """This process's listener, started on first use."""
    return _of_this_process(
        _listeners, lambda: CancelListener(settings), lambda c: c.run, "chatqueue-cancel"
    )
