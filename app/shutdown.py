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

import time


class HandBack(Exception):
    """The worker is shutting down and the grace is over: give the request back."""


class Orphaned(HandBack):
    """This process lost its connection to RabbitMQ while the stream ran.

    The task message came on a channel of that connection: it cannot be
    acknowledged any more, and RabbitMQ has given it back to the queue, so a
    copy may already be answering it, here or in another worker. Going on
    would interleave two runs in one response queue; the stream stops, and
    the copy answers the request again from the start, marked ``restart``.
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
