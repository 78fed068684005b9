"""Cooperative cancel: a client that went away stops its stream.

The web front publishes the uid on the fanout exchange ``<ns>.cancel``. Every
process that runs tasks listens there (one small consumer thread, or greenlet
under gevent, per process, started with the process), and a task looks at
:meth:`CancelListener.cancelled` between chunks: when its uid is there it
closes the HTTP stream to the LLM, which is the only way to stop generation
upstream.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from kombu.connection import Connection
from kombu.entity import Queue
from kombu.message import Message
from kombu.messaging import Consumer
from kombu.mixins import ConsumerMixin

from app.broker import cancel_exchange
from config import Settings

logger = logging.getLogger(__name__)

# A cancel is kept this long: long enough for a task still in the queue.
REMEMBER_SECONDS = 600.0


class CancelListener(ConsumerMixin):
    """Consumes the cancel exchange in a daemon thread of this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connection = Connection(settings.rabbitmq_url, heartbeat=0)
        self._cancelled: dict[str, float] = {}
        self._lock = threading.Lock()
        self.ready = threading.Event()

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Consumer]:
        queue = Queue(
            "", cancel_exchange(self.settings), exclusive=True, auto_delete=True, durable=False
        )
        return [consumer_cls(queues=[queue], on_message=self.on_message, no_ack=True)]

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Any, **_: Any) -> None:
        self.ready.set()

    def on_message(self, message: Message) -> None:
        body = message.body  # str when the message has a content_encoding
        uid = body if isinstance(body, str) else bytes(body).decode("utf-8", "replace")
        now = time.monotonic()
        with self._lock:
            self._cancelled[uid] = now
            if len(self._cancelled) > 10_000:
                cutoff = now - REMEMBER_SECONDS
                self._cancelled = {u: t for u, t in self._cancelled.items() if t > cutoff}
        logger.info("uid=%s: cancel requested", uid)

    def cancelled(self, uid: str) -> bool:
        return uid in self._cancelled

    def forget(self, uid: str) -> None:
        with self._lock:
            self._cancelled.pop(uid, None)


_listeners: dict[int, CancelListener] = {}
_start_lock = threading.Lock()


def listener(settings: Settings) -> CancelListener:
    """This process's listener, started on first use."""
    pid = os.getpid()
    found = _listeners.get(pid)
    if found is None:
        with _start_lock:
            found = _listeners.get(pid)
            if found is None:
                found = _listeners[pid] = CancelListener(settings)
                threading.Thread(target=found.run, name="chatqueue-cancel", daemon=True).start()
    return found
