"""Readers waiting for a response queue that a worker has not made yet.

A fresh uid's response queue is declared by the worker that accepts the
request (app/consumer.py), so a reader can come first. It does not poll the
broker (a thousand readers polling cost the broker more than the answers):
the intake names the uids of each batch it accepted on the fanout exchange
``<ns>.accepted``, each web process listens there (one exclusive queue of its
own, in a greenlet), and :meth:`Accepted.wait` wakes the readers of those
uids. A slow look every second covers a notice missed while the listener
reconnected.

``WEB_ACCEPT_WAIT`` counts the time a request could have been accepted in: it
starts again when RabbitMQ was away (nothing is accepted then), when an
intake says it holds the request (a ``taken`` notice: app/consumer.py,
Holding), and it goes on while the input queue holds a backlog (the request
may be in it), and for ``WEB_ACCEPT_WAIT`` once the backlog is gone (an
intake may have just taken the request, and not committed its hand-off yet);
for up to ``WEB_RECONNECT_TIMEOUT`` more in all. Every look asks whether
there is a backlog (the answer is shared by the process's readers for a
second), not only the last: requests that waited in the input queue (through
a broker restart, say) can be taken by an intake shortly before their
readers' wait is over, before its ``taken`` notice comes; the look at the
end then sees no backlog, and only the backlog an earlier look saw keeps
the wait going.
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

from app.broker import TAKEN, accepted_exchange
from app.errors import BrokerUnavailable
from config import Settings
from web.errors import UnknownStream

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds between two looks of a waiting reader, should a notice be missed.
LOOK_AGAIN = 1.0
# Seconds a ``taken`` notice is remembered (a reader may come after it).
TAKEN_KEPT = 120.0


class Accepted(ConsumerMixin):
    """Listens on ``<ns>.accepted`` for this web process (see the module)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connection = Connection(settings.rabbitmq_url, heartbeat=0)
        self._waiting: defaultdict[str, set[Event]] = defaultdict(set)
        self._taken: dict[str, float] = {}  # uid -> when an intake last said it holds it
        # When this listener last began to consume (after RabbitMQ was away, say),
        # and whether it consumes now: while it does not, nothing is accepted.
        self._ready_at = 0.0
        self._listening = False
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
        if message.properties.get("type") == TAKEN:
            self._note_taken(text.split(","))
            return
        for uid in text.split(","):
            for event in self._waiting.pop(uid, ()):
                event.set()

    def _note_taken(self, uids: list[str]) -> None:
        now = time.monotonic()
        taken = self._taken
        for uid in uids:
            taken.pop(uid, None)  # to the end: the dict stays in the order of tellings
            taken[uid] = now
        while taken and next(iter(taken.values())) < now - TAKEN_KEPT:
            del taken[next(iter(taken))]

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Any, **_: Any) -> None:
        self._ready_at = time.monotonic()
        self._listening = True

    def consume(self, *args: Any, **kwargs: Any) -> Any:
        try:
            yield from super().consume(*args, **kwargs)  # type: ignore[no-untyped-call]
        finally:
            self._listening = False

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        logger.warning("accepted: RabbitMQ unreachable (%r); next try in %.1f s", exc, interval)

    def _counts_from(self, uid: str, began: float, now: float) -> float:
        """When the time ``uid`` could have been accepted in last started: the
        wait's beginning, the last ``taken`` notice of it, the listener's
        return if it was away since, or now while it is away."""
        if not self._listening:  # RabbitMQ away, for this process
            return now
        held = self._taken.get(uid, began)
        return max(began, held, self._ready_at)

    def start(self) -> None:
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self.run, name="chatqueue-accepted", daemon=True).start()

    def wait(
        self,
        uid: str,
        timeout: float,
        look: Callable[[], T],
        backlog: Callable[[], bool] = lambda: False,
    ) -> T:
        """``look()`` until it stops raising :class:`UnknownStream`: once now,
        then each time ``uid`` is accepted (or every LOOK_AGAIN seconds), for
        up to ``timeout`` seconds of a broker that takes requests, and
        ``timeout`` more from each look at which ``backlog()`` says the input
        queue has requests waiting (see the module)."""
        self.start()
        event = Event()
        now = began = time.monotonic()
        deadline = now + timeout
        limit = deadline + self.settings.web_reconnect_timeout
        try:
            while True:
                self._waiting[uid].add(event)  # before the look: no notice is missed
                try:
                    return look()
                except UnknownStream:
                    now = time.monotonic()
                    # The request may wait in the input queue's backlog, or have
                    # just left it for an intake whose hand-off is not committed
                    # yet (a request taken is no longer counted): ``timeout``
                    # more from each look that sees a backlog.
                    counts_from = (
                        now if now < limit and backlog() else self._counts_from(uid, began, now)
                    )
                    deadline = max(deadline, min(counts_from + timeout, limit))
                    if now >= deadline:
                        logger.info(
                            "uid=%s: no response queue after %.1f s of waiting; 404",
                            uid,
                            now - began,
                        )
                        raise
                except BrokerUnavailable:
                    now = time.monotonic()
                    if now >= limit:
                        raise
                    deadline = max(deadline, min(now + timeout, limit))
                event.wait(timeout=min(LOOK_AGAIN, max(0.0, limit - now)))
                event.clear()
        finally:
            events = self._waiting.get(uid)
            if events is not None:
                events.discard(event)
                if not events:
                    self._waiting.pop(uid, None)
