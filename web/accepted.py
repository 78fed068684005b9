"""Readers waiting for a response queue that a worker has not made yet.

A fresh uid's response queue is declared by the worker that accepts the
request (app/consumer.py), so a reader can come first. It does not poll the
broker (a thousand readers polling cost the broker more than the answers):
the intake names the uids of each batch it accepted on the fanout exchange
``<ns>.accepted``, each web process listens there (one exclusive queue of its
own, in a greenlet), and :meth:`Accepted.wait` wakes the readers of those
uids. A slow look every second covers a notice missed while the listener
reconnected.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, TypeVar

from gevent.event import Event
from kombu import Connection, Queue
from kombu.message import Message
from kombu.mixins import ConsumerMixin

from app.broker import accepted_exchange
from config import Settings
from web.errors import UnknownStream

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds between two looks of a waiting reader, should a notice be missed.
LOOK_AGAIN = 1.0


class Accepted(ConsumerMixin):
    """Listens on ``<ns>.accepted`` for this web process (see the module)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connection = Connection(settings.rabbitmq_url, heartbeat=0)
        self._waiting: defaultdict[str, set[Event]] = defaultdict(set)
        self._started = False
        self._lock = threading.Lock()

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Any]:
        queue = Queue(
            "", accepted_exchange(self.settings), exclusive=True, auto_delete=True, durable=False
        )
        return [consumer_cls(queues=[queue], on_message=self.on_message, no_ack=True)]

    def on_message(self, message: Message) -> None:
        body = message.body
        text = body if isinstance(body, str) else bytes(body).decode("utf-8", "replace")
        for uid in text.split(","):
            for event in self._waiting.pop(uid, ()):
                event.set()

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        logger.warning("accepted: RabbitMQ unreachable (%r); next try in %.1f s", exc, interval)

    def start(self) -> None:
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self.run, name="chatqueue-accepted", daemon=True).start()

    def wait(self, uid: str, timeout: float, look: Callable[[], T]) -> T:
        """``look()`` until it stops raising :class:`UnknownStream`: once now,
        then each time ``uid`` is accepted (or every LOOK_AGAIN seconds), for
        up to ``timeout`` seconds."""
        self.start()
        event = Event()
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._waiting[uid].add(event)  # before the look: no notice is missed
                try:
                    return look()
                except UnknownStream:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise
                event.wait(timeout=min(LOOK_AGAIN, remaining))
                event.clear()
        finally:
            events = self._waiting.get(uid)
            if events is not None:
                events.discard(event)
                if not events:
                    self._waiting.pop(uid, None)
