"""The task: call the LLM and stream its answer onto the response queue.

The task message is acknowledged late and given back when its worker dies,
so every accepted request is answered at least once. A stream a second worker
takes over starts again from ``seq`` 0 with the header ``restart: true``. A
stream whose task message went with a lost connection and came back to the
same process goes on (:meth:`_Publisher.carry_on`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import gevent
import openai
from celery import Task
from celery.exceptions import Reject
from gevent import GreenletExit

from app import handoff, metrics
from app.broker import RETRY_POLICY, Lane, Lanes, Sender, dead_letter
from app.dispatcher import H_DISPATCHED, H_TOLD
from app.errors import DuplicateRequest
from app.lifecycle import (
    Cancels,
    Incarnation,
    Running,
    State,
    TaskMessage,
    Verdict,
    check_transition,
)
from app.protocol import Kind, ResponseStream, opens_only
from app.request import ChatRequest
from app.shutdown import HandBack, Orphaned, losses, task_link, warm_shutdown
from config import Settings
from config.upstreams import Upstream, Upstreams
from tasks import cancel, llm

logger = logging.getLogger(__name__)

# Chunks a stream forwards before it lets the process's other greenlets run.
# An LLM that streams faster than the worker reads leaves data waiting at every
# read, which then never yields: the cancel listener, the lanes and Celery's
# loop waited for the stream (a cancel took 7.7 s to be seen at 5,000 chunks/s).
YIELD_EVERY = 64

# Seconds a stream that lost its task message with a connection waits for it
# to come back to this process (then it goes on), and the bytes of answer it
# keeps to write again for that (past them it stops at a loss, as before).
CARRY_ON_WAIT = 30.0
CARRY_ON_KEEP = 1 << 20

# A task message that comes back (redelivered) to this process waits to hear
# whether another worker's stream of it goes on (tasks/cancel.py,
# ``holding``): for HOLDER_GRACE seconds of this process hearing the others
# (its listener may be reconnecting), HOLDER_WAIT at most. It then follows
# that stream while it hears of it at least every FOLLOW_SILENCE seconds,
# instead of asking the LLM again.
HOLDER_GRACE = 3.0
HOLDER_WAIT = 20.0
FOLLOW_SILENCE = 15.0

# The link of a task message that came back to another worker, which follows
# the stream here (:class:`Lease`): nothing here can acknowledge it.
REMOTE = "remote"

# The incarnations this process streams, and those it finished in the last
# RESPONSE_QUEUE_TTL (made with the first task, from its settings).
_running: Running | None = None


def running(settings: Settings) -> Running:
    global _running  # noqa: PLW0603 - one per process, made on first use
    if _running is None:
        _running = Running(keep=settings.response_queue_ttl, losses=lambda: losses.count)
    return _running


class PublishFailed(Exception):
    """The broker would not take a response message, even after retries."""


class Lease:
    """What a stream needs to go on after it lost its task message with a
    connection (:class:`~app.shutdown.Orphaned`): the task message that came
    back for it to this process (:meth:`~app.lifecycle.Running.copy_for`),
    within ``wait`` seconds."""

    def __init__(
        self,
        incarnation: Incarnation,
        runs: Running,
        message: TaskMessage,
        wait: float,
        *,
        cancels: Cancels | None = None,
        notices: cancel.Notices | None = None,
    ) -> None:
        self.incarnation = incarnation
        self.runs = runs
        self.message = message
        self.wait = wait
        self.cancels = cancels  # what other workers said of the task message
        self.notices = notices  # what this one says of it
        self.holding = False  # said: this stream goes on, its task message lost

    def lost(self) -> bool:
        """Whether the task message is no longer this stream's to acknowledge
        (one another worker follows this stream with stays so)."""
        if self.message.link == REMOTE:
            return self.runs.newer(self.incarnation, self.message)
        return not task_link.alive(self.message.link) or self.runs.newer(
            self.incarnation, self.message
        )

    def end(self, outcome: str, *, whole: bool) -> None:
        """The stream ended (``outcome`` as stream_chat counts it). If it said
        ``holding``, it says how it ended, for a worker that follows it: an
        answer that ended before a loss (not ``whole``) may have lost its
        last messages with it, and is answered again, as
        :meth:`~app.lifecycle.Running.end` does for a task message adopted here."""
        if self.holding and self.notices is not None:
            ended = "answered" if whole else "handed_back"
            self.notices.release(self.incarnation, "cancelled" if outcome == "cancelled" else ended)

    def hold(self) -> None:
        """Say that this stream goes on after a loss (``holding``): its task
        message may have gone with it, and come back to another worker,
        which then follows this stream. Said at once, so that it is heard as
        soon as RabbitMQ is back."""
        if self.notices is not None and not self.holding:
            self.notices.say("holding", self.incarnation.uid, self.incarnation.rid)
            self.holding = True

    def taken(self) -> bool:
        """Whether another worker answers the task message again itself."""
        return self.cancels is not None and self.cancels.taken(self.incarnation)

    def renew(self) -> None:
        """Take the task message that came back to this process; or go on
        while another worker that it came back to follows this stream
        (``following``); or raise Orphaned (none came, or another worker
        answers it again)."""
        incarnation, cancels = self.incarnation, self.cancels
        copy = self.runs.copy_for(
            incarnation,
            self.message,
            self.wait,
            elsewhere=lambda: (
                cancels is not None
                and (cancels.taken(incarnation) or cancels.followed(incarnation))
            ),
        )
        if copy is not None:
            self.message = copy
            return
        if cancels is not None and cancels.followed(incarnation) and not self.taken():
            logger.warning(
                "uid=%s: its task message came back to another worker, which follows "
                "this stream: it goes on here",
                incarnation.uid,
            )
            self.message = TaskMessage(REMOTE)
            return
        raise Orphaned


class _Publisher:
    """A stream's messages, handed to its lane (:class:`~app.broker.Sender`);
    a message the broker would not take, even after retries, is PublishFailed.

    With a :class:`Lease`, a stream that lost messages or its task message
    with a connection goes on (:meth:`carry_on`): it writes again, from
    ``seq`` 0 and marked ``restart`` and ``replay``, what it had written, and
    goes on after it: no second LLM call. A reader of the contract drops what
    it had at a ``restart`` and gets the same text again; the web front's
    readers skip what their client has (``replay``, same ``run``). Up to
    ``keep`` bytes of answer are kept for that; past them the stream stops as
    before (:class:`Orphaned`), and the task message that came back answers
    it again from the start.
    """

    def __init__(
        self, lanes: Lanes | Lane, since: int, lease: Lease | None = None, keep: int = 0
    ) -> None:
        self._lanes = lanes  # each Sender takes the next lane of Lanes
        self.since = since  # the count of losses its messages are written under
        self._sender = Sender(self._lane(), since)
        self.lease = lease
        self._keep = keep
        self._kept: list[tuple[str, str, dict[str, Any]]] | None = [] if lease else None
        self._size = 0
        self._again = False  # written again once: what follows is marked restart

    def _lane(self) -> Lane:
        return self._lanes.next() if isinstance(self._lanes, Lanes) else self._lanes

    def __call__(self, body: str, routing_key: str, properties: dict[str, Any]) -> None:
        headers = properties.get("application_headers") or {}
        if self._again:
            headers["restart"] = True
        if properties.get("type") != Kind.QUEUE:  # a place is not written again
            self._note(body, routing_key, properties, headers)
        try:
            with _publish_failures():
                self._sender(body, routing_key, properties)
        except Orphaned:
            self.carry_on()  # writes this one again too

    def _note(
        self, body: str, routing_key: str, properties: dict[str, Any], headers: dict[str, Any]
    ) -> None:
        if headers.get("seq") == 0:  # a new run of the answer (the first, or again())
            self._kept, self._size = ([] if self.lease else None), 0
        if self._kept is None:
            return
        self._size += len(body)
        if self._size > self._keep:
            self._kept = None  # too long to write again: a loss stops it
        else:
            self._kept.append((body, routing_key, properties))

    def check(self) -> None:
        """Go on (:meth:`carry_on`) if a connection was lost since its messages
        were written, or the task message is no longer the stream's;
        Orphaned if it cannot, or a copy that came back waits for it to stop."""
        lease = self.lease
        if lease is not None and lease.runs.superseded(lease.incarnation):
            raise Orphaned  # it could not go on before, and a copy waits for it to stop
        if lease is not None and lease.message.link == REMOTE and lease.taken():
            raise Orphaned  # its follower gave up on it, and answers it again
        if losses.since(self.since) or (lease is not None and lease.lost()):
            self.carry_on()

    def carry_on(self) -> None:
        """After a loss: under the task message that came back for the stream
        (the same, if only messages were lost), write again what was written,
        on a lane that sees no loss since; Orphaned if no message came back
        (another worker answers it again) or too much was written to keep."""
        lease = self.lease
        if lease is None or self._kept is None:
            raise Orphaned
        lease.hold()
        while True:
            if lease.lost():
                lease.renew()  # or Orphaned
            # What the last lane still has to write goes before what the next
            # one writes: a lane is a queue of its own, and a stream that went
            # on after only its task message was lost has a lane that works,
            # whose last messages could otherwise come after the next lane's,
            # and the answer would not be whole.
            try:
                self._sender.settle()
            except Exception:  # dropped with a lost connection: written again below
                logger.debug("a lane's last messages were dropped; written again")
            self.since = losses.count
            self._sender = Sender(self._lane(), self.since)
            self._again = True
            logger.warning(
                "uid=%s: goes on after a lost connection; its %d messages written again",
                lease.incarnation.uid,
                len(self._kept),
            )
            metrics.restarted("carried_on")
            try:
                with _publish_failures():
                    for body, routing_key, properties in self._kept:
                        headers = {
                            **properties["application_headers"],
                            "restart": True,
                            "replay": True,
                        }
                        self._sender(
                            body, routing_key, {**properties, "application_headers": headers}
                        )
                return
            except Orphaned:
                continue

    def settle(self) -> None:
        """Wait until every message is written (the task message is
        acknowledged after them)."""
        while True:
            try:
                with _publish_failures():
                    self._sender.settle()
                return
            except Orphaned:
                self.carry_on()

    def drain(self) -> None:
        """Wait until every message is written or dropped, whatever became of them.

        A kill (``gevent.kill`` raises GreenletExit where the task waits) can
        come while a stream waits here, its lane reconnecting: Celery's does,
        when it cancels the tasks of a connection it lost
        (``worker_cancel_long_running_tasks_on_connection_loss``, off here
        since such a stream goes on, :meth:`carry_on`). The wait goes on:
        the stream is ending already, and another copy of it must not begin
        before its messages are out. Let through, the kill would skip the end
        of the incarnation, and every later copy would be given back to come
        again: an answer that never ends.
        """
        while True:
            try:
                self._sender.settle()
            except GreenletExit:
                logger.debug("a stream killed while its messages drain: it ends after them")
                continue
            except Exception:  # told already, or the stream is over
                pass
            return


@contextmanager
def _publish_failures() -> Iterator[None]:
    try:
        yield
    except Orphaned:
        raise
    except Exception as exc:
        raise PublishFailed(str(exc)) from exc


class WaitAgain(Exception):
    """The request goes back to wait, for ``upstream``: the one it had is
    paused or saturated, or failed it and ``upstream`` is its fallback."""

    def __init__(self, upstream: str, tried: tuple[str, ...], why: str) -> None:
        super().__init__(why)
        self.upstream = upstream
        self.tried = tried
        self.why = why
        # (upstream, seconds): a saturated upstream, paused for every worker.
        self.pause: tuple[str, float] | None = None


@dataclass(frozen=True)
class Route:
    """The upstream a request's slot is of, and the upstreams that failed it."""

    upstream: Upstream
    tried: tuple[str, ...]
    upstreams: Upstreams

    @classmethod
    def of(cls, settings: Settings, request: ChatRequest, name: str, tried: Iterable[str]) -> Route:
        upstreams = settings.upstreams
        upstream = upstreams.get(name) or upstreams.route(request.model) or upstreams.all[0]
        return cls(upstream, tuple(tried), upstreams)

    def fallback(self, why: str) -> WaitAgain | None:
        """The first fallback that has not failed the request, to wait for;
        None: there is none, and the request ends with its error."""
        tried = (*self.tried, self.upstream.name)
        for name in self.upstream.fallback:
            if name not in tried and self.upstreams.get(name) is not None:
                metrics.fell_back(self.upstream.name, name)
                return WaitAgain(name, tried, f"{why}; falls back on {name}")
        return None

    def saturated(self, why: str) -> WaitAgain:
        """Where a request whose upstream is saturated waits: its first
        fallback, else its own upstream again (a pause is no failure)."""
        return self.fallback(why) or WaitAgain(self.upstream.name, self.tried, why)


def _wait_again(
    task: Task, request: ChatRequest, incarnation: Incarnation, wait: WaitAgain, *, again: bool
) -> None:
    """Publish the request to ``<ns>.waiting`` again (confirmed) before its task
    message ends and frees its slot. Raises Reject (requeue: the slot kept)
    if RabbitMQ does not take it."""
    settings: Settings = task.app.settings
    logger.warning("uid=%s: waits again for upstream %s (%s)", request.uid, wait.upstream, wait.why)
    try:
        with task.app.pools.confirmed.acquire(block=True) as producer:
            if wait.pause is not None:
                name, seconds = wait.pause
                logger.warning("upstream %s is saturated: paused for %.1f s", name, seconds)
                metrics.paused(name, seconds)
                cancel.pause(producer, settings, name, seconds)
            handoff.send(
                task,
                request,
                handoff.Handoff(
                    rid=incarnation.rid,
                    at=incarnation.handed_off_at,
                    upstream=wait.upstream,
                    tried=wait.tried,
                    again=again,
                ),
                settings,
                producer,
                retry=True,
                retry_policy=RETRY_POLICY,
            )
    except Exception as exc:
        logger.error("uid=%s: cannot wait again (%r); requeued in its slot", request.uid, exc)
        raise Reject(exc, requeue=True) from exc


def stream_chat(
    task: Task,
    payload: dict[str, Any],
    rid: str = "",
    at: float = 0.0,
    *,
    upstream: str = "",
    tried: list[str] | None = None,
    again: bool = False,
) -> None:
    """Answer one incarnation of a request; registered as ``chatqueue.stream_chat``.

    ``rid`` and ``at`` name the hand-off (see :mod:`app.lifecycle`);
    ``upstream`` the LLM server whose slot it holds, ``tried`` those that
    failed it. A task message that comes back (its worker died mid-answer),
    or that waited again after its answer began (``again``), starts the
    answer again, marked ``restart``.
    """
    settings: Settings = task.app.settings
    lost = losses.count  # a connection lost after this takes the task message with it
    link = task_link.came_on(task.request.delivery_info)
    request = ChatRequest.from_task(payload)
    uid = request.uid
    incarnation = Incarnation(uid, rid or str(task.request.id), at)
    restart = again or bool((task.request.delivery_info or {}).get("redelivered"))
    route = Route.of(settings, request, upstream, tried or ())
    runs = running(settings)
    message = TaskMessage(link)
    if not _to_stream(task, request, incarnation, runs, message):
        return
    state = check_transition(State.HANDED_OFF, State.STREAMING)
    finished = False
    notices = cancel.notices(settings)
    if restart:
        # Another worker's stream of it may wait for it: it is answered here.
        notices.say("taken", incarnation.uid, incarnation.rid)
    lease = Lease(
        incarnation,
        runs,
        message,
        CARRY_ON_WAIT,
        cancels=cancel.listener(settings).cancels,
        notices=notices,
    )
    publisher = _Publisher(task.app.pools.lanes, lost, lease, keep=CARRY_ON_KEEP)
    stream = ResponseStream(
        publisher,
        request.reply_to or settings.response_queue(uid),
        uid,
        restart=restart,
        rid=incarnation.rid,
    )
    figures = _figures(task, restart=restart, at=at)
    outcome = ""  # requeued: counted when it is answered
    try:
        if restart and not again:
            logger.warning("uid=%s: redelivered; the answer starts again", uid)
            metrics.restarted("redelivered")
        finished = answer(
            stream,
            request,
            incarnation,
            settings,
            figures,
            publisher=publisher,
            route=route,
            told=bool(task.request.get(H_TOLD)),
        )
        publisher.settle()
        outcome = ("error" if stream.error_code else "answered") if finished else "cancelled"
        check_transition(state, State.ANSWERED if finished else State.CANCELLED)
    except WaitAgain as wait:
        # Its slot goes back with this task message; the request waits again,
        # in its place (``at``), on its next upstream.
        publisher.settle()
        _wait_again(task, request, incarnation, wait, again=stream.started or restart)
        check_transition(state, State.WAITING)
    except PublishFailed as exc:
        # The broker is unreachable: give the request back to be answered later.
        logger.error("uid=%s: cannot publish the answer (%s); requeued", uid, exc)
        raise Reject(exc, requeue=True) from exc
    except HandBack as exc:
        # Unacknowledged, the task message goes back to the queue, and another
        # worker answers it again from the start, marked restart.
        check_transition(state, State.HANDED_BACK)
        why = _handed_back_why(exc, lease)
        logger.warning("uid=%s: handed back after %d messages (%s)", uid, stream.seq, why)
        raise Reject(why, requeue=True) from exc
    finally:
        # Its messages written (or dropped) before another copy of it may
        # start, on another lane, whose messages must come after them.
        publisher.drain()  # never raises
        runs.end(
            incarnation,
            finished=finished,
            lost=publisher.since,
            outcome="cancelled" if outcome == "cancelled" else "",
        )
        lease.end(outcome, whole=finished and publisher.since == losses.count)
        figures.end(outcome, stream)


def _figures(task: Task, *, restart: bool, at: float) -> metrics.Answering:
    """The figures of an answer, timed from its dispatch (the start of its
    slot), or from its hand-off if it carries none; a restart has no TTFT."""
    dispatched = task.request.get(H_DISPATCHED)
    if restart:
        return metrics.Answering(0.0)
    return metrics.Answering(float(dispatched) if isinstance(dispatched, int | float) else at)


def _handed_back_why(exc: HandBack, lease: Lease) -> str:
    if not isinstance(exc, Orphaned):
        return "warm shutdown, grace over"
    if lease.taken():
        return "its connection to RabbitMQ was lost: another worker answers its task message"
    return "its connection to RabbitMQ was lost: the task message was given back"


def _to_stream(
    task: Task, request: ChatRequest, incarnation: Incarnation, runs: Running, message: TaskMessage
) -> bool:
    """Whether this copy of ``incarnation`` streams its answer (:meth:`Running.begin`);
    the others end here."""
    uid, rid = incarnation.uid, incarnation.rid
    state = State.HANDED_OFF
    listener = cancel.listener(task.app.settings)
    cancels = listener.cancels
    if (task.request.delivery_info or {}).get("redelivered") and not runs.streams(incarnation):
        followed = _follow_elsewhere(task, incarnation, listener, message)
        if followed in ("answered", "cancelled", "gone"):
            check_transition(state, State.ADOPTED)
            return False
    verdict = runs.begin(incarnation, cancels, message=message)
    if verdict is Verdict.ADOPT:
        check_transition(state, State.ADOPTED)
        _follow(incarnation, runs, message)
        return False
    if verdict is Verdict.ANSWERED:
        check_transition(state, State.DROPPED)
        logger.warning("uid=%s: rid %s was answered already; copy dropped", uid, rid)
        return False
    if verdict is Verdict.DUPLICATE:
        check_transition(state, State.DROPPED)
        _drop_duplicate(task, request)
        return False
    if verdict is Verdict.BUSY:
        # Its copy here has not stopped yet: unacknowledged, the task message
        # comes back, and is answered once that copy is gone.
        check_transition(state, State.HANDED_BACK)
        logger.warning("uid=%s: rid %s still runs here; given back to come again", uid, rid)
        raise Reject("a superseded copy still runs", requeue=True)
    return True


def _follow(incarnation: Incarnation, runs: Running, message: TaskMessage) -> None:
    """A task message that came back while its stream goes on here: it is
    acknowledged when that stream ends (given back if the stream is), and
    until then the request is not lost if this worker dies."""
    uid = incarnation.uid
    logger.warning("uid=%s: came back while its answer streams here; that stream goes on", uid)
    outcome = runs.follow(incarnation, message, lambda: task_link.alive(message.link))
    if outcome == "handed_back":
        raise Reject("the stream it carried was handed back", requeue=True)
    logger.info("uid=%s: the task message that came back ends (%s)", uid, outcome)


def _follow_elsewhere(
    task: Task, incarnation: Incarnation, listener: cancel.CancelListener, message: TaskMessage
) -> str | None:
    """A task message that came back here: if another worker's stream of it
    goes on (it says ``holding``, within HOLDER_GRACE), wait for that
    stream's end instead of asking the LLM again, and say ``following`` so
    that it goes on. Its outcome (``answered``, ``cancelled``: the task
    message is acknowledged; ``handed_back``: it is answered here), ``lost``
    when that worker fell silent for FOLLOW_SILENCE (answered here), ``gone``
    when this copy went with a lost connection too; None if no stream of it
    goes on elsewhere."""
    uid, rid = incarnation.uid, incarnation.rid
    cancels = listener.cancels
    came = time.monotonic()
    while cancels.holding_heard_at(incarnation) is None:
        # HOLDER_GRACE of hearing the others (its listener may be reconnecting
        # too), HOLDER_WAIT at most.
        now, since = time.monotonic(), listener.connected_at
        if now - came >= HOLDER_WAIT or (
            since is not None and now - max(since, came) >= HOLDER_GRACE
        ):
            return None
        time.sleep(0.1)
    notices = cancel.notices(task.app.settings)
    notices.say("following", uid, rid)
    logger.warning("uid=%s: came back while its answer streams in another worker; follows it", uid)
    while (outcome := cancels.ended(incarnation)) is None:
        heard = cancels.holding_heard_at(incarnation) or 0.0
        if time.monotonic() - heard > FOLLOW_SILENCE:
            outcome = "lost"
            break
        if not task_link.alive(message.link):
            outcome = "gone"
            break
        time.sleep(0.5)
    if outcome in ("handed_back", "lost"):
        notices.say("taken", uid, rid)  # that stream stops, if it still runs
        logger.warning("uid=%s: the stream it followed %s; answered here again", uid, outcome)
    else:
        logger.info("uid=%s: the stream it followed ended (%s)", uid, outcome)
    return outcome


def _stop_if_due(publisher: _Publisher) -> None:
    """Raise :class:`HandBack` when the grace of a warm shutdown is over, and
    go on after a lost connection or :class:`Orphaned` (:meth:`_Publisher.check`)."""
    if warm_shutdown.due():
        raise HandBack
    publisher.check()


def _drop_duplicate(task: Task, request: ChatRequest) -> None:
    """Dead-letter a request whose uid another request is streaming in this process."""
    settings: Settings = task.app.settings
    error = DuplicateRequest(
        f"uid {request.uid} is being answered for another request; this one is dropped"
    )
    error.uid = request.uid
    logger.warning("uid=%s: rejected (%s): %s", request.uid, error.code, error.message)
    metrics.dead_lettered(error.code)
    try:
        with task.app.pools.confirmed.acquire(block=True) as producer:
            dead_letter(
                producer,
                settings,
                json.dumps(request.to_task()),
                error,
                content_type="application/json",
                content_encoding="utf-8",
            )
    except Exception as exc:  # the copy is dropped all the same
        logger.warning("uid=%s: could not dead-letter a duplicate: %r", request.uid, exc)


def answer(
    stream: ResponseStream,
    request: ChatRequest,
    incarnation: Incarnation,
    settings: Settings,
    figures: metrics.Answering,
    *,
    publisher: _Publisher,
    route: Route | None = None,
    told: bool = False,
) -> bool:
    """Stream the LLM's answer, or an error object, then ``[DONE]``; False if cancelled.

    ``figures`` takes the LLM's time to its first payload and the tokens;
    ``publisher``, the stream's, tells at each chunk whether a connection
    was lost (:func:`_stop_if_due`). ``route``: its upstream, and those that
    failed it; raises :class:`WaitAgain` when the request waits again, for
    that upstream (paused) or a fallback."""
    uid = request.uid
    cancels = cancel.listener(settings).cancels
    if cancels.cancelled(incarnation):
        logger.info("uid=%s: cancelled before it started", uid)
        return False
    _stop_if_due(publisher)
    route = route or Route.of(settings, request, "", ())
    upstream = route.upstream
    _starts(stream, request, route, settings, told=told)
    client = llm.client(settings, upstream)
    started = time.monotonic()
    for attempt in range(settings.llm_max_retries + 1):
        opened = False  # the LLM answered 200 and its stream began
        tokens = False  # a chunk with more than the opening role went out
        try:
            if request.stream:
                with llm.stream(client, request, upstream) as payloads:
                    opened = True
                    for payload, chunk in payloads:
                        if figures.llm_first is None:
                            figures.llm_first = time.monotonic()
                        if cancels.cancelled(incarnation):
                            # Leaving the block closes the HTTP stream: the
                            # LLM stops generating.
                            logger.info("uid=%s: cancelled after %d chunks", uid, stream.seq)
                            cancels.forget(incarnation)
                            return False
                        # Leaving the block closes the HTTP stream.
                        _stop_if_due(publisher)
                        stream.chunk(payload)
                        if stream.seq % YIELD_EVERY == 0:
                            gevent.sleep(0)
                        if _carries_token(chunk):
                            tokens = True
                            figures.tokens += 1
                        elif not tokens:
                            tokens = not opens_only(chunk)
            else:
                completion = llm.complete(client, request, upstream)
                figures.llm_first = time.monotonic()
                stream.completion(completion)
        except (PublishFailed, HandBack):
            raise
        except Exception as exc:
            if not opened and (wait := _saturated(exc, route)) is not None:
                raise wait from exc
            # The SDK already retried what failed before the stream opened; a
            # stream that broke before its first token is tried again here,
            # and its answer starts over (``restart``, seq 0) if its opening
            # chunk went out.
            if opened and not tokens and _retried(stream, exc, attempt, settings):
                continue
            _end_in_error(stream, exc, route, uid, tokens=tokens)
            return True
        stream.done()
        logger.info(
            "uid=%s: answered in %.2f s (%d messages)", uid, time.monotonic() - started, stream.seq
        )
        return True
    return True  # pragma: no cover - the loop always returns


def _retried(stream: ResponseStream, exc: Exception, attempt: int, settings: Settings) -> bool:
    """Whether a stream that broke before its first token is tried again
    (after a backoff); its answer then starts over if its opening chunk went out."""
    if attempt >= settings.llm_max_retries or not llm.retryable(exc):
        return False
    delay = min(0.5 * 2**attempt, 8.0)
    logger.warning(
        "uid=%s: LLM failed before the first token (%r); retry in %.1f s", stream.uid, exc, delay
    )
    metrics.retried_stream(restarts=stream.started)
    time.sleep(delay)
    if stream.started:
        stream.again()
    return True


def _end_in_error(
    stream: ResponseStream, exc: Exception, route: Route, uid: str, *, tokens: bool
) -> None:
    """The LLM call failed for good: the request waits for a fallback upstream
    (WaitAgain) if no token went out and it has one; else its answer ends
    with the error object and ``[DONE]``."""
    if not tokens and (fallback := route.fallback(repr(exc))):
        raise fallback from exc
    error, status = llm.describe(exc, started=stream.started)
    logger.warning(
        "uid=%s: LLM failed after %d messages: %s", uid, stream.seq, error["error"]["message"]
    )
    stream.fail(error, status)


def _starts(
    stream: ResponseStream, request: ChatRequest, route: Route, settings: Settings, *, told: bool
) -> None:
    """Its LLM call starts now: raise WaitAgain if its upstream is paused (the
    LLM sees no new call then); tell a request that was told its place while
    it waited that it waits no more (position 0)."""
    if cancel.listener(settings).paused(route.upstream.name):
        raise route.saturated("its upstream is paused")
    if request.queue_updates and told:
        stream.starts()


def _saturated(exc: Exception, route: Route) -> WaitAgain | None:
    """For an upstream that says it is saturated (a 429, or a 503 with
    ``retry-after``): the pause every worker takes, and where the request
    waits again, its retries untouched."""
    if not (isinstance(exc, openai.APIStatusError) and llm.saturated(exc.response)):
        return None
    wait = route.saturated(f"its upstream answered {exc.status_code}")
    wait.pause = (route.upstream.name, llm.pause_of(exc.response.headers))
    return wait


def _carries_token(chunk: dict[str, Any]) -> bool:
    """A chunk with content or a tool call (one token, from most LLM servers)."""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls")):
            return True
    return False
