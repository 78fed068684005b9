"""The log of the worker and the web front: an expected fault is one line, not a traceback.

Two kinds of fault are expected, and each is said in a line of its own:

- a task message rejected on purpose: when the warm shutdown hands a stream
  back (app/shutdown.py) and when the broker will not take an answer
  (tasks/chat.py). Celery logs every reject with a traceback
  (``celery.app.trace``);
- a connection to RabbitMQ lost (a broker restart, a network cut): the acks
  of task messages delivered on the old connection fail ("Couldn't ack ...,
  connection already closed", ``celery.worker.request``, or "call_soon_ack
  immediate exec failed", ``celery.worker.consumer.consumer``, where Celery
  acks at once from a task's greenlet; the broker delivers those messages
  again), kombu's consumers log "Connection to broker lost"
  (``kombu.mixins``: the cancel listener; in the web front, the accepted
  and metrics listeners), and Celery's remote-control
  greenlet (``celery/worker/pidbox.py``) dies of the error, which gevent's hub
  prints; the consumer starts a new one once it has reconnected.

Tracebacks there were noise that hid the real ones (a broker restart under
ten streams printed a dozen). The filters keep the line and drop the
traceback; a connection error becomes a warning, which is what it is.
Checked against Celery 5.5 to 5.7, kombu 5.5 to 5.7 and gevent 24 to 26;
tests/test_restart.py fails if a traceback comes back.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from amqp.exceptions import ConnectionError as AMQPConnectionError
from celery.exceptions import Reject

logger = logging.getLogger(__name__)

# What a lost connection to RabbitMQ raises (RecoverableConnectionError and
# ConnectionForced are AMQP ConnectionErrors; resets and refusals are OSErrors).
CONNECTION_LOST: tuple[type[BaseException], ...] = (AMQPConnectionError, OSError)

# The loggers of the lines above (each library names its loggers after its modules).
REJECT_LOGGERS = ("celery.app.trace",)
CONNECTION_LOGGERS = ("celery.worker.request", "celery.worker.consumer.consumer", "kombu.mixins")


class RejectWithoutTraceback(logging.Filter):
    """Drops the traceback of a record about a task message that was rejected."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], Reject):
            _drop_traceback(record)
        return True


class ConnectionLossInOneLine(logging.Filter):
    """A record about a lost connection: its line, as a warning, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], CONNECTION_LOST):
            _drop_traceback(record)
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _drop_traceback(record: logging.LogRecord) -> None:
    record.exc_info = None
    record.exc_text = None


def install() -> None:
    """Put the filters on the libraries' loggers. Idempotent."""
    for name in REJECT_LOGGERS:
        _add(logging.getLogger(name), RejectWithoutTraceback)
    for name in CONNECTION_LOGGERS:
        _add(logging.getLogger(name), ConnectionLossInOneLine)


def _add(target: logging.Logger, kind: type[logging.Filter]) -> None:
    if not any(isinstance(f, kind) for f in target.filters):
        target.addFilter(kind())


def quiet_hub() -> None:
    """gevent's hub prints the traceback of any greenlet that dies of an
    exception (``Hub.print_exception``, public and documented): for a lost
    connection, log one line instead. Only where gevent runs the process (the
    Procfile's ``--pool gevent`` patches the socket module before the app is
    made). Called once the worker runs: called as the app was made, it held
    up the intake's first hand-off (tests/test_durability.py saw no request
    accepted in the first 0.5 s of a backlog). Idempotent."""
    import gevent
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        return
    hub: Any = gevent.get_hub()
    if getattr(hub, "_chatqueue_quiet", False):
        return
    loud = hub.print_exception

    def print_exception(context: Any, kind: Any, value: Any, tb: Any) -> None:
        if isinstance(value, CONNECTION_LOST):
            logger.warning(
                "a greenlet ended as its connection to RabbitMQ was lost (%r): %r",
                context,
                value,
            )
            return
        loud(context, kind, value, tb)

    hub.print_exception = print_exception
    hub._chatqueue_quiet = True


def stack_of(frame: Any) -> str:
    """The stack a loop is at, for a log line about a loop that is stuck
    (``frame``: a greenlet's ``gr_frame`` or a thread's current frame)."""
    return "".join(traceback.format_stack(frame)) if frame is not None else "?"
