"""Task events in batches under the gevent pool, off the path to the first token.

Celery publishes every task event (``task-received``, ``task-started``,
``task-succeeded``) the moment it happens, except with its own event loop,
where it buffers them ("XXX This excludes eventlet/gevent, which should
actually buffer", ``celery/worker/consumer/events.py``). Under the gevent
pool two of those publishes come between a task's arrival and its call to
the LLM, and each event costs a publish: about a millisecond of time to
first token.

This step turns Celery's own buffering on for the ``task`` group under the
gevent pool: events are kept, and a greenlet publishes them as one
``task.multi`` message :data:`FLUSH_DELAY` seconds later (or at once when
``buffer_limit`` of them are waiting). Flower and any ``EventReceiver`` read
such batches as they read Celery's prefork workers' batches.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

logger = logging.getLogger(__name__)

# Seconds an event may wait to go out with others: nothing a monitor notices.
FLUSH_DELAY = 0.05


class BufferedTaskEvents(bootsteps.StartStopStep):  # type: ignore[misc]
    """Buffer task events under the gevent pool (see the module)."""

    requires = ("celery.worker.consumer.events:Events",)

    def start(self, c: Any) -> None:
        dispatcher = c.event_dispatcher
        green = type(c.pool).__module__ == "celery.concurrency.gevent"
        if dispatcher is None or not dispatcher.enabled or not green:
            return
        dispatcher.buffer_group = frozenset({"task"})
        dispatcher.on_send_buffered = _flush_later(dispatcher)

    def stop(self, c: Any) -> None:
        if c.event_dispatcher is not None:
            _flush(c.event_dispatcher)


def _flush_later(dispatcher: Any) -> Any:
    import gevent

    pending = False

    def flush() -> None:
        nonlocal pending
        pending = False
        _flush(dispatcher)

    def schedule() -> None:
        nonlocal pending
        if not pending:
            pending = True
            gevent.spawn_later(FLUSH_DELAY, flush)

    return schedule


def _flush(dispatcher: Any) -> None:
    try:
        dispatcher.flush()
    except Exception as exc:  # monitoring only: never a reason to fail
        logger.warning("could not send task events: %r", exc)
