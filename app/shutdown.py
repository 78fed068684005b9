"""A worker's warm shutdown (SIGTERM): finish what can be finished, hand back the rest.

Celery's own warm shutdown cancels the worker's task consumer (after its
loop's next cycle: about 3 s) and then waits for every running task, with
no bound (the gevent pool's ``join()``), while the intake, a step Celery
stops after the pool, goes on taking requests. A
stream from a slow LLM can run for minutes, and whatever stops the process
after its own timeout (systemd, Kubernetes) kills it then: its requests are
delivered again, as after a crash, but only after that wait. chatqueue bounds
the wait:

- the intake lets go of the input queue at once (app/consumer.py); what it
  had not yet handed off goes back to the queue unacknowledged;
- the streams in flight go on for ``WORKER_SHUTDOWN_GRACE`` seconds (a task
  message handed back before Celery cancelled the task consumer may come
  back to this worker: it is handed back again at once, before any answer);
- a stream still running then stops between two chunks (its LLM call is
  closed) and its task message is rejected back to the queue: nothing was
  acknowledged, so RabbitMQ delivers it to another worker, which answers the
  request again from the start, marked ``restart``, as after a crash;
- once the pool is empty the worker exits.

The deadline lives in the process that gets the signal, where the gevent
pool (the Procfile's) runs its tasks. Under the prefork pool (the bare
``celery -A app worker``) each child process finishes its task as Celery's
warm shutdown does, with no grace.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps

from app.logs import stack_of

logger = logging.getLogger(__name__)

# Seconds between two looks of the watchdog at the task consumer's connection,
# and how long it may be broken, unnoticed by Celery, before it is reported.
WATCH_EVERY = 5.0
UNNOTICED = 15.0


class HandBack(Exception):
    """The worker is shutting down and the grace is over: give the request back."""


class Orphaned(HandBack):
    """This process lost its connection to RabbitMQ while the stream ran.

    The task message came on a channel of that connection: it cannot be
    acknowledged any more, and RabbitMQ has given it back to the queue, so a
    copy may already be answering it, here or in another worker. A stream
    goes on only under a copy that came back to its own process
    (tasks/chat.py, ``carry_on``); otherwise going on would interleave two
    runs in one response queue: the stream stops (this), and the copy
    answers the request again from the start, marked ``restart``.
    """


class Losses:
    """How many times this process lost a connection to RabbitMQ.

    Counted by the intake, whose connection is read all the time, so it
    notices at once (an answer lane notices only at its next publish, which
    may be a stream that began after the loss); a stream compares the count
    with the one at its start (:meth:`since`).
    """

    def __init__(self) -> None:
        self.count = 0

    def lost(self) -> None:
        self.count += 1

    def since(self, count: int) -> bool:
        """Whether a connection was lost since the count was ``count``."""
        return self.count != count


losses = Losses()

_TCP_ESTABLISHED = 1  # tcpi_state, the first byte of Linux's struct tcp_info


def _socket_of(connection: Any) -> Any:
    """The socket under a py-amqp connection (None once it is closed)."""
    return getattr(getattr(connection, "transport", None), "sock", None)


def peer_gone(connection: Any) -> bool:
    """Whether the broker has closed or reset the TCP connection under the
    py-amqp ``connection``, noticed or not: ``connected`` turns false only once
    its reader reads the end, and a reader that does not read never does.
    Linux's ``TCP_INFO`` tells the socket's state, with data still waiting in
    it or not; elsewhere, False."""
    sock = _socket_of(connection)
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return False
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:  # closed here already
        return True
    return bool(state != _TCP_ESTABLISHED)


class TaskLink:
    """The connection on which this process's Celery consumer takes task messages.

    A task message can be acknowledged (or given back) only on the connection
    it came on. A stream notes that connection when it begins
    (:meth:`current`) and stops, :class:`Orphaned`, once it is gone
    (:meth:`alive`): replaced by Celery after a loss, or broken (a write to
    it failed) while Celery has not noticed yet. After a broker restart
    Celery's consumer can go on with a dead connection for minutes, and
    start tasks from messages it took just before the loss: their messages
    are back in the queue, another worker answers them, and a stream that
    went on here would write a second answer into the same response queue.

    The connection is noted when the message comes (:meth:`received`, on
    Celery's ``task_received``), not when its task begins: a task can begin
    a second after its message came, and Celery may have replaced a lost
    connection by then. Noted at the task's start, the new connection would
    look alive, and the stream would run to its end beside the copy another
    worker took from the queue, both in one response queue.

    Only where the consumer runs in the process of the tasks (the Procfile's
    gevent pool); elsewhere nothing is noted and nothing is checked.
    """

    # Messages received whose task has not begun, at most (those that never
    # begin, revoked say, are forgotten oldest first).
    KEPT = 100_000

    def __init__(self) -> None:
        self.consumer: Any = None
        self.loop: Any = None  # the greenlet that runs the consumer's loop
        # The watchdog's (:meth:`look`): since when it has seen no consuming.
        self._broken_since: float | None = None
        self._idle_since: float | None = None
        self._reported: tuple[Any, str] | None = None  # the connection and what, last
        # id() of a received message's delivery_info, the dict its task sees
        # as ``task.request.delivery_info`` -> the connection it came on.
        self._came_on: dict[int, Any] = {}
        self._checked = 0  # the count of losses when the connection's socket was last asked
        self._behind_since: float | None = None  # since when its consumer is on an old connection
        # Whether RabbitMQ can be reached now (the intake's connection is up):
        # only then is a task consumer without a connection stuck.
        self.broker_up: Callable[[], bool] = lambda: False

    def current(self) -> Any:
        """The py-amqp connection under the consumer's kombu connection: kombu
        makes a new one under the same kombu object when a lost one is used
        again (``drain_events`` does, in Celery's loop), so the kombu object
        does not name a connection."""
        consumer = self.consumer
        connection = None if consumer is None else consumer.connection
        return None if connection is None else getattr(connection, "_connection", None)

    def received(self, request: Any) -> None:
        """Note the connection a task message came on: the consumer's current
        one, as Celery hands over a message while it reads that connection."""
        if self.consumer is None:
            return
        came_on = self._came_on
        came_on[id(request.delivery_info)] = self.current()
        while len(came_on) > self.KEPT:
            del came_on[next(iter(came_on))]

    def came_on(self, delivery_info: Any) -> Any:
        """The connection the message of a task that begins came on (its
        ``task.request.delivery_info``); the current one if none was noted."""
        noted = self._came_on.pop(id(delivery_info), None)
        return self.current() if noted is None else noted

    def alive(self, noted: Any) -> bool:
        """Whether ``noted`` (a :meth:`current`) still carries this process's tasks.

        After a connection of this process was lost (:data:`losses`), its
        socket is asked too (:func:`peer_gone`): the broker closed every
        connection, Celery's included, and a Celery loop that has stopped
        reading keeps a connection that looks up for minutes. Its last
        messages, taken from the socket after the loss, would begin tasks
        that run to their end beside the copies another worker answers.
        """
        if noted is None:
            return True
        if self.current() is not noted or not noted.connected:
            return False
        if losses.count != self._checked:
            if peer_gone(noted):
                return False
            self._checked = losses.count
        return True

    def watch(self) -> None:
        """Report, with where its loop is, a task consumer that takes no task
        while Celery goes on: its connection broken and Celery not noticing, or
        its connection up and nothing consumed (after a broker restart a
        worker can re-connect with its consumer on no queue, and stay so)."""
        import gevent

        while True:
            gevent.sleep(WATCH_EVERY)
            report = self.look(time.monotonic())
            if report is not None:
                where = stack_of(getattr(self.loop, "gr_frame", None))
                logger.error("%s: no task reaches this worker. Its loop is at:\n%s", report, where)

    def look(self, now: float) -> str | None:
        """One look of :meth:`watch` at the time ``now``: what to report, once
        for each connection and kind, when the consumer has taken no task for
        ``UNNOTICED`` seconds."""
        connection = self.current()
        if connection is None:
            # Celery between the stop and the start of its steps: a moment,
            # unless its restart after a loss hangs (then no task comes).
            self._broken_since = None
            if self.consumer is None or warm_shutdown.begun or not self.broker_up():
                self._idle_since = None
                return None
            if self._idle_since is None:
                self._idle_since = now
            return self._once(
                self.consumer,
                now - self._idle_since,
                "the task consumer has had no connection for %.0f s",
            )
        if not connection.connected or peer_gone(connection):
            self._idle_since = None
            if self._broken_since is None:
                self._broken_since = now
            return self._once(
                connection,
                now - self._broken_since,
                "the task consumer's connection has been broken for %.0f s and Celery "
                "has not noticed",
            )
        self._broken_since = None
        if self._reported is not None and self._reported[0] is self.consumer:
            self._reported = None  # it has a connection again
        if self._left_behind(connection):
            # Seen twice: Celery's own restart, between its Connection step and
            # its Tasks step, has the new connection and the old consumer too.
            if self._behind_since is None:
                self._behind_since = now
            return self._restart(connection) if now - self._behind_since >= WATCH_EVERY else None
        self._behind_since = None
        if self._consuming() or warm_shutdown.begun:
            self._idle_since = None
            return None
        if self._idle_since is None:
            self._idle_since = now
        return self._once(
            connection,
            now - self._idle_since,
            "the task consumer has consumed from none of its queues for %.0f s, its connection up",
        )

    def _once(self, connection: Any, lasted: float, report: str) -> str | None:
        """``report`` (with how long it ``lasted``) once it has for UNNOTICED seconds."""
        if lasted < UNNOTICED or not self._first(connection, report):
            return None
        return report % lasted

    def _first(self, connection: Any, report: str) -> bool:
        """Whether ``report`` is new for ``connection`` (then it is noted as said)."""
        if self._reported == (connection, report):
            return False
        self._reported = (connection, report)
        return True

    def _left_behind(self, connection: Any) -> bool:
        """Whether the task consumer consumes on a channel of another
        connection than the current one: kombu made a new connection under
        Celery's loop (``drain_events`` re-connects a lost connection by
        itself, and Celery, seeing no error, goes on reading the new one, on
        which nothing consumes: no task would come again)."""
        tasks = getattr(self.consumer, "task_consumer", None)
        channel = getattr(tasks, "channel", None)
        owner = getattr(channel, "connection", connection)
        return bool(tasks is not None and tasks.queues and owner is not connection)

    def _restart(self, connection: Any) -> str | None:
        """Shut the connection Celery's loop reads, so that its read fails and
        Celery starts its consumer again, as after any lost connection."""
        sock: Any = _socket_of(connection)
        with contextlib.suppress(OSError, AttributeError):
            sock.shutdown(socket.SHUT_RDWR)
        report = (
            "the task consumer's connection was made again under Celery's loop with no "
            "consumer on it (kombu re-connects a lost connection by itself); it is shut so "
            "that Celery starts its consumer again"
        )
        return report if self._first(connection, report) else None

    def _consuming(self) -> bool:
        """Whether the task consumer consumes from its queues (or has none: a
        control command cancelled them)."""
        tasks = getattr(self.consumer, "task_consumer", None)
        if tasks is None:  # between the stop and the start of Celery's steps
            return False
        return not tasks.queues or any(tasks.consuming_from(queue) for queue in tasks.queues)


task_link = TaskLink()


class TaskLinkStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Keeps :data:`task_link` on the Celery consumer of this process."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, c: Any) -> None:
        task_link.consumer = c
        if type(c.pool).__module__ == "celery.concurrency.gevent" and task_link.loop is None:
            import gevent

            task_link.loop = gevent.getcurrent()
            gevent.spawn(task_link.watch)


class RoomForCopies(bootsteps.StartStopStep):  # type: ignore[misc]
    """A gevent pool with room for twice ``--concurrency`` tasks, the prefetch
    left at ``--concurrency``.

    In normal running the pool never holds more tasks than unacknowledged
    task messages, the prefetch. After a lost connection the streams of its
    messages go on until their copies come back (tasks/chat.py), and the
    copies are tasks too, on the new connection, up to the prefetch: the
    pool needs room for both. Full, Celery's gevent pool stops its consumer's
    loop at ``spawn`` until a task ends: the copies, which the streams wait
    for, could not start. Its ``grow()`` would raise the prefetch as well
    (``num_processes``)."""

    requires = ("celery.worker.components:Pool",)

    def start(self, w: Any) -> None:
        pool = w.pool
        green = getattr(pool, "_pool", None)
        if type(pool).__module__ != "celery.concurrency.gevent" or green is None:
            return
        extra = pool.limit
        green.size += extra
        for _ in range(extra):
            green._semaphore.release()


class WarmShutdown:
    """When this process's streams must be handed back, once a warm shutdown began."""

    def __init__(self) -> None:
        self._deadline: float | None = None

    def begin(self, grace: float) -> None:
        """Start the grace (a second SIGTERM does not extend it). Called from the
        signal handler: it only sets the deadline."""
        if self._deadline is None:
            self._deadline = time.monotonic() + grace

    @property
    def begun(self) -> bool:
        return self._deadline is not None

    def due(self) -> bool:
        """Whether a stream must be handed back now."""
        return self._deadline is not None and time.monotonic() >= self._deadline


# One per process: the signal that starts it is the process's.
warm_shutdown = WarmShutdown()
