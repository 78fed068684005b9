"""Cooperative cancel: a client that went away stops its stream.

The web front publishes ``{"uid", "rid", "at"}`` on the fanout exchange
``<ns>.cancel``. Every process that runs tasks listens there (one small
consumer thread, or greenlet under gevent, per process, started with the
process) into its :class:`~app.lifecycle.Cancels`, and a task looks there
between chunks: when its incarnation is cancelled it closes the HTTP stream to
the LLM, which is the only way to stop generation upstream.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

from kombu.connection import Connection
from kombu.entity import Queue
from kombu.message import Message
from kombu.messaging import Consumer
from kombu.mixins import ConsumerMixin

from app.broker import cancel_exchange
from app.lifecycle import Cancels
from config import Settings

logger = logging.getLogger(__name__)


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
            uid, rid, at = cancel["uid"], cancel.get("rid"), float(cancel["at"])
            if not isinstance(uid, str) or not (rid is None or isinstance(rid, str)):
                raise TypeError("uid and rid must be strings")
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("a cancel that is not {uid, rid, at} is ignored: %r", exc)
            return
        self.cancels.add(uid, rid, at)
        logger.info("uid=%s: cancel requested (rid %s)", uid, rid or "-")

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        logger.warning("cancels: RabbitMQ unreachable (%r); next try in %.1f s", exc, interval)


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
