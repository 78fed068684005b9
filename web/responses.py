"""Reading one answer from its response queue, for one client.

An :class:`Answer` is what every streaming route (SSE, the OpenAI drop-in,
the WebSocket) does with its answer: take the deliveries in order until
``[DONE]``, and then clean up. How it ends decides what becomes of the rest:

- ``[DONE]`` was passed on to the client: the queue is deleted, its stream
  has been delivered;
- the client left (:meth:`Answer.left`), or did not read its replies
  (``WEB_REPLY_BUFFER``): an answer read from the web process's reply queue
  (drop-in, WebSocket) cannot be read again by another client, so its LLM
  call is cancelled at once.
  A response queue (SSE) waits ``WEB_RESUME_GRACE`` seconds for its reader
  to come back with ``Last-Event-ID``; if none has, the queue is deleted
  and the LLM call cancelled (the cooperative cancel, so no tokens are
  paid for nobody);
- anything else (the web process shutting down, RabbitMQ gone for longer
  than ``WEB_RECONNECT_TIMEOUT``): the response queue and the LLM call are
  left alone, and the client reads the rest again, here or from another web
  process.

A response queue whose connection breaks (RabbitMQ restarted) is read again
on a new one, without the client seeing anything but a pause: the messages
it already has are skipped (:class:`Resume`). The reply queue is read
again the same way (:class:`web.services.Services` reconnects), and what a
worker that lost its own connection writes again is skipped
(:meth:`Answer._repeats`).

A client that reads again with ``Last-Event-ID`` often comes back before
its old reader has noticed it left (a client on another network now, whose
old connection is silent until the next keep-alive write; a web process in
its graceful shutdown): the response queue still has that reader's
consumer. Such a reader waits for the old one to go (``SSE_KEEPALIVE`` and a
little more at most) instead of a ``409``, which ``EventSource`` would take
as the end.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import gevent

from app import metrics
from app.broker import request_cancel
from app.errors import BrokerUnavailable
from app.protocol import Kind, opens_only
from app.request import ChatRequest
from config import Settings
from web.client import ClientGone, ClientWatch
from web.errors import AnswerRestarted, StreamBusy
from web.publisher import Replies
from web.router import Delivery, Stream
from web.services import Services
from web.submit import submit_and_read

logger = logging.getLogger(__name__)

# Between two tries to reach RabbitMQ again, for a stream whose connection broke.
RECONNECT_PAUSE = 1.0
# Seconds past SSE_KEEPALIVE a reader that resumes waits for the reader it replaces.
BUSY_SLACK = 5.0
# Between two looks whether that reader has gone.
BUSY_PAUSE = 0.5


class Resume:
    """Skips the messages a reader already has, when it reads a stream again.

    Its client saw up to ``seq`` (of the incarnation ``rid``, and with the
    ``restart`` mark, when known). The queue then starts with the last
    messages written to it, still unacknowledged: those of the same run of
    the answer with a ``seq`` up to that one are dropped. Anything else ends
    the skipping: a ``seq`` past it, another incarnation, or a run of the
    answer that a worker started again (the ``restart`` mark changes, or
    ``seq`` goes back). The client then gets the restart, and drops what it had.
    """

    def __init__(self, seq: int, rid: str | None = None, restart: bool | None = None) -> None:
        self.seq = seq
        self.rid = rid  # a Last-Event-ID names neither: the first message tells
        self.restart = restart
        self.active = True
        self._previous: int | None = None

    def seen(self, delivery: Delivery) -> bool:
        """Whether the reader has ``delivery`` already (then it is skipped)."""
        if not self.active:
            return False
        if self._previous is None and self.rid is None:
            self.rid = delivery.rid
        if self._previous is None and self.restart is None:
            self.restart = delivery.restart
        if (
            delivery.seq is None
            or delivery.seq > self.seq
            or delivery.rid != self.rid
            or delivery.restart != self.restart
            or (self._previous is not None and delivery.seq <= self._previous)
        ):
            self.active = False
            return False
        self._previous = delivery.seq
        return True


class Answer:
    """One client reading its answer: :meth:`next` until done, then :meth:`close`."""

    def __init__(
        self,
        services: Services,
        uid: str,
        *,
        environ: Mapping[str, Any] | None = None,
        wait: float = 0.0,
        replies: Replies | None = None,
        after: int | None = None,
    ) -> None:
        self.services = services
        self.uid = uid
        self.rid: str | None = None  # the incarnation whose messages came
        self.run: str | None = None  # the run of the answer they belong to
        self.seq: int | None = None  # the seq of the last message handed out
        self.restarted = False  # whether that message had the restart mark
        self.shown = False  # a token has been handed out
        # Its replies (the process's reply queue), or its response queue.
        self.stream: Replies | Stream = (
            replies if replies is not None else self._open(wait, resuming=after is not None)
        )
        self.resume = Resume(after) if after is not None else None
        self.finished = False  # the worker has nothing more to send
        self.delivered = 0
        self._broken_since: float | None = None  # when its connection broke
        self._gone = False  # the client closed its connection
        self._left_at = 0.0
        self._closed = False
        self._cancelled = False  # its LLM call was asked to stop
        if isinstance(self.stream, Replies):
            self.stream.on_overflow = self._on_too_slow
        self._watch = ClientWatch(environ, self._on_gone) if environ is not None else None
        metrics.recorder().web_streams.inc()

    def _open(self, wait: float, *, resuming: bool) -> Stream:
        """The response queue's stream; a reader that resumes waits for the one
        it replaces to go (see the module)."""
        router = self.services.router
        give_up = time.monotonic() + self.services.settings.sse_keepalive + BUSY_SLACK
        while True:
            try:
                return router.open(self.uid, wait)
            except StreamBusy:
                if not resuming or time.monotonic() >= give_up:
                    raise
                gevent.sleep(BUSY_PAUSE)

    def _on_gone(self) -> None:
        self._gone = True
        self.stream.interrupt(ClientGone())

    def _on_too_slow(self) -> None:
        """The client does not read its replies (:class:`Replies`): the
        LLM call stops now, not once the reader gets to the error."""
        gevent.spawn(self._cancel, "its client does not read its answer")

    def next(self, timeout: float | None) -> Delivery | None:
        """The next message, or None after ``timeout`` seconds of silence.

        Raises :class:`ClientGone` when the client left, and a
        :class:`~app.errors.ChatqueueError` when the stream broke for good.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._gone:
                raise ClientGone()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._broken_since is not None and not self._reopen(left):
                return None
            try:
                delivery = self.stream.get(left)
            except BrokerUnavailable:
                if not isinstance(self.stream, Stream):
                    raise  # the process reconnected for them, and gave up
                self._broken_since = time.monotonic()
                logger.info("uid=%s: connection lost; reading again on a new one", self.uid)
                continue
            if delivery is None:
                return None
            if delivery.kind == Kind.QUEUE:
                # The request's place while it waits: not part of the answer,
                # and of no use once the answer began.
                if self.seq is None and self.resume is None:
                    return delivery
                continue
            if self._repeats(delivery):
                # What the client has, written again by a worker that lost its
                # connection and went on: the rest comes after it.
                self.restarted = delivery.restart
                continue
            if self.resume is not None and self.resume.seen(delivery):
                continue
            if isinstance(self.stream, Replies):
                self._check_not_restarted(delivery)
            self.delivered += 1
            self.rid = delivery.rid or self.rid
            self.run = delivery.run
            self.seq = delivery.seq
            self.restarted = delivery.restart
            if delivery.final:
                self.finished = True
            return delivery

    def _repeats(self, delivery: Delivery) -> bool:
        """Whether ``delivery`` is a message the client has, written again
        (``replay``) in the same run of the answer."""
        return (
            delivery.replay
            and delivery.run is not None
            and delivery.run == self.run
            and delivery.seq is not None
            and self.seq is not None
            and delivery.seq <= self.seq
        )

    def _check_not_restarted(self, delivery: Delivery) -> None:
        """Raise :class:`AnswerRestarted` for a run of the answer that a worker
        started again (its first worker died or handed it back) after a token
        was handed out. A reply's reader (a drop-in stream, the
        WebSocket) cannot tell its client to drop what it had, as SSE's ``id``
        going back to 0 does: passed on, the new run would follow the old one's
        part as if it were the rest. A restart before any token repeats only
        the opening chunk, and goes through."""
        if (
            self.shown
            and self.seq is not None
            and delivery.seq is not None
            and (delivery.seq <= self.seq or delivery.restart != self.restarted)
        ):
            logger.warning(
                "uid=%s: a worker started the answer again after %d messages; it ends "
                "with an error (a drop-in or WebSocket answer cannot show a restart)",
                self.uid,
                self.delivered,
            )
            raise AnswerRestarted(
                "the worker answering this request stopped mid-answer and another began it "
                "again from the start, which this stream cannot show; ask again"
            )
        if not self.shown and delivery.kind == Kind.CHUNK:
            try:
                chunk = json.loads(delivery.body)
            except ValueError:
                chunk = None
            self.shown = not (isinstance(chunk, dict) and opens_only(chunk))

    def _reopen(self, timeout: float | None) -> bool:
        """Consume the response queue again on a new connection; False while
        RabbitMQ is not back (after ``timeout`` seconds at most).

        Raises :class:`BrokerUnavailable` after ``WEB_RECONNECT_TIMEOUT``.
        """
        assert self._broken_since is not None
        settings = self.services.settings
        give_up = self._broken_since + settings.web_reconnect_timeout
        wake = time.monotonic() + (
            timeout if timeout is not None else settings.web_reconnect_timeout
        )
        old = self.stream
        assert isinstance(old, Stream)
        while True:
            try:
                self.stream = self.services.router.open(self.uid)
            except (BrokerUnavailable, StreamBusy) as exc:
                # StreamBusy: the broker has not noticed the old connection's end yet.
                now = time.monotonic()
                if now >= give_up:
                    raise BrokerUnavailable(
                        f"RabbitMQ did not come back in {settings.web_reconnect_timeout:g} s "
                        f"(WEB_RECONNECT_TIMEOUT): {exc}; read again"
                    ) from exc
                if now >= wake:
                    return False
                gevent.sleep(min(RECONNECT_PAUSE, wake - now, give_up - now))
                continue
            break
        old.close(delete=False)
        logger.info(
            "uid=%s: reading again after %.1f s, from seq %s",
            self.uid,
            time.monotonic() - self._broken_since,
            self.seq,
        )
        self._broken_since = None
        if self.seq is not None:
            self.resume = Resume(self.seq, self.rid, self.restarted)
        return True

    def close(self) -> None:
        """Stop reading. A delivered answer's queue is deleted; an answer
        that is not complete is left to be read again, but for replies
        (drop-in, WebSocket), which nobody can read again: their LLM call is
        cancelled.

        The SSE route closes an answer once its ``[DONE]`` is written, before
        the response ends: a client that read the response to its end finds
        the queue gone, and a ``[DONE]`` that could not be written (the
        client, or this web process, went) leaves the answer to be read again
        (:meth:`undelivered`).
        """
        if self._stop():
            return
        if self.finished:
            self.stream.close(delete=True)
        elif isinstance(self.stream, Replies):
            self._cancel("the answer cannot be delivered")
            self.stream.close(delete=True)
        else:
            logger.info("uid=%s: stopped reading after %d messages", self.uid, self.delivered)
            self.stream.close(delete=False)

    def undelivered(self) -> None:
        """The final message was read, but not passed on: the answer is not
        delivered, and a response queue stays to be read again (its last
        messages, unacknowledged, go back to it)."""
        if isinstance(self.stream, Stream):
            self.finished = False

    def left(self) -> None:
        """The client went away before the answer was complete."""
        if self.finished or isinstance(self.stream, Replies):
            self.close()
            return
        if self._stop():
            return
        grace = self.services.settings.web_resume_grace
        logger.info(
            "uid=%s: client left after %d messages; the answer waits %g s for it",
            self.uid,
            self.delivered,
            grace,
        )
        self._left_at = time.time()
        self.stream.close(delete=False)
        gevent.spawn_later(grace, self._abandon, self.stream.queue)

    def _abandon(self, queue: str) -> None:
        """Nobody came back for the answer: delete its queue, then cancel its
        LLM call; unless a reader (of any web process) consumes it again."""
        try:
            deleted = self.services.router.delete_unused(queue)
        except BrokerUnavailable as exc:
            logger.warning("uid=%s: could not delete its queue: %r", self.uid, exc)
            return
        if deleted:
            self._cancel("its client did not come back")

    def _stop(self) -> bool:
        """Stop watching the client; True if the answer was closed already."""
        if self._closed:
            return True
        self._closed = True
        metrics.recorder().web_streams.dec()
        if self._watch is not None:
            self._watch.stop()
        return False

    def _cancel(self, why: str) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        logger.info(
            "uid=%s: %s after %d messages; cancelling the LLM call", self.uid, why, self.delivered
        )
        settings = self.services.settings
        try:
            with self.services.producer() as producer:
                request_cancel(producer, settings, self.uid, self.rid, self._left_at or time.time())
        except Exception as exc:
            # The client is gone either way; the LLM timeout bounds the waste.
            logger.warning("uid=%s: could not ask for a cancel: %r", self.uid, exc)


class Resubmission:
    """Whether a request read from the reply queue (the drop-in, the WebSocket)
    is submitted again when its answer was lost before it began.

    That is: at the submit, RabbitMQ was away (a 503 at the first try), or
    the process's reply queue was lost (a cluster's node died with it, see
    :class:`web.publisher.ReplyBook`). Nothing was sent to the client yet:
    the request is cancelled and submitted again, as long as RabbitMQ takes
    it within ``WEB_RECONNECT_TIMEOUT`` of the first loss. The client gets its
    answer, later.
    """

    def __init__(self, settings: Settings) -> None:
        self._limit = settings.web_reconnect_timeout
        self._give_up: float | None = None

    def submit(
        self, services: Services, data: dict[str, Any], key: str | None
    ) -> tuple[ChatRequest, Replies]:
        """:func:`~web.submit.submit_and_read`; RabbitMQ away is a 503 at the
        first try, and tried again after a loss until the limit."""
        while True:
            try:
                return submit_and_read(services, data, key)
            except BrokerUnavailable:
                if self._give_up is None or time.monotonic() >= self._give_up:
                    raise
                gevent.sleep(RECONNECT_PAUSE)

    def lost(self, exc: BrokerUnavailable, uid: str) -> None:
        """An answer lost before it began: ``exc`` once past the limit."""
        if self._give_up is None:
            self._give_up = time.monotonic() + self._limit
        if time.monotonic() >= self._give_up:
            raise exc
        logger.info("uid=%s: %s before its answer began; submitting it again", uid, exc)


def ask(
    services: Services,
    data: dict[str, Any],
    key: str | None,
    environ: Mapping[str, Any],
    timeout: float,
) -> tuple[ChatRequest, Answer, Delivery | None]:
    """Submit ``data`` and wait up to ``timeout`` seconds for its answer's first
    message (None if none came), for a reader in this process (the drop-in):
    the answer comes to the process's reply queue, and is asked again if it
    is lost before it began (:class:`Resubmission`).
    """
    again = Resubmission(services.settings)
    while True:
        accepted, replies = again.submit(services, data, key)
        answer = Answer(services, accepted.uid, environ=environ, replies=replies)
        try:
            return accepted, answer, answer.next(timeout)
        except BrokerUnavailable as exc:
            answer.close()  # cancels it: its answer could reach nobody
            again.lost(exc, answer.uid)
        except BaseException:
            answer.close()
            raise
