"""The worker's log: an expected fault is one line, not a traceback.

Celery logs every rejected task message with its traceback
(``celery.app.trace``, "Task ...[uid] reject requeue=True: ..."). chatqueue
rejects on purpose, and says why in a line of its own just before: when its
warm shutdown hands a stream back (app/shutdown.py) and when the broker will
not take an answer (tasks/chat.py). A traceback there is noise that hides the
real ones.
"""

from __future__ import annotations

import logging

from celery.exceptions import Reject

# The logger of celery/app/trace.py (checked against Celery 5.5 to 5.7).
TRACE_LOGGER = "celery.app.trace"


class RejectWithoutTraceback(logging.Filter):
    """Drops the traceback of a record about a task message that was rejected."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], Reject):
            record.exc_info = None
            record.exc_text = None
        return True


def install() -> None:
    """Put the filters on Celery's loggers (once per process; idempotent)."""
    trace = logging.getLogger(TRACE_LOGGER)
    if not any(isinstance(f, RejectWithoutTraceback) for f in trace.filters):
        trace.addFilter(RejectWithoutTraceback())
